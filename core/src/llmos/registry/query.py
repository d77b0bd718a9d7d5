"""The registry's search language: a tokenizer, a recursive-descent parser and
a compiler to parameterised SQL.

A query is free text and filters combined with ``AND``, ``OR``, ``NOT`` and
parentheses; terms side by side are joined with ``AND``::

    sentiment task:text-classification (family:bert OR family:roberta)
    NOT tag:deprecated params:<200M license:apache-2.0

* bare words and ``"quoted phrases"`` are free text, matched with SQLite FTS5
  over name, description, tags and tasks and ranked with bm25;
* ``field:value`` filters (``field:"a value"`` when the value has spaces) on
  ``task``, ``provider``, ``family``, ``tag``, ``license``, ``format``,
  ``status`` and ``name``; a value with ``*`` or ``?`` is a glob
  (``name:acme/*``); values compare case-insensitively;
* ``params:`` (or ``parameters:``) compares the parameter count:
  ``params:<200M``, ``params:>=1B``, ``params:100M..1B`` (inclusive), with the
  suffixes K, M, B and T.

Keywords and field names are case-insensitive. ``(`` opens a group only at the
start of a term, so text such as ``NEAR(`` stays text; a word that looks like
``field:value`` with an unknown field is an error (quote it to search for it).

A query holds at most :data:`MAX_TERMS` terms (words, phrases and filters)
and nests parentheses and ``NOT`` at most :data:`MAX_DEPTH` deep: the compiled
SQL grows with both, and SQLite refuses expressions over 1,000 levels deep.
NUL, other control characters (tabs and newlines are spaces) and lone
surrogates are refused: FTS5 ends a string at NUL and SQLite cannot store a
surrogate.

User text never reaches SQL or FTS5 syntax: every value is a bound parameter,
and every free-text term is handed to FTS5 as one quoted string.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Iterator
from typing import Any

import attrs

from llmos.errors import UsageError
from llmos.types import ModelFormat

__all__ = [
    "MAX_DEPTH",
    "MAX_TERMS",
    "And",
    "Compare",
    "Filter",
    "Node",
    "Not",
    "Or",
    "QueryError",
    "SearchPlan",
    "Sql",
    "Text",
    "fts_phrase",
    "parse_query",
    "plan_search",
    "to_sql",
]


class QueryError(UsageError):
    """A search query that cannot be parsed; ``position`` is 1-based."""

    def __init__(self, message: str, position: int) -> None:
        super().__init__(f"bad search query at position {position}: {message}", param="query")
        self.position = position


# ------------------------------------------------------------------------ AST


@attrs.frozen
class Text:
    """Free text: a word, or a phrase when it was quoted."""

    text: str
    phrase: bool = False
    position: int = attrs.field(default=0, eq=False)

    @property
    def searchable(self) -> bool:
        """Whether FTS5's tokenizer finds a token in it (``*`` or ``--`` has none)."""
        return any(ch.isalnum() for ch in self.text)


@attrs.frozen
class Filter:
    """``field:value`` on a text field; ``value`` is lowercased."""

    field: str
    value: str
    position: int = attrs.field(default=0, eq=False)


@attrs.frozen
class Compare:
    """``params:<op><count>``; ``op`` is one of ``< <= > >= =``."""

    field: str
    op: str
    value: int
    position: int = attrs.field(default=0, eq=False)


@attrs.frozen
class And:
    items: tuple[Node, ...]


@attrs.frozen
class Or:
    items: tuple[Node, ...]


@attrs.frozen
class Not:
    item: Node


Node = Text | Filter | Compare | And | Or | Not


def _join(kind: type[And] | type[Or], items: list[Node]) -> Node:
    """One node for ``items`` joined by ``kind``, flattening nested joins of the same kind."""
    flat: list[Node] = []
    for item in items:
        flat.extend(item.items if isinstance(item, kind) else (item,))
    return flat[0] if len(flat) == 1 else kind(tuple(flat))


# --------------------------------------------------------------------- fields

#: what a user may write before ``:``, and the field it means
FIELD_NAMES: dict[str, str] = {
    "task": "task",
    "tasks": "task",
    "provider": "provider",
    "family": "family",
    "tag": "tag",
    "tags": "tag",
    "license": "license",
    "licence": "license",
    "format": "format",
    "status": "status",
    "name": "name",
    "params": "parameters",
    "parameters": "parameters",
}
#: the values the closed fields accept (search never sees deleted versions)
_CHOICES: dict[str, tuple[str, ...]] = {
    "format": tuple(str(f) for f in ModelFormat),
    "status": ("active", "deprecated"),
}
_SUFFIXES = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "t": 10**12}
_NUMBER = re.compile(r"(\d+(?:\.\d+)?)([kmbt]?)", re.IGNORECASE)
_COMPARISON = re.compile(r"(<=|>=|<|>|=)?(.*)", re.DOTALL)
_FIELD_PREFIX = re.compile(r"([A-Za-z_]+):")
_KEYWORDS = frozenset({"AND", "OR", "NOT"})
#: SQLite's largest integer
_MAX_COUNT = 2**63 - 1
#: most words, phrases and filters in one query
MAX_TERMS = 200
#: deepest nesting of parentheses and ``NOT`` in one query
MAX_DEPTH = 32
#: longest number a ``params:`` filter may hold (2**63 has 19 digits)
_MAX_NUMBER_CHARS = 40
#: characters a query may not hold: C0 controls other than tab, newline and
#: carriage return, DEL, and lone surrogates (no UTF-8 encoding)
_FORBIDDEN = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f\ud800-\udfff]")


def _did_you_mean(word: str, choices: list[str] | tuple[str, ...]) -> str:
    near = difflib.get_close_matches(word, choices, n=1)
    return f" (did you mean {near[0]!r}?)" if near else ""


def _is_glob(value: str) -> bool:
    return "*" in value or "?" in value


# ------------------------------------------------------------------ tokenizer


@attrs.frozen
class _Token:
    kind: str  # ( ) AND OR NOT WORD PHRASE FIELD EOF
    value: str
    position: int  # 1-based
    field: str = ""
    value_position: int = 0


def _tokens(text: str) -> Iterator[_Token]:
    i, n = 0, len(text)
    while True:
        while i < n and text[i].isspace():
            i += 1
        if i >= n:
            yield _Token("EOF", "", n + 1)
            return
        start, ch = i, text[i]
        if ch in "()":
            yield _Token(ch, ch, start + 1)
            i += 1
        elif ch == '"':
            # An unclosed quote runs to the end: search boxes forgive it.
            end = text.find('"', start + 1)
            end = n if end < 0 else end
            yield _Token("PHRASE", text[start + 1 : end], start + 1)
            i = end + 1
        else:
            while i < n and not text[i].isspace() and text[i] != ")":
                i += 1
            word = text[start:i]
            prefix = _FIELD_PREFIX.match(word)
            if prefix:
                value_at = start + prefix.end()
                value = word[prefix.end() :]
                if value.startswith('"'):
                    end = text.find('"', value_at + 1)
                    end = n if end < 0 else end
                    value, i = text[value_at + 1 : end], end + 1
                yield _Token(
                    "FIELD", value, start + 1, field=prefix.group(1), value_position=value_at + 1
                )
            elif word.upper() in _KEYWORDS:
                yield _Token(word.upper(), word, start + 1)
            else:
                yield _Token("WORD", word, start + 1)


# --------------------------------------------------------------------- parser

_TERM_STARTS = frozenset({"(", "NOT", "WORD", "PHRASE", "FIELD"})


_TERM_KINDS = frozenset({"WORD", "PHRASE", "FIELD"})


class _Parser:
    """Recursive descent, each level of parentheses or ``NOT`` one level of
    recursion: :meth:`enter` refuses a level past :data:`MAX_DEPTH` before it
    is taken, so no query reaches Python's recursion limit."""

    def __init__(self, text: str) -> None:
        self.tokens: list[_Token] = []
        terms = 0
        for token in _tokens(text):
            if token.kind in _TERM_KINDS:
                terms += 1
                if terms > MAX_TERMS:
                    raise QueryError(
                        f"more than {MAX_TERMS} search terms; use fewer words and filters",
                        token.position,
                    )
            self.tokens.append(token)
        self.at = 0
        self.depth = 0

    def enter(self, token: _Token) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise QueryError(
                f"parentheses and NOT nested more than {MAX_DEPTH} deep; simplify the query",
                token.position,
            )

    def peek(self) -> _Token:
        return self.tokens[self.at]

    def take(self) -> _Token:
        token = self.tokens[self.at]
        self.at += 1
        return token

    def parse(self) -> Node | None:
        if self.peek().kind == "EOF":
            return None
        node = self.or_expr()
        token = self.peek()
        if token.kind == ")":
            raise QueryError("unbalanced ')'", token.position)
        return node

    def or_expr(self) -> Node:
        items = [self.and_expr(None)]
        while self.peek().kind == "OR":
            items.append(self.and_expr(self.take()))
        return _join(Or, items)

    def and_expr(self, after: _Token | None) -> Node:
        items = [self.unary(after)]
        while True:
            token = self.peek()
            if token.kind == "AND":
                items.append(self.unary(self.take()))
            elif token.kind in _TERM_STARTS:
                items.append(self.unary(None))
            else:
                return _join(And, items)

    def unary(self, after: _Token | None) -> Node:
        token = self.take()
        if token.kind == "NOT":
            self.enter(token)
            node: Node = Not(self.unary(token))
            self.depth -= 1
            return node
        if token.kind == "(":
            if self.peek().kind == ")":
                raise QueryError("empty parentheses", token.position)
            self.enter(token)
            node = self.or_expr()
            if self.peek().kind != ")":
                raise QueryError("'(' is never closed", token.position)
            self.take()
            self.depth -= 1
            return node
        if token.kind == "WORD":
            return Text(token.value, False, token.position)
        if token.kind == "PHRASE":
            return Text(token.value, True, token.position)
        if token.kind == "FIELD":
            return _filter(token)
        if after is not None:
            raise QueryError(f"expected a search term after {after.value!r}", after.position)
        if token.kind == ")":
            raise QueryError("unbalanced ')'", token.position)
        # A leading AND/OR: nothing on its left to join.
        raise QueryError(
            f"{token.value!r} needs a term on each side (quote it to search for the word)",
            token.position,
        )


def _filter(token: _Token) -> Node:
    raw = token.field.lower()
    field = FIELD_NAMES.get(raw)
    if field is None:
        raise QueryError(
            f"unknown field {token.field!r}{_did_you_mean(raw, sorted(FIELD_NAMES))}; "
            f"fields: {', '.join(sorted(set(FIELD_NAMES.values())))} "
            "(quote the text to search for it)",
            token.position,
        )
    value = token.value.strip()
    if not value:
        raise QueryError(f"missing value after '{token.field}:'", token.position)
    if field == "parameters":
        return _parameters(value, token)
    value = value.lower()
    choices = _CHOICES.get(field)
    if choices is not None and not _is_glob(value) and value not in choices:
        raise QueryError(
            f"{field} must be one of {', '.join(choices)}, not {value!r}"
            f"{_did_you_mean(value, choices)}",
            token.value_position,
        )
    return Filter(field, value, token.position)


def _count(text: str, token: _Token) -> int:
    if len(text) > _MAX_NUMBER_CHARS:
        raise QueryError(
            f"number {text[:20]!r}... in '{token.field}:' is too long", token.value_position
        )
    match = _NUMBER.fullmatch(text)
    if match is None:
        raise QueryError(
            f"bad number {text!r} in '{token.field}:{token.value}': "
            "write a count such as 7000000, 200M or 1.5B",
            token.value_position,
        )
    digits, suffix = match.groups()
    # Integer arithmetic on the digits, so 1.1B is exactly 1_100_000_000.
    whole, _, fraction = digits.partition(".")
    scale = _SUFFIXES[suffix.lower()]
    count = int(whole) * scale
    if fraction:
        count += int(fraction) * scale // 10 ** len(fraction)
    if count > _MAX_COUNT:
        raise QueryError(f"number {text!r} is too large", token.value_position)
    return count


def _parameters(value: str, token: _Token) -> Node:
    if ".." in value:
        low_text, _, high_text = value.partition("..")
        if not low_text and not high_text:
            raise QueryError("a range needs at least one end, e.g. 100M..1B", token.value_position)
        bounds: list[Node] = []
        low = high = None
        if low_text:
            low = _count(low_text, token)
            bounds.append(Compare("parameters", ">=", low, token.position))
        if high_text:
            high = _count(high_text, token)
            bounds.append(Compare("parameters", "<=", high, token.position))
        if low is not None and high is not None and low > high:
            raise QueryError(
                f"empty range {value!r}: the low end is above the high end", token.value_position
            )
        return _join(And, bounds)
    match = _COMPARISON.fullmatch(value)
    assert match is not None  # the pattern matches any text
    op, number = match.groups()
    return Compare("parameters", op or "=", _count(number, token), token.position)


def parse_query(text: str) -> Node | None:
    """Parse a search query into its AST; ``None`` for a blank query (match all).

    Raises :class:`QueryError` (a :class:`~llmos.errors.UsageError`) naming
    the 1-based position of what is wrong.
    """
    if not isinstance(text, str):
        raise UsageError(f"a search query must be a string, got {type(text).__name__}")
    bad = _FORBIDDEN.search(text)
    if bad is not None:
        char = bad.group()
        what = (
            "a NUL byte"
            if char == "\x00"
            else "a lone surrogate (text that is not valid Unicode)"
            if "\ud800" <= char <= "\udfff"
            else f"the control character {char!r}"
        )
        raise QueryError(f"the query holds {what}; search for printable text", bad.start() + 1)
    return _Parser(text).parse()


# ------------------------------------------------------------------- compiler


@attrs.frozen
class Sql:
    """A SQL boolean expression and the parameters bound to its ``?`` marks."""

    sql: str
    params: tuple[Any, ...] = ()


TRUE = Sql("1")

#: the search's FTS5 table, whose rowid is ``versions.id``
FTS_TABLE = "versions_fts"
#: filter field -> denormalised column of ``versions``
_COLUMNS = {
    "provider": "provider",
    "family": "family",
    "license": "license",
    "format": "format",
    "status": "status",
    "name": "name",
}
#: filter field -> (table, column) of the normalised many-valued fields
_MANY = {"tag": ("tags", "tag"), "task": ("tasks", "task")}
_OPS = frozenset({"<", "<=", ">", ">=", "="})


def fts_phrase(text: str) -> str:
    """``text`` as one FTS5 string: FTS5 reads no operators, prefixes or
    column filters inside double quotes, and ``""`` is a literal quote."""
    return '"' + text.replace('"', '""') + '"'


def _glob(value: str) -> str:
    # ``[`` opens a character class in GLOB; users mean the character.
    return value.replace("[", "[[]")


def to_sql(
    node: Node,
    row: str = "v",
    *,
    correlated: bool = False,
    text_probes: bool = False,
    probe_id: str | None = None,
) -> Sql:
    """Compile ``node`` into a boolean SQL expression over the ``versions``
    row aliased ``row``. Unknown columns (``NULL``) count as not matching,
    also under ``NOT``: ``NOT family:bert`` keeps models with no family.

    Tag and task filters become ``id IN (…)`` lists, which SQLite can walk to
    find rows; with ``correlated`` they are probes of the row at hand, the
    cheaper choice when something else (the full-text index) finds the rows.
    Free text is an ``id IN (…)`` list of its matches too, unless
    ``text_probes``: then a full-text lookup of the row at hand, the cheaper
    choice for checking a few rows against a word that matches many.
    ``probe_id``: what the tag and task probes look up instead of the row's
    id, an expression equal to it (the full-text rowid, when the full-text
    index drives: SQLite can then probe before it reads the row).
    """
    key = probe_id or f"{row}.id"
    if isinstance(node, Text):
        if not node.searchable:
            return TRUE
        if text_probes:
            return Sql(
                f"EXISTS (SELECT 1 FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ?"
                f" AND rowid = {row}.id)",
                (fts_phrase(node.text),),
            )
        return Sql(
            f"{row}.id IN (SELECT rowid FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ?)",
            (fts_phrase(node.text),),
        )
    if isinstance(node, Filter):
        op, value = ("GLOB", _glob(node.value)) if _is_glob(node.value) else ("=", node.value)
        if node.field in _MANY:
            table, column = _MANY[node.field]
            if correlated:
                return Sql(
                    f"EXISTS (SELECT 1 FROM {table} WHERE version_id = {key} AND {column} {op} ?)",
                    (value,),
                )
            return Sql(
                f"{row}.id IN (SELECT version_id FROM {table} WHERE {column} {op} ?)", (value,)
            )
        return Sql(f"{row}.{_COLUMNS[node.field]} {op} ?", (value,))
    if isinstance(node, Compare):
        if node.op not in _OPS:
            raise ValueError(f"unknown comparison {node.op!r}")
        return Sql(f"{row}.parameters {node.op} ?", (node.value,))
    if isinstance(node, Not):
        inner = to_sql(
            node.item, row, correlated=correlated, text_probes=text_probes, probe_id=probe_id
        )
        # NULL (an unknown value) must count as false before it is negated.
        return Sql(f"(({inner.sql}) IS NOT 1)", inner.params)
    if isinstance(node, And | Or):
        parts = [
            to_sql(item, row, correlated=correlated, text_probes=text_probes, probe_id=probe_id)
            for item in node.items
        ]
        glue = " AND " if isinstance(node, And) else " OR "
        return Sql(
            "(" + glue.join(p.sql for p in parts) + ")",
            tuple(param for p in parts for param in p.params),
        )
    raise TypeError(f"not a query node: {node!r}")


def _without_text(node: Node, positive: bool = True) -> Node | None:
    """``node`` for a row that contains none of its positive free text: each
    such term dropped as false (None: the whole is false)."""
    if isinstance(node, Text):
        return None if positive and node.searchable else node
    if isinstance(node, Not):
        inner = _without_text(node.item, not positive)
        return Not(inner) if inner is not None else _ALWAYS
    if isinstance(node, And):
        items = [_without_text(item, positive) for item in node.items]
        if any(item is None for item in items):
            return None
        return _join(And, [i for i in items if i is not None and i is not _ALWAYS] or [_ALWAYS])
    if isinstance(node, Or):
        kept = [i for i in (_without_text(item, positive) for item in node.items) if i is not None]
        if any(item is _ALWAYS for item in kept):
            return _ALWAYS
        return _join(Or, kept) if kept else None
    return node


#: a term every row matches (NOT of a dropped term)
_ALWAYS: Node = Text("")


def _needs_text(node: Node) -> bool:
    """Whether every row ``node`` matches contains some of its positive free
    text (conservatively: False when unsure)."""
    if isinstance(node, Text):
        return node.searchable
    if isinstance(node, And):
        return any(_needs_text(item) for item in node.items)
    if isinstance(node, Or):
        return all(_needs_text(item) for item in node.items)
    return False  # a filter, or NOT


def _texts(node: Node, positive: bool = True) -> Iterator[tuple[Text, bool]]:
    """Every searchable free-text leaf with its polarity (False under an odd number of NOTs)."""
    if isinstance(node, Text):
        if node.searchable:
            yield node, positive
    elif isinstance(node, Not):
        yield from _texts(node.item, not positive)
    elif isinstance(node, And | Or):
        for item in node.items:
            yield from _texts(item, positive)


@attrs.frozen
class SearchPlan:
    """How to run a query.

    ``match``: an FTS5 expression that every hit satisfies, so the search can
    start from the full-text index (the fast path: free text ANDed with
    filters); its bm25 rank is the score. ``where``: the rest of the query
    over the ``versions`` row ``v``, written so that its tag and task filters
    can find rows. ``probes``: the same conditions written to check one row
    at a time, for when rows are walked in an index's order and only a page
    of them is needed. ``score_match``: when the free text sits under ``OR``
    and cannot drive, an FTS5 expression used only to rank.

    For ranking from the impact index (:mod:`llmos.registry.ranking`):
    ``phrases``, the free text that scores (with ``match``: the text every
    hit contains); ``excluded``, the text no hit contains (``NOT`` beside
    ``match``); ``checks``, the rest of the query checked one row at a time,
    free text included; ``scoreless``, whether a hit may contain none of
    ``phrases`` (text under ``OR`` beside a filter), and so score 0, and if
    so ``unscored``, the query for such hits (the text dropped as false),
    written so that SQLite can find its rows.
    """

    match: str | None
    where: Sql
    probes: Sql
    score_match: str | None = None
    phrases: tuple[str, ...] = ()
    excluded: tuple[str, ...] = ()
    checks: Sql = TRUE
    scoreless: bool = False
    unscored: Sql = TRUE

    @property
    def has_text(self) -> bool:
        return self.match is not None or self.score_match is not None


def _unscored_sql(node: Node) -> Sql:
    rest = _without_text(node)
    if rest is None:
        return Sql("0")
    # _ALWAYS is a Text without tokens, which compiles to TRUE.
    return to_sql(rest)


def plan_search(node: Node | None) -> SearchPlan:
    """Split a parsed query into the FTS5 part that drives it and SQL for the rest."""
    if node is None:
        return SearchPlan(None, TRUE, TRUE)
    conjuncts = node.items if isinstance(node, And) else (node,)
    driving = [c for c in conjuncts if isinstance(c, Text) and c.searchable]
    if not driving:
        scoring = [t.text for t, positive in _texts(node) if positive]
        return SearchPlan(
            None,
            to_sql(node),
            to_sql(node, correlated=True),
            " OR ".join(fts_phrase(text) for text in scoring) or None,
            phrases=tuple(scoring),
            checks=to_sql(node, correlated=True, text_probes=True),
            scoreless=not _needs_text(node),
            unscored=_unscored_sql(node),
        )
    excluded = [
        c.item
        for c in conjuncts
        if isinstance(c, Not) and isinstance(c.item, Text) and c.item.searchable
    ]
    match = " AND ".join(fts_phrase(t.text) for t in driving)
    for text in excluded:
        match = f"({match}) NOT {fts_phrase(text.text)}"
    rest = [
        c
        for c in conjuncts
        if not (isinstance(c, Text) or (isinstance(c, Not) and c.item in excluded))
    ]
    # The full-text index finds the rows, so filters only check each one,
    # tags and tasks before the row is read.
    where = (
        to_sql(_join(And, rest), correlated=True, probe_id=f"{FTS_TABLE}.rowid") if rest else TRUE
    )
    checks = to_sql(_join(And, rest), correlated=True, text_probes=True) if rest else TRUE
    return SearchPlan(
        match,
        where,
        to_sql(_join(And, rest), correlated=True) if rest else TRUE,
        phrases=tuple(t.text for t in driving),
        excluded=tuple(t.text for t in excluded),
        checks=checks,
    )
