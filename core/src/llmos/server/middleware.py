"""The daemon's ASGI middleware and its one JSON error shape.

Every middleware here is plain ASGI (a class with ``__call__(scope, receive,
send)``), not Starlette's ``BaseHTTPMiddleware``: that one buffers responses
through a task group, which breaks streaming (server-sent events for
``/v1/chat/completions``) and cancellation. Outermost first:

1. :class:`RequestContextMiddleware` — request id (``X-Request-ID`` on every
   response), the in-flight count the graceful drain waits on, the request
   log line, and the last-resort 500 for exceptions nothing else handled;
2. :class:`AccessMiddleware` — API keys (401) and "not taking work" (503
   while starting, draining or after a failed start);
3. :class:`BodyLimitMiddleware` — the request body cap (413).

Errors, wherever they are made, have one shape, OpenAI's::

    {"error": {"message": str, "type": str, "param": str | null, "code": int}}

with ``code`` the HTTP status.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import re
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any

import structlog
from starlette.types import ASGIApp, Message, Receive, Scope, Send

if TYPE_CHECKING:
    from llmos.server.app import DaemonState

log = structlog.get_logger("llmos.server")

__all__ = [
    "PROBE_PATHS",
    "RETRY_AFTER_SECONDS",
    "AccessMiddleware",
    "BodyLimitMiddleware",
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


def error_body(status: int, type_: str, message: str, param: str | None = None) -> dict[str, Any]:
    """The JSON body of every error response the daemon sends."""
    return {"error": {"message": message, "type": type_, "param": param, "code": status}}


def error_headers(status: int) -> dict[str, str]:
    """Headers an error status always carries."""
    if status == 401:
        return {"WWW-Authenticate": "Bearer"}
    if status == 503:
        return {"Retry-After": str(RETRY_AFTER_SECONDS)}
    if status == 429:
        # a model's queue is full: it drains within a batch or two
        return {"Retry-After": "1"}
    if status == 413:
        # The rest of an oversized body is never read, so the connection
        # cannot carry another request.
        return {"Connection": "close"}
    return {}


async def send_error(
    send: Send,
    status: int,
    type_: str,
    message: str,
    *,
    param: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
) -> None:
    """Send a complete JSON error response from ASGI middleware."""
    body = json.dumps(error_body(status, type_, message, param), separators=(",", ":")).encode()
    raw = [
        (b"content-type", b"application/json"),
        (b"content-length", str(len(body)).encode()),
    ]
    for name, value in (*error_headers(status).items(), *headers):
        raw.append((name.lower().encode("latin-1"), value.encode("latin-1")))
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})


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

        async def answer_if_unstarted(status_: int, type_: str, message: str) -> None:
            # Once a response has started (a stream that broke half-way)
            # nothing more can be said; uvicorn closes the connection because
            # the response never completed.
            if scope["type"] == "http" and status is None:
                extra = [("Connection", "close")] if status_ == 503 else []
                await send_error(send_with_id, status_, type_, message, headers=extra)

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
                await answer_if_unstarted(
                    500, "internal_error", f"internal error (request id {request_id})"
                )
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
                await self._refuse(scope, receive, send, 401, "authentication_error", problem)
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
        self, scope: Scope, receive: Receive, send: Send, status: int, type_: str, message: str
    ) -> None:
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake
            # with 403; there is no body to carry the error shape.
            await receive()  # websocket.connect
            await send({"type": "websocket.close", "code": 1008, "reason": message[:120]})
            return
        # While draining, tell keep-alive clients to reconnect (elsewhere).
        extra = [("Connection", "close")] if status == 503 else []
        await send_error(send, status, type_, message, headers=extra)


# --------------------------------------------------------------------------
# Body cap
# --------------------------------------------------------------------------


#: picks the body cap of one request: ``(bytes, name of the setting)``, or
#: ``None`` for the global ``server.max_body_bytes``
LimitChooser = Callable[[Scope], tuple[int, str] | None]


class BodyLimitMiddleware:
    """Refuse request bodies over ``max_body_bytes`` with 413.

    A ``Content-Length`` over the cap is refused before a byte of the body is
    read. A body without one (chunked) is counted as the app reads it; at the
    first chunk over the cap the app is told the client went away, whatever
    it answers to that is dropped, and the client gets the 413 instead — so
    the app never sees more than the cap.

    ``limit_for`` gives some requests another cap (a model push takes
    ``registry.max_push_bytes``); the rest keep ``max_body_bytes``.
    """

    def __init__(
        self, app: ASGIApp, *, max_body_bytes: int, limit_for: LimitChooser | None = None
    ) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.limit_for = limit_for

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
                await send_error(send, 400, "invalid_request_error", "invalid Content-Length")
                return
            if size > limit:
                await send_error(
                    send, 413, "payload_too_large", self._message(limit, setting, size)
                )
                return

        received = 0
        too_large = False
        response_started = False

        async def counted_receive() -> Message:
            nonlocal received, too_large
            if too_large:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    too_large = True
                    return {"type": "http.disconnect"}
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal response_started
            if too_large and not response_started:
                return  # the app's reaction to the "disconnect"; the 413 replaces it
            if message["type"] == "http.response.start":
                response_started = True
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            # Reading a cut-off body raises in the app (ClientDisconnect or a
            # wrapped form of it); that is ours to answer, anything else is not.
            if not too_large:
                raise
        if too_large:
            if response_started:
                log.warning("http.body_too_large_after_response", limit=limit, setting=setting)
            else:
                await send_error(send, 413, "payload_too_large", self._message(limit, setting))
