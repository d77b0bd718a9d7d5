"""Running the daemon: the bind check, uvicorn, signals and the graceful drain.

:func:`serve` is what ``llmos serve`` calls. The life of a daemon:

1. refuse a non-loopback address without API keys (:func:`check_bind`);
2. build the app; the lifespan starts the kernel in a thread and uvicorn
   binds at once, so ``/healthz`` answers while plugins start up;
3. the first SIGTERM or SIGINT starts the drain: ``/readyz`` and new
   requests answer 503, the socket stays open so clients see that, and
   requests in flight finish; when none is left, or after
   ``server.drain_timeout`` seconds, uvicorn closes the socket and the
   lifespan runs ``kernel.stop()``;
4. a second signal exits at once.

Connections are bounded in time (``[server]`` keys), so that slow or idle
clients cannot hold the daemon's sockets (slowloris): a connection must send
its request headers within ``header_timeout_s`` of opening or of the request's
first byte (:func:`with_header_timeout`; uvicorn has no such setting), a body
may stall at most ``body_timeout_s`` between chunks (408, in
:class:`~llmos.server.middleware.BodyLimitMiddleware`), and an idle
keep-alive connection is closed after ``keep_alive_timeout_s``.
"""

from __future__ import annotations

import asyncio
import functools
import ipaddress
import signal
import socket
import time
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import structlog
import uvicorn
from uvicorn.config import HTTP_PROTOCOLS
from uvicorn.importer import import_from_string

from llmos.config import ServerSettings
from llmos.errors import ConfigError, LlmosError
from llmos.logs import configure_logging
from llmos.runtime.kernel import Kernel
from llmos.server.app import DaemonState, create_app

log = structlog.get_logger("llmos.server")

__all__ = ["DaemonServer", "check_bind", "is_loopback", "serve", "with_header_timeout"]

#: how long uvicorn waits for connections after a drain ends by itself or
#: times out, before it cancels what is left
_CLOSE_GRACE_S = 0.5


def is_loopback(host: str) -> bool:
    """Whether ``host`` is a loopback address: 127.0.0.0/8, ``::1`` or ``localhost``.

    Any other name counts as reachable from elsewhere: what it resolves to can
    change, so only addresses are trusted.
    """
    text = host.strip().strip("[]").lower()
    if text == "localhost":
        return True
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback


def check_bind(host: str, api_keys: Sequence[str]) -> None:
    """Refuse to listen on a non-loopback ``host`` without API keys.

    Anyone who can reach such an address could use every model and plugin
    route, so keys are required there.

    :raises ConfigError: saying how to fix it.
    """
    if not is_loopback(host) and not any(api_keys):
        raise ConfigError(
            f"refusing to listen on {host!r} without API keys: anyone who can reach it "
            "could use the daemon; set server.api_keys or LLMOS_API_KEYS, "
            "or bind to 127.0.0.1",
            param="server.host",
        )


class _HeaderTimeout:
    """Mixin for uvicorn's HTTP/1.1 protocols (h11, httptools): close a
    connection whose request headers are not complete ``header_timeout``
    seconds after it opened, or after the first byte of a later request.

    uvicorn arms no timer on a new connection, and the keep-alive timer stops
    at the first byte of the next request, so without this a client that
    sends half a request line and then nothing holds its connection forever.
    The timer runs while the protocol waits for a request's headers; a new
    request cycle (``self.cycle``, which both protocols replace once the
    headers are parsed) or a websocket upgrade stops it. Nothing is answered:
    there is no request to answer.
    """

    header_timeout: float = 10.0
    _header_timer: asyncio.TimerHandle | None = None
    #: the request cycle that was current when the timer started
    _header_cycle: Any = None
    # the protocol's own attributes, for the type checker
    cycle: Any
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    client: tuple[str, int] | None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._start_header_timer()

    def data_received(self, data: bytes) -> None:
        if self._header_timer is None and (self.cycle is None or self.cycle.response_complete):
            self._start_header_timer()  # the first byte of a new request
        super().data_received(data)  # type: ignore[misc]
        self._stop_header_timer_if_parsed()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        self._stop_header_timer_if_parsed()  # a pipelined request may have started

    def handle_websocket_upgrade(self, *args: Any) -> None:
        self._stop_header_timer()
        super().handle_websocket_upgrade(*args)  # type: ignore[misc]

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_header_timer()
        super().connection_lost(exc)  # type: ignore[misc]

    def _start_header_timer(self) -> None:
        self._header_cycle = self.cycle
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_timed_out)

    def _stop_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _stop_header_timer_if_parsed(self) -> None:
        if self._header_timer is not None and self.cycle is not self._header_cycle:
            self._stop_header_timer()

    def _headers_timed_out(self) -> None:
        self._header_timer = None
        if self.cycle is self._header_cycle and not self.transport.is_closing():
            log.debug("http.header_timeout", client=self.client, seconds=self.header_timeout)
            self.transport.close()


#: what a protocol class needs for :class:`_HeaderTimeout` to work on it
_PROTOCOL_HOOKS = (
    "connection_made",
    "data_received",
    "connection_lost",
    "on_response_complete",
    "handle_websocket_upgrade",
)


def with_header_timeout(http: str | type[asyncio.Protocol], seconds: float) -> Any:
    """uvicorn's ``http`` setting (``"auto"``, ``"h11"``, ``"httptools"`` or a
    protocol class) with the header timeout of :class:`_HeaderTimeout` added.

    A protocol this cannot wrap (HTTP/2's, or an unknown class) is returned
    unchanged, with a warning: the daemon still runs, without the timeout.
    """
    base: Any = http
    if isinstance(http, str):
        if http not in ("auto", "h11", "httptools"):
            log.warning("server.header_timeout_unsupported", http=http)
            return http
        base = import_from_string(HTTP_PROTOCOLS[http])
    if not isinstance(base, type) or not all(hasattr(base, hook) for hook in _PROTOCOL_HOOKS):
        log.warning("server.header_timeout_unsupported", http=repr(http))
        return http
    base = getattr(base, "_unwrapped", base)  # already wrapped: wrap its base anew
    return type(
        f"HeaderTimeout{base.__name__}",
        (_HeaderTimeout, base),
        {"header_timeout": seconds, "_unwrapped": base},
    )


def apply_timeouts(config: uvicorn.Config, settings: ServerSettings) -> None:
    """Put ``[server]``'s connection timeouts on a uvicorn config not yet loaded."""
    config.timeout_keep_alive = settings.keep_alive_timeout_s  # type: ignore[assignment]
    config.http = with_header_timeout(config.http, settings.header_timeout_s)


class DaemonServer(uvicorn.Server):
    """uvicorn's server with llmos's shutdown (drain first, then exit) and
    connection timeouts.

    uvicorn exits on the first signal and closes its socket at once; here the
    first signal only starts the drain (see the module docstring) and
    :meth:`on_tick` ends the main loop when the drain is over. It also ends
    it when the kernel failed to start.

    Whoever made ``config``, the daemon's ``[server]`` timeouts are put on it
    (:func:`apply_timeouts`), and the address it binds is told to the Host
    check (``daemon.bound_host``).
    """

    def __init__(
        self, config: uvicorn.Config, daemon: DaemonState, *, drain_timeout: float
    ) -> None:
        apply_timeouts(config, daemon.kernel.config.server)
        daemon.bound_host = config.host
        super().__init__(config)
        self.daemon = daemon
        self.drain_timeout = drain_timeout
        self.drain_deadline: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def port(self) -> int | None:
        """The port bound (useful with port 0), once started."""
        servers = getattr(self, "servers", None)
        if not servers or not servers[0].sockets:
            return None
        return int(servers[0].sockets[0].getsockname()[1])

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        # Kept for the signal handler, which hands its work to the loop.
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets=sockets)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        if self.started and self.port is not None:
            host = self.config.host
            shown = f"[{host}]" if ":" in host else host
            log.info(f"llmos listening on http://{shown}:{self.port}", host=host, port=self.port)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        """The SIGTERM/SIGINT handler: the first starts the drain, the second
        forces the exit.

        Deliberately not uvicorn's: that one records the signal and raises it
        again after serving, which would kill the process instead of letting
        :func:`serve` return its exit code. A signal handler may interrupt
        this thread while it holds a lock (a log write, the kernel's state),
        and those locks are not re-entrant, so the handler only sets flags and
        leaves logging and the kernel to the event loop.
        """
        name = signal.Signals(sig).name
        if self.daemon.draining:
            self.daemon.forced = True
            self.should_exit = True
            self.force_exit = True
            self._soon(log.warning, "server.forced_exit", signal=name)
            return
        self._mark_draining()
        self._soon(self._drain_started, name)

    def begin_drain(self) -> None:
        """Start the drain from code on the event loop's thread (what the first
        signal does): no new work, exit once what is in flight is done."""
        if not self.daemon.draining:
            self._mark_draining()
            self._drain_started(None)

    def _mark_draining(self) -> None:
        # The flag the middleware reads is set at once, so no request that
        # arrives after the signal is taken.
        self.daemon.draining = True
        self.drain_deadline = time.monotonic() + self.drain_timeout

    def _drain_started(self, signal_name: str | None) -> None:
        log.info("server.draining", signal=signal_name, inflight=self.daemon.inflight)
        self.daemon.kernel.begin_drain()

    def _soon(self, fn: Callable[..., object], *args: object, **kwargs: object) -> None:
        """Run ``fn`` on the event loop's next turn (safe from a signal handler)."""
        call = functools.partial(fn, *args, **kwargs)
        loop = self._loop
        if loop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(call)
        else:  # no loop any more: nothing else can be holding the locks
            call()

    async def on_tick(self, counter: int) -> bool:
        if await super().on_tick(counter):
            return True
        if self.daemon.start_error is not None:
            return True
        if not self.daemon.draining or self.drain_deadline is None:
            return False
        now = time.monotonic()
        if self.daemon.inflight == 0:
            log.info("server.drained")
            self.config.timeout_graceful_shutdown = max(  # type: ignore[assignment]
                _CLOSE_GRACE_S, self.drain_deadline - now
            )
            return True
        if now >= self.drain_deadline:
            log.warning(
                "server.drain_timeout",
                inflight=self.daemon.inflight,
                drain_timeout=self.drain_timeout,
            )
            self.config.timeout_graceful_shutdown = _CLOSE_GRACE_S  # type: ignore[assignment]
            return True
        return False


def serve(kernel: Kernel, host: str | None = None, port: int | None = None) -> int:
    """Run the daemon for ``kernel`` until it is stopped; return the exit code.

    ``host`` and ``port`` default to ``server.host`` and ``server.port``
    (127.0.0.1:8470). Returns 0 after a graceful stop; the kernel's start
    error's ``exit_code`` when it failed to start; 1 when the address could
    not be bound or a second signal forced the exit.

    :raises ConfigError: a non-loopback ``host`` without API keys.
    :raises PluginError: in strict mode, a plugin's routes could not be mounted.
    """
    settings = kernel.config.server
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    check_bind(host, settings.api_keys)
    if not structlog.is_configured():
        configure_logging(settings.log_level)

    app = create_app(kernel)
    daemon: DaemonState = app.state.daemon
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        lifespan="on",
        # llmos logs through structlog: no uvicorn logging set-up, and no
        # access log (the middleware logs each request at debug).
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=settings.drain_timeout,  # type: ignore[arg-type]
    )
    server = DaemonServer(config, daemon, drain_timeout=settings.drain_timeout)
    try:
        server.run()
    except SystemExit:
        # uvicorn exits this way when it cannot bind; it logged the OSError.
        log.error("server.bind_failed", host=host, port=port)
        return 1
    if daemon.start_error is not None:
        error = daemon.start_error
        return error.exit_code if isinstance(error, LlmosError) else 1
    if daemon.forced:
        return 1
    log.info("server.stopped")
    return 0
