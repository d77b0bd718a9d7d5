"""SQLite, one way: every database llmos keeps goes through this module.

The registry (``registry.db``), the tuning jobs (``jobs.db``) and the
monitor's history (``monitor/metrics.db``) are files in the data folder that
several processes share — the daemon, CLI kernels, tuning workers — so each
is opened and written the same way:

* :func:`connect`: autocommit (transactions are explicit), a busy timeout,
  WAL (readers never block the writer), ``synchronous = NORMAL``;
  ``read_only`` opens the file as it is, without taking any lock to change it;
* :func:`write`: a ``BEGIN IMMEDIATE`` transaction, which takes the write
  lock at its first statement (so a read-then-write inside it cannot deadlock
  with another writer), committed, or rolled back on any error; a lock held
  past the busy timeout is :class:`~llmos.errors.Unavailable` (503, retry);
* :func:`read`: one snapshot for several statements;
* :func:`migrate`: the schema versioned by ``PRAGMA user_version`` and a list
  of steps, run in one write transaction (re-checked once the lock is held: a
  racing process may have migrated already); a file from a newer llmos is
  refused, never downgraded.

One retry policy: SQLite waits up to the busy timeout for a lock by itself,
except where it answers "locked" at once — switching a new file to WAL while
another process does the same, and taking the write lock while another
connection is checkpointing or recovering the WAL. Those are retried every
10 ms until the busy timeout, by :func:`retry_locked`.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from llmos.errors import ConfigError, LlmosError, Unavailable

__all__ = ["Migration", "connect", "migrate", "read", "retry_locked", "write"]

T = TypeVar("T")

#: one schema step: runs inside the migration's write transaction
Migration = Callable[[sqlite3.Connection], None]

#: how long to sleep between two tries of a step SQLite refused with "locked"
RETRY_SLEEP_S = 0.01


def retry_locked(step: Callable[[], T], timeout: float) -> T:
    """``step()``, tried again while SQLite answers "locked"/"busy" at once,
    until ``timeout`` seconds have passed (then its error is raised)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return step()
        except sqlite3.OperationalError as exc:
            text = str(exc)
            if ("locked" not in text and "busy" not in text) or time.monotonic() > deadline:
                raise
            time.sleep(RETRY_SLEEP_S)


def connect(
    path: str | Path,
    *,
    what: str,
    busy_timeout: float,
    read_only: bool = False,
    pragmas: Sequence[str] = (),
) -> sqlite3.Connection:
    """A connection to the database file ``path`` (``what`` names it in
    errors, path included: ``f"registry database {path}"``), set up as the module says; ``pragmas``
    are further ``PRAGMA`` statements (``"foreign_keys = ON"``).

    :raises LlmosError: the file cannot be opened, is not a database, or
        cannot use WAL (a network file system).
    """
    path = Path(path)
    try:
        if read_only:
            conn = sqlite3.connect(
                f"{path.resolve().as_uri()}?mode=ro",
                uri=True,
                timeout=busy_timeout,
                isolation_level=None,
                check_same_thread=False,
            )
        else:
            conn = sqlite3.connect(
                path, timeout=busy_timeout, isolation_level=None, check_same_thread=False
            )
    except sqlite3.Error as exc:
        raise LlmosError(f"cannot open the {what}: {exc}") from exc
    try:
        conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
        if not read_only:
            mode = retry_locked(
                lambda: conn.execute("PRAGMA journal_mode = WAL").fetchone(), busy_timeout
            )
            if str(mode[0]).lower() != "wal":
                raise LlmosError(
                    f"the {what} cannot use WAL (journal mode {mode[0]}); "
                    "put LLMOS_HOME on a local file system"
                )
            conn.execute("PRAGMA synchronous = NORMAL")
        for pragma in pragmas:
            conn.execute(f"PRAGMA {pragma}")
    except sqlite3.Error as exc:
        conn.close()
        raise LlmosError(f"cannot open the {what}: {exc}") from exc
    except BaseException:
        conn.close()
        raise
    return conn


@contextmanager
def write(conn: sqlite3.Connection, *, what: str, timeout: float) -> Iterator[sqlite3.Connection]:
    """A write transaction that holds the write lock from its first statement.

    :raises Unavailable: another writer held the lock for ``timeout`` seconds.
    """
    try:
        retry_locked(lambda: conn.execute("BEGIN IMMEDIATE"), timeout)
    except sqlite3.OperationalError as exc:
        raise Unavailable(f"the {what} stayed locked for {timeout:g} s: {exc}") from exc
    try:
        yield conn
        conn.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back (a full disk, an I/O error).
        if conn.in_transaction:
            conn.execute("ROLLBACK")
        raise


@contextmanager
def read(conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """A read transaction: its statements see one snapshot."""
    conn.execute("BEGIN")
    try:
        yield conn
    finally:
        conn.execute("COMMIT")


def schema_version(conn: sqlite3.Connection, *, what: str) -> int:
    """The file's ``PRAGMA user_version``.

    :raises LlmosError: the file is not an SQLite database.
    """
    try:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])
    except sqlite3.DatabaseError as exc:
        raise LlmosError(f"the {what} is not an SQLite database: {exc}") from exc


def check_not_newer(current: int, known: int, *, what: str) -> None:
    """Refuse a file whose schema a newer llmos wrote."""
    if current > known:
        raise ConfigError(
            f"the {what} has schema version {current}, newer than this llmos understands"
            f" ({known}); upgrade llmos or use another LLMOS_HOME"
        )


def migrate(
    conn: sqlite3.Connection,
    migrations: Sequence[Migration],
    *,
    what: str,
    timeout: float,
) -> tuple[int, int]:
    """Bring the file's schema to ``len(migrations)``: the steps it lacks run
    in one write transaction. Returns the versions before and after.

    :raises ConfigError: a newer llmos wrote the file.
    """
    target = len(migrations)
    current = schema_version(conn, what=what)
    check_not_newer(current, target, what=what)
    if current == target:
        return current, target
    with write(conn, what=what, timeout=timeout) as c:
        # Another process may have migrated while this one waited for the lock.
        current = schema_version(c, what=what)
        check_not_newer(current, target, what=what)
        for step in migrations[current:]:
            step(c)
        c.execute(f"PRAGMA user_version = {target:d}")
    return current, target
