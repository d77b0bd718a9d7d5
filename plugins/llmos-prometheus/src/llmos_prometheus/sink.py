"""The ``prometheus`` monitor sink: monitor events folded into Prometheus
metrics, kept in the sink's own :class:`~prometheus_client.CollectorRegistry`
(never the process-global one, so two kernels in one process, or another
library's metrics, do not mix).

``emit`` runs on the event bus's dispatcher thread and only updates
counters, gauges and histograms (a few microseconds each; the per-call
request metrics are plain numbers behind a collector, see
:mod:`llmos_prometheus.requests`); the bus's bounded queue and drop counter
stand between it and every request. Scrapes read the registry from the
daemon's threads; prometheus_client's metrics and the collector are
thread-safe.

Label values are bounded: models, groups, fusions, alerts and jobs come from
the registry and the config; free text (an error's message) never becomes a
label, and the few labels that come from a plugin's words (error kinds, event
kinds, unload reasons, tuning metric names) are checked and capped by
:class:`Bounded`.
"""

from __future__ import annotations

import math
import re
from collections import deque
from collections.abc import Callable, Iterator, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import CounterMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.gc_collector import GCCollector
from prometheus_client.platform_collector import PlatformCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from llmos.types import BusHealth, MonitorEvent
from llmos_prometheus import SINK
from llmos_prometheus.options import Settings, settings
from llmos_prometheus.requests import RequestMetrics

__all__ = ["OTHER", "SINK", "Bounded", "PrometheusSink"]

#: the label value for whatever a :class:`Bounded` label refuses
OTHER = "other"

_TERMINAL_JOB_STATES = frozenset({"succeeded", "failed", "cancelled"})
#: tuning.progress figures exported as their own gauge: field → (metric, help)
_TUNING_GAUGES: dict[str, tuple[str, str]] = {
    "loss": ("llmos_tuning_loss", "the job's training loss, mean since its last report"),
    "step": ("llmos_tuning_step", "optimiser steps the job has taken"),
    "total_steps": ("llmos_tuning_total_steps", "optimiser steps the job will take in all"),
    "epoch": ("llmos_tuning_epoch", "epochs done (fractional within an epoch)"),
    "learning_rate": ("llmos_tuning_learning_rate", "the learning rate of the last step"),
    "samples_per_s": ("llmos_tuning_samples_per_second", "training rows per second"),
    "eta_s": ("llmos_tuning_eta_seconds", "estimated seconds until the job ends"),
}


class Bounded:
    """Label values from a plugin's words: ``[A-Za-z0-9_.:-]``, at most 64
    characters, at most ``limit`` distinct values; anything else is
    :data:`OTHER`. Keeps a misbehaving plugin from growing the series
    without bound."""

    _SHAPE = re.compile(r"[A-Za-z0-9_.:-]{1,64}")

    def __init__(self, limit: int = 100) -> None:
        self.limit = limit
        self._seen: set[str] = set()

    def __call__(self, value: Any) -> str:
        if isinstance(value, str) and value in self._seen:  # the common case
            return value
        if not isinstance(value, str) or not self._SHAPE.fullmatch(value):
            return OTHER
        if len(self._seen) >= self.limit:
            return OTHER
        self._seen.add(value)
        return value


def _number(value: Any) -> float | None:
    """A finite number >= 0 from an event field, else ``None`` (figures
    that are missing or malformed are skipped, not guessed)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) and value >= 0 else None


def _rows(fields: Mapping[str, Any]) -> int:
    rows = _number(fields.get("requests"))
    return int(rows) if rows is not None else 1


#: request event fields that become histograms (requests.py says which are
#: observed once per row — each row of a call waited and took as long — and
#: which once per call)
_FIGURES = ("latency_s", "queue_wait_s", "ttft_s", "model_s", "batch_size")


class _BusCollector(Collector):
    """The event bus's own health, read when Prometheus scrapes."""

    def __init__(self, health: Callable[[], BusHealth]) -> None:
        self.health = health

    def collect(self) -> Iterator[Metric]:
        health = self.health()
        dropped = CounterMetricFamily(
            "llmos_monitor_events_dropped",
            "monitor events dropped because the bus's queue was full (a slow sink)",
            value=health.dropped,
        )
        errors = CounterMetricFamily(
            "llmos_monitor_sink_errors",
            "monitor events a sink raised on (counted by the bus, never seen by requests);"
            " sink=(kernel) is the kernel's own consumers",
            labels=["sink"],
        )
        failures = health.sink_errors
        for name in sorted(set(health.sinks) | set(failures)):
            errors.add_metric([name], failures.get(name, 0))
        yield dropped
        yield errors


class PrometheusSink:
    """Keeps the metrics; :meth:`exposition` answers a scrape."""

    def __init__(
        self, options: Mapping[str, Any], *, bus_health: Callable[[], BusHealth] | None = None
    ) -> None:
        self.settings: Settings = settings(options)
        self.registry = CollectorRegistry(auto_describe=True)
        if bus_health is not None:
            self.registry.register(_BusCollector(bus_health))
        self._error_kinds = Bounded()
        self._event_kinds = Bounded()
        self._words = Bounded()  # unload reasons, router kinds, strategies, tuning metrics
        #: job id → (gauge, label values) of each series the job has
        self._job_series: dict[str, set[tuple[Gauge, tuple[str, ...]]]] = {}
        self._finished_jobs: deque[str] = deque()
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}
        self._define(self.settings)
        self._handlers: dict[str, Callable[[MonitorEvent], None]] = {
            "request": self._request,
            "model.loaded": self._model_loaded,
            "model.unloaded": self._model_unloaded,
            "tuning.progress": self._tuning_progress,
            "tuning.job": self._tuning_job,
            "fusion.call": self._fusion_call,
            "alert.firing": self._alert,
            "alert.resolved": self._alert,
            "eval.result": self._eval_result,
        }
        if self.settings.process_metrics:
            ProcessCollector(registry=self.registry)
            PlatformCollector(registry=self.registry)
            GCCollector(registry=self.registry)

    # -- the metrics ------------------------------------------------------------

    def _define(self, s: Settings) -> None:
        r = self.registry

        def counter(name: str, doc: str, *labels: str) -> Counter:
            return Counter(name, doc, labels, registry=r)

        def gauge(name: str, doc: str, *labels: str) -> Gauge:
            return Gauge(name, doc, labels, registry=r)

        # The hot path: plain numbers and a collector (see requests.py).
        self.request_metrics = RequestMetrics(s.buckets, s.batch_buckets)
        r.register(self.request_metrics)

        self.loaded = gauge("llmos_model_loaded", "1 while the model is loaded, 0 after", "model")
        self.load_seconds = gauge(
            "llmos_model_load_seconds", "seconds the model's last load took", "model"
        )
        self.loads = counter("llmos_model_loads", "times the model was loaded", "model")
        self.unloads = counter(
            "llmos_model_unloads",
            "times the model was unloaded, by why (idle, memory_budget, requested …)",
            "model",
            "reason",
        )

        job = ("job", "model")
        self.tuning = {
            field: gauge(name, doc, *job) for field, (name, doc) in _TUNING_GAUGES.items()
        }
        self.tuning_eval = gauge(
            "llmos_tuning_eval_metric",
            "the job's latest evaluation figure (split=dev, metric=accuracy …)",
            *job,
            "split",
            "metric",
        )
        self.tuning_jobs = counter(
            "llmos_tuning_job_transitions",
            "tuning jobs entering a state (running, succeeded, failed, cancelled …)",
            "method",
            "state",
        )

        member = ("fusion", "member")
        self.fusion_rows = counter(
            "llmos_fusion_rows", "rows a fusion answered", "fusion", "strategy"
        )
        self.fusion_asked = counter(
            "llmos_fusion_member_requests", "rows a fusion asked of a member", *member
        )
        self.fusion_answered = counter(
            "llmos_fusion_member_answers", "rows a member answered for a fusion", *member
        )
        self.fusion_agreed = counter(
            "llmos_fusion_member_agreements",
            "rows where a member's answer was the fusion's answer",
            *member,
        )
        self.fusion_cut = counter(
            "llmos_fusion_budget_exhausted_rows",
            "rows whose budget (max_members, max_latency_ms) cut members out",
            "fusion",
        )

        self.router = counter(
            "llmos_router_events",
            "deployment group events: retry, cooldown, wait, fallback",
            "group",
            "kind",
        )
        self.alerts = gauge(
            "llmos_alerts_firing", "1 while the alert fires, 0 once resolved", "alert", "model"
        )
        self.eval_accuracy = gauge(
            "llmos_eval_accuracy",
            "the model's accuracy in its last scheduled evaluation (an accuracy alert rule)",
            "model",
        )
        self.eval_registered = gauge(
            "llmos_eval_registered_accuracy",
            "the score registered on the model's card that the evaluation is held against",
            "model",
        )
        self.eval_failures = counter(
            "llmos_eval_failures",
            "scheduled evaluations that could not run (no data, a failing model …)",
            "model",
        )
        self.events = counter(
            "llmos_monitor_events", "monitor events this sink received, by kind", "kind"
        )

    # -- the sink -----------------------------------------------------------------

    def emit(self, event: MonitorEvent) -> None:
        self._child(self.events, self._event_kinds(event.kind)).inc()
        handler = self._handlers.get(event.kind)
        if handler is not None:
            handler(event)
        elif event.kind.startswith("router."):
            self.router.labels(event.model or "", self._words(event.kind[7:])).inc()

    def exposition(self, accept: str | None) -> tuple[bytes, str]:
        """The metrics in the format ``accept`` (an HTTP Accept header) asks
        for — OpenMetrics or Prometheus' text format — and its content type."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type

    def close(self) -> None:
        """Nothing to flush: the metrics live in memory until the process ends."""

    # -- one handler per event kind -------------------------------------------------

    def _child(self, metric: Any, *labels: str) -> Any:
        """``metric.labels(*labels)``, kept: ``labels()`` takes a lock and
        builds a key each time, and a request event needs up to eight.
        Only for series that are never removed (not the tuning gauges)."""
        key = (metric, labels)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*labels)
        return child

    def _request(self, event: MonitorEvent) -> None:
        f = event.fields
        status = str(f.get("status", "ok"))
        if status == "rejected":
            # Refused at the door: no timings, and the model never saw it.
            kind: str | None = "queue_full"
            figures: dict[str, float | None] = {}
        else:
            kind = self._error_kinds(f.get("error")) if status == "error" else None
            figures = {key: _number(f.get(key)) for key in _FIGURES}
        self.request_metrics.add(
            (event.model or "", event.capability or ""),
            _rows(f),
            self._words(status),
            kind,
            figures,
            _number(f.get("tokens_in")),
            _number(f.get("tokens_out")),
        )

    def _model_loaded(self, event: MonitorEvent) -> None:
        model = event.model or ""
        self.loaded.labels(model).set(1)
        self.loads.labels(model).inc()
        seconds = _number(event.fields.get("load_s"))
        if seconds is not None:
            self.load_seconds.labels(model).set(seconds)

    def _model_unloaded(self, event: MonitorEvent) -> None:
        model = event.model or ""
        self.loaded.labels(model).set(0)
        reason = event.fields.get("why")
        reason = reason.replace(" ", "_") if isinstance(reason, str) else None
        self.unloads.labels(model, self._words(reason)).inc()

    def _tuning_progress(self, event: MonitorEvent) -> None:
        job = event.fields.get("job")
        if not isinstance(job, str) or not job:
            return
        labels = (job, event.model or "")
        series = self._job_series.setdefault(job, set())
        for key, value in event.fields.items():
            number = _number(value)
            if number is None:
                continue
            gauge = self.tuning.get(key)
            if gauge is not None:
                gauge.labels(*labels).set(number)
                series.add((gauge, labels))
            elif "/" in key:  # dev/accuracy, test/macro_f1 …
                split, _, metric = key.partition("/")
                full = (*labels, self._words(split), self._words(metric.replace("/", "_")))
                self.tuning_eval.labels(*full).set(number)
                series.add((self.tuning_eval, full))

    def _tuning_job(self, event: MonitorEvent) -> None:
        f = event.fields
        state = str(f.get("state", ""))
        self.tuning_jobs.labels(self._words(f.get("method")), self._words(state)).inc()
        job = f.get("job")
        if state in _TERMINAL_JOB_STATES and isinstance(job, str) and job in self._job_series:
            if job not in self._finished_jobs:
                self._finished_jobs.append(job)
            # Job ids never repeat: keep the last few ended jobs' figures, drop
            # the older ones, so that the series do not grow job after job.
            while len(self._finished_jobs) > self.settings.finished_jobs:
                for gauge, labels in self._job_series.pop(self._finished_jobs.popleft(), ()):
                    gauge.remove(*labels)

    def _fusion_call(self, event: MonitorEvent) -> None:
        f = event.fields
        fusion = event.model or ""
        rows = _number(f.get("rows"))
        if rows:
            self.fusion_rows.labels(fusion, self._words(f.get("strategy"))).inc(rows)
        cut = _number(f.get("budget_cut"))
        if cut:
            self.fusion_cut.labels(fusion).inc(cut)
        members = f.get("members")
        if not isinstance(members, Mapping):
            return
        for member, figures in members.items():
            if not isinstance(figures, Mapping):
                continue
            for counter, key in (
                (self.fusion_asked, "asked"),
                (self.fusion_answered, "answered"),
                (self.fusion_agreed, "agreed"),
            ):
                # Touch the series even at 0, so that a member that never
                # answers shows 0 rather than nothing.
                child = counter.labels(fusion, str(member))
                child.inc(_number(figures.get(key)) or 0)

    def _alert(self, event: MonitorEvent) -> None:
        alert = event.fields.get("alert")
        if not isinstance(alert, str) or not alert:
            return
        self.alerts.labels(alert, event.model or "").set(1 if event.kind == "alert.firing" else 0)

    def _eval_result(self, event: MonitorEvent) -> None:
        f = event.fields
        model = event.model or ""
        if f.get("error"):
            self.eval_failures.labels(model).inc()
            return
        for gauge, key in ((self.eval_accuracy, "score"), (self.eval_registered, "registered")):
            value = _number(f.get(key))
            if value is not None:
                gauge.labels(model).set(value)
