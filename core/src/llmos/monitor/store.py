"""The monitor's history database, ``LLMOS_HOME/monitor/metrics.db``.

Its schema and the writes that keep it: :class:`MetricsStore` (used by the
``sqlite`` sink, a default plugin, from its one writer thread) stores request
buckets — one :class:`~llmos.monitor.metrics.RequestStats` per bucket, model
and capability, merged with what another process wrote to the same bucket —
and raw events, downsamples old buckets and deletes what is past retention.
:mod:`llmos.monitor.history` reads the same file. Opened, written and
migrated through :mod:`llmos.db`, like every database llmos keeps.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Mapping, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

from llmos import db
from llmos.monitor.metrics import RequestStats
from llmos.types import MonitorEvent

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "BucketKey",
    "EventRow",
    "MetricsStore",
    "db_path",
    "event_row",
]

_SCHEMA = """
CREATE TABLE IF NOT EXISTS requests (
    start REAL NOT NULL,          -- bucket start, seconds since the epoch
    width REAL NOT NULL,          -- bucket width, seconds (fine or coarse)
    model TEXT NOT NULL,
    capability TEXT NOT NULL,
    requests INTEGER NOT NULL,    -- rows asked for (also inside stats)
    errors INTEGER NOT NULL,      -- rows failed or refused (also inside stats)
    stats TEXT NOT NULL,          -- RequestStats.to_dict() as JSON
    PRIMARY KEY (model, capability, width, start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS requests_width_start ON requests (width, start);
CREATE INDEX IF NOT EXISTS requests_start ON requests (start);
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,           -- seconds since the epoch
    kind TEXT NOT NULL,
    model TEXT,
    capability TEXT,
    fields TEXT NOT NULL          -- the event's fields as JSON
);
CREATE INDEX IF NOT EXISTS events_kind_time ON events (kind, time);
CREATE INDEX IF NOT EXISTS events_time ON events (time);
"""

#: the only raw events thinned by downsampling: one every few seconds, forever
_SAMPLED_KIND = "process.sample"


def db_path(home: Path) -> Path:
    """Where the sink of a kernel whose data folder is ``home`` writes."""
    return Path(home) / "monitor" / "metrics.db"


#: a bucket to write: (start, width, model, capability)
BucketKey = tuple[float, float, str, str]
#: a raw event row: (time, kind, model, capability, fields as JSON)
EventRow = tuple[float, str, str | None, str | None, str]


def event_row(event: MonitorEvent) -> EventRow:
    fields = json.dumps(dict(event.fields), ensure_ascii=False, default=str)
    return (event.time.timestamp(), event.kind, event.model, event.capability, fields)


class MetricsStore:
    """The metrics database, for one writer thread: schema, writes that merge,
    downsampling, retention. Every method is one ``BEGIN IMMEDIATE``
    transaction, so writers in several processes take turns."""

    def __init__(self, path: Path, *, busy_timeout_s: float = 5.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.busy_timeout_s = busy_timeout_s
        self._what = f"metrics database {self.path}"
        self._con = db.connect(self.path, what=self._what, busy_timeout=busy_timeout_s)
        try:
            db.migrate(self._con, MIGRATIONS, what=self._what, timeout=busy_timeout_s)
        except BaseException:
            self._con.close()
            raise

    def _transaction(self) -> AbstractContextManager[sqlite3.Connection]:
        return db.write(self._con, what=self._what, timeout=self.busy_timeout_s)

    def write(
        self, buckets: Mapping[BucketKey, RequestStats], events: Sequence[EventRow] = ()
    ) -> None:
        """Store ``buckets`` (merged into a stored bucket of the same key) and
        ``events``, in one transaction."""
        with self._transaction() as con:
            for key, stats in buckets.items():
                _upsert(con, key, stats)
            con.executemany(
                "INSERT INTO events (time, kind, model, capability, fields) VALUES (?, ?, ?, ?, ?)",
                events,
            )

    def downsample(self, before: float, fine: float, coarse: float) -> int:
        """Merge the ``fine``-wide buckets that start before ``before`` into
        ``coarse``-wide ones, and keep one process sample per coarse bucket
        before it; returns the fine buckets merged."""
        with self._transaction() as con:
            rows = con.execute(
                "SELECT start, model, capability, stats FROM requests"
                " WHERE width = ? AND start < ? ORDER BY start",
                (fine, before),
            ).fetchall()
            merged: dict[BucketKey, RequestStats] = {}
            for start, model, capability, stats in rows:
                key = (math.floor(start / coarse) * coarse, coarse, model, capability)
                total = merged.get(key)
                if total is None:
                    total = merged[key] = RequestStats()
                total.merge(RequestStats.from_dict(json.loads(stats)))
            con.execute("DELETE FROM requests WHERE width = ? AND start < ?", (fine, before))
            for key, stats in merged.items():
                _upsert(con, key, stats)
            con.execute(
                "DELETE FROM events WHERE kind = ? AND time < ? AND id NOT IN"
                " (SELECT min(id) FROM events WHERE kind = ? AND time < ?"
                "  GROUP BY CAST(time / ? AS INTEGER))",
                (_SAMPLED_KIND, before, _SAMPLED_KIND, before, coarse),
            )
        return len(rows)

    def prune(self, before: float) -> int:
        """Delete every bucket and event older than ``before``; returns the rows deleted."""
        with self._transaction() as con:
            deleted = con.execute("DELETE FROM requests WHERE start < ?", (before,)).rowcount
            deleted += con.execute("DELETE FROM events WHERE time < ?", (before,)).rowcount
        return deleted

    def close(self) -> None:
        self._con.close()


def _migration_1(con: sqlite3.Connection) -> None:
    # statement by statement: executescript would commit the transaction
    for statement in (s.strip() for s in _SCHEMA.split(";")):
        if statement:
            con.execute(statement)


#: Append, never edit or reorder: a file's ``user_version`` says how many ran.
MIGRATIONS: list[db.Migration] = [_migration_1]
#: ``PRAGMA user_version`` of the newest schema; a newer file is refused
SCHEMA_VERSION = len(MIGRATIONS)


def _upsert(con: sqlite3.Connection, key: BucketKey, stats: RequestStats) -> None:
    start, width, model, capability = key
    row = con.execute(
        "SELECT stats FROM requests WHERE model = ? AND capability = ? AND width = ? AND start = ?",
        (model, capability, width, start),
    ).fetchone()
    if row is not None:
        # Another process (or this one, before a restart) wrote this bucket.
        stored = RequestStats.from_dict(json.loads(row[0]))
        stored.merge(stats)
        stats = stored
    failed = stats.errors + stats.rejected
    con.execute(
        "INSERT OR REPLACE INTO requests"
        " (start, width, model, capability, requests, errors, stats)"
        " VALUES (?, ?, ?, ?, ?, ?, ?)",
        (start, width, model, capability, stats.requests, failed, json.dumps(stats.to_dict())),
    )
