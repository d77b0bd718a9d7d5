"""Tests of the registry store (real SQLite files) and of card files.

The store's contract (versions, refs, aliases, bounds, the query language,
sorts, cursors, bm25 scores, concurrent writers) is the shared suite of
:mod:`llmos.store_contract`, run here against :class:`SQLiteStore`; what
follows it is SQLite's own: its file, its migrations.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.errors import LlmosError, UsageError
from llmos.registry import (
    LATEST,
    SQLiteStore,
    card_from_markdown,
    card_to_markdown,
    parse_ref,
    read_card_file,
    write_card_file,
)
from llmos.registry import store as store_module
from llmos.store_contract import RegistryStoreContract, StoreOpener, card, full_card
from llmos.types import ModelCard


class TestSQLiteStoreContract(RegistryStoreContract):
    """The shared contract, on SQLite files (one per registry key)."""

    @pytest.fixture
    def open_store(self, tmp_path: Path) -> Iterator[StoreOpener]:
        opened: list[SQLiteStore] = []

        def open_store(key: str = "main", **options: Any) -> SQLiteStore:
            store = SQLiteStore(tmp_path / f"{key}.db", **options)
            opened.append(store)
            return store

        yield open_store
        for store in opened:
            store.close()


@pytest.mark.parametrize(
    ("ref", "parsed"),
    [("m", ("m", LATEST)), ("a/m@3", ("a/m", 3)), ("m@prod", ("m", "prod")), ("m@v2", ("m", "v2"))],
)
def test_parse_ref(ref: str, parsed: tuple[str, Any]) -> None:
    assert parse_ref(ref) == parsed


# --------------------------------------------------------------- migrations


def test_a_fresh_database_gets_the_current_schema(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "registry.db"
    with SQLiteStore(path) as opened:
        assert opened.schema_version == len(store_module.MIGRATIONS) >= 1
        opened.register(card("m"))
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    assert db.execute("PRAGMA user_version").fetchone() == (len(store_module.MIGRATIONS),)
    db.close()


def test_migrations_run_once_and_in_order(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "registry.db"
    base = list(store_module.MIGRATIONS)
    with SQLiteStore(path) as opened:
        opened.register(card("m"))

    ran: list[str] = []

    def second(conn: sqlite3.Connection) -> None:
        ran.append("second")
        conn.execute("CREATE TABLE extra (x INTEGER)")

    def third(conn: sqlite3.Connection) -> None:
        ran.append("third")
        conn.execute("INSERT INTO extra VALUES (1)")  # needs second's table

    monkeypatch.setattr(store_module, "MIGRATIONS", [*base, second, third])
    with SQLiteStore(path) as opened:
        assert opened.schema_version == len(base) + 2
        assert opened.get("m").version == 1  # data survives
    with SQLiteStore(path) as opened:  # re-opening is a no-op
        assert opened.schema_version == len(base) + 2
    assert ran == ["second", "third"]


def test_a_failing_migration_changes_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "registry.db"
    base = list(store_module.MIGRATIONS)
    SQLiteStore(path).close()

    def broken(conn: sqlite3.Connection) -> None:
        conn.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("boom")

    monkeypatch.setattr(store_module, "MIGRATIONS", [*base, broken])
    with pytest.raises(RuntimeError, match="boom"):
        SQLiteStore(path)
    db = sqlite3.connect(path)
    assert db.execute("PRAGMA user_version").fetchone() == (len(base),)
    assert db.execute("SELECT name FROM sqlite_master WHERE name = 'half_done'").fetchone() is None
    db.close()


def test_a_newer_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    SQLiteStore(path).close()
    db = sqlite3.connect(path)
    db.execute("PRAGMA user_version = 99")
    db.close()
    with pytest.raises(LlmosError, match="schema version 99, newer than this llmos understands"):
        SQLiteStore(path)


def test_a_file_that_is_not_a_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "registry.db"
    path.write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(LlmosError, match="registry database"):
        SQLiteStore(path)


# ---------------------------------------------------------------- card files


def test_card_json_round_trip() -> None:
    full = full_card()
    assert ModelCard.from_dict(full.to_dict()) == full


def test_card_markdown_round_trip() -> None:
    full = full_card()
    text = card_to_markdown(full)
    assert text.startswith('---\nname: "acme/bert-base"\n')
    assert "\n# acme/bert-base\n\nA pre-trained BERT model" in text
    assert card_from_markdown(text) == full
    assert card_from_markdown(text.replace("\n", "\r\n")) == full
    minimal = card("m")
    assert card_from_markdown(card_to_markdown(minimal)) == minimal


def test_card_files(tmp_path: Path) -> None:
    path = tmp_path / "README.md"
    write_card_file(path, full_card())
    assert read_card_file(path) == full_card()
    path.write_text("no front matter", encoding="utf-8")
    with pytest.raises(UsageError, match=r"README\.md: a model card file must start"):
        read_card_file(path)


def test_hand_written_card_file() -> None:
    text = (
        "---\n"
        'name: "acme/tiny"\n'
        "\n"
        'provider: "transformers"\n'
        'tasks: ["chat"]\n'
        "parameters: 135000000\n"
        "---\n"
        "# A title people like\n"
        "\n"
        "Chats a little.\n"
    )
    parsed = card_from_markdown(text)
    assert parsed.name == "acme/tiny" and parsed.tasks == ("chat",)
    assert parsed.parameters == 135_000_000 and parsed.description == "Chats a little."


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("", "must start with a '---' line"),
        ('name: "m"\n---\n', "must start with a '---' line"),
        ('---\nname: "m"\nprovider: "x"\n', "never closed"),
        ('---\nname: "m"\nprovider: x\n---\n', "line 3: the value of 'provider' is not JSON"),
        ('---\nname: "m"\njust text\n---\n', "line 3: expected 'key: <JSON value>'"),
        ('---\nname: "m"\nname: "n"\n---\n', "line 3: 'name' is given twice"),
        ('---\nname: "m"\nprovider: "x"\ncolour: "red"\n---\n', "unknown model card field"),
        ('---\nname: "m"\n---\n', "invalid model card"),
        ('---\nname: "Bad Name"\nprovider: "x"\n---\n', "model name 'Bad Name' is invalid"),
        (
            '---\nname: "m"\nprovider: "x"\ndescription: "a"\n---\n# m\n\nb\n',
            "the description is given twice",
        ),
    ],
)
def test_malformed_card_files(text: str, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        card_from_markdown(text)
    assert words in caught.value.message
