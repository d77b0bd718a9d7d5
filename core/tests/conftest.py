"""Fixtures shared by the kernel's tests."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmos.logs import configure_logging
from llmos.testing import write_distribution


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    """Warnings and errors only: the log sink would print every test's events."""
    configure_logging("warning", fmt="console")


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., None]]:
    """``site(dist, source, entry=None, version="1.0")`` adds a distribution
    under ``tmp_path``, which is put on ``sys.path`` for the test."""
    monkeypatch.syspath_prepend(str(tmp_path))
    written: list[str] = []

    def add(dist: str, source: str, **kwargs: str) -> None:
        write_distribution(tmp_path, dist, source, **kwargs)
        written.append(dist.replace("-", "_"))

    yield add
    for module in written:
        sys.modules.pop(module, None)


# the console script next to this interpreter, whether or not the venv is activated
LLMOS = shutil.which("llmos", path=str(Path(sys.executable).parent))


@pytest.fixture
def env(tmp_path: Path) -> dict[str, str]:
    """A clean environment: own home, own plugin folder, no user config."""
    plugins = tmp_path / "site"
    plugins.mkdir()
    out = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LLMOS_") and k not in ("PYTHONPATH",)
    }
    out.update(
        LLMOS_HOME=str(tmp_path / "home"),
        PYTHONPATH=str(plugins),
        LLMOS_LOG_FORMAT="json",
        COLUMNS="200",  # rich tables: no wrapping inside the cells tests look for
    )
    return out


def llmos(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    assert LLMOS, "the llmos console script is not installed (make install)"
    return subprocess.run(
        [LLMOS, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )
