"""Classification scores: accuracy and macro-averaged F1 (pure Python)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["accuracy", "macro_f1"]


def accuracy(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """The share of rows predicted right (0 for no rows)."""
    if not gold:
        return 0.0
    return sum(g == p for g, p in zip(gold, predicted, strict=True)) / len(gold)


def macro_f1(gold: Sequence[int], predicted: Sequence[int]) -> float:
    """F1 averaged over the classes that occur in ``gold`` or ``predicted``
    (scikit-learn's default): a class never seen and never guessed does not
    count, one guessed but never right counts as 0."""
    classes = sorted(set(gold) | set(predicted))
    if not classes:
        return 0.0
    total = 0.0
    for c in classes:
        tp = sum(g == c and p == c for g, p in zip(gold, predicted, strict=True))
        fp = sum(g != c and p == c for g, p in zip(gold, predicted, strict=True))
        fn = sum(g == c and p != c for g, p in zip(gold, predicted, strict=True))
        total += 2 * tp / (2 * tp + fp + fn) if tp else 0.0
    return total / len(classes)
