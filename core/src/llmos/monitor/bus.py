"""The monitor event bus.

``emit`` only puts the event on a bounded queue and returns; one dispatcher
thread hands each event to every sink, each inside its own try/except. So a
slow sink delays other sinks at worst, never a request, and a full queue drops
events (counted) instead of blocking the caller. ``observers`` are the
kernel's own consumers (the metric windows): they get each event first, under
the same rules.
"""

from __future__ import annotations

import contextlib
import queue
import threading
from collections import Counter
from collections.abc import Callable, Mapping

import structlog

from llmos.types import BusHealth, MonitorEvent, MonitorSink

log = structlog.get_logger("llmos.monitor")

_STOP = object()


class EventBus:
    """Fans :class:`MonitorEvent` out to named sinks off the caller's thread."""

    def __init__(self, sinks: Mapping[str, MonitorSink] | None = None, *, capacity: int = 10_000):
        self.sinks: dict[str, MonitorSink] = dict(sinks or {})
        #: the kernel's own consumers, called before the sinks
        self.observers: list[Callable[[MonitorEvent], None]] = []
        self._queue: queue.Queue[object] = queue.Queue(maxsize=capacity)
        self.dropped = 0
        self.sink_errors: Counter[str] = Counter()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def health(self) -> BusHealth:
        """Events dropped, each sink's errors (a copy taken in one step: the
        bus may be counting) and the sinks."""
        return BusHealth(
            dropped=self.dropped, sink_errors=dict(self.sink_errors), sinks=tuple(self.sinks)
        )

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="llmos-monitor", daemon=True)
                self._thread.start()

    def emit(self, event: MonitorEvent) -> None:
        """Queue ``event`` for every sink; never blocks, never raises."""
        try:
            self._queue.put_nowait(event)
        except queue.Full:
            self.dropped += 1

    def flush(self, timeout: float = 5.0) -> bool:
        """Wait (up to ``timeout``) until every event emitted before this call
        has been handed out; ``False`` when it has not been by then."""
        with self._lock:
            running = self._thread is not None
        if not running:
            return self._queue.empty()
        reached = threading.Event()
        try:
            self._queue.put(reached, timeout=timeout)
        except queue.Full:
            return False
        return reached.wait(timeout)

    def stop(self, timeout: float = 5.0) -> None:
        """Deliver what is queued (up to ``timeout``), then close every sink."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            with contextlib.suppress(queue.Full):
                self._queue.put(_STOP, timeout=timeout)
            thread.join(timeout)
        for name, sink in self.sinks.items():
            try:
                sink.close()
            except Exception as exc:
                log.warning("monitor.sink_close_failed", sink=name, error=repr(exc))

    def _run(self) -> None:
        while True:
            event = self._queue.get()
            if event is _STOP:
                return
            if isinstance(event, threading.Event):  # a flush's marker
                event.set()
                continue
            assert isinstance(event, MonitorEvent)
            self._dispatch(event)

    def _dispatch(self, event: MonitorEvent) -> None:
        for observe in self.observers:
            try:
                observe(event)
            except Exception as exc:
                self._failed("(kernel)", exc)
        for name, sink in self.sinks.items():
            try:
                sink.emit(event)
            except Exception as exc:
                self._failed(name, exc)

    def _failed(self, name: str, exc: Exception) -> None:
        self.sink_errors[name] += 1
        # Log the first failure and then every 1000th, not a flood.
        if self.sink_errors[name] % 1000 == 1:
            log.warning(
                "monitor.sink_failed", sink=name, error=repr(exc), failures=self.sink_errors[name]
            )
