"""Relevance ranking for registry search: the best bm25 matches without
scoring every match.

FTS5 finds the matches of a query in rowid order and ranks a match only once
it has found it, so the 20 best of 300,000 matches cost 300,000 bm25
evaluations, and before the first of them ``bm25()`` counts every match of
every phrase for its IDF: about 0.4 s at a million cards. This module keeps a
second, *impact-ordered* index from which the best matches come first, so a
search reads a few dozen versions and stops.

The score is SQLite's ``bm25()`` with the registry's column weights (name 10,
description 1, tags 4, tasks 4; k1 1.2, b 0.75; IDF floored at 1e-6), to the
last bit for single words, computed here from the same counts. One thing
differs: a phrase of several words weighs the sum of its words' IDFs (as
Lucene does), where ``bm25()`` uses the IDF of the phrase's own document
count, which only a scan of every match of the phrase can tell. For a query
that is one phrase, that changes no order, only the score's scale.

The index
---------

``versions_impacts`` is a contentless FTS5 table with one row per indexed
version (not deleted). Its tokens are ``<term>_<weight>``, one for each term
of the version, where the weight is the term's count in each column times the
column's weight, summed (capped at :data:`MAX_WEIGHT`). Its rowid puts the
version's length (its token count, bm25's D) in the high 32 bits and the
version id, inverted, in the low ones, so a token's doclist lists the
versions where the term has that weight from shortest to longest, and among
equal lengths from the newest: bm25 for one weight falls with the length, so
each doclist is in score order, ties broken as search breaks them. A search
for a word merges the doclists of its weights, best first; for a phrase, it
merges one stream per value of the smallest weight among the phrase's words
(an FTS5 query over the weight tokens), which bounds the phrase's own count.

``search_terms`` holds each term's document count (for the IDF) and the
weights it has (a bit mask), ``search_state`` the id up to which versions are
indexed. Registering does not write the index: versions above that id are
*pending*, found by FTS5 and scored from their text at search time, and
counted into the IDF by FTS5. A writer that leaves :data:`FOLD_AT` of them
pending indexes them all, in a transaction of its own after its own: a batch
costs far less per version than one at a time (FTS5 flushes a segment per
row otherwise), and a search never has more than that many to score by
hand. Editing or deleting an indexed version updates the index at once.
FTS5 merges the index's segments as they pile up; each time the index has
doubled it is also merged into one (a few seconds at a million versions),
which keeps a phrase's streams quick to open.

Tokens come from the same tokenizer FTS5 uses (``unicode61 remove_diacritics
2``): ASCII text is split and folded here exactly as it does, other text is
handed to FTS5 itself (an in-memory table), so the index and FTS5 never
disagree about what a version contains.
"""

from __future__ import annotations

import heapq
import json
import math
import re
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import attrs

from llmos.errors import LlmosError
from llmos.registry.query import FTS_TABLE, Sql, fts_phrase

__all__ = [
    "FOLD_AT",
    "IMPACTS_TABLE",
    "MAX_WEIGHT",
    "WEIGHTS",
    "Ranker",
    "Tokenizer",
    "bm25",
    "create_index",
    "fold",
    "pending",
    "reindex",
    "unindex",
]

#: FTS5's tokenizer for the registry's text (the ``tokenize`` option of the
#: full-text table; ``Tokenizer`` reproduces it)
TOKENIZE = "unicode61 remove_diacritics 2"
#: bm25 weights of the full-text columns: name, description, tags, tasks
WEIGHTS = (10, 1, 4, 4)
K1 = 1.2
B = 0.75
#: weights are capped here in the index (a bit of a 63-bit mask each)
MAX_WEIGHT = 62
#: pending (unindexed) versions that make a writer index them
FOLD_AT = 512
#: versions indexed per transaction when catching up (after an upgrade)
CATCH_UP_CHUNK = 20_000

IMPACTS_TABLE = "versions_impacts"
TERMS_TABLE = "search_terms"
STATE_TABLE = "search_state"

_ID_BITS = 32
_ID_MASK = (1 << _ID_BITS) - 1
_MAX_SIZE = (1 << 31) - 1
#: FTS5 keeps at most this many bytes of a token
_MAX_TOKEN = 32768
_ASCII_WORD = re.compile(r"[0-9a-z]+")
_ALNUM = frozenset("0123456789abcdefghijklmnopqrstuvwxyz")
#: an ASCII word FTS5 would cut short
_LONG_WORD = re.compile(f"[0-9A-Za-z]{{{_MAX_TOKEN + 1}}}")


# ----------------------------------------------------------------- tokens


class Tokenizer:
    """Split text into the tokens FTS5's ``unicode61 remove_diacritics 2``
    makes of it, in order.

    ASCII text is split here (runs of letters and digits, lowercased: all that
    tokenizer does to ASCII); other text goes through FTS5 itself, in a private
    in-memory database, so that Unicode folding and word boundaries are
    SQLite's own. Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def tokens(self, text: str) -> list[str]:
        if text.isascii() and (len(text) <= _MAX_TOKEN or _LONG_WORD.search(text) is None):
            return _ASCII_WORD.findall(text.lower())
        return self._fts5_tokens(text)

    def _fts5_tokens(self, text: str) -> list[str]:
        with self._lock:
            db = self._db
            if db is None:
                db = sqlite3.connect(":memory:", check_same_thread=False, isolation_level=None)
                db.execute(
                    f"CREATE VIRTUAL TABLE t USING fts5 (x, content='', tokenize='{TOKENIZE}')"
                )
                db.execute("CREATE VIRTUAL TABLE v USING fts5vocab (t, 'instance')")
                self._db = db
            db.execute("INSERT INTO t (rowid, x) VALUES (1, ?)", (text,))
            try:
                rows = db.execute("SELECT term, offset FROM v").fetchall()
            finally:
                db.execute("INSERT INTO t (t) VALUES ('delete-all')")
        return [term for term, _ in sorted(rows, key=lambda row: row[1])]

    def phrase(self, text: str) -> tuple[str, ...]:
        return tuple(self.tokens(text))

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def doc_weights(tokenizer: Tokenizer, columns: Sequence[str]) -> tuple[int, Counter[str]]:
    """A version's length (bm25's D) and each term's weighted count, from its
    full-text columns (name, description, tags, tasks)."""
    size = 0
    weights: Counter[str] = Counter()
    for weight, text in zip(WEIGHTS, columns, strict=True):
        words = tokenizer.tokens(text or "")
        size += len(words)
        if weight == 1:
            weights.update(words)
        else:
            for word in words:
                weights[word] += weight
    return size, weights


class _Phrase:
    """A phrase (a tuple of tokens), counted in a version's columns as FTS5
    counts it: once at every position it starts, within one column."""

    __slots__ = ("first", "needle", "overlaps", "pattern")

    def __init__(self, words: tuple[str, ...]) -> None:
        # In tokens: each word between two spaces of its own, so that
        # occurrences side by side share no space and str.count sees them.
        self.needle = " " + "  ".join(words) + " " if words else ""
        # "a a" occurs twice in "a a a": only a phrase that can overlap
        # itself can occur at overlapping places.
        self.overlaps = any(words[i:] == words[: len(words) - i] for i in range(1, len(words)))
        # In lowercased ASCII text, FTS5 sees runs of letters and digits:
        # the words with anything else between them, not inside longer
        # runs. The start is checked apart (a pattern that begins with a
        # look-behind cannot be scanned for quickly); a phrase that can
        # overlap itself is matched in a look-ahead, at every position.
        self.pattern = None
        self.first = words[0] if words else ""
        if words and all(_ASCII_WORD.fullmatch(w) for w in words):
            body = "[^0-9a-z]+".join(words) + "(?![0-9a-z])"
            self.pattern = re.compile(f"(?={body})" if self.overlaps else body)

    def in_ascii(self, text: str) -> int:
        """Occurrences in lowercased ASCII text (``pattern`` is set)."""
        if self.first not in text:
            return 0
        assert self.pattern is not None
        found = 0
        for match in self.pattern.finditer(text):
            start = match.start()
            if not start or text[start - 1] not in _ALNUM:
                found += 1
        return found

    def in_tokens(self, text: str) -> int:
        """Occurrences in a column written as :func:`_spaced` tokens."""
        if not self.overlaps:
            return text.count(self.needle)
        found, at = 0, text.find(self.needle)
        while at >= 0:
            found += 1
            at = text.find(self.needle, at + 1)
        return found


def _spaced(words: list[str]) -> str:
    return " " + "  ".join(words) + " "


def _plain(text: str) -> bool:
    """Whether FTS5 tokenizes ``text`` as :data:`_ASCII_WORD` runs."""
    return text.isascii() and (len(text) <= _MAX_TOKEN or _LONG_WORD.search(text) is None)


def phrase_weights(
    tokenizer: Tokenizer,
    columns: Sequence[str],
    phrases: Sequence[_Phrase],
    size: int | None = None,
) -> tuple[int, list[int]]:
    """Each phrase's weighted count (bm25's f) in a version, and the
    version's length (counted here unless ``size`` is given)."""
    columns = [text or "" for text in columns]
    counts = [0] * len(phrases)
    if size is not None:
        # ASCII, length known: each phrase searched for in the text itself.
        lowered = []
        for text in columns:
            if not _plain(text):
                break
            lowered.append(text.lower())
        else:
            for i, phrase in enumerate(phrases):
                if phrase.pattern is None:
                    continue  # it has a non-ASCII word: not in ASCII text
                count = phrase.in_ascii
                total = 0
                for weight, text in zip(WEIGHTS, lowered, strict=True):
                    if text:
                        total += weight * count(text)
                counts[i] = total
            return size, counts
    total = 0
    for weight, text in zip(WEIGHTS, columns, strict=True):
        words = tokenizer.tokens(text)
        total += len(words)
        spaced = _spaced(words)
        for i, phrase in enumerate(phrases):
            if phrase.needle:
                counts[i] += weight * phrase.in_tokens(spaced)
    return (total if size is None else size), counts


# ------------------------------------------------------------------- bm25


def idf(rows: int, hits: int) -> float:
    """FTS5's IDF: ``log((N - n + 0.5) / (n + 0.5))``, at least 1e-6."""
    value = math.log((rows - hits + 0.5) / (hits + 0.5))
    return value if value > 0.0 else 1e-6


def bm25(weight: float, size: int, avgdl: float) -> float:
    """bm25's term factor for weighted count ``weight`` in a version of
    ``size`` tokens, written as FTS5 writes it (same operations, same order,
    so the same bits)."""
    return (weight * (K1 + 1.0)) / (weight + K1 * (1 - B + B * size / avgdl))


def _varints(blob: bytes) -> list[int]:
    """SQLite's big-endian varints (up to 9 bytes, the 9th all 8 bits)."""
    if blob and max(blob) < 0x80:
        return list(blob)  # every value under 128: one byte each
    out, at = [], 0
    while at < len(blob):
        value = 0
        for i in range(9):
            byte = blob[at]
            at += 1
            if i == 8:
                value = (value << 8) | byte
                break
            value = (value << 7) | (byte & 0x7F)
            if byte < 0x80:
                break
        out.append(value)
    return out


def corpus(conn: sqlite3.Connection, table: str = FTS_TABLE) -> tuple[int, int]:
    """An FTS5 table's row count and total token count (its "averages"
    record), which ``bm25()`` reads for N and the average length."""
    row = conn.execute(f"SELECT block FROM {table}_data WHERE id = 1").fetchone()
    if row is None or not row[0]:
        return 0, 0
    values = _varints(row[0])
    return values[0], sum(values[1:])


# ------------------------------------------------------------------ index


def create_index(conn: sqlite3.Connection) -> None:
    """The impact index's tables, empty, with nothing indexed yet."""
    conn.execute(
        f"CREATE VIRTUAL TABLE {IMPACTS_TABLE} USING fts5 ("
        " t, content='', detail=none, columnsize=0, tokenize=\"ascii tokenchars '_'\")"
    )
    conn.execute(
        f"CREATE TABLE {TERMS_TABLE} ("
        " term TEXT PRIMARY KEY, docs INTEGER NOT NULL, weights INTEGER NOT NULL"
        ") WITHOUT ROWID"
    )
    # indexed: the version id up to which versions are indexed; merged: how
    # many versions the index held when it was last merged into one segment
    conn.execute(
        f"CREATE TABLE {STATE_TABLE} (id INTEGER PRIMARY KEY CHECK (id = 1),"
        " indexed INTEGER NOT NULL, merged INTEGER NOT NULL)"
    )
    conn.execute(f"INSERT INTO {STATE_TABLE} (id, indexed, merged) VALUES (1, 0, 0)")


def indexed_through(conn: sqlite3.Connection) -> int:
    """The version id up to which versions are indexed."""
    return int(conn.execute(f"SELECT indexed FROM {STATE_TABLE}").fetchone()[0])


def pending(conn: sqlite3.Connection) -> int:
    """How many versions wait to be indexed (an upper bound: ids, not rows)."""
    found = conn.execute(
        f"SELECT coalesce((SELECT max(id) FROM versions), 0) - indexed FROM {STATE_TABLE}"
    ).fetchone()[0]
    return max(0, found)


def _key(row_id: int, size: int) -> int:
    if row_id > _ID_MASK:
        raise LlmosError(f"version id {row_id} is past what the search index holds ({_ID_MASK})")
    return (min(size, _MAX_SIZE) << _ID_BITS) | (_ID_MASK - row_id)


#: a weight's token suffix and bit, by weight
_SUFFIX = [f"_{min(w, MAX_WEIGHT)}" for w in range(MAX_WEIGHT + 1)]
_BIT = [1 << min(w, MAX_WEIGHT) for w in range(MAX_WEIGHT + 1)]


def _entry(tokenizer: Tokenizer, row_id: int, columns: Sequence[str]) -> tuple[int, list[str]]:
    """A version's rowid and tokens in the index."""
    size, weights = doc_weights(tokenizer, columns)
    return _key(row_id, size), _tokens_of(weights)


def _tokens_of(weights: dict[str, int]) -> list[str]:
    """The index tokens of a version: ``<term>_<weight>``."""
    suffix, top = _SUFFIX, MAX_WEIGHT
    return [term + suffix[w if w < top else top] for term, w in weights.items()]


class _TermCounts:
    """Changes to ``search_terms`` gathered over a batch of versions, as
    counts of index tokens (one per term and version)."""

    def __init__(self) -> None:
        self.tokens: Counter[str] = Counter()

    def add(self, tokens: list[str], sign: int = 1) -> None:
        if sign > 0:
            self.tokens.update(tokens)
        else:
            self.tokens.subtract(tokens)

    def write(self, conn: sqlite3.Connection) -> None:
        docs: dict[str, int] = {}
        masks: dict[str, int] = {}
        for token, n in self.tokens.items():
            term, _, weight = token.rpartition("_")
            docs[term] = docs.get(term, 0) + n
            masks[term] = masks.get(term, 0) | _BIT[int(weight)]
        conn.executemany(
            f"INSERT INTO {TERMS_TABLE} (term, docs, weights) VALUES (?, ?, ?)"
            " ON CONFLICT (term) DO UPDATE SET docs = docs + excluded.docs,"
            " weights = weights | excluded.weights",
            sorted((term, n, masks[term]) for term, n in docs.items()),
        )


def fold(conn: sqlite3.Connection, tokenizer: Tokenizer, limit: int | None = None) -> int:
    """Index the pending versions (all, or the ``limit`` oldest), in the
    caller's write transaction; return how many were indexed."""
    start = indexed_through(conn)
    sql = f"SELECT rowid, name, description, tags, tasks FROM {FTS_TABLE} WHERE rowid > ?"
    params: tuple[Any, ...] = (start,)
    if limit is not None:
        sql += " ORDER BY rowid LIMIT ?"
        params = (start, limit)
    rows = conn.execute(sql, params).fetchall()
    if not rows:
        # Only ids of versions deleted before they were indexed are left.
        top = conn.execute("SELECT max(id) FROM versions").fetchone()[0] or start
        if top > start:
            conn.execute(f"UPDATE {STATE_TABLE} SET indexed = ?", (top,))
        return 0
    counts = _TermCounts()
    entries = []
    for row_id, *columns in rows:
        key, tokens = _entry(tokenizer, row_id, columns)
        entries.append((key, " ".join(tokens)))
        counts.add(tokens)
    # In rowid order: FTS5 writes out what it holds whenever a rowid comes
    # lower than the last, so unsorted, a batch costs a segment per row.
    entries.sort()
    conn.executemany(f"INSERT INTO {IMPACTS_TABLE} (rowid, t) VALUES (?, ?)", entries)
    counts.write(conn)
    last = max(row[0] for row in rows)
    if limit is None:
        # Ids of versions deleted before they were indexed are passed too.
        last = max(last, conn.execute("SELECT max(id) FROM versions").fetchone()[0] or 0)
    conn.execute(f"UPDATE {STATE_TABLE} SET indexed = ?", (last,))
    _merge_if_doubled(conn)
    return len(rows)


def _merge_if_doubled(conn: sqlite3.Connection) -> None:
    """Merge the index into one segment each time it has doubled since the
    last merge. FTS5 merges its segments as they pile up, but leaves a dozen
    or so at a million versions, and a search for a phrase looks each of its
    words' weights up in every segment: merged, it opens its streams 3-6x
    faster. Doubling keeps the cost to about two merges of the final index,
    a few seconds at a million versions, spread over the registrations."""
    rows, _ = corpus(conn, IMPACTS_TABLE)
    merged = conn.execute(f"SELECT merged FROM {STATE_TABLE}").fetchone()[0]
    if rows >= max(2 * merged, 4 * FOLD_AT):
        conn.execute(f"INSERT INTO {IMPACTS_TABLE} ({IMPACTS_TABLE}) VALUES ('optimize')")
        conn.execute(f"UPDATE {STATE_TABLE} SET merged = ?", (rows,))


def _change(
    conn: sqlite3.Connection,
    tokenizer: Tokenizer,
    row_id: int,
    old: Sequence[str] | None,
    new: Sequence[str] | None,
) -> None:
    if row_id > indexed_through(conn):
        return  # pending: indexed later from what FTS5 holds then
    counts = _TermCounts()
    # A contentless FTS5 table forgets a row given the very tokens it holds.
    for columns, command, sign in ((old, "'delete', ", -1), (new, "", 1)):
        if columns is not None:
            key, tokens = _entry(tokenizer, row_id, columns)
            target = f"{IMPACTS_TABLE}, " if command else ""
            conn.execute(
                f"INSERT INTO {IMPACTS_TABLE} ({target}rowid, t) VALUES ({command}?, ?)",
                (key, " ".join(tokens)),
            )
            counts.add(tokens, sign)
    counts.write(conn)


def unindex(
    conn: sqlite3.Connection, tokenizer: Tokenizer, row_id: int, columns: Sequence[str]
) -> None:
    """Take a version out of the index (it is being deleted); ``columns``
    is what FTS5 holds for it."""
    _change(conn, tokenizer, row_id, columns, None)


def reindex(
    conn: sqlite3.Connection,
    tokenizer: Tokenizer,
    row_id: int,
    old: Sequence[str],
    new: Sequence[str],
) -> None:
    """Replace a version's entry after its text changed."""
    _change(conn, tokenizer, row_id, old, new)


# ---------------------------------------------------------------- ranking


@attrs.frozen
class RankQuery:
    """What :class:`Ranker` ranks.

    ``phrases``: the scoring phrases (each a tuple of tokens); every match
    contains all of them, or with ``any_phrase`` (free text under ``OR``)
    maybe none, and then scores 0. ``excluded``: phrases no match contains.
    ``match``: the FTS5 expression of the matches (with ``any_phrase``: of
    the versions that contain a phrase). ``checks``: the rest of the query
    (all of it, with ``any_phrase``) over the ``versions`` row ``v``, scope
    included.
    """

    phrases: tuple[tuple[str, ...], ...]
    excluded: tuple[tuple[str, ...], ...]
    match: str
    checks: Sql
    any_phrase: bool = False
    #: with ``any_phrase``: the whole query (scope included) written so that
    #: SQLite can find its rows from indexes, where ``checks`` probes one row
    #: at a time: the cheaper way to check many rows against rare text
    where: Sql | None = None
    #: with ``any_phrase``: the query for matches that contain no phrase
    #: (they score 0), scope included, written for indexes too; None: none can
    unscored: Sql | None = None


_INF = float("inf")
#: a stream entry that stands for a query not run yet
_UNOPENED = -1
#: below this many versions containing a several-phrase query's rarest
#: phrase (all of its phrases, under OR), its matches are scored one by one:
#: the threshold of streams summed falls slowly when phrases rarely meet
_FEW = 3_000


class _Source:
    """One FTS5 query over the impact index: versions in order of a bound
    on their score for one phrase."""

    __slots__ = ("cursor", "exact", "expr", "high", "low", "seek")

    def __init__(self, expr: str, high: float, low: float, exact: bool) -> None:
        self.expr = expr
        self.high = high  # the weight that bounds the score from above
        self.low = low  # ... from below
        self.exact = exact
        self.cursor: Iterator[tuple[int]] | None = None
        self.seek: tuple[str, int] | None = None


class _Stream:
    """The versions containing one phrase's words, from the impact index,
    in order of a bound on the phrase's score: the merge of its sources."""

    def __init__(
        self,
        conn: sqlite3.Connection,
        sources: list[_Source],
        weight: float,
        avgdl: float,
        descending: bool,
    ) -> None:
        self.conn = conn
        self.sources = sources
        self.weight = weight  # the phrase's IDF
        self.avgdl = avgdl
        self.descending = descending
        # (-key bound, -tie, source index, row id, size): a min-heap
        self.heap: list[tuple[float, float, int, int, int]] = []
        for i, source in enumerate(sources):
            # Unopened, a source promises its best: its bound at length 0
            # (descending), anything at all (ascending).
            best = self.bound(source, 0) if descending else 0.0
            self.heap.append((-best, -_INF, i, _UNOPENED, 0))
        heapq.heapify(self.heap)

    def bound(self, source: _Source, size: int) -> float:
        """The bound on the sort key of a version of this length."""
        if self.descending:
            high = source.high
            factor = K1 + 1.0 if high == _INF else bm25(high, size, self.avgdl)
            return self.weight * factor
        return -(self.weight * bm25(source.low, size, self.avgdl))

    def _advance(self, i: int) -> None:
        source = self.sources[i]
        if source.cursor is None:
            order = "ASC" if self.descending else "DESC"
            where, params = f"{IMPACTS_TABLE} MATCH ?", [source.expr]
            if source.seek is not None:
                where += f" AND rowid {source.seek[0]} ?"
                params.append(source.seek[1])
            source.cursor = iter(
                self.conn.execute(
                    f"SELECT rowid FROM {IMPACTS_TABLE} WHERE {where} ORDER BY rowid {order}",
                    params,
                )
            )
        row = next(source.cursor, None)
        if row is None:
            return
        key = row[0]
        size, row_id = key >> _ID_BITS, _ID_MASK - (key & _ID_MASK)
        tie = row_id if self.descending else -row_id
        heapq.heappush(self.heap, (-self.bound(source, size), -tie, i, row_id, size))

    def frontier(self) -> tuple[float, float] | None:
        """(key bound, tie) of the next version, or None when none is left."""
        while self.heap and self.heap[0][3] == _UNOPENED:
            _, _, i, _, _ = heapq.heappop(self.heap)
            self._advance(i)
        if not self.heap:
            return None
        neg_key, neg_tie = self.heap[0][:2]
        return -neg_key, -neg_tie

    def pop(self) -> tuple[int, int, _Source, float]:
        """The next version: (row id, size, its source, its key bound)."""
        self.frontier()
        neg_key, _, i, row_id, size = heapq.heappop(self.heap)
        self._advance(i)
        return row_id, size, self.sources[i], -neg_key


class Ranker:
    """The top of a ranked search, from the impact index and the pending
    versions. One per search: it reads in the caller's read transaction."""

    def __init__(self, conn: sqlite3.Connection, tokenizer: Tokenizer, query: RankQuery) -> None:
        self.conn = conn
        self.tokenizer = tokenizer
        self.query = query
        self.indexed = indexed_through(conn)
        rows, total = corpus(conn)
        self.rows = rows
        self.avgdl = total / rows if rows else 1.0
        words = {t for phrase in query.phrases for t in phrase}
        self.terms = self._terms(words)
        self.weights = [
            sum(idf(rows, self.terms[t][0]) for t in phrase) for phrase in query.phrases
        ]
        self.phrases = [_Phrase(p) for p in query.phrases]
        self.excluded = [_Phrase(p) for p in query.excluded]
        # What the last top() read (for tests and benchmarks): versions the
        # index offered and were checked, versions scored from their text
        # without it (pending ones; every match of a query with few), streams
        # there were and streams it opened.
        self.checked = self.direct = self.sources = self.opened = 0

    def _terms(self, words: Iterable[str]) -> dict[str, tuple[int, int]]:
        """term -> (document count now, mask of indexed weights)."""
        out: dict[str, tuple[int, int]] = {}
        for word in words:
            row = self.conn.execute(
                f"SELECT docs, weights FROM {TERMS_TABLE} WHERE term = ?", (word,)
            ).fetchone()
            docs, mask = row if row is not None else (0, 0)
            # Pending versions are counted from FTS5, which holds them.
            docs += self.conn.execute(
                f"SELECT count(*) FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? AND rowid > ?",
                (fts_phrase(word), self.indexed),
            ).fetchone()[0]
            out[word] = (docs, mask)
        return out

    # ------------------------------------------------------------- sources

    def _sources(self, phrase: tuple[str, ...]) -> list[_Source]:
        masks = [self.terms[t][1] for t in phrase]
        if not phrase or not all(masks):
            return []
        classes = [[w for w in range(1, MAX_WEIGHT + 1) if mask >> w & 1] for mask in masks]

        def high(w: int) -> float:
            return _INF if w == MAX_WEIGHT else float(w)

        if len(phrase) == 1:
            word = phrase[0]
            return [
                _Source(fts_phrase(f"{word}_{w}"), high(w), float(w), w < MAX_WEIGHT)
                for w in classes[0]
            ]
        # One source per value m of the smallest weight among the words:
        # every word weighs m or more, one of them exactly m. The phrase
        # occurs at most as often as its rarest-weighted word.
        sources = []
        for m in sorted({w for ws in classes for w in ws}, reverse=True):
            if any(max(ws) < m for ws in classes):
                continue
            at_least = [
                "(" + " OR ".join(fts_phrase(f"{t}_{w}") for w in ws if w >= m) + ")"
                for t, ws in zip(phrase, classes, strict=True)
            ]
            exactly = [
                fts_phrase(f"{t}_{m}") for t, ws in zip(phrase, classes, strict=True) if m in ws
            ]
            if not exactly:
                continue
            expr = " AND ".join(at_least) + " AND (" + " OR ".join(exactly) + ")"
            sources.append(_Source(expr, high(m), float(min(WEIGHTS)), False))
        return sources

    def _seek(self, stream: _Stream, after: tuple[float, int]) -> None:
        """Start the exact sources of a one-phrase search past the versions
        that rank before the cursor: a cursor's page costs what the first
        page costs, however deep it is."""
        for source in stream.sources:
            if not source.exact:
                continue
            # Bisection on the very expression that scores, so that rounding
            # cannot disagree with it: the score falls as the length grows.
            # Descending, versions shorter than the first length scoring at
            # most the cursor's score rank before the cursor; ascending,
            # versions from the first length scoring below it do.
            score, at_most = after[0], stream.descending
            low, high = 0, _MAX_SIZE
            while low < high:
                mid = (low + high) // 2
                value = stream.weight * bm25(source.low, mid, stream.avgdl)
                if (value <= score) if at_most else (value < score):
                    high = mid
                else:
                    low = mid + 1
            # One length of margin either way; the cursor's own test follows.
            if stream.descending:
                source.seek = (">=", max(0, low - 1) << _ID_BITS)
            elif low < _MAX_SIZE:
                source.seek = ("<", (low + 1) << _ID_BITS)

    # -------------------------------------------------------------- scoring

    def _check(self, ids: list[int], checks: Sql | None = None) -> set[int]:
        """Those of ``ids`` that pass ``checks`` (the query's, by default)."""
        checks = checks or self.query.checks
        rows = self.conn.execute(
            "SELECT v.id FROM json_each(?) AS j CROSS JOIN versions v ON v.id = j.value"
            f" WHERE {checks.sql}",
            (json.dumps(ids), *checks.params),
        )
        return {row[0] for row in rows}

    def _score_texts(self, ids: Sequence[tuple[int, int | None]]) -> Iterator[tuple[int, float]]:
        """(id, score) of those of the versions ``(id, length or None)`` that
        contain every phrase and no excluded one, from their text."""
        sizes = dict(ids)
        # FTS5's content and, for versions not indexed, its per-column token
        # counts (bm25's D, without tokenizing here).
        rows = self.conn.execute(
            f"SELECT c.id, c.c0, c.c1, c.c2, c.c3, d.sz FROM json_each(?) AS j"
            f" CROSS JOIN {FTS_TABLE}_content c ON c.id = j.value"
            f" CROSS JOIN {FTS_TABLE}_docsize d ON d.id = j.value",
            (json.dumps(list(sizes)),),
        )
        phrases = self.phrases + self.excluded
        scoring = len(self.phrases)
        needed = any if self.query.any_phrase else all
        for row_id, *columns, counted in rows:
            size = sizes[row_id]
            if size is None:
                size = sum(_varints(counted))
            size, counts = phrase_weights(self.tokenizer, columns, phrases, size)
            if not needed(counts[:scoring]) or any(counts[scoring:]):
                continue
            score = 0.0
            for f, weight in zip(counts, self.weights, strict=False):
                # FTS5 adds the terms of absent phrases too: zeros, no change.
                score += weight * bm25(f, size, self.avgdl)
            yield row_id, score

    def _unscored(
        self, want: int, descending: bool, after: tuple[float, int] | None
    ) -> list[tuple[int, float]]:
        """The first ``want`` matches that contain no phrase (score 0), by
        id, after the cursor: rows of ``unscored`` without the phrases."""
        assert self.query.unscored is not None
        where = self.query.unscored
        order, beyond = ("DESC", "<") if descending else ("ASC", ">")
        cursor = f" AND v.id {beyond} ?" if after is not None else ""
        rows = self.conn.execute(
            f"SELECT v.id FROM versions v WHERE {where.sql}{cursor} AND NOT EXISTS"
            f" (SELECT 1 FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? AND rowid = v.id)"
            f" ORDER BY v.id {order} LIMIT ?",
            (*where.params, *([after[1]] if after else []), self.query.match, want),
        ).fetchall()
        return [(row[0], 0.0) for row in rows]

    def _fts5_scores(self) -> list[tuple[int, float]]:
        """Every match's id and score from SQLite's ``bm25()`` (the full-text
        table's rank), for a query of single words."""
        rows = self.conn.execute(
            f"SELECT rowid, -rank FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ?", (self.query.match,)
        )
        return rows.fetchall()

    def _pending(self, everything: bool = False) -> list[int]:
        """The matches not indexed yet (``everything``: all matches) that
        contain the phrases (with ``any_phrase``: some phrase)."""
        rows = self.conn.execute(
            f"SELECT rowid FROM {FTS_TABLE} WHERE {FTS_TABLE} MATCH ? AND rowid > ?",
            (self.query.match, 0 if everything else self.indexed),
        )
        return [row[0] for row in rows]

    # ---------------------------------------------------------------- top

    def top(
        self, want: int, *, descending: bool = True, after: tuple[float, int] | None = None
    ) -> list[tuple[float, int]]:
        """The first ``want`` matches as ``(score, id)``, best first
        (``descending``) or worst first, after the cursor ``after``."""
        query = self.query
        if not query.phrases or self.rows == 0:
            return []
        sign = 1.0 if descending else -1.0
        # Kept: (key, tie, score, id), worst first; key and tie grow with rank.
        kept: list[tuple[float, float, float, int]] = []
        limit = (sign * after[0], sign * after[1]) if after is not None else None

        def keep(found: Iterable[tuple[int, float]]) -> None:
            for row_id, score in found:
                entry = (sign * score, sign * row_id, score, row_id)
                if limit is not None and entry[:2] >= limit:
                    continue  # at or before the cursor
                if len(kept) < want:
                    heapq.heappush(kept, entry)
                elif entry > kept[0]:
                    heapq.heapreplace(kept, entry)

        any_phrase = query.any_phrase
        scoreless = any_phrase and query.unscored is not None
        # Versions with none of the phrases score 0: after all others, or
        # (ascending) before them.
        cursor_at_zero = after is not None and after[0] == 0.0
        if scoreless and not descending:
            keep(self._unscored(want, descending, after if cursor_at_zero else None))
            if len(kept) >= want:
                return [(score, row_id) for _, _, score, row_id in sorted(kept, reverse=True)]
        elif scoreless and cursor_at_zero:
            return [(score, row_id) for row_id, score in self._unscored(want, descending, after)]

        # Pending versions: all of their matches, scored from their text;
        # all versions, when a several-phrase query has few matches.
        rare = [min(self.terms[t][0] for t in phrase) if phrase else 0 for phrase in query.phrases]
        few = len(rare) > 1 and (sum(rare) if any_phrase else min(rare)) < _FEW
        if few and all(len(p) == 1 for p in query.phrases + query.excluded):
            # Words only, and rare: SQLite's bm25 is ours to the bit, and
            # cheap when no word has many matches to count for its IDF.
            scored = dict(self._fts5_scores())
            direct = list(scored)
        else:
            scored = {}
            direct = self._pending(everything=few)
        self.direct = len(direct)
        seen = set(direct)
        if direct:
            # All matches of rare text under OR: its IN lists are short.
            passing = self._check(direct, query.where if few and any_phrase else None)
            if scored:
                keep((i, scored[i]) for i in direct if i in passing)
            else:
                keep(self._score_texts([(i, None) for i in direct if i in passing]))

        streams = [
            _Stream(self.conn, [] if few else self._sources(phrase), weight, self.avgdl, descending)
            for phrase, weight in zip(query.phrases, self.weights, strict=True)
        ]
        single = len(streams) == 1
        if after is not None and single:
            self._seek(streams[0], after)
        exact = single and len(query.phrases[0]) == 1 and not query.excluded
        batch: list[tuple[int, int, _Source, float]] = []
        size = max(8, want)
        while True:
            live = [(front, n) for n, s in enumerate(streams) if (front := s.frontier())]
            # All of one phrase's versions seen: with every phrase in every
            # match, all matches seen; with any phrase, all of them.
            done = len(live) < len(streams) if not any_phrase else not live
            if not done:
                # Nothing unseen ranks above this (single phrase: ties
                # included, streams break them as search does).
                threshold = live[0][0] if single else (sum(f[0] for f, _ in live), _INF)
                done = len(kept) >= want and kept[0][:2] > threshold
            if not done:
                _, i = max(live)
                row_id, length, source, bound = streams[i].pop()
                if row_id not in seen:
                    seen.add(row_id)
                    batch.append((row_id, length, source, bound))
                if len(batch) < size:
                    continue
            if batch:
                self.checked += len(batch)
                passing = self._check([c[0] for c in batch])
                if exact:
                    keep(
                        (row_id, sign * bound)
                        for row_id, _, source, bound in batch
                        if row_id in passing and source.exact
                    )
                    rest = [(c[0], c[1]) for c in batch if c[0] in passing and not c[2].exact]
                else:
                    rest = [(c[0], c[1]) for c in batch if c[0] in passing]
                if rest:
                    keep(self._score_texts(rest))
                batch = []
                size = min(size * 2, 256)
            elif done:
                break
        if scoreless and descending and len(kept) < want:
            keep(self._unscored(want - len(kept), descending, None))
        sources = [source for stream in streams for source in stream.sources]
        self.sources = len(sources)
        self.opened = sum(source.cursor is not None for source in sources)
        return [(score, row_id) for _, _, score, row_id in sorted(kept, reverse=True)]
