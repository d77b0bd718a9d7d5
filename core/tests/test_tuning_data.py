"""Tuning data: splits from JSON Lines, CSV, TSV and inline bodies, and every
way a file can be wrong."""

from __future__ import annotations

import csv
import hashlib
import json
from pathlib import Path
from typing import Any

import pytest

from llmos.errors import PayloadTooLarge, UsageError
from llmos.tuning.data import Dataset, load_file, load_splits, rows_hash, sort_labels

# The folder of real data beside the repository (not there on a user's machine).
SST2 = Path(__file__).resolve().parents[2].parent / "shared" / "data" / "sst2"

ROWS = [
    {"text": 'it \'s a "great" film', "label": 1},
    {"text": "bad, really bad", "label": 0},
    {"text": "meh", "label": 2},
]
#: what ROWS normalise to
NORMALISED = [{"text": r["text"], "label": str(r["label"])} for r in ROWS]


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def write_csv(path: Path, rows: list[dict[str, Any]], *, delimiter: str = ",") -> Path:
    with path.open("w", newline="", encoding="utf-8") as stream:
        # TSV as SST-2 writes it: no quoting at all (quotes are text)
        writer = csv.writer(stream, delimiter="\t", quoting=csv.QUOTE_NONE, quotechar=None)
        if delimiter != "\t":
            writer = csv.writer(stream)
        fields = list(rows[0])
        writer.writerow(fields)
        for row in rows:
            writer.writerow([row[f] for f in fields])
    return path


def expected_hash(rows: list[dict[str, str]]) -> str:
    """The documented hash: one canonical JSON object a line, sha256."""
    text = "".join(
        json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n"
        for r in rows
    )
    return hashlib.sha256(text.encode()).hexdigest()


def usage_error(**kwargs: Any) -> str:
    with pytest.raises(UsageError) as caught:
        load_splits(**kwargs)
    return str(caught.value)


# --------------------------------------------------------------------------
# Formats
# --------------------------------------------------------------------------


def test_jsonl_csv_and_tsv_give_the_same_rows_labels_and_hashes(tmp_path: Path) -> None:
    jsonl = load_splits(write_jsonl(tmp_path / "a.jsonl", ROWS))
    as_csv = load_splits(write_csv(tmp_path / "a.csv", ROWS))
    tsv = load_splits(write_csv(tmp_path / "a.tsv", ROWS, delimiter="\t"))
    for data in (jsonl, as_csv, tsv):
        assert data.task == "text-classification"
        assert data.splits == {"train": NORMALISED}
        assert data.labels == ("0", "1", "2")
        assert data.label_ids == {"0": 0, "1": 1, "2": 2}
        assert data.hashes == {"train": expected_hash(NORMALISED)}
    assert jsonl.sources == {"train": str((tmp_path / "a.jsonl").resolve())}
    # stable across runs
    assert load_splits(tmp_path / "a.csv").hashes == as_csv.hashes


def test_csv_with_quoted_fields_and_embedded_newlines(tmp_path: Path) -> None:
    rows = [
        {"text": 'she said "no",\nthen "yes"', "label": "pos"},
        {"text": "one, two\r\nthree", "label": "neg"},
        {"text": "plain", "label": "neg"},
    ]
    path = write_csv(tmp_path / "q.csv", rows)
    assert path.read_text().count("\n") > len(rows) + 1  # the newlines are inside fields
    data = load_splits(path)
    assert data.splits["train"] == rows
    assert data.labels == ("neg", "pos")
    # the same rows from JSON Lines hash alike
    assert load_splits(write_jsonl(tmp_path / "q.jsonl", rows)).hashes == data.hashes


def test_tsv_keeps_quotes_as_text(tmp_path: Path) -> None:
    path = tmp_path / "sst.tsv"
    path.write_text(
        'sentence\tlabel\n"quoted at the start\t1\nit \'s "fine" \t0\n', encoding="utf-8"
    )
    data = load_splits(path)
    assert data.splits["train"] == [
        {"text": '"quoted at the start', "label": "1"},
        {"text": 'it \'s "fine" ', "label": "0"},
    ]


def test_json_suffix_is_json_lines_and_a_bom_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "rows.json"
    path.write_bytes(b"\xef\xbb\xbf" + write_jsonl(tmp_path / "x.jsonl", ROWS).read_bytes())
    assert load_splits(path).splits["train"] == NORMALISED


def test_labels_sort_numbers_numerically_and_names_alphabetically() -> None:
    assert sort_labels(["10", "2", "1", "0"]) == ("0", "1", "2", "10")
    assert sort_labels(["pos", "neg", "neutral", "neg"]) == ("neg", "neutral", "pos")
    assert sort_labels(["b", "3", "-1", "a"]) == ("-1", "3", "a", "b")


def test_label_ids_follow_the_sorted_labels(tmp_path: Path) -> None:
    rows = [{"text": f"t{n}", "label": n} for n in (10, 2, 1, 2)]
    data = load_splits(write_jsonl(tmp_path / "t.jsonl", rows))
    assert data.labels == ("1", "2", "10")
    assert data.label_ids == {"1": 0, "2": 1, "10": 2}


@pytest.mark.parametrize(
    ("text", "label"),
    [("sentence", "label"), ("content", "class"), ("review", "target"), ("document", "category")],
)
def test_usual_column_names_are_recognised(tmp_path: Path, text: str, label: str) -> None:
    rows = [{"id": i, text: f"row {i}", label: i % 2} for i in range(4)]
    data = load_splits(write_csv(tmp_path / "c.csv", rows))
    assert data.splits["train"][1] == {"text": "row 1", "label": "1"}


def test_named_columns_win(tmp_path: Path) -> None:
    rows = [{"text": "ignored", "body": f"b{i}", "label": "x", "y": f"l{i % 2}"} for i in range(4)]
    data = load_splits(
        write_jsonl(tmp_path / "n.jsonl", rows), text_column="body", label_column="y"
    )
    assert data.splits["train"][0] == {"text": "b0", "label": "l0"}
    assert data.labels == ("l0", "l1")


def test_sft_rows(tmp_path: Path) -> None:
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    data = load_splits(write_jsonl(tmp_path / "s.jsonl", rows), task="sft")
    assert data.splits["train"][2] == {"prompt": "q2", "response": "a2"}
    assert data.labels == () and data.label_ids == {}
    named = [{"q": "x", "a": "y", "prompt": "no"}]
    data = load_splits(
        write_csv(tmp_path / "s.csv", named), task="sft", prompt_column="q", response_column="a"
    )
    assert data.splits["train"] == [{"prompt": "x", "response": "y"}]


def test_train_dev_test_from_files_and_inline(tmp_path: Path) -> None:
    inline = {
        "train": [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}],
        "dev": [{"sentence": "fine", "label": "pos"}],
    }
    test = write_csv(tmp_path / "test.csv", [{"text": "awful", "label": "neg"}])
    data = load_splits(test=test, inline=inline)
    assert data.sizes == {"train": 2, "dev": 1, "test": 1}
    assert data.splits["dev"] == [{"text": "fine", "label": "pos"}]
    assert data.sources["train"] == "inline" and data.sources["test"].endswith("test.csv")
    assert set(data.hashes) == {"train", "dev", "test"}
    # to_dict / from_dict round trip through JSON
    record = json.loads(json.dumps(data.to_dict()))
    assert Dataset.from_dict(record) == data
    assert "splits" not in data.summary() and data.summary()["sizes"] == data.sizes


def test_real_sst2_dev_loads() -> None:
    if not (SST2 / "dev.tsv").is_file():
        pytest.skip(f"{SST2} is not here (the shared data folder is optional)")
    rows = load_file(SST2 / "dev.tsv")
    assert len(rows) == 6735
    assert sort_labels(r["label"] for r in rows) == ("0", "1")
    assert all(r["text"].strip() for r in rows)
    data = load_splits(SST2 / "dev.tsv")
    assert data.labels == ("0", "1") and data.sizes == {"train": 6735}


# --------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------


def test_no_train_split(tmp_path: Path) -> None:
    dev = write_jsonl(tmp_path / "dev.jsonl", ROWS)
    assert "no train split" in usage_error(dev=dev)
    assert "no train split" in usage_error(inline={"dev": ROWS})


def test_empty_split(tmp_path: Path) -> None:
    header_only = tmp_path / "train.csv"
    header_only.write_text("text,label\n")
    assert usage_error(train=header_only) == f"{header_only}: no rows"
    blank = tmp_path / "train.jsonl"
    blank.write_text("\n\n")
    assert usage_error(train=blank) == f"{blank}: no rows"
    nothing = tmp_path / "nothing.tsv"
    nothing.write_text("")
    assert "empty file" in usage_error(train=nothing)
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    assert usage_error(train=train, inline={"dev": []}) == "inline dev: no rows"


def test_missing_column_lists_the_columns_and_the_flag(tmp_path: Path) -> None:
    path = write_csv(tmp_path / "m.csv", [{"words": "hi", "label": 1}])
    message = usage_error(train=path)
    assert str(path) in message
    assert "no text column" in message
    assert "columns found: words, label" in message
    assert "--text-column" in message
    message = usage_error(train=path, text_column="body")
    assert "no column 'body'" in message and "--text-column" in message
    assert "columns found: words, label" in message
    message = usage_error(train=path, task="sft")
    assert "no prompt column" in message and "--prompt-column" in message
    # a JSON Lines row without the column the first row had
    jsonl = tmp_path / "m.jsonl"
    jsonl.write_text('{"text": "a", "label": 0}\n{"text": "b"}\n')
    assert usage_error(train=jsonl) == f"{jsonl}, line 2: no 'label' field"


def test_a_dev_or_test_label_unseen_in_train(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "train.jsonl", ROWS[:2])
    dev = write_jsonl(tmp_path / "dev.jsonl", [ROWS[0], ROWS[2]])
    message = usage_error(train=train, dev=dev)
    assert message == f"{dev}, line 2: label '2' is not in the train split (its labels: 0, 1)"
    test = write_csv(tmp_path / "test.csv", [ROWS[0], ROWS[1], {"text": "x", "label": "maybe"}])
    assert f"{test}, line 4: label 'maybe'" in usage_error(train=train, test=test)
    message = usage_error(train=train, inline={"test": [{"text": "x", "label": 7}]})
    assert message.startswith("inline test, row 1: label '7' is not in the train split")


def test_a_train_split_with_one_label(tmp_path: Path) -> None:
    train = write_jsonl(tmp_path / "one.jsonl", [ROWS[0], ROWS[0]])
    assert "has one label, '1'" in usage_error(train=train)


def test_an_empty_text_names_the_line(tmp_path: Path) -> None:
    path = tmp_path / "e.csv"
    # the first row spans lines 2-3; the empty text is on line 4
    path.write_text('text,label\n"two\nlines",1\n"  ",0\n')
    assert usage_error(train=path) == f"{path}, line 4: empty text ('text')"
    jsonl = tmp_path / "e.jsonl"
    jsonl.write_text('{"text": "ok", "label": 1}\n\n{"text": "", "label": 0}\n')
    assert usage_error(train=jsonl) == f"{jsonl}, line 3: empty text ('text')"
    assert "row 2: empty response" in usage_error(
        inline={"train": [{"prompt": "p", "response": "r"}, {"prompt": "p", "response": ""}]},
        task="sft",
    )


def test_malformed_json_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "ok", "label": 1}\n{"text": "oops", "label": }\n')
    message = usage_error(train=path)
    assert message.startswith(f"{path}, line 2: malformed JSON (")
    array = tmp_path / "array.json"
    array.write_text('[{"text": "a",\n "label": 1}]\n')
    assert "one JSON object a line" in usage_error(train=array)
    scalar = tmp_path / "scalar.jsonl"
    scalar.write_text("[1, 2]\n")
    assert usage_error(train=scalar) == f"{scalar}, line 1: expected a JSON object, got list"


def test_a_csv_row_with_the_wrong_number_of_fields(tmp_path: Path) -> None:
    path = tmp_path / "tabs.tsv"
    path.write_text("sentence\tlabel\na\ttab\t1\n")
    assert usage_error(train=path) == (
        f"{path}, line 2: 3 fields, but the header has 2 (sentence, label)"
    )


@pytest.mark.parametrize(
    ("value", "kind"), [(True, "bool"), (1.5, "float"), (None, "NoneType"), ([1], "list")]
)
def test_labels_must_be_strings_or_integers(tmp_path: Path, value: Any, kind: str) -> None:
    path = write_jsonl(tmp_path / "l.jsonl", [ROWS[0], {"text": "x", "label": value}])
    message = usage_error(train=path)
    assert message.startswith(f"{path}, line 2: a label must be a string or an integer, got {kind}")


def test_a_missing_file_a_folder_and_an_unknown_type(tmp_path: Path) -> None:
    ghost = tmp_path / "ghost.csv"
    assert usage_error(train=ghost) == f"{ghost}: no such file"
    assert usage_error(train=tmp_path) == f"{tmp_path}: not a file"
    parquet = tmp_path / "data.parquet"
    parquet.write_bytes(b"PAR1")
    message = usage_error(train=parquet)
    assert message.startswith(f"{parquet}: unknown file type '.parquet'")
    assert ".jsonl" in message and ".csv" in message and ".tsv" in message
    train = write_jsonl(tmp_path / "ok.jsonl", ROWS)
    assert usage_error(train=train, dev=tmp_path / "nodev.jsonl").endswith(
        "nodev.jsonl: no such file"
    )


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "latin.csv"
    path.write_bytes("text,label\ncafé,1\n".encode("latin-1"))
    assert usage_error(train=path).startswith(f"{path}: not UTF-8 text")


def test_unknown_task_and_inline_shape(tmp_path: Path) -> None:
    assert "unknown task 'summarise'" in usage_error(inline={"train": ROWS}, task="summarise")
    assert "unknown inline split(s): validation" in usage_error(
        inline={"train": ROWS, "validation": ROWS}
    )
    assert "inline train must be a list" in usage_error(inline={"train": {"text": "a"}})
    assert "inline train, row 2: expected an object" in usage_error(inline={"train": [ROWS[0], 3]})
    train = write_jsonl(tmp_path / "t.jsonl", ROWS)
    assert "given both as a file and inline" in usage_error(train=train, inline={"train": ROWS})


def test_the_inline_body_cap(tmp_path: Path) -> None:
    rows = [{"text": "x" * 100, "label": i % 2} for i in range(100)]  # ~12 KB as JSON
    assert load_splits(inline={"train": rows}, max_inline_bytes=20_000).sizes == {"train": 100}
    with pytest.raises(PayloadTooLarge, match="over 10,000 bytes"):
        load_splits(inline={"train": rows}, max_inline_bytes=10_000)
    with pytest.raises(PayloadTooLarge, match="more than 150 rows"):
        load_splits(inline={"train": rows, "dev": rows}, max_rows=150)
    # the default cap is 10 MiB
    big = [{"text": "y" * 1024, "label": i % 2} for i in range(10 * 1024)]
    with pytest.raises(PayloadTooLarge, match="over 10,485,760 bytes"):
        load_splits(inline={"train": big})
    # max_rows counts file rows too, all splits together
    path = write_jsonl(tmp_path / "r.jsonl", rows)
    assert load_splits(path, max_rows=100).sizes == {"train": 100}
    with pytest.raises(PayloadTooLarge, match="more than 150 rows"):
        load_splits(path, dev=path, max_rows=150)


def test_rows_hash_is_order_sensitive_and_format_free() -> None:
    a = [{"text": "a", "label": "1"}, {"text": "b", "label": "0"}]
    assert rows_hash(a) == expected_hash(a)
    assert rows_hash(a) != rows_hash(a[::-1])
    assert rows_hash([{"label": "1", "text": "a"}]) == rows_hash(a[:1])
