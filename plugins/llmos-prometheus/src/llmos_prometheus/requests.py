"""The request metrics, kept as plain numbers and exposed by a collector.

A ``request`` event comes with every model call, so this is the sink's hot
path. prometheus_client's ``Counter``/``Histogram`` take a lock per update
and scan the buckets in Python; a daemon answering a tiny model at a
thousand calls a second spent ~25 µs an event there. Here an event is a few
dict updates and one ``bisect`` per figure under one lock (only the bus's
thread writes), and the cumulative buckets are summed at scrape time, when
:meth:`RequestMetrics.collect` builds the metric families — the same names,
types, labels and values prometheus_client's own objects would expose.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Iterator, Mapping, Sequence

from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

__all__ = ["RequestMetrics"]

_CALL = ["model", "capability"]
#: histogram name → (help, bucket set, per row (True) or per call)
_HISTOGRAMS: dict[str, tuple[str, str, bool]] = {
    "llmos_request_duration_seconds": (
        "seconds from a request's arrival at its model's queue to its answer,"
        " one observation per row",
        "seconds",
        True,
    ),
    "llmos_queue_wait_seconds": (
        "seconds a request waited in its model's queue, one observation per row",
        "seconds",
        True,
    ),
    "llmos_time_to_first_token_seconds": (
        "seconds from a stream's arrival to its first chunk",
        "seconds",
        True,
    ),
    "llmos_model_call_duration_seconds": (
        "seconds the model itself took for the call that answered a request,"
        " one observation per call",
        "seconds",
        False,
    ),
    "llmos_batch_size": (
        "requests in the model call that answered a request, one observation per call",
        "batch",
        False,
    ),
}
#: event field of each histogram
_FIELDS = {
    "llmos_request_duration_seconds": "latency_s",
    "llmos_queue_wait_seconds": "queue_wait_s",
    "llmos_time_to_first_token_seconds": "ttft_s",
    "llmos_model_call_duration_seconds": "model_s",
    "llmos_batch_size": "batch_size",
}


class _Histogram:
    """Non-cumulative bucket counts (the last is +Inf), the sum."""

    __slots__ = ("counts", "total")

    def __init__(self, size: int) -> None:
        self.counts = [0.0] * (size + 1)
        self.total = 0.0


class RequestMetrics(Collector):
    """Requests, errors, latency histograms and tokens per model and capability."""

    def __init__(self, buckets: Sequence[float], batch_buckets: Sequence[float]) -> None:
        self._bounds = {"seconds": tuple(buckets), "batch": tuple(batch_buckets)}
        self._lock = threading.Lock()
        self.requests: dict[tuple[str, str, str], float] = {}
        self.errors: dict[tuple[str, str, str], float] = {}
        self.tokens: dict[tuple[str, str], float] = {}
        self.histograms: dict[str, dict[tuple[str, str], _Histogram]] = {
            name: {} for name in _HISTOGRAMS
        }
        self._plan = [
            (name, _FIELDS[name], self._bounds[kind], per_row)
            for name, (_, kind, per_row) in _HISTOGRAMS.items()
        ]

    def add(
        self,
        call: tuple[str, str],
        rows: int,
        status: str,
        error_kind: str | None,
        figures: Mapping[str, float | None],
        tokens_in: float | None,
        tokens_out: float | None,
    ) -> None:
        """Fold one call in: ``figures`` maps event fields to checked numbers."""
        with self._lock:
            key = (*call, status)
            self.requests[key] = self.requests.get(key, 0.0) + rows
            if error_kind is not None:
                key = (*call, error_kind)
                self.errors[key] = self.errors.get(key, 0.0) + rows
            for name, field, bounds, per_row in self._plan:
                value = figures.get(field)
                if value is None:
                    continue
                series = self.histograms[name]
                histogram = series.get(call)
                if histogram is None:
                    histogram = series[call] = _Histogram(len(bounds))
                weight = rows if per_row else 1
                histogram.counts[bisect.bisect_left(bounds, value)] += weight
                histogram.total += value * weight
            for direction, count in (("in", tokens_in), ("out", tokens_out)):
                if count:
                    key2 = (call[0], direction)
                    self.tokens[key2] = self.tokens.get(key2, 0.0) + count

    def collect(self) -> Iterator[Metric]:
        with self._lock:  # a consistent copy; the bus waits microseconds
            requests = dict(self.requests)
            errors = dict(self.errors)
            tokens = dict(self.tokens)
            histograms = {
                name: {k: (list(h.counts), h.total) for k, h in series.items()}
                for name, series in self.histograms.items()
            }
        yield _counter(
            "llmos_requests",
            "request rows asked of a model (a batch of n texts is n), by how they ended:"
            " ok, error, cancelled (a stream the client left) or rejected (queue full)",
            [*_CALL, "status"],
            requests,
        )
        yield _counter(
            "llmos_request_errors",
            "request rows that failed or were rejected, by the error's type"
            " (queue_full for a rejection)",
            [*_CALL, "kind"],
            errors,
        )
        for name, (doc, kind, _) in _HISTOGRAMS.items():
            bounds = self._bounds[kind]
            histogram = HistogramMetricFamily(name, doc, labels=_CALL)
            for labels, (counts, total) in sorted(histograms[name].items()):
                cumulative, running = [], 0.0
                for bound, count in zip((*bounds, float("inf")), counts, strict=True):
                    running += count
                    cumulative.append((floatToGoString(bound), running))
                histogram.add_metric(list(labels), cumulative, total)
            yield histogram
        yield _counter(
            "llmos_tokens",
            "tokens read (direction=in) and written (direction=out) by a model",
            ["model", "direction"],
            tokens,
        )


def _counter(
    name: str, doc: str, labels: list[str], values: Mapping[tuple[str, ...], float]
) -> CounterMetricFamily:
    family = CounterMetricFamily(name, doc, labels=labels)
    for key, value in sorted(values.items()):
        family.add_metric(list(key), value)
    return family
