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

import structlog
import uvicorn

from llmos.errors import ConfigError, LlmosError
from llmos.runtime.kernel import Kernel
from llmos.server.app import DaemonState, create_app

log = structlog.get_logger("llmos.server")

__all__ = ["DaemonServer", "check_bind", "is_loopback", "serve"]

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


class DaemonServer(uvicorn.Server):
    """uvicorn's server with llmos's shutdown: drain first, then exit.

    uvicorn exits on the first signal and closes its socket at once; here the
    first signal only starts the drain (see the module docstring) and
    :meth:`on_tick` ends the main loop when the drain is over. It also ends
    it when the kernel failed to start.
    """

    def __init__(
        self, config: uvicorn.Config, daemon: DaemonState, *, drain_timeout: float
    ) -> None:
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
        from llmos.logs import configure_logging

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
