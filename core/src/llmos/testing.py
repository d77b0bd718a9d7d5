"""Helpers for testing plugins (and the kernel) against the real system.

``serve_in_thread`` runs the real daemon on a loopback port in a thread;
``registered`` puts an in-process plugin into a :class:`PluginManager` for the
length of a ``with`` block; ``write_distribution`` writes what ``pip install``
would leave behind for a one-module plugin, so entry-point discovery can be
tested without building a wheel.
"""

from __future__ import annotations

import contextlib
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from llmos.plugin.manager import PluginInfo, PluginManager

if TYPE_CHECKING:
    from llmos.runtime.kernel import Kernel


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


@contextlib.contextmanager
def serve_in_thread(
    kernel: Kernel, *, wait_ready: bool = True, timeout: float = 60.0
) -> Iterator[str]:
    """Run the daemon for ``kernel`` on a free loopback port in a thread;
    yield its base URL (``http://127.0.0.1:PORT``) and stop it afterwards.

    Real HTTP, the real app and middleware: what a plugin's end-to-end test
    (or a benchmark) points an HTTP or OpenAI client at.
    """
    import threading
    import time

    import httpx
    import uvicorn

    from llmos.server.app import create_app
    from llmos.server.run import DaemonServer

    app = create_app(kernel)
    drain = kernel.config.server.drain_timeout
    server = DaemonServer(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False),
        app.state.daemon,
        drain_timeout=drain,
    )
    thread = threading.Thread(target=server.run, name="llmos-test-daemon", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + timeout
        while not server.started:
            if not thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test daemon did not start")
            time.sleep(0.01)
        url = f"http://127.0.0.1:{server.port}"
        while wait_ready and httpx.get(f"{url}/readyz", timeout=5).status_code != 200:
            if time.monotonic() > deadline:
                raise RuntimeError("the test daemon did not become ready")
            time.sleep(0.02)
        yield url
    finally:
        server.should_exit = True
        thread.join(timeout=drain + 10)
