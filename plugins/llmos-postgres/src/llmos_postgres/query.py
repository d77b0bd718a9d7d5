"""The registry's search language compiled for PostgreSQL.

The parser and the plan are the kernel's (:mod:`llmos.registry.query`): the
same text means the same thing on both stores. Only the compilation differs:
free text is looked up in the ``postings`` table (one row per term and
version, with the term's positions, see :mod:`llmos_postgres.store`) instead
of SQLite's FTS5 index, and a glob is a ``LIKE`` pattern instead of ``GLOB``.

Every value is a bound parameter (``%s``); the SQL around them is fixed text.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import attrs

from llmos.registry.query import And, Compare, Filter, Node, Not, Or, Text
from llmos.registry.ranking import WEIGHTS

__all__ = ["POSITION_BITS", "PgSql", "column_weight", "like_pattern", "phrase_weight", "to_pg"]

#: a posting's position is ``column << POSITION_BITS | index``: a column holds
#: at most 65,536 characters, so fewer tokens than ``1 << 20``, and a phrase
#: (consecutive positions) never runs from one column into the next
POSITION_BITS = 20

_COLUMNS = {
    "provider": "provider",
    "family": "family",
    "license": "license",
    "format": "format",
    "status": "status",
    "name": "name",
}
_MANY = {"tag": ("tags", "tag"), "task": ("tasks", "task")}
_OPS = frozenset({"<", "<=", ">", ">=", "="})


@attrs.frozen
class PgSql:
    """A PostgreSQL expression and the parameters bound to its ``%s`` marks."""

    sql: str
    params: tuple[Any, ...] = ()


TRUE = PgSql("TRUE")


def like_pattern(glob: str) -> str:
    """A GLOB pattern (``*``, ``?``; every other character literal, as the
    kernel's compiler makes ``[`` literal) as a ``LIKE`` pattern."""
    out = []
    for ch in glob:
        if ch in "\\%_":
            out.append("\\" + ch)
        elif ch == "*":
            out.append("%")
        elif ch == "?":
            out.append("_")
        else:
            out.append(ch)
    return "".join(out)


def column_weight(position: str) -> str:
    """The bm25 weight of the column a position lies in."""
    cases = " ".join(f"WHEN {i} THEN {w}" for i, w in enumerate(WEIGHTS))
    return f"(CASE {position} >> {POSITION_BITS} {cases} END)"


def _phrase_join(words: Sequence[str], version: str) -> tuple[str, tuple[Any, ...]]:
    """FROM/WHERE text joining one postings row per word of a phrase for
    ``version`` (an expression, or None for every version), with ``x`` the
    positions where the phrase starts."""
    joins = " ".join(
        f"JOIN postings p{i} ON p{i}.version_id = p0.version_id AND p{i}.term = %s"
        for i in range(1, len(words))
    )
    adjacent = " AND ".join(f"x + {i} = ANY (p{i}.positions)" for i in range(1, len(words)))
    where = "p0.term = %s" + (f" AND p0.version_id = {version}" if version else "")
    text = f"postings p0 {joins} CROSS JOIN LATERAL unnest(p0.positions) AS u (x) WHERE {where}"
    if adjacent:
        text += f" AND {adjacent}"
    return text, (*words[1:], words[0])


def phrase_weight(words: Sequence[str], version: str) -> PgSql:
    """The phrase's weighted count in the version ``version`` (bm25's f): its
    occurrences in each column times the column's weight, summed; a float."""
    if len(words) == 1:
        return PgSql(
            "COALESCE((SELECT p.weight FROM postings p"
            f" WHERE p.term = %s AND p.version_id = {version}), 0)::float8",
            (words[0],),
        )
    source, params = _phrase_join(words, version)
    return PgSql(f"COALESCE((SELECT sum({column_weight('x')}) FROM {source}), 0)::float8", params)


def _contains(words: Sequence[str], row: str) -> PgSql:
    if len(words) == 1:
        return PgSql(f"{row}.id IN (SELECT version_id FROM postings WHERE term = %s)", (words[0],))
    source, params = _phrase_join(words, "")
    return PgSql(f"{row}.id IN (SELECT p0.version_id FROM {source})", params)


def to_pg(node: Node, tokens: Any, row: str = "v") -> PgSql:
    """``node`` as a boolean expression over the ``versions`` row ``row``;
    ``tokens(text)`` splits free text as the registry's tokenizer does. As in
    SQLite, an unknown value (``NULL``) does not match, under ``NOT`` too."""
    if isinstance(node, Text):
        words = tokens(node.text) if node.searchable else ()
        return _contains(words, row) if words else TRUE
    if isinstance(node, Filter):
        glob = "*" in node.value or "?" in node.value
        op, value = ("LIKE", like_pattern(node.value)) if glob else ("=", node.value)
        if node.field in _MANY:
            table, column = _MANY[node.field]
            return PgSql(
                f"{row}.id IN (SELECT version_id FROM {table} WHERE {column} {op} %s)", (value,)
            )
        return PgSql(f"{row}.{_COLUMNS[node.field]} {op} %s", (value,))
    if isinstance(node, Compare):
        if node.op not in _OPS:
            raise ValueError(f"unknown comparison {node.op!r}")
        return PgSql(f"{row}.parameters {node.op} %s", (node.value,))
    if isinstance(node, Not):
        inner = to_pg(node.item, tokens, row)
        return PgSql(f"(({inner.sql}) IS NOT TRUE)", inner.params)
    if isinstance(node, And | Or):
        parts = [to_pg(item, tokens, row) for item in node.items]
        glue = " AND " if isinstance(node, And) else " OR "
        return PgSql(
            "(" + glue.join(p.sql for p in parts) + ")",
            tuple(param for p in parts for param in p.params),
        )
    raise TypeError(f"not a query node: {node!r}")
