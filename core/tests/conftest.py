"""Fixtures shared by the kernel's tests."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmos.testing import write_distribution


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
