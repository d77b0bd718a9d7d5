"""What the PostgreSQL store adds to the contract: its schema and migrations,
several processes registering at once, and a server that is wrong or gone."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
from collections.abc import Callable
from typing import Any

import psycopg
import pytest

from llmos.errors import ConfigError, Unavailable
from llmos.registry.store import SearchPage
from llmos.store_contract import card
from llmos.types import ModelCard
from llmos_postgres import store as store_module
from llmos_postgres.store import PostgresStore, describe_dsn
from llmos_postgres.testing import Server

OpenPg = Callable[..., PostgresStore]


def _sql(server: Server, statement: str, *params: object) -> list[tuple[object, ...]]:
    with psycopg.connect(server.dsn, autocommit=True) as conn:
        cur = conn.execute(statement, params or None)
        return cur.fetchall() if cur.description else []


# --------------------------------------------------------------- migrations


def test_a_fresh_schema_gets_the_current_version(server: Server, open_pg: OpenPg) -> None:
    store = open_pg()
    assert store.schema_version == len(store_module.MIGRATIONS) >= 1
    tables = {
        row[0]
        for row in _sql(
            server,
            "SELECT table_name FROM information_schema.tables WHERE table_schema = %s",
            store.schema,
        )
    }
    assert {"registry_schema", "models", "versions", "postings", "aliases"} <= tables


def test_migrations_run_once_and_in_order(
    server: Server, open_pg: OpenPg, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = open_pg()
    first.register(card("m"))
    ran: list[str] = []

    def second() -> list[str]:
        ran.append("second")
        return ["CREATE TABLE extra (x integer)"]

    def third() -> list[str]:
        ran.append("third")
        return ["INSERT INTO extra VALUES (1)"]  # needs second's table

    base = list(store_module.MIGRATIONS)
    monkeypatch.setattr(store_module, "MIGRATIONS", [*base, second, third])
    again = open_pg()
    assert again.schema_version == len(base) + 2
    assert again.get("m").version == 1  # data survives
    assert open_pg().schema_version == len(base) + 2  # reopening runs nothing
    assert ran == ["second", "third"]
    assert _sql(server, f"SELECT x FROM {first.schema}.extra") == [(1,)]


def test_a_failing_migration_changes_nothing(
    server: Server, open_pg: OpenPg, monkeypatch: pytest.MonkeyPatch
) -> None:
    schema = open_pg().schema

    def broken() -> list[str]:
        return ["CREATE TABLE half_done (x integer)", "SELECT 1 / 0"]

    monkeypatch.setattr(store_module, "MIGRATIONS", [*store_module.MIGRATIONS, broken])
    with pytest.raises(psycopg.errors.DivisionByZero):
        open_pg()
    assert _sql(server, f"SELECT version FROM {schema}.registry_schema") == [(1,)]
    assert _sql(server, "SELECT to_regclass(%s)", f"{schema}.half_done") == [(None,)]


def test_a_newer_schema_is_refused(server: Server, open_pg: OpenPg) -> None:
    schema = open_pg().schema
    _sql(server, f"UPDATE {schema}.registry_schema SET version = 99")
    with pytest.raises(ConfigError) as caught:
        open_pg()
    assert "has schema version 99, newer than this llmos-postgres understands (1)" in str(
        caught.value
    )
    assert "upgrade llmos-postgres or use another schema" in str(caught.value)


def test_stores_that_open_one_new_schema_at_once_migrate_it_once(open_pg: OpenPg) -> None:
    """The advisory lock: several daemons starting on an empty database."""
    got: list[object] = []

    def start() -> None:
        try:
            got.append(open_pg("shared").schema_version)
        except Exception as exc:  # shown by the assertion below
            got.append(exc)

    threads = [threading.Thread(target=start) for _ in range(5)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert got == [len(store_module.MIGRATIONS)] * 5


def test_schema_names_are_checked(server: Server) -> None:
    with pytest.raises(ConfigError, match="schema 'Bad; DROP' is invalid"):
        PostgresStore(server.dsn, schema="Bad; DROP")


# ------------------------------------------------------ several processes

_WRITER = textwrap.dedent(
    """
    import json, sys
    from llmos.types import ModelCard
    from llmos_postgres.store import PostgresStore

    dsn, schema, count, who = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    sys.stdin.readline()  # start together
    with PostgresStore(dsn, schema=schema) as store:
        got = []
        for i in range(count):
            card = ModelCard(name="shared/model", provider="none", description=f"{who} {i}")
            got.append(store.register(card, created_by=who).version)
    print(json.dumps(got))
    """
)


def test_processes_registering_one_name_get_gapless_versions(
    server: Server, open_pg: OpenPg
) -> None:
    """Four processes (four daemons, as far as the server can tell) register
    versions of one model at once: 1..N, each number once."""
    schema = open_pg().schema  # created and migrated
    processes, each = 4, 15
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", _WRITER, server.dsn, schema, str(each), f"p{n}"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for n in range(processes)
    ]
    for writer in writers:
        assert writer.stdin is not None
        writer.stdin.write("go\n")
        writer.stdin.flush()
    versions: list[int] = []
    for writer in writers:
        out, err = writer.communicate(timeout=120)
        assert writer.returncode == 0, err[-2000:]
        mine = json.loads(out.strip().splitlines()[-1])
        assert mine == sorted(mine)  # each process's own versions rise
        versions += mine
    total = processes * each
    assert sorted(versions) == list(range(1, total + 1))
    listed = open_pg().versions("shared/model")
    assert [v.card.version for v in listed] == list(range(1, total + 1))
    by = {v.card.created_by for v in listed}
    assert by == {f"p{n}" for n in range(processes)}
    assert open_pg().get("shared/model").version == total


# ------------------------------------------------------- bad input, lost server


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def test_an_unreachable_server_names_the_host_never_the_password() -> None:
    dsn = f"host=127.0.0.1 port={_closed_port()} dbname=registry user=llmos password=s3cr3t-pw"
    with pytest.raises(ConfigError) as caught:
        PostgresStore(dsn, connect_timeout=2)
    message = str(caught.value)
    assert message.startswith("cannot connect to the PostgreSQL registry at host 127.0.0.1")
    assert "database registry, user llmos" in message
    assert "check that the server is running" in message and "LLMOS_POSTGRES_DSN" in message
    assert "s3cr3t-pw" not in message


def test_a_url_dsn_hides_its_password_too() -> None:
    dsn = f"postgresql://llmos:s3cr3t-pw@127.0.0.1:{_closed_port()}/registry"
    with pytest.raises(ConfigError) as caught:
        PostgresStore(dsn, connect_timeout=2)
    assert "s3cr3t-pw" not in str(caught.value)
    assert "host 127.0.0.1" in str(caught.value)
    assert describe_dsn(dsn).startswith("host 127.0.0.1, port ")


def test_a_missing_database_is_a_config_error(server: Server) -> None:
    with pytest.raises(ConfigError, match=r'database "nope" does not exist'):
        PostgresStore(f"host=127.0.0.1 port={server.port} dbname=nope user=postgres")


def test_a_malformed_dsn_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="not a valid connection string"):
        PostgresStore("host=127.0.0.1 port")


def test_a_lost_connection_is_unavailable_then_reconnects(server: Server, open_pg: OpenPg) -> None:
    store = open_pg()
    store.register(card("m"))
    pid = store._conn().info.backend_pid  # the test thread's connection
    _sql(server, "SELECT pg_terminate_backend(%s)", pid)
    with pytest.raises(Unavailable, match=r"PostgreSQL registry at host 127\.0\.0\.1"):
        store.get("m")
    assert store.get("m").version == 1  # the next call connects again


# ------------------------------------------------------------------- search


@pytest.mark.parametrize("query", ["model", "model tag:odd", "model NOT vendor3", "number"])
@pytest.mark.parametrize("descending", [True, False])
def test_walking_the_impact_index_pages_as_scoring_every_match_does(
    open_pg: OpenPg, query: str, descending: bool
) -> None:
    """Past the count limit a one-word query is read best first from the
    impact index instead of scoring every match: same hits, same scores,
    same order (ties newest first), across cursors and offsets."""
    cards = [
        card(
            f"vendor{i % 7}/model-{i:03d}",
            description="model " * (1 + i % 5) + f"number {i}" + " padding" * (i % 3),
            tags=["even" if i % 2 == 0 else "odd"],
        )
        for i in range(150)
    ]
    open_pg().register_many(cards)
    every = open_pg().search(query, descending=descending, limit=1000)
    assert every.total_exact and every.total > 5
    walked = open_pg(count_limit=5)

    _assert_pages_walk_to(walked, query, descending, every)


def _phrase_cards() -> list[ModelCard]:
    """Cards where "text" and "classification" are often far apart, in
    columns of every weight, so that a word's weight says little about the
    phrase's: what bounds the phrase must still find its best."""
    cards = []
    for i in range(160):
        apart = "classification of " + "text " * (i % 4) if i % 3 else ""
        close = "text classification " * (i % 5 == 0) + "a text classification model" * (i % 2)
        cards.append(
            card(
                f"vendor{i % 7}/text-model-{i:03d}" if i % 11 == 0 else f"vendor{i % 7}/m-{i:03d}",
                description=(f"{apart}{close}" + " bert" * (i % 5 < 2)) * (1 + i % 2)
                + " padding" * (i % 9),
                tasks=[["text-classification"], ["token-classification"], []][i % 3],
                tags=["even" if i % 2 == 0 else "odd", *(["text"] if i % 4 == 1 else [])],
            )
        )
    return cards


@pytest.mark.parametrize(
    ("query", "bounded", "zeros"),
    [
        ('"text classification"', True, False),
        ('"text classification" NOT tag:odd', True, False),
        ('"text classification" NOT vendor3', True, False),
        ('"classification of text"', True, False),
        ("bert OR tag:odd", False, True),
        ("bert OR NOT tag:odd", False, True),
        ('"text classification" OR tag:even', True, True),
        ("(bert OR tag:odd) NOT vendor2", False, True),
        ("tag:odd OR (bert NOT padding)", False, True),
        # A tag filter ANDed at the top: every match scored, as before.
        ('"text classification" tag:odd', False, False),
        ("(bert OR vendor1) tag:odd", False, False),
    ],
)
@pytest.mark.parametrize("descending", [True, False])
def test_phrases_and_text_under_or_page_as_scoring_every_match_does(
    open_pg: OpenPg,
    monkeypatch: pytest.MonkeyPatch,
    query: str,
    bounded: bool,
    zeros: bool,
    descending: bool,
) -> None:
    """Past the count limit a quoted phrase scores only the versions its
    bound lets rank on the page, and free text under OR only the hits that
    contain it (the rest, scoring 0, follow newest first): same hits, same
    scores, same order as scoring every match, across cursors and offsets."""
    open_pg().register_many(_phrase_cards())
    every = open_pg().search(query, descending=descending, limit=1000)
    assert every.total_exact and every.total > 5
    # Each way is taken (and counted) where it applies: it is what is tested.
    taken: dict[str, int] = {"_bounded": 0, "_zeros": 0}
    for name in taken:
        real = getattr(PostgresStore, name)

        def counted(*args: Any, _real: Any = real, _name: str = name, **kw: Any) -> Any:
            taken[_name] += 1
            return _real(*args, **kw)

        monkeypatch.setattr(PostgresStore, name, counted)
    quick = open_pg(count_limit=5)

    _assert_pages_walk_to(quick, query, descending, every)
    if descending:
        assert (taken["_bounded"] > 0, taken["_zeros"] > 0) == (bounded, zeros), taken
    else:  # worst first: every match is scored
        assert taken == {"_bounded": 0, "_zeros": 0}


def test_the_search_statistics_follow_every_write(server: Server, open_pg: OpenPg) -> None:
    """Document counts and the corpus totals (bm25's IDF and average length),
    kept by each write, equal what the postings hold after registrations,
    edits and deletions."""
    store = open_pg()
    store.register_many(
        [card(f"m{i}", description="alpha beta " * i, tags=["gamma"]) for i in range(1, 6)]
    )
    store.register(card("m1", description="delta"))
    store.tag("m2", "alpha", "epsilon")
    store.untag("m2", "gamma")
    store.set_description("m3", "beta beta zeta")
    store.delete("m4")
    store.delete("m1@1")
    schema = store.schema
    kept = dict(_sql(server, f"SELECT term, docs FROM {schema}.terms WHERE docs <> 0"))
    counted = dict(_sql(server, f"SELECT term, count(*) FROM {schema}.postings GROUP BY term"))
    assert kept == counted and kept["gamma"] == 2 and kept["epsilon"] == 1
    assert _sql(server, f"SELECT versions, tokens FROM {schema}.corpus") == _sql(
        server,
        f"SELECT count(*), sum(size) FROM {schema}.versions WHERE status <> 'deleted'",
    )


def test_a_schema_with_other_tables_of_those_names_is_refused(
    server: Server, new_schema: Callable[[], str]
) -> None:
    schema = new_schema()
    _sql(server, f"CREATE SCHEMA {schema}")
    _sql(server, f"CREATE TABLE {schema}.models (id integer)")
    with pytest.raises(
        ConfigError, match=r"already holds tables llmos-postgres did not make \(models\)"
    ):
        PostgresStore(server.dsn, schema=schema)
    assert _sql(server, "SELECT to_regclass(%s)", f"{schema}.versions") == [(None,)]


def _hits(page: SearchPage) -> list[tuple[str, float | None]]:
    return [(hit.card.name, hit.score) for hit in page.items]


def _assert_pages_walk_to(store: Any, query: str, descending: bool, every: SearchPage) -> None:
    """Pages of 7 by cursor and by offset (under a count limit: totals not
    exact) give the same hits, in the same order, as ``every`` at once."""
    seen: list[tuple[str, float | None]] = []
    cursor = None
    while True:
        page = store.search(query, descending=descending, limit=7, cursor=cursor)
        assert not page.total_exact
        seen += _hits(page)
        if (cursor := page.next_cursor) is None:
            break
    by_offset: list[tuple[str, float | None]] = []
    offset: int | None = 0
    while offset is not None:
        page = store.search(query, descending=descending, limit=7, offset=offset)
        by_offset += _hits(page)
        offset = page.next_offset
    assert seen == by_offset == _hits(every)
