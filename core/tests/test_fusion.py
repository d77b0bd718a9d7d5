"""Fusions end to end: real kernel, real registry, real plugin models.

The members are ``table`` models (:mod:`tables`: a plugin distribution
written to a folder on ``sys.path``, found through entry points): each answers
from a table in its card's options — fixed label probabilities per text,
answers per prompt, log-probabilities per continuation, vectors per text — and
records every text it was asked (``llmos_table.CALLS``), optionally after a
delay. So every expected output below is computed by hand from the tables.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.cli import main
from llmos.errors import ConfigError, LlmosError, NotFoundError, UsageError
from llmos.fusion.service import _folds
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.testing import EventRecorder, serve_in_thread
from llmos.types import (
    Budget,
    Capability,
    ChatMessage,
    ChatRequest,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    EmbedRequest,
    FitData,
    FusionStrategySpec,
    ModelCard,
    ModelFormat,
)

from .tables import add, install, table_kernel

# member tables: texts "x", "y", "z"
M1 = {"x": {"pos": 0.9, "neg": 0.1}, "y": {"pos": 0.4, "neg": 0.6}, "z": {"pos": 0.7, "neg": 0.3}}
M2 = {"x": {"pos": 0.2, "neg": 0.8}, "y": {"pos": 0.3, "neg": 0.7}, "z": {"pos": 0.1, "neg": 0.9}}
M3 = {"x": {"pos": 0.6, "neg": 0.4}, "y": {"pos": 0.55, "neg": 0.45}, "z": {"pos": 0.5, "neg": 0.5}}


@pytest.fixture
def table_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from install(tmp_path / "site", monkeypatch)


@pytest.fixture
def make_kernel(tmp_path: Path, table_module: Any) -> Iterator[Callable[..., Kernel]]:
    kernels: list[Kernel] = []

    def make(*overrides: str, recorder: EventRecorder | None = None) -> Kernel:
        kernel = table_kernel(tmp_path / "home", overrides, recorder)
        if not kernels:
            for name, table in (("m1", M1), ("m2", M2), ("m3", M3)):
                add(kernel, name, scores=table)
        kernel.start()
        kernels.append(kernel)
        return kernel

    yield make
    for kernel in kernels:
        kernel.stop()


def classify(kernel: Kernel, model: str, texts: list[str], **kw: Any) -> list[Any]:
    return kernel.call(model, Capability.CLASSIFY, [ClassifyRequest(text=t, **kw) for t in texts])


def calls(table_module: Any, name: str) -> list[str]:
    return list(table_module().CALLS.get(name, []))


# --------------------------------------------------------------------------
# vote and mean: the combination rules, by hand
# --------------------------------------------------------------------------


def test_mean_averages_the_members_probabilities(make_kernel) -> None:
    recorder = EventRecorder()
    kernel = make_kernel(recorder=recorder)
    card = kernel.fusions.create("avg", strategy="mean", members=["m1", "m2", "m3"])
    assert card.ref == "avg@1" and card.format == ModelFormat.FUSION
    assert card.parents == ("m1@1", "m2@1", "m3@1") and card.tasks == ("text-classification",)
    assert card.options["fusion"]["strategy"] == "mean"

    x, y = classify(kernel, "avg", ["x", "y"])
    # x: pos (0.9 + 0.2 + 0.6) / 3 = 0.5667; y: pos (0.4 + 0.3 + 0.55) / 3 = 0.4167
    assert x.scores["pos"] == pytest.approx(1.7 / 3) and x.label == "pos"
    assert y.scores["neg"] == pytest.approx(1.75 / 3) and y.label == "neg"
    meta = x.meta["fusion"]
    assert meta["name"] == "avg@1" and meta["strategy"] == "mean" and meta["skipped"] == []
    assert [m["model"] for m in meta["members"]] == ["m1@1", "m2@1", "m3@1"]
    assert [m["agreed"] for m in meta["members"]] == [True, False, True]
    assert [m["label"] for m in meta["members"]] == ["pos", "neg", "pos"]
    assert all(m["answered"] and m["latency_s"] >= 0 for m in meta["members"])
    assert x.usage.prompt_tokens == 3  # one per member

    weighted = kernel.fusions.create(
        "avg-w", strategy="mean", members=["m1", "m2", "m3"], options={"weights": [1, 3, 0]}
    )
    (wx,) = classify(kernel, weighted.ref, ["x"])
    # pos (1·0.9 + 3·0.2 + 0·0.6) / 4 = 0.375
    assert wx.scores["pos"] == pytest.approx(0.375) and wx.label == "neg"

    kernel.bus.stop()
    events = [e for e in recorder.events if e.kind == "fusion.call"]
    assert events and events[0].model == "avg@1" and events[0].fields["rows"] == 2
    members = events[0].fields["members"]
    assert members["m1@1"] == {**members["m1@1"], "asked": 2, "answered": 2, "agreed": 2}
    assert members["m2@1"]["agreed"] == 1  # agrees on y only
    assert events[0].fields["member_calls"] == 6


def test_vote_counts_labels_and_breaks_ties_by_mean_probability(make_kernel) -> None:
    kernel = make_kernel()
    kernel.fusions.create("v3", strategy="vote", members=["m1", "m2", "m3"])
    x, y = classify(kernel, "v3", ["x", "y"])
    # x: m1 pos, m2 neg, m3 pos -> pos 2/3; y: m1 neg, m2 neg, m3 pos -> neg 2/3
    assert x.label == "pos" and x.scores["pos"] == pytest.approx(2 / 3)
    assert y.label == "neg" and y.scores["neg"] == pytest.approx(2 / 3)
    kernel.fusions.create("v2", strategy="vote", members=["m1", "m2"])
    (z,) = classify(kernel, "v2", ["z"])
    # z: m1 pos (0.7), m2 neg (0.9): a 1-1 tie; mean pos 0.4 < neg 0.6 -> neg
    assert z.label == "neg" and z.scores == {"neg": 0.5, "pos": 0.5}


# --------------------------------------------------------------------------
# learned strategies: stack, cascade, router
# --------------------------------------------------------------------------


def test_stack_learns_to_trust_the_member_that_is_right(make_kernel) -> None:
    kernel = make_kernel()
    # "good" is right on every dev row; "bad" is confidently wrong
    texts = [f"t{i}" for i in range(8)]
    gold = ["pos" if i % 2 else "neg" for i in range(8)]
    good = {
        t: {"pos": 0.8, "neg": 0.2} if g == "pos" else {"pos": 0.2, "neg": 0.8}
        for t, g in zip(texts, gold, strict=True)
    }
    bad = {
        t: {"pos": 0.05, "neg": 0.95} if g == "pos" else {"pos": 0.95, "neg": 0.05}
        for t, g in zip(texts, gold, strict=True)
    }
    add(kernel, "good", scores=good)
    add(kernel, "bad", scores=bad)
    dev = [{"text": t, "label": g} for t, g in zip(texts, gold, strict=True)]
    with pytest.raises(UsageError, match="learns from dev data"):
        kernel.fusions.create("st", strategy="stack", members=["bad", "good"])
    card = kernel.fusions.create("st", strategy="stack", members=["bad", "good"], dev=dev)
    weights = card.options["fusion"]["options"]["weights"]
    assert weights[1] > 0.9 and sum(weights) == pytest.approx(1.0)
    fit = card.options["fusion"]["fit"]
    assert fit["rows"] == 8 and fit["members"]["good@1"]["dev/accuracy"] == 1.0
    assert fit["members"]["bad@1"]["dev/accuracy"] == 0.0
    assert card.scores["dev/accuracy"] == 1.0
    results = classify(kernel, "st", texts)
    assert [r.label for r in results] == gold  # a plain mean would be wrong on every row

    logistic = kernel.fusions.create(
        "st-log",
        strategy="stack",
        members=["bad", "good"],
        options={"method": "logistic"},
        dev=dev,
    )
    assert logistic.options["fusion"]["options"]["model"]["labels"]
    assert [r.label for r in classify(kernel, "st-log", texts)] == gold

    # three members: an ablation is re-fitted on the dev rows the fusion kept
    kernel.fusions.create("st3", strategy="stack", members=["bad", "good", "m1"], dev=dev)
    analysis = kernel.fusions.analyse("st3", dev)
    by = {m["model"]: m for m in analysis["members"]}
    assert analysis["accuracy"] == 1.0
    assert by["good@1"]["how"] == "re-fitted on its dev rows without it"
    # without good, only bad (wrong on every row) and m1 (0.5/0.5 on these texts) are
    # left: the re-fitted fusion loses what good gave; without bad, nothing is lost
    assert by["good@1"]["marginal"] > 0.4 and by["bad@1"]["marginal"] == 0.0


def test_cascade_escalates_only_unconfident_rows(make_kernel, table_module) -> None:
    kernel = make_kernel()
    # cheap: right and confident on a, b; right but unsure on c; wrong and unsure on d
    cheap = {
        "a": {"pos": 0.95, "neg": 0.05},
        "b": {"pos": 0.1, "neg": 0.9},
        "c": {"pos": 0.6, "neg": 0.4},
        "d": {"pos": 0.55, "neg": 0.45},
    }
    strong = {
        "a": {"pos": 0.9, "neg": 0.1},
        "b": {"pos": 0.2, "neg": 0.8},
        "c": {"pos": 0.8, "neg": 0.2},
        "d": {"pos": 0.3, "neg": 0.7},
    }
    add(kernel, "cheap", scores=cheap)
    add(kernel, "strong", scores=strong, delay_s=0.01)
    dev = [
        {"text": "a", "label": "pos"},
        {"text": "b", "label": "neg"},
        {"text": "c", "label": "pos"},
        {"text": "d", "label": "neg"},
    ]
    card = kernel.fusions.create("cas", strategy="cascade", members=["cheap", "strong"], dev=dev)
    options = card.options["fusion"]["options"]
    # the strong member is right on all 4; target 0.99·1.0 needs every row right:
    # d (0.55) must escalate, c (0.6) may stay; the cheapest threshold is 0.6
    assert options["thresholds"] == [pytest.approx(0.6)]
    assert options["calibration"]["met"] is True
    # aimed one standard error above the target: min(1, 0.99 + sqrt(0.99·0.01/4))
    assert options["calibration"]["aimed_accuracy"] == 1.0
    assert options["margin_sd"] == 1.0
    assert card.scores["dev/accuracy"] == 1.0
    assert card.options["fusion"]["fit"]["member_calls_per_row"] == pytest.approx(1.25)

    table_module().CALLS.clear()
    results = classify(kernel, "cas", ["a", "b", "c", "d"])
    assert [r.label for r in results] == ["pos", "neg", "pos", "neg"]
    assert calls(table_module, "strong") == ["d"], "only the unconfident row went on"
    metas = [r.meta["fusion"] for r in results]
    assert [m["answered_by"] for m in metas] == ["cheap@1", "cheap@1", "cheap@1", "strong@1"]
    assert [m["escalations"] for m in metas] == [0, 0, 0, 1]
    assert metas[0]["skipped"] == ["strong@1"] and metas[3]["skipped"] == []

    # target 0.75 (3 of 4): met by the cheap member alone, unless aimed a standard
    # error higher (0.75 + sqrt(0.75·0.25/4) = 0.97), which needs d escalated
    exact = kernel.fusions.create(
        "cas-exact", strategy="cascade", members=["cheap", "strong"], dev=dev,
        options={"target_accuracy": 0.75, "margin_sd": 0},
    )  # fmt: skip
    assert exact.options["fusion"]["options"]["calibration"]["answered_by"] == [1.0, 0.0]
    safe = kernel.fusions.create(
        "cas-safe", strategy="cascade", members=["cheap", "strong"], dev=dev,
        options={"target_accuracy": 0.75},
    )  # fmt: skip
    calibration = safe.options["fusion"]["options"]["calibration"]
    assert calibration["aimed_accuracy"] == pytest.approx(0.75 + (0.75 * 0.25 / 4) ** 0.5)
    assert calibration["answered_by"] == [0.75, 0.25] and safe.scores["dev/accuracy"] == 1.0
    with pytest.raises(UsageError, match="margin_sd must be a number"):
        kernel.fusions.create(
            "bad",
            strategy="cascade",
            members=["cheap", "strong"],
            options={"margin_sd": -1},
            dev=dev,
        )
    with pytest.raises(UsageError, match="thresholds must be 1 numbers"):
        kernel.fusions.create(
            "bad",
            strategy="cascade",
            members=["cheap", "strong"],
            options={"thresholds": [0.5, 0.5]},
        )
    by_hand = kernel.fusions.create(
        "cas-hand", strategy="cascade", members=["cheap", "strong"], options={"thresholds": [0.99]}
    )
    assert "fit" not in by_hand.options["fusion"]
    assert [r.meta["fusion"]["answered_by"] for r in classify(kernel, "cas-hand", ["a"])] == [
        "strong@1"
    ]


def test_router_by_rules_and_by_learned_centroids(make_kernel, table_module) -> None:
    kernel = make_kernel()
    kernel.fusions.create(
        "r-rules",
        strategy="router",
        members=["m1", "m2", "m3"],
        options={"rules": [{"member": "m2", "contains": "Y"}, {"member": 0, "max_chars": 1}]},
    )
    table_module().CALLS.clear()
    results = classify(kernel, "r-rules", ["y", "x", "zz"])
    # "y" contains y (any case) -> m2; "x" is 1 char -> m1; "zz" -> the default, the last (m3)
    assert [r.meta["fusion"]["route"] for r in results] == ["m2@1", "m1@1", "m3@1"]
    assert [r.meta["fusion"]["rule"] for r in results] == [0, 1, None]
    assert results[0].scores == M2["y"] and results[1].scores == M1["x"]
    assert calls(table_module, "m1") == ["x"] and calls(table_module, "m2") == ["y"]

    # learned: texts near (1, 0) only m1 gets right, texts near (0, 1) only m2
    vectors = {
        "p1": [1.0, 0.1],
        "p2": [0.9, 0.0],
        "q1": [0.1, 1.0],
        "q2": [0.0, 0.8],
        "new-p": [1.0, 0.2],
        "new-q": [0.2, 1.0],
    }
    add(kernel, "emb", capabilities=["embed"], vectors=vectors)
    add(
        kernel,
        "left",
        scores={
            "p1": {"pos": 0.9, "neg": 0.1},
            "p2": {"pos": 0.8, "neg": 0.2},
            "q1": {"pos": 0.9, "neg": 0.1},
            "q2": {"pos": 0.9, "neg": 0.1},
        },
    )
    add(
        kernel,
        "right",
        scores={
            "p1": {"pos": 0.1, "neg": 0.9},
            "p2": {"pos": 0.1, "neg": 0.9},
            "q1": {"pos": 0.1, "neg": 0.9},
            "q2": {"pos": 0.2, "neg": 0.8},
        },
    )
    dev = [
        {"text": "p1", "label": "pos"},
        {"text": "p2", "label": "pos"},
        {"text": "q1", "label": "neg"},
        {"text": "q2", "label": "neg"},
    ]
    with pytest.raises(UsageError, match="learns from dev data"):
        kernel.fusions.create(
            "r-learn", strategy="router", members=["left", "right"], options={"embedder": "emb"}
        )
    card = kernel.fusions.create(
        "r-learn",
        strategy="router",
        members=["left", "right"],
        options={"embedder": "emb"},
        dev=dev,
    )
    assert card.options["fusion"]["options"]["routes"] == [0.5, 0.5]
    assert card.scores["dev/accuracy"] == 1.0
    new_p, new_q = classify(kernel, "r-learn", ["new-p", "new-q"])
    assert (
        new_p.meta["fusion"]["route"] == "left@1"
        and new_p.meta["fusion"]["routed_by"] == "centroid"
    )
    assert new_q.meta["fusion"]["route"] == "right@1"


def test_router_rules_serve_generation_and_rank_picks_the_judges_favourite(
    make_kernel,
) -> None:
    kernel = make_kernel()
    add(kernel, "g1", capabilities=["complete", "chat"], answers={"Q": "paris", "hi": "hello"})
    add(kernel, "g2", capabilities=["complete", "chat"], answers={"Q": "london", "hi": "hey"})
    add(
        kernel,
        "judge",
        capabilities=["complete"],
        logprobs={"paris": -1.0, "london": -3.0, "hello": -9.0, "hey": -2.0},
    )
    kernel.fusions.create("best", strategy="rank", members=["g1", "g2"], options={"judge": "judge"})
    (answer,) = kernel.call("best", Capability.COMPLETE, [CompletionRequest(prompt="Q")])
    assert answer.text == "paris"
    meta = answer.meta["fusion"]
    assert meta["chosen"] == "g1@1" and meta["judge_scores"] == {"g1@1": -1.0, "g2@1": -3.0}
    assert [m["agreed"] for m in meta["members"]] == [True, False]
    (chat,) = kernel.call(
        "best", Capability.CHAT, [ChatRequest(messages=[ChatMessage("user", "hi")])]
    )
    assert chat.message.content == "hey"  # -2 beats -9
    with pytest.raises(UsageError, match="give judge"):
        kernel.fusions.create("nojudge", strategy="rank", members=["g1", "g2"])

    kernel.fusions.create(
        "gen-route",
        strategy="router",
        members=["g1", "g2"],
        options={"rules": [{"member": "g2", "regex": "^h"}]},
    )
    a, b = kernel.call(
        "gen-route",
        Capability.COMPLETE,
        [CompletionRequest(prompt="hi"), CompletionRequest(prompt="Q")],
    )
    assert (a.text, b.text) == ("hey", "london")  # default: the last member

    # streaming routes work too: the fused answer in one chunk, then its end
    chunks = list(kernel.stream("best", CompletionRequest(prompt="Q")))
    assert "".join(c.text for c in chunks) == "paris" and chunks[-1].finish_reason == "stop"


# --------------------------------------------------------------------------
# budgets, nesting, zero-shot members, refusals
# --------------------------------------------------------------------------


def test_budgets_cap_members_and_latency(make_kernel, table_module) -> None:
    kernel = make_kernel()
    add(kernel, "slow", scores={"x": {"pos": 0.0, "neg": 1.0}}, delay_s=1.5)
    kernel.fusions.create("with-slow", strategy="mean", members=["m1", "slow"])
    (capped,) = classify(kernel, "with-slow", ["x"], budget=Budget(max_members=1))
    meta = capped.meta["fusion"]
    assert capped.scores == M1["x"], "only the first member counted"
    assert [m["model"] for m in meta["members"]] == ["m1@1"] and meta["skipped"] == ["slow@1"]
    assert meta["budget"] == {"max_members": 1, "max_latency_ms": None, "exhausted": True}

    started = time.monotonic()
    (quick,) = classify(kernel, "with-slow", ["x"], budget=Budget(max_latency_ms=300))
    assert time.monotonic() - started < 1.2, "it did not wait for the slow member"
    assert quick.scores == M1["x"]
    slow_entry = quick.meta["fusion"]["members"][1]
    assert slow_entry["model"] == "slow@1" and slow_entry["answered"] is False
    assert quick.meta["fusion"]["budget"]["exhausted"] is True

    (full,) = classify(kernel, "with-slow", ["x"])
    # no budget: both answer; pos (0.9 + 0) / 2
    assert full.scores["pos"] == pytest.approx(0.45) and "budget" not in full.meta["fusion"]

    # the first member always answers, even past the budget: never an empty answer
    kernel.fusions.create("slow-only", strategy="mean", members=["slow"])
    (first,) = classify(kernel, "slow-only", ["x"], budget=Budget(max_latency_ms=50))
    assert first.scores["neg"] == 1.0 and first.meta["fusion"]["members"][0]["answered"]


def test_a_failing_member_is_left_out_and_named_when_none_answers(make_kernel) -> None:
    kernel = make_kernel()
    add(kernel, "failing", fail=True)
    kernel.fusions.create("one-bad", strategy="mean", members=["m1", "failing"])
    (x,) = classify(kernel, "one-bad", ["x"])
    assert x.scores == M1["x"], "the failing member is left out"
    entry = x.meta["fusion"]["members"][1]
    assert entry["model"] == "failing@1" and entry["answered"] is False
    assert "table says no" in entry["error"]
    kernel.fusions.create("all-bad", strategy="vote", members=["failing"])
    with pytest.raises(LlmosError, match=r"no member answered \(failing@1: .*table says no"):
        classify(kernel, "all-bad", ["x"])
    with pytest.raises(NotFoundError, match="needs provider 'nowhere'"):
        kernel.registry.register(ModelCard(name="elsewhere", provider="nowhere"))
        kernel.fusions.create("f", strategy="mean", members=["m1", "elsewhere"])


def test_fusions_nest_and_cycles_are_refused(make_kernel) -> None:
    kernel = make_kernel()
    kernel.fusions.create("inner", strategy="mean", members=["m1", "m2"])
    kernel.fusions.create(
        "outer", strategy="vote", members=["inner", "m3"], options={"weights": [2, 1]}
    )
    (x,) = classify(kernel, "outer", ["x"])
    # inner(x) = pos 0.55 -> pos (weight 2); m3 pos -> pos 1.0
    assert x.label == "pos" and x.scores["pos"] == pytest.approx(1.0)
    inner_entry = x.meta["fusion"]["members"][0]
    assert inner_entry["model"] == "inner@1"
    assert inner_entry["meta"]["fusion"]["name"] == "inner@1"
    with pytest.raises(UsageError, match=r"would contain itself: inner -> outer@1 -> inner@1"):
        kernel.fusions.create("inner", strategy="mean", members=["outer", "m1"])


def test_zero_shot_members_are_asked_their_labels_and_mapped(make_kernel) -> None:
    kernel = make_kernel()
    add(kernel, "words", scores={"x": {"positive": 0.3, "negative": 0.7, "other": 0.0}})
    kernel.fusions.create(
        "mixed",
        strategy="mean",
        members=[
            "m1",
            {
                "model": "words",
                "labels": ["negative", "positive"],
                "map": {"negative": "neg", "positive": "pos"},
            },
        ],
    )
    (x,) = classify(kernel, "mixed", ["x"])
    # m1 pos 0.9; words asked over [negative, positive] -> pos 0.3; mean pos 0.6
    assert x.scores["pos"] == pytest.approx(0.6) and set(x.scores) == {"pos", "neg"}


def test_bad_fusions_are_refused_before_anything_is_registered(make_kernel) -> None:
    kernel = make_kernel()
    with pytest.raises(UsageError, match=r"fusion strategy 'blend' is not installed.*mean"):
        kernel.fusions.create("f", strategy="blend", members=["m1"])
    with pytest.raises(NotFoundError, match="model 'ghost' not found"):
        kernel.fusions.create("f", strategy="mean", members=["m1", "ghost"])
    with pytest.raises(UsageError, match="2 weights for 3 members"):
        kernel.fusions.create(
            "f", strategy="mean", members=["m1", "m2", "m3"], options={"weights": [1, 2]}
        )
    with pytest.raises(UsageError, match="unknown option"):
        kernel.fusions.create("f", strategy="vote", members=["m1", "m2"], options={"wieghts": 1})
    with pytest.raises(UsageError, match="model name"):
        kernel.fusions.create("../f", strategy="mean", members=["m1"])
    with pytest.raises(UsageError, match="dev row 1: needs a label"):
        kernel.fusions.create("f", strategy="stack", members=["m1", "m2"], dev=[{"text": "x"}])
    assert kernel.fusions.list() == []


# --------------------------------------------------------------------------
# config, HTTP, CLI
# --------------------------------------------------------------------------


def test_config_fusions_are_registered_at_start_and_fitted_on_first_load(
    make_kernel, tmp_path: Path, table_module
) -> None:
    make_kernel().stop()  # registers the members
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"text": t, "label": "neg"}) + "\n" for t in ("x", "y")))
    kernel = make_kernel(
        'fusions.cfg.strategy="stack"',
        'fusions.cfg.members=["m1", "m2"]',
        f'fusions.cfg.dev="{dev}"',
        'fusions.broken.strategy="nope"',
        'fusions.broken.members=["m1"]',
    )
    card = kernel.registry.store.get("cfg")
    assert card.format == ModelFormat.FUSION and card.created_by == "config"
    assert card.options["fusion"]["dev_file"] == str(dev)
    with pytest.raises(NotFoundError):
        kernel.registry.store.get("broken")  # logged and skipped, not fatal
    table_module().CALLS.clear()
    x, y = classify(kernel, "cfg", ["x", "y"])
    assert calls(table_module, "m1")[:2] == ["x", "y"], "fitted on the dev file first"
    # m2 says neg on both (always right); m1 is wrong on x: the fit trusts m2
    assert x.label == "neg" and y.label == "neg"
    assert list((kernel.home / "fusions").glob("fit-cfg-*.json")), "the fit is cached"


def test_fusions_over_http_with_budget_and_meta(make_kernel) -> None:
    kernel = make_kernel()
    with serve_in_thread(kernel) as url:
        created = httpx.post(
            f"{url}/api/fusions",
            json={
                "name": "web",
                "strategy": "mean",
                "members": ["m1", "m2@1"],
                "tags": ["demo"],
            },
        )
        assert created.status_code == 201, created.text
        assert created.json()["name"] == "web" and "demo" in created.json()["tags"]
        listed = httpx.get(f"{url}/api/fusions").json()["data"]
        assert [c["name"] for c in listed] == ["web"]
        assert httpx.get(f"{url}/api/fusions/web").json()["parents"] == ["m1@1", "m2@1"]
        names = [s["name"] for s in httpx.get(f"{url}/api/fusions/strategies").json()["data"]]
        assert {"vote", "mean", "stack", "cascade", "router", "rank"} <= set(names)

        answer = httpx.post(
            f"{url}/api/classify",
            json={
                "model": "web",
                "texts": ["x"],
                "llmos": {"max_members": 1},
            },
        ).json()["results"][0]
        assert answer["scores"] == M1["x"]
        meta = answer["llmos"]["meta"]["fusion"]
        assert meta["skipped"] == ["m2@1"] and meta["budget"]["exhausted"] is True
        plain = httpx.post(f"{url}/api/classify", json={"model": "m1", "texts": ["x"]}).json()
        assert "llmos" not in plain["results"][0], "plain models keep their shape"
        assert any(m["id"] == "web" for m in httpx.get(f"{url}/v1/models").json()["data"])

        bad = httpx.post(
            f"{url}/api/fusions", json={"name": "w2", "strategy": "nope", "members": ["m1"]}
        )
        assert bad.status_code == 400 and "not installed" in bad.json()["error"]["message"]
        budget = httpx.post(
            f"{url}/api/classify",
            json={"model": "web", "texts": ["x"], "llmos": {"max_members": 0}},
        )
        assert budget.status_code in (400, 422)
        outside = httpx.post(
            f"{url}/api/fusions",
            json={"name": "w3", "strategy": "stack", "members": ["m1", "m2"], "dev": "/etc/passwd"},
        )
        assert outside.status_code == 400 and "dev:" in outside.json()["error"]["message"]


def test_a_relative_dev_path_over_http_is_a_400_naming_dev(
    make_kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    kernel = make_kernel()
    dev = kernel.home / "data" / "dev.jsonl"
    dev.parent.mkdir()
    rows = [("x", "neg"), ("y", "neg"), ("z", "pos")]
    dev.write_text("".join(json.dumps({"text": t, "label": g}) + "\n" for t, g in rows))
    # In the daemon's data folder, "data/dev.jsonl" would resolve to the file
    # above: the client meant its own folder, which the daemon cannot see.
    monkeypatch.chdir(kernel.home)
    body = {"name": "st", "strategy": "stack", "members": ["m1", "m2"]}
    with serve_in_thread(kernel) as url:
        for relative in ("data/dev.jsonl", "./data/dev.jsonl"):
            refused = httpx.post(f"{url}/api/fusions", json={**body, "dev": relative})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == "dev"
            assert error["message"].startswith(f"dev {relative!r} refused: it is a relative path")
            assert "the daemon's working directory is not yours" in error["message"]
        assert kernel.fusions.list() == []
        created = httpx.post(f"{url}/api/fusions", json={**body, "dev": str(dev)})
        assert created.status_code == 201, created.text
        assert created.json()["options"]["fusion"]["fit"]["rows"] == 3


def test_a_fusion_refuses_response_format_and_tools_naming_the_field(make_kernel) -> None:
    # a fusion passes neither on to its members: a 400 naming the field, not
    # a fused free-text answer where JSON or a tool call was asked for
    kernel = make_kernel()
    add(kernel, "g1", capabilities=["complete", "chat"], answers={"hi": "hello"})
    add(kernel, "g2", capabilities=["complete", "chat"], answers={"hi": "hey"})
    rules = {"rules": [{"member": "g2", "regex": "^h"}]}
    kernel.fusions.create("pair", strategy="router", members=["g1", "g2"], options=rules)
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    asks = {
        "response_format": {"response_format": {"type": "json_object"}},
        "tools": {"tools": [tool], "tool_choice": "required"},
    }
    with serve_in_thread(kernel) as url:
        body = {"model": "pair", "messages": [{"role": "user", "content": "hi"}]}
        assert httpx.post(f"{url}/v1/chat/completions", json=body).status_code == 200
        for field, extra in asks.items():
            refused = httpx.post(f"{url}/v1/chat/completions", json={**body, **extra})
            assert refused.status_code == 400, refused.text
            error = refused.json()["error"]
            assert error["param"] == field and "does not support" in error["message"]


def test_the_fuse_commands(
    make_kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    make_kernel().stop()  # registers the members
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMOS_LOAD_PLUGINS", "llmos-table")
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nx,pos\ny,neg\nz,pos\n")

    def run(*args: str) -> tuple[int, str, str]:
        code = main(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    code, out, err = run(
        "fuse", "create", "cli-cas", "--strategy", "cascade", "--member", "m2",
        "--member", '{"model": "m1"}', "--option", "target_ratio=1.0", "--dev", str(dev),
        "--json",
    )  # fmt: skip
    assert code == 0, err
    card = json.loads(out)
    assert card["name"] == "cli-cas" and card["options"]["fusion"]["fit"]["rows"] == 3
    code, out, _ = run("fuse", "show", "cli-cas")
    assert code == 0 and "m1@1" in out and "cascade" in out
    code, out, _ = run("fuse", "list", "--json")
    assert [f["model"] for f in json.loads(out)] == ["cli-cas@1"]
    code, _, err = run("fuse", "create", "x", "--strategy", "mean", "--member", "{bad")
    assert code != 0 and "not valid JSON" in err
    code, out, _ = run("fuse", "strategies", "--json")
    assert {"cascade", "vote"} <= {s["name"] for s in json.loads(out)}
    code, out, err = run("classify", "cli-cas", "y", "--json")
    assert code == 0, err
    (answer,) = json.loads(out)
    assert answer["label"] == "neg"
    assert answer["llmos"]["meta"]["fusion"]["name"] == "cli-cas@1"


def test_a_deployment_table_member_and_config_errors(make_kernel) -> None:
    kernel = make_kernel(
        'models.dep.provider="table"', "models.dep.options={scores={x={pos=1.0, neg=0.0}}}"
    )
    card = kernel.fusions.create("with-dep", strategy="mean", members=["dep", "m2"])
    assert card.parents == ("dep", "m2@1")
    (x,) = classify(kernel, "with-dep", ["x"])
    assert x.scores["pos"] == pytest.approx(0.6)  # (1.0 + 0.2) / 2
    with pytest.raises(ConfigError):
        kernel.fusions._from_table("t", {"strategy": "mean", "members": ["m1"], "typo": 1})
    (e,) = kernel.call("m1", Capability.CLASSIFY, [ClassifyRequest(text="x")])
    assert e.meta == {}
    with pytest.raises(UsageError, match="max_members must be an integer >= 1"):
        Budget(max_members=0)
    assert EmbedRequest(text="a").budget is None


def test_eval_on_a_fusion_reports_members_marginals_and_savings(
    make_kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    kernel = make_kernel()
    kernel.fusions.create("avg3", strategy="mean", members=["m1", "m2", "m3"])
    cheap = {"a": {"pos": 0.95, "neg": 0.05}, "b": {"pos": 0.6, "neg": 0.4}}
    strong = {"a": {"pos": 0.9, "neg": 0.1}, "b": {"pos": 0.2, "neg": 0.8}}
    add(kernel, "cheap", scores=cheap)
    add(kernel, "strong", scores=strong)
    kernel.fusions.create(
        "cas2", strategy="cascade", members=["cheap", "strong"], options={"thresholds": [0.9]}
    )
    kernel.stop()
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMOS_LOAD_PLUGINS", "llmos-table")
    data = tmp_path / "eval.csv"
    data.write_text("text,label\nx,pos\ny,neg\nz,pos\n")
    assert main(["eval", "avg3", "--data", str(data), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    fusion = report["fusion"]
    # mean of all three: x pos, y neg, z neg (0.433) -> 2 of 3 right, as served
    assert report["accuracy"] == pytest.approx(2 / 3) == fusion["accuracy"]
    by = {m["model"]: m for m in fusion["members"]}
    # alone: m1 right on all, m2 on y only, m3 on x and z (its 0.5/0.5 tie reads pos)
    assert [by[m]["accuracy"] for m in ("m1@1", "m2@1", "m3@1")] == pytest.approx(
        [1.0, 1 / 3, 2 / 3]
    )
    # without m1: mean(m2, m3) right on y only; without m2: all right; without m3: x, y
    assert by["m1@1"]["marginal"] == pytest.approx(2 / 3 - 1 / 3)
    assert by["m2@1"]["marginal"] == pytest.approx(2 / 3 - 1.0)
    assert by["m3@1"]["marginal"] == pytest.approx(0.0)
    assert fusion["member_calls"] == 9 and fusion["calls_saved_share"] == 0.0
    assert fusion["best_member"]["model"] == "m1@1"

    data.write_text("text,label\na,pos\nb,neg\n")
    assert main(["eval", "cas2", "--data", str(data)]) == 0
    out = capsys.readouterr().out
    assert "member calls 3 of 4 (25%" in out, out
    assert main(["eval", "cas2", "--data", str(data), "--json"]) == 0
    cas = json.loads(capsys.readouterr().out)["fusion"]
    # a is answered by the cheap member (0.95 >= 0.9); b goes on to the strong one
    assert [m["asked_share"] for m in cas["members"]] == [1.0, 0.5]
    assert cas["accuracy"] == 1.0 and cas["member_calls_per_row"] == 1.5
    # the strongest member was asked for half the rows
    assert cas["best_member"]["model"] == "strong@1" and cas["best_member"]["asked_share"] == 0.5
    assert cas["members"][0]["how"] == "the other member alone"


def test_a_config_dev_file_under_an_unknown_user_is_a_clean_error(
    make_kernel: Callable[..., Kernel],
) -> None:
    # pathlib raises RuntimeError for "~nosuchuser": that was a 500 on first use.
    kernel = make_kernel()
    kernel.fusions.create(
        "st", strategy="stack", members=["m1", "m2"], dev_file="~nosuchuser-llmos/dev.jsonl"
    )
    with pytest.raises(LlmosError, match=r"cannot expand '~nosuchuser-llmos' \(no such user\)"):
        classify(kernel, "st", ["x"])
    with pytest.raises(UsageError, match="no such user"):
        kernel.fusions.analyse("st", [{"text": "x", "label": "pos"}])


# --------------------------------------------------------------------------
# never worse than the best member on dev data (issue 18)
# --------------------------------------------------------------------------


def _dev(texts: list[str], gold: list[str]) -> list[dict[str, str]]:
    return [{"text": t, "label": g} for t, g in zip(texts, gold, strict=True)]


def _right(p: float, gold: str) -> dict[str, float]:
    """Scores that give the gold label probability ``p``."""
    other = "neg" if gold == "pos" else "pos"
    return {gold: p, other: 1 - p}


def test_a_fusion_that_loses_on_dev_serves_its_best_member_and_says_why(
    make_kernel, table_module, tmp_path: Path
) -> None:
    kernel = make_kernel()
    texts = [f"r{i}" for i in range(10)]
    gold = ["pos" if i % 2 else "neg" for i in range(10)]
    # strong: right on r0..r7, but only just (0.55); wrong on r8, r9 -> 0.8.
    # weak: right on r0..r5, confidently wrong on r6..r9 -> 0.6. On r6, r7 the
    # weak member's 0.99 outvotes the strong one under every weighting tried
    # (equal, accuracy 0.57, log-odds 0.77): the fusion is right on r0..r5 only.
    pairs = list(enumerate(zip(texts, gold, strict=True)))
    strong = {t: _right(0.55 if i < 8 else 0.45, g) for i, (t, g) in pairs}
    weak = {t: _right(0.99 if i < 6 else 0.01, g) for i, (t, g) in pairs}
    add(kernel, "strong", scores=strong)
    add(kernel, "weak", scores=weak)
    dev = _dev(texts, gold)

    # a vote weighted by dev accuracy is the strong member's vote: it ties it and is kept
    voted = kernel.fusions.create("voted", strategy="vote", members=["weak", "strong"], dev=dev)
    assert voted.options["fusion"]["options"]["weighting"]["chosen"] == "accuracy"
    assert voted.options["fusion"]["options"]["weighting"]["dev/accuracy"]["equal"] == 0.6
    assert voted.options["fusion"]["fit"]["fallback"] is None
    assert voted.scores["dev/accuracy"] == pytest.approx(0.8)

    for strategy in ("mean",):
        card = kernel.fusions.create(
            f"lost-{strategy}", strategy=strategy, members=["weak", "strong"], dev=dev
        )
        fit = card.options["fusion"]["fit"]
        assert fit["members"]["strong@1"]["dev/accuracy"] == pytest.approx(0.8)
        assert fit["members"]["weak@1"]["dev/accuracy"] == pytest.approx(0.6)
        assert fit["fused"]["dev/accuracy"] == pytest.approx(0.6)
        reason = (
            "on dev data (10 rows) the fusion scored 0.6000 < strong@1 0.8000:"
            " strong@1 answers alone"
        )
        assert fit["fallback"] == {"member": 1, "model": "strong@1", "reason": reason}
        assert fit["out_of_fold"] == {
            "folds": 0,
            "why": "10 dev rows, fewer than two folds of 10: judged on the rows it was fitted on",
        }
        assert fit["fused"]["out_of_fold/accuracy"] is None
        assert card.scores["dev/accuracy"] == pytest.approx(0.8), "what it serves scores"
        table_module().CALLS.clear()
        results = classify(kernel, card.ref, texts)
        assert [r.label for r in results] == [max(strong[t], key=strong[t].get) for t in texts]
        meta = results[0].meta["fusion"]
        assert meta["fallback"] == "strong@1" and meta["reason"] == reason
        assert [m["model"] for m in meta["members"]] == ["strong@1"]
        assert meta["skipped"] == ["weak@1"]
        assert calls(table_module, "weak") == [], "the weaker member is not asked at all"
        # llmos eval measures what is served
        assert kernel.fusions.analyse(card.ref, dev)["accuracy"] == pytest.approx(0.8)

    # a card from before the guard (no fallback in its options) still loads and fuses
    old = kernel.registry.store.get("lost-mean")
    conf = dict(old.options["fusion"])
    conf["options"] = {k: v for k, v in conf["options"].items() if k != "fallback"}
    conf["fit"] = {k: v for k, v in conf["fit"].items() if k not in ("fused", "fallback")}
    kernel.registry.register(
        ModelCard(
            name="old-mean",
            provider=old.provider,
            format=old.format,
            tasks=old.tasks,
            parents=old.parents,
            options={"fusion": conf},
        ),
        "test",
    )
    (r6,) = classify(kernel, "old-mean", ["r6"])
    assert r6.label == "pos" and "fallback" not in r6.meta["fusion"]  # weak's 0.99 wins

    # a config fusion with a dev file is guarded on its first load too
    path = tmp_path / "lost.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in dev))
    kernel.fusions._from_table(
        "cfg-lost", {"strategy": "mean", "members": ["weak", "strong"], "dev": str(path)}
    )
    (answer,) = classify(kernel, "cfg-lost", ["r6"])
    assert answer.label == "neg" and answer.meta["fusion"]["fallback"] == "strong@1"


class Memorise:
    """A test plugin strategy, registered through the real hook: its fit learns
    the dev rows by heart (right on every one of them); on any other text it
    answers with its first member."""

    @hookimpl
    def llmos_register_fusion_strategies(self, register: Callable[..., None]) -> None:
        def fit(data: FitData) -> dict[str, Any]:
            return {"memory": dict(zip(data.texts, data.gold, strict=True))}

        def combine(call: Any) -> list[Any]:
            first = call.ask(0)
            memory = call.options.get("memory") or {}
            return [
                ClassifyResult(scores={memory[r.text]: 1.0}) if r.text in memory else first.get(row)
                for row, r in enumerate(call.requests)
            ]

        register(
            FusionStrategySpec(
                name="memorise",
                description="the dev rows by heart",
                capabilities=frozenset({Capability.CLASSIFY}),
                combine=combine,
                fit=fit,
                needs_fit=True,
            )
        )


def _weak_and_strong(kernel: Kernel, n: int) -> list[dict[str, str]]:
    """Dev rows ``s0..`` and two members: ``weak`` right on 60% of them,
    ``strong`` on 80%."""
    texts = [f"s{i}" for i in range(n)]
    gold = ["pos" if i % 2 else "neg" for i in range(n)]
    rows = list(enumerate(zip(texts, gold, strict=True)))
    add(kernel, "weak", scores={t: _right(0.9 if i % 10 < 6 else 0.1, g) for i, (t, g) in rows})
    add(kernel, "strong", scores={t: _right(0.9 if i % 10 < 8 else 0.1, g) for i, (t, g) in rows})
    return _dev(texts, gold)


def test_a_fit_that_memorises_dev_is_judged_out_of_fold_and_falls_back(
    make_kernel, table_module
) -> None:
    kernel = make_kernel(recorder=Memorise())
    dev = _weak_and_strong(kernel, 30)
    card = kernel.fusions.create("memo", strategy="memorise", members=["weak", "strong"], dev=dev)
    fit = card.options["fusion"]["fit"]
    # in sample it knows every row; on a fold it was not fitted on it is the weak member
    assert fit["fused"] == {"dev/accuracy": 1.0, "out_of_fold/accuracy": pytest.approx(0.6)}
    check = fit["out_of_fold"]
    assert (check["folds"], check["rows"], check["stratified"]) == (3, 30, "by label")
    assert check["accuracy"] == pytest.approx(0.6) and check["seconds"] >= 0
    reason = (
        "on dev data (30 rows) the fusion scored 0.6000 out of fold (3 folds; 1.0000 on the"
        " rows it was fitted on) < strong@1 0.8000: strong@1 answers alone"
    )
    assert fit["fallback"] == {"member": 1, "model": "strong@1", "reason": reason}
    assert card.scores == {"dev/accuracy": 0.8, "dev/accuracy_out_of_fold": 0.8}
    table_module().CALLS.clear()
    results = classify(kernel, card.ref, ["s8", "s9"])
    assert [r.label for r in results] == ["pos", "neg"], "strong's (wrong) answers, not memory"
    assert results[0].meta["fusion"]["fallback"] == "strong@1"
    assert results[0].meta["fusion"]["reason"] == reason
    assert calls(table_module, "weak") == []


def test_a_fusion_better_out_of_fold_is_kept_and_a_router_embeds_each_row_once(
    make_kernel, table_module
) -> None:
    kernel = make_kernel()
    texts = [f"v{i}" for i in range(30)]
    gold = ["pos" if i % 3 else "neg" for i in range(30)]
    # each member is wrong on its own third of the rows: the majority is always right
    for member in range(3):
        scores = {
            t: _right(0.1 if i % 3 == member else 0.9, g)
            for i, (t, g) in enumerate(zip(texts, gold, strict=True))
        }
        add(kernel, f"third{member}", scores=scores)
    card = kernel.fusions.create(
        "thirds", strategy="vote", members=["third0", "third1", "third2"], dev=_dev(texts, gold)
    )
    fit = card.options["fusion"]["fit"]
    assert fit["fused"] == {"dev/accuracy": 1.0, "out_of_fold/accuracy": 1.0}
    assert fit["out_of_fold"]["folds"] == 3 and fit["fallback"] is None
    guard = fit["guard"]
    assert (guard["judged"], guard["only_fusion_right"], guard["only_member_right"]) == (
        "out_of_fold",
        10,
        0,
    )
    assert guard["margin"] == pytest.approx(math.sqrt((1 / 3 - 1 / 9) / 30))
    assert fit["best_member"]["dev/accuracy"] == pytest.approx(2 / 3)
    assert card.scores == {"dev/accuracy": 1.0, "dev/accuracy_out_of_fold": 1.0}
    assert [r.label for r in classify(kernel, "thirds", texts)] == gold

    # a router learned on 20 rows: near (1, 0) only "left" is right, near (0, 1) only
    # "right"; the embedder answers each dev row once for the fit and all of its folds
    near = [f"p{i}" for i in range(10)] + [f"q{i}" for i in range(10)]
    vectors = {t: [1.0, i / 20] if t[0] == "p" else [i / 20, 1.0] for i, t in enumerate(near)}
    add(kernel, "emb", capabilities=["embed"], vectors=vectors)
    labels = {t: "pos" if i % 2 else "neg" for i, t in enumerate(near)}
    add(kernel, "left", scores={t: _right(0.9 if t[0] == "p" else 0.1, labels[t]) for t in near})
    add(kernel, "right", scores={t: _right(0.9 if t[0] == "q" else 0.1, labels[t]) for t in near})
    table_module().CALLS.clear()
    router = kernel.fusions.create(
        "routed",
        strategy="router",
        members=["left", "right"],
        options={"embedder": "emb"},
        dev=[{"text": t, "label": labels[t]} for t in near],
    )
    fit = router.options["fusion"]["fit"]
    assert fit["out_of_fold"]["folds"] == 2 and fit["fused"]["out_of_fold/accuracy"] == 1.0
    assert fit["fallback"] is None
    assert sorted(calls(table_module, "emb")) == sorted(near), "each row embedded once"


def test_dev_folds_are_stratified_and_the_same_every_time() -> None:
    gold = ["a"] * 20 + ["b"] * 10 + ["c"] * 3
    fold = _folds(gold, 3)
    assert fold == _folds(list(gold), 3)
    assert fold != _folds(gold, 3)[::-1], "shuffled within each label"
    for k in range(3):
        mine = [g for g, f in zip(gold, fold, strict=True) if f == k]
        assert len(mine) == 11
        assert mine.count("c") == 1 and mine.count("b") in (3, 4)


def test_a_fusion_that_wins_on_dev_keeps_fusing_with_weights_fitted_there(
    make_kernel, table_module
) -> None:
    kernel = make_kernel()
    texts = [f"w{i}" for i in range(12)]
    gold = ["pos" if i % 2 else "neg" for i in range(12)]
    # a: right on all but w8, w9 (where it is unsure) -> 10/12; b: right on w0..w5
    # and w8, w9 (sure) -> 8/12. Equal weights lose w6, w7 (b's 0.8 against a's
    # 0.78) -> 10/12, no better than a; weights by dev accuracy (a 0.5556) get all 12.
    a_right = [0.9] * 6 + [0.78, 0.78, 0.45, 0.45, 0.9, 0.9]
    b_right = [0.9] * 6 + [0.2, 0.2, 0.95, 0.95, 0.45, 0.45]
    for name, right in (("a", a_right), ("b", b_right)):
        rows = zip(texts, gold, right, strict=True)
        add(kernel, name, scores={t: _right(p, g) for t, g, p in rows})
    dev = _dev(texts, gold)
    card = kernel.fusions.create("won", strategy="mean", members=["a", "b"], dev=dev)
    options = card.options["fusion"]["options"]
    assert options["weighting"]["chosen"] == "accuracy"
    assert options["weighting"]["dev/accuracy"] == {
        "equal": pytest.approx(10 / 12),
        "accuracy": 1.0,
        "log_odds": 1.0,
    }
    assert options["weights"] == pytest.approx([10 / 18, 8 / 18], abs=1e-6)
    fit = card.options["fusion"]["fit"]
    assert fit["fallback"] is None and fit["fused"]["dev/accuracy"] == 1.0
    assert card.scores["dev/accuracy"] == 1.0
    results = classify(kernel, "won", texts)
    assert [r.label for r in results] == gold
    assert "fallback" not in results[6].meta["fusion"]
    assert [m["model"] for m in results[6].meta["fusion"]["members"]] == ["a@1", "b@1"]
    # weights given by hand are kept: the fit only checks them (and guards them)
    given = kernel.fusions.create(
        "won-given",
        strategy="mean",
        members=["a", "b"],
        options={"weights": [1, 1]},
        dev=_dev(texts, gold),
    )
    assert given.options["fusion"]["options"]["weights"] == [1.0, 1.0]
    assert given.options["fusion"]["fit"]["fused"]["dev/accuracy"] == pytest.approx(10 / 12)
    # equal to a on dev, but each right where the other is wrong (2 rows each):
    # not better beyond noise, and twice the calls -> a answers alone
    fit = given.options["fusion"]["fit"]
    assert fit["guard"] == {
        "judged": "dev",
        "accuracy": pytest.approx(10 / 12),
        "bar": pytest.approx(10 / 12),
        "margin": pytest.approx(math.sqrt(4 / 12 / 12)),
        "only_fusion_right": 2,
        "only_member_right": 2,
    }
    assert fit["fallback"]["reason"] == (
        "on dev data (12 rows) the fusion scored 0.8333 within one standard error (0.1667)"
        " of a@1 0.8333 (it alone was right on 2 rows, a@1 alone on 2): a@1 answers alone"
    )
    assert card.options["fusion"]["fit"]["guard"]["margin"] == pytest.approx(
        math.sqrt((2 / 12 - (2 / 12) ** 2) / 12)
    ), "won by 2 rows, margin under that: kept"


def test_a_fusion_created_without_dev_data_warns_of_the_risk(
    make_kernel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    kernel = make_kernel()
    for name in ("g1", "g2"):
        kernel.registry.register(
            ModelCard(name=name, provider="table", tasks=("chat",), options={}), "test"
        )
    rules = {"rules": [{"member": "g1", "contains": "x"}]}
    route = kernel.fusions.create(
        "chat-route",
        strategy="router",
        members=["g1", "g2"],
        options=rules,
    )
    assert route.tasks == ("chat",) and kernel.fusions.risk(route) is None, "dev rows classify"
    with serve_in_thread(kernel) as url:
        body = httpx.post(
            f"{url}/api/fusions",
            json={"name": "web-risk", "strategy": "vote", "members": ["m1", "m2"]},
        ).json()
        (warning,) = body["warnings"]
        assert "created without dev data" in warning and "best member" in warning
        assert warning.endswith(
            "llmos fuse create web-risk --strategy vote --member m1@1 --member m2@1 --dev DEV_FILE"
        )
        single = httpx.post(
            f"{url}/api/fusions",
            json={"name": "one", "strategy": "mean", "members": ["m1"]},
        ).json()
        assert "warnings" not in single, "one member: nothing to lose against"
    kernel.stop()
    monkeypatch.setenv("LLMOS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("LLMOS_LOAD_PLUGINS", "llmos-table")
    code = main(
        ["fuse", "create", "risky", "--strategy", "mean", "--member", "m1", "--member", "m2",
         "--option", "weights=[1,2]", "--json"]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and json.loads(out)["name"] == "risky", "--json output stays JSON"
    assert "warning: risky@1 was created without dev data" in err
    assert "--option 'weights=[1, 2]' --dev DEV_FILE" in err
    dev = tmp_path / "dev.csv"
    dev.write_text("text,label\nx,pos\ny,neg\nz,pos\n")
    code = main(
        ["fuse", "create", "checked", "--strategy", "mean", "--member", "m1", "--member", "m2",
         "--dev", str(dev)]
    )  # fmt: skip
    out, err = capsys.readouterr()
    assert code == 0 and "warning" not in err
    # m1 is right on all three rows, m2 on y only: equal weights lose z (0.4), weights
    # by dev accuracy (0.75, 0.25) get all three
    assert "fused on dev: 1.0000" in out and "weights: accuracy (dev accuracy equal 0.6667" in out
    assert "fallback" not in out


def test_a_stack_l2_that_would_diverge_is_refused(make_kernel) -> None:
    # l2 = 1e6 made every logistic weight NaN, and the fit a 400 about NaN weights
    kernel = make_kernel()
    dev = [{"text": "x", "label": "pos"}, {"text": "y", "label": "neg"}]
    with pytest.raises(UsageError, match=r"l2 must be a number in \[0, 2\], got 1000000.0"):
        kernel.fusions.create(
            "st", strategy="stack", members=["m1", "m2"], dev=dev,
            options={"method": "logistic", "l2": 1e6},
        )  # fmt: skip
    card = kernel.fusions.create(
        "st", strategy="stack", members=["m1", "m2"], dev=dev,
        options={"method": "logistic", "l2": 2},
    )  # fmt: skip
    assert card.options["fusion"]["options"]["l2"] == 2.0
