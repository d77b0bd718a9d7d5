"""Scoring a classifier on labelled data: the metrics, and a model's answers scored.

* :func:`classification_report` is the arithmetic alone (accuracy, macro and
  per-label precision/recall/F1, the confusion matrix), a pure function;
* :func:`evaluate` runs a ``predict`` callable over rows in batches and
  reports on the answers, mapping the data's label names to the model's.

``llmos eval`` (:mod:`llmos.tuning.evaluate`), tuning jobs' scores and the
monitor's scheduled accuracy checks all score through these.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from llmos.errors import UsageError
from llmos.tuning.data import sort_labels

__all__ = ["DEFAULT_BATCH_SIZE", "classification_report", "evaluate"]

DEFAULT_BATCH_SIZE = 32


def classification_report(
    golds: Sequence[str], preds: Sequence[str], labels: Sequence[str] | None = None
) -> dict[str, Any]:
    """Accuracy, per-label and macro precision/recall/F1, and the confusion
    matrix of ``preds`` against ``golds``.

    The report covers ``labels`` in their order, then any other label seen in
    ``golds`` or ``preds``. A label never predicted has precision 0; one with
    no gold rows has recall 0. Macro averages are over the labels that occur
    in ``golds`` or ``preds`` (a label named in ``labels`` that occurs in
    neither is listed but does not count). ``confusion[i][j]`` counts rows
    whose gold label is ``labels[i]`` and whose prediction is ``labels[j]``.
    """
    if len(golds) != len(preds):
        raise ValueError(f"{len(golds)} gold labels but {len(preds)} predictions")
    if not golds:
        raise ValueError("no rows to score")
    order = list(dict.fromkeys(labels or ()))
    seen = set(order)
    order += [label for label in sort_labels({*golds, *preds}) if label not in seen]
    index = {label: i for i, label in enumerate(order)}

    confusion = [[0] * len(order) for _ in order]
    for gold, pred in zip(golds, preds, strict=True):
        confusion[index[gold]][index[pred]] += 1

    per_label: dict[str, dict[str, float | int]] = {}
    occurring: list[dict[str, float | int]] = []
    for i, label in enumerate(order):
        hits = confusion[i][i]
        support = sum(confusion[i])
        predicted = sum(row[i] for row in confusion)
        precision = hits / predicted if predicted else 0.0
        recall = hits / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        figures = {
            "precision": precision,
            "recall": recall,
            "f1": f1,
            "support": support,
            "predicted": predicted,
        }
        per_label[label] = figures
        if support or predicted:
            occurring.append(figures)

    def macro(key: str) -> float:
        return sum(float(f[key]) for f in occurring) / len(occurring)

    correct = sum(confusion[i][i] for i in range(len(order)))
    return {
        "rows": len(golds),
        "accuracy": correct / len(golds),
        "macro_precision": macro("precision"),
        "macro_recall": macro("recall"),
        "macro_f1": macro("f1"),
        "labels": order,
        "per_label": per_label,
        "confusion": confusion,
    }


def evaluate(
    predict: Callable[[Sequence[str]], Sequence[str]],
    rows: Sequence[Mapping[str, str]],
    *,
    mapping: Mapping[str, str] | None = None,
    zero_shot_labels: Sequence[str] = (),
    batch_size: int = DEFAULT_BATCH_SIZE,
    on_batch: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Predict the label of every ``{"text", "label"}`` row and report.

    ``predict`` takes a batch of texts and returns one label each.
    ``mapping`` renames data labels to the model's (``{"0": "negative"}``);
    unmapped labels keep their name. Predictions match label names ignoring
    case ("POSITIVE" counts as "positive") when that is unambiguous.
    ``zero_shot_labels`` are the labels the model chooses among, when it is
    asked to; every (mapped) data label must be one of them. ``on_batch``
    gets the number of rows each batch did.
    """
    if batch_size < 1:
        raise UsageError(f"the batch size must be 1 or more, got {batch_size}")
    mapping = dict(mapping or {})
    data_labels = sort_labels(row["label"] for row in rows)
    stray = [label for label in mapping if label not in data_labels]
    if stray:
        raise UsageError(
            f"--map {stray[0]}=…: the data has no label {stray[0]!r} "
            f"(its labels: {', '.join(data_labels)})"
        )
    golds = [mapping.get(row["label"], row["label"]) for row in rows]
    gold_labels = list(dict.fromkeys(mapping.get(label, label) for label in data_labels))

    if zero_shot_labels:
        folded = {label.casefold() for label in zero_shot_labels}
        missing = [label for label in gold_labels if label.casefold() not in folded]
        if missing:
            raise UsageError(
                f"data label {missing[0]!r} is not among the labels given "
                f"({', '.join(zero_shot_labels)}); map it with --map {missing[0]}=LABEL"
            )
        order = list(dict.fromkeys(zero_shot_labels))
    else:
        order = gold_labels

    # Name each gold and prediction by its spelling in `order`, ignoring case,
    # unless two labels there differ only by case.
    folded_names = {label.casefold(): label for label in order}
    if len(folded_names) < len(order):
        folded_names = {}

    def canonical(label: str) -> str:
        return folded_names.get(label.strip().casefold(), label)

    golds = [canonical(gold) for gold in golds]
    preds: list[str] = []
    for start in range(0, len(rows), batch_size):
        texts = [row["text"] for row in rows[start : start + batch_size]]
        answers = list(predict(texts))
        if len(answers) != len(texts):
            raise UsageError(f"the model answered {len(answers)} of a batch of {len(texts)}")
        preds.extend(canonical(str(answer)) for answer in answers)
        if on_batch is not None:
            on_batch(len(texts))
    report = classification_report(golds, preds, order)
    # Predictions outside the data's (and the zero-shot) labels: most often
    # labels the data names otherwise, which --map fixes.
    known = {*order, *golds}
    report["unknown_predictions"] = [label for label in report["labels"] if label not in known]
    return report
