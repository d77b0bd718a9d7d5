"""The built-in fusion strategies (pure Python; the arithmetic is in
:mod:`llmos.fusion.combine`).

Classification — every member classifies the text (its label set, or
zero-shot over the labels its member table names):

* ``vote`` — each member's label is a vote (``weights`` optional); the
  scores are the vote shares, a tie goes to the higher mean probability;
* ``mean`` — the (weighted) average of the members' probabilities.
  With dev data and no ``weights`` given, both weigh their members: equal
  weights, weights proportional to each member's dev accuracy, or to its
  log-odds ``log(a / (1 - a))`` (the optimal weights of a vote between
  independent members; members at chance or below get 0) — whichever is the
  most accurate on dev (the first of equals: equal weights are kept unless
  another does better);
* ``stack`` — learned on dev data: ``method = "weights"`` (the mean's
  weights that maximise the dev likelihood) or ``"logistic"`` (a small
  logistic regression over the members' probabilities);
* ``cascade`` — members ordered cheap to strong; the next one is asked only
  when the current one's top probability is below its threshold. Thresholds
  are given (``thresholds``) or calibrated on dev data: the cheapest that
  keep ``target_accuracy``, or ``target_ratio`` (default 0.99) of the best
  member's dev accuracy — aiming ``margin_sd`` (default 1) standard errors
  of the dev accuracy above it, so that the target holds on new data too;
* ``router`` — one member per request: by ``rules`` (first match of
  ``contains``, ``regex``, ``min_chars``, ``max_chars``; else ``default``,
  the last member unless set) for any capability, or, trained on dev data,
  by the nearest centroid of ``embedder``'s embeddings (each member's
  centroid: the dev rows it is the cheapest right member for).

Generation:

* ``rank`` — every member answers; a ``judge`` scores each answer (its mean
  log-likelihood per word given the prompt, ``judge_by = "likelihood"``, or
  a classifier's probability of ``judge_label``, ``judge_by = "classifier"``)
  and the best answer is returned (best-of-n across models).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs

from llmos.errors import UsageError
from llmos.fusion import combine as arith
from llmos.plugin import hookimpl
from llmos.types import (
    Capability,
    ChatRequest,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    EmbedRequest,
    FitData,
    FusionCall,
    FusionStrategySpec,
    ModelCard,
    Usage,
)

__all__ = ["STRATEGIES"]

CLASSIFY = frozenset({Capability.CLASSIFY})
ANY = frozenset({Capability.CLASSIFY, Capability.COMPLETE, Capability.CHAT, Capability.EMBED})
GENERATE = frozenset({Capability.COMPLETE, Capability.CHAT})


# --------------------------------------------------------------------------
# option checks
# --------------------------------------------------------------------------


def _known(strategy: str, options: Mapping[str, Any], known: Sequence[str]) -> None:
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise UsageError(
            f"{strategy}: unknown option(s) {', '.join(unknown)};"
            f" known: {', '.join(known) or 'none'}",
            param=unknown[0],
        )


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _weights(strategy: str, options: Mapping[str, Any], members: int) -> list[float] | None:
    weights = options.get("weights")
    if weights is None:
        return None
    if (
        isinstance(weights, str)
        or not isinstance(weights, Sequence)
        or not all(_number(w) and w >= 0 for w in weights)
    ):
        raise UsageError(f"{strategy}: weights must be a list of numbers >= 0", param="weights")
    if len(weights) != members:
        raise UsageError(
            f"{strategy}: {len(weights)} weights for {members} members; give one per member",
            param="weights",
        )
    if not any(weights):
        raise UsageError(f"{strategy}: the weights are all zero", param="weights")
    return [float(w) for w in weights]


def _fraction(strategy: str, name: str, value: Any) -> float:
    if not _number(value) or not 0 < value <= 1:
        raise UsageError(f"{strategy}: {name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _member_index(strategy: str, value: Any, members: Sequence[ModelCard], what: str) -> int:
    """A member named by index or by name/ref."""
    if _number(value) and float(value).is_integer() and 0 <= int(value) < len(members):
        return int(value)
    if isinstance(value, str):
        for index, card in enumerate(members):
            if value in (card.name, card.ref):
                return index
    names = ", ".join(f"{i}={c.ref}" for i, c in enumerate(members))
    raise UsageError(f"{strategy}: {what} {value!r} is not a member ({names})")


# --------------------------------------------------------------------------
# shared pieces
# --------------------------------------------------------------------------


def _usage(results: Sequence[Any]) -> Usage:
    usages = [r.usage for r in results if getattr(r, "usage", None) is not None]
    return Usage(
        prompt_tokens=sum(u.prompt_tokens for u in usages),
        completion_tokens=sum(u.completion_tokens for u in usages),
    )


def _ordered(scores: Mapping[str, float], winner: str) -> dict[str, float]:
    """``scores`` with ``winner`` first, so that ``ClassifyResult.label`` (the
    first highest score) is the winner when scores tie."""
    return {winner: scores.get(winner, 0.0), **{k: v for k, v in scores.items() if k != winner}}


def _outputs(answers: Sequence[Mapping[int, Any]], row: int) -> list[Mapping[str, float] | None]:
    return [
        dict(a[row].scores) if row in a and isinstance(a[row], ClassifyResult) else None
        for a in answers
    ]


def _each_row(
    call: FusionCall, rule: Callable[[list[Mapping[str, float] | None]], tuple[dict, str]]
) -> list[ClassifyResult | None]:
    """Ask every member, then combine each row's answers with ``rule``
    (outputs → scores, winning label)."""
    answers = call.ask_all()
    results: list[ClassifyResult | None] = []
    for row in range(len(call.requests)):
        outputs = _outputs(answers, row)
        if not any(o is not None for o in outputs):
            results.append(None)  # no member answered: the kernel reports their errors
            continue
        scores, winner = rule(outputs)
        present = [a[row] for a in answers if row in a]
        results.append(ClassifyResult(scores=_ordered(scores, winner), usage=_usage(present)))
    return results


def _argmax(scores: Mapping[str, float]) -> str:
    return max(scores, key=scores.__getitem__)


def _fit_rows(data: FitData) -> list[list[Mapping[str, float]]]:
    """``rows[i][m]``: member ``m``'s scores on dev row ``i``."""
    return [
        [dict(data.outputs[m][i]) for m in range(len(data.members))] for i in range(len(data.gold))
    ]


# --------------------------------------------------------------------------
# vote, mean, stack
# --------------------------------------------------------------------------


def check_weighted(name: str) -> Callable[[Mapping[str, Any], Sequence[ModelCard]], dict]:
    def check(options: Mapping[str, Any], members: Sequence[ModelCard]) -> dict[str, Any]:
        _known(name, options, ("weights",))
        weights = _weights(name, options, len(members))
        return {} if weights is None else {"weights": weights}

    return check


def _predict_weighted(
    name: str, rows: Sequence[Sequence[Mapping[str, float]]], weights: Any
) -> list[str]:
    if name == "vote":
        return [arith.vote_winner(list(r), weights) for r in rows]
    return [_argmax(arith.mean(list(r), weights)) for r in rows]


def fit_weighted(name: str) -> Callable[[FitData], dict[str, Any]]:
    """Weights for ``vote``/``mean`` chosen on dev data (see the module docstring)."""

    def fit(data: FitData) -> dict[str, Any]:
        if data.options.get("weights") is not None:
            return {}  # given by hand: kept
        rows = _fit_rows(data)
        gold = list(data.gold)
        n = len(gold)
        accuracy = [
            sum(_argmax(o) == g for o, g in zip(outputs, gold, strict=True)) / n
            for outputs in data.outputs
        ]
        # a member right on every dev row is not infinitely sure: clip by half a row
        clipped = [min(max(a, 0.5 / n), 1 - 0.5 / n) for a in accuracy]
        log_odds = [max(0.0, math.log(a / (1 - a))) for a in clipped]
        candidates: dict[str, list[float] | None] = {"equal": None}
        for key, raw in (("accuracy", accuracy), ("log_odds", log_odds)):
            if sum(raw) > 0:
                candidates[key] = [round(w / sum(raw), 6) for w in raw]
        scored = {
            key: arith.accuracy(_predict_weighted(name, rows, weights), gold)
            for key, weights in candidates.items()
        }
        chosen = max(scored, key=lambda key: (scored[key], -list(scored).index(key)))
        out: dict[str, Any] = {
            "weighting": {
                "chosen": chosen,
                "dev/accuracy": scored,
                "member_dev_accuracy": accuracy,
            }
        }
        if candidates[chosen] is not None:
            out["weights"] = candidates[chosen]
        return out

    return fit


def combine_vote(call: FusionCall) -> list[ClassifyResult | None]:
    weights = call.options.get("weights")
    return _each_row(call, lambda o: (arith.vote(o, weights), arith.vote_winner(o, weights)))


def combine_mean(call: FusionCall) -> list[ClassifyResult | None]:
    weights = call.options.get("weights")

    def rule(outputs: list[Mapping[str, float] | None]) -> tuple[dict, str]:
        scores = arith.mean(outputs, weights)
        return scores, _argmax(scores)

    return _each_row(call, rule)


def check_stack(options: Mapping[str, Any], members: Sequence[ModelCard]) -> dict[str, Any]:
    _known("stack", options, ("method", "l2"))  # its weights are learned, not given
    method = options.get("method", "weights")
    if method not in ("weights", "logistic"):
        raise UsageError(f"stack: method must be weights or logistic, got {method!r}")
    if len(members) < 2:
        raise UsageError("stack: give two or more members")
    out: dict[str, Any] = {"method": method}
    if "l2" in options:
        # each of the fit's gradient steps (size 0.5) scales the weights by
        # 1 - 0.5 * l2: past 2 they grow without bound and end as NaN
        if not _number(options["l2"]) or not 0 <= options["l2"] <= 2:
            raise UsageError(
                f"stack: l2 must be a number in [0, 2], got {options['l2']!r}", param="l2"
            )
        out["l2"] = float(options["l2"])
    return out


def fit_stack(data: FitData) -> dict[str, Any]:
    rows = _fit_rows(data)
    if data.options.get("method", "weights") == "logistic":
        model = arith.fit_logistic(rows, list(data.gold), l2=data.options.get("l2", 1e-3))
        return {"model": model}
    return {"weights": arith.fit_weights(rows, list(data.gold))}


def combine_stack(call: FusionCall) -> list[ClassifyResult | None]:
    model = call.options.get("model")
    if model is not None:

        def rule(outputs: list[Mapping[str, float] | None]) -> tuple[dict, str]:
            scores = arith.predict_logistic(model, outputs)
            return scores, _argmax(scores)

        return _each_row(call, rule)
    return combine_mean(call)


# --------------------------------------------------------------------------
# cascade
# --------------------------------------------------------------------------


def check_cascade(options: Mapping[str, Any], members: Sequence[ModelCard]) -> dict[str, Any]:
    _known(
        "cascade",
        options,
        ("thresholds", "target_accuracy", "target_ratio", "margin_sd", "calibration"),
    )
    if len(members) < 2:
        raise UsageError("cascade: give two or more members, cheapest first")
    out: dict[str, Any] = {}
    thresholds = options.get("thresholds")
    if thresholds is not None:
        if (
            isinstance(thresholds, str)
            or not isinstance(thresholds, Sequence)
            or len(thresholds) != len(members) - 1
            or not all(t is None or (_number(t) and 0 <= t <= 1) for t in thresholds)
        ):
            raise UsageError(
                f"cascade: thresholds must be {len(members) - 1} numbers in [0, 1] (or null:"
                " always ask the next member), one per member but the last"
            )
        out["thresholds"] = [None if t is None else float(t) for t in thresholds]
    if "target_accuracy" in options and "target_ratio" in options:
        raise UsageError("cascade: give target_accuracy or target_ratio, not both")
    if "target_accuracy" in options:
        out["target_accuracy"] = _fraction("cascade", "target_accuracy", options["target_accuracy"])
    else:
        out["target_ratio"] = _fraction(
            "cascade", "target_ratio", options.get("target_ratio", 0.99)
        )
    margin = options.get("margin_sd", 1.0)
    if not _number(margin) or not 0 <= margin <= 5:
        raise UsageError(f"cascade: margin_sd must be a number in [0, 5], got {margin!r}")
    out["margin_sd"] = float(margin)
    return out


def fit_cascade(data: FitData) -> dict[str, Any]:
    if data.options.get("thresholds") is not None:
        return {}  # given by hand: kept
    gold = list(data.gold)
    confidences = [[max(o.values()) for o in outputs] for outputs in data.outputs]
    correct = [
        [_argmax(o) == g for o, g in zip(outputs, gold, strict=True)] for outputs in data.outputs
    ]
    accuracies = [sum(c) / len(c) for c in correct]
    if "target_accuracy" in data.options:
        target = float(data.options["target_accuracy"])
    else:
        target = float(data.options.get("target_ratio", 0.99)) * max(accuracies)
    # A target met exactly on dev rows is missed about half the time on new
    # rows: aim margin_sd standard errors of the dev accuracy above it.
    margin = float(data.options.get("margin_sd", 1.0))
    aimed = min(1.0, target + margin * math.sqrt(target * (1 - target) / len(gold)))
    found = arith.calibrate_cascade(confidences, correct, list(data.seconds), aimed)
    return {
        "thresholds": found["thresholds"],
        "calibration": {
            "target_accuracy": target,
            "aimed_accuracy": aimed,
            "member_accuracy": accuracies,
            **{k: v for k, v in found.items() if k != "thresholds"},
        },
    }


def combine_cascade(call: FusionCall) -> list[ClassifyResult]:
    thresholds = call.options.get("thresholds")
    if thresholds is None:
        raise UsageError("this cascade was never calibrated: recreate it with dev data")
    last = len(call.members) - 1
    final: dict[int, ClassifyResult] = {}
    answered_by: dict[int, int] = {}
    rows = list(range(len(call.requests)))
    spent: dict[int, list[Any]] = {row: [] for row in rows}
    for member in range(last + 1):
        if not rows:
            break
        answers = call.ask(member, rows)
        escalate = []
        for row in rows:
            result = answers.get(row)
            if result is None:  # the budget stopped it here: the last answer stands
                continue
            spent[row].append(result)
            final[row], answered_by[row] = result, member
            threshold = thresholds[member] if member < last else None
            confident = threshold is not None and max(result.scores.values()) >= threshold
            if member < last and not confident:
                escalate.append(row)
        rows = escalate
    out: list[Any] = []
    for row in range(len(call.requests)):
        by = answered_by.get(row)
        call.note(
            row,
            answered_by=None if by is None else call.members[by].ref,
            escalations=max(len(spent[row]) - 1, 0),
        )
        out.append(attrs.evolve(final[row], usage=_usage(spent[row])) if row in final else None)
    return out


# --------------------------------------------------------------------------
# router
# --------------------------------------------------------------------------

_RULE_KEYS = ("member", "contains", "regex", "min_chars", "max_chars")


def _text(request: Any) -> str:
    if isinstance(request, CompletionRequest):
        return request.prompt
    if isinstance(request, ChatRequest):
        users = [m.content for m in request.messages if m.role == "user"]
        return users[-1] if users else request.messages[-1].content
    return str(getattr(request, "text", ""))


def check_router(options: Mapping[str, Any], members: Sequence[ModelCard]) -> dict[str, Any]:
    _known("router", options, ("rules", "default", "embedder"))  # routes are learned
    if len(members) < 2:
        raise UsageError("router: give two or more members")
    rules = options.get("rules") or []
    if not isinstance(rules, Sequence) or isinstance(rules, str):
        raise UsageError("router: rules must be a list of tables")
    checked = []
    for number, rule in enumerate(rules, 1):
        if not isinstance(rule, Mapping):
            raise UsageError(f"router: rule {number} must be a table")
        _known(f"router rule {number}", rule, _RULE_KEYS)
        if "member" not in rule or len(rule) < 2:
            raise UsageError(
                f"router: rule {number} needs member and a condition"
                " (contains, regex, min_chars, max_chars)"
            )
        out = {"member": _member_index("router", rule["member"], members, "rule member")}
        if "contains" in rule:
            if not isinstance(rule["contains"], str) or not rule["contains"]:
                raise UsageError(f"router: rule {number}: contains must be a non-empty string")
            out["contains"] = rule["contains"]
        if "regex" in rule:
            try:
                re.compile(rule["regex"])
            except (re.error, TypeError) as exc:
                raise UsageError(f"router: rule {number}: bad regex: {exc}") from None
            out["regex"] = rule["regex"]
        for key in ("min_chars", "max_chars"):
            if key in rule:
                value = rule[key]
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise UsageError(f"router: rule {number}: {key} must be an integer >= 0")
                out[key] = value
        checked.append(out)
    default = _member_index("router", options.get("default", len(members) - 1), members, "default")
    embedder = options.get("embedder")
    if embedder is not None and (not isinstance(embedder, str) or not embedder):
        raise UsageError("router: embedder must be a model name")
    if not checked and embedder is None:
        raise UsageError(
            "router: give rules, or an embedder (a model that embeds) to learn routes on dev data"
        )
    out_options: dict[str, Any] = {"rules": checked, "default": default}
    if embedder is not None:
        out_options["embedder"] = embedder
    return out_options


def _matches(rule: Mapping[str, Any], text: str) -> bool:
    if "contains" in rule and rule["contains"].casefold() not in text.casefold():
        return False
    if "regex" in rule and re.search(rule["regex"], text) is None:
        return False
    if "min_chars" in rule and len(text) < rule["min_chars"]:
        return False
    return not ("max_chars" in rule and len(text) > rule["max_chars"])


def _embed(helper: Callable[..., list[Any]], embedder: str, texts: Sequence[str]) -> list[list]:
    vectors: list[list[float]] = []
    for at in range(0, len(texts), 32):
        batch = [EmbedRequest(text=t) for t in texts[at : at + 32]]
        vectors.extend(list(r.vector) for r in helper(embedder, Capability.EMBED, batch))
    return vectors


def fit_router(data: FitData) -> dict[str, Any]:
    embedder = data.options.get("embedder")
    if embedder is None:
        return {}  # rules only: nothing to learn
    if data.helper is None:
        raise UsageError("router: the kernel gave no way to call the embedder")
    gold = list(data.gold)
    confidences = [[max(o.values()) for o in outputs] for outputs in data.outputs]
    correct = [
        [_argmax(o) == g for o, g in zip(outputs, gold, strict=True)] for outputs in data.outputs
    ]
    targets = arith.route_targets(correct, list(data.seconds), confidences)
    vectors = _embed(data.helper, embedder, list(data.texts))
    centroids = arith.fit_centroids(vectors, targets, len(data.members))
    routes = [targets.count(m) / len(targets) for m in range(len(data.members))]
    return {"centroids": centroids, "routes": routes}


def needs_router_fit(options: Mapping[str, Any]) -> bool:
    return not options.get("rules") and "centroids" not in options


def combine_router(call: FusionCall) -> list[Any]:
    rules = call.options.get("rules") or []
    default = int(call.options.get("default", len(call.members) - 1))
    centroids = call.options.get("centroids")
    texts = [_text(r) for r in call.requests]
    chosen: list[int] = []
    vectors: list[list[float]] | None = None
    if centroids and not rules:
        vectors = _embed(call.helper, call.options["embedder"], texts)
    for row, text in enumerate(texts):
        if vectors is not None:
            member = arith.nearest(centroids, vectors[row])
            call.note(row, route=call.members[member].ref, routed_by="centroid")
        else:
            matched = next((i for i, rule in enumerate(rules) if _matches(rule, text)), None)
            member = default if matched is None else rules[matched]["member"]
            call.note(row, route=call.members[member].ref, rule=matched)
        chosen.append(member)
    out: list[Any] = [None] * len(texts)
    for member in sorted(set(chosen)):
        rows = [row for row, m in enumerate(chosen) if m == member]
        for row, result in call.ask(member, rows).items():
            out[row] = result
    return out


# --------------------------------------------------------------------------
# rank
# --------------------------------------------------------------------------


def check_rank(options: Mapping[str, Any], members: Sequence[ModelCard]) -> dict[str, Any]:
    _known("rank", options, ("judge", "judge_by", "judge_label"))
    judge = options.get("judge")
    if not isinstance(judge, str) or not judge:
        raise UsageError("rank: give judge = MODEL, the model that scores the answers")
    judge_by = options.get("judge_by", "likelihood")
    if judge_by not in ("likelihood", "classifier"):
        raise UsageError(f"rank: judge_by must be likelihood or classifier, got {judge_by!r}")
    out = {"judge": judge, "judge_by": judge_by}
    if judge_by == "classifier":
        label = options.get("judge_label")
        if not isinstance(label, str) or not label:
            raise UsageError("rank: judge_by = classifier needs judge_label (the 'good' label)")
        out["judge_label"] = label
    return out


def _answer_text(result: Any) -> str:
    text = getattr(result, "text", None)
    if isinstance(text, str):
        return text
    return str(getattr(getattr(result, "message", None), "content", ""))


def _prompt_text(request: Any) -> str:
    if isinstance(request, ChatRequest):
        return "".join(f"{m.role}: {m.content}\n" for m in request.messages) + "assistant: "
    return str(getattr(request, "prompt", ""))


def combine_rank(call: FusionCall) -> list[Any]:
    answers = call.ask_all()
    judge, judge_by = call.options["judge"], call.options.get("judge_by", "likelihood")
    out: list[Any] = []
    for row, request in enumerate(call.requests):
        candidates = [(m, a[row]) for m, a in enumerate(answers) if row in a]
        if not candidates:
            out.append(None)
            continue
        prompt = _prompt_text(request)
        texts = [_answer_text(result) for _, result in candidates]
        if judge_by == "classifier":
            verdicts = call.helper(
                judge,
                Capability.CLASSIFY,
                [ClassifyRequest(text=f"{prompt}{text}") for text in texts],
            )
            label = call.options["judge_label"]
            scores = [float(v.scores.get(label, 0.0)) for v in verdicts]
        else:
            (scored,) = call.helper(
                judge,
                Capability.COMPLETE,
                [CompletionRequest(prompt=prompt, score_continuations=tuple(texts))],
            )
            scores = [
                lp / max(1, len(text.split()))
                for lp, text in zip(scored.continuation_logprobs, texts, strict=True)
            ]
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
        call.note(
            row,
            judge=judge,
            judge_scores={
                call.members[m].ref: s for (m, _), s in zip(candidates, scores, strict=True)
            },
            chosen=call.members[candidates[best][0]].ref,
        )
        out.append(candidates[best][1])
    return out


# --------------------------------------------------------------------------

STRATEGIES = (
    FusionStrategySpec(
        name="vote",
        description="majority of the members' labels (optional weights)",
        capabilities=CLASSIFY,
        combine=combine_vote,
        check=check_weighted("vote"),
        fit=fit_weighted("vote"),
    ),
    FusionStrategySpec(
        name="mean",
        description="average of the members' label probabilities (optional weights)",
        capabilities=CLASSIFY,
        combine=combine_mean,
        check=check_weighted("mean"),
        fit=fit_weighted("mean"),
    ),
    FusionStrategySpec(
        name="stack",
        description="weights or a logistic model over the members, learned on dev data",
        capabilities=CLASSIFY,
        combine=combine_stack,
        check=check_stack,
        fit=fit_stack,
        needs_fit=True,
    ),
    FusionStrategySpec(
        name="cascade",
        description="cheap members first; the next only when confidence is below a"
        " threshold calibrated on dev data",
        capabilities=CLASSIFY,
        combine=combine_cascade,
        check=check_cascade,
        fit=fit_cascade,
        needs_fit=lambda options: options.get("thresholds") is None,
    ),
    FusionStrategySpec(
        name="router",
        description="one member per request, by rules or by routes learned on dev data",
        capabilities=ANY,
        combine=combine_router,
        check=check_router,
        fit=fit_router,
        needs_fit=needs_router_fit,
    ),
    FusionStrategySpec(
        name="rank",
        description="every member answers; a judge model picks the best answer",
        capabilities=GENERATE,
        combine=combine_rank,
        check=check_rank,
    ),
)


@hookimpl
def llmos_register_fusion_strategies(register: Callable[[FusionStrategySpec], None]) -> None:
    for spec in STRATEGIES:
        register(spec)
