"""The ``sqlite`` monitor sink: buckets and raw events in
``LLMOS_HOME/monitor/metrics.db``, downsampling, retention, a stuck writer,
several writers on one file, and the options; read back through
:class:`llmos.monitor.history.History`.

Most tests feed the sink events with hand-set times (and give it a clock),
so every expected count is exact; the kernel tests drive real ``table``
models (:mod:`tables`)."""

from __future__ import annotations

import contextlib
import json
import math
import random
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from llmos.config import check_table
from llmos.default_plugins.sqlite_sink import PLUGIN, SqliteSink
from llmos.errors import ConfigError
from llmos.monitor.history import History
from llmos.monitor.metrics import RequestStats, Sketch
from llmos.monitor.store import SCHEMA_VERSION, MetricsStore, db_path
from llmos.plugin.manager import DEFAULT_PLUGINS
from llmos.types import Capability, ClassifyRequest, MonitorEvent

from .tables import add, install, table_kernel

#: a time that is a whole number of 5-minute (coarse) buckets
T0 = 1_699_999_800.0
DAY = 86_400.0


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def request(t: float, model: str = "m@1", capability: str = "classify", **fields: Any):
    return MonitorEvent(
        kind="request",
        time=at(t),
        model=model,
        capability=capability,
        fields={"status": "ok", "requests": 1, **fields},
    )


def event(t: float, kind: str, model: str | None = None, **fields: Any) -> MonitorEvent:
    return MonitorEvent(kind=kind, time=at(t), model=model, fields=fields)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


@pytest.fixture
def write(home: Path) -> Callable[..., SqliteSink]:
    """``write(events, now=…, **options)``: a sink whose clock says ``now``
    takes the events, then closes (which writes everything)."""

    def run(events: Iterable[MonitorEvent], now: float = T0 + 3600, **options: Any) -> SqliteSink:
        sink = SqliteSink(options, clock=lambda: now)
        sink.open(db_path(home))
        for e in events:
            sink.emit(e)
        sink.close()
        return sink

    return run


def rows(home: Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with contextlib.closing(sqlite3.connect(db_path(home))) as con:
        return con.execute(sql, args).fetchall()


@pytest.fixture
def table_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from install(tmp_path / "site", monkeypatch)


# --------------------------------------------------------------------------
# Buckets and events
# --------------------------------------------------------------------------


def test_requests_fold_into_buckets_with_exact_counts(home: Path, write) -> None:
    sink = write(
        [
            request(T0 + 1, requests=2, latency_s=0.1, tokens_in=3, tokens_out=5, batch_size=2),
            request(T0 + 9.9, status="error", error="timeout", latency_s=0.3),
            request(T0 + 5, status="rejected", requests=4),
            request(T0 + 12, latency_s=0.2, tokens_out=7),
            request(T0 + 12, capability="chat", status="cancelled"),
            request(T0 + 3, model="other", latency_s=1.0),
        ]
    )
    assert (sink.written, sink.dropped, sink.errors) == (6, 0, 0)
    stored = rows(
        home,
        "SELECT start - ?, width, model, capability, requests, errors FROM requests"
        " ORDER BY model, capability, start",
        T0,
    )
    assert stored == [
        (10.0, 10.0, "m@1", "chat", 1, 0),
        (0.0, 10.0, "m@1", "classify", 7, 5),  # 2 ok + 1 error + 4 refused
        (10.0, 10.0, "m@1", "classify", 1, 0),
        (0.0, 10.0, "other", "classify", 1, 0),
    ]
    with History.of_home(home) as history:
        assert history.models() == ["m@1", "other"]
        assert history.resolve("m") == ["m@1"]
        (first, *_), *_ = [b for b in history.buckets(["m@1"], T0, T0 + 10)]
        assert first == T0
        total, capabilities, seconds = history.total(["m@1"], T0, T0 + 3600)
    assert capabilities == {"classify": 8, "chat": 1}
    assert seconds == 20.0  # from the first bucket's start to the last one's end
    assert (total.requests, total.ok, total.errors, total.rejected, total.cancelled) == (
        9,
        3,
        1,
        4,
        1,
    )
    assert total.errors_by_kind == {"queue_full": 4, "timeout": 1}
    assert (total.tokens_in, total.tokens_out, total.calls) == (3, 12, 4)


def test_percentiles_are_those_of_a_sketch_of_the_same_values(home: Path, write) -> None:
    rng = random.Random(7)
    latencies = [rng.lognormvariate(-3, 0.8) for _ in range(500)]
    write(request(T0 + i * 0.01, latency_s=v, queue_wait_s=v / 3) for i, v in enumerate(latencies))
    sketch = Sketch()
    for value in latencies:
        sketch.add(value)
    with History.of_home(home) as history:
        ((_, _, _, _, stats),) = list(history.buckets(["m@1"], T0, T0 + 10))
        figures = history.series(["m@1"], T0, T0 + 10, 10)[0]
    # what was stored is the sketch itself, bin for bin
    assert stats.latency_s.to_dict() == sketch.to_dict()
    for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        assert figures[f"latency_{label}_ms"] == sketch.quantile(q) * 1000
        exact = sorted(latencies)[math.ceil(q * len(latencies)) - 1]
        assert figures[f"latency_{label}_ms"] == pytest.approx(exact * 1000, rel=0.01)
    assert figures["requests"] == 500
    assert figures["rps"] == 50.0
    with History.of_home(home) as history:
        (cut,) = history.series(["m@1"], T0, T0 + 5, 10)  # a step cut short by the range
    assert (cut["requests"], cut["rps"]) == (500, 100.0)


def test_other_events_are_stored_as_json_rows(home: Path, write) -> None:
    sink = write(
        [
            event(T0 + 1, "alert.firing", "m@1", alert="slow", value=0.5),
            event(T0 + 2, "tuning.progress", "acme/t", job="j1", step=3, loss=0.25),
            event(T0 + 3, "process.sample", rss_mb=120.5),
            event(T0 + 4, "model.loaded", "m@1", load_s=0.1, provider="table"),
            event(T0 + 5, "eval.result", "m@1", score=0.9),
            event(T0 + 6, "noisy", "m@1"),
        ],
        exclude=["noisy"],
    )
    assert sink.written == 5
    with History.of_home(home) as history:
        assert history.events("alert.firing") == [
            {
                "time": T0 + 1,
                "kind": "alert.firing",
                "model": "m@1",
                "capability": None,
                "fields": {"alert": "slow", "value": 0.5},
            }
        ]
        assert history.events("tuning.progress")[0]["fields"] == {
            "job": "j1",
            "step": 3,
            "loss": 0.25,
        }
        assert [e["kind"] for e in history.events(["model.loaded", "eval.result"], model="m")] == [
            "model.loaded",
            "eval.result",
        ]
        assert history.events("model.loaded", model="other") == []
        assert history.events("noisy") == []
    assert rows(home, "PRAGMA user_version") == [(SCHEMA_VERSION,)]
    assert rows(home, "PRAGMA journal_mode") == [("wal",)]


def test_a_bucket_written_twice_is_merged_not_replaced(home: Path, write) -> None:
    # a late event, a second process, a restart: the same bucket again
    write([request(T0 + 1, latency_s=0.1)])
    write([request(T0 + 2, latency_s=0.2), request(T0 + 3, latency_s=0.3)])
    assert rows(home, "SELECT requests FROM requests") == [(3,)]
    with History.of_home(home) as history:
        ((_, _, _, _, stats),) = list(history.buckets(["m@1"], T0, T0 + 10))
    assert (stats.requests, stats.latency_s.count, stats.latency_s.high) == (3, 3.0, 0.3)


def test_closed_buckets_are_written_as_they_close_open_ones_at_close(home: Path) -> None:
    now = [T0 + 15.0]  # the bucket at T0 has closed, the one at T0 + 10 is open
    sink = SqliteSink({"flush_every": "0.02s"}, clock=lambda: now[0])
    sink.open(db_path(home))
    sink.emit(request(T0 + 1))
    sink.emit(request(T0 + 11))
    sink.emit(event(T0 + 12, "model.loaded", "m@1"))
    deadline = time.monotonic() + 10
    while sink.written < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sink.written == 2  # the closed bucket and the event, not the open bucket
    assert rows(home, "SELECT start - ? FROM requests", T0) == [(0.0,)]
    sink.close()
    assert sink.written == 3
    assert rows(home, "SELECT start - ? FROM requests ORDER BY start", T0) == [(0.0,), (10.0,)]


def test_stats_survive_their_dict_form() -> None:
    stats = RequestStats()
    stats.add({"status": "ok", "requests": 3, "latency_s": 0.2, "ttft_s": 0.05, "batch_size": 3})
    stats.add({"status": "error", "error": "boom", "latency_s": 1.5, "tokens_in": 4})
    again = RequestStats.from_dict(json.loads(json.dumps(stats.to_dict())))
    assert again.to_dict() == stats.to_dict()


# --------------------------------------------------------------------------
# Downsampling and retention
# --------------------------------------------------------------------------


def test_downsampling_merges_fine_buckets_into_coarse_ones(home: Path, write) -> None:
    rng = random.Random(3)
    # 30 minutes of traffic: 180 fine buckets, 6 coarse ones
    times = [T0 + i * 1.7 for i in range(1058)]
    latencies = [rng.lognormvariate(-2, 1) for _ in times]
    write(
        [request(t, latency_s=v) for t, v in zip(times, latencies, strict=True)],
        now=T0 + 1800,
    )
    assert rows(home, "SELECT count(*), sum(requests) FROM requests") == [(180, 1058)]

    # A day and 15 minutes later the first 15 minutes are past downsample_after.
    sink = write([], now=T0 + DAY + 900)
    assert sink.errors == 0
    stored = rows(home, "SELECT width, count(*), sum(requests) FROM requests GROUP BY width")
    assert stored == [(10.0, 90, 528), (300.0, 3, 530)]
    coarse = rows(home, "SELECT start - ? FROM requests WHERE width = 300 ORDER BY start", T0)
    assert coarse == [(0.0,), (300.0,), (600.0,)]

    with History.of_home(home) as history:
        merged, _, _ = history.total(["m@1"], T0, T0 + 900)
    old = Sketch()
    for t, v in zip(times, latencies, strict=True):
        if t < T0 + 900:
            old.add(v)
    assert merged.requests == 530
    # a merge loses nothing (the sum of values only differs in its last bits)
    got, want = merged.latency_s.to_dict(), old.to_dict()
    assert got.pop("total") == pytest.approx(want.pop("total"), rel=1e-12)
    assert got == want
    old_values = sorted(v for t, v in zip(times, latencies, strict=True) if t < T0 + 900)
    for q in (0.5, 0.95, 0.99):
        exact = old_values[math.ceil(q * len(old_values)) - 1]
        assert merged.latency_s.quantile(q) == pytest.approx(exact, rel=0.01)

    # The rest follows later; merging again into the same coarse bucket adds up.
    write([], now=T0 + 2 * DAY)
    assert rows(home, "SELECT width, count(*), sum(requests) FROM requests GROUP BY width") == [
        (300.0, 6, 1058)
    ]


def test_process_samples_are_thinned_to_one_per_coarse_bucket(home: Path, write) -> None:
    samples = [event(T0 + i * 5, "process.sample", rss_mb=float(i)) for i in range(240)]  # 20 min
    write(samples, now=T0 + 1300)
    assert rows(home, "SELECT count(*) FROM events") == [(240,)]
    write([], now=T0 + DAY + 1300)
    kept = rows(home, "SELECT time - ? FROM events ORDER BY time", T0)
    assert kept == [(0.0,), (300.0,), (600.0,), (900.0,)]


def test_retention_deletes_what_is_older_than_keep_days(home: Path, write) -> None:
    write(
        [
            request(T0 + 5),
            request(T0 + DAY + 5),
            event(T0 + 6, "alert.firing", "m@1"),
            event(T0 + DAY + 6, "alert.resolved", "m@1"),
        ],
        now=T0 + DAY + 10,
    )
    write([], now=T0 + 1.5 * DAY, keep_days=1, downsample_after="2d")
    assert rows(home, "SELECT start - ?, requests FROM requests", T0) == [(DAY, 1)]
    assert rows(home, "SELECT kind FROM events") == [("alert.resolved",)]


# --------------------------------------------------------------------------
# A stuck writer; several writers
# --------------------------------------------------------------------------


@pytest.fixture
def locked(home: Path) -> Iterator[sqlite3.Connection]:
    """The database held by another connection's write lock."""
    MetricsStore(db_path(home)).close()
    con = sqlite3.connect(db_path(home), isolation_level=None)
    con.execute("BEGIN EXCLUSIVE")
    yield con
    if con.in_transaction:
        con.execute("ROLLBACK")
    con.close()


def test_a_stuck_writer_drops_and_counts_but_never_blocks_emit(
    home: Path, locked: sqlite3.Connection
) -> None:
    sink = SqliteSink({"queue_size": 10, "busy_timeout": "0.2s", "flush_every": "0.01s"})
    sink.open(db_path(home))
    emitted = 0
    deadline = time.monotonic() + 30
    # The writer spends its time waiting on the lock; emit keeps returning at
    # once and the queue overflows (bounded: both loops end).
    while (sink.dropped < 100 or sink.errors < 2) and time.monotonic() < deadline:
        sink.emit(request(T0 + emitted % 50))
        emitted += 1
        assert sink.queued <= 10
    assert sink.dropped >= 100 and sink.errors >= 2
    assert sink.written == 0
    assert rows(home, "SELECT count(*) FROM requests") == [(0,)]

    locked.execute("ROLLBACK")
    sink.close()
    # Nothing that was accepted is lost once the file is free again.
    assert sink.written == emitted - sink.dropped
    assert rows(home, "SELECT sum(requests) FROM requests") == [(sink.written,)]


def test_an_unwritable_folder_is_counted_not_raised(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    sink = SqliteSink({"flush_every": "0.01s"})
    sink.open(blocker / "monitor" / "metrics.db")
    sink.emit(request(T0))
    sink.close()
    assert sink.errors >= 1 and sink.written == 0


WRITER = """
import sys
from datetime import UTC, datetime
from llmos.default_plugins.sqlite_sink import SqliteSink
from llmos.types import MonitorEvent

path, start, count = sys.argv[1], float(sys.argv[2]), int(sys.argv[3])
sink = SqliteSink({"flush_every": "0.01s", "bucket": "1s", "coarse_bucket": "1m"},
                  clock=lambda: start + 10_000)
sink.open(path)
for i in range(count):
    when = datetime.fromtimestamp(start + (i % 200) * 0.1, UTC)
    sink.emit(MonitorEvent(kind="request", time=when, model="m@1", capability="classify",
                           fields={"status": "ok", "requests": 1, "latency_s": 0.001 * (i % 97)}))
    if i % 500 == 0:
        __import__("time").sleep(0.01)  # let both writers flush many times
sink.close()
assert sink.dropped == 0 and sink.errors == 0, (sink.dropped, sink.errors)
print(sink.written)
"""


def test_two_processes_write_one_file(home: Path) -> None:
    """Another process writes the same buckets at the same time: each bucket
    ends as one row holding both processes' rows."""
    path = db_path(home)
    MetricsStore(path).close()
    script = home / "writer.py"
    script.write_text(textwrap.dedent(WRITER))
    other = subprocess.Popen(
        [sys.executable, str(script), str(path), str(T0), "6000"],
        stdout=subprocess.PIPE,
        text=True,
    )
    sink = SqliteSink(
        {"flush_every": "0.01s", "bucket": "1s", "coarse_bucket": "1m"}, clock=lambda: T0 + 10_000
    )
    sink.open(path)
    for i in range(4000):
        sink.emit(request(T0 + (i % 200) * 0.1, latency_s=0.001 * (i % 97)))
        if i % 500 == 0:
            time.sleep(0.01)
    sink.close()
    out, _ = other.communicate(timeout=60)
    assert other.returncode == 0
    assert int(out) == 6000 and sink.written == 4000 and sink.errors == 0
    # 200 distinct times, 10 per 1-second bucket: 20 buckets, one row each
    assert rows(home, "SELECT count(*), sum(requests) FROM requests") == [(20, 10_000)]
    with History.of_home(home) as history:
        total, _, _ = history.total(["m@1"], T0, T0 + 20)
    assert total.latency_s.count == 10_000


def test_two_kernels_write_one_file(table_module: Any, home: Path) -> None:
    fast = [f'plugins."{PLUGIN}".flush_every=0.05']
    first = table_kernel(home, fast)
    add(first, "a", default={"pos": 1.0})
    first.start()
    second = table_kernel(home, fast)
    second.start()
    try:
        for _ in range(30):
            first.call("a", Capability.CLASSIFY, [ClassifyRequest(text="x")])
            second.call("a", Capability.CLASSIFY, [ClassifyRequest(text="y")] * 2)
    finally:
        first.stop()
        second.stop()
    sinks = [k.bus.sinks["sqlite"] for k in (first, second)]
    assert all(isinstance(s, SqliteSink) and s.errors == 0 and s.dropped == 0 for s in sinks)
    with History.of_home(home) as history:
        (model,) = history.resolve("a")
        total, capabilities, _ = history.total([model], 0, time.time() + 60)
        loaded = history.events("model.loaded", model="a")
        kinds = [e["kind"] for e in history.events(["kernel.started", "kernel.stopped"])]
    assert model == "a@1"
    assert (total.requests, total.ok, total.calls) == (90, 90, 60)
    assert capabilities == {"classify": 90}
    assert len(loaded) == 2  # each kernel loaded the model once
    assert sorted(kinds) == ["kernel.started"] * 2 + ["kernel.stopped"] * 2
    # one row per bucket, however many writers
    distinct = "SELECT count(*) FROM (SELECT DISTINCT model, capability, start FROM requests)"
    assert rows(home, distinct) == rows(home, "SELECT count(*) FROM requests")


def test_a_locked_file_never_slows_or_fails_a_request(
    table_module: Any, home: Path, locked: sqlite3.Connection
) -> None:
    options = [f'plugins."{PLUGIN}".queue_size=5', f'plugins."{PLUGIN}".busy_timeout=60']
    kernel = table_kernel(home, options)
    add(kernel, "a", default={"pos": 1.0})
    kernel.start()
    try:
        sink = kernel.bus.sinks["sqlite"]
        assert isinstance(sink, SqliteSink)
        for _ in range(200):
            (result,) = kernel.call("a", Capability.CLASSIFY, [ClassifyRequest(text="x")])
            assert result.label == "pos"
        deadline = time.monotonic() + 10
        while sink.dropped < 150 and time.monotonic() < deadline:
            time.sleep(0.01)  # the bus hands the events over on its own thread
        # the writer waits on the lock; the requests did not
        assert sink.dropped >= 150 and sink.written == 0 and sink.queued <= 5
    finally:
        locked.execute("ROLLBACK")
        kernel.stop()
    assert sink.errors == 0  # it waited, within the busy timeout, and then wrote
    # what was kept is in the file: request rows in buckets, the rest as events
    ((in_buckets, in_events),) = rows(
        home, "SELECT (SELECT coalesce(sum(requests), 0) FROM requests), count(*) FROM events"
    )
    assert sink.written == in_buckets + in_events
    assert sink.written + sink.dropped >= 200


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"keep_day": 3}, "unknown key(s) keep_day; known: b"),
        ({"keep_day": 3}, "(did you mean keep_days?)"),
        ({"bucket": "fast"}, "bucket: 'fast' is not a duration"),
        ({"bucket": 0}, "bucket must be between 0.001 and 3600 seconds, got 0"),
        ({"flush_every": "1h"}, "flush_every must be between 0.001 and 300 seconds"),
        ({"keep_days": 0}, "keep_days must be a number of days > 0"),
        ({"keep_days": "7"}, "keep_days must be a number of days > 0 (at most 3650), got '7'"),
        ({"queue_size": 1.5}, "queue_size must be an integer from 1 to 10000000, got 1.5"),
        ({"queue_size": True}, "queue_size must be an integer"),
        ({"exclude": "request"}, "exclude must be a list of event kinds"),
        ({"bucket": "7s"}, "coarse_bucket (300 s) must be a whole multiple of bucket (7 s)"),
    ],
)
def test_bad_options_are_refused_with_the_reason(options: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        SqliteSink(options)
    assert message in caught.value.message
    assert caught.value.message.startswith(f'[plugins."{PLUGIN}"]')


def test_good_options_are_taken() -> None:
    sink = SqliteSink(
        {
            "bucket": "5s",
            "coarse_bucket": "1m",
            "downsample_after": "12h",
            "keep_days": 2.5,
            "flush_every": 1,
            "busy_timeout": "250ms",
            "queue_size": 50,
            "exclude": ["process.sample"],
        }
    )
    s = sink.settings
    assert (s.bucket, s.coarse_bucket, s.downsample_after, s.keep_s) == (5, 60, 43200, 216000)
    assert (s.flush_every, s.busy_timeout, s.queue_size, s.exclude) == (
        1,
        0.25,
        50,
        ("process.sample",),
    )
    sink.emit(event(T0, "process.sample"))
    sink.emit(event(T0, "kernel.started"))
    assert sink.queued == 1
    sink.close()  # never opened: what was queued is counted as lost
    assert sink.dropped == 1


def test_check_table_names_the_nearest_known_key() -> None:
    with pytest.raises(ConfigError, match=r"known: alpha, beta \(did you mean beta\?\)$"):
        check_table("[x]", {"betta": 1}, ("alpha", "beta"))
    with pytest.raises(ConfigError, match=r"known: alpha, beta$"):
        check_table("[x]", {"zzz": 1}, ("alpha", "beta"))


def test_a_kernel_with_a_bad_option_starts_without_the_sink(table_module: Any, home: Path) -> None:
    kernel = table_kernel(home, [f'plugins."{PLUGIN}".keep_days=-1'])
    kernel.start()
    try:
        assert "sqlite" not in kernel.bus.sinks
        (info,) = [p for p in kernel.plugins.plugins(include_defaults=True) if p.name == PLUGIN]
        assert info.status == "failed" and "keep_days must be a number of days > 0" in info.error
    finally:
        kernel.stop()
    assert PLUGIN in DEFAULT_PLUGINS
    assert not db_path(home).exists()


def test_a_newer_schema_is_refused(home: Path) -> None:
    MetricsStore(db_path(home)).close()
    with sqlite3.connect(db_path(home)) as con:
        con.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    with pytest.raises(ConfigError, match="newer than this llmos understands"):
        MetricsStore(db_path(home))
    with pytest.raises(ConfigError, match="upgrade llmos"):
        History.of_home(home)
