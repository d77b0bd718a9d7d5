"""The registry's storage: model versions, aliases, tags and search.

:class:`RegistryStore` is the interface the kernel talks to, so a server
database can replace the embedded one when several machines share a registry;
:class:`SQLiteStore` implements it on one SQLite file in WAL mode with an FTS5
index.

Several processes (the daemon, the CLI, a second daemon) may use one file at
once. What makes that safe:

* every thread of every process has its own connection;
* writes run in short ``BEGIN IMMEDIATE`` transactions, so a writer takes the
  write lock before it reads what it will change (the next version number, the
  current ``latest``) and waits up to ``busy_timeout`` for another writer;
* WAL lets readers go on while one process writes; a commit is in the WAL file
  before ``register`` returns, so a registration that returned survives the
  process being killed (``synchronous=NORMAL`` only risks the last commits on
  a power cut, never corruption);
* reads that take several statements (a search page, its total, its aliases)
  share one read transaction, so they see one snapshot.

The schema is versioned with ``PRAGMA user_version`` and :data:`MIGRATIONS`,
applied in order inside one transaction; a file from a newer llmos is refused.
"""

from __future__ import annotations

import base64
import binascii
import enum
import hashlib
import json
import math
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import attrs
import structlog

from llmos import db
from llmos.errors import LlmosError, NotFoundError, UsageError
from llmos.registry import ranking
from llmos.registry.query import FTS_TABLE, TRUE, SearchPlan, Sql, parse_query, plan_search
from llmos.types import ModelCard, validate_model_name

__all__ = [
    "COUNT_LIMIT",
    "LATEST",
    "MAX_INT",
    "MAX_ITEMS",
    "MAX_LIMIT",
    "MAX_OFFSET",
    "MIGRATIONS",
    "SORTS",
    "CardEdit",
    "RegistryStore",
    "SQLiteStore",
    "SearchHit",
    "SearchPage",
    "VersionInfo",
    "VersionRow",
    "VersionStatus",
    "card_json",
    "check_card",
    "check_count_limit",
    "check_live",
    "check_manual_alias",
    "check_search",
    "check_version_number",
    "clean_tags",
    "decode_cursor",
    "edit_add_tags",
    "edit_description",
    "edit_remove_tags",
    "encode_cursor",
    "filter_columns",
    "filter_values",
    "group_aliases",
    "load_card",
    "missing_ref",
    "new_version",
    "parse_ref",
    "read_cursor",
    "same_content",
    "search_fingerprint",
    "search_order",
    "search_page",
    "text_problem",
    "validate_alias",
    "version_infos",
]

log = structlog.get_logger("llmos.registry")

#: the alias the registry keeps on the newest version that is not deleted
LATEST = "latest"
#: the orders :meth:`RegistryStore.search` knows
SORTS = ("relevance", "name", "created", "parameters")
#: bytes of the file each connection maps (SQLite's default build caps it at 2 GiB - 64 KiB)
MMAP_SIZE = 0x7FFF0000
#: KiB of page cache per connection: what a write transaction changes stays
#: in memory until it commits (reads come from the map)
CACHE_KIB = 32 * 1024
#: most hits one search page may carry
MAX_LIMIT = 1000
#: SQLite's largest integer: parameter counts and version numbers above it cannot be stored
MAX_INT = 2**63 - 1
#: largest search offset: ``offset + limit`` must still be a SQLite integer
MAX_OFFSET = 2**62
#: longest provider, family, licence, tag, task, parent and created_by
MAX_FIELD_CHARS = 256
#: longest description
MAX_DESCRIPTION_CHARS = 65_536
#: most tags, tasks or parents on one version
MAX_ITEMS = 1000
#: matches a search counts before it reports ``total`` as "at least this many":
#: counting visits every match it counts (1-3 µs each at a million cards), so
#: 1,000 costs a few ms where 10,000 costs tens of ms on broad queries
COUNT_LIMIT = 1000

_ALIAS = re.compile(r"[a-z0-9_-]{1,64}")
_VERSION = re.compile(r"[0-9]+")
#: C0 controls but tab, newline and carriage return; DEL; lone surrogates (no UTF-8 form)
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")
#: the same, with tab, newline and carriage return: one-line fields
_CONTROL_LINE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]")


class VersionStatus(enum.StrEnum):
    """A version's life: active, deprecated (still resolvable, flagged), deleted
    (kept for the record, hidden from search and from ``get`` by name)."""

    ACTIVE = "active"
    DEPRECATED = "deprecated"
    DELETED = "deleted"


# ---------------------------------------------------------------- references


def validate_alias(alias: str) -> str:
    """Return ``alias`` if it is a valid alias name, else raise :class:`UsageError`.

    Valid: 1-64 lowercase letters, digits, ``-`` and ``_``, not only digits
    (``name@3`` is always version 3).
    """
    if not isinstance(alias, str) or not _ALIAS.fullmatch(alias):
        raise UsageError(
            f"alias {alias!r} is invalid: use 1-64 lowercase letters, digits, '-' and '_'"
        )
    if _VERSION.fullmatch(alias):
        raise UsageError(f"alias {alias!r} is invalid: an alias cannot be only digits")
    return alias


def parse_ref(ref: str) -> tuple[str, int | str]:
    """Split ``name``, ``name@3``, ``name@prod`` into ``(name, version or alias)``.

    A bare name means ``name@latest``.
    """
    if not isinstance(ref, str):
        raise UsageError(f"model reference must be a string, got {type(ref).__name__}")
    name, at, selector = ref.partition("@")
    validate_model_name(name)
    if not at:
        return name, LATEST
    if _VERSION.fullmatch(selector):
        # Length first: int() refuses over 4,300 digits, SQLite over 2**63 - 1.
        if len(selector.lstrip("0")) > len(str(MAX_INT)) or int(selector) > MAX_INT:
            shown = selector if len(selector) <= 24 else selector[:20] + "..."
            raise UsageError(f"{name}@{shown}: no version is above {MAX_INT}")
        version = int(selector)
        if version < 1:
            raise UsageError(f"{ref!r}: versions start at 1")
        return name, version
    if not selector:
        raise UsageError(f"{ref!r}: nothing after '@'; write name@<version> or name@<alias>")
    return name, validate_alias(selector)


# -------------------------------------------------------------- value types


@attrs.frozen(kw_only=True)
class VersionInfo:
    """One version of a model, with its status and the aliases on it."""

    card: ModelCard
    status: VersionStatus
    aliases: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "card": self.card.to_dict(),
            "status": str(self.status),
            "aliases": list(self.aliases),
        }


@attrs.frozen(kw_only=True)
class SearchHit:
    """A search result: the card, its status and aliases, and its relevance
    (bm25, higher is better; ``None`` unless ordered by relevance and the
    query has free text)."""

    card: ModelCard
    status: VersionStatus
    aliases: tuple[str, ...] = ()
    score: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "card": self.card.to_dict(),
            "status": str(self.status),
            "aliases": list(self.aliases),
            "score": self.score,
        }


@attrs.frozen(kw_only=True)
class SearchPage:
    """One page of results.

    ``total`` counts the matches exactly up to the store's count limit
    (``total_exact``); past it, ``total`` is that limit and ``total_exact`` is
    False ("1000+"): an exact count would visit every match, which at a
    million cards costs more than the page itself. Paging has no cap:
    ``next_cursor`` (keyset paging, stable under inserts) and ``next_offset``
    lead to every match and are ``None`` only on the last page."""

    items: list[SearchHit]
    total: int
    total_exact: bool = True
    next_cursor: str | None = None
    next_offset: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "items": [hit.to_dict() for hit in self.items],
            "total": self.total,
            "total_exact": self.total_exact,
            "next_cursor": self.next_cursor,
            "next_offset": self.next_offset,
        }


# --------------------------------------------------------------- interface


@runtime_checkable
class RegistryStore(Protocol):
    """Where model cards, their versions and aliases live.

    A *ref* is ``name`` (its ``latest`` version), ``name@<version>`` or
    ``name@<alias>``. Versions are numbered 1, 2, 3 … per name, without gaps,
    whoever registers them. Every method raises
    :class:`~llmos.errors.NotFoundError` for a ref that does not resolve and
    :class:`~llmos.errors.UsageError` for malformed input.
    """

    def register(
        self, card: ModelCard, created_by: str | None = None, *, if_changed: bool = False
    ) -> ModelCard:
        """Store ``card`` as the next version of its name and move ``latest``
        to it; return the stored card (version, ``created_at`` and
        ``created_by`` set). With ``if_changed``, a card equal to the latest
        version (apart from those three) is not stored again and the latest
        card is returned."""
        ...

    def register_many(
        self, cards: Iterable[ModelCard], created_by: str | None = None
    ) -> list[ModelCard]:
        """:meth:`register` each card, all in one transaction (bulk imports)."""
        ...

    def get(self, ref: str) -> ModelCard:
        """The card ``ref`` names; deprecated versions resolve, deleted do not."""
        ...

    def versions(self, name: str) -> list[VersionInfo]:
        """Every version of ``name``, oldest first, deleted ones included."""
        ...

    def set_alias(self, name: str, alias: str, version: int) -> None:
        """Point ``name@alias`` at ``version`` (moving it if it exists)."""
        ...

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove ``name@alias``."""
        ...

    def tag(self, ref: str, *tags: str) -> ModelCard:
        """Add tags to the version ``ref`` names; return its card."""
        ...

    def untag(self, ref: str, *tags: str) -> ModelCard:
        """Remove tags (case-insensitively; absent ones are ignored)."""
        ...

    def set_description(self, ref: str, text: str) -> ModelCard:
        """Replace the description of the version ``ref`` names."""
        ...

    def deprecate(self, ref: str) -> ModelCard:
        """Mark the version deprecated: still resolvable, flagged in listings."""
        ...

    def delete(self, ref: str) -> ModelCard:
        """Soft-delete the version: hidden from search and ``get(name)``, its
        aliases removed, ``latest`` moved to the newest version left."""
        ...

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
        """Search with the query language of :mod:`llmos.registry.query`.

        One hit per model (its ``latest`` version) unless ``all_versions``.
        ``sort``: ``relevance`` (bm25, best first; by name when the query has
        no free text), ``name`` (A→Z), ``created`` (newest first) or
        ``parameters`` (largest first); ``descending`` reverses the default.
        Page with ``cursor`` (from ``next_cursor``) or ``offset``.
        """
        ...

    def close(self) -> None:
        """Release connections; the store is unusable afterwards."""
        ...


# ------------------------------------------------------------------- schema


def _migration_1(conn: sqlite3.Connection) -> None:
    """The first schema: models, versions (with denormalised filter columns),
    tags, tasks, aliases and the FTS5 index."""
    statements = [
        """CREATE TABLE models (
            name TEXT PRIMARY KEY,
            created_at REAL NOT NULL
        ) WITHOUT ROWID""",
        # ``id`` is the FTS5 rowid; the filter columns hold lowercased copies
        # of card fields so filters compare case-insensitively on an index;
        # ``is_latest`` marks the ``latest`` alias's target, which is what a
        # per-model search scans.
        """CREATE TABLE versions (
            id INTEGER PRIMARY KEY,
            name TEXT NOT NULL REFERENCES models (name),
            version INTEGER NOT NULL CHECK (version >= 1),
            status TEXT NOT NULL DEFAULT 'active'
                CHECK (status IN ('active', 'deprecated', 'deleted')),
            is_latest INTEGER NOT NULL DEFAULT 0,
            created_at REAL NOT NULL,
            created_by TEXT,
            provider TEXT NOT NULL,
            family TEXT,
            format TEXT NOT NULL,
            license TEXT,
            parameters INTEGER,
            UNIQUE (name, version)
        )""",
        # The card's JSON lives apart so that the rows searches walk stay small.
        """CREATE TABLE cards (
            version_id INTEGER PRIMARY KEY REFERENCES versions (id),
            card TEXT NOT NULL
        )""",
        "CREATE INDEX versions_latest_name ON versions (is_latest, name)",
        "CREATE INDEX versions_latest_created ON versions (is_latest, created_at)",
        "CREATE INDEX versions_provider ON versions (provider, is_latest)",
        "CREATE INDEX versions_family ON versions (family, is_latest)",
        "CREATE INDEX versions_format ON versions (format, is_latest)",
        "CREATE INDEX versions_license ON versions (license, is_latest)",
        "CREATE INDEX versions_parameters ON versions (parameters, is_latest)",
        """CREATE TABLE tags (
            version_id INTEGER NOT NULL REFERENCES versions (id),
            tag TEXT NOT NULL,
            PRIMARY KEY (version_id, tag)
        ) WITHOUT ROWID""",
        "CREATE INDEX tags_by_tag ON tags (tag)",
        """CREATE TABLE tasks (
            version_id INTEGER NOT NULL REFERENCES versions (id),
            task TEXT NOT NULL,
            PRIMARY KEY (version_id, task)
        ) WITHOUT ROWID""",
        "CREATE INDEX tasks_by_task ON tasks (task)",
        """CREATE TABLE aliases (
            name TEXT NOT NULL,
            alias TEXT NOT NULL,
            version INTEGER NOT NULL,
            PRIMARY KEY (name, alias),
            FOREIGN KEY (name, version) REFERENCES versions (name, version)
        ) WITHOUT ROWID""",
        "CREATE INDEX aliases_by_version ON aliases (name, version)",
        f"""CREATE VIRTUAL TABLE {FTS_TABLE} USING fts5 (
            name, description, tags, tasks,
            tokenize = 'unicode61 remove_diacritics 2'
        )""",
        # bm25 weights per column: a name match counts most.
        f"INSERT INTO {FTS_TABLE} ({FTS_TABLE}, rank) VALUES ('rank', 'bm25(10.0, 1.0, 4.0, 4.0)')",
    ]
    for statement in statements:
        conn.execute(statement)


def _migration_2(conn: sqlite3.Connection) -> None:
    """Filter indexes that also keep each value's models in name order.

    ``family:bert`` then reads its first page straight off the index and
    stops, instead of sorting every BERT model by name; the indexes cover
    the filter columns, so counting reads no table rows either.
    """
    for column in ("provider", "family", "format", "license"):
        conn.execute(f"DROP INDEX versions_{column}")
        conn.execute(f"CREATE INDEX versions_{column} ON versions ({column}, is_latest, name)")


def _migration_3(conn: sqlite3.Connection) -> None:
    """The impact index that ranked searches read their best matches from
    (:mod:`llmos.registry.ranking`), empty: the store fills it after the
    upgrade, in chunks of its own transactions, and searches are right (if
    slower) until it has."""
    ranking.create_index(conn)


#: schema migrations, applied in order; the schema version is their count.
#: Append, never edit or reorder: a file's ``user_version`` says how many ran.
MIGRATIONS: list[Callable[[sqlite3.Connection], None]] = [
    _migration_1,
    _migration_2,
    _migration_3,
]


# ------------------------------------------------------------------ helpers


def _now() -> datetime:
    return datetime.now(UTC)


def _lower(value: str | None) -> str | None:
    return None if value is None else value.lower()


def _card_json(card: ModelCard) -> str:
    try:
        text = json.dumps(card.to_dict(), ensure_ascii=False, allow_nan=False)
        # SQLite stores UTF-8: a lone surrogate anywhere (an option's value) has none.
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise UsageError(
            f"model card {card.name!r} holds a lone surrogate (text that is not valid"
            " Unicode); send valid UTF-8"
        ) from None
    except (TypeError, ValueError, RecursionError) as exc:
        raise UsageError(f"model card {card.name!r} is not JSON-serialisable: {exc}") from exc
    return text


def _text_problem(field: str, value: str, *, lines: bool = False) -> str | None:
    """Why ``value`` cannot be stored in ``field``, or None. One-line fields
    refuse every control character (an ESC in a tag would drive the terminal
    of whoever lists it); ``lines`` allows tab, newline and carriage return."""
    limit = MAX_DESCRIPTION_CHARS if lines else MAX_FIELD_CHARS
    if len(value) > limit:
        return f"{field} is {len(value)} characters long; the limit is {limit}"
    bad = (_CONTROL if lines else _CONTROL_LINE).search(value)
    if bad is None:
        return None
    char = bad.group()
    if "\ud800" <= char <= "\udfff":
        return f"{field} holds a lone surrogate (text that is not valid Unicode)"
    what = "a NUL byte" if char == "\x00" else f"the control character {char!r}"
    return f"{field} holds {what} at position {bad.start() + 1}"


def _load_card(text: str) -> ModelCard:
    return ModelCard.from_dict(json.loads(text))


def _check_card(card: object) -> ModelCard:
    """Refuse a card whose fields have the wrong types: ModelCard does not
    check them, and SQLite would store a string in an integer column."""
    if not isinstance(card, ModelCard):
        raise UsageError(f"expected a ModelCard, got {type(card).__name__}")
    problem = None
    count = card.parameters
    if count is not None and (type(count) is not int or not 0 <= count <= MAX_INT):
        problem = f"parameters must be a whole number from 0 to {MAX_INT}, got {count!r}"
    elif not isinstance(card.provider, str) or not card.provider:
        problem = f"provider must be a non-empty string, got {card.provider!r}"
    for field in ("source", "description", "family", "license", "created_by"):
        value = getattr(card, field)
        if problem is None and value is not None and not isinstance(value, str):
            problem = f"{field} must be a string, got {value!r}"
    for field in ("tasks", "tags", "parents"):
        if problem is None and not all(isinstance(v, str) for v in getattr(card, field)):
            problem = f"{field} must be strings, got {getattr(card, field)!r}"
        elif problem is None and len(getattr(card, field)) > MAX_ITEMS:
            problem = f"{len(getattr(card, field))} {field}, more than the {MAX_ITEMS} allowed"
    if problem is None:
        problem = next(
            (
                found
                for field, value, lines in (
                    ("provider", card.provider, False),
                    ("family", card.family, False),
                    ("license", card.license, False),
                    ("created_by", card.created_by, False),
                    ("description", card.description, True),
                    *((f"tasks[{i}]", v, False) for i, v in enumerate(card.tasks)),
                    *((f"tags[{i}]", v, False) for i, v in enumerate(card.tags)),
                    *((f"parents[{i}]", v, False) for i, v in enumerate(card.parents)),
                )
                if value is not None
                and (found := _text_problem(field, value, lines=lines)) is not None
            ),
            None,
        )
    if problem is not None:
        raise UsageError(f"model card {card.name!r}: {problem}")
    _card_json(card)  # options and scores: JSON that SQLite can store
    return card


def _same_content(a: ModelCard, b: ModelCard) -> bool:
    skip = ("version", "created_at", "created_by")
    da, db = a.to_dict(), b.to_dict()
    return all(da[k] == db[k] for k in da if k not in skip)


def _clean_tags(tags: Sequence[str]) -> list[str]:
    if len(tags) > MAX_ITEMS:
        raise UsageError(f"{len(tags)} tags, more than the {MAX_ITEMS} a version may carry")
    cleaned = []
    for tag in tags:
        if not isinstance(tag, str) or not tag.strip():
            raise UsageError(f"tag {tag!r} is invalid: tags are non-empty strings")
        problem = _text_problem("a tag", tag.strip())
        if problem is not None:
            raise UsageError(f"tag {tag[:40]!r}... is invalid: {problem}")
        cleaned.append(tag.strip())
    return cleaned


def _encode_cursor(fingerprint: str, key: Any, row_id: int) -> str:
    raw = json.dumps([fingerprint, key, row_id], separators=(",", ":")).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _decode_cursor(cursor: str, fingerprint: str) -> tuple[Any, int]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        mark, key, row_id = json.loads(raw)
        if not isinstance(row_id, int) or not isinstance(key, str | int | float):
            raise ValueError
        # What SQLite can compare: 64-bit integers, finite floats.
        if not all(
            -MAX_INT - 1 <= v <= MAX_INT if isinstance(v, int) else math.isfinite(v)
            for v in (key, row_id)
            if not isinstance(v, str)
        ):
            raise ValueError
    except (ValueError, TypeError, binascii.Error) as exc:
        raise UsageError("invalid search cursor", param="cursor") from exc
    if mark != fingerprint:
        raise UsageError(
            "this cursor belongs to another search (query, sort or scope differ)",
            param="cursor",
        )
    return key, row_id


# --------------------------------------- decisions shared with other stores
#
# What a store decides apart from its database: the arguments it refuses and
# with which words, what a tag edit does to a card, which error a ref that
# does not resolve raises, how a search is ordered, paged and continued.
# SQLiteStore and plugins' stores (llmos-postgres) call these, each with its
# own SQL, so that a change to that behaviour lands here once and the stores
# keep agreeing (the store contract, :mod:`llmos.store_contract`, checks they do).

#: a change to one version's card (``tag``, ``untag``, ``set_description``),
#: applied in the store's write transaction to the card it read there
CardEdit = Callable[[ModelCard], ModelCard]

#: each sort's direction when the caller gives none
_DESCENDING = {"relevance": True, "name": False, "created": True, "parameters": True}


@attrs.frozen
class VersionRow:
    """A version as a store reads it to act on it: its row id (the store's
    own key), name, number, status and card."""

    id: int
    name: str
    version: int
    status: VersionStatus
    card: ModelCard

    @classmethod
    def load(cls, found: Sequence[Any] | None) -> VersionRow | None:
        """The row from a database's ``(id, name, version, status, card
        JSON)``; None for no row."""
        if found is None:
            return None
        row_id, name, version, status, card = found
        return cls(row_id, name, version, VersionStatus(status), _load_card(card))


def check_count_limit(count_limit: object) -> int:
    """``count_limit`` if a store can take it (a whole number, at least 1),
    else :class:`UsageError`."""
    if not isinstance(count_limit, int) or isinstance(count_limit, bool) or count_limit < 1:
        raise UsageError(f"count_limit must be a whole number of at least 1, got {count_limit!r}")
    return count_limit


def check_manual_alias(alias: str) -> str:
    """``alias`` if ``set_alias`` and ``remove_alias`` may touch it: a valid
    alias, and not ``latest``, which the registry keeps itself."""
    validate_alias(alias)
    if alias == LATEST:
        raise UsageError(
            "'latest' is kept by the registry on the newest version that is not "
            "deleted; it cannot be set or removed by hand",
            param="alias",
        )
    return alias


def check_version_number(version: object) -> int:
    """``version`` if it can number a version (1 to :data:`MAX_INT`)."""
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= MAX_INT:
        raise UsageError(f"version must be a positive integer up to {MAX_INT}, got {version!r}")
    return version


def new_version(
    card: ModelCard, last: int | None, now: datetime, created_by: str | None
) -> ModelCard:
    """``card`` as it is stored after version ``last`` (None or 0: the first
    version), registered ``now``; ``created_by`` None keeps the card's own."""
    return attrs.evolve(
        card,
        version=(last or 0) + 1,
        created_at=now,
        created_by=created_by if created_by is not None else card.created_by,
    )


def filter_columns(card: ModelCard) -> tuple[str, str | None, str, str | None, int | None]:
    """What a version's filter columns hold: provider, family, format,
    license and parameters, the text lowercased (filters compare
    case-insensitively)."""
    return (
        card.provider.lower(),
        _lower(card.family),
        str(card.format),
        _lower(card.license),
        card.parameters,
    )


def filter_values(values: Iterable[str]) -> list[str]:
    """The rows a ``tag:`` or ``task:`` filter matches for a card's tags or
    tasks: each lowercased, once, in order."""
    return sorted({value.lower() for value in values})


def edit_add_tags(tags: Sequence[str]) -> CardEdit:
    """The edit ``tag(ref, *tags)`` makes. The tags are checked now (a
    :class:`UsageError` before the store reads anything); the edit appends
    those the card lacks, compared case-insensitively and spelt as given,
    and refuses a card that would carry more than :data:`MAX_ITEMS`."""
    wanted = _clean_tags(tags)

    def add(card: ModelCard) -> ModelCard:
        have = {t.lower() for t in card.tags}
        new = list(card.tags)
        for tag in wanted:
            if tag.lower() not in have:
                new.append(tag)
                have.add(tag.lower())
        if len(new) > MAX_ITEMS:
            raise UsageError(
                f"{card.ref} would carry {len(new)} tags, more than the {MAX_ITEMS} allowed"
            )
        return attrs.evolve(card, tags=tuple(new))

    return add


def edit_remove_tags(tags: Sequence[str]) -> CardEdit:
    """The edit ``untag(ref, *tags)`` makes: the tags checked now, then
    removed case-insensitively; those the card lacks are ignored."""
    unwanted = {t.lower() for t in _clean_tags(tags)}
    return lambda card: attrs.evolve(
        card, tags=tuple(t for t in card.tags if t.lower() not in unwanted)
    )


def edit_description(text: str) -> CardEdit:
    """The edit ``set_description(ref, text)`` makes, ``text`` checked now."""
    if not isinstance(text, str):
        raise UsageError(f"a description must be a string, got {type(text).__name__}")
    problem = _text_problem("the description", text, lines=True)
    if problem is not None:
        raise UsageError(problem, param="description")
    return lambda card: attrs.evolve(card, description=text)


def check_live(row: VersionRow) -> VersionRow:
    """``row`` unless its version is deleted (then :class:`NotFoundError`):
    a ref resolves to deprecated versions, never to deleted ones."""
    if row.status is VersionStatus.DELETED:
        raise NotFoundError(f"model {row.name}@{row.version} was deleted")
    return row


def missing_ref(
    name: str,
    selector: int | str,
    *,
    model_exists: Callable[[], bool],
    last_version: Callable[[], int | None],
    aliases: Callable[[], Sequence[str]],
) -> NotFoundError:
    """The error for ``name@selector`` (as :func:`parse_ref` split it) that
    found no version, saying best what is missing. The callables read the
    store, each only when the message needs it: whether the model exists,
    its last version number, its aliases in order."""
    if not model_exists():
        return NotFoundError(f"no model named {name!r}")
    if isinstance(selector, int):
        return NotFoundError(
            f"model {name!r} has no version {selector} (versions 1-{last_version()})"
        )
    if selector == LATEST:
        return NotFoundError(f"every version of model {name!r} is deleted")
    have = ", ".join(aliases()) or "none"
    return NotFoundError(f"model {name!r} has no alias {selector!r} (aliases: {have})")


def group_aliases(rows: Iterable[Sequence[Any]]) -> dict[tuple[str, int], tuple[str, ...]]:
    """``(name, version, alias)`` rows, in any order, as each version's
    aliases: ``latest`` first, the others in order."""
    found: dict[tuple[str, int], list[str]] = {}
    for name, version, alias in rows:
        found.setdefault((name, version), []).append(alias)
    return {
        key: tuple(sorted(value, key=lambda alias: (alias != LATEST, alias)))
        for key, value in found.items()
    }


def version_infos(
    name: str,
    rows: Sequence[Sequence[Any]],
    aliases: Callable[[list[str]], Mapping[tuple[str, int], tuple[str, ...]]],
) -> list[VersionInfo]:
    """What ``versions(name)`` returns from its ``(version, status, card
    JSON)`` rows, oldest first; none is :class:`NotFoundError`. ``aliases``
    reads the aliases of names (as :func:`group_aliases` returns them)."""
    if not rows:
        raise NotFoundError(f"no model named {name!r}")
    found = aliases([name])
    return [
        VersionInfo(
            card=_load_card(card),
            status=VersionStatus(status),
            aliases=found.get((name, version), ()),
        )
        for version, status, card in rows
    ]


def check_search(sort: str, limit: int, offset: int, cursor: str | None) -> None:
    """Refuse what ``search`` cannot take: an unknown sort, a limit or offset
    out of bounds, a cursor and an offset together."""
    if sort not in SORTS:
        raise UsageError(f"sort must be one of {', '.join(SORTS)}, not {sort!r}", param="sort")
    if not isinstance(limit, int) or not 1 <= limit <= MAX_LIMIT:
        raise UsageError(f"limit must be between 1 and {MAX_LIMIT}, got {limit!r}", param="limit")
    if not isinstance(offset, int) or not 0 <= offset <= MAX_OFFSET:
        raise UsageError(
            f"offset must be between 0 and {MAX_OFFSET}, got {offset!r}", param="offset"
        )
    if cursor is not None and offset:
        raise UsageError("give a cursor or an offset, not both", param="cursor")


def search_order(sort: str, has_text: bool, descending: bool | None) -> tuple[str | None, bool]:
    """What a search orders by and whether descending. The order is None
    for bm25 relevance (``relevance`` with free text in the query), else the
    sort whose column orders the hits (``name`` for ``relevance`` without
    free text); each order has its default direction, which ``descending``
    overrides."""
    order = None if sort == "relevance" and has_text else ("name" if sort == "relevance" else sort)
    desc = _DESCENDING[order or "relevance"] if descending is None else bool(descending)
    return order, desc


def search_fingerprint(query: str, sort: str, descending: bool, all_versions: bool) -> str:
    """What a cursor carries to tell its search from others: a search's
    cursors lead on only in the same query, sort, direction and scope."""
    search = json.dumps([query, sort, descending, all_versions]).encode()
    return hashlib.sha1(search).hexdigest()[:12]


def read_cursor(cursor: str | None, fingerprint: str, order: str | None) -> tuple[Any, ...]:
    """A cursor's ``(key, id)`` to page on from (``()`` for no cursor): it
    must belong to the search (``fingerprint``) and its key have the order's
    type, text for ``name`` and a number otherwise (:func:`search_order`), so
    that a forged one is a :class:`UsageError`, not a comparison the database
    refuses or makes of different types."""
    if cursor is None:
        return ()
    key, row_id = _decode_cursor(cursor, fingerprint)
    if isinstance(key, str) != (order == "name"):
        raise UsageError("invalid search cursor", param="cursor")
    return key, row_id


def search_page(
    rows: Sequence[Sequence[Any]],
    *,
    limit: int,
    offset: int,
    cursor: str | None,
    fingerprint: str,
    ranked: bool,
    total: int,
    count_limit: int,
    cards: Callable[[list[int]], Mapping[int, tuple[VersionStatus, ModelCard]]],
    aliases: Callable[[list[str]], Mapping[tuple[str, int], tuple[str, ...]]],
) -> SearchPage:
    """The page a search returns. ``rows``: its ``(id, key)`` rows in order,
    one more than ``limit`` when there are more, the key being the score
    when ``ranked``; ``total``: the matches counted up to ``count_limit + 1``.
    ``cards`` reads the status and card of row ids, ``aliases`` the aliases
    of names (as :func:`group_aliases` returns them), each in the search's
    read transaction and only when the page has hits."""
    more = len(rows) > limit
    rows = rows[:limit]
    ids = [row_id for row_id, _ in rows]
    details = cards(ids) if ids else {}
    names = sorted({details[row_id][1].name for row_id in ids})
    found = aliases(names) if names else {}
    items = []
    for row_id, key in rows:
        status, card = details[row_id]
        items.append(
            SearchHit(
                card=card,
                status=status,
                aliases=found.get((card.name, card.version or 0), ()),
                score=float(key) if ranked else None,
            )
        )
    next_cursor = next_offset = None
    if more:
        next_cursor = _encode_cursor(fingerprint, rows[-1][1], rows[-1][0])
        next_offset = None if cursor is not None else offset + len(rows)
    return SearchPage(
        items=items,
        total=min(total, count_limit),
        total_exact=total <= count_limit,
        next_cursor=next_cursor,
        next_offset=next_offset,
    )


# order (:func:`search_order`) -> the key expression over the versions row ``v``
_SORT_KEYS = {
    "name": "v.name",
    "created": "v.created_at",
    "parameters": "COALESCE(v.parameters, -1)",
}
#: the orders an index on ``(is_latest, key)`` hands over
_INDEXED_SORTS = frozenset({"name", "created"})


@attrs.frozen
class _Page:
    """A page statement of ``(id, key)`` rows: ``first`` binds
    ``params``, LIMIT and OFFSET; ``after`` (a cursor's page) binds ``params``,
    the cursor's key and id, LIMIT and OFFSET."""

    first: str
    after: str
    params: tuple[Any, ...]


@attrs.frozen
class _SearchSql:
    count: str  # binds count_params, then how many rows at most to count
    count_params: tuple[Any, ...]
    page: _Page | None  # the conditions find the rows, which are then sorted; None: ranked
    walk: _Page | None  # rows read in the order's index, each checked: for many matches
    order: str | None  # as search_order says: None for relevance
    descending: bool


def _search_sql(
    plan: SearchPlan, sort: str, descending: bool | None, all_versions: bool
) -> _SearchSql:
    """The statements of one search: its capped count, and its page.

    Three shapes, chosen so SQLite walks the fewest rows:

    * free text ANDed with the rest (the common case): the FTS5 index drives
      (``CROSS JOIN`` fixes that order; left alone, the planner probes the
      index once per version), every other condition checks each match, so
      the cost follows the number of cards the text matches;
    * free text only under ``OR``/``NOT``: filters drive;
    * filters alone: ordinary indexes.

    Ranked by relevance, free text has no page statement (``page`` is
    None): the impact index (:mod:`llmos.registry.ranking`) finds its best
    matches without scoring every match, which bm25 in SQL would.

    Without free text to drive and in an order an index keeps (name, or
    creation time), a page has two forms. ``page`` lets the most selective
    filter's index find the rows and sorts them all: right for few matches.
    ``walk`` reads rows in the order's index (``(family, is_latest, name)``
    for ``family:bert``, else ``(is_latest, name)`` or ``(is_latest,
    created_at)``) with tag and task filters probing each row, and stops
    when the page is full: right for many matches, which it meets early,
    ruinous for few (it may read every model to find none). The capped count
    tells them apart: a search that reaches the count limit matches at least
    that many models, so a walk fills a page after about ``page size * cards
    / count limit`` rows when the matches are spread over the order.
    """
    scope = "v.status <> 'deleted'" if all_versions else "v.is_latest = 1"
    # A unary plus keeps SQLite from reading the whole is_latest index when
    # a filter's index finds far fewer rows.
    driving_scope = "+" + scope if plan.where != TRUE and not all_versions else scope
    where = f"{driving_scope} AND {plan.where.sql}"
    params = plan.where.params
    source = "versions v"
    if plan.match is not None:
        source = f"{FTS_TABLE} CROSS JOIN versions v ON v.id = {FTS_TABLE}.rowid"
        where = f"{FTS_TABLE} MATCH ? AND {where}"
        params = (plan.match, *params)
    count = f"SELECT count(*) FROM (SELECT 1 FROM {source} WHERE {where} LIMIT ?)"

    order, desc = search_order(sort, plan.has_text, descending)
    if order is None:
        return _SearchSql(count, params, page=None, walk=None, order=None, descending=desc)

    key = _SORT_KEYS[order]
    direction, after = ("DESC", "<") if desc else ("ASC", ">")
    tail = f"ORDER BY k {direction}, id {direction} LIMIT ? OFFSET ?"

    def page(source: str, where: str, params: tuple[Any, ...]) -> _Page:
        outer = f"SELECT id, k FROM (SELECT v.id AS id, {key} AS k FROM {source} WHERE {where})"
        return _Page(
            first=f"{outer} {tail}",
            after=f"{outer} WHERE (k, id) {after} (?, ?) {tail}",
            params=params,
        )

    walk = None
    if plan.match is None and not all_versions and order in _INDEXED_SORTS:
        walk = page(source, f"{scope} AND {plan.probes.sql}", plan.probes.params)
    return _SearchSql(
        count, params, page=page(source, where, params), walk=walk, order=order, descending=desc
    )


# -------------------------------------------------------------------- store


class SQLiteStore:
    """:class:`RegistryStore` on one SQLite file (WAL, FTS5).

    Open one per process (or share one between threads: each thread gets its
    own connection). The file is created and migrated on construction.
    ``count_limit``: how many matches a search counts exactly before it
    reports "at least that many" (:attr:`SearchPage.total_exact`).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        busy_timeout: float = 30.0,
        count_limit: int = COUNT_LIMIT,
    ) -> None:
        self.count_limit = check_count_limit(count_limit)
        self.path = Path(path)
        self.busy_timeout = busy_timeout
        self._what = f"registry database {self.path}"
        self._local = threading.local()
        self._lock = threading.Lock()
        self._connections: list[tuple[int, sqlite3.Connection]] = []
        self._closed = False
        self._tokenizer = ranking.Tokenizer()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._migrate(self._conn())
            self._catch_up()
        except BaseException:
            self.close()
            raise

    def __repr__(self) -> str:
        return f"SQLiteStore({str(self.path)!r})"

    def __enter__(self) -> SQLiteStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # ------------------------------------------------------------ connections

    def _conn(self) -> sqlite3.Connection:
        if self._closed:
            raise LlmosError(f"registry store {self.path} is closed")
        pid = os.getpid()
        conn = getattr(self._local, "conn", None)
        # A connection must not cross a fork: the child opens its own.
        if conn is None or self._local.pid != pid:
            conn = self._open()
            self._local.conn, self._local.pid = conn, pid
            with self._lock:
                self._connections.append((pid, conn))
        return conn

    def _open(self) -> sqlite3.Connection:
        return db.connect(
            self.path,
            what=self._what,
            busy_timeout=self.busy_timeout,
            pragmas=(
                "foreign_keys = ON",
                # Searches at a million cards read a few hundred MB; map them
                # rather than copy them into each connection's page cache. 2 GiB
                # (SQLite's usual ceiling) maps a million-card file whole, which
                # halves a selective search's time against 256 MiB; it is address
                # space, not memory, and the pages are the OS's shared file cache.
                f"mmap_size = {MMAP_SIZE:d}",
                # SQLite's default 2 MiB of cache spills a bulk registration's
                # changed pages to the WAL before it commits, and writes some of
                # them again after: register_many of 2,000 cards ran 1.3-1.5x
                # slower with it. The cache grows only as far as it is used.
                f"cache_size = -{CACHE_KIB:d}",
            ),
        )

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pid = os.getpid()
            for owner, conn in self._connections:
                if owner == pid:
                    conn.close()
            self._connections.clear()
        self._tokenizer.close()

    def _write(self) -> AbstractContextManager[sqlite3.Connection]:
        """A write transaction that holds the write lock from its first statement."""
        return db.write(self._conn(), what=self._what, timeout=self.busy_timeout)

    def _read(self) -> AbstractContextManager[sqlite3.Connection]:
        """A read transaction: its statements see one snapshot."""
        return db.read(self._conn())

    def _migrate(self, conn: sqlite3.Connection) -> None:
        try:
            before, after = db.migrate(conn, MIGRATIONS, what=self._what, timeout=self.busy_timeout)
        except sqlite3.OperationalError as exc:
            if "fts5" in str(exc):
                raise LlmosError(
                    f"this Python's SQLite ({sqlite3.sqlite_version}) lacks FTS5, "
                    "which the registry needs"
                ) from exc
            raise
        if before != after:
            log.info("registry migrated", path=str(self.path), schema_from=before, schema_to=after)

    def _catch_up(self) -> None:
        """Index what is pending in chunks, one transaction each (after an
        upgrade, the whole registry), so that other processes get the lock
        between them; a process killed half-way leaves the rest pending, and
        one that cannot get the lock leaves it to the next writer."""
        try:
            while ranking.pending(self._conn()) >= ranking.FOLD_AT:
                with self._write() as c:
                    if not ranking.fold(c, self._tokenizer, limit=ranking.CATCH_UP_CHUNK):
                        break
        except (LlmosError, sqlite3.Error) as exc:
            log.warning("search index not caught up", path=str(self.path), error=str(exc))

    def _fold_if_due(self) -> None:
        """Index the pending versions once there are enough of them to be
        worth a batch: in a transaction of its own, after the registration's
        (which has returned if this one fails: the versions stay pending, and
        the next writer indexes them)."""
        if ranking.pending(self._conn()) < ranking.FOLD_AT:
            return
        try:
            with self._write() as c:
                if ranking.pending(c) >= ranking.FOLD_AT:  # not done by another writer meanwhile
                    ranking.fold(c, self._tokenizer)
        except (LlmosError, sqlite3.Error) as exc:
            # Searches stay right with versions pending, only slower.
            log.warning("search index not updated", path=str(self.path), error=str(exc))

    @property
    def schema_version(self) -> int:
        """The file's schema version (``PRAGMA user_version``)."""
        return int(self._conn().execute("PRAGMA user_version").fetchone()[0])

    # --------------------------------------------------------------- writing

    def register(
        self, card: ModelCard, created_by: str | None = None, *, if_changed: bool = False
    ) -> ModelCard:
        with self._write() as c:
            stored = self._insert(c, card, created_by, _now(), if_changed)
        self._fold_if_due()
        log.info("model registered", model=stored.ref)
        return stored

    def register_many(
        self, cards: Iterable[ModelCard], created_by: str | None = None
    ) -> list[ModelCard]:
        now = _now()
        with self._write() as c:
            stored = [self._insert(c, card, created_by, now, False) for card in cards]
        self._fold_if_due()
        log.info("models registered", count=len(stored))
        return stored

    def _insert(
        self,
        c: sqlite3.Connection,
        card: ModelCard,
        created_by: str | None,
        now: datetime,
        if_changed: bool,
    ) -> ModelCard:
        name = _check_card(card).name
        new_model = c.execute(
            "INSERT INTO models (name, created_at) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
            (name, now.timestamp()),
        ).rowcount
        # Under BEGIN IMMEDIATE no other writer runs, so max + 1 is ours alone;
        # deleted versions stay in the table, which keeps the numbers gapless.
        # (A model is never removed, so a new one has no versions yet.)
        last = None
        if not new_model:
            last = c.execute(
                "SELECT MAX(version) FROM versions WHERE name = ?", (name,)
            ).fetchone()[0]
        if if_changed and last is not None:
            latest = self._alias_row(c, name, LATEST)
            if latest is not None and _same_content(latest.card, card):
                return latest.card
        stored = new_version(card, last, now, created_by)
        if last is not None:
            c.execute("UPDATE versions SET is_latest = 0 WHERE name = ? AND is_latest = 1", (name,))
        row_id = c.execute(
            "INSERT INTO versions (name, version, is_latest, created_at, created_by,"
            " provider, family, format, license, parameters)"
            " VALUES (?, ?, 1, ?, ?, ?, ?, ?, ?, ?)",
            (name, stored.version, now.timestamp(), stored.created_by, *filter_columns(stored)),
        ).lastrowid
        assert row_id is not None
        c.execute(
            "INSERT INTO cards (version_id, card) VALUES (?, ?)", (row_id, _card_json(stored))
        )
        c.executemany(
            "INSERT OR IGNORE INTO tasks (version_id, task) VALUES (?, ?)",
            [(row_id, task) for task in filter_values(stored.tasks)],
        )
        self._index(c, row_id, stored, new=True)
        self._point(c, name, LATEST, stored.version)
        return stored

    def _index(self, c: sqlite3.Connection, row_id: int, card: ModelCard, *, new: bool) -> None:
        """Write the parts of a version that change after registration: the
        card's JSON, its tags rows and its full-text entry."""
        tags = " ".join(card.tags)
        if new:
            c.execute(
                f"INSERT INTO {FTS_TABLE} (rowid, name, description, tags, tasks)"
                " VALUES (?, ?, ?, ?, ?)",
                (row_id, card.name, card.description, tags, " ".join(card.tasks)),
            )
        else:
            c.execute("UPDATE cards SET card = ? WHERE version_id = ?", (_card_json(card), row_id))
            c.execute("DELETE FROM tags WHERE version_id = ?", (row_id,))
            old = self._fts_columns(c, row_id)
            c.execute(
                f"UPDATE {FTS_TABLE} SET description = ?, tags = ? WHERE rowid = ?",
                (card.description, tags, row_id),
            )
            new = (old[0], card.description, tags, old[3])
            ranking.reindex(c, self._tokenizer, row_id, old, new)
        c.executemany(
            "INSERT OR IGNORE INTO tags (version_id, tag) VALUES (?, ?)",
            [(row_id, tag) for tag in filter_values(card.tags)],
        )

    @staticmethod
    def _fts_columns(c: sqlite3.Connection, row_id: int) -> tuple[str, str, str, str]:
        """What the full-text index holds for a version: name, description,
        tags, tasks."""
        row = c.execute(
            f"SELECT name, description, tags, tasks FROM {FTS_TABLE} WHERE rowid = ?", (row_id,)
        ).fetchone()
        assert row is not None, f"version {row_id} is not in the full-text index"
        return row

    def _point(self, c: sqlite3.Connection, name: str, alias: str, version: int) -> None:
        c.execute(
            "INSERT INTO aliases (name, alias, version) VALUES (?, ?, ?)"
            " ON CONFLICT (name, alias) DO UPDATE SET version = excluded.version",
            (name, alias, version),
        )

    def _refresh_latest(self, c: sqlite3.Connection, name: str) -> None:
        """Point ``latest`` (and ``is_latest``) at the newest version not deleted."""
        newest = c.execute(
            "SELECT MAX(version) FROM versions WHERE name = ? AND status <> 'deleted'", (name,)
        ).fetchone()[0]
        c.execute("UPDATE versions SET is_latest = 0 WHERE name = ? AND is_latest = 1", (name,))
        if newest is None:
            c.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, LATEST))
            return
        c.execute(
            "UPDATE versions SET is_latest = 1 WHERE name = ? AND version = ?", (name, newest)
        )
        self._point(c, name, LATEST, newest)

    def set_alias(self, name: str, alias: str, version: int) -> None:
        check_manual_alias(alias)
        check_version_number(version)
        with self._write() as c:
            row = self._resolve(c, f"{validate_model_name(name)}@{version}")
            self._point(c, row.name, alias, row.version)
        log.info("alias set", model=f"{name}@{alias}", version=version)

    def remove_alias(self, name: str, alias: str) -> None:
        check_manual_alias(alias)
        validate_model_name(name)
        with self._write() as c:
            deleted = c.execute("DELETE FROM aliases WHERE name = ? AND alias = ?", (name, alias))
            if deleted.rowcount == 0:
                raise self._missing(c, name, alias)
        log.info("alias removed", model=f"{name}@{alias}")

    def _edit(self, ref: str, change: CardEdit) -> ModelCard:
        with self._write() as c:
            row = self._resolve(c, ref)
            card = change(row.card)
            if card != row.card:
                self._index(c, row.id, card, new=False)
        return card

    def tag(self, ref: str, *tags: str) -> ModelCard:
        return self._edit(ref, edit_add_tags(tags))

    def untag(self, ref: str, *tags: str) -> ModelCard:
        return self._edit(ref, edit_remove_tags(tags))

    def set_description(self, ref: str, text: str) -> ModelCard:
        return self._edit(ref, edit_description(text))

    def deprecate(self, ref: str) -> ModelCard:
        with self._write() as c:
            row = self._resolve(c, ref)
            c.execute("UPDATE versions SET status = 'deprecated' WHERE id = ?", (row.id,))
        log.info("model deprecated", model=row.card.ref)
        return row.card

    def delete(self, ref: str) -> ModelCard:
        with self._write() as c:
            row = self._resolve(c, ref)
            c.execute(
                "UPDATE versions SET status = 'deleted', is_latest = 0 WHERE id = ?", (row.id,)
            )
            c.execute("DELETE FROM aliases WHERE name = ? AND version = ?", (row.name, row.version))
            ranking.unindex(c, self._tokenizer, row.id, self._fts_columns(c, row.id))
            c.execute(f"DELETE FROM {FTS_TABLE} WHERE rowid = ?", (row.id,))
            self._refresh_latest(c, row.name)
        log.info("model deleted", model=row.card.ref)
        return row.card

    # --------------------------------------------------------------- reading

    _ROW_COLUMNS = "v.id, v.name, v.version, v.status, j.card"

    def _alias_row(self, c: sqlite3.Connection, name: str, alias: str) -> VersionRow | None:
        return VersionRow.load(
            c.execute(
                f"SELECT {self._ROW_COLUMNS} FROM aliases a"
                " JOIN versions v ON v.name = a.name AND v.version = a.version"
                " JOIN cards j ON j.version_id = v.id"
                " WHERE a.name = ? AND a.alias = ?",
                (name, alias),
            ).fetchone()
        )

    def _resolve(self, c: sqlite3.Connection, ref: str) -> VersionRow:
        name, selector = parse_ref(ref)
        if isinstance(selector, int):
            row = VersionRow.load(
                c.execute(
                    f"SELECT {self._ROW_COLUMNS} FROM versions v"
                    " JOIN cards j ON j.version_id = v.id WHERE v.name = ? AND v.version = ?",
                    (name, selector),
                ).fetchone()
            )
        else:
            row = self._alias_row(c, name, selector)
        if row is None:
            raise self._missing(c, name, selector)
        return check_live(row)

    @staticmethod
    def _missing(c: sqlite3.Connection, name: str, selector: int | str) -> NotFoundError:
        """The NotFoundError that says best what is missing."""
        return missing_ref(
            name,
            selector,
            model_exists=lambda: (
                c.execute("SELECT 1 FROM models WHERE name = ?", (name,)).fetchone() is not None
            ),
            last_version=lambda: c.execute(
                "SELECT MAX(version) FROM versions WHERE name = ?", (name,)
            ).fetchone()[0],
            aliases=lambda: [
                a
                for (a,) in c.execute(
                    "SELECT alias FROM aliases WHERE name = ? ORDER BY alias", (name,)
                )
            ],
        )

    def get(self, ref: str) -> ModelCard:
        with self._read() as c:
            return self._resolve(c, ref).card

    def versions(self, name: str) -> list[VersionInfo]:
        validate_model_name(name)
        with self._read() as c:
            rows = c.execute(
                "SELECT v.version, v.status, j.card FROM versions v"
                " JOIN cards j ON j.version_id = v.id WHERE v.name = ? ORDER BY v.version",
                (name,),
            ).fetchall()
            return version_infos(name, rows, lambda names: self._aliases(c, names))

    @staticmethod
    def _aliases(
        c: sqlite3.Connection, names: Sequence[str]
    ) -> dict[tuple[str, int], tuple[str, ...]]:
        marks = ", ".join("?" * len(names))
        return group_aliases(
            c.execute(
                f"SELECT name, version, alias FROM aliases WHERE name IN ({marks})", tuple(names)
            )
        )

    @staticmethod
    def _cards(
        c: sqlite3.Connection, ids: Sequence[int]
    ) -> dict[int, tuple[VersionStatus, ModelCard]]:
        return {
            row_id: (VersionStatus(status), _load_card(card))
            for row_id, status, card in c.execute(
                "SELECT v.id, v.status, j.card FROM versions v"
                " JOIN cards j ON j.version_id = v.id"
                f" WHERE v.id IN ({', '.join('?' * len(ids))})",
                tuple(ids),
            )
        }

    def _ranked(
        self,
        c: sqlite3.Connection,
        plan: SearchPlan,
        all_versions: bool,
        descending: bool,
        limit: int,
        offset: int,
        after: tuple[Any, ...],
    ) -> list[tuple[int, float]]:
        """A relevance page of a query with free text, from the impact index:
        ``(id, score)`` rows, one more than ``limit`` if there are more."""
        # The unary plus keeps SQLite off the is_latest index, which lists
        # every latest version, when it looks for the matches that score 0
        # (text under OR): the filters' indexes find those.
        scope = "v.status <> 'deleted'" if all_versions else "+v.is_latest = 1"
        checks = Sql(f"{scope} AND {plan.checks.sql}", plan.checks.params)
        match = plan.match or plan.score_match
        assert match is not None
        query = ranking.RankQuery(
            phrases=tuple(self._tokenizer.phrase(text) for text in plan.phrases),
            excluded=tuple(self._tokenizer.phrase(text) for text in plan.excluded),
            match=match,
            checks=checks,
            any_phrase=plan.match is None,
            where=Sql(f"{scope} AND {plan.where.sql}", plan.where.params),
            unscored=(
                Sql(f"{scope} AND {plan.unscored.sql}", plan.unscored.params)
                if plan.scoreless
                else None
            ),
        )
        cursor = (float(after[0]), int(after[1])) if after else None
        top = ranking.Ranker(c, self._tokenizer, query).top(
            offset + limit + 1, descending=descending, after=cursor
        )
        return [(row_id, score) for score, row_id in top[offset:]]

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
        plan = plan_search(parse_query(query))
        sql = _search_sql(plan, sort, descending, all_versions)
        fingerprint = search_fingerprint(query, sort, sql.descending, all_versions)
        after = read_cursor(cursor, fingerprint, sql.order)
        with self._read() as c:
            total = c.execute(sql.count, (*sql.count_params, self.count_limit + 1)).fetchone()[0]
            if sql.page is None:
                rows = self._ranked(c, plan, all_versions, sql.descending, limit, offset, after)
            else:
                page = sql.page if total <= self.count_limit or sql.walk is None else sql.walk
                rows = c.execute(
                    page.after if after else page.first, (*page.params, *after, limit + 1, offset)
                ).fetchall()
            return search_page(
                rows,
                limit=limit,
                offset=offset,
                cursor=cursor,
                fingerprint=fingerprint,
                ranked=sql.page is None,
                total=total,
                count_limit=self.count_limit,
                cards=lambda ids: self._cards(c, ids),
                aliases=lambda names: self._aliases(c, names),
            )


# ------------------------------------------------- shared with other stores

#: The checks and encodings a :class:`RegistryStore` on another database
#: shares with this one, so that it refuses the same cards with the same
#: words and reads the same cursors (plugins' stores import them from here,
#: with the decisions of the section "decisions shared with other stores").
check_card = _check_card
card_json = _card_json
load_card = _load_card
same_content = _same_content
clean_tags = _clean_tags
text_problem = _text_problem
encode_cursor = _encode_cursor
decode_cursor = _decode_cursor
