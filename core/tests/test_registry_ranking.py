"""Ranked search from the impact index (llmos.registry.ranking): the same
pages as a full bm25 ranking, whatever is indexed or pending, edited or
deleted, however deep the page; the index upgraded into an existing file."""

from __future__ import annotations

import random
import shutil
import sqlite3
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.registry import SQLiteStore, ranking
from llmos.registry import store as store_module
from llmos.registry.query import parse_query, plan_search
from llmos.types import ModelCard

DATA = Path(__file__).parent / "data"

WORDS = (  # noqa: SIM905 (a word list reads better as text)
    "model bert llama base large small fine tuned text classification question answering "
    "sentiment reviews chat code generation summarization news legal medical multilingual "
    "english german fast efficient quantized adapter embeddings search retrieval"
).split()
TASKS = ("text-classification", "question-answering", "text-generation", "summarization", "chat")


def make_cards(count: int, seed: int = 0, prefix: str = "m") -> list[ModelCard]:
    """Cards whose texts share words unevenly, so that weights, lengths and
    ties all vary."""
    rng = random.Random(seed)
    cards = []
    for i in range(count):
        words = rng.choices(WORDS, weights=range(len(WORDS), 0, -1), k=rng.randint(1, 14))
        if rng.random() < 0.3:
            words.insert(rng.randrange(len(words) + 1), "question answering")
        cards.append(
            ModelCard(
                name=f"{prefix}{i % 9}/{rng.choice(WORDS)}-{i:04d}",
                provider="transformers",
                description=" ".join(words),
                tasks=tuple(rng.sample(TASKS, k=rng.randint(0, 2))),
                tags=tuple(rng.sample(WORDS[:12], k=rng.randint(0, 3))),
                family=rng.choice(("bert", "llama", None)),
                license=rng.choice(("apache-2.0", "mit")),
                parameters=rng.randint(1, 900) * 10**7,
            )
        )
    return cards


def fold_all(store: SQLiteStore) -> None:
    with store._write() as c:
        ranking.fold(c, store._tokenizer)
    assert pending(store) == 0


def pending(store: SQLiteStore) -> int:
    conn = store._conn()
    top = conn.execute("SELECT max(id) FROM versions").fetchone()[0] or 0
    return top - ranking.indexed_through(conn)


def ranked(store: SQLiteStore, query: str, **kwargs: Any) -> list[tuple[str, int, float]]:
    page = store.search(query, limit=1000, **kwargs)
    assert page.total == len(page.items) or not page.total_exact
    return [(h.card.name, h.card.version or 0, h.score or 0.0) for h in page.items]


def by_cursors(
    store: SQLiteStore, query: str, limit: int, **kwargs: Any
) -> list[tuple[str, int, float]]:
    """Every hit of a search, page after page by cursor."""
    hits: list[tuple[str, int, float]] = []
    cursor = None
    while True:
        page = store.search(query, limit=limit, cursor=cursor, **kwargs)
        hits += [(h.card.name, h.card.version or 0, h.score or 0.0) for h in page.items]
        if (cursor := page.next_cursor) is None:
            return hits


def fts5_bm25(store: SQLiteStore, word: str) -> list[tuple[int, float]]:
    """SQLite's own ranking of a one-word query (the table's bm25 weights)."""
    return (
        store._conn()
        .execute(
            "SELECT v.id, -f.rank FROM versions_fts f CROSS JOIN versions v ON v.id = f.rowid"
            " WHERE versions_fts MATCH ? AND v.is_latest = 1 ORDER BY f.rank, v.id DESC",
            (f'"{word}"',),
        )
        .fetchall()
    )


def fts5_ranked(store: SQLiteStore, query: str) -> list[tuple[int, float]]:
    """SQLite's own ranking of a query whose free text is single words: its
    bm25 over the text that scores, 0 for matches without it."""
    plan = plan_search(parse_query(query))
    text = plan.match or plan.score_match
    rest = plan.probes  # the filters over v, or (text under OR) the whole query
    return (
        store._conn()
        .execute(
            "SELECT v.id, COALESCE(-s.rank, 0.0) AS k FROM versions v LEFT JOIN"
            " (SELECT rowid, rank FROM versions_fts WHERE versions_fts MATCH ?) s ON s.rowid = v.id"
            f" WHERE v.is_latest = 1 AND {rest.sql} AND (? IS NOT NULL OR s.rowid IS NOT NULL)"
            " ORDER BY k DESC, v.id DESC",
            (text, *rest.params, plan.score_match),
        )
        .fetchall()
    )


def search_ids(store: SQLiteStore, query: str, **kwargs: Any) -> list[tuple[int, float]]:
    """(version id, score) of a ranked search, through the store's ranking."""
    page = store.search(query, limit=1000, **kwargs)
    ids = dict(store._conn().execute("SELECT name || '@' || version, id FROM versions").fetchall())
    return [(ids[h.card.ref], h.score or 0.0) for h in page.items]


def check_index(store: SQLiteStore) -> None:
    """The impact index holds exactly what the full-text index holds."""
    conn = store._conn()
    tok = ranking.Tokenizer()
    indexed = ranking.indexed_through(conn)
    tokens: Counter[str] = Counter()
    docs: Counter[str] = Counter()
    for row_id, *columns in conn.execute(
        "SELECT rowid, name, description, tags, tasks FROM versions_fts"
    ):
        if row_id > indexed:
            continue
        _, weights = ranking.doc_weights(tok, columns)
        tokens.update(f"{t}_{min(w, ranking.MAX_WEIGHT)}" for t, w in weights.items())
        docs.update(weights.keys())
    conn.execute(
        "CREATE VIRTUAL TABLE IF NOT EXISTS temp.impacts_vocab"
        " USING fts5vocab(main, versions_impacts, 'row')"
    )
    in_index = dict(conn.execute("SELECT term, doc FROM temp.impacts_vocab").fetchall())
    assert in_index == dict(tokens)
    terms = {
        term: (n, mask)
        for term, n, mask in conn.execute("SELECT term, docs, weights FROM search_terms")
    }
    assert {t: n for t, (n, _) in terms.items() if n} == dict(docs)
    for token in tokens:
        term, _, weight = token.rpartition("_")
        assert terms[term][1] >> int(weight) & 1, token


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "registry.db") as opened:
        yield opened


@pytest.fixture
def corpus(store: SQLiteStore) -> SQLiteStore:
    store.register_many(make_cards(400))
    fold_all(store)
    return store


QUERIES = [
    "model",
    "bert",
    "sentiment",
    "question answering",
    '"question answering"',
    '"text classification"',
    "text-classification",
    "llama chat",
    '"fine tuned" model',
    "model NOT bert",
    '"question answering" license:apache-2.0',
    "sentiment task:text-classification",
    "model (family:bert OR tag:chat) params:<3B",
    "reviews NOT tag:sentiment",
    "summarization NOT news",
    # free text under OR: versions without it score 0, after the others
    "bert OR tag:chat",
    '"question answering" OR legal OR family:llama',
    "(sentiment OR reviews) license:mit",
    "tag:fast OR NOT model",
]


# ---------------------------------------------------------------- tokens

TOKEN_TEXTS = [
    "A pre-trained BERT model, v2.1 (cased)!",
    "snake_case_name and CamelCase42 x86-64",
    "Ünïcödé café — naïve Straße İstanbul ÉCOLE",
    "日本語テキスト分類 and 中文 mixed",
    "emoji 🤗 transformers ✓ ℃ ² ½ ǅ ﬁ",
    "combining e\u0301 a\u0308 and tabs\tnew\nlines",
    "",
    "   ",
    "x" * 40000 + " tail",
]


@pytest.mark.parametrize("text", TOKEN_TEXTS)
def test_tokens_are_those_of_fts5(text: str) -> None:
    db = sqlite3.connect(":memory:")
    db.execute(f"CREATE VIRTUAL TABLE t USING fts5 (x, tokenize='{ranking.TOKENIZE}')")
    db.execute("CREATE VIRTUAL TABLE v USING fts5vocab (t, 'instance')")
    db.execute("INSERT INTO t (x) VALUES (?)", (text,))
    expected = [term for term, _ in db.execute("SELECT term, offset FROM v ORDER BY offset")]
    assert ranking.Tokenizer().tokens(text) == expected


def test_phrases_are_counted_as_fts5_counts_them() -> None:
    tok = ranking.Tokenizer()

    def weights(columns: list[str], *phrases: tuple[str, ...]) -> list[int]:
        found = ranking.phrase_weights(tok, columns, [ranking._Phrase(p) for p in phrases])
        return found[1]

    columns = ["a b a-b", "A a a", "b", "x a b"]
    assert weights(columns, ("a", "b"), ("a", "a"), ("a",), ("b", "a"), ()) == [
        2 * 10 + 4,
        2,  # overlapping: at 0 and at 1
        2 * 10 + 3 + 4,
        10,
        0,
    ]
    # Knowing the length, ASCII text is searched with a regular expression.
    assert ranking.phrase_weights(tok, columns, [ranking._Phrase(("a", "b"))], 11) == (11, [24])
    # Text with non-ASCII characters goes through FTS5's tokens instead.
    assert weights(["a b — a b", "é a a a", "b", "x a b"], ("a", "b"), ("a", "a")) == [24, 2]
    assert weights(["café au lait", "", "", ""], ("cafe", "au")) == [10]


def test_the_ascii_shortcut_counts_as_the_tokens_do() -> None:
    """Phrases in ASCII text are found with a regular expression; the same
    text with a non-ASCII separator appended goes through the tokens."""
    tok = ranking.Tokenizer()
    rng = random.Random(11)
    alphabet = ["a", "b", "ab", "a1", "B", "b-a", "a_b", " ", "  ", ",", ".-"]
    for _ in range(300):
        columns = ["".join(rng.choices(alphabet, k=rng.randint(0, 12))) for _ in range(4)]
        phrases = [
            ranking._Phrase(tuple(rng.choices(["a", "b", "ab", "a1", "1"], k=rng.randint(1, 3))))
            for _ in range(3)
        ]
        slow = ranking.phrase_weights(tok, [c + " \u2014" for c in columns], phrases)
        assert ranking.phrase_weights(tok, columns, phrases) == slow, columns
        assert ranking.phrase_weights(tok, columns, phrases, slow[0]) == slow, columns


# ------------------------------------------------------------- the score


@pytest.mark.parametrize("word", ["model", "bert", "sentiment", "legal", "m3", "0042"])
def test_a_word_ranks_as_fts5_bm25_to_the_last_bit(corpus: SQLiteStore, word: str) -> None:
    expected = fts5_bm25(corpus, word)
    assert expected
    assert search_ids(corpus, word) == expected


@pytest.mark.parametrize(
    "query",
    [
        "model tag:fast",
        "bert license:mit NOT reviews",
        "model sentiment",
        "bert OR tag:chat",
        "(sentiment OR reviews) license:mit",
        "tag:fast OR (model NOT bert)",
    ],
)
def test_words_with_filters_rank_as_fts5_bm25(corpus: SQLiteStore, query: str) -> None:
    assert search_ids(corpus, query) == fts5_ranked(corpus, query)


def test_the_same_bits_with_versions_pending(store: SQLiteStore) -> None:
    store.register_many(make_cards(120))
    assert pending(store) == 120  # under FOLD_AT: nothing indexed yet
    for word in ("model", "bert", "reviews"):
        assert search_ids(store, word) == fts5_bm25(store, word)


def test_a_phrase_weighs_the_sum_of_its_words_idfs(corpus: SQLiteStore) -> None:
    """One documented difference from bm25(): a phrase's IDF is its words'
    IDFs summed, not the IDF of the phrase's own count. One phrase alone
    keeps bm25()'s order, the scores scale by one factor."""
    ours = search_ids(corpus, '"question answering"')
    theirs = fts5_bm25(corpus, "question answering")
    assert [i for i, _ in ours] == [i for i, _ in theirs]
    ratios = {round(a / b, 9) for (_, a), (_, b) in zip(ours, theirs, strict=True)}
    assert len(ratios) == 1
    conn = corpus._conn()
    rows, _ = ranking.corpus(conn)

    def docs(word: str) -> int:
        return conn.execute(
            "SELECT count(*) FROM versions_fts WHERE versions_fts MATCH ?", (word,)
        ).fetchone()[0]

    phrase = conn.execute(
        "SELECT count(*) FROM versions_fts WHERE versions_fts MATCH ?", ('"question answering"',)
    ).fetchone()[0]
    words_idf = ranking.idf(rows, docs("question")) + ranking.idf(rows, docs("answering"))
    assert ratios.pop() == round(words_idf / ranking.idf(rows, phrase), 9)


def test_name_weighs_more_than_tags_and_tasks_more_than_description(store: SQLiteStore) -> None:
    store.register(ModelCard(name="a/plain", provider="x", description="alpha " * 3))
    store.register(ModelCard(name="a/alpha", provider="x", description="other words here"))
    store.register(ModelCard(name="a/tagged", provider="x", tags=("alpha",), description="x y"))
    fold_all(store)
    assert [n for n, _, _ in ranked(store, "alpha")] == ["a/alpha", "a/tagged", "a/plain"]


# ------------------------------------------------- indexed or not, same pages


@pytest.mark.parametrize("query", QUERIES)
def test_indexed_and_pending_versions_rank_alike(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    cards = make_cards(300, seed=3)
    with SQLiteStore(tmp_path / "pending.db") as late, SQLiteStore(tmp_path / "index.db") as done:
        monkeypatch.setattr(ranking, "FOLD_AT", 1000)
        late.register_many(cards)  # fewer than FOLD_AT: nothing indexed
        monkeypatch.undo()
        done.register_many(cards)
        fold_all(done)
        assert pending(late) == 300
        assert ranked(late, query) == ranked(done, query)
        assert ranked(late, query, descending=False) == ranked(done, query, descending=False)
        assert ranked(late, query, all_versions=True) == ranked(done, query, all_versions=True)


@pytest.mark.parametrize("query", [q for q in QUERIES if q.count(" ") and "tag:" not in q])
def test_several_phrases_rank_alike_streamed_or_one_by_one(
    corpus: SQLiteStore, monkeypatch: pytest.MonkeyPatch, query: str
) -> None:
    """A query of several phrases with few matches scores them all from
    their text (or SQLite's bm25, words only); with many, it merges the
    phrases' streams: the same pages either way."""
    scored = ranked(corpus, query)
    monkeypatch.setattr(ranking, "_FEW", 0)
    assert ranked(corpus, query) == scored
    assert ranked(corpus, query, descending=False) == scored[::-1]


def test_half_indexed_ranks_as_all_indexed(tmp_path: Path) -> None:
    cards = make_cards(300, seed=4)
    with SQLiteStore(tmp_path / "half.db") as half, SQLiteStore(tmp_path / "all.db") as full:
        half.register_many(cards[:150])
        fold_all(half)
        half.register_many(cards[150:])
        full.register_many(cards)
        fold_all(full)
        assert pending(half) == 150
        for query in QUERIES:
            assert ranked(half, query) == ranked(full, query), query


# -------------------------------------------------------------- paging


@pytest.mark.parametrize(
    "query", ["model", '"question answering"', "llama chat", "bert NOT reviews"]
)
@pytest.mark.parametrize("descending", [True, False])
def test_every_page_of_a_ranked_search(corpus: SQLiteStore, query: str, descending: bool) -> None:
    full = ranked(corpus, query, descending=descending)
    assert len(full) > 40
    by_cursor = by_cursors(corpus, query, 7, descending=descending)
    by_offset: list[tuple[str, int, float]] = []
    offset: int | None = 0
    while offset is not None:
        page = corpus.search(query, limit=7, offset=offset, descending=descending)
        by_offset += [(h.card.name, h.card.version or 0, h.score or 0.0) for h in page.items]
        offset = page.next_offset
    assert by_cursor == by_offset == full


@pytest.mark.parametrize("descending", [True, False])
def test_text_under_or_pages_through_the_zero_scores(corpus: SQLiteStore, descending: bool) -> None:
    query = "legal OR tag:large"
    full = ranked(corpus, query, descending=descending)
    zeros = [entry for entry in full if entry[2] == 0.0]
    assert 10 < len(zeros) < len(full) - 10
    # Descending, every match with the word comes first; ascending, last.
    assert (full[-len(zeros) :] if descending else full[: len(zeros)]) == zeros
    assert by_cursors(corpus, query, 6, descending=descending) == full


def test_ties_break_by_newest_first(store: SQLiteStore) -> None:
    store.register_many(
        ModelCard(name=f"t/m{i:02d}", provider="x", description="same words") for i in range(30)
    )
    fold_all(store)
    names = [n for n, _, _ in ranked(store, "words")]
    assert names == [f"t/m{i:02d}" for i in range(29, -1, -1)]
    assert [n for n, _, _ in ranked(store, "words", descending=False)] == names[::-1]


def test_the_best_come_first_without_reading_every_match(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store.register_many(make_cards(2000, seed=5))
    fold_all(store)
    checked: list[int] = []
    top = ranking.Ranker.top

    def counting(self: ranking.Ranker, *args: Any, **kwargs: Any) -> Any:
        try:
            return top(self, *args, **kwargs)
        finally:
            checked.append(self.checked)

    monkeypatch.setattr(ranking.Ranker, "top", counting)
    page = store.search("model", limit=10)
    assert page.total > 800  # of 2,000
    assert checked[-1] < 100
    page = store.search('"question answering"', limit=10)
    assert checked[-1] < 200
    # A cursor's page costs what the first page costs.
    deep = store.search("model", limit=10, offset=0)
    for _ in range(20):
        deep = store.search("model", limit=10, cursor=deep.next_cursor)
    assert checked[-1] < 100


# ------------------------------------------------- edits keep it consistent


def test_edits_deletes_and_new_versions_keep_the_index_exact(corpus: SQLiteStore) -> None:
    rng = random.Random(7)
    names = sorted({c.name for c in make_cards(400)})
    for name in rng.sample(names, 40):
        action = rng.choice(("tag", "untag", "describe", "delete", "deprecate", "again"))
        if action == "tag":
            corpus.tag(name, "legal", "brand-new-tag")
        elif action == "untag":
            corpus.untag(name, *corpus.get(name).tags)
        elif action == "describe":
            corpus.set_description(name, "rewritten: sentiment sentiment reviews")
        elif action == "delete":
            corpus.delete(name)
        elif action == "deprecate":
            corpus.deprecate(name)
        else:
            card = corpus.get(name)
            corpus.register(
                ModelCard(name=name, provider="x", description=card.description + " v2")
            )
    check_index(corpus)
    for word in ("model", "sentiment", "legal", "brand", "v2"):
        assert search_ids(corpus, word) == fts5_bm25(corpus, word)
    # Versions edited while pending are indexed as they are when folded.
    late = make_cards(5, seed=8, prefix="late")
    corpus.register_many(late)
    corpus.set_description(late[0].name, "edited before indexing")
    corpus.delete(late[1].name)
    fold_all(corpus)
    check_index(corpus)


def test_writers_fold_when_enough_is_pending(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranking, "FOLD_AT", 10)
    for card in make_cards(25, seed=9):
        store.register(card)
    assert pending(store) < 10
    assert ranking.indexed_through(store._conn()) >= 20
    check_index(store)


def test_a_registration_stands_when_indexing_after_it_fails(
    store: SQLiteStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranking, "FOLD_AT", 3)

    def broken(*args: Any, **kwargs: Any) -> int:
        raise sqlite3.OperationalError("disk I/O error")

    monkeypatch.setattr(ranking, "fold", broken)
    stored = [store.register(card) for card in make_cards(5, seed=12)]
    assert [c.version for c in stored] == [1] * 5
    assert pending(store) == 5  # left to the next writer; searches still find them
    assert {n for n, _, _ in ranked(store, "model OR bert")} <= {c.name for c in stored}
    monkeypatch.undo()
    monkeypatch.setattr(ranking, "FOLD_AT", 3)
    store.register(make_cards(1, seed=13)[0])
    assert pending(store) == 0
    check_index(store)


def test_threads_registering_at_once_keep_the_index_exact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(ranking, "FOLD_AT", 7)
    path = tmp_path / "registry.db"
    SQLiteStore(path).close()
    errors: list[BaseException] = []

    def work(worker: int) -> None:
        try:
            with SQLiteStore(path) as mine:
                for card in make_cards(40, seed=worker, prefix=f"w{worker}-"):
                    mine.register(card)
                    mine.search("model sentiment", limit=3)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(w,)) for w in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    with SQLiteStore(path) as opened:
        fold_all(opened)
        check_index(opened)
        assert search_ids(opened, "model") == fts5_bm25(opened, "model")


# ------------------------------------------------------------- migration


def test_a_schema_2_registry_upgrades_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``registry-schema-2.db`` was written by the registry before the impact
    index (schema 2): versions, aliases, edits, a deprecation, deletions and
    non-ASCII text. Opened now, it gains the index, built in chunks."""
    path = tmp_path / "registry.db"
    shutil.copyfile(DATA / "registry-schema-2.db", path)
    old = sqlite3.connect(path)
    assert old.execute("PRAGMA user_version").fetchone() == (2,)
    before = {
        query: old.execute(
            "SELECT v.name, v.version FROM versions_fts f CROSS JOIN versions v"
            " ON v.id = f.rowid WHERE versions_fts MATCH ? AND v.is_latest = 1"
            " ORDER BY f.rank, v.id DESC",
            (query,),
        ).fetchall()
        for query in ('"model"', '"sentiment"', '"strasse"', '"日本語テキスト分類"', '"reviews"')
    }
    old.close()
    monkeypatch.setattr(ranking, "FOLD_AT", 4)
    monkeypatch.setattr(ranking, "CATCH_UP_CHUNK", 9)
    with SQLiteStore(path) as upgraded:
        assert upgraded.schema_version == len(store_module.MIGRATIONS) == 3
        assert pending(upgraded) < 4
        check_index(upgraded)
        for query, expected in before.items():
            assert [(n, v) for n, v, _ in ranked(upgraded, query)] == expected, query
        assert upgraded.get("vendor0/bert-00@prod").version == 1
        assert [h.card.name for h in upgraded.search("toxicity").items] == ["vendor3/roberta-03"]
        assert upgraded.search("llama-05", all_versions=True).total == 0  # deleted
        upgraded.register(ModelCard(name="new/sentiment", provider="x", description="sentiment"))
        assert ranked(upgraded, "sentiment")[0][0] == "new/sentiment"


def test_an_interrupted_catch_up_resumes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "registry.db"
    shutil.copyfile(DATA / "registry-schema-2.db", path)
    monkeypatch.setattr(ranking, "FOLD_AT", 4)
    monkeypatch.setattr(ranking, "CATCH_UP_CHUNK", 9)
    calls = 0
    fold = ranking.fold

    def dies(*args: Any, **kwargs: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 3:
            raise KeyboardInterrupt
        return fold(*args, **kwargs)

    monkeypatch.setattr(ranking, "fold", dies)
    with pytest.raises(KeyboardInterrupt):
        SQLiteStore(path)
    monkeypatch.setattr(ranking, "fold", fold)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (3,)
    assert db.execute("SELECT indexed FROM search_state").fetchone()[0] > 0
    db.close()
    with SQLiteStore(path) as resumed:
        assert pending(resumed) < 4
        check_index(resumed)
