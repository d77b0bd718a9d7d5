"""Tests of the decisions every registry store shares (``llmos.registry.store``:
tag edits, ref errors, search order, cursors, pages), called as a store calls
them. The store contract (:mod:`llmos.store_contract`) checks what a store
returns; these check what it cannot see from outside: which reads a decision
asks for, and when, and the cases no store reaches on its own.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import pytest

from llmos.errors import NotFoundError, UsageError
from llmos.registry.store import (
    LATEST,
    MAX_INT,
    MAX_ITEMS,
    VersionRow,
    VersionStatus,
    card_json,
    check_count_limit,
    check_live,
    check_manual_alias,
    check_version_number,
    edit_add_tags,
    edit_description,
    edit_remove_tags,
    encode_cursor,
    filter_columns,
    filter_values,
    group_aliases,
    missing_ref,
    new_version,
    read_cursor,
    search_fingerprint,
    search_order,
    search_page,
    version_infos,
)
from llmos.types import ModelCard, ModelFormat


def card(name: str = "m", **fields: Any) -> ModelCard:
    fields.setdefault("provider", "transformers")
    return ModelCard(name=name, **fields)


class Reads:
    """Stand-ins for a store's reads that record which ran."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def reader(self, name: str, value: Any) -> Callable[..., Any]:
        def read(*args: Any) -> Any:
            self.calls.append(name)
            return value

        return read


# ---------------------------------------------------------------- tag edits


def test_adding_tags_keeps_the_first_spelling_of_each_and_the_order() -> None:
    edit = edit_add_tags([" Fast ", "nlp", "FAST", "NLP", "new"])
    assert edit(card(tags=("nlp", "old"))).tags == ("nlp", "old", "Fast", "new")


def test_adding_no_new_tag_leaves_the_card_equal() -> None:
    # A store writes nothing for an edit that leaves the card equal.
    before = card(tags=("NLP",))
    assert edit_add_tags(["nlp", "Nlp"])(before) == before


def test_tag_edits_check_their_tags_before_the_store_reads_anything() -> None:
    for bad in ([" "], ["x\x1b[31m"], [7]):
        with pytest.raises(UsageError, match="invalid"):
            edit_add_tags(bad)  # type: ignore[arg-type]
        with pytest.raises(UsageError, match="invalid"):
            edit_remove_tags(bad)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match=f"more than the {MAX_ITEMS}"):
        edit_add_tags(["t"] * (MAX_ITEMS + 1))


def test_adding_tags_past_the_limit_names_the_version() -> None:
    full = card(version=2, tags=tuple(f"t{i}" for i in range(MAX_ITEMS)))
    assert edit_add_tags(["T0"])(full) == full  # already there: no growth
    with pytest.raises(UsageError, match=rf"m@2 would carry {MAX_ITEMS + 1} tags"):
        edit_add_tags(["new"])(full)


def test_removing_tags_ignores_case_absent_tags_and_padding() -> None:
    edit = edit_remove_tags([" NLP", "absent"])
    assert edit(card(tags=("nlp", "Fast", "Nlp"))).tags == ("Fast",)


def test_description_edits_check_the_text_first() -> None:
    assert edit_description("line\n\ttabbed")(card(description="old")).description == (
        "line\n\ttabbed"
    )
    with pytest.raises(UsageError, match="must be a string"):
        edit_description(None)  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="a NUL byte"):
        edit_description("a\x00b")


# -------------------------------------------------------- checks and values


def test_argument_checks() -> None:
    assert check_count_limit(1) == 1
    for bad in (0, -1, True, 2.0, "5"):
        with pytest.raises(UsageError, match="count_limit must be a whole number"):
            check_count_limit(bad)
    assert check_version_number(MAX_INT) == MAX_INT
    for bad in (0, MAX_INT + 1, True, 1.0):
        with pytest.raises(UsageError, match="version must be a positive integer"):
            check_version_number(bad)
    assert check_manual_alias("prod") == "prod"
    with pytest.raises(UsageError, match="'latest' is kept by the registry"):
        check_manual_alias(LATEST)
    with pytest.raises(UsageError, match="only digits"):
        check_manual_alias("12")


def test_new_version_numbers_after_the_last_and_keeps_the_author_unless_given() -> None:
    now = datetime(2026, 1, 2, tzinfo=UTC)
    mine = card(version=9, created_by="alice")
    assert new_version(mine, None, now, None).version == 1
    assert new_version(mine, 0, now, None).version == 1
    stored = new_version(mine, 4, now, None)
    assert (stored.version, stored.created_at, stored.created_by) == (5, now, "alice")
    assert new_version(mine, 4, now, "bob").created_by == "bob"


def test_filter_columns_and_values_fold_case() -> None:
    full = card(
        provider="Transformers",
        family="BERT",
        license=None,
        format=ModelFormat.SAFETENSORS,
        parameters=7,
    )
    assert filter_columns(full) == ("transformers", "bert", "safetensors", None, 7)
    assert filter_values(["NLP", "nlp", "Fast", "fast", "a"]) == ["a", "fast", "nlp"]
    assert filter_values([]) == []


# ---------------------------------------------------------------- resolving


def test_a_deleted_version_does_not_resolve() -> None:
    live = VersionRow(1, "m", 2, VersionStatus.DEPRECATED, card(version=2))
    assert check_live(live) is live
    gone = VersionRow(1, "m", 2, VersionStatus.DELETED, card(version=2))
    with pytest.raises(NotFoundError, match="model m@2 was deleted"):
        check_live(gone)


def test_a_version_row_loads_from_the_database_columns() -> None:
    stored = card(version=3, tags=("x",))
    row = VersionRow.load((7, "m", 3, "active", card_json(stored)))
    assert row == VersionRow(7, "m", 3, VersionStatus.ACTIVE, stored)
    assert VersionRow.load(None) is None


@pytest.mark.parametrize(
    ("selector", "exists", "message", "reads"),
    [
        (3, False, "no model named 'm'", ["exists"]),
        ("prod", False, "no model named 'm'", ["exists"]),
        (3, True, r"model 'm' has no version 3 \(versions 1-2\)", ["exists", "last"]),
        (LATEST, True, "every version of model 'm' is deleted", ["exists"]),
        ("prod", True, r"has no alias 'prod' \(aliases: canary, latest\)", ["exists", "aliases"]),
    ],
)
def test_missing_refs_read_only_what_their_message_needs(
    selector: int | str, exists: bool, message: str, reads: list[str]
) -> None:
    log = Reads()
    error = missing_ref(
        "m",
        selector,
        model_exists=log.reader("exists", exists),
        last_version=log.reader("last", 2),
        aliases=log.reader("aliases", ["canary", "latest"]),
    )
    assert isinstance(error, NotFoundError)
    with pytest.raises(NotFoundError, match=message):
        raise error
    assert log.calls == reads


def test_a_missing_alias_of_a_model_without_aliases_says_none() -> None:
    error = missing_ref(
        "m", "prod", model_exists=lambda: True, last_version=lambda: 1, aliases=lambda: []
    )
    assert str(error).endswith("(aliases: none)")


def test_aliases_group_by_version_latest_first_whatever_the_row_order() -> None:
    rows = [("m", 2, "prod"), ("m", 1, "b"), ("m", 2, "latest"), ("m", 2, "a"), ("n", 1, "latest")]
    expected = {("m", 2): ("latest", "a", "prod"), ("m", 1): ("b",), ("n", 1): ("latest",)}
    assert group_aliases(rows) == expected
    assert group_aliases(reversed(rows)) == expected
    assert group_aliases([]) == {}


def test_versions_of_an_unknown_model_read_no_aliases() -> None:
    log = Reads()
    with pytest.raises(NotFoundError, match="no model named 'm'"):
        version_infos("m", [], log.reader("aliases", {}))
    assert log.calls == []
    rows = [(1, "deleted", card_json(card(version=1))), (2, "active", card_json(card(version=2)))]
    infos = version_infos("m", rows, log.reader("aliases", {("m", 2): ("latest",)}))
    assert [(i.card.version, i.status, i.aliases) for i in infos] == [
        (1, VersionStatus.DELETED, ()),
        (2, VersionStatus.ACTIVE, ("latest",)),
    ]
    assert log.calls == ["aliases"]


# ------------------------------------------------------------------- search


@pytest.mark.parametrize(
    ("sort", "has_text", "descending", "expected"),
    [
        ("relevance", True, None, (None, True)),
        ("relevance", True, False, (None, False)),
        ("relevance", False, None, ("name", False)),  # no free text: by name, A to Z
        ("relevance", False, True, ("name", True)),
        ("name", True, None, ("name", False)),
        ("created", False, None, ("created", True)),
        ("parameters", True, None, ("parameters", True)),
        ("parameters", False, 0, ("parameters", False)),
    ],
)
def test_search_order(
    sort: str, has_text: bool, descending: bool | None, expected: tuple[str | None, bool]
) -> None:
    assert search_order(sort, has_text, descending) == expected


def test_fingerprints_tell_searches_apart() -> None:
    one = search_fingerprint("q", "name", False, False)
    assert one == search_fingerprint("q", "name", False, False) and len(one) == 12
    others = {
        search_fingerprint("r", "name", False, False),
        search_fingerprint("q", "created", False, False),
        search_fingerprint("q", "name", True, False),
        search_fingerprint("q", "name", False, True),
    }
    assert one not in others and len(others) == 4


@pytest.mark.parametrize(
    ("order", "good", "bad"),
    [("name", "bert", 1), ("created", 1.5, "bert"), ("parameters", 7, "7"), (None, 2.5, "2.5")],
)
def test_a_cursor_key_must_have_its_orders_type(order: str | None, good: Any, bad: Any) -> None:
    mark = search_fingerprint("", "name", False, False)
    assert read_cursor(None, mark, order) == ()
    assert read_cursor(encode_cursor(mark, good, 4), mark, order) == (good, 4)
    with pytest.raises(UsageError, match="invalid search cursor"):
        read_cursor(encode_cursor(mark, bad, 4), mark, order)
    with pytest.raises(UsageError, match="belongs to another search"):
        read_cursor(encode_cursor("another", good, 4), mark, order)
    forged = base64.urlsafe_b64encode(json.dumps([mark, good, "4"]).encode()).decode()
    with pytest.raises(UsageError, match="invalid search cursor"):
        read_cursor(forged, mark, order)


def _page(rows: list[tuple[int, Any]], **options: Any) -> tuple[Any, list[str]]:
    log = Reads()
    cards = {i: (VersionStatus.ACTIVE, card(f"m{i}", version=1)) for i in range(1, 10)}
    arguments: dict[str, Any] = {
        "limit": 2,
        "offset": 0,
        "cursor": None,
        "fingerprint": "f" * 12,
        "ranked": False,
        "total": len(rows),
        "count_limit": 1000,
        "cards": log.reader("cards", cards),
        "aliases": log.reader("aliases", {("m1", 1): ("latest",)}),
        **options,
    }
    return search_page(rows, **arguments), log.calls


def test_an_empty_page_reads_nothing() -> None:
    page, reads = _page([])
    assert (page.items, page.total, page.total_exact, page.next_cursor) == ([], 0, True, None)
    assert reads == []


def test_a_page_with_more_leads_on_by_cursor_and_offset() -> None:
    page, reads = _page([(1, "m1"), (2, "m2"), (3, "m3")], offset=4, total=7)
    assert [(hit.card.name, hit.aliases, hit.score) for hit in page.items] == [
        ("m1", ("latest",), None),
        ("m2", (), None),
    ]
    assert page.next_offset == 6 and (page.total, page.total_exact) == (7, True)
    assert read_cursor(page.next_cursor, "f" * 12, "name") == ("m2", 2)
    assert reads == ["cards", "aliases"]
    # the last page leads nowhere
    last, _ = _page([(1, "m1"), (2, "m2")])
    assert last.next_cursor is None and last.next_offset is None


def test_a_page_reached_by_cursor_leads_on_by_cursor_only() -> None:
    page, _ = _page([(1, 0.5), (2, 0.25), (3, 0.0)], cursor="given", ranked=True)
    assert [hit.score for hit in page.items] == [0.5, 0.25]
    assert page.next_offset is None
    assert read_cursor(page.next_cursor, "f" * 12, None) == (0.25, 2)


def test_a_count_past_the_limit_is_a_lower_bound() -> None:
    page, _ = _page([(1, "m1")], total=1001)
    assert (page.total, page.total_exact) == (1000, False)
    page, _ = _page([(1, "m1")], total=1000)
    assert (page.total, page.total_exact) == (1000, True)
