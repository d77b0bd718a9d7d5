"""``llmos eval`` and its metrics: hand-computed figures, label mapping, and
the command end to end, in-process and against a daemon."""

from __future__ import annotations

import csv
import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.config import load_config
from llmos.errors import UsageError
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread, write_distribution
from llmos.tuning.data import load_file, rows_hash
from llmos.tuning.evaluate import parse_mapping
from llmos.tuning.evaluation import classification_report, evaluate

from .conftest import LLMOS

# --------------------------------------------------------------------------
# classification_report
# --------------------------------------------------------------------------


def test_three_classes_by_hand() -> None:
    golds = ["cat"] * 4 + ["dog"] * 2 + ["fish"] * 3
    preds = [*("cat", "cat", "cat", "dog"), *("dog", "cat"), *("fish", "cat", "dog")]
    report = classification_report(golds, preds, ["cat", "dog", "fish"])
    # rows gold, columns predicted
    assert report["confusion"] == [[3, 1, 0], [1, 1, 0], [1, 1, 1]]
    assert report["labels"] == ["cat", "dog", "fish"]
    assert report["rows"] == 9
    assert report["accuracy"] == pytest.approx(5 / 9)
    cat, dog, fish = (report["per_label"][k] for k in ("cat", "dog", "fish"))
    # cat: 3 right of 5 predicted, of 4 gold
    assert (cat["precision"], cat["recall"], cat["f1"]) == pytest.approx((3 / 5, 3 / 4, 2 / 3))
    assert (cat["support"], cat["predicted"]) == (4, 5)
    # dog: 1 right of 3 predicted, of 2 gold: F1 = 2·(1/3)(1/2)/(5/6) = 0.4
    assert (dog["precision"], dog["recall"], dog["f1"]) == pytest.approx((1 / 3, 1 / 2, 0.4))
    # fish: 1 right of 1 predicted, of 3 gold: F1 = 2·1·(1/3)/(4/3) = 0.5
    assert (fish["precision"], fish["recall"], fish["f1"]) == pytest.approx((1.0, 1 / 3, 0.5))
    assert report["macro_precision"] == pytest.approx((3 / 5 + 1 / 3 + 1) / 3)
    assert report["macro_recall"] == pytest.approx((3 / 4 + 1 / 2 + 1 / 3) / 3)
    assert report["macro_f1"] == pytest.approx((2 / 3 + 0.4 + 0.5) / 3)


def test_labels_outside_the_list_and_labels_that_never_occur() -> None:
    # "bird" is predicted but never gold; "eel" is listed but occurs nowhere
    report = classification_report(["a", "a", "b"], ["a", "bird", "b"], ["eel", "b", "a"])
    assert report["labels"] == ["eel", "b", "a", "bird"]
    assert report["confusion"] == [[0, 0, 0, 0], [0, 1, 0, 0], [0, 0, 1, 1], [0, 0, 0, 0]]
    assert report["per_label"]["bird"] == {
        "precision": 0.0,
        "recall": 0.0,
        "f1": 0.0,
        "support": 0,
        "predicted": 1,
    }
    assert report["per_label"]["eel"]["f1"] == 0.0
    # macro over b (1.0), a (P 1, R 1/2, F1 2/3) and bird (0); eel does not count
    assert report["macro_f1"] == pytest.approx((1 + 2 / 3 + 0) / 3)
    assert report["accuracy"] == pytest.approx(2 / 3)
    # no list: the labels seen, numbers numerically
    assert classification_report(["10", "2"], ["2", "2"])["labels"] == ["2", "10"]


def test_report_arguments_are_checked() -> None:
    with pytest.raises(ValueError, match="2 gold labels but 1 predictions"):
        classification_report(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="no rows"):
        classification_report([], [])


# --------------------------------------------------------------------------
# evaluate and the label mapping
# --------------------------------------------------------------------------

ROWS = [
    {"text": "a good film", "label": "1"},
    {"text": "good fun", "label": "1"},
    {"text": "not good at all", "label": "0"},
    {"text": "bad", "label": "0"},
    {"text": "dull", "label": "0"},
]


def judge(texts: list[str]) -> list[str]:
    return ["POSITIVE" if "good" in t else "NEGATIVE" for t in texts]


def test_evaluate_batches_maps_labels_and_matches_case() -> None:
    batches: list[int] = []
    calls: list[list[str]] = []

    def predict(texts: list[str]) -> list[str]:
        calls.append(list(texts))
        return judge(texts)

    report = evaluate(
        predict,
        ROWS,
        mapping={"0": "negative", "1": "positive"},
        batch_size=2,
        on_batch=batches.append,
    )
    assert [len(c) for c in calls] == [2, 2, 1] and batches == [2, 2, 1]
    assert [text for call in calls for text in call] == [r["text"] for r in ROWS]
    assert report["labels"] == ["negative", "positive"]
    assert report["confusion"] == [[2, 1], [0, 2]]
    assert report["accuracy"] == pytest.approx(4 / 5)

    # without the mapping nothing matches: the model's labels are extra columns
    unmapped = evaluate(judge, ROWS)
    assert unmapped["labels"] == ["0", "1", "NEGATIVE", "POSITIVE"]
    assert unmapped["accuracy"] == 0.0
    assert unmapped["unknown_predictions"] == ["NEGATIVE", "POSITIVE"]
    assert report["unknown_predictions"] == []


def test_zero_shot_labels_must_cover_the_data() -> None:
    report = evaluate(
        lambda texts: ["Pos" if "good" in t else "neg" for t in texts],
        ROWS,
        mapping={"0": "neg", "1": "pos"},
        zero_shot_labels=("neg", "pos"),
    )
    assert report["labels"] == ["neg", "pos"] and report["confusion"] == [[2, 1], [0, 2]]
    with pytest.raises(UsageError, match=r"data label '1' is not among the labels given \(neg\)"):
        evaluate(judge, ROWS, mapping={"0": "neg"}, zero_shot_labels=("neg",))


def test_mapping_errors() -> None:
    assert parse_mapping(["0=negative", " 1 = positive "]) == {"0": "negative", "1": "positive"}
    for bad in ("0", "=x", "0="):
        with pytest.raises(UsageError, match="write DATA_LABEL=MODEL_LABEL"):
            parse_mapping([bad])
    with pytest.raises(UsageError, match="mapped twice"):
        parse_mapping(["0=a", "0=b"])
    with pytest.raises(UsageError, match=r"the data has no label '7' \(its labels: 0, 1\)"):
        evaluate(judge, ROWS, mapping={"7": "x"})


def test_labels_differing_only_by_case_are_not_folded() -> None:
    rows = [{"text": "x", "label": "A"}, {"text": "y", "label": "a"}]
    report = evaluate(lambda texts: ["a", "a"], rows)
    assert report["confusion"] == [[0, 1], [0, 1]]


# --------------------------------------------------------------------------
# llmos eval, end to end
# --------------------------------------------------------------------------

JUDGE = """
from llmos.plugin import hookimpl
from llmos.types import Capability, ClassifyResult, ModelBase, ProviderSpec


class Judge(ModelBase):
    # "good" in the text: positive. Its own labels are NEGATIVE/POSITIVE;
    # asked zero-shot, it answers the second label given for positive.
    capabilities = frozenset({Capability.CLASSIFY})

    def classify(self, requests):
        out = []
        for r in requests:
            neg, pos = r.labels or ("NEGATIVE", "POSITIVE")
            good = "good" in r.text
            out.append(ClassifyResult(scores={pos: 0.8 if good else 0.2,
                                              neg: 0.2 if good else 0.8}))
        return out


class Mute(ModelBase):
    capabilities = frozenset({Capability.COMPLETE})


@hookimpl
def llmos_register_providers(register):
    register(ProviderSpec(name="judge", load=lambda request: Judge(request.card)))
    register(ProviderSpec(name="mute", load=lambda request: Mute(request.card)))
"""

DEPLOY = ("--set", 'models.j.provider="judge"', "--set", 'models.m.provider="mute"')

#: gold 1 = positive; the judge gets "not good at all" and "awful plot" wrong
DATA = [
    ("a good film", 1),
    ('good, "really"\nfun', 1),
    ("not good at all", 0),
    ("bad", 0),
    ("dull", 0),
    ("awful plot", 1),
]


@pytest.fixture
def judge_env(env: dict[str, str]) -> dict[str, str]:
    write_distribution(Path(env["PYTHONPATH"]), "llmos-judge", JUDGE)
    return env


@pytest.fixture
def data_csv(tmp_path: Path) -> Path:
    path = tmp_path / "reviews.csv"
    with path.open("w", newline="") as stream:
        writer = csv.writer(stream)
        writer.writerow(["review", "label"])
        writer.writerows(DATA)
    return path


@pytest.fixture
def daemon_url(judge_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.syspath_prepend(judge_env["PYTHONPATH"])
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": judge_env["LLMOS_HOME"] + "-daemon", "LLMOS_LOAD_PLUGINS": ""},
            overrides=['models.j.provider="judge"', 'models.m.provider="mute"'],
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(importlib.import_module("llmos_judge"), "llmos-judge")
    try:
        with serve_in_thread(kernel) as url:
            yield url
    finally:
        sys.modules.pop("llmos_judge", None)


def run_eval(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    assert LLMOS, "the llmos console script is not installed (make install)"
    return subprocess.run(
        [LLMOS, *DEPLOY, "eval", *args], env=env, capture_output=True, text=True, timeout=60
    )


@pytest.mark.parametrize("remote", [False, True], ids=["in-process", "daemon"])
def test_eval_json(judge_env: dict[str, str], data_csv: Path, remote: bool, request) -> None:
    where = ("--url", request.getfixturevalue("daemon_url")) if remote else ()
    done = run_eval(
        judge_env, "j", "--data", str(data_csv), "--map", "0=negative", "--map", "1=positive",
        "--batch-size", "4", "--json", *where,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert isinstance(result.pop("seconds"), float)
    assert result == {
        "model": "j",
        "data": {
            "path": str(data_csv),
            "rows": 6,
            "sha256": rows_hash(load_file(data_csv)),
        },
        "mapping": {"0": "negative", "1": "positive"},
        "zero_shot_labels": [],
        "rows": 6,
        "accuracy": pytest.approx(4 / 6),
        "macro_precision": pytest.approx(2 / 3),
        "macro_recall": pytest.approx(2 / 3),
        "macro_f1": pytest.approx(2 / 3),
        "labels": ["negative", "positive"],
        "per_label": {
            label: {
                "precision": pytest.approx(2 / 3),
                "recall": pytest.approx(2 / 3),
                "f1": pytest.approx(2 / 3),
                "support": 3,
                "predicted": 3,
            }
            for label in ("negative", "positive")
        },
        "confusion": [[2, 1], [1, 2]],
        "unknown_predictions": [],
    }


def test_eval_zero_shot_labels_reach_the_model(judge_env: dict[str, str], data_csv: Path) -> None:
    done = run_eval(
        judge_env, "j", "--data", str(data_csv), "--labels", "bad,fine",
        "--map", "0=bad", "--map", "1=fine", "--json",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["zero_shot_labels"] == ["bad", "fine"]
    assert result["labels"] == ["bad", "fine"]
    assert result["confusion"] == [[2, 1], [1, 2]]


def test_eval_prints_tables_for_people(judge_env: dict[str, str], data_csv: Path) -> None:
    done = run_eval(
        judge_env, "j", "--data", str(data_csv), "--map", "0=negative", "--map", "1=positive"
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert f"j on {data_csv}: 6 rows" in out
    assert "data labels mapped: 0 → negative, 1 → positive" in out
    assert "accuracy 0.6667   macro-F1 0.6667" in out
    assert "confusion (rows: gold, columns: predicted)" in out
    lines = out.splitlines()
    # per-label rows: label, precision, recall, F1, support, predicted
    assert any(line.split("│")[1:-1] and "negative" in line and "0.6667" in line for line in lines)
    matrix = [line for line in lines if line.startswith("│ positive") and "0.6667" not in line]
    assert [cell.strip() for cell in matrix[0].strip("│").split("│")] == ["positive", "1", "2"]
    # without a terminal there is no progress bar on stderr
    assert done.stderr == ""


def test_eval_errors_are_one_line(judge_env: dict[str, str], data_csv: Path) -> None:
    def one_line(done: subprocess.CompletedProcess[str]) -> str:
        assert done.returncode != 0
        assert done.stdout == ""
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1, done.stderr
        return lines[0]

    # a model that cannot classify
    line = one_line(run_eval(judge_env, "m", "--data", str(data_csv)))
    assert line.startswith("error:") and "classify" in line
    # a data file that is not there
    ghost = data_csv.with_name("ghost.csv")
    done = run_eval(judge_env, "j", "--data", str(ghost))
    assert one_line(done) == f"error: {ghost}: no such file" and done.returncode == 2
    # a data label the zero-shot labels leave out
    done = run_eval(judge_env, "j", "--data", str(data_csv), "--labels", "a,b", "--map", "0=a")
    assert "data label '1' is not among the labels given (a, b)" in one_line(done)
    # a batch larger than the model's whole queue (runtime.max_queue, 64)
    many = data_csv.with_name("many.jsonl")
    many.write_text("".join(f'{{"text": "t{i}", "label": {i % 2}}}\n' for i in range(100)))
    done = run_eval(judge_env, "j", "--data", str(many), "--batch-size", "100")
    line = one_line(done)
    assert "queues at most 64" in line and "smaller batches" in line and done.returncode == 2
    # an unknown model
    assert "'ghost' not found" in one_line(run_eval(judge_env, "ghost", "--data", str(data_csv)))


def test_eval_notes_labels_the_data_lacks(judge_env: dict[str, str], data_csv: Path) -> None:
    done = run_eval(judge_env, "j", "--data", str(data_csv), "--json")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)["unknown_predictions"] == ["NEGATIVE", "POSITIVE"]
    assert done.stderr.strip() == (
        "note: the model answered labels the data does not have (NEGATIVE, POSITIVE); "
        "name the data's labels as the model does with --map DATA=MODEL"
    )
