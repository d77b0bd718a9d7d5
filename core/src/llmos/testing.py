"""Helpers for testing plugins (and the kernel) against the real system.

* ``serve_app`` and ``serve_in_thread`` run the real daemon on a loopback
  port in a thread;
* ``registered`` puts an in-process plugin into a :class:`PluginManager` for
  the length of a ``with`` block;
* ``write_distribution`` writes what ``pip install`` leaves behind for a
  one-module plugin, so entry-point discovery is tested without a wheel;
* ``safetensors_bytes`` and ``write_safetensors`` make weight files without
  torch;
* ``EventRecorder`` is a plugin whose monitor sink keeps every event;
* ``system_tool`` finds a program a test runs for real (Prometheus,
  Chromium), skipping the test when it is missing — or failing it where
  ``LLMOS_REQUIRE_SYSTEM_TOOLS=1`` (CI) says it must be there.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import struct
import textwrap
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from llmos.logs import configure_logging
from llmos.plugin import hookimpl
from llmos.plugin.manager import PluginInfo, PluginManager
from llmos.types import MonitorEvent, MonitorSinkSpec

if TYPE_CHECKING:
    from fastapi import FastAPI

    from llmos.runtime.kernel import Kernel
    from llmos.server.run import DaemonServer


@contextlib.contextmanager
def registered(pm: PluginManager, plugin: object, name: str) -> Iterator[PluginInfo]:
    """Register ``plugin`` under ``name`` for the block, unregister it after,
    whatever happens inside."""
    info = pm.register(plugin, name)
    try:
        yield info
    finally:
        pm.unregister(name)


@contextlib.contextmanager
def json_logs(level: str = "warning") -> Iterator[None]:
    """llmos's logging as JSON lines at ``level`` for a block of tests (quick to
    render, easy to parse), then structlog's configuration as it was before —
    not structlog's defaults, which print every level to stdout and would
    corrupt the ``--json`` output of a CLI test that runs later."""
    saved = structlog.get_config()
    configure_logging(level, fmt="json")
    try:
        yield
    finally:
        structlog.configure(**saved)


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


class EventRecorder:
    """A plugin object whose monitor sink keeps every event, in order::

    recorder = EventRecorder()
    kernel.load_plugins()
    kernel.plugins.register(recorder, "recorder")
    kernel.start()
    ...
    kernel.bus.stop()  # deliver what is queued
    kinds = [e.kind for e in recorder.events]
    """

    def __init__(self, sink: str = "recorder") -> None:
        self.sink = sink
        self.events: list[MonitorEvent] = []

    def of(self, kind: str) -> list[MonitorEvent]:
        """The events of one kind."""
        return [e for e in self.events if e.kind == kind]

    @hookimpl
    def llmos_register_monitor_sinks(self, register: Callable[[MonitorSinkSpec], None]) -> None:
        events = self.events

        class Sink:
            def emit(self, event: MonitorEvent) -> None:
                events.append(event)

            def close(self) -> None:
                pass

        register(MonitorSinkSpec(name=self.sink, create=lambda options: Sink()))


@attrs.frozen
class RunningDaemon:
    """A daemon :func:`serve_app` runs: its base URL, app and uvicorn server."""

    url: str
    app: FastAPI
    server: DaemonServer

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port


@contextlib.contextmanager
def serve_app(
    app: FastAPI, *, wait_ready: bool = True, timeout: float = 60.0, port: int = 0
) -> Iterator[RunningDaemon]:
    """Run a daemon app (from :func:`llmos.server.create_app`) on a loopback
    port (``0``: a free one) in a thread, with the real middleware and the
    graceful drain; stop it afterwards. ``wait_ready``: return once
    ``/readyz`` is 200. A given ``port`` brings a stopped daemon back where
    its clients knew it."""
    import threading
    import time

    import httpx
    import uvicorn

    from llmos.server.run import DaemonServer

    drain = app.state.kernel.config.server.drain_timeout
    server = DaemonServer(
        uvicorn.Config(app, host="127.0.0.1", port=port, log_config=None, access_log=False),
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
        yield RunningDaemon(url=url, app=app, server=server)
    finally:
        server.should_exit = True
        thread.join(timeout=drain + 10)
        if thread.is_alive():
            raise RuntimeError("the test daemon did not stop")


@contextlib.contextmanager
def serve_in_thread(
    kernel: Kernel, *, wait_ready: bool = True, timeout: float = 60.0
) -> Iterator[str]:
    """Run the daemon for ``kernel`` (see :func:`serve_app`); yield its base
    URL (``http://127.0.0.1:PORT``) — what a plugin's end-to-end test or a
    benchmark points an HTTP or OpenAI client at."""
    from llmos.server.app import create_app

    with serve_app(create_app(kernel), wait_ready=wait_ready, timeout=timeout) as running:
        yield running.url


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "U8": 1}


def safetensors_bytes(tensors: Mapping[str, Sequence[int] | tuple[str, Sequence[int]]]) -> bytes:
    """A valid safetensors file of zeros: ``{"w": [4, 4]}`` (F32) or
    ``{"w": ("F16", [4, 4])}`` per tensor — for tests of code that reads
    model folders (scans, uploads, parameter counts) without torch."""
    header: dict[str, Any] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, spec in tensors.items():
        dtype, shape = spec if isinstance(spec, tuple) else ("F32", spec)
        size = math.prod(shape) * _DTYPE_SIZES[dtype]
        header[name] = {
            "dtype": dtype,
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)  # the reference writer pads with spaces
    return struct.pack("<Q", len(raw)) + raw + bytes(offset)


def write_safetensors(
    path: Path, tensors: Mapping[str, Sequence[int] | tuple[str, Sequence[int]]]
) -> int:
    """Write :func:`safetensors_bytes` to ``path``; return the element count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(safetensors_bytes(tensors))
    return sum(math.prod(spec[1] if isinstance(spec, tuple) else spec) for spec in tensors.values())


def system_tool(name: str, *, install: str = "bash .ci/system-packages") -> str:
    """Path of the program ``name`` for a test that runs it for real.

    Missing, the test skips with how to install it; with
    ``LLMOS_REQUIRE_SYSTEM_TOOLS=1`` in the environment (``.ci/run`` sets it)
    it fails instead, so CI cannot pass by skipping."""
    import pytest

    path = shutil.which(name)
    if path is not None:
        return path
    why = f"{name!r} is not installed (run `{install}`)"
    if os.environ.get("LLMOS_REQUIRE_SYSTEM_TOOLS") == "1":
        pytest.fail(why + "; LLMOS_REQUIRE_SYSTEM_TOOLS=1 says it must be", pytrace=False)
    pytest.skip(why)
