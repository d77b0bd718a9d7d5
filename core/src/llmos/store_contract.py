"""The registry store contract, as tests every :class:`RegistryStore` must pass.

A store on another database (a plugin's, registered with
``llmos_register_registry_stores``) keeps the contract of the kernel's
SQLite store when this suite passes against it: the same versions (gapless,
under concurrent writers too), refs, aliases, tags, statuses, bounds and
errors, the same query language, sorts, cursors and count limit, and the same
bm25 scores. Subclass :class:`RegistryStoreContract` in a test module (the
subclass's name starts with ``Test``) and give it an ``open_store`` fixture::

    class TestMyStore(RegistryStoreContract):
        @pytest.fixture
        def open_store(self, tmp_path):
            opened = []

            def open_store(key="main", **options):
                store = MyStore(..., **options)  # key: which registry
                opened.append(store)
                return store

            yield open_store
            for store in opened:
                store.close()

``open_store(key, **options)`` returns a new handle (its own connections) on
an empty registry the first time a key is used in a test and on that same
registry after; ``options`` is ``count_limit``, which every store takes.
The kernel's tests run it against :class:`~llmos.registry.store.SQLiteStore`
(``core/tests/test_registry_store.py``), llmos-postgres's against PostgreSQL.

Import this module from tests only: it needs pytest.
"""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import attrs
import pytest

from llmos.errors import LlmosError, NotFoundError, UsageError
from llmos.registry import ranking
from llmos.registry import store as store_module
from llmos.registry.query import parse_query, plan_search
from llmos.registry.store import RegistryStore, VersionStatus
from llmos.types import ModelCard, ModelFormat

__all__ = [
    "CORPUS",
    "RegistryStoreContract",
    "StoreOpener",
    "card",
    "full_card",
    "reference_scores",
]

M = 10**6
B = 10**9
MAX = store_module.MAX_INT

#: ``open_store(key="main", **options)``: a new handle on the registry ``key``
StoreOpener = Callable[..., RegistryStore]


def card(name: str, **fields: Any) -> ModelCard:
    """A card with the fields given (provider ``transformers`` by default)."""
    fields.setdefault("provider", "transformers")
    return ModelCard(name=name, **fields)


def full_card() -> ModelCard:
    """A card with every field set, unicode and nested options included."""
    return ModelCard(
        name="acme/bert-base",
        version=3,
        provider="transformers",
        source="hf://acme/bert-base",
        tasks=("text-classification", "embedding"),
        family="bert",
        parameters=110_000_000,
        format=ModelFormat.SAFETENSORS,
        license="apache-2.0",
        description="A pre-trained BERT model for text classification.\n\n"
        "It knows English — and ünïcödé.\n---\nNot front matter.",
        tags=("nlp", "english"),
        scores={"test/accuracy": 0.91, "dev/f1": 0.875},
        parents=("acme/bert-raw@1",),
        options={"dtype": "float32", "nested": {"a": [1, 2, None]}, "flag": True},
        created_at=datetime(2024, 5, 6, 7, 8, 9, 123456, tzinfo=UTC),
        created_by="alice",
    )


def names(page: Any) -> list[str]:
    return [hit.card.name for hit in page.items]


def name_set(store: RegistryStore, query: str) -> set[str]:
    page = store.search(query, limit=1000)
    assert page.total == len(page.items)
    return set(names(page))


def _occurrences(words: list[str], phrase: tuple[str, ...]) -> int:
    n = len(phrase)
    return sum(tuple(words[i : i + n]) == phrase for i in range(len(words) - n + 1))


def reference_scores(cards: list[ModelCard], query: str) -> dict[tuple[str, int], float]:
    """The bm25 score of each of ``cards`` (every version not deleted) for
    ``query``, computed from the cards alone as the registry defines it
    (:mod:`llmos.registry.ranking`): per scoring phrase, the sum of its
    words' IDFs times bm25 of its weighted count (name 10, description 1,
    tags 4, tasks 4), summed. Keyed by ``(name, version)``."""
    tokenizer = ranking.Tokenizer()
    try:
        phrases = [tokenizer.phrase(t) for t in plan_search(parse_query(query)).phrases]
        columns = {
            (c.name, c.version or 0): [
                tokenizer.tokens(text)
                for text in (c.name, c.description, " ".join(c.tags), " ".join(c.tasks))
            ]
            for c in cards
        }
    finally:
        tokenizer.close()
    rows = len(columns)
    avgdl = sum(len(w) for cols in columns.values() for w in cols) / rows
    docs = {
        word: sum(any(word in words for words in cols) for cols in columns.values())
        for phrase in phrases
        for word in phrase
    }
    scores = {}
    for key, cols in columns.items():
        size = sum(len(words) for words in cols)
        score = 0.0
        for phrase in phrases:
            weight = sum(ranking.idf(rows, docs[word]) for word in phrase)
            f = sum(
                w * _occurrences(words, phrase)
                for w, words in zip(ranking.WEIGHTS, cols, strict=True)
            )
            score += weight * ranking.bm25(f, size, avgdl)
        scores[key] = score
    return scores


CORPUS = [
    card(
        "acme/bert-base",
        family="bert",
        tasks=["text-classification"],
        tags=["nlp", "english"],
        license="apache-2.0",
        parameters=110 * M,
        format="safetensors",
        description="A pre-trained BERT model for text classification",
    ),
    card(
        "acme/roberta-sentiment",
        family="roberta",
        tasks=["text-classification"],
        tags=["nlp", "sentiment"],
        license="Apache-2.0",
        parameters=125 * M,
        format="safetensors",
        description="RoBERTa fine-tuned for sentiment analysis of reviews",
    ),
    card(
        "acme/distilbert-sst2",
        family="bert",
        tasks=["text-classification"],
        tags=["nlp", "sentiment", "deprecated"],
        license="apache-2.0",
        parameters=66 * M,
        format="safetensors",
        description="Distilled BERT for sentiment",
    ),
    card(
        "meta/llama-7b",
        provider="vllm",
        family="llama",
        tasks=["chat", "text-generation"],
        tags=["llm"],
        license="llama2",
        parameters=7 * B,
        format="gguf",
        description="A large language model for chat",
    ),
    card(
        "tiny/gpt2-small",
        family="gpt2",
        tasks=["text-generation"],
        tags=["llm", "tiny"],
        license="mit",
        parameters=124 * M,
        description="Small generative model",
    ),
    card(
        "openai/remote-chat",
        provider="openai-compatible",
        tasks=["chat"],
        format="remote-api",
        description="A remote chat endpoint",
    ),
    card(
        "mini/minilm-encoder",
        family="BERT",
        tasks=["embedding"],
        tags=["sentence"],
        license="apache-2.0",
        parameters=22 * M,
        description="Sentence encoder for semantic search",
    ),
]
ALL = {c.name for c in CORPUS}
BERT, ROBERTA, DISTIL = "acme/bert-base", "acme/roberta-sentiment", "acme/distilbert-sst2"
LLAMA, GPT2, REMOTE, MINILM = (
    "meta/llama-7b",
    "tiny/gpt2-small",
    "openai/remote-chat",
    "mini/minilm-encoder",
)


class RegistryStoreContract:
    """The contract's tests; a subclass provides the ``open_store`` fixture
    (see the module's documentation)."""

    @pytest.fixture
    def open_store(self) -> StoreOpener:
        raise NotImplementedError("a RegistryStoreContract subclass gives an open_store fixture")

    @pytest.fixture
    def store(self, open_store: StoreOpener) -> RegistryStore:
        return open_store()

    @pytest.fixture
    def corpus(self, store: RegistryStore) -> RegistryStore:
        store.register_many(CORPUS)
        return store

    def test_implements_the_interface(self, store: RegistryStore) -> None:
        assert isinstance(store, RegistryStore)

    def test_register_assigns_consecutive_versions(self, store: RegistryStore) -> None:
        got = [store.register(card("acme/bert"), created_by="ci").version for _ in range(3)]
        assert got == [1, 2, 3]
        assert store.register(card("other")).version == 1
        stored = store.get("acme/bert@2")
        assert stored.version == 2 and stored.created_by == "ci"
        assert stored.created_at.tzinfo is not None

    def test_register_returns_the_stored_card(self, store: RegistryStore) -> None:
        given = card("m", created_by="alice", created_at=datetime(2020, 1, 1, tzinfo=UTC))
        stored = store.register(given)
        assert stored.version == 1
        assert stored.created_by == "alice"  # kept when register names nobody
        assert stored.created_at > given.created_at  # the time of registration
        assert store.get("m") == stored

    def test_a_full_card_survives_the_store(self, store: RegistryStore) -> None:
        full = full_card()
        stored = store.register(full, created_by="bob")
        assert stored.version == 1 and stored.created_by == "bob"
        restored = attrs.evolve(
            stored, version=full.version, created_at=full.created_at, created_by=full.created_by
        )
        assert restored == full
        assert store.get(full.name) == stored

    def test_register_if_changed_skips_an_identical_card(self, store: RegistryStore) -> None:
        first = store.register(card("m", description="one"))
        again = store.register(card("m", description="one"), created_by="scan", if_changed=True)
        assert again == first
        changed = store.register(card("m", description="two"), if_changed=True)
        assert changed.version == 2
        assert [v.card.version for v in store.versions("m")] == [1, 2]

    def test_register_many_numbers_within_the_batch(self, store: RegistryStore) -> None:
        store.register(card("a"))
        stored = store.register_many([card("a"), card("b"), card("a")], created_by="bulk")
        assert [(c.name, c.version) for c in stored] == [("a", 2), ("b", 1), ("a", 3)]
        assert store.get("a").version == 3
        assert store.get("a@2").created_by == "bulk"
        assert store.search("").total == 2

    def test_register_many_is_one_transaction(self, store: RegistryStore) -> None:
        bad = card("c", options={"not json": object()})
        with pytest.raises(UsageError, match="not JSON-serialisable"):
            store.register_many([card("a"), card("b"), bad])
        assert store.search("").total == 0
        with pytest.raises(NotFoundError):
            store.get("a")

    def test_register_refuses_what_is_not_a_card(self, store: RegistryStore) -> None:
        with pytest.raises(UsageError, match="expected a ModelCard"):
            store.register({"name": "m", "provider": "x"})  # type: ignore[arg-type]

    @pytest.mark.parametrize(
        ("fields", "words"),
        [
            ({"parameters": "many"}, "parameters must be a whole number"),
            ({"parameters": -1}, "parameters must be a whole number"),
            ({"parameters": 1.5}, "parameters must be a whole number"),
            ({"provider": ""}, "provider must be a non-empty string"),
            ({"family": 3}, "family must be a string"),
            ({"tags": ["ok", 3]}, "tags must be strings"),
        ],
    )
    def test_register_refuses_mistyped_fields(
        self, store: RegistryStore, fields: dict[str, Any], words: str
    ) -> None:
        with pytest.raises(UsageError, match=words):
            store.register(card("m", **fields))
        assert store.search("").total == 0

    # ------------------------------------------- what a store can hold, bounded
    # Each of these reached SQLite as it came and left the daemon as a 500
    # (issue 14): an int past 64 bits (OverflowError), a lone surrogate (no UTF-8
    # form); the rest were stored and printed as they came (an ESC in a tag drives
    # the terminal of whoever lists it). Every store refuses them the same way.

    def test_parameter_counts_fit_64_bits(self, store: RegistryStore) -> None:
        for too_big in (MAX + 1, 10**30):
            with pytest.raises(
                UsageError, match=f"parameters must be a whole number from 0 to {MAX}"
            ):
                store.register(card("m", parameters=too_big))
        assert store.search("").total == 0
        store.register(card("m", parameters=MAX))
        assert store.get("m").parameters == MAX
        assert names(store.search(f"params:>={MAX}")) == ["m"]
        assert names(store.search("", sort="parameters")) == ["m"]

    @pytest.mark.parametrize(
        ("fields", "words"),
        [
            ({"tags": ["a\x00b"]}, r"tags\[0\] holds a NUL byte at position 2"),
            ({"tags": ["ok", "\x1b[2J"]}, r"tags\[1\] holds the control character"),
            ({"tags": ["two\nlines"]}, "control character"),
            ({"tasks": ["chat\x00"]}, r"tasks\[0\] holds a NUL byte"),
            ({"parents": ["m@1\x07"]}, r"parents\[0\] holds the control character"),
            ({"family": "bert\x00"}, "family holds a NUL byte"),
            ({"license": "mit\x1b"}, "license holds the control character"),
            ({"provider": "trans\x00formers"}, "provider holds a NUL byte"),
            ({"description": "a\x00b"}, "description holds a NUL byte"),
            ({"description": "caf\ud800"}, "description holds a lone surrogate"),
            ({"tags": ["x\udfff"]}, r"tags\[0\] holds a lone surrogate"),
            ({"options": {"key": "x\ud800"}}, "holds a lone surrogate"),
            ({"options": {"x\ud800": 1}}, "holds a lone surrogate"),
            ({"scores": {"acc": float("inf")}}, "not JSON-serialisable"),
            ({"tags": ["t"] * 1001}, "1001 tags, more than the 1000 allowed"),
            ({"tasks": [f"t{i}" for i in range(1001)]}, "1001 tasks"),
            ({"parents": [f"p{i}" for i in range(1001)]}, "1001 parents"),
            ({"tags": ["x" * 257]}, r"tags\[0\] is 257 characters long; the limit is 256"),
            ({"family": "f" * 257}, "family is 257 characters long"),
            (
                {"description": "d" * 65_537},
                "description is 65537 characters long; the limit is 65536",
            ),
        ],
    )
    def test_card_text_is_bounded_and_printable(
        self, store: RegistryStore, fields: dict[str, Any], words: str
    ) -> None:
        with pytest.raises(UsageError, match=words):
            store.register(card("m", **fields))
        assert store.search("", all_versions=True).total == 0
        with pytest.raises(NotFoundError, match="no model named 'm'"):
            store.versions("m")

    def test_what_is_at_the_bounds_is_stored(self, store: RegistryStore) -> None:
        stored = store.register(
            card(
                "m",
                description="line one\n\tline two\r\n" + "d" * 65_000,
                tags=[f"t{i}" for i in range(1000)],
                family="f" * 256,
                license="Apache-2.0 \u00e9\u4e2d\U0001f600",  # any printable Unicode
            )
        )
        assert store.get("m") == stored
        assert names(store.search("tag:t999")) == ["m"]

    def test_edits_are_held_to_the_same_bounds(self, store: RegistryStore) -> None:
        store.register(card("m", tags=[f"t{i}" for i in range(999)]))
        with pytest.raises(UsageError, match="holds the control character"):
            store.tag("m", "\x1b[31mred")
        with pytest.raises(UsageError, match="lone surrogate"):
            store.tag("m", "x\ud800")
        with pytest.raises(UsageError, match="would carry 1001 tags"):
            store.tag("m", "a", "b")
        with pytest.raises(UsageError, match="2000 tags, more than the 1000"):
            store.untag("m", *[f"x{i}" for i in range(2000)])
        with pytest.raises(UsageError, match="description holds a NUL byte"):
            store.set_description("m", "a\x00")
        with pytest.raises(UsageError, match="description holds a lone surrogate"):
            store.set_description("m", "\udc80")
        with pytest.raises(UsageError, match="65537 characters"):
            store.set_description("m", "d" * 65_537)
        assert len(store.get("m").tags) == 999 and store.get("m").description == ""
        store.tag("m", "last")
        store.set_description("m", "two\nlines")
        assert len(store.get("m").tags) == 1000 and store.get("m").description == "two\nlines"

    @pytest.mark.parametrize(
        "selector", [str(MAX + 1), str(2**64), "9" * 5000, "0" * 30 + "1" * 20]
    )
    def test_versions_past_64_bits_are_usage_errors(
        self, store: RegistryStore, selector: str
    ) -> None:
        store.register(card("m"))
        for action in (store.get, store.deprecate, store.delete, lambda ref: store.tag(ref, "x")):
            with pytest.raises(UsageError, match=f"no version is above {MAX}"):
                action(f"m@{selector}")
        with pytest.raises(UsageError, match="positive integer up to"):
            store.set_alias("m", "prod", MAX + 1)
        # The largest version is a version like any other: missing, not an error.
        with pytest.raises(NotFoundError, match=f"has no version {MAX}"):
            store.get(f"m@{MAX}")
        assert store.get("m@" + "0" * 30 + "1").version == 1  # leading zeros are still 1

    def test_offsets_past_the_bound_are_usage_errors(self, store: RegistryStore) -> None:
        store.register(card("m", description="words"))
        bound = store_module.MAX_OFFSET
        for query in ("", "words", "tag:x OR words"):
            for offset in (bound + 1, 2**63 - 1, 2**63, 2**64):
                with pytest.raises(UsageError, match=f"offset must be between 0 and {bound}"):
                    store.search(query, offset=offset)
            for sort in ("relevance", "name", "parameters"):
                page = store.search(query, sort=sort, offset=bound, limit=store_module.MAX_LIMIT)
                assert page.items == [] and page.next_offset is None

    def test_cursors_with_numbers_past_64_bits_are_refused(self, store: RegistryStore) -> None:
        store.register(card("a"))
        store.register(card("b"))
        cursor = store.search("", sort="name", limit=1).next_cursor
        assert cursor is not None
        mark = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))[0]
        for key, row_id in (("a", 2**63), ("a", -(2**63) - 1), (2**70, 1), (float("nan"), 1)):
            forged = base64.urlsafe_b64encode(json.dumps([mark, key, row_id]).encode()).decode()
            with pytest.raises(UsageError, match="invalid search cursor"):
                store.search("", sort="name", limit=1, cursor=forged)
        # A ranked page's key is its score: text there failed float() (a 500).
        store.set_description("a", "words")
        store.set_description("b", "words")
        cursor = store.search("words", limit=1).next_cursor
        assert cursor is not None
        mark, _, row_id = json.loads(base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)))
        for key in ("abc", ""):
            forged = base64.urlsafe_b64encode(json.dumps([mark, key, row_id]).encode()).decode()
            with pytest.raises(UsageError, match="invalid search cursor"):
                store.search("words", limit=1, cursor=forged)

    def test_cursors_whose_key_does_not_fit_the_order_are_refused(
        self, store: RegistryStore
    ) -> None:
        # Names page on text, every other order on numbers: a forged key of
        # the other type is refused, not compared (PostgreSQL cannot).
        store.register(card("a", parameters=1, description="words"))
        store.register(card("b", parameters=2, description="words"))
        for query, sort, forged_key in (
            ("", "name", 1),
            ("", "created", "a"),
            ("", "parameters", "a"),
            ("words", "relevance", "a"),
            ("", "relevance", 1.5),  # no free text: by name
        ):
            cursor = store.search(query, sort=sort, limit=1).next_cursor
            assert cursor is not None
            mark, _, row_id = json.loads(
                base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
            )
            raw = json.dumps([mark, forged_key, row_id]).encode()
            forged = base64.urlsafe_b64encode(raw).decode()
            with pytest.raises(UsageError, match="invalid search cursor"):
                store.search(query, sort=sort, limit=1, cursor=forged)
            # the real cursor still leads on
            assert len(store.search(query, sort=sort, limit=1, cursor=cursor).items) == 1

    # -------------------------------------------------------------- resolution

    def test_get_by_name_version_alias_and_latest(self, store: RegistryStore) -> None:
        for text in ("one", "two", "three"):
            store.register(card("acme/m", description=text))
        store.set_alias("acme/m", "prod", 2)
        assert store.get("acme/m").description == "three"
        assert store.get("acme/m@latest").version == 3
        assert store.get("acme/m@1").description == "one"
        assert store.get("acme/m@prod").version == 2

    @pytest.mark.parametrize("ref", ["M", "m@", "m@0", "m@Prod", "m@a b", "/m", "m@x@y"])
    def test_malformed_refs_are_usage_errors(self, store: RegistryStore, ref: str) -> None:
        with pytest.raises(UsageError):
            store.get(ref)

    def test_missing_things_say_what_is_missing(self, store: RegistryStore) -> None:
        store.register(card("m"))
        store.register(card("m"))
        with pytest.raises(NotFoundError, match="no model named 'nope'"):
            store.get("nope")
        with pytest.raises(NotFoundError, match=r"has no version 7 \(versions 1-2\)"):
            store.get("m@7")
        with pytest.raises(NotFoundError, match=r"no alias 'prod' \(aliases: latest\)"):
            store.get("m@prod")
        with pytest.raises(NotFoundError, match="no model named"):
            store.versions("nope")

    # ------------------------------------------------------------------ aliases

    def test_aliases_set_move_and_remove(self, store: RegistryStore) -> None:
        for _ in range(3):
            store.register(card("m"))
        store.set_alias("m", "prod", 1)
        store.set_alias("m", "staging", 1)
        store.set_alias("m", "prod", 2)  # moves
        by_version = {v.card.version: v.aliases for v in store.versions("m")}
        assert by_version == {1: ("staging",), 2: ("prod",), 3: ("latest",)}
        store.remove_alias("m", "staging")
        assert store.versions("m")[0].aliases == ()
        with pytest.raises(NotFoundError, match="no alias 'staging'"):
            store.get("m@staging")
        with pytest.raises(NotFoundError):
            store.remove_alias("m", "staging")

    def test_latest_is_managed_by_the_registry(self, store: RegistryStore) -> None:
        store.register(card("m"))
        store.register(card("m"))
        with pytest.raises(UsageError, match="'latest' is kept by the registry"):
            store.set_alias("m", "latest", 1)
        with pytest.raises(UsageError, match="'latest' is kept by the registry"):
            store.remove_alias("m", "latest")
        assert store.get("m@latest").version == 2

    @pytest.mark.parametrize("alias", ["Prod", "12", "a b", "", "x" * 65, "p@q", "ok/no"])
    def test_alias_names_are_validated(self, store: RegistryStore, alias: str) -> None:
        store.register(card("m"))
        with pytest.raises(UsageError, match="alias"):
            store.set_alias("m", alias, 1)

    def test_alias_needs_an_existing_version(self, store: RegistryStore) -> None:
        store.register(card("m"))
        with pytest.raises(NotFoundError, match="no version 5"):
            store.set_alias("m", "prod", 5)
        with pytest.raises(NotFoundError, match="no model named"):
            store.set_alias("other", "prod", 1)
        with pytest.raises(UsageError, match="positive integer"):
            store.set_alias("m", "prod", 0)

    # ----------------------------------------------- tags, descriptions, status

    def test_tag_untag_and_describe(self, store: RegistryStore) -> None:
        store.register(card("m", tags=["nlp"], description="an old description"))
        store.register(card("m", tags=["nlp"]))
        tagged = store.tag("m@1", "Fast", "nlp", "fast")
        assert tagged.tags == ("nlp", "Fast")
        assert store.get("m@1").tags == ("nlp", "Fast")
        assert store.get("m@2").tags == ("nlp",)  # another version is untouched
        assert names(store.search("tag:fast", all_versions=True)) == ["m"]
        assert store.search("fast", all_versions=True).items[0].card.version == 1

        untagged = store.untag("m@1", "FAST", "absent")
        assert untagged.tags == ("nlp",)
        assert store.search("tag:fast", all_versions=True).total == 0
        assert store.search("fast", all_versions=True).total == 0

        described = store.set_description("m@1", "a brand new text")
        assert described.description == "a brand new text"
        assert store.get("m@1").description == "a brand new text"
        assert store.search("brand", all_versions=True).total == 1
        assert store.search("old", all_versions=True).total == 0

    def test_tags_must_be_text(self, store: RegistryStore) -> None:
        store.register(card("m"))
        with pytest.raises(UsageError, match="tag"):
            store.tag("m", " ")

    def test_deprecated_versions_still_resolve(self, store: RegistryStore) -> None:
        store.register(card("m"))
        store.register(card("m"))
        deprecated = store.deprecate("m")
        assert deprecated.version == 2
        assert store.get("m").version == 2
        assert store.get("m@2").version == 2
        assert [v.status for v in store.versions("m")] == [
            VersionStatus.ACTIVE,
            VersionStatus.DEPRECATED,
        ]
        hit = store.search("").items[0]
        assert hit.status is VersionStatus.DEPRECATED
        assert names(store.search("status:deprecated")) == ["m"]
        assert store.search("status:active").total == 0
        assert store.search("status:active", all_versions=True).total == 1

    def test_delete_hides_the_version_and_moves_latest(self, store: RegistryStore) -> None:
        for text in ("one", "two", "three"):
            store.register(card("m", description=f"version {text}"))
        store.set_alias("m", "prod", 3)
        store.set_alias("m", "old", 1)
        assert store.delete("m").version == 3

        assert store.get("m").version == 2
        assert store.get("m@latest").version == 2
        with pytest.raises(NotFoundError, match="m@3 was deleted"):
            store.get("m@3")
        with pytest.raises(NotFoundError, match="no alias 'prod'"):
            store.get("m@prod")  # aliases on a deleted version go with it
        assert store.get("m@old").version == 1

        listed = store.versions("m")
        assert [(v.card.version, v.status, v.aliases) for v in listed] == [
            (1, VersionStatus.ACTIVE, ("old",)),
            (2, VersionStatus.ACTIVE, ("latest",)),
            (3, VersionStatus.DELETED, ()),
        ]
        assert store.search("three", all_versions=True).total == 0
        assert store.search("three").total == 0
        assert [h.card.version for h in store.search("", all_versions=True, sort="name").items] == [
            1,
            2,
        ]
        with pytest.raises(NotFoundError):
            store.delete("m@3")
        with pytest.raises(NotFoundError):
            store.tag("m@3", "x")

    def test_deleting_an_older_version_keeps_latest(self, store: RegistryStore) -> None:
        store.register(card("m"))
        store.register(card("m"))
        store.delete("m@1")
        assert store.get("m").version == 2

    def test_deleting_every_version(self, store: RegistryStore) -> None:
        store.register(card("m"))
        store.delete("m")
        with pytest.raises(NotFoundError, match="every version of model 'm' is deleted"):
            store.get("m")
        assert store.search("").total == 0
        # Numbers are never reused.
        assert store.register(card("m")).version == 2
        assert store.get("m").version == 2

    # --------------------------------------------------------------- migrations

    def test_a_closed_store_refuses_work(self, open_store: StoreOpener) -> None:
        opened = open_store()
        opened.close()
        with pytest.raises(LlmosError, match="closed"):
            opened.get("m")

    @pytest.mark.parametrize(
        ("query", "expected"),
        [
            ("", ALL),
            # each filter
            ("task:text-classification", {BERT, ROBERTA, DISTIL}),
            ("task:chat", {LLAMA, REMOTE}),
            ("provider:vllm", {LLAMA}),
            ("provider:OpenAI-Compatible", {REMOTE}),
            ("family:bert", {BERT, DISTIL, MINILM}),
            ("tag:NLP", {BERT, ROBERTA, DISTIL}),
            ("tag:sent*", {ROBERTA, DISTIL, MINILM}),
            ("license:apache-2.0", {BERT, ROBERTA, DISTIL, MINILM}),
            ("license:MIT", {GPT2}),
            ("format:gguf", {LLAMA}),
            ("format:remote-api", {REMOTE}),
            ("name:acme/*", {BERT, ROBERTA, DISTIL}),
            ("name:acme/bert-base", {BERT}),
            ("name:*chat*", {REMOTE}),
            # parameters
            ("params:<200M", {BERT, ROBERTA, DISTIL, GPT2, MINILM}),
            ("params:>=1B", {LLAMA}),
            ("params:>7B", set()),
            ("params:100M..125M", {BERT, ROBERTA, GPT2}),
            ("params:66M", {DISTIL}),
            ("parameters:<=66000000", {DISTIL, MINILM}),
            ("NOT params:<200M", {LLAMA, REMOTE}),
            # free text, words and phrases
            ("sentiment", {ROBERTA, DISTIL}),
            ("text classification", {BERT, ROBERTA, DISTIL}),
            ('"classification text"', set()),
            ("chat", {LLAMA, REMOTE}),
            ("bert", {BERT, DISTIL}),
            # boolean structure
            ("sentiment tag:deprecated", {DISTIL}),
            ("sentiment AND NOT tag:deprecated", {ROBERTA}),
            ("family:bert OR family:roberta", {BERT, ROBERTA, DISTIL, MINILM}),
            ("NOT family:bert", {ROBERTA, LLAMA, GPT2, REMOTE}),
            ("NOT NOT family:bert", {BERT, DISTIL, MINILM}),
            ("bert OR tag:llm", {BERT, DISTIL, LLAMA, GPT2}),
            ("(bert OR llama) NOT tag:deprecated", {BERT, LLAMA}),
            ("bert OR llama NOT tag:deprecated", {BERT, DISTIL, LLAMA}),
            ("NOT sentiment", ALL - {ROBERTA, DISTIL}),
            ("chat NOT provider:vllm", {REMOTE}),
            ("chat OR sentiment NOT tag:deprecated", {LLAMA, REMOTE, ROBERTA}),
            ("(chat OR sentiment) NOT tag:deprecated", {LLAMA, REMOTE, ROBERTA}),
            ("task:chat (tag:llm OR format:remote-api)", {LLAMA, REMOTE}),
            ("NOT (family:bert OR task:chat)", {ROBERTA, GPT2}),
            ("tag:nlp AND NOT (sentiment OR params:>100M)", set()),
            ("tag:nlp NOT (sentiment AND params:>100M)", {BERT, DISTIL}),
            (
                "sentiment task:text-classification (family:bert OR family:roberta) "
                "NOT tag:deprecated params:<200M license:apache-2.0",
                {ROBERTA},
            ),
        ],
    )
    def test_query_semantics(self, corpus: RegistryStore, query: str, expected: set[str]) -> None:
        assert name_set(corpus, query) == expected

    def test_the_seed_document_search(self, corpus: RegistryStore) -> None:
        assert BERT in name_set(corpus, "text classification")
        # The shell passes the quotes through: a phrase.
        assert name_set(corpus, '"text classification"') == {BERT, ROBERTA, DISTIL}

    def test_name_matches_rank_above_description_matches(self, store: RegistryStore) -> None:
        # The name match sits in a longer field than the others, which unweighted
        # bm25 would penalise: only the column weights put it first.
        store.register(card("acme/other", description="sentiment"))
        store.register(card("acme/sentiment-model-for-long-reviews", description="a model"))
        store.register(card("acme/tagged", tags=["sentiment", "english"], description="a model"))
        page = store.search("sentiment")
        assert names(page) == ["acme/sentiment-model-for-long-reviews", "acme/tagged", "acme/other"]
        scores = [hit.score for hit in page.items]
        assert all(s is not None and s > 0 for s in scores)
        assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]
        # Ascending relevance is the reverse order.
        assert names(store.search("sentiment", descending=False)) == names(page)[::-1]

    def test_text_under_or_still_ranks_text_matches_first(self, corpus: RegistryStore) -> None:
        page = corpus.search("bert OR tag:llm")
        assert set(names(page)[:2]) == {BERT, DISTIL}
        assert [hit.score for hit in page.items][2:] == [0.0, 0.0]

    def test_sorts(self, corpus: RegistryStore) -> None:
        by_name = sorted(ALL)
        assert names(corpus.search("", sort="name")) == by_name
        assert names(corpus.search("")) == by_name  # relevance without text: by name
        assert names(corpus.search("", sort="name", descending=True)) == by_name[::-1]
        assert names(corpus.search("", sort="parameters"))[:3] == [LLAMA, ROBERTA, GPT2]
        assert names(corpus.search("", sort="parameters"))[-1] == REMOTE  # unknown size last
        assert names(corpus.search("", sort="parameters", descending=False))[:2] == [REMOTE, MINILM]
        # register_many stamps one time; ties fall back to registration order.
        assert names(corpus.search("", sort="created")) == [c.name for c in CORPUS][::-1]
        later = corpus.register(card("zz/new"))
        assert names(corpus.search("", sort="created", limit=1)) == [later.name]
        assert corpus.search("chat", sort="created").items[0].score is None

    def test_bad_search_arguments(self, corpus: RegistryStore) -> None:
        with pytest.raises(UsageError, match="sort must be one of"):
            corpus.search("", sort="size")
        with pytest.raises(UsageError, match="limit"):
            corpus.search("", limit=0)
        with pytest.raises(UsageError, match="limit"):
            corpus.search("", limit=1001)
        with pytest.raises(UsageError, match="offset"):
            corpus.search("", offset=-1)
        cursor = corpus.search("", limit=2).next_cursor
        with pytest.raises(UsageError, match="not both"):
            corpus.search("", limit=2, cursor=cursor, offset=2)
        with pytest.raises(UsageError, match="another search"):
            corpus.search("tag:nlp", limit=2, cursor=cursor)
        with pytest.raises(UsageError, match="another search"):
            corpus.search("", limit=2, cursor=cursor, sort="created")
        with pytest.raises(UsageError, match="invalid search cursor"):
            corpus.search("", cursor="not-a-cursor!")

    @pytest.mark.parametrize(
        ("query", "sort"),
        [
            ("", "name"),
            ("", "created"),
            ("", "parameters"),
            ("model", "relevance"),
            ("tag:even", "name"),
        ],
    )
    def test_walking_every_page_returns_every_card_once(
        self, store: RegistryStore, query: str, sort: str
    ) -> None:
        cards = [
            card(
                f"vendor{i % 7}/model-{i:03d}",
                description="model " * (1 + i % 5) + f"number {i}",
                tags=["even" if i % 2 == 0 else "odd"],
                parameters=None if i % 10 == 0 else (i % 13) * M,
            )
            for i in range(250)
        ]
        store.register_many(cards)
        expected = {c.name for c in cards if query != "tag:even" or c.tags == ("even",)}

        seen: list[str] = []
        cursor = None
        pages = 0
        while True:
            page = store.search(query, sort=sort, limit=20, cursor=cursor)
            assert page.total == len(expected)
            assert len(page.items) <= 20
            seen += names(page)
            pages += 1
            cursor = page.next_cursor
            if cursor is None:
                break
        assert len(seen) == len(expected) and set(seen) == expected
        assert pages == -(-len(expected) // 20)

        by_offset: list[str] = []
        offset: int | None = 0
        while offset is not None:
            page = store.search(query, sort=sort, limit=20, offset=offset)
            by_offset += names(page)
            offset = page.next_offset
        assert by_offset == seen

    def test_no_cap_on_results(self, store: RegistryStore) -> None:
        store.register_many(card(f"m{i:04d}", tags=["bulk"]) for i in range(1100))
        first = store.search("tag:bulk", sort="name", limit=1000)
        assert len(first.items) == 1000
        # Counting stops at the count limit; paging does not.
        assert store_module.COUNT_LIMIT < 1100
        assert (first.total, first.total_exact) == (store_module.COUNT_LIMIT, False)
        assert first.to_dict()["total_exact"] is False
        second = store.search("tag:bulk", sort="name", limit=1000, cursor=first.next_cursor)
        assert len(second.items) == 100 and second.next_cursor is None
        assert names(second)[-1] == "m1099"

    @pytest.mark.parametrize(
        ("query", "sort"),
        [
            ("", "name"),
            ("tag:even", "name"),
            ("tag:even", "created"),
            ("NOT tag:even provider:transformers", "relevance"),
            ("(tag:even OR vendor3) params:<8M", "name"),
            ("model", "relevance"),
            ("model tag:odd", "created"),
            ("tag:odd", "parameters"),
        ],
    )
    def test_a_count_limit_caps_the_total_but_every_page_is_the_same(
        self, open_store: StoreOpener, query: str, sort: str
    ) -> None:
        """Past the count limit, a store may read pages another way (SQLite's
        filter-only searches walk an index's order instead of sorting what the
        filters find): the pages, and cursors and offsets across them, must
        not change."""
        cards = [
            card(
                f"vendor{i % 7}/model-{i:03d}",
                description="model " * (1 + i % 5) + f"number {i}",
                tags=["even" if i % 2 == 0 else "odd"],
                parameters=None if i % 10 == 0 else (i % 13) * M,
            )
            for i in range(120)
        ]
        exact = open_store()
        exact.register_many(cards)
        expected = exact.search(query, sort=sort, limit=1000)
        assert expected.total_exact and expected.total > 7

        capped = open_store(count_limit=7)
        seen, cursor = [], None
        while True:
            page = capped.search(query, sort=sort, limit=9, cursor=cursor)
            assert (page.total, page.total_exact) == (7, False)
            seen += names(page)
            if (cursor := page.next_cursor) is None:
                break
        by_offset: list[str] = []
        offset: int | None = 0
        while offset is not None:
            page = capped.search(query, sort=sort, limit=9, offset=offset)
            by_offset += names(page)
            offset = page.next_offset
        few = capped.search("name:vendor1/model-00*", sort=sort)
        assert seen == by_offset == names(expected)
        assert (few.total, few.total_exact) == (2, True)
        assert sorted(names(few)) == ["vendor1/model-001", "vendor1/model-008"]

    @pytest.mark.parametrize("bad", [0, -1, 1.5, True, "10"])
    def test_count_limit_must_be_a_positive_whole_number(
        self, open_store: StoreOpener, bad: Any
    ) -> None:
        with pytest.raises(UsageError, match="count_limit"):
            open_store(count_limit=bad)

    def test_one_hit_per_model_unless_all_versions(self, store: RegistryStore) -> None:
        for text in ("alpha one", "alpha two", "alpha three"):
            store.register(card("m", description=text))
        store.set_alias("m", "prod", 2)
        page = store.search("alpha")
        assert [(h.card.version, h.aliases) for h in page.items] == [(3, ("latest",))]
        assert page.total == 1
        every = store.search("alpha", all_versions=True, sort="name")
        assert every.total == 3
        assert {h.card.version: h.aliases for h in every.items} == {
            1: (),
            2: ("prod",),
            3: ("latest",),
        }
        # A filter that only an older version matches finds nothing per model.
        assert store.search("two").total == 0
        assert store.search("two", all_versions=True).total == 1

    def test_hits_carry_their_aliases(self, corpus: RegistryStore) -> None:
        corpus.register(attrs.evolve(CORPUS[0], description="retrained"))
        corpus.set_alias(BERT, "prod", 2)
        corpus.set_alias(BERT, "champion", 2)
        corpus.set_alias(GPT2, "prod", 1)
        hits = {h.card.name: h for h in corpus.search("", limit=100).items}
        assert hits[BERT].aliases == ("latest", "champion", "prod")
        assert hits[GPT2].aliases == ("latest", "prod")
        assert hits[LLAMA].aliases == ("latest",)
        as_dict = corpus.search(f"name:{BERT}").to_dict()
        assert as_dict["items"][0]["aliases"] == ["latest", "champion", "prod"]
        assert as_dict["total"] == 1

    def test_search_sees_its_own_writes_from_other_connections(
        self, open_store: StoreOpener
    ) -> None:
        one, two = open_store(), open_store()
        one.register(card("m", description="findable"))
        assert two.search("findable").total == 1
        two.delete("m")
        assert one.search("findable").total == 0

    # ------------------------------------------------------------- concurrency

    def test_concurrent_registrations_are_gapless(self, open_store: StoreOpener) -> None:
        """Writers with their own handles (their own connections) register
        versions of one name at once: they number 1..N, no gap, no repeat."""
        writers, each = 6, 8
        handles = [open_store() for _ in range(writers)]
        start = threading.Barrier(writers)
        got: list[int] = []
        errors: list[BaseException] = []

        def write(handle: RegistryStore, who: int) -> None:
            try:
                start.wait()
                for i in range(each):
                    if i % 4 == 3:
                        stored = handle.register_many([card("race"), card(f"own-{who}")])[0]
                    else:
                        stored = handle.register(card("race"), created_by=f"w{who}")
                    got.append(stored.version or 0)
            except BaseException as exc:  # reported below, not lost in the thread
                errors.append(exc)

        threads = [
            threading.Thread(target=write, args=(handle, who)) for who, handle in enumerate(handles)
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        total = writers * each
        assert sorted(got) == list(range(1, total + 1))
        listed = handles[0].versions("race")
        assert [v.card.version for v in listed] == list(range(1, total + 1))
        assert handles[0].get("race").version == total
        assert [v.aliases for v in listed if v.aliases] == [("latest",)]

    # ----------------------------------------------------------------- ranking

    @pytest.mark.parametrize(
        "query",
        [
            "bert",
            "sentiment",
            "text classification",
            '"text classification"',
            "chat OR sentiment",
            "bert OR tag:llm",
            "model NOT tag:deprecated",
            "classification family:bert",
            '"language model" OR encoder',
        ],
    )
    def test_scores_are_the_registrys_bm25(self, corpus: RegistryStore, query: str) -> None:
        """Scores follow :func:`reference_scores` (computed from the cards
        alone), older and deleted versions counted as the registry counts
        them; best first, ties by registration order, newest first."""
        corpus.register(attrs.evolve(CORPUS[1], description="sentiment " * 3))
        corpus.register(card("gone/bert-chat", description="bert chat sentiment"))
        corpus.delete("gone/bert-chat")
        kept = [
            v.card
            for c in CORPUS
            for v in corpus.versions(c.name)
            if v.status is not VersionStatus.DELETED
        ]
        expected = reference_scores(kept, query)
        page = corpus.search(query, all_versions=True, limit=100)
        assert page.items, query
        for hit in page.items:
            assert hit.score == pytest.approx(expected[(hit.card.name, hit.card.version or 0)])
        scores = [hit.score or 0.0 for hit in page.items]
        assert scores == sorted(scores, reverse=True)
        # Ascending is the same order reversed.
        up = corpus.search(query, all_versions=True, limit=100, descending=False)
        assert [(h.card.name, h.card.version) for h in up.items] == [
            (h.card.name, h.card.version) for h in page.items
        ][::-1]
