"""The HTTP side: one pooled client per model, a guard on every connection,
and the upstream's errors as llmos errors.

**The connection guard.** The kernel checks a card's source (scheme,
credentials, private and cloud-metadata addresses) when the model is loaded,
but a pooled client opens connections for as long as the model stays loaded,
and a host name can resolve elsewhere in between (DNS rebinding). So every
new connection resolves the host itself and checks each address with the
registry's own rules before connecting to it: a cloud metadata address is
always refused, and a host that resolved only to public addresses when the
model was loaded may not turn into a private one. The client never follows
redirects and ignores proxy and ``.netrc`` settings from the environment,
so the only place a request goes is the base URL the registry holds.
"""

from __future__ import annotations

import ipaddress
import json
import socket
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import httpcore
import httpx

from llmos.errors import (
    AuthenticationError,
    LlmosError,
    NotFoundError,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
    UnsafeSourceError,
    UsageError,
)
from llmos.registry.sources import SourcePolicy, check_source
from llmos_openai.settings import Secret, Settings

__all__ = ["GuardedBackend", "build_client", "from_status", "from_transport_error"]

#: a resolver with ``socket.getaddrinfo``'s signature (tests inject one)
Resolver = Callable[..., Sequence[tuple[Any, ...]]]

_PUBLIC_ONLY = SourcePolicy((), allow_http=True)
_ANY_BUT_METADATA = SourcePolicy((), allow_http=True, allow_private_urls=True)
_MAX_DETAIL = 300


def _literal(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]").split("%", 1)[0]))
    except ValueError:
        return None


def _refusal(address: str, private_ok: bool) -> str | None:
    """Why the registry's rules refuse ``address``, or ``None``."""
    url = f"http://[{address}]/" if ":" in address else f"http://{address}/"
    try:
        check_source(url, _ANY_BUT_METADATA if private_ok else _PUBLIC_ONLY)
    except UnsafeSourceError as exc:
        return exc.message
    return None


def _resolve(resolve: Resolver, host: str, port: int) -> list[str]:
    literal = _literal(host)
    if literal is not None:
        return [literal]
    out: list[str] = []
    for info in resolve(host, port, type=socket.SOCK_STREAM):
        address = str(info[4][0]).split("%", 1)[0]
        if address not in out:
            out.append(address)
    return out


class GuardedBackend(httpcore.SyncBackend):
    """httpcore's network backend, checking every address before connecting.

    ``private_ok`` says whether the model's host may resolve to loopback,
    private or link-local addresses: true when it did so when the model was
    loaded (the kernel's policy allowed it) or is such an address itself.
    """

    def __init__(self, host: str, private_ok: bool, resolve: Resolver | None = None) -> None:
        self.host = host
        self.private_ok = private_ok
        self._resolve = resolve
        self._lock = threading.Lock()
        #: connections opened so far (the pool reuses them; tests and
        #: benchmarks read this)
        self.opened = 0

    def connect_tcp(
        self,
        host: str,
        port: int,
        timeout: float | None = None,
        local_address: str | None = None,
        socket_options: Iterable[Any] | None = None,
    ) -> httpcore.NetworkStream:
        resolve = self._resolve or socket.getaddrinfo
        try:
            addresses = _resolve(resolve, host, port)
        except (OSError, UnicodeError) as exc:
            raise httpcore.ConnectError(f"cannot resolve {host}: {exc}") from None
        allowed, refused = [], ""
        for address in addresses:
            why = _refusal(address, self.private_ok)
            if why is None:
                allowed.append(address)
            else:
                refused = why
        if not allowed:
            raise UnsafeSourceError(
                f"refused to connect to {host}: it now resolves to what the registry's source"
                f" rules refuse ({refused}); the model's host changed since it was loaded"
                if addresses
                else f"cannot resolve {host}: no addresses"
            )
        error: Exception | None = None
        for address in allowed:
            try:
                stream = super().connect_tcp(address, port, timeout, local_address, socket_options)
            except httpcore.ConnectError as exc:
                error = exc
                continue
            with self._lock:
                self.opened += 1
            return stream
        assert error is not None
        raise error


def guard_for(host: str, resolve: Resolver | None = None) -> GuardedBackend:
    """The guard for a model whose base URL has ``host``: resolves it now to
    learn what kind of address it is (a metadata address is refused here)."""
    literal = _literal(host)
    if literal is not None or host == "localhost" or host.endswith(".localhost"):
        # The kernel checked the literal (or treats the name as loopback).
        return GuardedBackend(host, private_ok=True, resolve=resolve)
    try:
        addresses = _resolve(resolve or socket.getaddrinfo, host, 443)
    except (OSError, UnicodeError) as exc:
        raise Unavailable(f"cannot resolve the upstream host {host}: {exc}") from None
    private_ok = False
    for address in addresses:
        why = _refusal(address, private_ok=True)
        if why is not None:
            raise UnsafeSourceError(f"upstream host {host} resolves to {address}: {why}")
        private_ok |= _refusal(address, private_ok=False) is not None
    return GuardedBackend(host, private_ok=private_ok, resolve=resolve)


def build_client(settings: Settings, backend: GuardedBackend, user_agent: str) -> httpx.Client:
    """A keep-alive client for one model: its base URL, key, limits and timeouts."""
    limits = httpx.Limits(
        max_connections=settings.max_connections,
        max_keepalive_connections=settings.max_connections,
        keepalive_expiry=60.0,
    )
    transport = httpx.HTTPTransport(limits=limits, retries=0)
    pool = transport._pool
    if not isinstance(pool, httpcore.ConnectionPool):  # pragma: no cover - no proxy is set
        raise RuntimeError("unexpected httpx transport: no connection pool")
    pool._network_backend = backend
    headers = {
        "User-Agent": user_agent,
        "Accept": "application/json",
        "Content-Type": "application/json",
        **settings.headers,
    }
    if settings.key is not None:
        headers["Authorization"] = f"Bearer {settings.key.reveal()}"
    return httpx.Client(
        base_url=settings.base_url + "/",
        headers=headers,
        timeout=httpx.Timeout(
            settings.timeout_s, connect=settings.connect_timeout_s, pool=settings.timeout_s
        ),
        transport=transport,
        follow_redirects=False,
        trust_env=False,  # no proxy, no .netrc: requests go to the base URL only
    )


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def detail(body: bytes | str, key: Secret | None) -> str:
    """The upstream's error message from any of the shapes servers use
    (OpenAI's ``{"error": {"message"}}``, vLLM's ``{"message"}``, Ollama's
    ``{"error": "..."}``, FastAPI's ``{"detail"}``), trimmed, key removed."""
    text = body.decode("utf-8", "replace") if isinstance(body, bytes) else body
    message: Any = text
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, Mapping):
        error = data.get("error")
        if isinstance(error, Mapping):
            message = error.get("message") or error
        elif error:
            message = error
        elif "message" in data:
            message = data["message"]
        elif "detail" in data:
            message = data["detail"]
    if not isinstance(message, str):
        message = json.dumps(message, separators=(",", ":"), default=str)
    message = " ".join(message.split())
    if key is not None:
        message = key.redact(message)
    if len(message) > _MAX_DETAIL:
        message = message[:_MAX_DETAIL] + "..."
    return message or "(no message)"


def retry_after(headers: Mapping[str, str]) -> float | None:
    value = headers.get("retry-after")
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None  # an HTTP date: rare from these servers


def from_status(
    status: int,
    body: bytes | str,
    headers: Mapping[str, str],
    settings: Settings,
    path: str,
) -> LlmosError:
    """The llmos error for an upstream answer with HTTP ``status``."""
    host, model = settings.netloc, settings.upstream_model
    said = detail(body, settings.key)
    upstream = f"upstream {host} ({model!r})"
    if status in (400, 422):
        return UsageError(f"{upstream} refused the request: {said}")
    if status in (401, 403):
        return AuthenticationError(
            f"upstream {host} refused the API key from {settings.key_source} ({status}): {said}"
            if settings.key is not None
            else f"upstream {host} wants an API key ({status}): {said}; give the card"
            " api_key_env or api_key_file"
        )
    if status == 404:
        return NotFoundError(
            f"upstream {host} has no model {model!r} or no route /{path} (404): {said}; check"
            " the card's options.model and that its source is the API's base URL (…/v1)"
        )
    if status == 408:
        return RequestTimeout(f"{upstream} timed out (408): {said}")
    if status == 413:
        return PayloadTooLarge(f"{upstream}: request too large (413): {said}")
    if status == 429:
        wait = retry_after(headers)
        return Overloaded(
            f"{upstream} is rate-limiting or overloaded (429): {said}"
            + (f"; it asks to retry after {wait:g} s" if wait is not None else ""),
            retry_after=wait,
        )
    if 300 <= status < 400:
        return Unavailable(
            f"{upstream} answered a redirect ({status}) to {headers.get('location', '?')};"
            " redirects are not followed: register the final base URL"
        )
    if status >= 500:
        return Unavailable(f"{upstream} failed ({status}): {said}")
    return UsageError(f"{upstream} refused the request ({status}): {said}")


def from_transport_error(exc: Exception, settings: Settings) -> LlmosError:
    """The llmos error for a failure below HTTP (connect, timeout, cut connection)."""
    host = settings.netloc
    if isinstance(exc, httpx.ConnectTimeout):
        return Unavailable(
            f"cannot connect to upstream {host}: no answer within"
            f" {settings.connect_timeout_s:g} s (connect_timeout_s)"
        )
    if isinstance(exc, httpx.TimeoutException):
        return RequestTimeout(
            f"upstream {host} did not answer within {settings.timeout_s:g} s (timeout_s)"
        )
    if isinstance(exc, httpx.ConnectError):
        return Unavailable(f"cannot connect to upstream {host}: {_reason(exc)}")
    if isinstance(exc, httpx.TransportError):
        return Unavailable(f"upstream {host} broke the connection: {_reason(exc)}")
    return Unavailable(f"upstream {host}: {type(exc).__name__}")


def _reason(exc: Exception) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text[:_MAX_DETAIL]
