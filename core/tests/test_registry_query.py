"""Tests of the registry's search language: tokenizer, parser, SQL compiler,
and that hostile text stays text."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.errors import UsageError
from llmos.registry import SQLiteStore
from llmos.registry.query import (
    MAX_DEPTH,
    MAX_TERMS,
    And,
    Compare,
    Filter,
    Not,
    Or,
    QueryError,
    Text,
    fts_phrase,
    parse_query,
    plan_search,
    to_sql,
)
from llmos.types import ModelCard

# ----------------------------------------------------------------- parsing


@pytest.mark.parametrize(
    ("query", "tree"),
    [
        ("", None),
        ("   ", None),
        ("bert", Text("bert")),
        ("bert base", And((Text("bert"), Text("base")))),
        ("bert AND base", And((Text("bert"), Text("base")))),
        ("a OR b c", Or((Text("a"), And((Text("b"), Text("c")))))),
        ("a b OR c", Or((And((Text("a"), Text("b"))), Text("c")))),
        ("NOT a b", And((Not(Text("a")), Text("b")))),
        ("NOT NOT a", Not(Not(Text("a")))),
        ("(a OR b) c", And((Or((Text("a"), Text("b"))), Text("c")))),
        ("a (b OR (c d))", And((Text("a"), Or((Text("b"), And((Text("c"), Text("d")))))))),
        ("a or b", Or((Text("a"), Text("b")))),
        ("a and not b", And((Text("a"), Not(Text("b"))))),
        ('"text classification"', Text("text classification", phrase=True)),
        ('"unclosed phrase', Text("unclosed phrase", phrase=True)),
        ("family:BERT", Filter("family", "bert")),
        ("Family:bert", Filter("family", "bert")),
        ("TASK:text-classification", Filter("task", "text-classification")),
        ("tags:nlp", Filter("tag", "nlp")),
        ("licence:Apache-2.0", Filter("license", "apache-2.0")),
        ('tag:"two words"', Filter("tag", "two words")),
        ("name:acme/*", Filter("name", "acme/*")),
        ("format:gguf", Filter("format", "gguf")),
        ("status:deprecated", Filter("status", "deprecated")),
        (
            "(family:bert OR family:roberta)",
            Or((Filter("family", "bert"), Filter("family", "roberta"))),
        ),
        ("params:<200M", Compare("parameters", "<", 200_000_000)),
        ("params:>=1B", Compare("parameters", ">=", 1_000_000_000)),
        ("parameters:>7k", Compare("parameters", ">", 7_000)),
        ("params:<=1.5b", Compare("parameters", "<=", 1_500_000_000)),
        ("params:1.1B", Compare("parameters", "=", 1_100_000_000)),
        ("params:=125000000", Compare("parameters", "=", 125_000_000)),
        ("params:2T", Compare("parameters", "=", 2_000_000_000_000)),
        (
            "params:100M..1B",
            And((Compare("parameters", ">=", 10**8), Compare("parameters", "<=", 10**9))),
        ),
        ("params:..1B", Compare("parameters", "<=", 10**9)),
        ("params:100M..", Compare("parameters", ">=", 10**8)),
        # FTS syntax and punctuation are words, not operators.
        ("NEAR(", Text("NEAR(")),
        ("bert*", Text("bert*")),
        ("^bert", Text("^bert")),
        ("a-b:c", Text("a-b:c")),
        ("12:30", Text("12:30")),
    ],
)
def test_parse(query: str, tree: object) -> None:
    assert parse_query(query) == tree


def test_the_issue_example_parses_into_the_expected_tree() -> None:
    query = (
        "sentiment task:text-classification (family:bert OR family:roberta) "
        "NOT tag:deprecated params:<200M license:apache-2.0"
    )
    assert parse_query(query) == And(
        (
            Text("sentiment"),
            Filter("task", "text-classification"),
            Or((Filter("family", "bert"), Filter("family", "roberta"))),
            Not(Filter("tag", "deprecated")),
            Compare("parameters", "<", 200_000_000),
            Filter("license", "apache-2.0"),
        )
    )


def test_positions_are_recorded_one_based() -> None:
    tree = parse_query("bert  family:x")
    assert isinstance(tree, And)
    assert [item.position for item in tree.items] == [1, 7]  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("query", "position", "words"),
    [
        ("(bert", 1, "'(' is never closed"),
        ("a (b (c)", 3, "'(' is never closed"),
        ("bert)", 5, "unbalanced ')'"),
        (")", 1, "unbalanced ')'"),
        ("a OR (b))", 9, "unbalanced ')'"),
        ("()", 1, "empty parentheses"),
        ("bert OR", 6, "expected a search term after 'OR'"),
        ("bert AND", 6, "expected a search term after 'AND'"),
        ("NOT", 1, "expected a search term after 'NOT'"),
        ("(a OR )", 4, "expected a search term after 'OR'"),
        ("OR bert", 1, "'OR' needs a term on each side"),
        ("famly:bert", 1, "unknown field 'famly' (did you mean 'family'?)"),
        ("bert tsk:chat", 6, "unknown field 'tsk' (did you mean 'task'?)"),
        ("colour:red", 1, "unknown field 'colour'"),
        ("tag:", 1, "missing value after 'tag:'"),
        ("params:<abc", 8, "bad number 'abc'"),
        ("params:<", 8, "bad number ''"),
        ("x params:10X", 10, "bad number '10X'"),
        ("params:2B..1B", 8, "empty range"),
        ("params:..", 8, "a range needs at least one end"),
        ("params:99999999999T", 8, "too large"),
        ("format:ggfu", 8, "format must be one of"),
        ("status:deleted", 8, "status must be one of active, deprecated"),
    ],
)
def test_errors_name_the_position(query: str, position: int, words: str) -> None:
    with pytest.raises(QueryError) as caught:
        parse_query(query)
    error = caught.value
    assert error.position == position
    assert words in error.message
    assert error.message.startswith(f"bad search query at position {position}: ")
    # A query error is a usage error: HTTP 400, exit code 2.
    assert isinstance(error, UsageError)
    assert error.status == 400


def test_format_error_suggests_the_near_value() -> None:
    with pytest.raises(QueryError, match="did you mean 'gguf'"):
        parse_query("format:ggfu")


def test_unknown_field_error_says_to_quote() -> None:
    with pytest.raises(QueryError, match="quote the text"):
        parse_query("hf://acme")
    assert parse_query('"hf://acme"') == Text("hf://acme", phrase=True)


def test_non_string_query_is_a_usage_error() -> None:
    with pytest.raises(UsageError):
        parse_query(3)  # type: ignore[arg-type]


# ---------------------------------------------------------------- compiling


def test_fts_phrase_quotes_everything() -> None:
    assert fts_phrase("bert") == '"bert"'
    assert fts_phrase('say "hi"') == '"say ""hi"""'
    assert fts_phrase("NEAR(a b) OR c*") == '"NEAR(a b) OR c*"'


def test_values_are_bound_never_spliced() -> None:
    hostile = "x'); DROP TABLE versions; --"
    for query in (f'family:"{hostile}"', f'tag:"{hostile}"', f'"{hostile}"'):
        sql = to_sql(parse_query(query))  # type: ignore[arg-type]
        assert "DROP" not in sql.sql and "'" not in sql.sql
        assert any(hostile.lower() in str(p).lower() for p in sql.params)


def test_not_treats_unknown_values_as_not_matching() -> None:
    sql = to_sql(parse_query("NOT family:bert"))  # type: ignore[arg-type]
    assert sql.sql == "((v.family = ?) IS NOT 1)"
    assert sql.params == ("bert",)


def test_globs_use_glob_and_escape_brackets() -> None:
    sql = to_sql(parse_query("name:acme/[x]*"))  # type: ignore[arg-type]
    assert sql.sql == "v.name GLOB ?"
    assert sql.params == ("acme/[[]x]*",)


def test_plan_drives_from_the_full_text_index_when_text_is_anded() -> None:
    plan = plan_search(parse_query("bert base family:bert NOT tiny"))
    assert plan.match == '("bert" AND "base") NOT "tiny"'
    assert plan.where.params == ("bert",)
    assert plan.score_match is None


def test_plan_ranks_text_under_or_without_driving() -> None:
    plan = plan_search(parse_query("bert OR tag:nlp"))
    assert plan.match is None
    assert plan.score_match == '"bert"'
    assert "versions_fts MATCH ?" in plan.where.sql
    assert plan.where.params == ('"bert"', "nlp")


def test_plan_checks_filters_row_by_row_for_walking_an_index() -> None:
    plan = plan_search(parse_query("tag:nlp family:bert"))
    assert "v.id IN (SELECT version_id FROM tags" in plan.where.sql
    assert "EXISTS (SELECT 1 FROM tags WHERE version_id = v.id" in plan.probes.sql
    assert plan.probes.params == plan.where.params == ("nlp", "bert")


def test_plan_ranks_only_text_that_is_not_negated() -> None:
    plan = plan_search(parse_query("tag:x OR NOT bert"))
    assert plan.match is None and plan.score_match is None


def test_plan_ignores_text_without_tokens() -> None:
    plan = plan_search(parse_query("* family:bert"))
    assert plan.match is None and plan.score_match is None
    assert plan.where.params == ("bert",)


# ------------------------------------------------ hostile text against SQLite

HOSTILE = [
    '"); DROP TABLE versions; --',
    "'); DROP TABLE versions; --",
    "x' OR '1'='1",
    "NEAR(",
    "NEAR(bert base, 2",
    "*",
    "^",
    "bert*",
    "^bert",
    '"description:drop"',
    "{name description}: bert",
    "- + : \\ ' ; --",
    "bert AND",
]


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SQLiteStore]:
    with SQLiteStore(tmp_path / "registry.db") as opened:
        opened.register(
            ModelCard(
                name="acme/dropper",
                provider="transformers",
                description="Knows how to DROP TABLE versions, near the end",
            )
        )
        opened.register(ModelCard(name="acme/bert-base", provider="transformers"))
        yield opened


@pytest.mark.parametrize("query", HOSTILE)
def test_hostile_queries_are_text_and_change_nothing(store: SQLiteStore, query: str) -> None:
    try:
        store.search(query)
    except QueryError:
        # A clean usage error is acceptable for text that is not a query
        # (an unbalanced paren); what matters is that SQL never sees it.
        assert query in ("'); DROP TABLE versions; --", "{name description}: bert", "bert AND")
    assert [v.card.name for v in store.versions("acme/dropper")] == ["acme/dropper"]
    assert store.search("").total == 2
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT count(*) FROM versions").fetchone() == (2,)
    db.close()


def test_sql_syntax_in_a_phrase_finds_the_text(store: SQLiteStore) -> None:
    hits = store.search('"); DROP TABLE versions; --').items
    assert [h.card.name for h in hits] == ["acme/dropper"]


def test_fts_operators_are_searched_as_words(store: SQLiteStore) -> None:
    # As FTS5 syntax, NEAR( is an error and bert* a prefix query (matching
    # "bert-base"); as text, "near" is a word of the dropper's description.
    assert [h.card.name for h in store.search("NEAR(").items] == ["acme/dropper"]
    assert [h.card.name for h in store.search("bert*").items] == ["acme/bert-base"]
    assert [h.card.name for h in store.search("ber*").items] == []
    # No searchable characters: the term constrains nothing.
    assert store.search("*").total == 2
    assert store.search("^").total == 2


def test_plan_names_the_text_that_ranks_and_checks_rows_one_by_one() -> None:
    plan = plan_search(parse_query('bert "text classification" tag:nlp NOT tiny (llama OR x)'))
    assert plan.phrases == ("bert", "text classification")
    assert plan.excluded == ("tiny",)
    # Checking the rows the impact index finds: text too is a probe of the row.
    assert "EXISTS (SELECT 1 FROM tags WHERE version_id = v.id" in plan.checks.sql
    assert "versions_fts MATCH ? AND rowid = v.id" in plan.checks.sql
    assert plan.checks.params == ("nlp", '"llama"', '"x"')
    # Counting from the full-text index: tags probed by its rowid, before the row.
    assert "version_id = versions_fts.rowid" in plan.where.sql


def test_plan_ranks_text_under_or_by_its_positive_phrases() -> None:
    plan = plan_search(parse_query('bert OR (tag:nlp NOT tiny) OR "a b"'))
    assert plan.phrases == ("bert", "a b") and plan.excluded == ()
    assert plan.checks.sql.count("rowid = v.id") == 3


# ------------------------------------------- bounds: size, depth, characters
# Each of these once reached SQLite or Python's recursion limit and left the
# daemon as a 500 (issue 14): they must be QueryErrors (400) naming the place.


def test_terms_are_bounded_with_a_clear_error() -> None:
    assert isinstance(parse_query(" OR ".join(f"w{i}" for i in range(MAX_TERMS))), Or)
    with pytest.raises(QueryError, match=f"more than {MAX_TERMS} search terms") as caught:
        parse_query(" OR ".join(f"w{i}" for i in range(1000)))
    # The first term past the bound: w200, after 200 terms and 199 " OR ".
    assert caught.value.position == len(" OR ".join(f"w{i}" for i in range(MAX_TERMS))) + 5
    with pytest.raises(QueryError, match="search terms"):
        parse_query(" ".join(["tag:x"] * (MAX_TERMS + 1)))


@pytest.mark.parametrize(
    "deep",
    [
        "(" * 400 + "a" + ")" * 400,
        "NOT " * 1000 + "a",
        "(NOT " * 300 + "a" + ")" * 300,
        "(" * 100_000,
    ],
)
def test_nesting_is_bounded_before_recursing(deep: str) -> None:
    # Python's recursion limit is 1,000 frames; a RecursionError would be a 500.
    with pytest.raises(QueryError, match=f"nested more than {MAX_DEPTH} deep"):
        parse_query(deep)


def test_nesting_up_to_the_bound_parses() -> None:
    assert parse_query("(" * MAX_DEPTH + "a" + ")" * MAX_DEPTH) == Text("a")
    assert parse_query("NOT " * MAX_DEPTH + "a") is not None
    with pytest.raises(QueryError, match="nested"):
        parse_query("(" * (MAX_DEPTH + 1) + "a" + ")" * (MAX_DEPTH + 1))
    # Depth is nesting, not count: many groups side by side are fine.
    assert isinstance(parse_query(" ".join(["(a OR b)"] * 50)), And)


@pytest.mark.parametrize(
    ("query", "position", "words"),
    [
        ("a\x00b", 2, "a NUL byte"),
        ('"a\x00b"', 3, "a NUL byte"),
        ("tag:\x00", 5, "a NUL byte"),
        ("x\x1b[31m", 2, r"control character '\\x1b'"),
        ("a\x7f", 2, "control character"),
        ("caf\ud800", 4, "lone surrogate"),
    ],
)
def test_nul_control_characters_and_surrogates_are_refused(
    query: str, position: int, words: str
) -> None:
    with pytest.raises(QueryError, match=words) as caught:
        parse_query(query)
    assert caught.value.position == position


def test_tabs_and_newlines_are_spaces() -> None:
    assert parse_query("bert\tbase\r\nlarge") == And((Text("bert"), Text("base"), Text("large")))


def test_numbers_too_long_for_python_are_refused() -> None:
    # int() refuses strings of more than 4,300 digits with a ValueError.
    with pytest.raises(QueryError, match="too long"):
        parse_query("params:<" + "9" * 5000)
    with pytest.raises(QueryError, match="too long"):
        parse_query("params:1." + "0" * 5000 + "..2")


def test_the_largest_queries_run_in_sqlite(store: SQLiteStore) -> None:
    # The bounds keep the compiled SQL under SQLite's expression depth (1,000),
    # for every plan: ranked, sorted by an index, sorted after finding.
    widest = " OR ".join(f"w{i}" for i in range(MAX_TERMS - 1)) + " OR dropper"
    mixed = " OR ".join(f"(w{i} NOT tag:t{i})" for i in range(MAX_TERMS // 2 - 1)) + " OR end"
    deepest = "(NOT " * (MAX_DEPTH // 2) + "dropper" + ")" * (MAX_DEPTH // 2)  # NOT NOT: dropper
    for query in (widest, mixed, deepest):
        for sort in ("relevance", "name", "parameters"):
            for all_versions in (False, True):
                page = store.search(query, sort=sort, all_versions=all_versions)
                assert [h.card.name for h in page.items] == ["acme/dropper"], (query, sort)
    odd = "NOT " * (MAX_DEPTH - 1) + "dropper"
    assert [h.card.name for h in store.search(odd).items] == ["acme/bert-base"]


@pytest.mark.parametrize(
    "query",
    [
        "a\x00b",
        " OR ".join(["w"] * 1000),
        "(" * 400 + "a" + ")" * 400,
        "NOT " * 1000 + "a",
        "params:<" + "9" * 5000,
    ],
)
def test_the_store_answers_bad_queries_with_a_usage_error(store: SQLiteStore, query: str) -> None:
    with pytest.raises(UsageError, match="bad search query"):
        store.search(query)
