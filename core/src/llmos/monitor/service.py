"""The kernel's monitor: metric windows, the process sampler, alert rules and
scheduled accuracy checks, on one clock thread.

:class:`Monitor` is created by the kernel at start. It is fed every monitor
event by the bus (before any sink), samples the process's own memory and CPU
every ``[monitor] sample_every_s`` (a ``process.sample`` event, so sinks get
it too), evaluates the ``[alerts.*]`` rules every ``evaluate_every_s``, and
runs each accuracy rule's evaluation every ``every`` on a thread of its own
(an evaluation can take minutes; the clock never waits for it).
"""

from __future__ import annotations

import math
import os
import resource
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import structlog

from llmos.config import Config
from llmos.errors import ConfigError
from llmos.monitor.alerts import AlertManager, AlertRule, run_accuracy_check
from llmos.monitor.bus import EventBus
from llmos.monitor.metrics import MetricWindows
from llmos.types import ModelCaller, ModelCard, MonitorEvent

log = structlog.get_logger("llmos.monitor")

__all__ = ["Monitor", "process_sample"]


def process_sample(
    previous: tuple[float, float] | None,
) -> tuple[dict[str, Any], tuple[float, float]]:
    """This process's resident memory (MiB), CPU use since ``previous``
    (percent of one core) and thread count; and the mark for the next call."""
    wall, cpu = time.monotonic(), time.process_time()
    fields: dict[str, Any] = {"threads": threading.active_count()}
    rss = _rss_bytes()
    if rss is not None:
        fields["rss_mb"] = round(rss / 2**20, 2)
    if previous is not None and wall > previous[0]:
        fields["cpu_percent"] = round(100 * (cpu - previous[1]) / (wall - previous[0]), 2)
    return fields, (wall, cpu)


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # the peak, where no /proc
        return peak if sys.platform == "darwin" else peak * 1024


class Monitor:
    """Metric windows, alerts and accuracy checks of one kernel."""

    def __init__(
        self,
        config: Config,
        bus: EventBus,
        caller: ModelCaller,
        loaded: Callable[[], Sequence[Any]],
        cards: Callable[[str], ModelCard],
        providers: Callable[[], Mapping[str, Any]],
    ) -> None:
        """``config`` gives ``[monitor]``, ``[alerts]`` and (for advice)
        ``[models]``; ``bus`` takes its events (and reports drops);
        ``caller`` runs accuracy checks; ``loaded`` lists the loaded models'
        workers, ``cards`` reads a registered card, ``providers`` lists the
        installed providers (for advice)."""
        self.config = config
        self.bus = bus
        self.caller = caller
        self.loaded = loaded
        self.cards = cards
        self.providers = providers
        section = config.section("monitor")
        self.windows = MetricWindows(
            bucket_s=float(section.get("bucket_s", 10.0)),
            keep_s=float(section.get("keep_s", 3600.0)),
        )
        self.sample_every_s = float(section.get("sample_every_s", 5.0))
        self.evaluate_every_s = float(section.get("evaluate_every_s", 5.0))
        self.latency_target_ms = float(section.get("latency_target_ms", 0.0))
        #: alert rules the config got wrong: name -> why (shown by /api/alerts)
        self.refused: dict[str, str] = {}
        rules = []
        for name, table in config.section("alerts").items():
            try:
                rules.append(AlertRule.from_table(name, table))
            except ConfigError as exc:
                self.refused[name] = exc.message
                log.error("monitor.alert_refused", alert=name, error=exc.message)
        try:
            self.alerts = AlertManager.from_config(section, self.windows, rules, bus.emit)
        except ConfigError as exc:
            self.refused["(webhook)"] = exc.message
            log.error("monitor.webhook_refused", error=exc.message)
            self.alerts = AlertManager(rules, self.windows, bus.emit)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._checks: dict[str, threading.Thread] = {}
        self._mark: tuple[float, float] | None = None

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(
                target=self._run, name="llmos-monitor-clock", daemon=True
            )
            self._thread.start()

    def close_buckets(self, now: float | None = None) -> None:
        """Hand the finished metric buckets on to the sinks (``request.bucket``)."""
        for event in self.windows.close_buckets(now):
            self.bus.emit(event)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop the clock, hand every bucket on (the running ones too); wait
        for running accuracy checks (the kernel stops its models first, so a
        check ends at its next call) before the registry they read is closed."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)
        # Calls emitted just before the stop may still wait on the bus: fold
        # them into the windows first, or their buckets are never handed on.
        self.bus.flush()
        self.close_buckets(math.inf)
        deadline = time.monotonic() + timeout
        for thread in list(self._checks.values()):
            thread.join(max(deadline - time.monotonic(), 0.0))
        self.alerts.close()

    def sample(self) -> dict[str, Any]:
        """Sample the process now and emit ``process.sample``."""
        fields, self._mark = process_sample(self._mark)
        try:
            workers = self.loaded()
        except Exception:  # the models manager may be closing
            workers = []
        fields["models_loaded"] = len(workers)
        fields["queued"] = sum(w.queued for w in workers)
        fields["events_dropped"] = self.bus.dropped
        self.bus.emit(MonitorEvent(kind="process.sample", fields=fields))
        return fields

    def _run(self) -> None:
        next_sample = next_eval = next_close = time.monotonic()
        next_check = {rule.name: time.monotonic() for rule in self._accuracy_rules()}
        tick = min(self.sample_every_s, self.evaluate_every_s, 1.0)
        close_every = min(self.windows.bucket_s, 1.0)
        while not self._stop.wait(
            max(min(next_sample, next_eval, next_close) - time.monotonic(), 0.0)
        ):
            now = time.monotonic()
            try:
                if now >= next_close:
                    self.close_buckets()
                    next_close = now + close_every
                if now >= next_sample:
                    self.sample()
                    next_sample = now + self.sample_every_s
                for rule in self._accuracy_rules():
                    if now >= next_check[rule.name] and not self._checking(rule.name):
                        self.check_accuracy(rule, wait=False)
                        next_check[rule.name] = now + rule.every_s
                if now >= next_eval:
                    self.alerts.evaluate()
                    next_eval = now + self.evaluate_every_s
            except Exception as exc:  # never let the clock die
                log.error("monitor.clock_failed", error=repr(exc))
                self._stop.wait(tick)

    def _accuracy_rules(self) -> list[AlertRule]:
        return [rule for rule in self.alerts.rules if rule.metric == "accuracy"]

    def _checking(self, name: str) -> bool:
        thread = self._checks.get(name)
        return thread is not None and thread.is_alive()

    def check_accuracy(self, rule: AlertRule, *, wait: bool = True) -> MonitorEvent | None:
        """Run ``rule``'s evaluation (on its own thread); with ``wait``, return its event."""
        result: list[MonitorEvent] = []

        def run() -> None:
            event = run_accuracy_check(self.cards, self.caller, rule)
            # The windows get it at once (the alert is judged on it next tick);
            # the sinks through the bus.
            self.windows.observe(event)
            self.bus.emit(event)
            result.append(event)

        thread = threading.Thread(target=run, name=f"llmos-accuracy-{rule.name}", daemon=True)
        self._checks[rule.name] = thread
        thread.start()
        if wait:
            thread.join()
            return result[0] if result else None
        return None
