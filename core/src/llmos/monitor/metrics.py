"""Metric windows: monitor events folded into time buckets, per model.

Every ``request`` event (one batch or one stream, see
:mod:`llmos.runtime.worker`) lands in the bucket of its time
(``bucket_s`` wide, ``keep_s`` kept) for its model and capability. A bucket
holds counters (rows, errors by kind, tokens) and :class:`Sketch` es of the
latencies, so any window — the last minute, the last hour, one chart step — is
the merge of its buckets, and its percentiles come out within 1% of the exact
value whatever the traffic, in memory bounded by the number of buckets.

Other events are kept as they are useful to look at: tuning progress per job
(loss and dev figures over steps), per-member figures of fusions, the
process's own memory and CPU samples, and the latest evaluation score of each
model (accuracy drift). :class:`MetricWindows` is fed by the kernel's event
bus (it is not a plugin: alerts, the advisor and the dashboard read it) and
answers the summaries, series and single values those need.
"""

from __future__ import annotations

import math
import threading
import time
from collections import Counter, defaultdict, deque
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import attrs

from llmos.types import MonitorEvent

__all__ = [
    "METRICS",
    "MetricWindows",
    "RequestStats",
    "Sketch",
    "parse_duration",
]

#: relative accuracy of every percentile a sketch answers
SKETCH_ACCURACY = 0.01
_GAMMA = (1 + SKETCH_ACCURACY) / (1 - SKETCH_ACCURACY)
_LOG_GAMMA = math.log(_GAMMA)
#: values at or below this are counted as zero (a latency of 1 ns is zero)
_TINY = 1e-9

#: points kept per tuning job; past it every other point is dropped (the
#: curve keeps its shape at half the resolution)
MAX_JOB_POINTS = 2_000


def parse_duration(value: Any, what: str = "duration") -> float:
    """Seconds from ``30``, ``2.5``, ``"30s"``, ``"5m"``, ``"1h"``, ``"7d"``
    or ``"250ms"``; anything else is a :class:`ValueError` that says so."""
    if isinstance(value, bool):
        raise ValueError(f"{what}: expected seconds or a duration like '5m', got {value!r}")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str):
        text = value.strip().lower()
        units = (("ms", 0.001), ("s", 1.0), ("m", 60.0), ("h", 3600.0), ("d", 86400.0))
        for suffix, scale in units:
            if text.endswith(suffix) and _is_number(text[: -len(suffix)]):
                seconds = float(text[: -len(suffix)]) * scale
                break
        else:
            if not _is_number(text):
                raise ValueError(
                    f"{what}: {value!r} is not a duration; write seconds or a number with"
                    " ms, s, m, h or d (e.g. '30s', '5m', '1h')"
                )
            seconds = float(text)
    else:
        raise ValueError(f"{what}: expected seconds or a duration like '5m', got {value!r}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{what}: {value!r} must be a finite duration >= 0")
    return seconds


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return bool(text) and text.lstrip("+-").replace(".", "", 1).isdigit()


# --------------------------------------------------------------------------
# Sketch: mergeable percentiles with a relative error bound
# --------------------------------------------------------------------------


@attrs.define(eq=False)
class Sketch:
    """Counts of values in logarithmic bins (a DDSketch): any percentile
    within :data:`SKETCH_ACCURACY` of the true value, sketches merge exactly,
    and the size grows with the spread of the values, not their number
    (1 µs to 1 h is ~1,100 bins at most)."""

    bins: dict[int, float] = attrs.field(factory=dict)
    zeros: float = 0.0
    count: float = 0.0
    total: float = 0.0
    low: float = math.inf
    high: float = -math.inf

    def add(self, value: float, weight: float = 1.0) -> None:
        if not math.isfinite(value) or weight <= 0:
            return
        value = max(value, 0.0)
        if value <= _TINY:
            self.zeros += weight
        else:
            index = math.ceil(math.log(value) / _LOG_GAMMA)
            self.bins[index] = self.bins.get(index, 0.0) + weight
        self.count += weight
        self.total += value * weight
        self.low = min(self.low, value)
        self.high = max(self.high, value)

    def merge(self, other: Sketch) -> None:
        for index, n in other.bins.items():
            self.bins[index] = self.bins.get(index, 0.0) + n
        self.zeros += other.zeros
        self.count += other.count
        self.total += other.total
        self.low = min(self.low, other.low)
        self.high = max(self.high, other.high)

    def quantile(self, q: float) -> float | None:
        """The ``q``-quantile (0..1) by nearest rank (the p99 of five values
        is the largest: a tail is never under-reported), or ``None``."""
        if self.count <= 0:
            return None
        rank = max(math.ceil(q * self.count - 1e-9) - 1, 0)
        if rank >= self.count - 1:
            return self.high  # the largest value is known exactly
        if rank < self.zeros:
            return 0.0
        seen = self.zeros
        for index in sorted(self.bins):
            seen += self.bins[index]
            if seen > rank:
                value = 2 * _GAMMA**index / (_GAMMA + 1)
                return min(max(value, self.low), self.high)
        return self.high

    @property
    def mean(self) -> float | None:
        return self.total / self.count if self.count else None

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able form (the sqlite sink stores it); :meth:`from_dict` reads it."""
        return {
            "bins": {str(k): v for k, v in self.bins.items()},
            "zeros": self.zeros,
            "count": self.count,
            "total": self.total,
            "low": self.low if self.count else None,
            "high": self.high if self.count else None,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Sketch:
        return cls(
            bins={int(k): float(v) for k, v in dict(data.get("bins") or {}).items()},
            zeros=float(data.get("zeros", 0.0)),
            count=float(data.get("count", 0.0)),
            total=float(data.get("total", 0.0)),
            low=math.inf if data.get("low") is None else float(data["low"]),
            high=-math.inf if data.get("high") is None else float(data["high"]),
        )


# --------------------------------------------------------------------------
# One bucket of request figures
# --------------------------------------------------------------------------

_SKETCHED = ("latency_s", "queue_wait_s", "ttft_s", "model_s")


@attrs.define(eq=False)
class RequestStats:
    """Request figures of one model and capability over some time: a bucket,
    or the merge of buckets that makes a window."""

    #: model calls (a batch or a stream each)
    calls: int = 0
    #: rows: requests answered, failed or refused
    requests: int = 0
    ok: int = 0
    errors: int = 0
    cancelled: int = 0
    #: refused at the door (queue full): rows
    rejected: int = 0
    errors_by_kind: Counter[str] = attrs.field(factory=Counter)
    tokens_in: int = 0
    tokens_out: int = 0
    #: seconds the model spent computing (sum over calls)
    busy_s: float = 0.0
    latency_s: Sketch = attrs.field(factory=Sketch)
    queue_wait_s: Sketch = attrs.field(factory=Sketch)
    ttft_s: Sketch = attrs.field(factory=Sketch)
    model_s: Sketch = attrs.field(factory=Sketch)
    batch_size: Sketch = attrs.field(factory=Sketch)

    def add(self, fields: Mapping[str, Any]) -> None:
        """Fold in one ``request`` event's fields."""
        rows = _int(fields.get("requests"), 1)
        status = str(fields.get("status", "ok"))
        self.requests += rows
        if status == "rejected":
            self.rejected += rows
            self.errors_by_kind["queue_full"] += rows
            return
        self.calls += 1
        if status == "ok":
            self.ok += rows
        elif status == "cancelled":
            self.cancelled += rows
        else:
            self.errors += rows
            self.errors_by_kind[str(fields.get("error") or "error")] += rows
        self.tokens_in += _int(fields.get("tokens_in"), 0)
        self.tokens_out += _int(fields.get("tokens_out"), 0)
        model_s = _float(fields.get("model_s"))
        if model_s is not None:
            self.busy_s += model_s
        # Each row of a batch waited and took as long as the batch.
        for name in _SKETCHED:
            value = _float(fields.get(name))
            if value is not None:
                getattr(self, name).add(value, rows if name != "model_s" else 1)
        batch = _float(fields.get("batch_size"))
        if batch is not None:
            self.batch_size.add(batch)

    def merge(self, other: RequestStats) -> None:
        for name in ("calls", "requests", "ok", "errors", "cancelled", "rejected"):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.tokens_in += other.tokens_in
        self.tokens_out += other.tokens_out
        self.busy_s += other.busy_s
        self.errors_by_kind.update(other.errors_by_kind)
        for name in (*_SKETCHED, "batch_size"):
            getattr(self, name).merge(getattr(other, name))

    def figures(self, seconds: float) -> dict[str, Any]:
        """The window's figures (``seconds`` long): rates, ratios, percentiles in ms."""
        seconds = max(seconds, 1e-9)
        failed = self.errors + self.rejected
        out: dict[str, Any] = {
            "requests": self.requests,
            "calls": self.calls,
            "errors": failed,
            "error_rate": failed / self.requests if self.requests else 0.0,
            "errors_by_kind": dict(self.errors_by_kind.most_common()),
            "cancelled": self.cancelled,
            "rps": self.requests / seconds,
            "tokens_in": self.tokens_in,
            "tokens_out": self.tokens_out,
            "tokens_in_per_s": self.tokens_in / seconds,
            "tokens_out_per_s": self.tokens_out / seconds,
            "busy": min(self.busy_s / seconds, 1.0),
            "batch_size_mean": self.batch_size.mean,
            "batch_size_max": self.batch_size.high if self.batch_size.count else None,
        }
        for name, sketch in (
            ("latency", self.latency_s),
            ("queue_wait", self.queue_wait_s),
            ("ttft", self.ttft_s),
            ("model", self.model_s),
        ):
            for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
                value = sketch.quantile(q)
                out[f"{name}_{label}_ms"] = None if value is None else value * 1000
        return out

    def to_dict(self) -> dict[str, Any]:
        data: dict[str, Any] = {
            name: getattr(self, name)
            for name in (
                "calls",
                "requests",
                "ok",
                "errors",
                "cancelled",
                "rejected",
                "tokens_in",
                "tokens_out",
                "busy_s",
            )
        }
        data["errors_by_kind"] = dict(self.errors_by_kind)
        for name in (*_SKETCHED, "batch_size"):
            data[name] = getattr(self, name).to_dict()
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RequestStats:
        stats = cls()
        for name in ("calls", "requests", "ok", "errors", "cancelled", "rejected"):
            setattr(stats, name, int(data.get(name, 0)))
        stats.tokens_in = int(data.get("tokens_in", 0))
        stats.tokens_out = int(data.get("tokens_out", 0))
        stats.busy_s = float(data.get("busy_s", 0.0))
        stats.errors_by_kind = Counter(
            {str(k): int(v) for k, v in dict(data.get("errors_by_kind") or {}).items()}
        )
        for name in (*_SKETCHED, "batch_size"):
            if name in data:
                setattr(stats, name, Sketch.from_dict(data[name]))
        return stats


def _names(deployment: str, model: str) -> bool:
    """Whether ``model`` (``name`` or ``name@version``) names ``deployment``
    (always ``name@version``): a bare name takes in every version."""
    return deployment == model or ("@" not in model and deployment.partition("@")[0] == model)


def _int(value: Any, default: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return default
    return int(value)


def _float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


#: the single figures alerts and the advisor can ask for (per model, over a window)
METRICS: dict[str, str] = {
    "requests": "rows asked for (answered, failed or refused)",
    "rps": "rows per second",
    "errors": "rows that failed or were refused",
    "error_rate": "errors / requests (0..1)",
    "latency_p50_ms": "median latency, queue included",
    "latency_p95_ms": "95th percentile latency, queue included",
    "latency_p99_ms": "99th percentile latency, queue included",
    "queue_wait_p95_ms": "95th percentile wait in the model's queue",
    "ttft_p95_ms": "95th percentile time to first token (streams)",
    "tokens_out_per_s": "generated tokens per second",
    "tokens_in_per_s": "prompt tokens per second",
    "batch_size_mean": "rows per model call",
    "busy": "share of the window the model spent computing (0..1)",
    "accuracy": "latest evaluation score (scheduled accuracy checks)",
    "rss_mb": "resident memory of the daemon process, MiB",
    "cpu_percent": "CPU use of the daemon process (100 = one core)",
}

#: metrics of the process, not of a model
PROCESS_METRICS = ("rss_mb", "cpu_percent")


# --------------------------------------------------------------------------
# The windows
# --------------------------------------------------------------------------


class MetricWindows:
    """Monitor events folded into ``bucket_s`` buckets, ``keep_s`` kept."""

    def __init__(
        self,
        *,
        bucket_s: float = 10.0,
        keep_s: float = 3600.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if bucket_s <= 0 or keep_s < bucket_s:
            raise ValueError("bucket_s must be > 0 and keep_s >= bucket_s")
        self.bucket_s = float(bucket_s)
        self.keep_s = float(keep_s)
        self.clock = clock
        self._lock = threading.Lock()
        #: (model, capability) -> bucket index -> stats
        self._requests: dict[tuple[str, str], dict[int, RequestStats]] = defaultdict(dict)
        self._jobs: dict[str, dict[str, Any]] = {}
        self._fusions: dict[str, dict[str, dict[str, float]]] = defaultdict(dict)
        self._process: deque[dict[str, Any]] = deque(maxlen=max(int(keep_s // 5), 12))
        self._evaluations: dict[str, dict[str, Any]] = {}
        self._loaded: dict[str, dict[str, Any]] = {}
        #: a self-batching backend's latest own figures (vLLM's engine.stats)
        self._engines: dict[str, dict[str, Any]] = {}
        #: buckets before this index were handed on by :meth:`close_buckets`
        self._closed_upto = 0
        self._late: dict[tuple[tuple[str, str], int], RequestStats] = {}
        self.started = clock()

    # -- feeding ------------------------------------------------------------

    def __call__(self, event: MonitorEvent) -> None:
        self.observe(event)

    def observe(self, event: MonitorEvent) -> None:
        """Fold one event in (called on the bus's thread)."""
        kind = event.kind
        if kind == "request" and event.model:
            when = event.time.timestamp()
            key = (event.model, event.capability or "?")
            index = int(when // self.bucket_s)
            with self._lock:
                buckets = self._requests[key]
                stats = buckets.get(index)
                if stats is None:
                    stats = buckets[index] = RequestStats()
                    self._prune(buckets, index)
                stats.add(event.fields)
                if index < self._closed_upto:
                    # Its bucket was handed on already: this one goes on apart.
                    late = self._late.get((key, index))
                    if late is None:
                        late = self._late[(key, index)] = RequestStats()
                    late.add(event.fields)
        elif kind == "tuning.progress":
            self._tuning_progress(event)
        elif kind == "tuning.job":
            with self._lock:
                job = self._job(str(event.fields.get("job")), event.model)
                job["state"] = event.fields.get("state")
                if event.fields.get("scores"):
                    job["scores"] = dict(event.fields["scores"])
        elif kind == "fusion.call" and event.model:
            with self._lock:
                members = self._fusions[event.model]
                for name, figures in dict(event.fields.get("members") or {}).items():
                    mine = members.setdefault(
                        name, {"asked": 0, "answered": 0, "agreed": 0, "latency_s_max": 0.0}
                    )
                    mine["asked"] += figures.get("asked", 0)
                    mine["answered"] += figures.get("answered", 0)
                    mine["agreed"] += figures.get("agreed", 0)
                    mine["latency_s_max"] = max(
                        mine["latency_s_max"], float(figures.get("latency_s") or 0.0)
                    )
        elif kind == "process.sample":
            with self._lock:
                self._process.append({"time": event.time.timestamp(), **event.fields})
        elif kind == "eval.result" and event.model:
            with self._lock:
                self._evaluations[event.model] = {
                    "time": event.time.timestamp(),
                    **event.fields,
                }
        elif kind == "engine.stats" and event.model:
            with self._lock:
                self._engines[event.model] = {"time": event.time.timestamp(), **event.fields}
        elif kind == "model.loaded" and event.model:
            with self._lock:
                self._loaded[event.model] = {"time": event.time.timestamp(), **event.fields}
        elif kind == "model.unloaded" and event.model:
            with self._lock:
                self._loaded.pop(event.model, None)

    def close_buckets(
        self, now: float | None = None, *, grace_s: float = 1.0
    ) -> list[MonitorEvent]:
        """``request.bucket`` events for the buckets that ended ``grace_s``
        ago or more and were not handed on yet (all of them, the one running
        too, with ``now=math.inf``): each model's and capability's figures of
        one bucket, folded once here for every sink that keeps aggregates
        (the log sink's summaries) instead of each folding every call. A
        request that arrives after its bucket was handed on comes in a
        ``request.bucket`` of its own for the same ``start``: a consumer
        merges buckets with the same start."""
        now = self.clock() if now is None else now
        upto = int((now - grace_s) // self.bucket_s) if math.isfinite(now) else None
        out: list[MonitorEvent] = []
        with self._lock:
            start = self._closed_upto
            ready: list[tuple[tuple[str, str], int, RequestStats]] = [
                (key, index, stats)
                for key, buckets in self._requests.items()
                for index, stats in buckets.items()
                if index >= start and (upto is None or index < upto)
            ]
            ready += [(key, index, stats) for (key, index), stats in self._late.items()]
            self._late = {}
            if upto is not None:
                self._closed_upto = max(start, upto)
            elif ready:
                self._closed_upto = max(index for _, index, _ in ready) + 1
            for (model, capability), index, stats in sorted(ready, key=lambda r: (r[1], r[0])):
                end = (index + 1) * self.bucket_s
                out.append(
                    MonitorEvent(
                        kind="request.bucket",
                        time=datetime.fromtimestamp(end, UTC),
                        model=model,
                        capability=capability,
                        fields={
                            "start": index * self.bucket_s,
                            "width": self.bucket_s,
                            "stats": stats.to_dict(),
                        },
                    )
                )
        return out

    def _prune(self, buckets: dict[int, RequestStats], newest: int) -> None:
        oldest = newest - int(self.keep_s // self.bucket_s)
        for index in [i for i in buckets if i < oldest]:
            del buckets[index]

    def _job(self, job_id: str, model: str | None) -> dict[str, Any]:
        job = self._jobs.get(job_id)
        if job is None:
            job = self._jobs[job_id] = {"job": job_id, "model": model, "points": []}
            # Keep the 50 most recent jobs.
            for old in list(self._jobs)[:-50]:
                del self._jobs[old]
        return job

    def _tuning_progress(self, event: MonitorEvent) -> None:
        fields = dict(event.fields)
        point = {"time": event.time.timestamp()}
        for name, value in fields.items():
            number = _float(value)
            if number is not None:
                point[name] = number
        with self._lock:
            job = self._job(str(fields.get("job")), event.model)
            points = job["points"]
            points.append(point)
            if len(points) > MAX_JOB_POINTS:
                job["points"] = points[::2]

    # -- reading ------------------------------------------------------------

    def _merged(self, keys: Iterable[tuple[str, str]], first: int, last: int) -> RequestStats:
        total = RequestStats()
        for key in keys:
            buckets = self._requests.get(key, {})
            if last - first + 1 < len(buckets):  # a chart step: a few lookups
                for index in range(first, last + 1):
                    if (stats := buckets.get(index)) is not None:
                        total.merge(stats)
            else:
                for index, stats in buckets.items():
                    if first <= index <= last:
                        total.merge(stats)
        return total

    def _span(self, window_s: float, now: float | None) -> tuple[int, int, float]:
        """Bucket indexes of the window ending now, and its length in seconds
        (shorter while the kernel is younger than the window)."""
        now = self.clock() if now is None else now
        window_s = max(window_s, self.bucket_s)
        last = int(now // self.bucket_s)
        first = int((now - window_s) // self.bucket_s) + 1
        seconds = min(window_s, max(now - self.started, self.bucket_s))
        return first, last, seconds

    def models(self) -> list[str]:
        with self._lock:
            seen = {model for model, _ in self._requests}
            return sorted(seen | set(self._loaded) | set(self._evaluations))

    def stats(
        self, model: str, window_s: float, capability: str | None = None, now: float | None = None
    ) -> tuple[RequestStats, float]:
        """The merged figures of ``model`` over the last ``window_s``, and the
        window's length in seconds."""
        first, last, seconds = self._span(window_s, now)
        with self._lock:
            keys = [
                key
                for key in self._requests
                if _names(key[0], model) and (capability is None or key[1] == capability)
            ]
            return self._merged(keys, first, last), seconds

    def summary(self, window_s: float = 60.0, now: float | None = None) -> dict[str, Any]:
        """Every model's figures over the last ``window_s``: what a dashboard
        or ``llmos top`` shows."""
        first, last, seconds = self._span(window_s, now)
        with self._lock:
            by_model: dict[str, list[tuple[str, str]]] = defaultdict(list)
            for key in self._requests:
                by_model[key[0]].append(key)
            models: dict[str, Any] = {}
            engines = {m for m, e in self._engines.items() if e["time"] >= first * self.bucket_s}
            names = set(by_model) | set(self._loaded) | set(self._evaluations) | engines
            for model in sorted(names):
                parts = {
                    key[1]: self._merged([key], first, last) for key in by_model.get(model, [])
                }
                total = RequestStats()
                for part in parts.values():
                    total.merge(part)
                figures = total.figures(seconds)
                figures["capabilities"] = {cap: part.requests for cap, part in parts.items()}
                figures["loaded"] = model in self._loaded
                if model in self._evaluations:
                    figures["evaluation"] = dict(self._evaluations[model])
                engine = self._engines.get(model)
                if engine is not None and engine["time"] >= first * self.bucket_s:
                    figures["engine"] = dict(engine)
                models[model] = figures
            process = dict(self._process[-1]) if self._process else None
        return {"window_s": seconds, "models": models, "process": process}

    def series(
        self,
        model: str | None,
        window_s: float = 600.0,
        step_s: float | None = None,
        now: float | None = None,
    ) -> dict[str, Any]:
        """Points every ``step_s`` (a multiple of the bucket) over the last
        ``window_s`` — for one model, or all models together with ``None``.
        Steps are aligned to multiples of ``step_s`` since the epoch, so a
        point keeps its value from one poll to the next (the last one, the
        step now running, grows)."""
        now = self.clock() if now is None else now
        step_s = max(step_s or max(window_s / 60, self.bucket_s), self.bucket_s)
        per_step = max(round(step_s / self.bucket_s), 1)
        step_s = per_step * self.bucket_s
        last = (int(now // self.bucket_s) // per_step) * per_step + per_step - 1
        steps = max(int(window_s // step_s), 1)
        points = []
        with self._lock:
            keys = [key for key in self._requests if model is None or _names(key[0], model)]
            for n in range(steps - 1, -1, -1):
                end = last - n * per_step
                start = end - per_step + 1
                stats = self._merged(keys, start, end)
                figures = stats.figures(step_s)
                points.append(
                    {
                        "time": (end + 1) * self.bucket_s,
                        **{
                            name: figures[name]
                            for name in (
                                "requests",
                                "rps",
                                "errors",
                                "error_rate",
                                "latency_p50_ms",
                                "latency_p95_ms",
                                "latency_p99_ms",
                                "queue_wait_p95_ms",
                                "tokens_out_per_s",
                                "batch_size_mean",
                            )
                        },
                    }
                )
        return {"model": model, "window_s": steps * step_s, "step_s": step_s, "points": points}

    def value(
        self, metric: str, model: str | None, window_s: float, now: float | None = None
    ) -> tuple[float | None, int]:
        """One figure (a name in :data:`METRICS`) of ``model`` over the window,
        and how many requests it rests on (``None`` when there is no data)."""
        if metric not in METRICS:
            raise ValueError(f"unknown metric {metric!r}; known: {', '.join(sorted(METRICS))}")
        if metric in PROCESS_METRICS:
            now = self.clock() if now is None else now
            with self._lock:
                samples = [s for s in self._process if s["time"] >= now - window_s]
            values = [_float(s.get(metric)) for s in samples]
            values = [v for v in values if v is not None]
            return (sum(values) / len(values) if values else None), len(values)
        if model is None:
            raise ValueError(f"metric {metric!r} is per model: name one")
        if metric == "accuracy":
            with self._lock:
                evaluation = self._evaluations.get(model)
            if evaluation is None:
                return None, 0
            return _float(evaluation.get("score")), int(evaluation.get("rows", 0))
        stats, seconds = self.stats(model, window_s, now=now)
        if not stats.requests:
            return None, 0
        return stats.figures(seconds)[metric], stats.requests

    def jobs(self) -> list[dict[str, Any]]:
        """Tuning jobs seen by this kernel, newest last, with their curves."""
        with self._lock:
            return [{**job, "points": list(job["points"])} for job in self._jobs.values()]

    def fusions(self) -> dict[str, dict[str, dict[str, float]]]:
        """Per fusion, per member: rows asked, answered, agreed with the fused answer."""
        with self._lock:
            return {
                name: {m: dict(f) for m, f in members.items()}
                for name, members in self._fusions.items()
            }

    def process(self) -> list[dict[str, Any]]:
        with self._lock:
            return [dict(sample) for sample in self._process]

    def evaluations(self) -> dict[str, dict[str, Any]]:
        with self._lock:
            return {model: dict(e) for model, e in self._evaluations.items()}
