"""Monitor events from replicas to the kernel's sinks.

Replicas run in other processes, maybe on other machines, so the kernel's
``emit`` cannot be called there. Each executor starts one small actor, the
:class:`EventQueue` (named, in the executor's namespace): replicas ``put``
events into it without waiting, and a thread of the kernel's process
:class:`Drainer` takes them out every ``interval`` seconds and hands them to
the kernel's ``emit`` — so they reach the same sinks (log, SQLite,
Prometheus) under the same names as in-process events. The queue is bounded:
past ``limit`` the oldest are dropped and counted (an ``ray.events_dropped``
event says how many), so a kernel that stops draining cannot fill a node's
memory.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable

import ray
import structlog

from llmos.types import MonitorEvent

__all__ = ["Drainer", "EventQueue"]

log = structlog.get_logger("llmos.ray")


class EventQueue:
    """The actor's class: a bounded queue of events."""

    def __init__(self, limit: int = 10_000) -> None:
        self._events: deque[MonitorEvent] = deque(maxlen=limit)
        self._dropped = 0

    def put(self, events: list[MonitorEvent]) -> None:
        room = self._events.maxlen - len(self._events)  # type: ignore[operator]
        self._dropped += max(0, len(events) - room)
        self._events.extend(events)

    def drain(self) -> tuple[list[MonitorEvent], int]:
        events, dropped = list(self._events), self._dropped
        self._events.clear()
        self._dropped = 0
        return events, dropped


class Drainer:
    """A thread that moves events from the queue actor to ``emit``."""

    def __init__(
        self, queue: ray.actor.ActorHandle, emit: Callable[[MonitorEvent], None], interval: float
    ) -> None:
        self._queue = queue
        self._emit = emit
        self._interval = interval
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmos-ray-events", daemon=True)
        self._thread.start()

    def drain(self) -> int:
        """Move what is queued now; the number of events moved."""
        events, dropped = ray.get(self._queue.drain.remote(), timeout=30)
        for event in events:
            self._emit(event)
        if dropped:
            self._emit(MonitorEvent(kind="ray.events_dropped", fields={"dropped": dropped}))
        return len(events)

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            try:
                self.drain()
            except Exception as exc:  # a restarting queue: try again next tick
                log.warning("ray.drain_failed", error=repr(exc))

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)
        try:
            self.drain()  # the last ones
        except Exception as exc:
            log.warning("ray.drain_failed", error=repr(exc))
