""":class:`PostgresStore`: the registry on a PostgreSQL server.

The same contract as the kernel's :class:`~llmos.registry.store.SQLiteStore`
(the conformance suite in :mod:`llmos.store_contract` runs against both): the
same refs, errors, query language, sorts, cursors and bm25 scores, for
several daemons on several machines sharing one registry.

How it keeps that contract on a server:

* **gapless versions**: a registration inserts its model's row if missing
  and then locks it (``SELECT … FOR UPDATE``); the next number comes from the
  locked row, so concurrent registrations of one name, from any number of
  processes, queue there and number 1, 2, 3 … with no gap or duplicate. A
  unique ``(name, version)`` backs it. Registrations of different names only
  meet at the search statistics (the one-row ``corpus`` table, then
  ``terms``, in that order), updated last;
  a deadlock between two bulk registrations that lock names in opposite
  orders is retried.
* **snapshots**: a search's statements share one ``REPEATABLE READ, READ
  ONLY`` transaction.
* **search**: free text is the ``postings`` table, one row per term and
  version with the term's weighted count (name 10, description 1, tags 4,
  tasks 4 per occurrence) and positions, filled from the kernel's tokenizer
  (:class:`llmos.registry.ranking.Tokenizer`, the one SQLite's index uses), so
  both stores agree on what a card contains. A ranked search scores every
  match with bm25 computed in SQL in the same operations and order as the
  kernel's :func:`~llmos.registry.ranking.bm25`, so the scores are the same
  floats; ``corpus`` holds the version count and token total, ``terms`` each
  term's document count, for the IDF and the average length. A one-word
  query with many matches reads them best first from an index on (term,
  weight, length) instead of scoring them all; so is a quoted phrase
  (by its rarest word's weight, which bounds the phrase's), and free text
  under ``OR`` scores only the hits that contain it, the others (score 0)
  following by id.
* **migrations**: ``registry_schema`` holds the schema version; the steps of
  :data:`MIGRATIONS` run in one transaction under an advisory lock, and a
  schema newer than this plugin is refused.
* **connections**: one per thread per process (never across a fork), in
  autocommit mode with explicit transactions. A server that cannot be reached
  is a :class:`~llmos.errors.ConfigError` at start-up (host and database
  named, never the password) and :class:`~llmos.errors.Unavailable` (503,
  retry) later; the thread's connection is then dropped and the next call
  connects again.
"""

from __future__ import annotations

import math
import os
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, TypeVar

import attrs
import psycopg
import structlog
from psycopg import errors as pg_errors
from psycopg.conninfo import conninfo_to_dict

from llmos.errors import ConfigError, LlmosError, NotFoundError, Unavailable
from llmos.registry import ranking
from llmos.registry.query import And, Filter, Node, Not, Or, Text, parse_query, plan_search
from llmos.registry.store import (
    COUNT_LIMIT,
    LATEST,
    CardEdit,
    SearchPage,
    VersionInfo,
    VersionRow,
    VersionStatus,
    card_json,
    check_card,
    check_count_limit,
    check_live,
    check_manual_alias,
    check_search,
    check_version_number,
    edit_add_tags,
    edit_description,
    edit_remove_tags,
    filter_columns,
    filter_values,
    group_aliases,
    load_card,
    missing_ref,
    new_version,
    parse_ref,
    read_cursor,
    same_content,
    search_fingerprint,
    search_order,
    search_page,
    version_infos,
)
from llmos.types import ModelCard, validate_model_name
from llmos_postgres.query import POSITION_BITS, TRUE, PgSql, column_weight, phrase_weight, to_pg

__all__ = ["MIGRATIONS", "PostgresStore", "describe_dsn"]

log = structlog.get_logger("llmos.registry.postgres")

T = TypeVar("T")

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]{0,62}")
#: how often a transaction that lost a deadlock is tried again
_RETRIES = 20


def _migration_1() -> list[str]:
    """The first schema: models (with their last version number), versions
    (filter columns lowercased, the card's JSON), tags, tasks, aliases, the
    postings of the search and the corpus statistics."""
    # COLLATE "C": byte order, as SQLite's BINARY sorts and compares names.
    text = 'text COLLATE "C"'
    return [
        f"""CREATE TABLE models (
            name {text} PRIMARY KEY,
            created_at double precision NOT NULL,
            last_version bigint NOT NULL DEFAULT 0
        )""",
        f"""CREATE TABLE versions (
            id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
            name {text} NOT NULL REFERENCES models (name),
            version bigint NOT NULL CHECK (version >= 1),
            status {text} NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'deprecated', 'deleted')),
            is_latest boolean NOT NULL DEFAULT false,
            created_at double precision NOT NULL,
            created_by {text},
            provider {text} NOT NULL,
            family {text},
            format {text} NOT NULL,
            license {text},
            parameters bigint,
            size integer NOT NULL,
            card text NOT NULL,
            UNIQUE (name, version)
        )""",
        # Partial indexes on the latest versions: what a per-model search reads.
        "CREATE INDEX versions_latest_name ON versions (name) WHERE is_latest",
        "CREATE INDEX versions_latest_created ON versions (created_at) WHERE is_latest",
        "CREATE INDEX versions_latest_parameters ON versions (parameters) WHERE is_latest",
        "CREATE INDEX versions_provider ON versions (provider, name)",
        "CREATE INDEX versions_family ON versions (family, name)",
        "CREATE INDEX versions_format ON versions (format, name)",
        "CREATE INDEX versions_license ON versions (license, name)",
        f"""CREATE TABLE tags (
            version_id bigint NOT NULL REFERENCES versions (id),
            tag {text} NOT NULL,
            PRIMARY KEY (version_id, tag)
        )""",
        "CREATE INDEX tags_by_tag ON tags (tag, version_id)",
        f"""CREATE TABLE tasks (
            version_id bigint NOT NULL REFERENCES versions (id),
            task {text} NOT NULL,
            PRIMARY KEY (version_id, task)
        )""",
        "CREATE INDEX tasks_by_task ON tasks (task, version_id)",
        f"""CREATE TABLE aliases (
            name {text} NOT NULL,
            alias {text} NOT NULL,
            version bigint NOT NULL,
            PRIMARY KEY (name, alias),
            FOREIGN KEY (name, version) REFERENCES versions (name, version)
        )""",
        "CREATE INDEX aliases_by_version ON aliases (name, version)",
        # One row per term of each version not deleted: bm25's weighted count,
        # the version's length (a copy: bm25 needs both) and the positions
        # phrases are matched on. The key carries weight and size, so that
        # scoring and counting read the index alone.
        f"""CREATE TABLE postings (
            term {text} NOT NULL,
            version_id bigint NOT NULL REFERENCES versions (id),
            weight integer NOT NULL,
            size integer NOT NULL,
            positions integer[] NOT NULL,
            PRIMARY KEY (term, version_id) INCLUDE (weight, size)
        )""",
        # A term's versions by weight, then length: within one weight, bm25
        # falls as the length grows, so each weight's versions come best first
        # (ties newest first, as searches break them).
        "CREATE INDEX postings_impact ON postings (term, weight, size, version_id DESC)",
        "CREATE INDEX postings_by_version ON postings (version_id)",
        # Each term's document count (bm25's IDF), kept by every write.
        f"""CREATE TABLE terms (
            term {text} PRIMARY KEY,
            docs bigint NOT NULL
        )""",
        # N and the token total of the versions not deleted (bm25's IDF and
        # average length), kept by every write.
        """CREATE TABLE corpus (
            id integer PRIMARY KEY CHECK (id = 1),
            versions bigint NOT NULL,
            tokens bigint NOT NULL
        )""",
        "INSERT INTO corpus VALUES (1, 0, 0)",
    ]


#: the tables the schema's first version makes
_TABLES = ("models", "versions", "tags", "tasks", "aliases", "postings", "terms", "corpus")

#: schema migrations, each a list of statements, applied in order; the schema
#: version is their count. Append, never edit or reorder.
MIGRATIONS: list[Callable[[], list[str]]] = [_migration_1]


# ------------------------------------------------------------------ helpers


def describe_dsn(dsn: str) -> str:
    """Where a DSN points, for messages: host (or socket folder), port,
    database and user; never the password."""
    try:
        info = conninfo_to_dict(dsn)
    except psycopg.ProgrammingError:
        return "an unparseable DSN"
    host = info.get("host") or info.get("hostaddr") or "the default socket"
    parts = [f"host {host}"]
    for key, word in (("port", "port"), ("dbname", "database"), ("user", "user")):
        if info.get(key):
            parts.append(f"{word} {info[key]}")
    return ", ".join(parts)


def _scrub(text: str, dsn: str) -> str:
    """``text`` (a driver's message) with the DSN's password, if any, masked."""
    try:
        password = conninfo_to_dict(dsn).get("password")
    except psycopg.ProgrammingError:
        password = None
    if password:
        text = text.replace(str(password), "****")
    text = re.sub(r"(password\s*=\s*)('[^']*'|\S+)", r"\1****", text)
    return re.sub(r"(://[^:/@\s]+:)[^@\s]+@", r"\1****@", text)


def _now() -> datetime:
    return datetime.now(UTC)


def _columns(card: ModelCard) -> tuple[str, str, str, str]:
    """The text a version is searched by: name, description, tags, tasks."""
    return card.name, card.description or "", " ".join(card.tags), " ".join(card.tasks)


def postings(
    tokenizer: ranking.Tokenizer, card: ModelCard
) -> tuple[int, list[tuple[str, int, list[int]]]]:
    """A version's length (bm25's D) and its postings: ``(term, weighted
    count, positions)``, positions tagged with their column."""
    size = 0
    weight: Counter[str] = Counter()
    where: dict[str, list[int]] = {}
    for column, (factor, text) in enumerate(zip(ranking.WEIGHTS, _columns(card), strict=True)):
        words = tokenizer.tokens(text)
        size += len(words)
        for index, word in enumerate(words):
            weight[word] += factor
            where.setdefault(word, []).append(column << POSITION_BITS | index)
    return size, [(term, weight[term], where[term]) for term in where]


def _bm25_sql(f: str, avgdl: str) -> str:
    """:func:`llmos.registry.ranking.bm25` in SQL: the same operations in the
    same order on float8, so the same bits."""
    k1, b = f"{ranking.K1!r}::float8", f"{ranking.B!r}::float8"
    return (
        f"((({f}) * ({k1} + 1.0::float8))"
        f" / (({f}) + {k1} * (1::float8 - {b} + {b} * v.size::float8 / {avgdl})))"
    )


#: the version ``v`` of the postings row ``p``, read by its key for each row a
#: walk reads: as a join, the planner may hash every version that passes the
#: query's filters for each weight walked (a NOT on a tag: 35 ms each, 0.7 s
#: a search, where the probes take 8 ms), and OFFSET 0 keeps it from merging
#: this subquery into such a join
_VERSION_OF_P = "(SELECT * FROM versions WHERE id = p.version_id OFFSET 0) v"

# order (:func:`~llmos.registry.store.search_order`) -> the key expression over ``v``
_SORT_KEYS = {
    "name": "v.name",
    "created": "v.created_at",
    "parameters": "COALESCE(v.parameters, -1)",
}


@attrs.define
class _Delta:
    """What a write transaction changes in the search statistics."""

    versions: int = 0
    tokens: int = 0
    terms: Counter[str] = attrs.field(factory=Counter)


@attrs.frozen
class _Scoring:
    """How a ranked search scores: ``score``, bm25 of ``v`` in SQL; ``joins``,
    the joins it reads; ``weight``, the first phrase's IDF weight; ``avgdl``;
    ``docs``, each scoring word's document count."""

    score: PgSql
    joins: PgSql
    weight: float
    avgdl: float
    docs: dict[str, int]


@attrs.frozen
class _Drive:
    """How a search finds its rows: ``source``, joins after ``versions v``
    (a postings row per word that every hit contains: the search can start
    from the rarest of them), and ``rest``, the query's other conditions;
    ``scores`` maps a driving word's phrase index to its weight column."""

    source: PgSql
    rest: PgSql
    scores: dict[int, str]


def _semi(node: Node | bool | None) -> bool:
    """Whether ``node`` ANDs a tag or task filter at its top: PostgreSQL makes
    it a join, which a walk's plan repeats for each weight (a hash of every
    version with the tag, each time), where a probe per version would do."""
    conjuncts = node.items if isinstance(node, And) else (node,)
    return any(isinstance(c, Filter) and c.field in ("tag", "task") for c in conjuncts)


def _given(
    node: Node | None, phrase: tuple[str, ...], tokens: Callable[[str], tuple[str, ...]]
) -> Node | bool:
    """``node`` for a version known to contain ``phrase``: each free text of
    those very tokens is true, and what that decides is folded away."""
    if node is None:
        return True
    if isinstance(node, Text):
        return True if node.searchable and tokens(node.text) == phrase else node
    if isinstance(node, Not):
        inner = _given(node.item, phrase, tokens)
        return (not inner) if isinstance(inner, bool) else Not(inner)
    if isinstance(node, And | Or):
        decides = isinstance(node, Or)  # the value that decides the whole
        kept: list[Node] = []
        for item in node.items:
            value = _given(item, phrase, tokens)
            if value is decides:
                return decides
            if not isinstance(value, bool):
                kept.append(value)
        if not kept:
            return not decides
        return kept[0] if len(kept) == 1 else type(node)(tuple(kept))
    return node


# -------------------------------------------------------------------- store


class PostgresStore:
    """:class:`~llmos.registry.store.RegistryStore` on a PostgreSQL server.

    ``dsn``: a libpq connection string or URL (a password in it is never
    shown; libpq's ``PGPASSWORD`` and ``~/.pgpass`` work too). ``schema``:
    the PostgreSQL schema that holds the tables (created if missing), so
    several registries can share a database. ``lock_timeout``: seconds a
    write waits for another's lock before it is :class:`Unavailable`.
    ``count_limit``: as :class:`~llmos.registry.store.SQLiteStore`'s.
    """

    def __init__(
        self,
        dsn: str,
        *,
        schema: str = "llmos",
        connect_timeout: float = 10.0,
        lock_timeout: float = 30.0,
        count_limit: int = COUNT_LIMIT,
    ) -> None:
        check_count_limit(count_limit)
        if not isinstance(schema, str) or not _SCHEMA_NAME.fullmatch(schema):
            raise ConfigError(
                f"schema {schema!r} is invalid: use 1-63 lowercase letters, digits and _,"
                " not starting with a digit"
            )
        self.dsn = dsn
        self.schema = schema
        self.connect_timeout = connect_timeout
        self.lock_timeout = lock_timeout
        self.count_limit = count_limit
        self.where = describe_dsn(dsn)
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[int, psycopg.Connection[Any]]] = []
        self._closed = False
        self._tokenizer = ranking.Tokenizer()
        try:
            conn = self._connect(first=True)
            self._local.conn, self._local.pid = conn, os.getpid()
            with self._lock:
                self._connections.append((os.getpid(), conn))
            self._migrate(conn)
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"PostgresStore({self.where!r}, schema={self.schema!r})"

    def __enter__(self) -> PostgresStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ connections

    def _connect(self, *, first: bool = False) -> psycopg.Connection[Any]:
        try:
            conn = psycopg.connect(
                self.dsn,
                autocommit=True,
                connect_timeout=max(1, round(self.connect_timeout)),
                application_name="llmos-registry",
            )
        except psycopg.ProgrammingError as exc:
            raise ConfigError(
                f"the PostgreSQL registry's dsn is not a valid connection string:"
                f" {_scrub(str(exc), self.dsn)}; write 'host=... dbname=... user=...' or"
                " 'postgresql://user@host:port/dbname'"
            ) from None
        except psycopg.OperationalError as exc:
            reason = _scrub(str(exc).strip(), self.dsn)
            what = f"cannot connect to the PostgreSQL registry at {self.where}: {reason}"
            if first:
                raise ConfigError(
                    f"{what}; check that the server is running and reachable there and that"
                    " the dsn ([plugins.postgres] dsn, or the LLMOS_POSTGRES_DSN environment"
                    " variable) names the right host, port, database and user"
                ) from None
            raise Unavailable(what) from None
        try:
            conn.execute(f"SET search_path TO {self.schema}")
            conn.execute(f"SET lock_timeout = {int(self.lock_timeout * 1000)}")
            # A search is a page of 20: worker processes cost more to start
            # and to hand rows back than they save (a broad phrase at 20k
            # cards, 2 cores: 213 ms a search with two workers, 61 ms without).
            conn.execute("SET max_parallel_workers_per_gather = 0")
            # Nor is compiling a statement worth it: a walk's estimated cost
            # passes jit_above_cost, and LLVM took 11 ms to compile one that
            # runs in 7 ms.
            conn.execute("SET jit = off")
        except psycopg.Error:
            conn.close()
            raise
        return conn

    def _conn(self) -> psycopg.Connection[Any]:
        if self._closed:
            raise LlmosError(f"registry store {self!r} is closed")
        pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        # A connection must not cross a fork: the child opens its own.
        if conn is None or self._local.pid != pid or conn.closed:
            conn = self._connect()
            self._local.conn, self._local.pid = conn, pid
            with self._lock:
                self._connections.append((pid, conn))
        return conn

    def _drop(self) -> None:
        """Forget this thread's connection (the server went away)."""
        conn = getattr(self._local, "conn", None)
        self._local.conn = None
        if conn is not None:
            conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pid = os.getpid()
            for owner, conn in self._connections:
                if owner == pid:
                    conn.close()
            self._connections.clear()
        self._tokenizer.close()

    @contextmanager
    def _errors(self) -> Iterator[None]:
        """Server trouble as llmos errors: a lost connection or a lock held
        too long is :class:`Unavailable` (retry)."""
        try:
            yield
        except pg_errors.LockNotAvailable as exc:
            raise Unavailable(
                f"the PostgreSQL registry stayed locked for {self.lock_timeout:g} s: {exc}"
            ) from exc
        except psycopg.OperationalError as exc:
            self._drop()
            raise Unavailable(
                f"the PostgreSQL registry at {self.where} is unavailable:"
                f" {_scrub(str(exc).strip(), self.dsn)}"
            ) from exc

    def _write(self, work: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """``work(cursor)`` in a write transaction, tried again when it lost a
        deadlock (another transaction locked the same models in the other
        order) or a serialization conflict."""
        for attempt in range(_RETRIES):
            with self._errors():
                conn = self._conn()
                try:
                    with conn.transaction(), conn.cursor() as cur:
                        return work(cur)
                except (pg_errors.DeadlockDetected, pg_errors.SerializationFailure):
                    if attempt == _RETRIES - 1:
                        raise
                    time.sleep(0.005 * (attempt + 1))
        raise AssertionError("unreachable")

    def _read(self, work: Callable[[psycopg.Cursor[Any]], T]) -> T:
        """``work(cursor)`` in a read-only transaction: one snapshot."""
        with self._errors():
            conn = self._conn()
            with conn.transaction(), conn.cursor() as cur:
                cur.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY")
                return work(cur)

    def _migrate(self, conn: psycopg.Connection[Any]) -> None:
        target = len(MIGRATIONS)
        what = f"PostgreSQL registry at {self.where} (schema {self.schema})"
        with self._errors(), conn.transaction(), conn.cursor() as cur:
            # One migrator at a time across every process and machine.
            cur.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s))", (f"llmos-registry:{self.schema}",)
            )
            cur.execute(f"CREATE SCHEMA IF NOT EXISTS {self.schema}")
            cur.execute(
                "CREATE TABLE IF NOT EXISTS registry_schema ("
                " id integer PRIMARY KEY CHECK (id = 1), version integer NOT NULL)"
            )
            cur.execute("SELECT version FROM registry_schema WHERE id = 1")
            row = cur.fetchone()
            current = 0 if row is None else int(row[0])
            if current > target:
                raise ConfigError(
                    f"the {what} has schema version {current}, newer than this llmos-postgres"
                    f" understands ({target}); upgrade llmos-postgres or use another schema"
                )
            if current == 0:
                # A schema another application uses: its tables stay its own.
                taken = cur.execute(
                    "SELECT string_agg(table_name, ', ' ORDER BY table_name)"
                    " FROM information_schema.tables"
                    " WHERE table_schema = %s AND table_name = ANY (%s)",
                    (self.schema, list(_TABLES)),
                ).fetchone()[0]
                if taken:
                    raise ConfigError(
                        f"the {what} already holds tables llmos-postgres did not make"
                        f" ({taken}); set [plugins.postgres] schema to a schema of its own"
                    )
            for step in MIGRATIONS[current:]:
                for statement in step():
                    cur.execute(statement)
            cur.execute(
                "INSERT INTO registry_schema VALUES (1, %s)"
                " ON CONFLICT (id) DO UPDATE SET version = excluded.version",
                (target,),
            )
        if current != target:
            log.info("registry migrated", where=what, schema_from=current, schema_to=target)

    @property
    def schema_version(self) -> int:
        """The registry's schema version (``registry_schema``)."""
        return self._read(
            lambda c: int(c.execute("SELECT version FROM registry_schema").fetchone()[0])
        )

    # --------------------------------------------------------------- writing

    def register(
        self, card: ModelCard, created_by: str | None = None, *, if_changed: bool = False
    ) -> ModelCard:
        now = _now()

        def work(c: psycopg.Cursor[Any]) -> ModelCard:
            delta = _Delta()
            stored = self._insert(c, card, created_by, now, if_changed, delta)
            self._count(c, delta)
            return stored

        stored = self._write(work)
        log.info("model registered", model=stored.ref)
        return stored

    def register_many(
        self, cards: Iterable[ModelCard], created_by: str | None = None
    ) -> list[ModelCard]:
        cards = list(cards)
        now = _now()

        def work(c: psycopg.Cursor[Any]) -> list[ModelCard]:
            delta = _Delta()
            stored = [self._insert(c, card, created_by, now, False, delta) for card in cards]
            self._count(c, delta)
            return stored

        stored = self._write(work)
        log.info("models registered", count=len(stored))
        return stored

    @staticmethod
    def _count(c: psycopg.Cursor[Any], delta: _Delta) -> None:
        """Add a transaction's changes to the search statistics: last in it,
        so that the rows every writer updates are held briefly, and always
        the corpus row first, then the terms in order, so that writers queue
        at the corpus row and never deadlock on the terms."""
        if delta.versions or delta.tokens or delta.terms:
            c.execute(
                "UPDATE corpus SET versions = versions + %s, tokens = tokens + %s WHERE id = 1",
                (delta.versions, delta.tokens),
            )
        changed = sorted(term for term, n in delta.terms.items() if n)
        if changed:
            c.execute(
                "INSERT INTO terms (term, docs)"
                " SELECT * FROM unnest(%s::text[], %s::bigint[]) ORDER BY 1"
                " ON CONFLICT (term) DO UPDATE SET docs = terms.docs + excluded.docs",
                (changed, [delta.terms[term] for term in changed]),
            )

    def _insert(
        self,
        c: psycopg.Cursor[Any],
        card: ModelCard,
        created_by: str | None,
        now: datetime,
        if_changed: bool,
        delta: _Delta,
    ) -> ModelCard:
        name = check_card(card).name
        c.execute(
            "INSERT INTO models (name, created_at) VALUES (%s, %s) ON CONFLICT (name) DO NOTHING",
            (name, now.timestamp()),
        )
        # The model's row, locked: registrations of this name queue here, so
        # last_version + 1 is this one's alone (gapless, whoever registers).
        last = c.execute(
            "SELECT last_version FROM models WHERE name = %s FOR UPDATE", (name,)
        ).fetchone()[0]
        if if_changed and last:
            latest = self._alias_row(c, name, LATEST)
            if latest is not None and same_content(latest.card, card):
                return latest.card
        stored = new_version(card, last, now, created_by)
        c.execute("UPDATE models SET last_version = %s WHERE name = %s", (stored.version, name))
        if last:
            c.execute(
                "UPDATE versions SET is_latest = false WHERE name = %s AND is_latest", (name,)
            )
        size, rows = postings(self._tokenizer, stored)
        row_id = c.execute(
            "INSERT INTO versions (name, version, is_latest, created_at, created_by, provider,"
            " family, format, license, parameters, size, card)"
            " VALUES (%s, %s, true, %s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING id",
            (
                name,
                stored.version,
                now.timestamp(),
                stored.created_by,
                *filter_columns(stored),
                size,
                card_json(stored),
            ),
        ).fetchone()[0]
        self._many(c, "tasks", "task", row_id, stored.tasks)
        self._many(c, "tags", "tag", row_id, stored.tags)
        self._post(c, row_id, size, rows)
        self._point(c, name, LATEST, stored.version)
        delta.versions += 1
        delta.tokens += size
        delta.terms.update(term for term, _, _ in rows)
        return stored

    @staticmethod
    def _many(
        c: psycopg.Cursor[Any], table: str, column: str, row_id: int, values: Sequence[str]
    ) -> None:
        lowered = filter_values(values)
        if lowered:
            c.execute(
                f"INSERT INTO {table} (version_id, {column}) SELECT %s, unnest(%s::text[])",
                (row_id, lowered),
            )

    @staticmethod
    def _post(
        c: psycopg.Cursor[Any], row_id: int, size: int, rows: list[tuple[str, int, list[int]]]
    ) -> None:
        if rows:
            c.execute(
                "INSERT INTO postings (term, version_id, weight, size, positions)"
                " SELECT t, %s, w, %s, string_to_array(p, ',')::integer[]"
                " FROM unnest(%s::text[], %s::integer[], %s::text[]) AS r (t, w, p)",
                (
                    row_id,
                    size,
                    [term for term, _, _ in rows],
                    [weight for _, weight, _ in rows],
                    [",".join(map(str, where)) for _, _, where in rows],
                ),
            )

    @staticmethod
    def _point(c: psycopg.Cursor[Any], name: str, alias: str, version: int) -> None:
        c.execute(
            "INSERT INTO aliases (name, alias, version) VALUES (%s, %s, %s)"
            " ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version",
            (name, alias, version),
        )

    def _refresh_latest(self, c: psycopg.Cursor[Any], name: str) -> None:
        """Point ``latest`` (and ``is_latest``) at the newest version not deleted."""
        newest = c.execute(
            "SELECT max(version) FROM versions WHERE name = %s AND status <> 'deleted'", (name,)
        ).fetchone()[0]
        c.execute("UPDATE versions SET is_latest = false WHERE name = %s AND is_latest", (name,))
        if newest is None:
            c.execute("DELETE FROM aliases WHERE name = %s AND alias = %s", (name, LATEST))
            return
        c.execute(
            "UPDATE versions SET is_latest = true WHERE name = %s AND version = %s",
            (name, newest),
        )
        self._point(c, name, LATEST, newest)

    @staticmethod
    def _lock_model(c: psycopg.Cursor[Any], name: str) -> None:
        """Queue behind registrations of ``name`` (they move ``latest``)."""
        c.execute("SELECT 1 FROM models WHERE name = %s FOR UPDATE", (name,))

    def set_alias(self, name: str, alias: str, version: int) -> None:
        check_manual_alias(alias)
        check_version_number(version)
        ref = f"{validate_model_name(name)}@{version}"

        def work(c: psycopg.Cursor[Any]) -> None:
            self._lock_model(c, name)
            row = self._resolve(c, ref)
            self._point(c, row.name, alias, row.version)

        self._write(work)
        log.info("alias set", model=f"{name}@{alias}", version=version)

    def remove_alias(self, name: str, alias: str) -> None:
        check_manual_alias(alias)
        validate_model_name(name)

        def work(c: psycopg.Cursor[Any]) -> None:
            c.execute("DELETE FROM aliases WHERE name = %s AND alias = %s", (name, alias))
            if c.rowcount == 0:
                raise self._missing(c, name, alias)

        self._write(work)
        log.info("alias removed", model=f"{name}@{alias}")

    def _edit(self, ref: str, change: CardEdit) -> ModelCard:
        def work(c: psycopg.Cursor[Any]) -> ModelCard:
            row = self._resolve(c, ref, lock=True)
            card = change(row.card)
            if card == row.card:
                return card
            c.execute("UPDATE versions SET card = %s WHERE id = %s", (card_json(card), row.id))
            c.execute("DELETE FROM tags WHERE version_id = %s", (row.id,))
            self._many(c, "tags", "tag", row.id, card.tags)
            old = c.execute("SELECT size FROM versions WHERE id = %s", (row.id,)).fetchone()[0]
            gone = c.execute(
                "DELETE FROM postings WHERE version_id = %s RETURNING term", (row.id,)
            ).fetchall()
            size, rows = postings(self._tokenizer, card)
            self._post(c, row.id, size, rows)
            c.execute("UPDATE versions SET size = %s WHERE id = %s", (size, row.id))
            delta = _Delta(tokens=size - old)
            delta.terms.update(term for term, _, _ in rows)
            delta.terms.subtract(term for (term,) in gone)
            self._count(c, delta)
            return card

        return self._write(work)

    def tag(self, ref: str, *tags: str) -> ModelCard:
        return self._edit(ref, edit_add_tags(tags))

    def untag(self, ref: str, *tags: str) -> ModelCard:
        return self._edit(ref, edit_remove_tags(tags))

    def set_description(self, ref: str, text: str) -> ModelCard:
        return self._edit(ref, edit_description(text))

    def deprecate(self, ref: str) -> ModelCard:
        def work(c: psycopg.Cursor[Any]) -> VersionRow:
            row = self._resolve(c, ref, lock=True)
            c.execute("UPDATE versions SET status = 'deprecated' WHERE id = %s", (row.id,))
            return row

        row = self._write(work)
        log.info("model deprecated", model=row.card.ref)
        return row.card

    def delete(self, ref: str) -> ModelCard:
        name, _ = parse_ref(ref)

        def work(c: psycopg.Cursor[Any]) -> VersionRow:
            self._lock_model(c, name)
            row = self._resolve(c, ref, lock=True)
            size = c.execute(
                "UPDATE versions SET status = 'deleted', is_latest = false WHERE id = %s"
                " RETURNING size",
                (row.id,),
            ).fetchone()[0]
            c.execute(
                "DELETE FROM aliases WHERE name = %s AND version = %s", (row.name, row.version)
            )
            gone = c.execute(
                "DELETE FROM postings WHERE version_id = %s RETURNING term", (row.id,)
            ).fetchall()
            self._refresh_latest(c, row.name)
            delta = _Delta(versions=-1, tokens=-size)
            delta.terms.subtract(term for (term,) in gone)
            self._count(c, delta)
            return row

        row = self._write(work)
        log.info("model deleted", model=row.card.ref)
        return row.card

    # --------------------------------------------------------------- reading

    _ROW_COLUMNS = "v.id, v.name, v.version, v.status, v.card"

    def _alias_row(self, c: psycopg.Cursor[Any], name: str, alias: str) -> VersionRow | None:
        return VersionRow.load(
            c.execute(
                f"SELECT {self._ROW_COLUMNS} FROM aliases a"
                " JOIN versions v ON v.name = a.name AND v.version = a.version"
                " WHERE a.name = %s AND a.alias = %s",
                (name, alias),
            ).fetchone()
        )

    def _resolve(self, c: psycopg.Cursor[Any], ref: str, *, lock: bool = False) -> VersionRow:
        name, selector = parse_ref(ref)
        if isinstance(selector, int):
            row = VersionRow.load(
                c.execute(
                    f"SELECT {self._ROW_COLUMNS} FROM versions v"
                    " WHERE v.name = %s AND v.version = %s",
                    (name, selector),
                ).fetchone()
            )
        else:
            row = self._alias_row(c, name, selector)
        if row is None:
            raise self._missing(c, name, selector)
        if lock:
            # The version's row, locked and read again: a concurrent edit of
            # it either went first (and is seen) or waits.
            locked = VersionRow.load(
                c.execute(
                    f"SELECT {self._ROW_COLUMNS} FROM versions v WHERE v.id = %s FOR UPDATE",
                    (row.id,),
                ).fetchone()
            )
            assert locked is not None
            row = locked
        return check_live(row)

    @staticmethod
    def _missing(c: psycopg.Cursor[Any], name: str, selector: int | str) -> NotFoundError:
        """The NotFoundError that says best what is missing."""
        return missing_ref(
            name,
            selector,
            model_exists=lambda: (
                c.execute("SELECT 1 FROM models WHERE name = %s", (name,)).fetchone() is not None
            ),
            last_version=lambda: c.execute(
                "SELECT max(version) FROM versions WHERE name = %s", (name,)
            ).fetchone()[0],
            aliases=lambda: [
                a
                for (a,) in c.execute(
                    "SELECT alias FROM aliases WHERE name = %s ORDER BY alias", (name,)
                ).fetchall()
            ],
        )

    def get(self, ref: str) -> ModelCard:
        parse_ref(ref)  # a malformed ref is a UsageError before any connection
        return self._read(lambda c: self._resolve(c, ref).card)

    def versions(self, name: str) -> list[VersionInfo]:
        validate_model_name(name)

        def work(c: psycopg.Cursor[Any]) -> list[VersionInfo]:
            rows = c.execute(
                "SELECT version, status, card FROM versions WHERE name = %s ORDER BY version",
                (name,),
            ).fetchall()
            return version_infos(name, rows, lambda names: self._aliases(c, names))

        return self._read(work)

    @staticmethod
    def _aliases(
        c: psycopg.Cursor[Any], names: Sequence[str]
    ) -> dict[tuple[str, int], tuple[str, ...]]:
        return group_aliases(
            c.execute(
                "SELECT name, version, alias FROM aliases WHERE name = ANY (%s)", (list(names),)
            ).fetchall()
        )

    @staticmethod
    def _cards(
        c: psycopg.Cursor[Any], ids: Sequence[int]
    ) -> dict[int, tuple[VersionStatus, ModelCard]]:
        return {
            row_id: (VersionStatus(status), load_card(card))
            for row_id, status, card in c.execute(
                "SELECT id, status, card FROM versions WHERE id = ANY (%s)", (list(ids),)
            ).fetchall()
        }

    def _score(
        self,
        c: psycopg.Cursor[Any],
        phrases: Sequence[tuple[str, ...]],
        joined: Mapping[int, str],
    ) -> _Scoring | None:
        """bm25 of the version ``v`` for the scoring phrases, in SQL, with the
        IDFs and average length of now, and the joins it reads (a word's
        postings row, joined: a hash join over its matches, where a lookup per
        version costs an index probe each); None when nothing can score.
        ``joined``: the phrases whose weighted count a driving join already
        reads (phrase index -> column)."""
        versions, tokens = c.execute("SELECT versions, tokens FROM corpus").fetchone()
        if not versions or not phrases or not all(phrases):
            return None
        avgdl = tokens / versions
        docs: dict[str, int] = dict.fromkeys((w for phrase in phrases for w in phrase), 0)
        docs.update(
            c.execute(
                "SELECT term, docs FROM terms WHERE term = ANY (%s)", (list(docs),)
            ).fetchall()
        )
        terms = ["0.0::float8"]
        params: list[Any] = []
        joins: list[str] = []
        words: list[str] = []
        for i, phrase in enumerate(phrases):
            weight = sum(ranking.idf(versions, docs[w]) for w in phrase)
            if i in joined:
                f = PgSql(f"{joined[i]}::float8")
            elif len(phrase) == 1:
                joins.append(
                    f"LEFT JOIN postings s{i} ON s{i}.version_id = v.id AND s{i}.term = %s"
                )
                words.append(phrase[0])
                f = PgSql(f"COALESCE(s{i}.weight, 0)::float8")
            else:
                f = phrase_weight(phrase, "v.id")
            terms.append(f"%s::float8 * {_bm25_sql(f.sql, '%s::float8')}")
            # f appears twice in bm25: its parameters twice, around avgdl.
            params += [weight, *f.params, *f.params, avgdl]
        return _Scoring(
            PgSql("(" + " + ".join(terms) + ")", tuple(params)),
            PgSql(" ".join(joins), tuple(words)),
            params[0],
            avgdl,
            docs,
        )

    def _drive(self, node: Node | None, has_match: bool) -> _Drive:
        """Split ``node`` into the words every hit contains (the free text
        ANDed at the top, when the plan has it: ``has_match``), joined, and
        the rest; the n-th such text is the plan's n-th scoring phrase."""
        if node is None:
            return _Drive(PgSql(""), TRUE, {})
        conjuncts = list(node.items) if isinstance(node, And) else [node]
        joins: list[str] = []
        words: list[str] = []
        scores: dict[int, str] = {}
        rest: list[Node] = []
        adjacent: list[str] = []
        phrase = 0
        for item in conjuncts:
            if not (has_match and isinstance(item, Text) and item.searchable):
                rest.append(item)
                continue
            tokens = self._tokenizer.phrase(item.text)
            if not tokens:  # scores nothing, as in SQLite: still the plan's phrase
                rest.append(item)
                phrase += 1
                continue
            first = len(joins)
            for n, token in enumerate(tokens, start=first):
                joins.append(f"JOIN postings d{n} ON d{n}.version_id = v.id AND d{n}.term = %s")
                words.append(token)
            if len(tokens) == 1:
                scores[phrase] = f"d{first}.weight"
            else:
                # A phrase: its words' rows joined, and its weighted count
                # from where their positions follow each other (none: NULL).
                follow = " AND ".join(
                    f"x + {k} = ANY (d{first + k}.positions)" for k in range(1, len(tokens))
                )
                joins.append(
                    f"CROSS JOIN LATERAL (SELECT sum({column_weight('x')}) AS f"
                    f" FROM unnest(d{first}.positions) AS u (x) WHERE {follow}) ph{first}"
                )
                adjacent.append(f"ph{first}.f IS NOT NULL")
                scores[phrase] = f"ph{first}.f"
            phrase += 1
        where = to_pg(And(tuple(rest)), self._tokenizer.phrase) if rest else TRUE
        if adjacent:
            where = PgSql(" AND ".join([where.sql, *adjacent]), where.params)
        return _Drive(PgSql(" ".join(joins), tuple(words)), where, scores)

    @staticmethod
    def _weights(word: str) -> PgSql:
        """A recursive CTE ``w (weight)``: the weights ``word`` has in the
        postings, one index probe each (a loose index scan)."""
        return PgSql(
            "WITH RECURSIVE w (weight) AS ("
            " SELECT min(weight) FROM postings WHERE term = %s"
            " UNION ALL"
            " SELECT (SELECT min(weight) FROM postings WHERE term = %s AND weight > w.weight)"
            " FROM w WHERE w.weight IS NOT NULL)",
            (word, word),
        )

    def _walk(
        self,
        c: psycopg.Cursor[Any],
        word: str,
        score: PgSql,
        source: PgSql,
        condition: PgSql,
        want: int,
        after: tuple[Any, ...],
        desc: bool = True,
    ) -> list[tuple[Any, ...]]:
        """The best ``want`` of the versions that contain ``word``, pass
        ``condition`` and lie beyond the cursor, by ``score`` (joins
        ``source`` after ``versions v``), among the ``want`` shortest of
        each weight ``word`` has (a loose index scan of the impact index):
        ``(id, score)`` best first, ties newest first (``desc`` false: the
        longest of each weight, worst first, ties oldest first).

        For one word scored by its own weight, that is the best ``want`` of
        all (bm25 falls with the length at one weight, and the index lists
        equal lengths newest first): a page per weight where scoring reads
        every match. For a phrase, a first guess (see :meth:`_bounded`)."""
        order, direction, beyond = (
            ("p.size ASC, p.version_id DESC", "DESC", "<")
            if desc
            else ("p.size DESC, p.version_id ASC", "ASC", ">")
        )
        cursor = f" AND ({score.sql}, v.id) {beyond} (%s, %s)" if after else ""
        weights = self._weights(word)
        return c.execute(
            f"{weights.sql} SELECT id, k FROM w CROSS JOIN LATERAL ("
            f" SELECT v.id AS id, {score.sql} AS k"
            f" FROM postings p CROSS JOIN LATERAL {_VERSION_OF_P} {source.sql}"
            f" WHERE p.term = %s AND p.weight = w.weight AND {condition.sql}{cursor}"
            f" ORDER BY {order} LIMIT %s) page"
            f" ORDER BY k {direction}, id {direction} LIMIT %s",
            (
                *weights.params,
                *score.params,
                *source.params,
                word,
                *condition.params,
                *((*score.params, *after) if after else ()),
                want,
                want,
            ),
        ).fetchall()

    def _bounded(
        self,
        c: psycopg.Cursor[Any],
        words: Sequence[str],
        scoring: _Scoring,
        source: PgSql,
        condition: PgSql,
        want: int,
        after: tuple[Any, ...],
    ) -> list[tuple[Any, ...]]:
        """The best ``want`` versions for a query whose one scoring phrase is
        ``words`` (several), every hit containing it (``source`` joins its
        postings, ``condition`` requires its words to follow each other):
        ``(id, score)`` best first, ties newest first, as scoring every match
        gives them, reading only the matches that can rank among them.

        A phrase's weighted count is at most each of its words' (every
        occurrence of the phrase is one of each word, in the same column),
        and bm25 grows with the count: ``weight * bm25(min of the words'
        weights, length)`` bounds a version's score. First the shortest
        versions of each weight of the rarest word are scored
        (:meth:`_walk`); the ``want``-th best of them, ``T``, is a score that
        ``want`` matches reach. Then only the versions whose bound reaches
        ``T`` are scored: the others rank below ``want`` matches."""
        rare = min(words, key=lambda w: (scoring.docs.get(w, 0), w))
        found = self._walk(c, rare, scoring.score, source, condition, want, after)
        if len(found) < want:
            # Fewer than ``want`` at every weight: every match was scored.
            return found
        floor = float(found[-1][1])
        k1, b = ranking.K1, ranking.B
        # bm25(m, s) >= floor / weight  <=>  s <= (m * slope - base) * scale;
        # one length more than that, so that rounding cannot drop a version.
        slope = (k1 + 1.0) * scoring.weight / floor - 1.0 if floor > 0 else math.inf
        base, scale = k1 * (1.0 - b), scoring.avgdl / (k1 * b)
        others = [w for w in words if w != rare]
        least = (
            "LEAST(" + ", ".join(["w.weight", *(f"e{i}.weight" for i in range(len(others)))]) + ")"
        )
        longest = "({m}::float8 * %s::float8 - %s::float8) * %s::float8 + 1.0"
        bounds = (slope, base, scale)
        # An integer for the weight's own bound: a range of the impact index.
        within = f"p.size <= LEAST(floor({longest.format(m='w.weight')}), 2147483647)::integer"
        fits = f"p.size::float8 <= {longest.format(m=least)}"
        # Index-only probes of the other words' weights, before any version is read.
        probes = " ".join(
            f"JOIN postings e{i} ON e{i}.term = %s AND e{i}.version_id = p.version_id"
            for i in range(len(others))
        )
        cursor = f" AND ({scoring.score.sql}, v.id) < (%s, %s)" if after else ""
        weights = self._weights(rare)
        return c.execute(
            f"{weights.sql} SELECT id, k FROM w CROSS JOIN LATERAL ("
            f" SELECT v.id AS id, {scoring.score.sql} AS k FROM postings p {probes}"
            f" CROSS JOIN LATERAL {_VERSION_OF_P} {source.sql}"
            f" WHERE p.term = %s AND p.weight = w.weight AND {within}"
            f" AND {fits} AND {condition.sql}{cursor}"
            # Planned for one weight at a time (not flattened into hash joins
            # of the words' every posting): a range of lengths, then probes.
            " OFFSET 0) page"
            " ORDER BY k DESC, id DESC LIMIT %s",
            (
                *weights.params,
                *scoring.score.params,
                *others,
                *source.params,
                rare,
                *bounds,
                *bounds,
                *condition.params,
                *((*scoring.score.params, *after) if after else ()),
                want,
            ),
        ).fetchall()

    def _best(
        self,
        c: psycopg.Cursor[Any],
        phrase: tuple[str, ...],
        scoring: _Scoring,
        drive: _Drive,
        scope: str,
        want: int,
        after: tuple[Any, ...],
        desc: bool,
    ) -> list[tuple[Any, ...]]:
        """The best ``want`` hits beyond the cursor of a query with one
        scoring phrase that every hit of ``drive`` contains (``desc`` false,
        one word only: the worst)."""
        condition = PgSql(f"{scope} AND {drive.rest.sql}", drive.rest.params)
        if len(phrase) == 1:
            # Scored from the walked row itself: no join to read.
            score = PgSql(
                f"(0.0::float8 + %s::float8 * {_bm25_sql('p.weight::float8', '%s::float8')})",
                (scoring.weight, scoring.avgdl),
            )
            return self._walk(c, phrase[0], score, PgSql(""), condition, want, after, desc)
        assert desc
        return self._bounded(c, phrase, scoring, drive.source, condition, want, after)

    def _zeros(
        self,
        c: psycopg.Cursor[Any],
        node: Node,
        text: str,
        scope: str,
        want: int,
        after: tuple[Any, ...],
    ) -> list[tuple[Any, ...]]:
        """The first ``want`` hits of ``node`` beyond the cursor that do not
        contain the scoring ``text`` (score 0, after every hit that does),
        newest first."""
        if after and after[0] < 0:
            return []
        rest = to_pg(And((node, Not(Text(text)))), self._tokenizer.phrase)
        cursor = " AND v.id < %s" if after and after[0] == 0 else ""
        return c.execute(
            f"SELECT v.id, 0.0::float8 FROM versions v WHERE {scope} AND {rest.sql}{cursor}"
            " ORDER BY v.id DESC LIMIT %s",
            (*rest.params, *((after[1],) if cursor else ()), want),
        ).fetchall()

    def search(
        self,
        query: str = "",
        *,
        sort: str = "relevance",
        descending: bool | None = None,
        limit: int = 20,
        offset: int = 0,
        cursor: str | None = None,
        all_versions: bool = False,
    ) -> SearchPage:
        check_search(sort, limit, offset, cursor)
        node = parse_query(query)
        plan = plan_search(node)
        order, desc = search_order(sort, plan.has_text, descending)
        ranked = order is None
        # The same fingerprint and cursors as SQLite's: its cursors are this store's too.
        fingerprint = search_fingerprint(query, sort, desc, all_versions)
        after = read_cursor(cursor, fingerprint, order)
        scope = "v.status <> 'deleted'" if all_versions else "v.is_latest"
        drive = self._drive(node, plan.match is not None)
        condition = f"{scope} AND {drive.rest.sql}"
        params = (*drive.source.params, *drive.rest.params)
        phrases = [self._tokenizer.phrase(text) for text in plan.phrases]
        # One scoring phrase, and many matches, best first: read from the
        # impact index, not scored all (free text under OR: the hits that
        # contain the phrase, then those that score 0).
        quick = ranked and len(phrases) == 1 and len(phrases[0]) > 0
        positive = drive
        if quick and plan.match is None:
            # The hits that contain the phrase, as if it drove the search,
            # and the query for them: the phrase true wherever it stands
            # (left as it is, its test reads every hit of the phrase).
            given = _given(node, phrases[0], self._tokenizer.phrase)
            quick = desc and not _semi(given)
            if quick:
                contains = self._drive(Text(plan.phrases[0]), True)
                whole = (
                    TRUE
                    if given is True
                    else PgSql("FALSE")
                    if given is False
                    else to_pg(given, self._tokenizer.phrase)
                )
                positive = _Drive(
                    contains.source,
                    PgSql(
                        f"{whole.sql} AND {contains.rest.sql}",
                        (*whole.params, *contains.rest.params),
                    ),
                    contains.scores,
                )
        elif quick:
            # One word every hit contains is walked whatever else the query
            # says and either way; a phrase, best first only.
            quick = 0 in drive.scores and (len(phrases[0]) == 1 or (desc and not _semi(node)))

        def work(c: psycopg.Cursor[Any]) -> SearchPage:
            total = c.execute(
                f"SELECT count(*) FROM (SELECT 1 FROM versions v {drive.source.sql}"
                f" WHERE {condition} LIMIT %s) s",
                (*params, self.count_limit + 1),
            ).fetchone()[0]
            rows: list[tuple[Any, ...]] = []
            if ranked:
                want = offset + limit + 1
                if quick and total > self.count_limit:
                    scoring = self._score(c, phrases, positive.scores)
                    if scoring is not None:
                        best = self._best(
                            c, phrases[0], scoring, positive, scope, want, after, desc
                        )
                        if plan.match is None and len(best) < want:
                            assert node is not None
                            best += self._zeros(
                                c, node, plan.phrases[0], scope, want - len(best), after
                            )
                        rows = best[offset:]
                else:
                    scoring = self._score(c, phrases, drive.scores)
                    if scoring is not None:
                        source = PgSql(
                            f"{drive.source.sql} {scoring.joins.sql}",
                            (*drive.source.params, *scoring.joins.params),
                        )
                        rows = self._page(
                            c,
                            scoring.score,
                            source,
                            condition,
                            drive.rest.params,
                            desc,
                            limit,
                            offset,
                            after,
                        )
            else:
                assert order is not None
                rows = self._page(
                    c,
                    PgSql(_SORT_KEYS[order]),
                    drive.source,
                    condition,
                    drive.rest.params,
                    desc,
                    limit,
                    offset,
                    after,
                )
            return search_page(
                rows,
                limit=limit,
                offset=offset,
                cursor=cursor,
                fingerprint=fingerprint,
                ranked=ranked,
                total=total,
                count_limit=self.count_limit,
                cards=lambda ids: self._cards(c, ids),
                aliases=lambda names: self._aliases(c, names),
            )

        return self._read(work)

    @staticmethod
    def _page(
        c: psycopg.Cursor[Any],
        key: PgSql,
        source: PgSql,
        condition: str,
        params: tuple[Any, ...],
        desc: bool,
        limit: int,
        offset: int,
        after: tuple[Any, ...],
    ) -> list[tuple[Any, ...]]:
        """``(id, key)`` rows of one page in ``key`` order (ties by id), one
        more than ``limit`` if there are more; ``source`` (joins after
        ``versions v``) and ``condition`` find the rows."""
        direction, beyond = ("DESC", "<") if desc else ("ASC", ">")
        inner = f"SELECT v.id AS id, {key.sql} AS k FROM versions v {source.sql} WHERE {condition}"
        cursor = f" WHERE (k, id) {beyond} (%s, %s)" if after else ""
        return c.execute(
            f"SELECT id, k FROM ({inner}) s{cursor}"
            f" ORDER BY k {direction}, id {direction} LIMIT %s OFFSET %s",
            (*key.params, *source.params, *params, *after, limit + 1, offset),
        ).fetchall()
