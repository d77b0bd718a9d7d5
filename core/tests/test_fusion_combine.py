"""The arithmetic of model fusion (llmos.fusion.combine), checked against small
cases worked out by hand in the comments, so that a wrong combination rule fails."""

from __future__ import annotations

import itertools
import json
import math
import random
from collections.abc import Sequence
from typing import Any

import pytest

from llmos.errors import UsageError
from llmos.fusion import combine
from llmos.fusion.combine import (
    accuracy,
    calibrate_cascade,
    cascade_answer,
    fit_centroids,
    fit_logistic,
    fit_weights,
    labels_of,
    mean,
    nearest,
    normalise,
    predict_logistic,
    route_targets,
    vote,
    vote_winner,
)


def approx_dict(expected: dict[str, float]) -> Any:
    return pytest.approx(expected, abs=1e-12)


def assert_report(result: dict[str, Any], expected: dict[str, Any]) -> None:
    """A calibrate_cascade report equals ``expected`` (floats to 1e-12)."""
    assert set(result) == set(expected)
    for key, value in expected.items():
        assert result[key] == pytest.approx(value, abs=1e-12), key


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))


# --------------------------------------------------------------------------- normalise, labels


def test_normalise_divides_by_the_sum_and_keeps_order() -> None:
    # 1 + 3 = 4 -> 1/4, 3/4
    result = normalise({"b": 1, "a": 3})
    assert result == approx_dict({"b": 0.25, "a": 0.75})
    assert list(result) == ["b", "a"]


def test_normalise_all_zero_is_uniform() -> None:
    assert normalise({"a": 0, "b": 0.0, "c": 0}) == approx_dict(dict.fromkeys("abc", 1 / 3))


def test_normalise_huge_values_stay_finite() -> None:
    assert normalise({"a": 1e308, "b": 1e308}) == approx_dict({"a": 0.5, "b": 0.5})


@pytest.mark.parametrize("scores", [{}, {"a": -0.1, "b": 1}, {"a": math.nan}, {"a": math.inf}])
def test_normalise_refuses_bad_scores(scores: dict[str, float]) -> None:
    with pytest.raises(UsageError):
        normalise(scores)


def test_labels_of_is_the_union_in_first_appearance_order() -> None:
    # member 0 gives b, a; member 1 is skipped; member 2 adds c (a already seen)
    assert labels_of([{"b": 0.5, "a": 0.5}, None, {"a": 1.0, "c": 0.0}]) == ["b", "a", "c"]
    assert labels_of([None, None]) == []
    assert labels_of([]) == []


# --------------------------------------------------------------------------- mean


def test_mean_weighted() -> None:
    # weights 1 and 3: a = (.9*1 + .2*3) / 4 = 1.5/4 = .375; b = (.1 + 2.4) / 4 = .625
    outputs = [{"a": 0.9, "b": 0.1}, {"a": 0.2, "b": 0.8}]
    assert mean(outputs, [1, 3]) == approx_dict({"a": 0.375, "b": 0.625})
    # unweighted: a = (.9 + .2) / 2 = .55
    assert mean(outputs) == approx_dict({"a": 0.55, "b": 0.45})


def test_mean_skips_absent_members_and_renormalises() -> None:
    # the None member's weight (100) is dropped: 1 and 3 remain, as above
    outputs = [{"a": 0.9, "b": 0.1}, None, {"a": 0.2, "b": 0.8}]
    assert mean(outputs, [1, 100, 3]) == approx_dict({"a": 0.375, "b": 0.625})
    # a lone present member is returned as is
    assert mean([None, {"a": 0.3, "b": 0.7}]) == approx_dict({"a": 0.3, "b": 0.7})


def test_mean_missing_labels_count_as_zero_in_first_appearance_order() -> None:
    # b = (.6 + 0) / 2 = .3; a = (.4 + .5) / 2 = .45; c = (0 + .5) / 2 = .25
    result = mean([{"b": 0.6, "a": 0.4}, {"a": 0.5, "c": 0.5}])
    assert result == approx_dict({"b": 0.3, "a": 0.45, "c": 0.25})
    assert list(result) == ["b", "a", "c"]


def test_mean_zero_weight_member_is_ignored() -> None:
    assert mean([{"a": 1.0}, {"b": 1.0}], [0, 2]) == approx_dict({"a": 0.0, "b": 1.0})


@pytest.mark.parametrize(
    ("outputs", "weights"),
    [
        ([], None),  # no members
        ([None, None], None),  # nobody answered
        ([{"a": 1.0}], [1, 2]),  # weights do not match
        ([{"a": 1.0}, {"a": 1.0}], [1, -1]),  # negative weight
        ([{"a": 1.0}, {"a": 1.0}], [0, 0]),  # all zero
        ([{"a": 1.0}, None], [0, 5]),  # the present member has weight 0
        ([{"a": 1.0}, {}], None),  # empty output instead of None
        ([{"a": -0.5}], None),  # negative probability
        ([{"a": math.nan}], None),
        (["a"], None),  # not a mapping
    ],
)
def test_mean_refuses_bad_input(outputs: list[Any], weights: list[float] | None) -> None:
    with pytest.raises(UsageError):
        mean(outputs, weights)


# --------------------------------------------------------------------------- vote


def test_vote_two_to_one() -> None:
    # argmaxes a, a, b: a gets 2 of 3 votes; c nobody voted for
    outputs = [{"a": 0.6, "b": 0.3, "c": 0.1}, {"a": 0.9, "b": 0.1}, {"a": 0.3, "b": 0.7}]
    assert vote(outputs) == approx_dict({"a": 2 / 3, "b": 1 / 3, "c": 0.0})
    assert vote_winner(outputs) == "a"


def test_vote_weighted_and_absent_members() -> None:
    # weights 1, 1, 3: a = 2/5, b = 3/5; the None member's weight does not count
    outputs = [{"a": 0.6, "b": 0.4}, {"a": 0.9, "b": 0.1}, None, {"a": 0.3, "b": 0.7}]
    assert vote(outputs, [1, 1, 50, 3]) == approx_dict({"a": 0.4, "b": 0.6})
    assert vote_winner(outputs, [1, 1, 50, 3]) == "b"


def test_vote_tie_broken_by_mean() -> None:
    # one vote each; mean a = (.55 + .1) / 2 = .325, b = (.45 + .9) / 2 = .675 -> b
    outputs = [{"a": 0.55, "b": 0.45}, {"a": 0.1, "b": 0.9}]
    assert vote(outputs) == approx_dict({"a": 0.5, "b": 0.5})
    assert vote_winner(outputs) == "b"


def test_vote_tie_in_votes_and_mean_goes_to_label_order() -> None:
    # one vote each, mean .5 each: the first label of labels_of wins
    assert vote_winner([{"a": 0.6, "b": 0.4}, {"a": 0.4, "b": 0.6}]) == "a"
    assert vote_winner([{"b": 0.4, "a": 0.6}, {"a": 0.4, "b": 0.6}]) == "b"


def test_vote_tie_inside_one_output_goes_to_its_first_label() -> None:
    assert vote([{"a": 0.5, "b": 0.5}]) == approx_dict({"a": 1.0, "b": 0.0})
    assert vote([{"b": 0.5, "a": 0.5}]) == approx_dict({"b": 1.0, "a": 0.0})


def test_vote_refuses_bad_input() -> None:
    with pytest.raises(UsageError):
        vote([None])
    with pytest.raises(UsageError):
        vote_winner([{"a": 1.0}, {"b": 1.0}], [0, 0])


# --------------------------------------------------------------------------- fit_weights

# member 0 is always right with certainty, member 1 always wrong
RIGHT_AND_WRONG = [
    [{"a": 1.0, "b": 0.0}, {"a": 0.0, "b": 1.0}],
    [{"a": 0.0, "b": 1.0}, {"a": 1.0, "b": 0.0}],
]
RIGHT_AND_WRONG_GOLD = ["a", "b"]


def test_fit_weights_one_step_is_the_analytic_gradient() -> None:
    # w = (.5, .5); p_i0 = 1, p_i1 = 0, mixture = .5 on both rows
    # g = (mean 1/.5, 0) = (2, 0); sum w g = 1
    # dz0 = .5 * (2 - 1) = .5, dz1 = .5 * (0 - 1) = -.5; step .5 -> z = (.25, -.25)
    # w0 = softmax(z)_0 = sigmoid(.5)
    weights = fit_weights(RIGHT_AND_WRONG, RIGHT_AND_WRONG_GOLD, steps=1)
    assert weights == pytest.approx([sigmoid(0.5), 1 - sigmoid(0.5)], abs=1e-12)


def test_fit_weights_favours_the_member_that_is_right() -> None:
    weights = fit_weights(RIGHT_AND_WRONG, RIGHT_AND_WRONG_GOLD)
    assert weights[0] > 0.99
    assert sum(weights) == pytest.approx(1.0, abs=1e-12)
    assert all(isinstance(w, float) for w in weights)


def test_fit_weights_identical_members_share_equally() -> None:
    rows = [[{"a": 0.8, "b": 0.2}] * 2, [{"a": 0.3, "b": 0.7}] * 2, [{"a": 0.6, "b": 0.4}] * 2]
    assert fit_weights(rows, ["a", "b", "b"]) == pytest.approx([0.5, 0.5], abs=1e-12)


def test_fit_weights_zero_steps_is_uniform_and_deterministic() -> None:
    assert fit_weights(RIGHT_AND_WRONG, RIGHT_AND_WRONG_GOLD, steps=0) == [0.5, 0.5]
    first = fit_weights(RIGHT_AND_WRONG, RIGHT_AND_WRONG_GOLD, steps=7)
    assert fit_weights(RIGHT_AND_WRONG, RIGHT_AND_WRONG_GOLD, steps=7) == first


@pytest.mark.parametrize(
    ("rows", "gold"),
    [
        ([], []),  # no rows
        ([[{"a": 1.0}, {"a": 1.0}]], ["a", "a"]),  # lengths differ
        ([[{"a": 1.0}]], ["a"]),  # one member
        ([[{"a": 1.0}, None]], ["a"]),  # a member missing
        ([[{"a": 1.0}, {"a": 1.0}], [{"a": 1.0}]], ["a", "a"]),  # ragged rows
        ([[{"a": 1.0}, {"a": 1.0}]], ["A"]),  # gold label nobody outputs
    ],
)
def test_fit_weights_refuses_bad_input(rows: list[Any], gold: list[str]) -> None:
    with pytest.raises(UsageError):
        fit_weights(rows, gold)


def test_fit_weights_refuses_bad_steps() -> None:
    with pytest.raises(UsageError):
        fit_weights(RIGHT_AND_WRONG, RIGHT_AND_WRONG_GOLD, steps=-1)
    with pytest.raises(UsageError):
        fit_weights(RIGHT_AND_WRONG, RIGHT_AND_WRONG_GOLD, learning_rate=0)


# --------------------------------------------------------------------------- logistic stacking


def test_fit_logistic_one_step_by_hand() -> None:
    # one member, labels (a, b), one row x = (1, 0), gold a; at W = 0, b = 0: p = (.5, .5)
    # residual p - y = (-.5, .5); grad W[a][0] = -.5 * 1, W[b][0] = .5; feature 1 is 0
    # step .5 (l2 = 0): W[a] = (.25, 0), W[b] = (-.25, 0); bias likewise (.25, -.25)
    model = fit_logistic([[{"a": 1.0, "b": 0.0}]], ["a"], l2=0.0, steps=1)
    assert model["labels"] == ["a", "b"]
    assert model["members"] == 1
    assert model["weights"][0] == pytest.approx([0.25, 0.0], abs=1e-12)
    assert model["weights"][1] == pytest.approx([-0.25, 0.0], abs=1e-12)
    assert model["bias"] == pytest.approx([0.25, -0.25], abs=1e-12)
    # x = (1, 0): scores (.25 + .25, -.25 - .25) = (.5, -.5) -> p(a) = sigmoid(1)
    assert predict_logistic(model, [{"a": 1.0, "b": 0.0}]) == approx_dict(
        {"a": sigmoid(1.0), "b": 1 - sigmoid(1.0)}
    )
    # a None member contributes zeros: scores are the biases (.25, -.25) -> sigmoid(.5)
    assert predict_logistic(model, [None]) == approx_dict(
        {"a": sigmoid(0.5), "b": 1 - sigmoid(0.5)}
    )


def test_fit_logistic_l2_shrinks_weights_but_not_bias() -> None:
    # after the first step above, the second step adds l2 * W to W's gradient only
    plain = fit_logistic([[{"a": 1.0, "b": 0.0}]], ["a"], l2=0.0, steps=2)
    shrunk = fit_logistic([[{"a": 1.0, "b": 0.0}]], ["a"], l2=1.0, steps=2)
    # step 2 differs by -lr * l2 * W1 = -.5 * .25 on W[a][0]
    assert shrunk["weights"][0][0] == pytest.approx(plain["weights"][0][0] - 0.125, abs=1e-12)
    assert shrunk["bias"] == pytest.approx(plain["bias"], abs=1e-12)


def test_fit_logistic_default_labels_append_unseen_gold() -> None:
    rows = [[{"b": 0.7, "a": 0.3}, None], [{"a": 0.9, "b": 0.1}, {"a": 1.0}]]
    model = fit_logistic(rows, ["c", "a"], steps=0)
    assert model["labels"] == ["b", "a", "c"]
    assert model["members"] == 2
    # zero weights: every label equally likely
    assert predict_logistic(model, rows[0]) == approx_dict(dict.fromkeys("bac", 1 / 3))


def separable(rows: int, members: int, seed: int) -> tuple[list[list[dict[str, float]]], list[str]]:
    """Members whose p(pos) is above .55 on pos rows and below .45 on neg rows."""
    rng = random.Random(seed)
    data, gold = [], []
    for _ in range(rows):
        label = rng.choice(["pos", "neg"])
        outputs = []
        for _ in range(members):
            p = rng.uniform(0.55, 1.0) if label == "pos" else rng.uniform(0.0, 0.45)
            outputs.append({"pos": p, "neg": 1 - p})
        data.append(outputs)
        gold.append(label)
    return data, gold


def argmax(probabilities: dict[str, float]) -> str:
    return max(probabilities, key=lambda label: probabilities[label])


def test_fit_logistic_separates_a_separable_set() -> None:
    rows, gold = separable(60, 2, seed=3)
    model = fit_logistic(rows, gold)
    predictions = [predict_logistic(model, row) for row in rows]
    assert all(sum(p.values()) == pytest.approx(1.0, abs=1e-12) for p in predictions)
    assert accuracy([argmax(p) for p in predictions], gold) == 1.0
    # JSON round trip gives the same model
    loaded = json.loads(json.dumps(model))
    assert predict_logistic(loaded, rows[0]) == approx_dict(predictions[0])


def test_fit_logistic_2000_rows_3_members() -> None:
    # the performance sanity: 2,000 rows x 3 members x 2 labels x 500 steps in pure Python
    rows, gold = separable(2000, 3, seed=11)
    model = fit_logistic(rows, gold)
    predictions = [argmax(predict_logistic(model, row)) for row in rows]
    assert accuracy(predictions, gold) >= 0.99


def test_fit_logistic_refuses_bad_input() -> None:
    rows = [[{"a": 1.0, "b": 0.0}]]
    with pytest.raises(UsageError):
        fit_logistic(rows, ["c"], labels=["a", "b"])  # gold outside labels
    with pytest.raises(UsageError):
        fit_logistic(rows, ["a"], labels=["a", "a"])
    with pytest.raises(UsageError):
        fit_logistic(rows, ["a", "b"])
    with pytest.raises(UsageError):
        fit_logistic(rows, ["a"], l2=-1)
    with pytest.raises(UsageError):
        fit_logistic([], [])


def test_predict_logistic_refuses_bad_input() -> None:
    model = fit_logistic([[{"a": 1.0, "b": 0.0}]], ["a"], steps=1)
    with pytest.raises(UsageError):
        predict_logistic(model, [None, None])  # two outputs for one member
    with pytest.raises(UsageError):
        predict_logistic({"labels": ["a"]}, [None])
    with pytest.raises(UsageError):
        predict_logistic({**model, "weights": [[0.0]]}, [None])


# --------------------------------------------------------------------------- cascade

# 6 dev rows; member 0 (cost 1) is right exactly on its confident rows (>= .7),
# member 1 (cost 10) is always right
CONF_0 = [0.9, 0.8, 0.7, 0.6, 0.55, 0.5]
RIGHT_0 = [True, True, True, False, False, False]
#   t0    answered by m0  accuracy  cost
#   inf   0               6/6       6 * 11 = 66
#   .9    1               6/6       1 + 5 * 11 = 56
#   .8    2               6/6       2 + 4 * 11 = 46
#   .7    3               6/6       3 + 3 * 11 = 36
#   .6    4               5/6       4 + 2 * 11 = 26
#   .55   5               4/6       5 + 11 = 16
#   .5    6               3/6       6


def two_member(target: float, right_1: Sequence[bool] = (True,) * 6) -> dict[str, Any]:
    return calibrate_cascade([CONF_0, [0.99] * 6], [RIGHT_0, list(right_1)], [1.0, 10.0], target)


def test_cascade_full_accuracy() -> None:
    result = two_member(1.0)
    assert result["thresholds"] == [0.7]
    assert result["accuracy"] == 1.0
    assert result["mean_cost"] == pytest.approx(36 / 6)
    assert result["calls_per_row"] == pytest.approx(9 / 6)  # 6 rows ask m0, 3 ask m1
    assert result["answered_by"] == pytest.approx([0.5, 0.5])
    assert result["met"] is True
    json.dumps(result)


def test_cascade_lower_target_escalates_less() -> None:
    result = two_member(0.8)  # 5/6 = .833 is enough
    assert result["thresholds"] == [0.6]
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["mean_cost"] == pytest.approx(26 / 6)
    assert result["answered_by"] == pytest.approx([4 / 6, 2 / 6])
    lowest = two_member(0.5)
    assert lowest["thresholds"] == [0.5]
    assert lowest["mean_cost"] == pytest.approx(1.0)
    assert lowest["answered_by"] == pytest.approx([1.0, 0.0])
    # a higher target never costs less
    costs = [two_member(t)["mean_cost"] for t in (0.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)]
    assert costs == sorted(costs)


def test_cascade_exact_target_fraction() -> None:
    # 5/6 as a float target is met by 5 right rows out of 6 (no rounding trap)
    assert two_member(5 / 6)["thresholds"] == [0.6]


def test_cascade_unreachable_target_returns_most_accurate_cheapest() -> None:
    # member 1 now wrong on row 3 too, so row 3 is wrong whoever answers: at best 5/6,
    # reached by t0 in {inf, .9, .8, .7, .6} (.55 lets row 4 in wrong: 4/6);
    # the cheapest of those is .6 (cost 26)
    result = two_member(1.0, right_1=[True, True, True, False, True, True])
    assert result["met"] is False
    assert result["thresholds"] == [0.6]
    assert result["accuracy"] == pytest.approx(5 / 6)
    assert result["mean_cost"] == pytest.approx(26 / 6)
    assert result["answered_by"] == pytest.approx([4 / 6, 2 / 6])


def test_cascade_always_escalate_is_none() -> None:
    # member 0 always wrong: only t0 = inf reaches 100%; every row asks both
    result = calibrate_cascade([CONF_0, [0.9] * 6], [[False] * 6, [True] * 6], [1, 10], 1.0)
    assert result["thresholds"] == [None]
    assert result["answered_by"] == [0.0, 1.0]
    assert result["calls_per_row"] == 2.0
    assert result["mean_cost"] == pytest.approx(11.0)


# 8 rows, costs 1, 3, 10. m0 right only on rows 0-1 (conf .9; .6 elsewhere);
# m1 right only on rows 2-4 (conf .8; .5 elsewhere); m2 always right.
THREE_CONF = [
    [0.9, 0.9, 0.6, 0.6, 0.6, 0.6, 0.6, 0.6],
    [0.5, 0.5, 0.8, 0.8, 0.8, 0.5, 0.5, 0.5],
    [0.7] * 8,
]
THREE_RIGHT = [
    [True, True, False, False, False, False, False, False],
    [False, False, True, True, True, False, False, False],
    [True] * 8,
]
THREE_COSTS = [1.0, 3.0, 10.0]
# at 100%: t0 = .9, t1 = .8 -> rows 0-1 cost 1, rows 2-4 cost 4, rows 5-7 cost 14:
# (2 + 12 + 42) / 8 = 7; calls (8 + 6 + 3) / 8; any lower threshold lets a wrong answer in,
# any higher one sends a row on to a dearer member
THREE_EXPECTED = {
    "thresholds": [0.9, 0.8],
    "accuracy": 1.0,
    "mean_cost": 7.0,
    "calls_per_row": 17 / 8,
    "answered_by": [2 / 8, 3 / 8, 3 / 8],
    "met": True,
}


def test_cascade_three_members_exact(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_greedy(self: Any) -> Any:
        raise AssertionError("greedy search used under the exact limit")

    monkeypatch.setattr(combine._CascadeSearch, "greedy", no_greedy)
    result = calibrate_cascade(THREE_CONF, THREE_RIGHT, THREE_COSTS, 1.0)
    assert_report(result, THREE_EXPECTED)


def test_cascade_three_members_greedy_agrees(monkeypatch: pytest.MonkeyPatch) -> None:
    def no_exact(self: Any) -> Any:
        raise AssertionError("exact search used above the limit")

    monkeypatch.setattr(combine, "EXACT_LIMIT", 0)
    monkeypatch.setattr(combine._CascadeSearch, "exact", no_exact)
    result = calibrate_cascade(THREE_CONF, THREE_RIGHT, THREE_COSTS, 1.0)
    assert_report(result, THREE_EXPECTED)


def brute_force(
    confidences: list[list[float]], right: list[list[bool]], costs: list[float], target: float
) -> tuple[bool, int, float]:
    """(met, rows right, total cost) of the best combination, by simulating each one."""
    members, n = len(confidences), len(confidences[0])
    need = math.ceil(target * n - 1e-9)
    candidates = [[None, *sorted(set(confidences[m]))] for m in range(members - 1)]
    best: tuple[tuple[Any, ...], bool, int, float] | None = None
    for thresholds in itertools.product(*candidates):
        ok, cost = 0, 0.0
        for i in range(n):
            row = [confidences[m][i] for m in range(members)]
            answer = cascade_answer(row, thresholds)
            ok += right[answer][i]
            cost += sum(costs[: answer + 1])
        key = (0, cost, -ok) if ok >= need else (1, -ok, cost)
        if best is None or key < best[0]:
            best = (key, ok >= need, ok, cost)
    assert best is not None
    return best[1], best[2], best[3]


@pytest.mark.parametrize("seed", range(40))
def test_cascade_exact_matches_brute_force(seed: int) -> None:
    rng = random.Random(seed)
    members, n = rng.choice([2, 3, 4]), rng.randint(1, 8)
    confidences = [[rng.choice([0.5, 0.6, 0.7, 0.9]) for _ in range(n)] for _ in range(members)]
    right = [[rng.random() < 0.4 + 0.2 * m for _ in range(n)] for m in range(members)]
    costs = [float(rng.choice([0, 1, 2, 5])) for _ in range(members)]
    target = rng.choice([0.0, 0.5, 0.75, 1.0])
    result = calibrate_cascade(confidences, right, costs, target)
    met, ok, cost = brute_force(confidences, right, costs, target)
    assert result["met"] is met
    assert result["accuracy"] == pytest.approx(ok / n)
    assert result["mean_cost"] == pytest.approx(cost / n)
    assert sum(result["answered_by"]) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("confidences", "correct", "costs", "target"),
    [
        ([[0.9]], [[True]], [1], 0.5),  # one member
        ([[0.9], [0.8]], [[True]], [1, 2], 0.5),  # correct misses a member
        ([[0.9], [0.8]], [[True], [True]], [1], 0.5),  # costs miss a member
        ([[0.9, 0.8], [0.8]], [[True, True], [True]], [1, 2], 0.5),  # ragged rows
        ([[0.9], [0.8]], [[True], [True]], [1, -2], 0.5),  # negative cost
        ([[0.9], [0.8]], [[True], [True]], [1, 2], 1.5),  # target above 1
        ([[math.nan], [0.8]], [[True], [True]], [1, 2], 0.5),
        ([[], []], [[], []], [1, 2], 0.5),  # no rows
    ],
)
def test_cascade_refuses_bad_input(
    confidences: list[list[float]], correct: list[list[bool]], costs: list[float], target: float
) -> None:
    with pytest.raises(UsageError):
        calibrate_cascade(confidences, correct, costs, target)


def test_cascade_answer() -> None:
    assert cascade_answer([0.8, 0.9], [0.7]) == 0  # .8 >= .7: member 0 answers
    assert cascade_answer([0.7], [0.7]) == 0  # the threshold itself is accepted
    assert cascade_answer([0.6, 0.9], [0.7]) == 1  # the last member always answers
    assert cascade_answer([0.6], [0.7, 0.5]) == 1  # member 1 not asked yet: ask it
    assert cascade_answer([0.6, None], [0.7, 0.5]) == 1
    assert cascade_answer([0.6, 0.4], [0.7, 0.5]) == 2
    assert cascade_answer([1.0, 0.99], [None, math.inf]) == 2  # both always escalate
    assert cascade_answer([], []) == 0


# --------------------------------------------------------------------------- router


def test_fit_centroids_normalises_before_and_after_averaging() -> None:
    # member 0: (2, 0) and (1, 1) become unit vectors at 0 and 45 degrees; their mean,
    # normalised, points at 22.5 degrees. Member 1: (10, 0) and (0, 1) -> 45 degrees
    # (averaging raw vectors would lean to the x axis). Member 2: no rows.
    centroids = fit_centroids([[2, 0], [1, 1], [10, 0], [0, 1]], [0, 0, 1, 1], 3)
    angle = math.radians(22.5)
    assert centroids[0] == pytest.approx([math.cos(angle), math.sin(angle)])
    assert centroids[1] == pytest.approx([math.sqrt(0.5), math.sqrt(0.5)])
    assert centroids[2] is None


def test_nearest_by_cosine() -> None:
    centroids = fit_centroids([[1, 0], [0, 2]], [0, 2], 3)  # (1, 0), None, (0, 1)
    assert nearest(centroids, [5, 1]) == 0
    assert nearest(centroids, [1, 5]) == 2
    assert nearest(centroids, [-1, 0.1]) == 2  # cos .0995 beats cos -.995
    # a tie goes to the lowest index; length does not matter
    assert nearest([None, [1, 0], [3, 0]], [1, 1]) == 1


def test_router_refuses_bad_input() -> None:
    with pytest.raises(UsageError):
        fit_centroids([[1, 0]], [2], 2)  # target outside the members
    with pytest.raises(UsageError):
        fit_centroids([[1, 0], [1, 0, 0]], [0, 1], 2)  # dimensions differ
    with pytest.raises(UsageError):
        fit_centroids([[0, 0]], [0], 1)  # zero vector
    with pytest.raises(UsageError):
        fit_centroids([[1, 0]], [0, 1], 2)  # lengths differ
    with pytest.raises(UsageError):
        nearest([None, None], [1, 0])
    with pytest.raises(UsageError):
        nearest([[1, 0]], [1, 0, 0])


def test_route_targets() -> None:
    costs = [1.0, 5.0, 20.0]
    correct = [
        # row: 0     1      2      3      4
        [True, False, False, False, True],  # m0
        [True, True, False, False, False],  # m1
        [True, True, True, False, True],  # m2
    ]
    confidences = [[0.9] * 5, [0.9] * 5, [0.9] * 5]
    # cheapest right member; row 3 nobody right -> the dearest (m2)
    assert route_targets(correct, costs, confidences) == [0, 1, 2, 2, 0]


def test_route_targets_ties() -> None:
    # equal cost among the right ones -> lower index
    assert route_targets(
        [[False, True], [True, True], [True, False]], [1, 1, 5], [[0.5] * 2] * 3
    ) == [
        1,
        0,
    ]
    # nobody right, m1 and m2 equally dear -> higher confidence, then higher index
    wrong = [[False, False]] * 3
    conf = [[0.99, 0.99], [0.9, 0.6], [0.6, 0.6]]
    assert route_targets(wrong, [1, 5, 5], conf) == [1, 2]


def test_route_targets_refuses_bad_input() -> None:
    with pytest.raises(UsageError):
        route_targets([[True]], [1], [[0.5]])  # one member
    with pytest.raises(UsageError):
        route_targets([[True], [True]], [1], [[0.5], [0.5]])
    with pytest.raises(UsageError):
        route_targets([[True], [True, False]], [1, 2], [[0.5], [0.5, 0.5]])


# --------------------------------------------------------------------------- accuracy


def test_accuracy() -> None:
    assert accuracy(["a", "b", "a"], ["a", "a", "a"]) == pytest.approx(2 / 3)
    with pytest.raises(UsageError):
        accuracy(["a"], ["a", "b"])
    with pytest.raises(UsageError):
        accuracy([], [])
