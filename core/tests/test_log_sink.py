"""The ``log`` sink: events as structlog lines, model calls summed per model."""

from __future__ import annotations

import math
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from llmos.default_plugins.log_sink import LogSink
from llmos.errors import ConfigError
from llmos.monitor.metrics import MetricWindows
from llmos.types import MonitorEvent


class Lines:
    """A structlog-shaped logger that keeps each line as a dict."""

    def __init__(self) -> None:
        self.lines: list[dict[str, Any]] = []

    def __getattr__(self, level: str) -> Callable[..., None]:
        def write(event: str, **fields: Any) -> None:
            self.lines.append({"event": event, "log_level": level, **fields})

        return write


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def call(model: str, latency_s: float, at: float = 0.0, **fields: object) -> MonitorEvent:
    """A call's event, ``at`` seconds after a fixed moment."""
    return MonitorEvent(
        kind="request",
        time=datetime.fromtimestamp(1_800_000_000 + at, UTC),
        model=model,
        capability="chat",
        fields={"status": "ok", "requests": 1, "latency_s": latency_s, **fields},
    )


def buckets(*events: MonitorEvent) -> list[MonitorEvent]:
    """The ``request.bucket`` events the kernel's windows make of ``events``."""
    windows = MetricWindows(bucket_s=1)
    for event in events:
        windows.observe(event)
    return windows.close_buckets(math.inf)


def test_calls_are_summed_per_model_every_summary_every() -> None:
    clock = Clock()
    out = Lines()
    sink = LogSink({"summary_every": "10s"}, clock=clock, logger=out)
    logs = out.lines
    # a@1's calls fall in two of the windows' 1 s buckets: the summary merges both
    calls = [
        call("a@1", latency, at=at, tokens_out=10)
        for latency, at in ((0.1, 0.0), (0.2, 0.5), (0.3, 1.2), (0.4, 1.7))
    ]
    calls.append(call("b@1", 1.0, status="error", error="timeout"))
    for event in calls:
        sink.emit(event)  # a call alone is not logged: its bucket is
    assert logs == []
    sums = buckets(*calls)
    assert [e.model for e in sums] == ["a@1", "b@1", "a@1"]
    for event in sums:
        sink.emit(event)
    sink.emit(MonitorEvent(kind="model.loaded", model="a@1", fields={"load_s": 2.0}))
    assert [line["event"] for line in logs] == ["monitor.model.loaded"]
    clock.now = 10.0
    sink.emit(MonitorEvent(kind="process.sample", fields={"rss_mb": 1.0}))  # a tick
    lines = [line for line in logs if line["event"] == "monitor.requests"]
    assert [line["model"] for line in lines] == ["a@1", "b@1"]
    a, b = lines
    assert a["requests"] == 4 and a["window_s"] == 10.0 and "errors_by_kind" not in a
    assert a["rps"] == 0.4 and a["tokens_out_per_s"] == 4.0
    assert a["latency_p50_ms"] == pytest.approx(200, rel=0.01)
    assert a["latency_p99_ms"] == pytest.approx(400, rel=0.01)
    assert b["errors"] == 1 and b["errors_by_kind"] == {"timeout": 1}
    assert not any(line["event"] == "monitor.process.sample" for line in logs)
    out.lines.clear()
    clock.now = 25.0
    for event in buckets(call("a@1", 0.5)):
        sink.emit(event)
    sink.close()  # what is pending is logged at close
    assert [(line["event"], line["requests"], line["window_s"]) for line in logs] == [
        ("monitor.requests", 1, 15.0)
    ]


def test_each_logs_every_call_and_off_none() -> None:
    out = Lines()
    each = LogSink({"requests": "each", "level": "debug", "exclude": []}, logger=out)
    off = LogSink({"requests": "off"}, logger=out)
    logs = out.lines
    each.emit(call("a@1", 0.1))
    for event in buckets(call("a@1", 0.1)):
        each.emit(event)  # sums are not logged when every call is
    each.emit(MonitorEvent(kind="process.sample", fields={"rss_mb": 1.0}))
    for event in [call("a@1", 0.1), *buckets(call("a@1", 0.1))]:
        off.emit(event)
    off.close()
    assert [(line["event"], line["log_level"]) for line in logs] == [
        ("monitor.request", "debug"),
        ("monitor.process.sample", "debug"),
    ]
    assert logs[0]["model"] == "a@1" and logs[0]["fields"]["latency_s"] == 0.1


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"levle": "info"}, "unknown key"),
        ({"level": "loud"}, "level must be one of"),
        ({"requests": "some"}, "requests must be one of"),
        ({"exclude": "process.sample"}, "exclude must be a list"),
        ({"summary_every": "soon"}, "not a duration"),
    ],
)
def test_bad_options_are_refused(options: dict[str, object], message: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=message):
        LogSink(options)
