"""Helpers for testing plugins (and the kernel) against the real plugin system.

``registered`` puts an in-process plugin into a :class:`PluginManager` for
the length of a ``with`` block; ``write_distribution`` writes what ``pip
install`` would leave behind for a one-module plugin, so entry-point discovery
can be tested without building a wheel.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from pathlib import Path

from llmos.plugin.manager import PluginInfo, PluginManager


@contextlib.contextmanager
def registered(pm: PluginManager, plugin: object, name: str) -> Iterator[PluginInfo]:
    """Register ``plugin`` under ``name`` for the block, unregister it after,
    whatever happens inside."""
    info = pm.register(plugin, name)
    try:
        yield info
    finally:
        pm.unregister(name)


def write_distribution(
    root: Path, dist: str, source: str, *, entry: str | None = None, version: str = "1.0"
) -> None:
    """Write an installed-looking distribution under ``root``: a module named
    after ``dist`` and a ``.dist-info`` folder whose ``entry_points.txt``
    declares it in the ``llmos`` group. Put ``root`` on ``sys.path`` (or
    ``PYTHONPATH``) and the kernel discovers it like a pip-installed plugin."""
    module = dist.replace("-", "_")
    (root / f"{module}.py").write_text(textwrap.dedent(source))
    info = root / f"{module}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[llmos]\n{entry or dist} = {module}\n")
