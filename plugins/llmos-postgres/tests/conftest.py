"""A real PostgreSQL server for the whole session (Debian's binaries, a
throwaway cluster on a loopback port: :mod:`llmos_postgres.testing`), and a
fresh schema on it for each registry a test opens.

These tests need llmos-postgres (and psycopg), which live in their own
environment (``make test-postgres``); where they are not installed — the main
``.venv`` of ``make test`` — the tests are not collected at all.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

try:
    import psycopg

    from llmos_postgres.store import PostgresStore
    from llmos_postgres.testing import Server, server_for_tests
except ImportError:
    collect_ignore_glob = ["test_*.py"]

_schemas = itertools.count()


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    """The session's server; missing binaries skip (fail where
    ``LLMOS_REQUIRE_SYSTEM_TOOLS=1``, as in CI)."""
    with server_for_tests() as running:
        yield running


@pytest.fixture
def new_schema(server: Server) -> Iterator[Callable[[], str]]:
    """Names of fresh schemas, dropped after the test."""
    made: list[str] = []

    def new_schema() -> str:
        made.append(f"t{os.getpid()}_{next(_schemas)}")
        return made[-1]

    yield new_schema
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        for schema in made:
            conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")


@pytest.fixture
def open_pg(
    server: Server, new_schema: Callable[[], str]
) -> Iterator[Callable[..., PostgresStore]]:
    """``open_pg(key="main", **options)``: a new store handle on the
    registry ``key`` (a schema of its own), closed after the test."""
    schemas: dict[str, str] = {}
    opened: list[PostgresStore] = []

    def open_pg(key: str = "main", **options: Any) -> PostgresStore:
        if key not in schemas:
            schemas[key] = new_schema()
        store = PostgresStore(server.dsn, schema=schemas[key], **options)
        opened.append(store)
        return store

    yield open_pg
    for store in opened:
        store.close()
