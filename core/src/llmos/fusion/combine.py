"""The pure arithmetic of model fusion for text classification.

Nothing here calls a model: the functions take what members answered and
return combined probabilities, learnt weights, cascade thresholds or routing
centroids. Standard library only, and deterministic (no randomness at all).

Conventions shared by every function:

* A member's *output* for one row is a mapping ``label -> probability``
  (summing to about 1), or ``None`` when that member was not called for the
  row (a budget or a cascade stopped before it). An output that is present
  must be non-empty, with finite non-negative values.
* When several outputs are combined, the label set is their union in order of
  first appearance (member order, then each mapping's own order); a label a
  member did not mention counts as probability 0 for that member.
* Members are indexed by their position; where order means strength (cascade,
  router) they are listed from the cheapest to the strongest.
* Bad input raises :class:`llmos.errors.UsageError` with a message that says
  what to change.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from itertools import repeat
from operator import add, mul, sub, truediv
from typing import Any

from llmos.errors import UsageError

__all__ = [
    "EXACT_LIMIT",
    "accuracy",
    "calibrate_cascade",
    "cascade_answer",
    "fit_centroids",
    "fit_logistic",
    "fit_weights",
    "labels_of",
    "mean",
    "nearest",
    "normalise",
    "predict_logistic",
    "route_targets",
    "vote",
    "vote_winner",
]

#: :func:`calibrate_cascade` searches every threshold combination exactly when
#: the product of the candidate counts is at most this; above it, greedily.
EXACT_LIMIT = 200_000

#: probabilities are clipped at this before a logarithm
_CLIP = 1e-9
#: relative and absolute tolerance when two sums of floats count as a tie
_TIE = 1e-12
#: at most this many sweeps over the stages in the greedy cascade search
_GREEDY_PASSES = 100


# --------------------------------------------------------------------------- checks


def _number(value: object, where: str) -> float:
    """``value`` as a finite float, else a UsageError naming ``where``."""
    if isinstance(value, bool):
        raise UsageError(f"{where}: expected a number, got {value!r}")
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise UsageError(f"{where}: expected a number, got {value!r}") from None
    if not math.isfinite(number):
        raise UsageError(f"{where}: {value!r} is not finite; pass a real number")
    return number


def _probability(value: object, where: str) -> float:
    number = _number(value, where)
    if number < 0:
        raise UsageError(f"{where}: {number!r} is negative; probabilities must be >= 0")
    return number


def _check_output(output: object, where: str) -> Mapping[str, float]:
    """A present member output: a non-empty mapping str -> finite value >= 0."""
    if not isinstance(output, Mapping):
        raise UsageError(
            f"{where}: expected a mapping label -> probability (or None for a member "
            f"that was not called), got {type(output).__name__}"
        )
    if not output:
        raise UsageError(
            f"{where}: the output is empty; pass None for a member that was not called"
        )
    for label, value in output.items():
        if not isinstance(label, str):
            raise UsageError(f"{where}: labels must be strings, got {label!r}")
        _probability(value, f"{where}, label {label!r}")
    return output


def _sequence(value: object, what: str, *, empty_ok: bool = False) -> Sequence[Any]:
    if not isinstance(value, Sequence) or isinstance(value, str | bytes):
        raise UsageError(f"{what}: expected a list, got {type(value).__name__}")
    if not value and not empty_ok:
        raise UsageError(f"{what}: the list is empty; pass at least one item")
    return value


def _weights(weights: Sequence[float] | None, count: int, what: str) -> list[float]:
    """Validated weights, one per member (all 1.0 when ``weights`` is None)."""
    if weights is None:
        return [1.0] * count
    _sequence(weights, f"{what}: weights", empty_ok=True)
    if len(weights) != count:
        raise UsageError(
            f"{what}: {len(weights)} weights for {count} members; pass one weight per member"
        )
    result = []
    for m, weight in enumerate(weights):
        number = _number(weight, f"{what}: weight of member {m}")
        if number < 0:
            raise UsageError(f"{what}: weight of member {m} is {number!r}; weights must be >= 0")
        result.append(number)
    return result


def _present(
    outputs: Sequence[Mapping[str, float] | None], weights: Sequence[float] | None, what: str
) -> list[tuple[float, Mapping[str, float]]]:
    """(weight, output) of every member that answered; at least one, weights not all 0."""
    _sequence(outputs, f"{what}: outputs")
    checked = _weights(weights, len(outputs), what)
    present = [
        (checked[m], _check_output(output, f"{what}: output of member {m}"))
        for m, output in enumerate(outputs)
        if output is not None
    ]
    if not present:
        raise UsageError(f"{what}: every member's output is None; at least one must be called")
    if sum(weight for weight, _ in present) <= 0:
        raise UsageError(
            f"{what}: the members that answered all have weight 0; "
            "give at least one of them a positive weight"
        )
    return present


def _same_rows(what: str, tables: Mapping[str, Sequence[Any]]) -> int:
    """The number of dev rows, checked: every member's row of every table
    (``{name: table[member][row]}``) has as many rows as member 0's first."""
    first_name, first = next(iter(tables.items()))
    n = len(_sequence(first[0], f"{what}: {first_name} of member 0"))
    for m in range(len(first)):
        for name, table in tables.items():
            values = _sequence(table[m], f"{what}: {name} of member {m}")
            if len(values) != n:
                raise UsageError(
                    f"{what}: {name} of member {m} has {len(values)} rows, "
                    f"member 0 has {n}; give every member the same dev rows"
                )
    return n


def _check_members(count: int, what: str) -> None:
    if count < 2:
        raise UsageError(f"{what} needs at least 2 members, got {count}; add another member")


def _close(a: float, b: float) -> bool:
    return math.isclose(a, b, rel_tol=_TIE, abs_tol=_TIE)


def _softmax(values: Sequence[float]) -> list[float]:
    top = max(values)
    exps = [math.exp(v - top) for v in values]
    total = sum(exps)
    return [e / total for e in exps]


# --------------------------------------------------------------------------- combining


def normalise(scores: Mapping[str, float]) -> dict[str, float]:
    """``scores`` divided by their sum, so that they sum to 1.

    Scores must be finite and non-negative; when they are all zero every label
    gets the same share (``1 / len(scores)``). Label order is kept.
    """
    _check_output(scores, "normalise")
    values = {label: float(value) for label, value in scores.items()}
    top = max(values.values())
    if top == 0:
        return dict.fromkeys(values, 1.0 / len(values))
    # dividing by the largest first keeps a sum of huge values finite
    scaled = {label: value / top for label, value in values.items()}
    total = sum(scaled.values())
    return {label: value / total for label, value in scaled.items()}


def labels_of(outputs: Sequence[Mapping[str, float] | None]) -> list[str]:
    """The union of the outputs' labels in order of first appearance.

    Members are read in order and each mapping in its own order; ``None``
    outputs are skipped. No output at all gives ``[]``.
    """
    _sequence(outputs, "labels_of: outputs", empty_ok=True)
    seen: dict[str, None] = {}
    for m, output in enumerate(outputs):
        if output is None:
            continue
        if not isinstance(output, Mapping):
            raise UsageError(
                f"labels_of: output of member {m} is a {type(output).__name__}; "
                "expected a mapping label -> probability or None"
            )
        for label in output:
            seen.setdefault(label, None)
    return list(seen)


def mean(
    outputs: Sequence[Mapping[str, float] | None], weights: Sequence[float] | None = None
) -> dict[str, float]:
    """Weighted average of the members' probabilities, label by label.

    ``result[label] = sum(w_m * p_m[label]) / sum(w_m)`` over the members that
    answered: ``None`` outputs are skipped and the weights of the members
    present are renormalised to sum to 1. A label missing from a member counts
    as 0 for it. The result has every label of :func:`labels_of`, in that order.
    ``weights`` defaults to 1 each; at least one member must be present with a
    positive weight.
    """
    present = _present(outputs, weights, "mean")
    result = dict.fromkeys(labels_of(outputs), 0.0)
    for weight, output in present:
        for label, value in output.items():
            result[label] += weight * float(value)
    total = sum(weight for weight, _ in present)
    return {label: value / total for label, value in result.items()}


def _argmax(output: Mapping[str, float]) -> str:
    """The most probable label of one output; a tie goes to the first in its order."""
    best_label, best = "", -math.inf
    for label, value in output.items():
        if float(value) > best:
            best_label, best = label, float(value)
    return best_label


def _tally(
    outputs: Sequence[Mapping[str, float] | None], weights: Sequence[float] | None, what: str
) -> tuple[dict[str, float], float]:
    """Vote weight per label (every label of labels_of) and the total vote weight."""
    present = _present(outputs, weights, what)
    tally = dict.fromkeys(labels_of(outputs), 0.0)
    for weight, output in present:
        tally[_argmax(output)] += weight
    return tally, sum(weight for weight, _ in present)


def vote(
    outputs: Sequence[Mapping[str, float] | None], weights: Sequence[float] | None = None
) -> dict[str, float]:
    """Weighted majority vote, as each label's share of the vote weight.

    Every member that answered votes for its most probable label (a tie inside
    one output goes to the label that comes first in that output) with its
    weight (default 1). The result maps every label of :func:`labels_of` to
    ``votes / total vote weight`` (labels nobody voted for get 0.0), so it sums
    to 1. Shares can tie: use :func:`vote_winner` for the final label.
    """
    tally, total = _tally(outputs, weights, "vote")
    return {label: votes / total for label, votes in tally.items()}


def vote_winner(
    outputs: Sequence[Mapping[str, float] | None], weights: Sequence[float] | None = None
) -> str:
    """The label with the most vote weight (see :func:`vote`).

    A tie between labels goes to the one with the higher :func:`mean`
    probability (same weights), and a tie there to the label that comes first
    in :func:`labels_of` order.
    """
    tally, _ = _tally(outputs, weights, "vote_winner")
    top = max(tally.values())
    tied = [label for label, votes in tally.items() if _close(votes, top)]
    if len(tied) == 1:
        return tied[0]
    average = mean(outputs, weights)
    best = max(average[label] for label in tied)
    return next(label for label in tied if _close(average[label], best))


def accuracy(predicted: Sequence[str], gold: Sequence[str]) -> float:
    """Share of rows whose predicted label equals the gold label."""
    _sequence(predicted, "accuracy: predicted")
    _sequence(gold, "accuracy: gold")
    if len(predicted) != len(gold):
        raise UsageError(
            f"accuracy: {len(predicted)} predictions for {len(gold)} gold labels; "
            "pass one prediction per row"
        )
    return sum(p == g for p, g in zip(predicted, gold, strict=True)) / len(gold)


# --------------------------------------------------------------------------- learnt weights


def _check_rows(
    rows: Sequence[Sequence[Mapping[str, float] | None]],
    gold: Sequence[str],
    what: str,
    *,
    allow_none: bool,
) -> tuple[int, int]:
    """(rows, members) of a dev set: one output per member per row, one gold label per row."""
    _sequence(rows, f"{what}: rows")
    _sequence(gold, f"{what}: gold")
    if len(rows) != len(gold):
        raise UsageError(
            f"{what}: {len(rows)} rows for {len(gold)} gold labels; pass one gold label per row"
        )
    members = len(_sequence(rows[0], f"{what}: row 0"))
    for i, row in enumerate(rows):
        _sequence(row, f"{what}: row {i}")
        if len(row) != members:
            raise UsageError(
                f"{what}: row {i} has {len(row)} outputs, row 0 has {members}; "
                "give every row one output per member, in the same member order"
            )
        if not isinstance(gold[i], str):
            raise UsageError(f"{what}: gold label of row {i} is {gold[i]!r}; expected a string")
        for m, output in enumerate(row):
            if output is None:
                if not allow_none:
                    raise UsageError(
                        f"{what}: member {m} has no output on row {i}; "
                        "call every member on every dev row"
                    )
                continue
            _check_output(output, f"{what}: row {i}, member {m}")
    return len(rows), members


def _check_steps(steps: int, learning_rate: float, what: str) -> None:
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise UsageError(f"{what}: steps must be an integer >= 0, got {steps!r}")
    if _number(learning_rate, f"{what}: learning_rate") <= 0:
        raise UsageError(f"{what}: learning_rate must be > 0, got {learning_rate!r}")


def fit_weights(
    rows: Sequence[Sequence[Mapping[str, float]]],
    gold: Sequence[str],
    *,
    steps: int = 300,
    learning_rate: float = 0.5,
) -> list[float]:
    """Member weights for :func:`mean` that fit a dev set best.

    ``rows[i][m]`` is member ``m``'s output on dev row ``i`` (every member
    present) and ``gold[i]`` its right label. The weights maximise the mean
    log-likelihood of the gold labels under the mixture,
    ``L(w) = mean_i log(max(sum_m w_m * p_im, 1e-9))`` with
    ``p_im = rows[i][m].get(gold[i], 0)``, over non-negative weights that sum
    to 1. They are parameterised as ``w = softmax(z)``; ``z`` starts at 0
    (uniform weights) and takes ``steps`` full-batch gradient-ascent steps of
    size ``learning_rate`` along the exact gradient
    ``dL/dz_k = w_k * (g_k - sum_m w_m g_m)``, ``g_m = mean_i p_im / p_i``
    (0 where the clip holds). Deterministic; the result sums to 1.

    Every gold label must appear in some member's output (else the label names
    do not match). Needs at least 2 members.
    """
    n, members = _check_rows(rows, gold, "fit_weights", allow_none=False)
    _check_members(members, "fit_weights")
    _check_steps(steps, learning_rate, "fit_weights")
    known = set(labels_of([output for row in rows for output in row]))
    for i, label in enumerate(gold):
        if label not in known:
            raise UsageError(
                f"fit_weights: gold label {label!r} of row {i} is in no member's output; "
                "check that the gold labels and the members' labels are spelt alike"
            )
    # p[m][i]: member m's probability of the gold label on row i
    p = [[float(row[m].get(gold[i], 0.0)) for i, row in enumerate(rows)] for m in range(members)]
    z = [0.0] * members
    for _ in range(steps):
        w = _softmax(z)
        mixture = [0.0] * n
        for m in range(members):
            mixture = list(map(add, mixture, map(mul, p[m], repeat(w[m]))))
        inverse = [1.0 / x if x > _CLIP else 0.0 for x in mixture]
        g = [sum(map(mul, p[m], inverse)) / n for m in range(members)]
        average = sum(wm * gm for wm, gm in zip(w, g, strict=True))
        z = [zk + learning_rate * wk * (gk - average) for zk, wk, gk in zip(z, w, g, strict=True)]
    weights = _softmax(z)
    total = sum(weights)
    return [weight / total for weight in weights]


def fit_logistic(
    rows: Sequence[Sequence[Mapping[str, float] | None]],
    gold: Sequence[str],
    *,
    labels: Sequence[str] | None = None,
    l2: float = 1e-3,
    steps: int = 500,
    learning_rate: float = 0.5,
) -> dict[str, Any]:
    """Logistic stacking: a multinomial logistic regression on the members' outputs.

    A row's features are, member after member, that member's probabilities of
    ``labels`` in order (``members * len(labels)`` features; a ``None`` output
    contributes zeros, and labels outside ``labels`` are ignored), and each
    label has a bias. ``labels`` defaults to :func:`labels_of` over every
    row's outputs (row by row) followed by any gold label not seen there;
    given explicitly, every gold label must be in it.

    Training: weights and biases start at 0; ``steps`` full-batch
    gradient-descent steps of size ``learning_rate`` on the mean
    cross-entropy of the gold labels under ``softmax(W x + b)`` plus
    ``l2 / 2 * ||W||^2`` (biases are not regularised). Deterministic.

    Returns a JSON-serialisable model for :func:`predict_logistic`:
    ``{"labels": [...], "members": M, "weights": [[...] per label], "bias": [...]}``.
    """
    n, members = _check_rows(rows, gold, "fit_logistic", allow_none=True)
    _check_steps(steps, learning_rate, "fit_logistic")
    if _number(l2, "fit_logistic: l2") < 0:
        raise UsageError(f"fit_logistic: l2 must be >= 0, got {l2!r}")
    if labels is None:
        names = labels_of([output for row in rows for output in row])
        names += [label for label in dict.fromkeys(gold) if label not in set(names)]
    else:
        names = list(_sequence(labels, "fit_logistic: labels"))
        if not all(isinstance(label, str) for label in names):
            raise UsageError("fit_logistic: labels must be strings")
        if len(set(names)) != len(names):
            raise UsageError("fit_logistic: labels has duplicates; list each label once")
        for i, label in enumerate(gold):
            if label not in set(names):
                raise UsageError(
                    f"fit_logistic: gold label {label!r} of row {i} is not in labels; "
                    "add it to labels or fix the gold label"
                )
    k_count = len(names)
    width = members * k_count
    index = {label: k for k, label in enumerate(names)}
    # column-wise features: columns[j][i] is feature j of row i
    columns = [[0.0] * n for _ in range(width)]
    for i, row in enumerate(rows):
        for m, output in enumerate(row):
            if output is None:
                continue
            for label, value in output.items():
                k = index.get(label)
                if k is not None:
                    columns[m * k_count + k][i] = float(value)
    targets = [[1.0 if label == name else 0.0 for label in gold] for name in names]
    # a feature that is 0 on every row never moves its weight off 0
    active = [j for j in range(width) if any(columns[j])]
    weights = [[0.0] * width for _ in range(k_count)]
    bias = [0.0] * k_count
    for _ in range(steps):
        logits = []
        for k in range(k_count):
            row_k = weights[k]
            scores = [bias[k]] * n
            for j in active:
                if row_k[j]:
                    scores = list(map(add, scores, map(mul, columns[j], repeat(row_k[j]))))
            logits.append(scores)
        if k_count == 1:
            probabilities = [[1.0] * n]
        else:
            top = list(map(max, *logits))
            exps = [list(map(math.exp, map(sub, scores, top))) for scores in logits]
            total = exps[0]
            for e in exps[1:]:
                total = list(map(add, total, e))
            probabilities = [list(map(truediv, e, total)) for e in exps]
        for k in range(k_count):
            residual = list(map(sub, probabilities[k], targets[k]))
            row_k = weights[k]
            for j in active:
                gradient = sum(map(mul, residual, columns[j])) / n + l2 * row_k[j]
                row_k[j] -= learning_rate * gradient
            bias[k] -= learning_rate * sum(residual) / n
    return {"labels": names, "members": members, "weights": weights, "bias": bias}


def _check_model(model: Mapping[str, Any]) -> tuple[list[str], int, list[list[float]], list[float]]:
    hint = "pass the model fit_logistic returned"
    if not isinstance(model, Mapping) or not {"labels", "members", "weights", "bias"} <= set(model):
        raise UsageError(f"predict_logistic: not a logistic model; {hint}")
    labels, members = model["labels"], model["members"]
    if (
        not isinstance(labels, Sequence)
        or isinstance(labels, str)
        or not labels
        or not all(isinstance(label, str) for label in labels)
        or isinstance(members, bool)
        or not isinstance(members, int)
        or members < 1
    ):
        raise UsageError(f"predict_logistic: the model's labels or members are malformed; {hint}")
    width = members * len(labels)
    weights, bias = model["weights"], model["bias"]
    if (
        not isinstance(weights, Sequence)
        or len(weights) != len(labels)
        or not all(isinstance(row, Sequence) and len(row) == width for row in weights)
        or not isinstance(bias, Sequence)
        or len(bias) != len(labels)
    ):
        raise UsageError(
            f"predict_logistic: the model's weights or bias have the wrong shape; {hint}"
        )
    matrix = [[_number(v, "predict_logistic: model weight") for v in row] for row in weights]
    offsets = [_number(v, "predict_logistic: model bias") for v in bias]
    return list(labels), members, matrix, offsets


def predict_logistic(
    model: Mapping[str, Any], outputs: Sequence[Mapping[str, float] | None]
) -> dict[str, float]:
    """Probabilities of the model's labels for one row, from a :func:`fit_logistic` model.

    ``outputs`` has one entry per member, in the order the model was fitted on.
    A ``None`` member contributes zeros to the features (as in training), and
    labels the model was not fitted on are ignored. The result sums to 1.
    """
    labels, members, weights, bias = _check_model(model)
    _sequence(outputs, "predict_logistic: outputs")
    if len(outputs) != members:
        raise UsageError(
            f"predict_logistic: {len(outputs)} outputs for a model of {members} members; "
            "pass one output (or None) per member, in the fitted order"
        )
    index = {label: k for k, label in enumerate(labels)}
    features = [0.0] * (members * len(labels))
    for m, output in enumerate(outputs):
        if output is None:
            continue
        for label, value in _check_output(output, f"predict_logistic: member {m}").items():
            k = index.get(label)
            if k is not None:
                features[m * len(labels) + k] = float(value)
    scores = [b + sum(map(mul, row, features)) for row, b in zip(weights, bias, strict=True)]
    return dict(zip(labels, _softmax(scores), strict=True))


# --------------------------------------------------------------------------- cascade


def cascade_answer(
    confidences_row: Sequence[float | None], thresholds: Sequence[float | None]
) -> int:
    """Index of the member whose answer stands for one row of a cascade.

    Member ``m`` answers when its confidence is ``>= thresholds[m]``; a
    threshold of ``None`` or ``inf`` means "always escalate"; the last member
    (index ``len(thresholds)``) answers whenever it is reached. When the walk
    reaches a member whose confidence is not known yet (``None``, or past the
    end of ``confidences_row``), that member's index is returned: call it and
    ask again with its confidence filled in.
    """
    _sequence(confidences_row, "cascade_answer: confidences_row", empty_ok=True)
    _sequence(thresholds, "cascade_answer: thresholds", empty_ok=True)
    for m, threshold in enumerate(thresholds):
        limit = math.inf
        if threshold is not None:
            limit = float(threshold)
            if math.isnan(limit):
                raise UsageError(f"cascade_answer: threshold {m} is NaN; use None to escalate")
        if m >= len(confidences_row) or confidences_row[m] is None:
            return m
        confidence = _number(confidences_row[m], f"cascade_answer: confidence of member {m}")
        if limit != math.inf and confidence >= limit:
            return m
    return len(thresholds)


class _CascadeSearch:
    """Threshold search over row groups (rows alike in every stage's candidate
    position and every member's correctness are merged with a count).

    Thresholds are handled as candidate indices: stage ``m``'s candidates are
    ``[inf, v_1 > v_2 > ...]`` (its distinct confidences, descending) and a row
    whose confidence is ``v_p`` (its *position* ``p``) is accepted by candidate
    ``q`` exactly when ``p <= q``.
    """

    def __init__(
        self,
        groups: list[tuple[tuple[int, ...], tuple[bool, ...], int]],
        sizes: list[int],
        costs: list[float],
        need: int,
    ) -> None:
        self.groups = groups
        self.sizes = sizes  # candidate count per thresholded stage
        self.costs = costs
        self.need = need
        self.members = len(costs)
        self.best: tuple[int, float, tuple[int, ...]] | None = None

    def total_cost(self, reach: Sequence[int]) -> float:
        """Summed cost of a dev set where ``reach[m]`` rows called member ``m``."""
        total = 0.0
        for cost, count in zip(self.costs, reach, strict=True):
            total += cost * count
        return total

    def better(self, correct: int, cost: float, other_correct: int, other_cost: float) -> bool:
        """Whether (correct, cost) beats the other: meeting the target first; then the
        lower cost (higher accuracy on a tie) when it is met, the higher accuracy
        (lower cost on a tie) when not."""
        met, other_met = correct >= self.need, other_correct >= self.need
        if met != other_met:
            return met
        cheaper = cost < other_cost and not _close(cost, other_cost)
        same_cost = _close(cost, other_cost)
        if met:
            return cheaper or (same_cost and correct > other_correct)
        return correct > other_correct or (correct == other_correct and cheaper)

    def consider(self, correct: int, reach: tuple[int, ...], index: tuple[int, ...]) -> None:
        cost = self.total_cost(reach)
        if self.best is None or self.better(correct, cost, self.best[0], self.best[1]):
            self.best = (correct, cost, index)

    # exact ------------------------------------------------------------------

    def exact(self) -> tuple[int, ...]:
        everything = list(range(len(self.groups)))
        if len(self.sizes) == 1:
            self._sweep(None, 0, everything, 0, (), ())
        else:
            self._outer(0, everything, 0, (), ())
        assert self.best is not None
        return self.best[2]

    def _outer(
        self,
        m: int,
        subset: list[int],
        correct: int,
        reach: tuple[int, ...],
        index: tuple[int, ...],
    ) -> None:
        """Enumerate stage ``m``'s candidates (the rows it accepts are a prefix of
        ``subset`` sorted by position) and recurse on the rows it passes on."""
        if m == len(self.sizes) - 2:
            self._sweep(m, m + 1, subset, correct, reach, index)
            return
        groups = self.groups
        order = sorted(subset, key=lambda g: groups[g][0][m])
        size = sum(groups[g][2] for g in subset)
        k = 0
        for q in range(self.sizes[m]):
            while k < len(order) and groups[order[k]][0][m] <= q:
                correct += groups[order[k]][1][m] * groups[order[k]][2]
                k += 1
            self._outer(m + 1, order[k:], correct, (*reach, size), (*index, q))

    def _sweep(
        self,
        s: int | None,
        b: int,
        subset: list[int],
        correct: int,
        reach: tuple[int, ...],
        index: tuple[int, ...],
    ) -> None:
        """Every candidate pair of the last two thresholded stages ``s`` and ``b``
        (only ``b`` when ``s`` is None) over the rows reaching them, in time
        proportional to the number of pairs: rows sit in buckets by their position
        at ``b`` and candidate ``q_b`` takes the buckets ``1..q_b``; lowering
        ``s``'s threshold moves its newly accepted rows out of the buckets."""
        groups = self.groups
        f = b + 1
        count_b = self.sizes[b]
        rows_at = [0] * count_b
        right_b = [0] * count_b
        right_f = [0] * count_b
        size = 0
        for g in subset:
            positions, right, count = groups[g]
            p = positions[b]
            rows_at[p] += count
            right_b[p] += right[b] * count
            right_f[p] += right[f] * count
            size += count
        right_f_total = sum(right_f)
        order = [] if s is None else sorted(subset, key=lambda g: groups[g][0][s])
        k = 0
        answered_s = 0
        correct_s = 0
        for q_s in range(1 if s is None else self.sizes[s]):
            head, prefix = reach, index
            if s is not None:
                while k < len(order) and groups[order[k]][0][s] <= q_s:
                    positions, right, count = groups[order[k]]
                    p = positions[b]
                    rows_at[p] -= count
                    right_b[p] -= right[b] * count
                    right_f[p] -= right[f] * count
                    right_f_total -= right[f] * count
                    answered_s += count
                    correct_s += right[s] * count
                    k += 1
                head, prefix = (*reach, size), (*index, q_s)
            reach_b = size - answered_s
            base = correct + correct_s + right_f_total
            accepted = accepted_right = accepted_right_f = 0
            for q_b in range(count_b):
                if q_b:
                    accepted += rows_at[q_b]
                    accepted_right += right_b[q_b]
                    accepted_right_f += right_f[q_b]
                self.consider(
                    base + accepted_right - accepted_right_f,
                    (*head, reach_b, reach_b - accepted),
                    (*prefix, q_b),
                )

    # greedy -----------------------------------------------------------------

    def greedy(self) -> tuple[int, ...]:
        """Coordinate search: all thresholds start at +inf; each pass sets the
        thresholds from the last stage back to the first, each to its best value
        with the others held, and passes repeat until none changes (each change
        strictly improves the objective, so this ends)."""
        index = [0] * len(self.sizes)
        for _ in range(_GREEDY_PASSES):
            changed = False
            for m in reversed(range(len(self.sizes))):
                q = self._coordinate(index, m)
                if q != index[m]:
                    index[m] = q
                    changed = True
            if not changed:
                break
        return tuple(index)

    def _walk(self, index: Sequence[int], group: int, start: int, stop: int) -> int:
        """The first stage in ``start..stop-1`` whose threshold accepts the group,
        else ``stop`` (the group reaches member ``stop``)."""
        positions = self.groups[group][0]
        for j in range(start, stop):
            if positions[j] <= index[j]:
                return j
        return stop

    def _coordinate(self, index: list[int], m: int) -> int:
        """Best candidate for stage ``m`` with every other threshold held; the
        current one wins ties."""
        members = self.members
        count_m = self.sizes[m]
        reach_up = [0] * m
        correct_up = 0
        # per position at m: rows, right at m, right downstream, downstream reach per member
        rows_at = [0] * count_m
        right_m = [0] * count_m
        right_down = [0] * count_m
        reach_down = [[0] * members for _ in range(count_m)]
        size = 0
        last = len(self.sizes)
        for g, (positions, right, count) in enumerate(self.groups):
            answer = self._walk(index, g, 0, m)
            for j in range(min(answer + 1, m)):
                reach_up[j] += count
            if answer < m:
                correct_up += right[answer] * count
                continue
            size += count
            p = positions[m]
            rows_at[p] += count
            right_m[p] += right[m] * count
            later = self._walk(index, g, m + 1, last)
            right_down[p] += right[later] * count
            for j in range(m + 1, later + 1):
                reach_down[p][j] += count
        totals = [sum(reach_down[p][j] for p in range(count_m)) for j in range(members)]
        right_down_total = sum(right_down)
        scored = []
        accepted = [0] * members
        accepted_right = accepted_right_down = 0
        for q in range(count_m):
            if q:
                accepted_right += right_m[q]
                accepted_right_down += right_down[q]
                for j in range(m + 1, members):
                    accepted[j] += reach_down[q][j]
            reach = (*reach_up, size, *(totals[j] - accepted[j] for j in range(m + 1, members)))
            correct = correct_up + accepted_right + right_down_total - accepted_right_down
            scored.append((correct, self.total_cost(reach)))
        best = index[m]
        for q, (correct, cost) in enumerate(scored):
            if self.better(correct, cost, *scored[best]):
                best = q
        return best


def calibrate_cascade(
    confidences: Sequence[Sequence[float]],
    correct: Sequence[Sequence[bool]],
    costs: Sequence[float],
    target_accuracy: float,
) -> dict[str, Any]:
    """Cascade thresholds that reach ``target_accuracy`` on a dev set at the least cost.

    Members are ordered cheap to strong. ``confidences[m][i]`` is member
    ``m``'s top probability on dev row ``i``, ``correct[m][i]`` whether its
    label was right, ``costs[m]`` the cost of calling it once (e.g. mean
    seconds). The cascade asks member 0; if its confidence is ``>=
    thresholds[0]`` it answers, else member 1 is asked, and so on; the last
    member answers whenever it is reached. A member reached is paid for even
    when its threshold is +inf ("always escalate"): a row's cost is the sum of
    the costs of the members asked.

    The search minimises the mean cost per row subject to dev accuracy ``>=
    target_accuracy``; each threshold (one per member but the last) is chosen
    among that member's distinct confidences and +inf. When the product of the
    candidate counts is at most :data:`EXACT_LIMIT` every combination is scored
    exactly (the last two thresholds by a prefix-sum sweep, earlier ones
    enumerated); above it, a greedy coordinate search starts from all +inf and
    sets the thresholds from the last stage backwards, pass after pass, until
    none changes (a heuristic: it may miss the optimum). Ties go to the
    combination met first, higher thresholds before lower, earlier stages
    first. When no combination reaches the target, the most accurate one
    (cheapest among ties) is returned with ``"met": False``.

    Returns ``{"thresholds": [t or None for +inf], "accuracy", "mean_cost",
    "calls_per_row", "answered_by": [share of rows each member answered],
    "met"}``, all measured on the dev set.
    """
    _sequence(confidences, "calibrate_cascade: confidences")
    members = len(confidences)
    _check_members(members, "calibrate_cascade")
    _sequence(correct, "calibrate_cascade: correct")
    _sequence(costs, "calibrate_cascade: costs")
    if len(correct) != members or len(costs) != members:
        raise UsageError(
            f"calibrate_cascade: {members} members of confidences, {len(correct)} of correct "
            f"and {len(costs)} costs; pass one of each per member"
        )
    n = _same_rows("calibrate_cascade", {"confidences": confidences, "correct": correct})
    conf = [
        [_number(c, f"calibrate_cascade: confidence of member {m}") for c in row]
        for m, row in enumerate(confidences)
    ]
    right = [[bool(x) for x in row] for row in correct]
    cost = [_number(c, "calibrate_cascade: cost") for c in costs]
    if any(c < 0 for c in cost):
        raise UsageError(f"calibrate_cascade: costs must be >= 0, got {cost}")
    target = _number(target_accuracy, "calibrate_cascade: target_accuracy")
    if not 0 <= target <= 1:
        raise UsageError(f"calibrate_cascade: target_accuracy {target} is not between 0 and 1")

    stages = members - 1
    candidates = [[math.inf, *sorted(set(conf[m]), reverse=True)] for m in range(stages)]
    position = [{v: p for p, v in enumerate(candidates[m]) if p} for m in range(stages)]
    merged: dict[tuple[tuple[int, ...], tuple[bool, ...]], int] = {}
    for i in range(n):
        key = (
            tuple(position[m][conf[m][i]] for m in range(stages)),
            tuple(right[m][i] for m in range(members)),
        )
        merged[key] = merged.get(key, 0) + 1
    groups = [(positions, ok, count) for (positions, ok), count in merged.items()]
    need = max(0, math.ceil(target * n - 1e-9))
    search = _CascadeSearch(groups, [len(c) for c in candidates], cost, need)
    exact = math.prod(search.sizes) <= EXACT_LIMIT
    chosen = search.exact() if exact else search.greedy()
    thresholds = [candidates[m][q] for m, q in enumerate(chosen)]

    answered = [0] * members
    reach = [0] * members
    right_count = 0
    for i in range(n):
        for m in range(members):
            reach[m] += 1
            if m == stages or conf[m][i] >= thresholds[m]:
                answered[m] += 1
                right_count += right[m][i]
                break
    return {
        "thresholds": [None if t == math.inf else t for t in thresholds],
        "accuracy": right_count / n,
        "mean_cost": search.total_cost(reach) / n,
        "calls_per_row": sum(reach) / n,
        "answered_by": [a / n for a in answered],
        "met": right_count >= need,
    }


# --------------------------------------------------------------------------- router


def _unit(vector: Sequence[float], where: str) -> list[float]:
    values = [_number(v, where) for v in vector]
    norm = math.sqrt(sum(v * v for v in values))
    if norm == 0:
        raise UsageError(f"{where}: the vector is all zeros; it has no direction to compare")
    return [v / norm for v in values]


def fit_centroids(
    vectors: Sequence[Sequence[float]], targets: Sequence[int], members: int
) -> list[list[float] | None]:
    """One unit centroid per member for a nearest-centroid router.

    Member ``m``'s centroid is the mean of the L2-normalised vectors of the
    rows whose target is ``m``, normalised again; ``None`` when no row targets
    ``m``. (If those vectors cancel out exactly, the centroid is all zeros and
    matches nothing better than cosine 0.) Vectors must share one dimension
    and not be all zeros.
    """
    _sequence(vectors, "fit_centroids: vectors")
    _sequence(targets, "fit_centroids: targets")
    if len(vectors) != len(targets):
        raise UsageError(
            f"fit_centroids: {len(vectors)} vectors for {len(targets)} targets; "
            "pass one target per vector"
        )
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise UsageError(f"fit_centroids: members must be an integer >= 1, got {members!r}")
    dimension = len(_sequence(vectors[0], "fit_centroids: vector 0"))
    sums: list[list[float] | None] = [None] * members
    for i, (vector, target) in enumerate(zip(vectors, targets, strict=True)):
        _sequence(vector, f"fit_centroids: vector {i}")
        if len(vector) != dimension:
            raise UsageError(
                f"fit_centroids: vector {i} has {len(vector)} dimensions, vector 0 has "
                f"{dimension}; embed every row with the same model"
            )
        if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < members:
            raise UsageError(
                f"fit_centroids: target {target!r} of row {i} is not a member index "
                f"0..{members - 1}"
            )
        unit = _unit(vector, f"fit_centroids: vector {i}")
        current = sums[target]
        sums[target] = unit if current is None else list(map(add, current, unit))
    centroids: list[list[float] | None] = []
    for total in sums:
        if total is None:
            centroids.append(None)
            continue
        norm = math.sqrt(sum(v * v for v in total))
        centroids.append([v / norm for v in total] if norm > 0 else [0.0] * dimension)
    return centroids


def nearest(centroids: Sequence[Sequence[float] | None], vector: Sequence[float]) -> int:
    """Index of the centroid most similar to ``vector`` by cosine similarity.

    ``None`` centroids are skipped; a tie goes to the lowest index; a centroid
    of all zeros has similarity 0.
    """
    _sequence(centroids, "nearest: centroids")
    query = _unit(_sequence(vector, "nearest: vector"), "nearest: vector")
    best, best_similarity = -1, -math.inf
    for m, centroid in enumerate(centroids):
        if centroid is None:
            continue
        values = [_number(v, f"nearest: centroid {m}") for v in centroid]
        if len(values) != len(query):
            raise UsageError(
                f"nearest: centroid {m} has {len(values)} dimensions, the vector "
                f"{len(query)}; embed with the model the centroids were fitted with"
            )
        norm = math.sqrt(sum(v * v for v in values))
        similarity = sum(map(mul, values, query)) / norm if norm > 0 else 0.0
        if similarity > best_similarity:
            best, best_similarity = m, similarity
    if best < 0:
        raise UsageError("nearest: every centroid is None; fit the router on rows first")
    return best


def route_targets(
    correct: Sequence[Sequence[bool]],
    costs: Sequence[float],
    confidences: Sequence[Sequence[float]],
) -> list[int]:
    """The member each dev row should be routed to, for training a router.

    ``correct[m][i]`` says whether member ``m`` was right on row ``i``,
    ``costs[m]`` what calling it costs, ``confidences[m][i]`` its top
    probability. A row's target is the cheapest member that was right (a tie
    in cost goes to the lower index). When no member was right, it is the
    most expensive member, the strongest by convention (a tie in cost goes to
    the higher confidence, then to the higher index, members being listed
    cheap to strong).
    """
    _sequence(correct, "route_targets: correct")
    members = len(correct)
    _check_members(members, "route_targets")
    _sequence(costs, "route_targets: costs")
    _sequence(confidences, "route_targets: confidences")
    if len(costs) != members or len(confidences) != members:
        raise UsageError(
            f"route_targets: {members} members of correct, {len(costs)} costs and "
            f"{len(confidences)} of confidences; pass one of each per member"
        )
    n = _same_rows("route_targets", {"correct": correct, "confidences": confidences})
    cost = [_number(c, "route_targets: cost") for c in costs]
    if any(c < 0 for c in cost):
        raise UsageError(f"route_targets: costs must be >= 0, got {cost}")
    conf = [
        [_number(c, f"route_targets: confidence of member {m}") for c in row]
        for m, row in enumerate(confidences)
    ]
    targets = []
    for i in range(n):
        right = [m for m in range(members) if correct[m][i]]
        if right:
            targets.append(min(right, key=lambda m: (cost[m], m)))
        else:
            targets.append(max(range(members), key=lambda m: (cost[m], conf[m][i], m)))
    return targets
