"""The daemon over real HTTP on loopback: probes, errors, keys, body cap, plugin
routes, start-up, and the SIGTERM drain (in a subprocess, with real signals)."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from fastapi import APIRouter, FastAPI, Request
from fastapi.responses import StreamingResponse
from pydantic import BaseModel

from llmos import __version__
from llmos.config import load_config
from llmos.errors import ConfigError, NotFoundError, error_type
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.server import DaemonServer, check_bind, create_app, serve
from llmos.testing import json_logs, serve_app
from llmos.types import RouteSpec

CAP = 1024


@pytest.fixture(autouse=True, scope="module")
def _json_logs() -> Iterator[None]:
    # JSON lines render exceptions as plain text, quickly; the console
    # renderer's rich tracebacks take seconds per 500.
    with json_logs():
        yield


def _wait_until(predicate: Callable[[], Any], timeout: float = 10.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or predicate}")


# --------------------------------------------------------------------------
# In-process test plugins
# --------------------------------------------------------------------------


class Item(BaseModel):
    name: str
    count: int


class RoutesPlugin:
    """Routes under /t that exercise bodies, validation and errors."""

    def __init__(self) -> None:
        self.body_lengths: list[int] = []

    @hookimpl
    def llmos_register_routes(self, register: Callable[[RouteSpec], None]) -> None:
        router = APIRouter()

        @router.post("/echo")
        async def echo(request: Request) -> dict[str, int]:
            body = await request.body()
            self.body_lengths.append(len(body))
            return {"length": len(body)}

        @router.post("/items")
        def create_item(item: Item) -> Item:
            return item

        @router.get("/items/{item_id}")
        def get_item(item_id: int) -> dict[str, int]:
            return {"id": item_id}

        @router.get("/missing")
        def missing() -> None:
            raise NotFoundError("model 'ghost' is not registered", param="model")

        @router.get("/boom")
        def boom() -> None:
            raise RuntimeError("kaboom")

        @router.get("/whoami")
        def whoami(request: Request) -> dict[str, str]:
            return {"request_id": request.state.request_id}

        @router.get("/stream")
        async def stream() -> StreamingResponse:
            async def lines() -> Any:
                for i in range(3):
                    yield f"{i}\n"
                    await asyncio.sleep(0.15)

            return StreamingResponse(lines(), media_type="text/plain")

        register(RouteSpec(router=router, prefix="/t"))


def _routes_plugin(*routes: tuple[str, str], prefix: str = "") -> object:
    """A plugin that registers GET/POST routes answering ``{"plugin": True}``."""

    class Plugin:
        @hookimpl
        def llmos_register_routes(self, register: Callable[[RouteSpec], None]) -> None:
            router = APIRouter()
            for method, path in routes:
                router.add_api_route(path, lambda: {"plugin": True}, methods=[method])
            register(RouteSpec(router=router, prefix=prefix))

    return Plugin()


class BlockingStartup:
    """Holds ``llmos_startup`` until released, like a plugin warming a model."""

    def __init__(self) -> None:
        self.release = threading.Event()

    @hookimpl
    def llmos_startup(self) -> None:
        self.release.wait(timeout=10)


# --------------------------------------------------------------------------
# A real server on a free loopback port, in a thread
# --------------------------------------------------------------------------


@attrs.define
class Daemon:
    kernel: Kernel
    app: FastAPI
    server: DaemonServer
    client: httpx.Client

    @property
    def url(self) -> str:
        return str(self.client.base_url).rstrip("/")


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``daemon(("name", plugin), ..., overrides=[...], wait_ready=True)``."""
    with ExitStack() as stack:

        def start(
            *plugins: tuple[str, object], overrides: tuple[str, ...] = (), wait_ready: bool = True
        ) -> Daemon:
            config = load_config(
                env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_LOAD_PLUGINS": ""},
                overrides=[f"server.max_body_bytes={CAP}", "server.drain_timeout=2", *overrides],
            )
            kernel = Kernel(config)
            kernel.load_plugins()
            for name, plugin in plugins:
                kernel.plugins.register(plugin, name)
            running = stack.enter_context(serve_app(create_app(kernel), wait_ready=wait_ready))
            client = stack.enter_context(httpx.Client(base_url=running.url, timeout=10))
            return Daemon(kernel=kernel, app=running.app, server=running.server, client=client)

        yield start


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body) >= {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    # OpenAI's: the class of error by status, the kind as a string (or null)
    assert body["error"]["type"] == error_type(response.status_code), body
    assert body["error"]["code"] is None or isinstance(body["error"]["code"], str), body
    return body["error"]


# --------------------------------------------------------------------------
# Probes and start-up
# --------------------------------------------------------------------------


def test_healthz_and_readyz_when_ready(daemon: Callable[..., Daemon]) -> None:
    d = daemon()
    health = d.client.get("/healthz")
    assert health.status_code == 200
    assert health.json() == {"status": "ok"}
    ready = d.client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready"}
    assert d.app.state.kernel is d.kernel


def test_listens_and_is_live_before_the_kernel_is_ready(daemon: Callable[..., Daemon]) -> None:
    slow = BlockingStartup()
    d = daemon(("slow-start", slow), ("routes", RoutesPlugin()), wait_ready=False)

    assert d.client.get("/healthz").status_code == 200
    ready = d.client.get("/readyz")
    assert ready.status_code == 503
    assert ready.json()["status"] == "starting"
    assert _error(ready)["code"] == "unavailable"
    # Other routes take no work until the kernel is ready.
    refused = d.client.get("/t/whoami")
    assert refused.status_code == 503
    assert _error(refused)["code"] == "unavailable"
    assert refused.headers["retry-after"] == "5"

    slow.release.set()
    _wait_until(lambda: d.client.get("/readyz").status_code == 200, what="ready")
    assert d.client.get("/readyz").json() == {"status": "ready"}
    assert d.client.get("/t/whoami").status_code == 200


# --------------------------------------------------------------------------
# Body cap
# --------------------------------------------------------------------------


def test_body_over_the_cap_is_refused_with_413(daemon: Callable[..., Daemon]) -> None:
    routes = RoutesPlugin()
    d = daemon(("routes", routes))

    ok = d.client.post("/t/echo", content=b"x" * 1000)
    assert ok.status_code == 200
    assert ok.json() == {"length": 1000}
    chunked_ok = d.client.post("/t/echo", content=iter([b"x" * 300] * 3))
    assert chunked_ok.status_code == 200
    assert chunked_ok.json() == {"length": 900}

    declared = d.client.post("/t/echo", content=b"x" * (CAP + 1))
    assert declared.status_code == 413
    error = _error(declared)
    assert error["code"] == "payload_too_large"
    assert str(CAP) in error["message"]

    # Refused on the header alone: this client declares a big body and sends
    # none of it, so a server that waited for the body would never answer.
    with socket.create_connection(("127.0.0.1", d.server.port), timeout=5) as raw:
        raw.sendall(
            b"POST /t/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 100000000\r\n\r\n"
        )
        assert raw.recv(65536).startswith(b"HTTP/1.1 413 ")

    # No Content-Length: counted while received, cut off past the cap.
    chunked = d.client.post("/t/echo", content=iter([b"x" * 300] * 5))
    assert "content-length" not in chunked.request.headers
    assert chunked.status_code == 413
    assert _error(chunked)["code"] == "payload_too_large"

    # The route only ever saw the two bodies under the cap.
    assert routes.body_lengths == [1000, 900]


# --------------------------------------------------------------------------
# API keys and the bind rule
# --------------------------------------------------------------------------


def test_api_keys_guard_every_route_but_the_probes(daemon: Callable[..., Daemon]) -> None:
    d = daemon(
        ("routes", RoutesPlugin()),
        overrides=('server.api_keys=["first-key-123", "second-key-456"]',),
    )
    missing = d.client.get("/t/whoami")
    assert missing.status_code == 401
    assert missing.headers["www-authenticate"] == "Bearer"
    assert _error(missing)["type"] == "authentication_error"

    wrong = d.client.get("/t/whoami", headers={"Authorization": "Bearer second-key-45"})
    assert wrong.status_code == 401
    assert _error(wrong)["type"] == "authentication_error"
    assert _error(wrong)["code"] == _error(missing)["code"] == "invalid_api_key"
    assert "second-key" not in wrong.text  # keys never echoed

    right = d.client.get("/t/whoami", headers={"Authorization": "Bearer second-key-456"})
    assert right.status_code == 200
    assert d.client.get("/openapi.json").status_code == 401
    assert d.client.get("/healthz").status_code == 200
    assert d.client.get("/readyz").status_code == 200


def test_check_bind_requires_keys_off_loopback(tmp_path: Path) -> None:
    for host in ("0.0.0.0", "::", "192.168.1.10", "example.com"):
        with pytest.raises(ConfigError) as info:
            check_bind(host, ())
        message = str(info.value)
        assert "set server.api_keys or LLMOS_API_KEYS, or bind to 127.0.0.1" in message
    check_bind("0.0.0.0", ("a-key",))
    for host in ("127.0.0.1", "127.3.2.1", "::1", "[::1]", "localhost"):
        check_bind(host, ())

    # serve() refuses before it builds or binds anything.
    kernel = Kernel(
        load_config(env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_LOAD_PLUGINS": ""})
    )
    with pytest.raises(ConfigError, match="LLMOS_API_KEYS"):
        serve(kernel, host="0.0.0.0", port=0)


# --------------------------------------------------------------------------
# Errors in one shape, request ids
# --------------------------------------------------------------------------


def test_errors_have_one_shape(daemon: Callable[..., Daemon]) -> None:
    d = daemon(("routes", RoutesPlugin()))

    unknown = d.client.get("/no/such/route")
    assert unknown.status_code == 404
    assert _error(unknown)["code"] == "not_found"
    assert "/no/such/route" in _error(unknown)["message"]

    wrong_method = d.client.delete("/healthz")
    assert wrong_method.status_code == 405
    assert _error(wrong_method)["code"] == "method_not_allowed"

    invalid = d.client.post("/t/items", json={"name": "a", "count": "many"})
    assert invalid.status_code == 400
    assert _error(invalid)["type"] == "invalid_request_error"
    assert _error(invalid)["code"] == "invalid_type"
    assert _error(invalid)["param"] == "count"
    assert "count" in _error(invalid)["message"]
    bad_path = d.client.get("/t/items/abc")
    assert bad_path.status_code == 400
    assert _error(bad_path)["param"] == "item_id"

    not_found = d.client.get("/t/missing")
    assert not_found.status_code == 404
    assert _error(not_found) == {
        "message": "model 'ghost' is not registered",
        "type": "invalid_request_error",
        "param": "model",
        "code": "not_found",
    }

    crash = d.client.get("/t/boom", headers={"X-Request-ID": "trace-me-1"})
    assert crash.status_code == 500
    assert _error(crash) == {
        "message": "internal error (request id trace-me-1)",
        "type": "server_error",
        "param": None,
        "code": None,
    }
    assert crash.headers["x-request-id"] == "trace-me-1"
    assert "kaboom" not in crash.text


def test_request_id_is_echoed_or_generated(daemon: Callable[..., Daemon]) -> None:
    d = daemon(("routes", RoutesPlugin()))
    echoed = d.client.get("/t/whoami", headers={"X-Request-ID": "abc.DEF_123-x"})
    assert echoed.headers["x-request-id"] == "abc.DEF_123-x"
    assert echoed.json() == {"request_id": "abc.DEF_123-x"}

    for bad in ("x" * 65, "has space", "semi;colon"):
        replaced = d.client.get("/healthz", headers={"X-Request-ID": bad})
        assert replaced.headers["x-request-id"] not in ("", bad)
    generated = {d.client.get("/healthz").headers["x-request-id"] for _ in range(3)}
    assert len(generated) == 3
    assert d.client.get("/nowhere").headers["x-request-id"]


def test_streaming_response_counts_as_in_flight_until_it_ends(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon(("routes", RoutesPlugin()))
    state = d.app.state.daemon
    with d.client.stream("GET", "/t/stream") as response:
        lines = response.iter_lines()
        assert next(lines) == "0"
        assert state.inflight == 1
        assert list(lines) == ["1", "2"]
    _wait_until(lambda: state.inflight == 0, timeout=2, what="in-flight count to drop")


# --------------------------------------------------------------------------
# Plugin routes
# --------------------------------------------------------------------------


def test_plugin_routes_are_served_and_in_the_schema(daemon: Callable[..., Daemon]) -> None:
    d = daemon(("routes", RoutesPlugin()))
    schema = d.client.get("/openapi.json")
    assert schema.status_code == 200
    info = schema.json()["info"]
    assert (info["title"], info["version"]) == ("llmos", __version__)
    paths = schema.json()["paths"]
    assert {"/healthz", "/readyz", "/t/echo", "/t/items/{item_id}"} <= set(paths)
    # The offline daemon serves no CDN-backed docs pages.
    assert d.client.get("/docs").status_code == 404
    assert d.client.get("/redoc").status_code == 404


def test_colliding_plugin_routes_fail_the_plugin(daemon: Callable[..., Daemon]) -> None:
    d = daemon(
        ("routes", RoutesPlugin()),
        ("shadow", _routes_plugin(("GET", "/healthz"), ("GET", "/shadow/only"))),
        ("twin", _routes_plugin(("POST", "/echo"), ("GET", "/twin/only"), prefix="/t")),
        ("alias", _routes_plugin(("GET", "/items/{other}"), ("GET", "/alias/only"), prefix="/t")),
    )
    infos = {info.name: info for info in d.kernel.plugins.plugins()}
    assert infos["routes"].status == "loaded"

    assert infos["shadow"].status == "failed"
    assert "'llmos'" in infos["shadow"].error and "'shadow'" in infos["shadow"].error
    assert "GET /healthz" in infos["shadow"].error
    assert infos["twin"].status == "failed"
    assert "'routes'" in infos["twin"].error and "'twin'" in infos["twin"].error
    assert "POST /t/echo" in infos["twin"].error
    assert infos["alias"].status == "failed"
    assert "'routes'" in infos["alias"].error and "'alias'" in infos["alias"].error

    # None of a rejected plugin's routes is served, colliding or not.
    for path in ("/shadow/only", "/twin/only", "/alias/only"):
        assert d.client.get(path).status_code == 404, path
    assert d.client.get("/healthz").json() == {"status": "ok"}
    assert d.client.post("/t/echo", content=b"abc").json() == {"length": 3}
    assert d.client.get("/t/items/7").json() == {"id": 7}


# --------------------------------------------------------------------------
# serve() in a real process: SIGTERM drain, strict start failure
# --------------------------------------------------------------------------

SERVE_SCRIPT = """
import asyncio
import sys
from pathlib import Path

from fastapi import APIRouter

from llmos.config import load_config
from llmos.logs import configure_logging
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.server import serve
from llmos.types import RouteSpec


class Slow:
    @hookimpl
    def llmos_register_routes(self, register):
        router = APIRouter()

        @router.get("/slow")
        async def slow(seconds: float = 2.0):
            Path(sys.argv[2]).touch()  # tells the test this request is in flight
            await asyncio.sleep(seconds)
            return {"done": True}

        @router.get("/fast")
        async def fast():
            return {"done": True}

        register(RouteSpec(router=router))


class FailingStartup:
    @hookimpl
    def llmos_startup(self):
        raise RuntimeError("cannot reach the model store")


configure_logging("info", fmt="json")
kernel = Kernel(load_config(overrides=sys.argv[3:]))
kernel.load_plugins()
kernel.plugins.register(Slow() if sys.argv[1] == "slow" else FailingStartup(), sys.argv[1])
sys.exit(serve(kernel, port=0))
"""


def _serve_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env.update(
        LLMOS_HOME=str(tmp_path / "home"),
        LLMOS_LOAD_PLUGINS="",
        PYTHONUNBUFFERED="1",
        **extra,
    )
    return env


class _Lines:
    """Collects a pipe's lines on a thread so the test can wait for one."""

    def __init__(self, pipe: Any) -> None:
        self.lines: list[str] = []
        self._new: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._read, args=(pipe,), daemon=True).start()

    def _read(self, pipe: Any) -> None:
        for line in pipe:
            self.lines.append(line)
            self._new.put(line)

    def wait_for(self, needle: str, timeout: float = 20.0) -> str:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self._new.get(timeout=0.1)
            except queue.Empty:
                continue
            if needle in line:
                return line
        raise AssertionError(f"no line with {needle!r} in:\n{''.join(self.lines)}")


@attrs.define
class _Served:
    """``serve()`` running the test script in a child process."""

    proc: subprocess.Popen[str]
    stderr: _Lines
    base: str
    marker: Path
    slow: dict[str, Any] = attrs.field(factory=dict)
    worker: threading.Thread | None = None

    def start_slow_request(self, seconds: float = 2.0) -> None:
        def run() -> None:
            try:
                self.slow["response"] = httpx.get(
                    self.base + "/slow", params={"seconds": seconds}, timeout=30
                )
            except httpx.HTTPError as exc:
                self.slow["error"] = exc

        self.worker = threading.Thread(target=run)
        self.worker.start()
        _wait_until(self.marker.exists, what="the slow request to start")

    def wait_draining(self) -> httpx.Response:
        return _wait_until(
            lambda: (r := httpx.get(self.base + "/readyz")).status_code == 503 and r,
            what="/readyz to turn 503",
        )


@pytest.fixture
def served(tmp_path: Path) -> Iterator[Callable[..., _Served]]:
    """``served(*overrides)`` starts the script's slow-route daemon on a free
    port and waits until it is ready."""
    procs: list[subprocess.Popen[str]] = []

    def start(*overrides: str) -> _Served:
        script = tmp_path / "serve.py"
        script.write_text(SERVE_SCRIPT)
        marker = tmp_path / "slow-started"
        proc = subprocess.Popen(
            [sys.executable, str(script), "slow", str(marker), *overrides],
            env=_serve_env(tmp_path),
            stderr=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        stderr = _Lines(proc.stderr)
        listening = json.loads(stderr.wait_for("llmos listening on"))
        base = f"http://127.0.0.1:{listening['port']}"
        assert listening["event"] == f"llmos listening on {base}"
        _wait_until(lambda: httpx.get(base + "/readyz").status_code == 200, what="ready")
        return _Served(proc=proc, stderr=stderr, base=base, marker=marker)

    yield start
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sigterm_drains_in_flight_requests_then_exits_0(served: Callable[..., _Served]) -> None:
    s = served()
    s.start_slow_request()

    s.proc.send_signal(signal.SIGTERM)
    assert s.wait_draining().json()["status"] == "draining"
    refused = httpx.get(s.base + "/fast")
    assert s.worker is not None and s.worker.is_alive(), "the slow request should be in flight"
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "5"
    assert _error(refused)["code"] == "unavailable"

    s.worker.join(timeout=10)
    assert s.slow["response"].status_code == 200
    assert s.slow["response"].json() == {"done": True}
    assert s.proc.wait(timeout=10) == 0
    assert "Traceback" not in "".join(s.stderr.lines)


def test_drain_timeout_cuts_in_flight_requests(served: Callable[..., _Served]) -> None:
    s = served("server.drain_timeout=0.3")
    s.start_slow_request(seconds=20)
    started = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    assert s.proc.wait(timeout=10) == 0
    # Long before the slow request's 20 s were up.
    assert time.monotonic() - started < 8
    assert s.worker is not None
    s.worker.join(timeout=10)
    cut = s.slow["response"]
    assert cut.status_code == 503
    assert _error(cut)["code"] == "unavailable"
    s.stderr.wait_for("server.drain_timeout")
    assert "Traceback" not in "".join(s.stderr.lines)


def test_second_signal_forces_exit(served: Callable[..., _Served]) -> None:
    s = served()
    s.start_slow_request(seconds=20)
    started = time.monotonic()
    s.proc.send_signal(signal.SIGTERM)
    s.wait_draining()
    s.proc.send_signal(signal.SIGINT)
    assert s.proc.wait(timeout=10) == 1
    assert time.monotonic() - started < 8
    assert s.worker is not None
    s.worker.join(timeout=10)
    # Abandoned: the client gets the cut-off 503 if it was flushed before the
    # exit, else a dropped connection; never the route's answer.
    if "response" in s.slow:
        assert s.slow["response"].status_code == 503
        assert _error(s.slow["response"])["code"] == "unavailable"
    else:
        assert isinstance(s.slow["error"], httpx.TransportError)
    s.stderr.wait_for("server.forced_exit")


def test_strict_start_failure_exits_non_zero_with_one_line(tmp_path: Path) -> None:
    script = tmp_path / "serve.py"
    script.write_text(SERVE_SCRIPT)
    run = subprocess.run(
        [sys.executable, str(script), "failing", str(tmp_path / "unused")],
        env=_serve_env(tmp_path, LLMOS_STRICT_PLUGINS="1"),
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode == 3, run.stderr  # PluginError.exit_code
    failures = [line for line in run.stderr.splitlines() if "kernel.start_failed" in line]
    assert len(failures) == 1, run.stderr
    record = json.loads(failures[0])
    assert "failing" in record["error"]
    assert "cannot reach the model store" in record["error"]
    assert "Traceback" not in run.stderr
