"""The ``sqlite`` monitor sink: the monitor's history in
``LLMOS_HOME/monitor/metrics.db``, which ``llmos report`` reads.

``emit`` only puts the event on the sink's own bounded queue (a full queue
drops the event and counts it: it never blocks the bus, so never a request).
One writer thread folds ``request`` events into a
:class:`~llmos.monitor.metrics.RequestStats` per bucket (``bucket``, 10 s),
model and capability, and every few seconds (``flush_every``) writes the
buckets that have closed, and every other event as a raw JSON row (alerts,
tuning progress and job states, evaluation results, models loaded and
unloaded, process samples, fusion calls …), in one transaction. Every
``coarse_bucket`` it downsamples — fine buckets older than
``downsample_after`` (a day) are merged into ``coarse_bucket`` ones (5 min),
process samples thinned to one per coarse bucket — and deletes what is older
than ``keep_days`` (7).

Several processes (the daemon, CLI kernels) may write one file: WAL, a busy
timeout, and every write in a ``BEGIN IMMEDIATE`` transaction that merges a
bucket another process already wrote (``RequestStats.merge``) rather than
replacing it. A flush that fails (the file locked past the busy timeout, a
full disk) keeps its rows for the next one, bounded; the sink's ``written``,
``dropped`` and ``errors`` counters say how it went.

Options, in ``[plugins."llmos.default_plugins.sqlite_sink"]``: ``bucket``,
``coarse_bucket``, ``downsample_after``, ``flush_every``, ``busy_timeout``
(durations: seconds or ``"10s"``, ``"5m"``, ``"1d"``), ``keep_days``,
``queue_size``, ``exclude`` (event kinds not stored).
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog

from llmos.config import check_table
from llmos.errors import ConfigError
from llmos.monitor.metrics import RequestStats, parse_duration
from llmos.monitor.store import (
    SCHEMA_VERSION,
    BucketKey,
    EventRow,
    MetricsStore,
    db_path,
    event_row,
)
from llmos.plugin import hookimpl
from llmos.types import MonitorEvent, MonitorSinkSpec, PluginContext

__all__ = [
    "PLUGIN",
    "SCHEMA_VERSION",
    "MetricsStore",
    "SqliteSettings",
    "SqliteSink",
    "db_path",
    "settings",
]

log = structlog.get_logger("llmos.monitor")

#: the plugin's name: its options are the ``[plugins."<PLUGIN>"]`` table
PLUGIN = "llmos.default_plugins.sqlite_sink"
WHERE = f'[plugins."{PLUGIN}"]'
DAY_S = 86_400.0


# --------------------------------------------------------------------------
# Options
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class SqliteSettings:
    """The checked options of the sink (durations in seconds)."""

    #: width of the buckets written as traffic comes
    bucket: float = 10.0
    #: width of the buckets fine ones are merged into (a multiple of ``bucket``)
    coarse_bucket: float = 300.0
    #: fine buckets older than this are merged into coarse ones
    downsample_after: float = DAY_S
    #: rows older than this many days are deleted
    keep_days: float = 7.0
    #: seconds between writes (closed buckets and raw events)
    flush_every: float = 5.0
    #: how long a write waits for another process's lock on the file
    busy_timeout: float = 5.0
    #: events the queue holds for the writer; past it, events are dropped
    queue_size: int = 10_000
    #: event kinds not stored
    exclude: tuple[str, ...] = ()

    @property
    def keep_s(self) -> float:
        return self.keep_days * DAY_S


_KNOWN = tuple(f.name for f in attrs.fields(SqliteSettings))
#: duration options: (least, most) seconds
_DURATIONS: dict[str, tuple[float, float]] = {
    "bucket": (0.001, 3600.0),
    "coarse_bucket": (0.001, DAY_S),
    "downsample_after": (0.0, 365 * DAY_S),
    "flush_every": (0.001, 300.0),
    "busy_timeout": (0.0, 600.0),
}


def settings(options: Mapping[str, Any]) -> SqliteSettings:
    """Check ``options`` (the plugin's table) and fill in the defaults; a
    :class:`~llmos.errors.ConfigError` names the key and what it must be."""
    table = check_table(WHERE, options, _KNOWN)
    checked: dict[str, Any] = {}
    for key, (least, most) in _DURATIONS.items():
        if key in table:
            try:
                value = parse_duration(table[key], f"{WHERE} {key}")
            except ValueError as exc:
                raise ConfigError(str(exc), param=key) from None
            if not least <= value <= most:
                raise ConfigError(
                    f"{WHERE} {key} must be between {least:g} and {most:g} seconds,"
                    f" got {table[key]!r}",
                    param=key,
                )
            checked[key] = value
    if "keep_days" in table:
        value = table["keep_days"]
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
            or not 0 < value <= 3650
        ):
            raise ConfigError(
                f"{WHERE} keep_days must be a number of days > 0 (at most 3650), got {value!r}",
                param="keep_days",
            )
        checked["keep_days"] = float(value)
    if "queue_size" in table:
        value = table["queue_size"]
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10_000_000:
            raise ConfigError(
                f"{WHERE} queue_size must be an integer from 1 to 10000000, got {value!r}",
                param="queue_size",
            )
        checked["queue_size"] = value
    if "exclude" in table:
        value = table["exclude"]
        if not isinstance(value, list | tuple) or not all(isinstance(k, str) for k in value):
            raise ConfigError(
                f"{WHERE} exclude must be a list of event kinds, got {value!r}", param="exclude"
            )
        checked["exclude"] = tuple(value)
    result = SqliteSettings(**checked)
    ratio = result.coarse_bucket / result.bucket
    if ratio < 1 or abs(ratio - round(ratio)) > 1e-9:
        raise ConfigError(
            f"{WHERE} coarse_bucket ({result.coarse_bucket:g} s) must be a whole multiple of"
            f" bucket ({result.bucket:g} s)",
            param="coarse_bucket",
        )
    return result


# --------------------------------------------------------------------------
# The sink (the database itself: llmos.monitor.store)
# --------------------------------------------------------------------------

#: seconds after a bucket's end before it counts as closed (events reach the
#: writer a moment after they happen); a later one is merged into it anyway
_GRACE_S = 1.0
#: buckets the writer keeps while the database cannot be written; past it the
#: oldest are dropped (counted)
MAX_PENDING_BUCKETS = 10_000


#: how often the writer takes the queued events (it writes every flush_every)
FOLD_EVERY_S = 0.25


class SqliteSink:
    """Queues events for a writer thread that stores them in the metrics
    database; opened (the thread started) by :meth:`open`, which the plugin's
    ``llmos_startup`` calls with the kernel's data folder."""

    def __init__(
        self, options: Mapping[str, Any], *, clock: Callable[[], float] = time.time
    ) -> None:
        self.settings = settings(options)
        self.clock = clock
        self.path: Path | None = None
        #: events whose figures are in the database
        self.written = 0
        #: failed opens, writes and maintenance runs of the database
        self.errors = 0
        self._dropped_full = 0  # the bus's thread: the queue was full
        self._dropped_behind = 0  # the writer's thread: too much waiting to be written
        # A plain deque, not a queue.Queue: appending wakes no thread. The
        # writer wakes every flush_every and takes what is there in one go —
        # a thread woken per event costs a daemon two context switches and
        # a GIL hand-over per model call.
        self._queue: deque[MonitorEvent] = deque()
        self._exclude = frozenset(self.settings.exclude)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._closed = False
        self._thread: threading.Thread | None = None
        # The writer thread's own state.
        self._store: MetricsStore | None = None
        self._buckets: dict[BucketKey, RequestStats] = {}
        self._bucket_events: dict[BucketKey, int] = {}
        self._rows: list[EventRow] = []

    # -- the bus's side -----------------------------------------------------

    @property
    def dropped(self) -> int:
        """Events lost: the queue was full, or the database could not be
        written for so long that the writer had to let go of some."""
        return self._dropped_full + self._dropped_behind

    @property
    def queued(self) -> int:
        """Events waiting for the writer."""
        return len(self._queue)

    def emit(self, event: MonitorEvent) -> None:
        """Queue ``event`` for the writer; never blocks (a full queue drops it)."""
        # request.bucket: the kernel's own sums of the calls this sink folds itself
        if event.kind in self._exclude or event.kind == "request.bucket":
            return
        if self._closed:
            with self._lock:
                self._dropped_full += 1
            return
        if len(self._queue) >= self.settings.queue_size:
            with self._lock:
                self._dropped_full += 1
            return
        self._queue.append(event)  # atomic: the writer pops from the other end

    def open(self, path: Path) -> None:
        """Start writing to ``path`` (the database is opened by the writer)."""
        with self._lock:
            if self._thread is not None or self._closed:
                return
            self.path = Path(path)
            self._thread = threading.Thread(target=self._run, name="llmos-sqlite-sink", daemon=True)
            self._thread.start()

    def close(self) -> None:
        """Write everything queued and every bucket, open ones too, then stop."""
        with self._lock:
            self._closed = True
            thread = self._thread
        self._stop.set()
        if thread is not None:
            thread.join(self.settings.busy_timeout + 10.0)
        else:
            # never opened: nowhere to write what was queued
            with self._lock:
                self._dropped_full += sum(1 for _ in _drain(self._queue))

    # -- the writer's side --------------------------------------------------

    def _run(self) -> None:
        every = self.settings.flush_every
        maintain_every = max(self.settings.coarse_bucket, every)
        try:
            self._maintain()  # at once: the file may be days old
            next_flush = time.monotonic() + every
            next_maintain = time.monotonic() + maintain_every
            # Fold what came in a few times a second: the queue stays short
            # at thousands of events a second, the thread wakes rarely.
            fold_every = min(FOLD_EVERY_S, every)
            while not self._stop.wait(
                max(
                    min(next_flush, next_maintain, time.monotonic() + fold_every)
                    - time.monotonic(),
                    0.0,
                )
            ):
                for item in _drain(self._queue):
                    self._fold(item)
                now = time.monotonic()
                if now >= next_maintain:
                    self._maintain()
                    next_maintain = now + maintain_every
                if now >= next_flush:
                    self._flush(final=False)
                    next_flush = time.monotonic() + every
            for item in _drain(self._queue):
                self._fold(item)
            self._flush(final=True)
        except Exception as exc:  # never expected; said loudly, not silently lost
            self._failed("writer", exc)
        finally:
            if self._store is not None:
                self._store.close()
                self._store = None

    def _fold(self, event: MonitorEvent) -> None:
        try:
            if event.kind != "request":
                self._rows.append(event_row(event))
                if len(self._rows) > self.settings.queue_size:
                    del self._rows[0]
                    self._dropped_behind += 1
                return
            if not event.model:
                return
            width = self.settings.bucket
            start = math.floor(event.time.timestamp() / width) * width
            key = (start, width, event.model, event.capability or "?")
            stats = self._buckets.get(key)
            if stats is None:
                stats = self._buckets[key] = RequestStats()
                self._bucket_events[key] = 0
                if len(self._buckets) > MAX_PENDING_BUCKETS:
                    oldest = min(self._buckets)
                    del self._buckets[oldest]
                    self._dropped_behind += self._bucket_events.pop(oldest)
            stats.add(event.fields)
            self._bucket_events[key] += 1
        except Exception as exc:  # an event no one could store
            self._failed("fold", exc)

    def _open_store(self) -> MetricsStore | None:
        if self._store is None and self.path is not None:
            try:
                self._store = MetricsStore(self.path, busy_timeout_s=self.settings.busy_timeout)
            except Exception as exc:  # an unwritable folder, a newer schema: retried later
                self._failed("open", exc)
        return self._store

    def _flush(self, *, final: bool) -> None:
        """Write the closed buckets (every one when ``final``) and the raw
        events, in one transaction; on failure keep them for the next try."""
        horizon = self.clock() - _GRACE_S
        ready = {
            key: stats
            for key, stats in self._buckets.items()
            if final or key[0] + key[1] <= horizon
        }
        if not ready and not self._rows:
            return
        store = self._open_store()
        if store is None:
            return
        try:
            store.write(ready, self._rows)
        except Exception as exc:  # a locked file, a full disk, a bad row: retried later
            self._failed("write", exc)
            return
        self.written += len(self._rows) + sum(self._bucket_events.pop(key) for key in ready)
        for key in ready:
            del self._buckets[key]
        self._rows = []

    def _maintain(self) -> None:
        """Downsample and delete what is past ``keep_days``."""
        store = self._open_store()
        if store is None:
            return
        now, s = self.clock(), self.settings
        try:
            merged = store.downsample(now - s.downsample_after, s.bucket, s.coarse_bucket)
            deleted = store.prune(now - s.keep_s)
        except Exception as exc:  # a locked file, a full disk, a bad row: retried later
            self._failed("maintain", exc)
            return
        if merged or deleted:
            log.debug("monitor.sqlite_maintained", merged=merged, deleted=deleted)

    def _failed(self, what: str, exc: BaseException) -> None:
        self.errors += 1
        # The first failure and then every 100th: a locked file is not a flood.
        if self.errors % 100 == 1:
            log.warning(
                "monitor.sqlite_failed",
                path=str(self.path),
                step=what,
                error=repr(exc),
                errors=self.errors,
            )


def _drain(events: deque[MonitorEvent]) -> Iterable[MonitorEvent]:
    """Pop what ``events`` holds now, oldest first (appends may go on)."""
    while True:
        try:
            yield events.popleft()
        except IndexError:
            return


@hookimpl
def llmos_register_monitor_sinks(register: Callable[[MonitorSinkSpec], None]) -> None:
    register(
        MonitorSinkSpec(
            name="sqlite",
            create=create,
            description="the monitor's history in LLMOS_HOME/monitor/metrics.db (llmos report)",
        )
    )


def create(context: PluginContext) -> SqliteSink:
    """The sink, writing to the data folder's metrics database (``MonitorSinkSpec.create``)."""
    sink = SqliteSink(context.options)
    sink.open(db_path(context.home))
    return sink
