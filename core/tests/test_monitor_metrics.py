"""Metric windows: sketches, request buckets, windows, series and single
values, every expected figure computed by hand."""

from __future__ import annotations

import math
import random
import threading
from datetime import UTC, datetime
from pathlib import Path

import pytest

from llmos.config import load_config
from llmos.monitor.metrics import (
    SKETCH_ACCURACY,
    MetricWindows,
    RequestStats,
    Sketch,
    parse_duration,
)
from llmos.runtime.kernel import Kernel
from llmos.testing import EventRecorder
from llmos.types import MonitorEvent


def exact(values: list[float], q: float) -> float:
    """The value the sketch aims at: the nearest rank, ceil(q*n)."""
    return sorted(values)[max(math.ceil(q * len(values)) - 1, 0)]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_sketch_percentiles_are_within_one_percent(seed: int) -> None:
    rng = random.Random(seed)
    # latencies from 50 µs to 20 s, log-normal: the spread llmos sees
    values = [math.exp(rng.gauss(-3, 2)) for _ in range(5000)]
    sketch = Sketch()
    for value in values:
        sketch.add(value)
    for q in (0.0, 0.5, 0.9, 0.95, 0.99, 1.0):
        got, want = sketch.quantile(q), exact(values, q)
        assert got is not None
        assert abs(got - want) <= SKETCH_ACCURACY * want * 1.0001, (q, got, want)
    assert sketch.count == 5000
    assert sketch.mean == pytest.approx(sum(values) / 5000)
    assert sketch.low == min(values) and sketch.high == max(values)


def test_sketch_merge_equals_one_sketch_of_all_values_and_round_trips() -> None:
    rng = random.Random(7)
    a_values = [rng.uniform(0.001, 0.1) for _ in range(300)]
    b_values = [rng.uniform(0.5, 2.0) for _ in range(100)]
    a, b, both = Sketch(), Sketch(), Sketch()
    for v in a_values:
        a.add(v)
        both.add(v)
    for v in b_values:
        b.add(v)
        both.add(v)
    a.merge(b)
    for q in (0.25, 0.5, 0.75, 0.95):
        assert a.quantile(q) == both.quantile(q)
    copy = Sketch.from_dict(a.to_dict())
    assert copy.quantile(0.95) == a.quantile(0.95)
    assert copy.count == 400 and copy.total == pytest.approx(a.total)


def test_sketch_weights_zeros_and_empty() -> None:
    sketch = Sketch()
    assert sketch.quantile(0.5) is None and sketch.mean is None
    sketch.add(0.0, 3)
    sketch.add(1.0, 1)
    sketch.add(float("nan"))  # ignored
    assert sketch.count == 4
    assert sketch.quantile(0.5) == 0.0  # ranks 0..2 are zeros
    assert sketch.quantile(1.0) == 1.0


def test_request_stats_fold_rows_errors_tokens_and_batches() -> None:
    stats = RequestStats()
    stats.add(
        {
            "status": "ok",
            "requests": 4,
            "latency_s": 0.2,
            "queue_wait_s": 0.05,
            "model_s": 0.15,
            "batch_size": 4,
            "tokens_in": 40,
            "tokens_out": 80,
        }
    )
    stats.add({"status": "error", "requests": 2, "latency_s": 0.1, "error": "Unavailable"})
    stats.add({"status": "rejected", "requests": 1, "error": "queue full"})
    stats.add({"status": "cancelled", "requests": 1, "latency_s": 1.0, "ttft_s": 0.3})
    assert (stats.requests, stats.ok, stats.errors, stats.rejected, stats.cancelled) == (
        8,
        4,
        2,
        1,
        1,
    )
    assert stats.calls == 3  # a refused request never reached the model
    assert dict(stats.errors_by_kind) == {"Unavailable": 2, "queue_full": 1}
    figures = stats.figures(seconds=2.0)
    assert figures["errors"] == 3
    assert figures["error_rate"] == pytest.approx(3 / 8)
    assert figures["rps"] == pytest.approx(4.0)
    assert figures["tokens_out_per_s"] == pytest.approx(40.0)
    assert figures["busy"] == pytest.approx(0.075)
    assert figures["batch_size_mean"] == 4 and figures["batch_size_max"] == 4
    # Latencies are per row: four rows at 200 ms, two at 100 ms, one at 1 s.
    assert figures["latency_p50_ms"] == pytest.approx(200, rel=0.01)
    assert figures["latency_p99_ms"] == pytest.approx(1000, rel=0.01)
    assert figures["ttft_p50_ms"] == pytest.approx(300, rel=0.01)
    back = RequestStats.from_dict(stats.to_dict())
    assert back.figures(2.0) == figures


def request(model: str, when: float, **fields: object) -> MonitorEvent:
    return MonitorEvent(
        kind="request",
        time=datetime.fromtimestamp(when, UTC),
        model=model,
        capability=str(fields.pop("capability", "classify")),
        fields={"status": "ok", "requests": 1, **fields},
    )


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_windows_summary_series_and_value() -> None:
    clock = Clock(10_000.0)
    windows = MetricWindows(bucket_s=10, keep_s=600, clock=clock)
    windows.started = 0.0
    # 30 s ago: 3 rows at 100 ms; 5 s ago: 1 row at 300 ms and 1 error.
    for _ in range(3):
        windows.observe(request("a", 9_970.0, latency_s=0.1))
    windows.observe(request("a", 9_995.0, latency_s=0.3))
    windows.observe(request("a", 9_995.0, status="error", error="Boom", latency_s=0.01))
    windows.observe(request("b", 9_995.0, latency_s=0.2, capability="embed"))
    windows.observe(request("a", 9_000.0, latency_s=9.0))  # outside a minute

    summary = windows.summary(60)
    a = summary["models"]["a"]
    assert a["requests"] == 5 and a["errors"] == 1
    assert a["rps"] == pytest.approx(5 / 60)
    assert a["latency_p50_ms"] == pytest.approx(100, rel=0.01)
    assert a["latency_p99_ms"] == pytest.approx(300, rel=0.01)
    assert summary["models"]["b"]["capabilities"] == {"embed": 1}

    value, n = windows.value("latency_p95_ms", "a", 20)
    assert n == 2 and value == pytest.approx(300, rel=0.01)
    assert windows.value("error_rate", "a", 20) == (0.5, 2)
    assert windows.value("rps", "nobody", 60) == (None, 0)
    with pytest.raises(ValueError, match="unknown metric"):
        windows.value("latency", "a", 60)

    series = windows.series("a", window_s=60, step_s=10)
    assert series["step_s"] == 10 and len(series["points"]) == 6
    # The last point is the bucket now running (10 000 to 10 010).
    assert [p["requests"] for p in series["points"]] == [0, 0, 3, 0, 2, 0]
    assert series["points"][-1]["time"] == 10_010.0
    together = windows.series(None, window_s=60, step_s=30)
    assert [p["requests"] for p in together["points"]] == [3, 3]


def test_windows_keep_only_keep_s() -> None:
    clock = Clock(100_000.0)
    windows = MetricWindows(bucket_s=10, keep_s=60, clock=clock)
    windows.observe(request("a", 99_000.0))
    windows.observe(request("a", 100_000.0))  # prunes what is older than 60 s
    assert sum(len(b) for b in windows._requests.values()) == 1


def test_windows_track_jobs_fusions_process_and_evaluations() -> None:
    windows = MetricWindows(bucket_s=1, keep_s=60)
    for step, loss in enumerate([0.9, 0.7, 0.5], start=1):
        windows.observe(
            MonitorEvent(
                kind="tuning.progress",
                model="t",
                fields={"job": "j1", "step": step, "loss": loss, "phase": "train"},
            )
        )
    windows.observe(
        MonitorEvent(kind="tuning.job", model="t", fields={"job": "j1", "state": "succeeded"})
    )
    job = windows.jobs()[0]
    assert job["state"] == "succeeded"
    assert [p["loss"] for p in job["points"]] == [0.9, 0.7, 0.5]
    assert "phase" not in job["points"][0]  # figures only

    fields = {"members": {"m1": {"asked": 2, "answered": 2, "agreed": 1, "latency_s": 0.5}}}
    windows.observe(MonitorEvent(kind="fusion.call", model="f", fields=fields))
    windows.observe(MonitorEvent(kind="fusion.call", model="f", fields=fields))
    assert windows.fusions()["f"]["m1"] == {
        "asked": 4,
        "answered": 4,
        "agreed": 2,
        "latency_s_max": 0.5,
    }
    windows.observe(MonitorEvent(kind="process.sample", fields={"rss_mb": 100.0}))
    windows.observe(MonitorEvent(kind="process.sample", fields={"rss_mb": 200.0}))
    assert windows.value("rss_mb", None, 60) == (150.0, 2)
    windows.observe(MonitorEvent(kind="eval.result", model="t", fields={"score": 0.8, "rows": 50}))
    assert windows.value("accuracy", "t", 60) == (0.8, 50)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        (30, 30.0),
        (2.5, 2.5),
        ("30s", 30.0),
        ("5m", 300.0),
        ("1h", 3600.0),
        ("2d", 172800.0),
        ("250ms", 0.25),
        ("12", 12.0),
    ],
)
def test_parse_duration(text: object, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("bad", ["5 minutes", "m", "-1s", True, None, "1e999s", "nan"])
def test_parse_duration_refuses(bad: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(bad, "window")


def test_finished_buckets_are_handed_on_once_and_late_calls_apart() -> None:
    clock = Clock(1_000.0)
    windows = MetricWindows(bucket_s=10, keep_s=600, clock=clock)
    windows.observe(request("a", 985.0, latency_s=0.1))
    windows.observe(request("a", 986.0, latency_s=0.3))
    windows.observe(request("b", 995.0, latency_s=0.2, capability="embed"))
    windows.observe(request("a", 1_000.5, latency_s=0.1))  # the bucket running now
    # 1 s of grace: the bucket that ended at 1 000 is not handed on before 1 001.
    (first,) = windows.close_buckets(now=1_000.5)
    assert (first.kind, first.model, first.fields["start"], first.fields["width"]) == (
        "request.bucket",
        "a",
        980.0,
        10.0,
    )
    assert first.time.timestamp() == 990.0
    stats = RequestStats.from_dict(first.fields["stats"])
    assert stats.requests == 2 and stats.latency_s.quantile(1.0) == 0.3
    done = windows.close_buckets(now=1_001.0)
    assert [(e.model, e.capability, e.fields["start"]) for e in done] == [("b", "embed", 990.0)]
    assert windows.close_buckets(now=1_005.0) == []  # each bucket once
    windows.observe(request("b", 996.0, latency_s=0.4, capability="embed"))  # late
    (late,) = windows.close_buckets(now=1_006.0)
    assert late.fields["start"] == 990.0
    assert RequestStats.from_dict(late.fields["stats"]).requests == 1  # the late call alone
    assert windows.summary(60)["models"]["b"]["requests"] == 2  # the windows have both
    # At the end, the running bucket too.
    (running,) = windows.close_buckets(now=math.inf)
    assert (running.model, running.fields["start"]) == ("a", 1_000.0)


def test_a_kernel_hands_every_call_on_in_request_buckets(tmp_path: Path) -> None:
    recorder = EventRecorder()
    kernel = Kernel(load_config(env={"LLMOS_HOME": str(tmp_path), "LLMOS_LOAD_PLUGINS": ""}))
    kernel.load_plugins()
    kernel.plugins.register(recorder, "recorder")
    kernel.start()
    for n in range(5):
        kernel.emit(request("m@1", datetime.now(UTC).timestamp(), requests=n + 1))
    kernel.stop()
    sums = [RequestStats.from_dict(e.fields["stats"]) for e in recorder.of("request.bucket")]
    assert sum(s.requests for s in sums) == 15 and sum(s.calls for s in sums) == 5


def test_calls_still_on_the_bus_at_stop_reach_the_last_buckets(tmp_path: Path) -> None:
    """The bus hands events out on its own thread: calls emitted just before a
    stop used to be folded after the last buckets were handed on, and lost
    (seen under load, when the dispatcher lags)."""
    recorder = EventRecorder()
    kernel = Kernel(load_config(env={"LLMOS_HOME": str(tmp_path), "LLMOS_LOAD_PLUGINS": ""}))
    kernel.load_plugins()
    kernel.plugins.register(recorder, "recorder")
    kernel.start()
    held = threading.Event()
    kernel.bus.observers.insert(0, lambda event: held.wait(30))  # a dispatcher that lags
    for n in range(5):
        kernel.emit(request("m@1", datetime.now(UTC).timestamp(), requests=n + 1))
    stopper = threading.Thread(target=kernel.stop)
    stopper.start()
    stopper.join(0.3)  # the stop is under way while the calls wait on the bus
    held.set()
    stopper.join(30)
    assert not stopper.is_alive()
    sums = [RequestStats.from_dict(e.fields["stats"]) for e in recorder.of("request.bucket")]
    assert sum(s.requests for s in sums) == 15 and sum(s.calls for s in sums) == 5
