"""The daemon's ASGI middleware and its one JSON error shape.

Every middleware here is plain ASGI (a class with ``__call__(scope, receive,
send)``), not Starlette's ``BaseHTTPMiddleware``: that one buffers responses
through a task group, which breaks streaming (server-sent events for
``/v1/chat/completions``) and cancellation. Outermost first:

1. :class:`RequestContextMiddleware` — request id (``X-Request-ID`` on every
   response), the in-flight count the graceful drain waits on, the request
   log line, and the last-resort 500 for exceptions nothing else handled;
2. :class:`HostCheckMiddleware` — DNS rebinding (a ``Host`` the daemon does
   not answer to: 400) and cross-origin browser writes (403), before the key
   check so that a browser tricked into calling the daemon learns nothing;
3. :class:`AccessMiddleware` — API keys (401) and "not taking work" (503
   while starting, draining or after a failed start);
4. :class:`BodyLimitMiddleware` — the request body's size cap (413) and its
   pace (408 when it stalls).

The header timeout (a connection that never finishes its request headers) is
not here: no ASGI app sees a request before its headers are complete, so it
lives in the HTTP protocol (:mod:`llmos.server.run`).

Errors, wherever they are made, have one shape, OpenAI's::

    {"error": {"message": str, "type": str, "param": str | null, "code": str | null}}

with ``type`` the class of error, fixed by the HTTP status
(:func:`llmos.errors.error_type`), and ``code`` a stable string per kind of
error (``model_not_found``, ``payload_too_large`` …) or null.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from llmos.errors import error_type

if TYPE_CHECKING:
    from llmos.server.app import DaemonState

log = structlog.get_logger("llmos.server")

__all__ = [
    "PROBE_PATHS",
    "RETRY_AFTER_SECONDS",
    "AccessMiddleware",
    "BodyLimitMiddleware",
    "HostCheckMiddleware",
    "LimitChooser",
    "RequestContextMiddleware",
    "error_body",
    "error_headers",
    "send_error",
]

#: liveness and readiness probes: never behind API keys, never refused while
#: starting or draining (a probe that needs a key or gets 503 is useless)
PROBE_PATHS: frozenset[str] = frozenset({"/healthz", "/readyz"})

#: what ``Retry-After`` tells a client refused while starting or draining
RETRY_AFTER_SECONDS = 5

REQUEST_ID_HEADER = "X-Request-ID"
# A client's id is echoed into our headers and logs, so only a short, plain one
# is taken as is; anything else is replaced rather than sanitised.
_CLIENT_REQUEST_ID = re.compile(r"[A-Za-z0-9._-]{1,64}")


# --------------------------------------------------------------------------
# The error shape
# --------------------------------------------------------------------------


def error_body(
    status: int, code: str | None, message: str, param: str | None = None
) -> dict[str, Any]:
    """The JSON body of every error response the daemon sends: OpenAI's, with
    ``type`` from the status and ``code`` the kind of error (or ``None``)."""
    return {"error": {"message": message, "type": error_type(status), "param": param, "code": code}}


def error_headers(status: int) -> dict[str, str]:
    """Headers an error status always carries."""
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if status == 503:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if status == 429:
        # a model's queue is full: it drains within a batch or two
        return {"Retry-After": "1"}
    if status in (408, 413):
        # The rest of the body (oversized, or stalled) is never read, so the
        # connection cannot carry another request.
        return {"Connection": "close"}
    return {}


async def send_error(
    send: Send,
    status: int,
    code: str | None,
    message: str,
    *,
    param: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """Send a complete JSON error response from ASGI middleware."""
    body = json.dumps(error_body(status, code, message, param), separators=(",", ":")).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    for name, value in (*error_headers(status).items(), *headers):
        raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


async def refuse(
    scope: Scope,
    receive: Receive,
    send: Send,
    status: int,
    code: str,
    message: str,
    *,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """Refuse a request before the app sees it: the error shape over HTTP; a
    websocket is closed before it is accepted, so the server answers its
    handshake with 403 (there is no body to carry the error shape)."""
    if scope["type"] == "websocket":
        await receive()  # websocket.connect
        await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
        return
    await send_error(send, status, code, message, headers=headers)


def _header(scope: Scope, name: bytes) -> bytes | None:
    """The first value of request header ``name`` (lower-case), if any."""
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


# --------------------------------------------------------------------------
# Request context: id, in-flight count, log line, last-resort 500
# --------------------------------------------------------------------------


def request_id_for(scope: Scope) -> str:
    """The client's ``X-Request-ID`` when it is short and plain, else a new one."""
    raw = _header(scope, b"x-request-id")
    if raw is not None:
        text = raw.decode("latin-1")
        if _CLIENT_REQUEST_ID.fullmatch(text):
            return text
    return uuid.uuid4().hex


class RequestContextMiddleware:
    """Give each request an id, count it while in flight, log it, and turn an
    exception no handler took into a 500 that names the request id.

    The id is in ``request.state.request_id`` for handlers and bound to
    structlog's context for every log line the request causes. A request is in
    flight until the app returns, which for a streaming response is after its
    last chunk: the drain waits for exactly that.
    """

    def __init__(self, app: ASGIApp, *, state: DaemonState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        request_id = request_id_for(scope)
        # uvicorn hands each request its own copy of the lifespan state, so
        # this is per request; Starlette exposes it as ``request.state``.
        scope.setdefault("state", {})["request_id"] = request_id
        header = (b"x-request-id", request_id.encode())
        status: int | None = None

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                headers = [h for h in message.get("headers", ()) if h[0].lower() != header[0]]
                message = {**message, "headers": [*headers, header]}
            await send(message)

        async def answer_if_unstarted(status_: int, code: str | None, message: str) -> None:
            # Once a response has started (a stream that broke half-way)
            # nothing more can be said; uvicorn closes the connection because
            # the response never completed.
            if scope["type"] == "http" and status is None:
                extra = [("Connection", "close")] if status_ == 503 else []
                await send_error(send_with_id, status_, code, message, headers=extra)

        method = scope.get("method", "WEBSOCKET")
        path = scope.get("path", "")
        start = time.perf_counter()
        self.state.inflight += 1
        with structlog.contextvars.bound_contextvars(request_id=request_id):
            try:
                await self.app(scope, receive, send_with_id)
            except asyncio.CancelledError:
                if not self.state.draining:
                    raise
                # The drain timed out and uvicorn is cancelling what is left.
                # Answer in the error shape instead of uvicorn's bare 500 and
                # let the task end: the cancel has done its job.
                log.warning("http.cut_by_shutdown", method=method, path=path)
                await answer_if_unstarted(
                    503, "unavailable", "llmos shut down before this request finished; retry it"
                )
            except Exception:
                log.exception("http.unhandled_error", method=method, path=path)
                await answer_if_unstarted(500, None, f"internal error (request id {request_id})")
            finally:
                self.state.inflight -= 1
                log.debug(
                    "http.request",
                    method=method,
                    path=path,
                    status=status,
                    duration_ms=round((time.perf_counter() - start) * 1000, 2),
                )


# --------------------------------------------------------------------------
# Host and Origin: DNS rebinding and cross-origin browser writes
# --------------------------------------------------------------------------

#: names that mean this machine without asking DNS, so they cannot be rebound
LOOPBACK_NAMES: frozenset[str] = frozenset({"localhost"})
#: methods that only read; any other method (and a websocket) is a write
SAFE_METHODS: frozenset[str] = frozenset({"GET", "HEAD", "OPTIONS"})
# a host name or IPv4 address, optionally with a port; an IPv6 address in brackets
_HOST_HEADER = re.compile(
    r"(?:\[([0-9A-Fa-f:.]+(?:%[A-Za-z0-9_.~-]+)?)\]|([A-Za-z0-9_.-]+))(?::[0-9]{1,5})?"
)


def host_name(value: str) -> str | None:
    """The host of a ``Host`` header or an origin's authority: lower-case,
    without port, brackets or a trailing dot; ``None`` when it is malformed."""
    match = _HOST_HEADER.fullmatch(value.strip())
    if match is None:
        return None
    name = (match.group(1) or match.group(2)).lower()
    return name[:-1] if name.endswith(".") else name


def _ip(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def _is_loopback(name: str) -> bool:
    if name in LOOPBACK_NAMES:
        return True
    address = _ip(name)
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address is not None and address.is_loopback


class HostCheckMiddleware:
    """Refuse DNS rebinding and cross-origin browser writes.

    **Host.** A web page at ``http://attacker.example:8470`` whose name the
    attacker re-points at 127.0.0.1 is, to the browser, its own origin: it may
    call the daemon and read the answers. Its requests carry ``Host:
    attacker.example``, so a daemon that answers only to names it knows is
    safe. Answered (any port — see below): IP addresses, ``localhost``, the
    address the daemon is bound to and ``server.allowed_hosts`` (``"*.x.y"``
    matches subdomains of ``x.y``; ``"*"`` turns the check off). Anything
    else gets 400. IP addresses are all answered because rebinding needs a
    name: a page at ``http://10.1.2.3`` is sent to 10.1.2.3, never here
    unless 10.1.2.3 is here — which is also why Kubernetes probes, which name
    the pod's IP, pass. The probes in :data:`PROBE_PATHS` are not checked at
    all: they hold no data, and a load balancer's health check may name the
    host in any way. Ports are not compared: rebinding is beaten by the name
    alone, and a port check would break every reverse proxy and SSH tunnel
    that reaches the daemon through another port (``ssh -L 9000:localhost:8470``
    makes the browser send ``Host: localhost:9000``).

    **Origin.** Browsers send any page's form posts cross-origin, so a page
    elsewhere could change the daemon's state through a user's browser
    (CSRF) even though it cannot read the answer. A write (any method but
    GET, HEAD, OPTIONS; a websocket handshake too) whose ``Origin`` is not
    the request's own host, a loopback name or address, the bound address or
    an ``allowed_hosts`` entry (``"*"`` excepted) gets 403, and so does an
    opaque ``Origin: null``. A write without ``Origin`` is refused only when
    the browser says ``Sec-Fetch-Site: cross-site``. Clients that are not
    browsers (curl, SDKs) send neither header and pass; the dashboard is
    served by the daemon itself, so its requests are same-origin.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: DaemonState,
        configured_host: str,
        allowed_hosts: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.state = state
        self.configured_host = configured_host.strip("[]").lower()
        entries = [entry.lower().rstrip(".") for entry in allowed_hosts]
        self.any_host = "*" in entries
        self._exact = frozenset(e for e in entries if not e.startswith("*"))
        self._suffixes = tuple(e[1:] for e in entries if e.startswith("*."))

    def _bound(self, name: str) -> bool:
        bound = (self.state.bound_host or "").strip("[]").lower()
        return name in (self.configured_host, bound)

    def _listed(self, name: str) -> bool:
        """``name`` is in ``server.allowed_hosts`` (``"*"`` aside)."""
        return name in self._exact or name.endswith(self._suffixes)

    def host_allowed(self, name: str) -> bool:
        """Whether the daemon answers requests naming ``name`` in ``Host``."""
        return (
            self.any_host
            or _ip(name) is not None
            or name in LOOPBACK_NAMES
            or self._bound(name)
            or self._listed(name)
        )

    def origin_allowed(self, origin: str, host: str | None) -> bool:
        """Whether a browser page at ``origin`` may write to the daemon
        reached as ``host`` (the request's own ``Host`` name)."""
        parts = urlsplit(origin.strip())
        if parts.scheme not in ("http", "https") or parts.username or parts.password:
            return False
        name = host_name(parts.netloc)
        if name is None:
            return False
        return name == host or _is_loopback(name) or self._bound(name) or self._listed(name)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in PROBE_PATHS:
            await self.app(scope, receive, send)
            return
        raw_host = _header(scope, b"host")
        host = None
        if raw_host is not None:
            shown = raw_host.decode("latin-1")
            host = host_name(shown)
            if host is None or not self.host_allowed(host):
                await self._refuse(
                    scope,
                    receive,
                    send,
                    400,
                    "invalid_host",
                    f"this daemon does not answer to Host {shown[:100]!r} (a guard against "
                    "DNS rebinding); if that name is yours, add it to server.allowed_hosts",
                )
                return
        if scope["type"] == "websocket" or scope.get("method", "GET") not in SAFE_METHODS:
            problem = self._write_problem(scope, host)
            if problem is not None:
                await self._refuse(scope, receive, send, 403, "cross_origin_write", problem)
                return
        await self.app(scope, receive, send)

    def _write_problem(self, scope: Scope, host: str | None) -> str | None:
        """Why a browser write is refused, or ``None`` when it is not."""
        origin = _header(scope, b"origin")
        if origin is not None:
            text = origin.decode("latin-1")
            if self.origin_allowed(text, host):
                return None
            return (
                f"cross-origin write refused: a page at {text[:100]!r} may not change this "
                "daemon; use the daemon's own pages, or add that host to server.allowed_hosts "
                "if you trust it"
            )
        site = _header(scope, b"sec-fetch-site")
        if site is not None and site.strip().lower() == b"cross-site":
            return (
                "cross-site write refused (Sec-Fetch-Site: cross-site): a page on another "
                "site may not change this daemon"
            )
        return None

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str
    ) -> None:
        log.info("http.refused_host", status=status, path=scope.get("path"), reason=message)
        await refuse(scope, receive, send, status, code, message)


# --------------------------------------------------------------------------
# Access: API keys, and no new work while starting or draining
# --------------------------------------------------------------------------


class AccessMiddleware:
    """Refuse requests without a valid API key (when keys are configured) and
    requests that arrive while the daemon takes no work.

    The probes in :data:`PROBE_PATHS` pass untouched, and so do ``open_paths``:
    pages that hold no data (the dashboard, whose own requests carry the key).
    The key check runs before the availability check so that an
    unauthenticated client learns nothing beyond what ``/readyz`` already says.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        state: DaemonState,
        api_keys: Sequence[str],
        open_paths: Iterable[str] = (),
    ) -> None:
        self.app = app
        self.state = state
        self._keys = tuple(key.encode() for key in api_keys)
        self._open = PROBE_PATHS | frozenset(open_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket") or scope["path"] in self._open:
            await self.app(scope, receive, send)
            return
        if self._keys:
            problem = self._key_problem(scope)
            if problem is not None:
                # OpenAI's code, for a missing key as for a wrong one
                await self._refuse(scope, receive, send, 401, "invalid_api_key", problem)
                return
        busy = self.state.unavailable_reason()
        if busy is not None:
            await self._refuse(scope, receive, send, 503, "unavailable", busy)
            return
        await self.app(scope, receive, send)

    def _key_problem(self, scope: Scope) -> str | None:
        """``None`` when the request carries a configured key, else what is wrong.

        The key itself never reaches a message or a log line.
        """
        raw = _header(scope, b"authorization")
        if raw is None:
            return "missing API key: send the header 'Authorization: Bearer <key>'"
        scheme, _, token = raw.partition(b" ")
        if scheme.lower() != b"bearer" or not token.strip():
            return "malformed Authorization header: expected 'Bearer <key>'"
        token = token.strip()
        # Compare against every key, without stopping at a match, so that the
        # time taken says nothing about which key (or how much of one) matched.
        matched = False
        for key in self._keys:
            matched |= hmac.compare_digest(token, key)
        return None if matched else "invalid API key"

    async def _refuse(
        self, scope: Scope, receive: Receive, send: Send, status: int, code: str, message: str
    ) -> None:
        # While draining, tell keep-alive clients to reconnect (elsewhere).
        extra = [("Connection", "close")] if status == 503 else []
        await refuse(scope, receive, send, status, code, message, headers=extra)


# --------------------------------------------------------------------------
# Body: size cap and pace
# --------------------------------------------------------------------------


#: picks the body cap of one request: ``(bytes, name of the setting)``, or
#: ``None`` for the global ``server.max_body_bytes``
LimitChooser = Callable[[Scope], tuple[int, str] | None]


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413, and bodies that
    stall for ``body_timeout`` seconds with 408.

    A ``Content-Length`` over the cap is refused before a byte of the body is
    read. A body without one (chunked) is counted as the app reads it; at the
    first chunk over the cap the app is told the client went away, whatever
    it answers to that is dropped, and the client gets the 413 instead — so
    the app never sees more than the cap.

    The pace is checked the same way: while the app waits for the next chunk
    of a body that has not ended, and has not started its answer, it waits at
    most ``body_timeout`` seconds; then it is told the client went away and
    the client gets 408 with ``Connection: close`` (the rest of the body is
    never read). A slow client that keeps sending is never cut, and neither is
    a handler that takes its time: only the wait for the client counts.

    ``limit_for`` gives some requests another cap (a model push takes
    ``registry.max_push_bytes``); the rest keep ``max_body_bytes``.
    """

    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        limit_for: LimitChooser | None = None,
        body_timeout: float | None = None,
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.limit_for = limit_for
        self.body_timeout = body_timeout

    @staticmethod
    def _message(limit: int, setting: str, size: int | None = None) -> str:
        what = "request body" if size is None else f"request body of {size} bytes"
        return f"{what} is larger than the limit of {limit} bytes ({setting})"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        chosen = self.limit_for(scope) if self.limit_for is not None else None
        limit, setting = chosen or (self.max_body_bytes, "server.max_body_bytes")
        declared = _header(scope, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                await send_error(send, 400, None, "invalid Content-Length")
                return
            if size > limit:
                await send_error(
                    send, 413, "payload_too_large", self._message(limit, setting, size)
                )
                return

        received = 0
        body_done = False
        response_started = False
        #: ``(status, code, message)`` that replaces the app's answer
        refusal: tuple[int, str, str] | None = None

        async def next_message() -> Message:
            if body_done or response_started or self.body_timeout is None:
                return await receive()
            async with asyncio.timeout(self.body_timeout):
                return await receive()

        async def guarded_receive() -> Message:
            nonlocal received, body_done, refusal
            if refusal is not None:
                return {"type": "http.disconnect"}
            try:
                message = await next_message()
            except TimeoutError:
                log.info("http.body_timeout", path=scope.get("path"), received=received)
                refusal = (
                    408,
                    "request_timeout",
                    f"the request body stalled: nothing arrived for {self.body_timeout:g} s "
                    "(server.body_timeout_s); send the body without long pauses",
                )
                return {"type": "http.disconnect"}
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                body_done = not message.get("more_body", False)
                if received > limit:
                    refusal = (413, "payload_too_large", self._message(limit, setting))
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if refusal is not None and not response_started:
                return  # the app's reaction to the "disconnect"; the refusal replaces it
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, guarded_send)
        except Exception:
            # Reading a cut-off body raises in the app (ClientDisconnect or a
            # wrapped form of it); that is ours to answer, anything else is not.
            if refusal is None:
                raise
        if refusal is not None:
            status, code, message = refusal
            if response_started:
                log.warning("http.body_refused_after_response", status=status, reason=message)
            else:
                await send_error(send, status, code, message)
