"""llmos.db: every database llmos keeps is opened, written and migrated one way.

Real SQLite files, real locks held by other connections (threads), real
schema versions: what the registry, the job store and the metrics store
share.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from llmos import db
from llmos.errors import ConfigError, LlmosError, Unavailable
from llmos.monitor.store import MetricsStore
from llmos.registry.store import SQLiteStore
from llmos.tuning.jobs import JobStore

STORES: dict[str, Callable[[Path], object]] = {
    "registry database": SQLiteStore,
    "job database": JobStore,
    "metrics database": MetricsStore,
}


@pytest.mark.parametrize("what", sorted(STORES))
def test_every_store_opens_in_wal_and_refuses_a_newer_schema(tmp_path: Path, what: str) -> None:
    path = tmp_path / "data.db"
    store = STORES[what](path)
    store.close()  # type: ignore[attr-defined]
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        version = con.execute("PRAGMA user_version").fetchone()[0]
        assert version >= 1
        con.execute(f"PRAGMA user_version = {version + 1}")
    with pytest.raises(ConfigError) as caught:
        STORES[what](path)
    assert str(caught.value) == (
        f"the {what} {path} has schema version {version + 1}, newer than this llmos"
        f" understands ({version}); upgrade llmos or use another LLMOS_HOME"
    )


@pytest.mark.parametrize("what", sorted(STORES))
def test_every_store_names_a_file_that_is_not_a_database(tmp_path: Path, what: str) -> None:
    path = tmp_path / "data.db"
    path.write_bytes(b"not a database, " * 512)
    with pytest.raises(LlmosError, match=f"cannot open the {what} {path}: file is not a database"):
        STORES[what](path)
    assert path.read_bytes() == b"not a database, " * 512  # left as it was


def test_a_lock_held_past_the_timeout_is_unavailable_and_loses_nothing(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    conn = db.connect(path, what=f"test database {path}", busy_timeout=0.2)
    conn.execute("CREATE TABLE t (v INTEGER)")
    other = db.connect(path, what="other", busy_timeout=5)
    other.execute("BEGIN IMMEDIATE")
    other.execute("INSERT INTO t VALUES (1)")
    started = time.monotonic()
    with (
        pytest.raises(Unavailable, match=rf"the test database {path} stayed locked for 0.2 s"),
        db.write(conn, what=f"test database {path}", timeout=0.2) as c,
    ):
        c.execute("INSERT INTO t VALUES (2)")
    assert time.monotonic() - started >= 0.2
    other.execute("COMMIT")
    with db.write(conn, what="test database", timeout=0.2) as c:
        c.execute("INSERT INTO t VALUES (3)")
    assert [r[0] for r in conn.execute("SELECT v FROM t ORDER BY v")] == [1, 3]


def test_a_write_that_fails_is_rolled_back(tmp_path: Path) -> None:
    conn = db.connect(tmp_path / "x.db", what="test database", busy_timeout=1)
    conn.execute("CREATE TABLE t (v INTEGER)")
    with pytest.raises(ZeroDivisionError), db.write(conn, what="test database", timeout=1) as c:
        c.execute("INSERT INTO t VALUES (1)")
        _ = 1 / 0
    assert not conn.in_transaction
    assert conn.execute("SELECT count(*) FROM t").fetchone()[0] == 0


def test_racing_migrations_run_each_step_once(tmp_path: Path) -> None:
    path = tmp_path / "x.db"
    ran: list[str] = []

    def step_1(c: sqlite3.Connection) -> None:
        ran.append("1")
        time.sleep(0.05)  # hold the lock while the others wait for it
        c.execute("CREATE TABLE t (v INTEGER)")

    def step_2(c: sqlite3.Connection) -> None:
        ran.append("2")
        c.execute("ALTER TABLE t ADD COLUMN w TEXT")

    results: list[tuple[int, int]] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def migrate() -> None:
        try:
            conn = db.connect(path, what="test database", busy_timeout=10)
            barrier.wait()
            results.append(db.migrate(conn, [step_1, step_2], what="test database", timeout=10))
            conn.close()
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=migrate) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    assert ran == ["1", "2"]
    assert sorted(results) == [(0, 2), (2, 2), (2, 2), (2, 2)]
    with sqlite3.connect(path) as con:
        assert con.execute("PRAGMA user_version").fetchone()[0] == 2


def test_retry_locked_retries_only_lock_errors_and_only_until_the_timeout() -> None:
    tries = iter([sqlite3.OperationalError("database is locked")] * 2 + [None])

    def locked_twice() -> str:
        error = next(tries)
        if error is not None:
            raise error
        return "done"

    assert db.retry_locked(locked_twice, timeout=5) == "done"

    calls = 0

    def broken() -> None:
        nonlocal calls
        calls += 1
        raise sqlite3.OperationalError("no such table: t")

    with pytest.raises(sqlite3.OperationalError, match="no such table"):
        db.retry_locked(broken, timeout=5)
    assert calls == 1

    def always_locked() -> None:
        raise sqlite3.OperationalError("database is locked")

    started = time.monotonic()
    with pytest.raises(sqlite3.OperationalError, match="locked"):
        db.retry_locked(always_locked, timeout=0.1)
    assert 0.1 <= time.monotonic() - started < 5


def test_read_only_never_creates_or_changes_the_file(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(LlmosError, match=f"cannot open the history {missing}"):
        db.connect(missing, what=f"history {missing}", busy_timeout=1, read_only=True)
    assert not missing.exists()
    path = tmp_path / "x.db"
    writer = db.connect(path, what="x", busy_timeout=1)
    writer.execute("CREATE TABLE t (v INTEGER)")
    reader = db.connect(path, what="x", busy_timeout=1, read_only=True)
    with pytest.raises(sqlite3.OperationalError, match="readonly"):
        reader.execute("INSERT INTO t VALUES (1)")
    with db.read(reader) as c:
        assert c.execute("SELECT count(*) FROM t").fetchone()[0] == 0
