"""Several processes (and threads) on one registry file: versions stay distinct
and gapless, and a registration that returned survives SIGKILL."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from llmos.registry import SQLiteStore
from llmos.types import ModelCard

pytestmark = pytest.mark.skipif(sys.platform == "win32", reason="POSIX signals")

# Each worker opens the store itself (the file may not exist yet, so opening
# races too), says "ready", waits for "go" on stdin so that all of them
# register at the same moment, and prints a version only after `register`
# has returned it.
WORKER = textwrap.dedent(
    """
    import logging, sys
    import structlog
    structlog.configure(
        wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING),
        logger_factory=structlog.PrintLoggerFactory(sys.stderr),
    )
    from llmos.registry import SQLiteStore
    from llmos.types import ModelCard

    path, name, count, worker = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    store = SQLiteStore(path)
    print("ready", flush=True)
    sys.stdin.readline()
    i = 0
    while count < 0 or i < count:
        card = ModelCard(name=name, provider="transformers", description=f"{worker} {i}")
        print("v", store.register(card, created_by=worker).version, flush=True)
        i += 1
    print("done", flush=True)
    """
)


def start_workers(path: Path, *jobs: tuple[str, int, str]) -> list[subprocess.Popen[str]]:
    """Start one worker per ``(name, count, worker)`` (count -1: forever) and
    return once all have opened the store; they open it at the same time."""
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(path), name, str(count), worker],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for name, count, worker in jobs
    ]
    for process in processes:
        assert process.stdout is not None and process.stderr is not None
        line = process.stdout.readline()
        if line != "ready\n":
            process.kill()
            pytest.fail(f"worker did not start: {line}{process.stderr.read()}")
    return processes


def go(process: subprocess.Popen[str]) -> None:
    assert process.stdin is not None
    process.stdin.write("go\n")
    process.stdin.flush()


def check_database(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchall() == [("ok",)]
        # Raises if the full-text index disagrees with its content.
        db.execute("INSERT INTO versions_fts (versions_fts) VALUES ('integrity-check')")
    finally:
        db.close()


def test_processes_registering_one_name_get_distinct_gapless_versions(tmp_path: Path) -> None:
    path = tmp_path / "fresh" / "registry.db"  # created by the racing workers
    workers = start_workers(path, *[("acme/shared", 25, f"w{i}") for i in range(4)])
    for process in workers:
        go(process)
    told: dict[str, list[int]] = {}
    for i, process in enumerate(workers):
        out, err = process.communicate(timeout=60)
        assert process.returncode == 0, err
        lines = out.splitlines()
        assert lines[-1] == "done"
        told[f"w{i}"] = [int(line.split()[1]) for line in lines[:-1]]

    every = sorted(v for versions in told.values() for v in versions)
    assert every == list(range(1, 101))
    for versions in told.values():
        assert len(versions) == 25 and versions == sorted(versions)
    with SQLiteStore(path) as store:
        listed = store.versions("acme/shared")
        assert [v.card.version for v in listed] == list(range(1, 101))
        # Each version is the card its worker registered under that number.
        for info in listed:
            assert info.card.version in told[info.card.created_by or ""]
        assert store.get("acme/shared").version == 100
        assert [v.aliases for v in listed if v.aliases] == [("latest",)]
        assert store.search("name:acme/shared").total == 1
    check_database(path)


def test_registrations_that_returned_survive_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SQLiteStore(path).close()
    # A second writer keeps the lock busy so the kill lands among real contention.
    victim, neighbour = start_workers(
        path, ("acme/victim", -1, "victim"), ("acme/neighbour", 200, "neighbour")
    )
    go(victim)
    go(neighbour)
    assert victim.stdout is not None
    told = []
    for line in victim.stdout:
        told.append(int(line.split()[1]))
        if len(told) == 40:
            os.kill(victim.pid, signal.SIGKILL)
            break
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL
    _, err = neighbour.communicate(timeout=60)
    assert neighbour.returncode == 0, err
    victim.stdout.read()  # what it printed after line 40 and before the signal

    assert told == list(range(1, 41))
    check_database(path)
    with SQLiteStore(path) as store:
        stored = [v.card.version for v in store.versions("acme/victim")]
        # Every version it was told of is there; it may have committed a few
        # more before the signal, never with a gap.
        assert stored[: len(told)] == told
        assert stored == list(range(1, len(stored) + 1))
        assert store.get("acme/victim").version == stored[-1]
        assert [v.card.version for v in store.versions("acme/neighbour")] == list(range(1, 201))
        # The file takes new work after the crash.
        assert (
            store.register(ModelCard(name="acme/victim", provider="x")).version == len(stored) + 1
        )
    check_database(path)


def test_threads_sharing_a_store(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "registry.db")
    got: list[int] = []
    errors: list[BaseException] = []
    lock = threading.Lock()
    start = threading.Barrier(4)

    def work() -> None:
        try:
            start.wait()
            for _ in range(25):
                version = store.register(ModelCard(name="m", provider="x")).version
                assert store.get(f"m@{version}").version == version
                with lock:
                    got.append(version or 0)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not errors
    assert sorted(got) == list(range(1, 101))
    store.close()
    check_database(tmp_path / "registry.db")
