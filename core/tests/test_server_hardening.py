"""The daemon against hostile clients, over real HTTP on loopback: DNS
rebinding (Host) and cross-origin writes (Origin), slow and idle connections
(header, body and keep-alive timeouts, on raw sockets), and an OpenAPI schema
that says what the daemon really answers (errors, 405's Allow)."""

from __future__ import annotations

import asyncio
import json
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from fastapi import APIRouter, Request

from llmos.config import load_config
from llmos.errors import ConfigError, error_type
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.server import create_app
from llmos.server.middleware import host_name
from llmos.testing import RunningDaemon, json_logs, serve_app
from llmos.types import NAME_PATTERN, RouteSpec

#: what every operation but the probes declares, besides its own responses
ERRORS = ("400", "401", "404", "413", "429")


@pytest.fixture(autouse=True, scope="module")
def _json_logs() -> Iterator[None]:
    with json_logs():
        yield


class Routes:
    """``/t/echo`` (reads its body), ``/t/slow`` (takes its time) and a PUT on
    the kernel's own ``/api/groups`` path, which only has a GET."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    @hookimpl
    def llmos_register_routes(self, register: Callable[[RouteSpec], None]) -> None:
        router = APIRouter()

        @router.post("/t/echo")
        async def echo(request: Request) -> dict[str, int]:
            body = await request.body()
            self.bodies.append(body)
            return {"length": len(body)}

        @router.get("/t/slow")
        async def slow(seconds: float) -> dict[str, bool]:
            await asyncio.sleep(seconds)
            return {"done": True}

        @router.get("/t/thing")
        def read_thing() -> dict[str, str]:
            return {"thing": "read"}

        @router.delete("/t/thing")
        def drop_thing() -> dict[str, str]:
            return {"thing": "dropped"}

        @router.put("/api/groups")
        def put_groups() -> dict[str, str]:
            return {"groups": "replaced"}

        register(RouteSpec(router=router))


@attrs.define
class Daemon:
    running: RunningDaemon
    routes: Routes
    client: httpx.Client

    @property
    def port(self) -> int:
        return self.running.port

    def raw(self) -> socket.socket:
        """A raw connection; a generous timeout so a server that never
        closes fails the test instead of hanging it."""
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)


@pytest.fixture
def daemon(tmp_path: Path) -> Iterator[Callable[..., Daemon]]:
    """``daemon(*overrides)``: a daemon with :class:`Routes`, no other plugin."""
    with ExitStack() as stack:

        def start(*overrides: str) -> Daemon:
            config = load_config(
                env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_LOAD_PLUGINS": ""},
                overrides=["server.drain_timeout=2", *overrides],
            )
            kernel = Kernel(config)
            kernel.load_plugins()
            routes = Routes()
            kernel.plugins.register(routes, "routes")
            running = stack.enter_context(serve_app(create_app(kernel)))
            client = stack.enter_context(httpx.Client(base_url=running.url, timeout=30))
            return Daemon(running=running, routes=routes, client=client)

        yield start


def _error(response: httpx.Response) -> dict[str, Any]:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == error_type(response.status_code), body
    return body["error"]


def _read_response(conn: socket.socket) -> bytes:
    """One whole response with a Content-Length, from a kept-alive connection."""
    data = b""
    while b"\r\n\r\n" not in data or len(data.partition(b"\r\n\r\n")[2]) < int(
        re.search(rb"content-length: (\d+)", data.lower()).group(1)  # type: ignore[union-attr]
    ):
        chunk = conn.recv(65536)
        assert chunk, f"closed mid-response: {data!r}"
        data += chunk
    return data


def _read_until_closed(conn: socket.socket) -> bytes:
    """Everything the server sends until it closes the connection."""
    data = b""
    while True:
        try:
            chunk = conn.recv(65536)
        except ConnectionResetError:
            return data
        if not chunk:
            return data
        data += chunk


# --------------------------------------------------------------------------
# Host: DNS rebinding
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("header", "name"),
    [
        ("127.0.0.1:8470", "127.0.0.1"),
        ("LOCALHOST", "localhost"),
        ("[::1]:8470", "::1"),
        ("[::1]", "::1"),
        ("llm.example.com.", "llm.example.com"),
        ("a.b:1", "a.b"),
        ("", None),
        ("::1", None),
        ("x.com:port", None),
        ("user@x.com", None),
        ("x.com/path", None),
        ("x.com:1:2", None),
    ],
)
def test_host_header_parsing(header: str, name: str | None) -> None:
    assert host_name(header) == name


def test_a_foreign_host_is_refused_before_anything_else(daemon: Callable[..., Daemon]) -> None:
    """The issue's rebinding: ``Host: attacker.example`` got 201 on POST /api/models."""
    d = daemon()
    card = {"name": "rebound", "provider": "openai-compatible", "source": "https://x/v1"}
    refused = d.client.post("/api/models", json=card, headers={"Host": "attacker.example"})
    assert refused.status_code == 400
    error = _error(refused)
    assert error["type"] == "invalid_request_error"
    assert "attacker.example" in error["message"]
    assert "server.allowed_hosts" in error["message"]
    assert "rebound" not in d.client.get("/api/models").text

    refused = d.client.post("/t/echo", content=b"x", headers={"Host": "attacker.example:80"})
    assert refused.status_code == 400
    assert d.routes.bodies == []
    # the probes answer whatever the host is called (a load balancer's own name)
    for probe in ("/healthz", "/readyz"):
        assert d.client.get(probe, headers={"Host": "attacker.example"}).status_code == 200

    # any port; loopback names; any IP address (a name is needed to rebind)
    for host in ("127.0.0.1", "localhost:9000", "[::1]:8470", "127.0.0.2", "10.1.2.3:8470"):
        assert d.client.post("/t/echo", content=b"x", headers={"Host": host}).status_code == 200


def test_allowed_hosts_names_and_wildcards(daemon: Callable[..., Daemon]) -> None:
    d = daemon(
        'server.allowed_hosts=["llm.example.com", "*.corp.example"]',
        'server.api_keys=["k-123"]',
    )
    key = {"Authorization": "Bearer k-123"}
    for host in ("llm.example.com", "LLM.example.com.:443", "a.corp.example", "a.b.corp.example"):
        response = d.client.get("/t/thing", headers={"Host": host, **key})
        assert response.status_code == 200, host
    for host in ("corp.example", "xcorp.example", "llm.example.com.evil", "example.com"):
        response = d.client.get("/t/thing", headers={"Host": host, **key})
        assert response.status_code == 400, host
    # refused before the key check: a rebinding page learns nothing more
    assert d.client.get("/t/thing", headers={"Host": "evil.example"}).status_code == 400
    assert d.client.get("/t/thing", headers={"Host": "llm.example.com"}).status_code == 401


def test_a_star_turns_the_host_check_off_but_not_the_origin_check(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon('server.allowed_hosts=["*"]')
    assert d.client.get("/t/thing", headers={"Host": "anything.example"}).status_code == 200
    forged = d.client.post("/t/echo", content=b"x", headers={"Origin": "http://evil.example"})
    assert forged.status_code == 403


def test_the_configured_and_the_bound_host_are_answered(daemon: Callable[..., Daemon]) -> None:
    # serve_app binds 127.0.0.1 whatever server.host says; both names are answered
    d = daemon("server.host=my-box.lan")
    assert d.running.app.state.daemon.bound_host == "127.0.0.1"
    assert d.client.get("/t/thing", headers={"Host": "my-box.lan:8470"}).status_code == 200
    assert d.client.get("/t/thing", headers={"Host": "other-box.lan"}).status_code == 400


# --------------------------------------------------------------------------
# Origin: cross-origin browser writes
# --------------------------------------------------------------------------


def test_cross_origin_writes_are_refused(daemon: Callable[..., Daemon]) -> None:
    d = daemon('server.allowed_hosts=["app.example.com"]')

    def post(**headers: str) -> httpx.Response:
        return d.client.post("/t/echo", content=b"x", headers=headers)

    for origin in ("http://evil.example", "null", "https://127.0.0.1.evil.example", "file://"):
        refused = post(Origin=origin)
        assert refused.status_code == 403, origin
        error = _error(refused)
        assert error["type"] == "permission_error"
        assert "cross-origin write refused" in error["message"]
    refused = post(**{"Sec-Fetch-Site": "cross-site"})
    assert refused.status_code == 403
    assert "Sec-Fetch-Site" in _error(refused)["message"]
    refused = d.client.delete("/t/thing", headers={"Origin": "http://evil.example"})
    assert refused.status_code == 403
    assert d.routes.bodies == []

    same_origin = f"http://127.0.0.1:{d.port}"
    for headers in (
        {},  # curl, SDKs
        {"Origin": same_origin, "Sec-Fetch-Site": "same-origin"},  # the dashboard
        {"Origin": "http://localhost:3000"},  # a local tool
        {"Origin": "https://app.example.com"},  # allowed_hosts
        {"Sec-Fetch-Site": "same-site"},
        {"Sec-Fetch-Site": "none"},  # typed into the address bar
    ):
        assert post(**headers).status_code == 200, headers
    # the page's own host, whatever it is called
    proxied = post(Host="10.0.0.7:8443", Origin="https://10.0.0.7:8443")
    assert proxied.status_code == 200
    # reads are not refused: the browser keeps a foreign page from reading them
    assert d.client.get("/t/thing", headers={"Origin": "http://evil.example"}).status_code == 200


# --------------------------------------------------------------------------
# Slow and idle connections
# --------------------------------------------------------------------------


def test_half_a_request_line_is_closed_after_the_header_timeout(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon("server.header_timeout_s=0.5")
    with d.raw() as conn:
        conn.sendall(b"GET /hea")
        assert _read_until_closed(conn) == b""
    # one that connects and says nothing at all
    with d.raw() as conn:
        assert _read_until_closed(conn) == b""


def test_headers_that_trickle_in_are_cut_even_though_they_progress(
    daemon: Callable[..., Daemon],
) -> None:
    """Slowloris: a byte at a time, never finishing, keeps resetting any
    per-read timer; the header timeout is for the whole header."""
    d = daemon("server.header_timeout_s=0.5")
    request = b"GET /t/thing HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Pad: " + b"a" * 400
    closed = False
    with d.raw() as conn:
        for i in range(len(request)):
            try:
                conn.sendall(request[i : i + 1])
            except OSError:  # reset or broken pipe: the server closed it
                closed = True
                break
            time.sleep(0.05)
        if not closed:
            assert _read_until_closed(conn) == b""


def test_a_request_on_a_kept_alive_connection_gets_the_header_timeout_too(
    daemon: Callable[..., Daemon],
) -> None:
    """uvicorn's keep-alive timer stops at the next request's first byte."""
    d = daemon("server.header_timeout_s=0.5", "server.keep_alive_timeout_s=60")
    with d.raw() as conn:
        conn.sendall(b"GET /t/thing HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert _read_response(conn).startswith(b"HTTP/1.1 200 ")
        conn.sendall(b"GET /t/thi")
        assert _read_until_closed(conn) == b""


def test_slow_handlers_and_kept_alive_connections_are_not_cut(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon("server.header_timeout_s=0.3", "server.keep_alive_timeout_s=60")
    with d.raw() as conn:
        for _ in range(2):
            conn.sendall(b"GET /t/slow?seconds=1 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            answer = _read_response(conn)
            assert answer.startswith(b"HTTP/1.1 200 ")
            assert answer.endswith(b'{"done":true}')
    assert d.running.server.config.timeout_keep_alive == 60


def test_a_stalled_body_gets_408_and_the_connection_is_closed(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon("server.body_timeout_s=0.5")
    for framing in (b"Content-Length: 100\r\n", b"Transfer-Encoding: chunked\r\n"):
        with d.raw() as conn:
            conn.sendall(b"POST /t/echo HTTP/1.1\r\nHost: 127.0.0.1\r\n" + framing + b"\r\n")
            conn.sendall(b"a\r\n0123456789\r\n" if b"chunked" in framing else b"0123456789")
            answer = _read_until_closed(conn)
        head, _, body = answer.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408 "), answer
        assert b"connection: close" in head.lower()
        error = json.loads(body)["error"]
        assert error["code"] == "request_timeout"
        assert error["type"] == "invalid_request_error"
        assert "server.body_timeout_s" in error["message"]
    assert d.routes.bodies == []


def test_a_slow_body_that_keeps_coming_is_not_cut(daemon: Callable[..., Daemon]) -> None:
    d = daemon("server.body_timeout_s=1")
    body = b"abcdefgh"
    with d.raw() as conn:
        conn.sendall(
            b"POST /t/echo HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: %d\r\n\r\n" % len(body)
        )
        for i in range(len(body)):  # ~2 s in all, twice the timeout
            time.sleep(0.25)
            conn.sendall(body[i : i + 1])
        answer = _read_response(conn)
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert answer.endswith(b'{"length":8}')
    assert d.routes.bodies == [body]


def test_timeouts_and_allowed_hosts_are_checked_in_the_config(tmp_path: Path) -> None:
    env = {"LLMOS_HOME": str(tmp_path)}
    for override in (
        "server.header_timeout_s=0",
        "server.body_timeout_s=-1",
        "server.keep_alive_timeout_s=0",
        'server.allowed_hosts=["http://llm.example.com"]',
        'server.allowed_hosts=["llm.example.com:8470"]',
        'server.allowed_hosts=["a.*.example"]',
    ):
        with pytest.raises(ConfigError) as info:
            load_config(env=env, overrides=[override])
        assert override.split("=")[0] in str(info.value)
    settings = load_config(env=env, overrides=['server.allowed_hosts=["LLM.Example.com."]']).server
    assert settings.allowed_hosts == ("llm.example.com",)
    assert (settings.header_timeout_s, settings.body_timeout_s) == (10.0, 30.0)
    from_env = load_config(env={**env, "LLMOS_ALLOWED_HOSTS": "llmos.ai.svc, *.corp.example"})
    assert from_env.server.allowed_hosts == ("llmos.ai.svc", "*.corp.example")


# --------------------------------------------------------------------------
# The OpenAPI schema and 405
# --------------------------------------------------------------------------


def _operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def test_the_schema_declares_errors_security_streams_and_name_patterns(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon()
    schema = d.client.get("/openapi.json").json()
    assert schema["openapi"].startswith("3.1")
    components = schema["components"]
    error = components["schemas"]["Error"]
    assert error["required"] == ["error"]
    assert error["properties"]["error"]["required"] == ["message", "type", "param", "code"]
    # validation errors are answered 400, so FastAPI's 422 and its schema are gone
    assert "HTTPValidationError" not in components["schemas"]
    assert '"422"' not in json.dumps(schema)
    assert components["securitySchemes"]["bearer"] == {
        "type": "http",
        "scheme": "bearer",
        "description": components["securitySchemes"]["bearer"]["description"],
    }
    assert "security" not in schema  # no keys set on this daemon

    for method, path, operation in _operations(schema):
        responses = operation["responses"]
        if path in ("/healthz", "/readyz"):
            continue
        for status in ERRORS:
            ref = responses[status]["$ref"]
            described = components["responses"][ref.rsplit("/", 1)[1]]
            assert described["content"]["application/json"]["schema"] == {
                "$ref": "#/components/schemas/Error"
            }, (method, path, status)
        if method in ("post", "put", "patch", "delete"):
            assert "403" in responses, (method, path)
    assert "503" in schema["paths"]["/readyz"]["get"]["responses"]

    for method, path in (
        ("post", "/v1/chat/completions"),
        ("post", "/v1/completions"),
        ("get", "/api/tuning/jobs/{job_id}/events"),
    ):
        content = schema["paths"][path][method]["responses"]["200"]["content"]
        assert "text/event-stream" in content, path
    events = schema["paths"]["/api/tuning/jobs/{job_id}/events"]["get"]["responses"]["200"]
    assert list(events["content"]) == ["text/event-stream"]

    params = {
        (path, p["name"]): p["schema"]
        for _, path, operation in _operations(schema)
        for p in operation.get("parameters", ())
        if p["in"] == "path"
    }
    name = params[("/api/models/{name}/versions", "name")]
    assert name["pattern"] == NAME_PATTERN.pattern
    ref = re.compile(params[("/api/models/{ref}", "ref")]["pattern"])
    for good in ("gpt2", "vendor/model-1.5", "m@3", "m@prod"):
        assert ref.match(good), good
    for bad in ("Upper", "/lead", "m@", "m@Prod", "a/b/c"):
        assert not ref.match(bad), bad
    assert re.compile(params[("/api/models/{name}/aliases/{alias}", "alias")]["pattern"]).match(
        "prod"
    )

    # what the daemon really sends matches the schema: a validation error is a 400 Error
    invalid = d.client.post("/api/models", json={})
    assert invalid.status_code == 400
    _error(invalid)


def test_with_keys_every_route_but_the_probes_requires_the_bearer(
    daemon: Callable[..., Daemon],
) -> None:
    d = daemon('server.api_keys=["k-123"]')
    schema = d.client.get("/openapi.json", headers={"Authorization": "Bearer k-123"}).json()
    assert schema["security"] == [{"bearer": []}]
    assert schema["paths"]["/healthz"]["get"]["security"] == []
    assert schema["paths"]["/readyz"]["get"]["security"] == []
    assert "security" not in schema["paths"]["/api/models"]["get"]


def test_the_schema_is_valid_openapi(daemon: Callable[..., Daemon]) -> None:
    """Against the OpenAPI 3.1 meta-schema: openapi-spec-validator's where it
    is installed, else the one schemathesis (the fuzz suite's) checks with."""
    raw = daemon().client.get("/openapi.json").json()
    try:
        from openapi_spec_validator import validate
    except ImportError:
        schemathesis = pytest.importorskip("schemathesis")
        schemathesis.openapi.from_dict(raw).validate()
    else:
        validate(raw)


#: a value for each path parameter of the kernel's routes
_PATH_VALUES = {
    "name": "m",
    "ref": "m",
    "alias": "prod",
    "tag": "t",
    "job_id": "0123456789ab",
    "model_id": "m",
}
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS")


def test_every_405_names_exactly_the_methods_the_path_takes(
    daemon: Callable[..., Daemon],
) -> None:
    """Starlette's Allow names the methods of the first route whose path
    matched; here other routes on the same path (a plugin's too) count."""
    d = daemon()
    schema = d.client.get("/openapi.json").json()
    paths = {re.sub(r"\{(\w+)\}", lambda m: _PATH_VALUES[m.group(1)], p) for p in schema["paths"]}
    paths |= {"/", "/dashboard/app.js", "/t/thing", "/api/groups", "/no/such/route"}
    checked = 0
    for path in sorted(paths):
        answers = {method: d.client.request(method, path) for method in _METHODS}
        takes = {method for method, answer in answers.items() if answer.status_code != 405}
        for method, answer in answers.items():
            if answer.status_code == 405:
                allow = {m.strip() for m in answer.headers["allow"].split(",") if m.strip()}
                assert allow == takes, (method, path, allow, takes)
                if method != "HEAD":  # no body to a HEAD
                    assert _error(answer)["code"] == "method_not_allowed"
                checked += 1
    assert checked > 100
    allow = d.client.post("/api/groups").headers["allow"]
    assert allow == "GET, PUT"  # the kernel's GET and the plugin's PUT
    assert d.client.put("/api/models").headers["allow"] == "GET, POST"
