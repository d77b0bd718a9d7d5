"""The ``merge`` fusion strategy: LoRA adapters tuned here, merged in weight
space, and the merged adapter served by the transformers provider like a
tuned one; and the checks that refuse members before any work."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import pytest
import safetensors.torch
import torch

from llmos.errors import UsageError
from llmos.plugin.manager import PluginManager
from llmos.types import (
    ClassifyRequest,
    CompletionRequest,
    FusionStrategySpec,
    LoadRequest,
    MergeRequest,
    ModelCard,
    ModelFormat,
    Sampling,
    TuningRequest,
    TuningResult,
)
from llmos_peft import fusion

from .conftest import sentiment_data, sentiment_rows, sft_data

PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
LEARN = {"epochs": 6, "batch_size": 8, "learning_rate": 3e-2}
LABELS = ("negative", "positive")


def _tune(
    pm: PluginManager,
    root: Path,
    job: str,
    method: str,
    base: ModelCard,
    base_path: Path,
    data: Mapping[str, Any],
    task: str = "text-classification",
    seed: int = 0,
    **hyperparameters: Any,
) -> TuningResult:
    request = TuningRequest(
        base=base,
        task=task,
        data=data,
        labels=LABELS if task == "text-classification" else (),
        hyperparameters=hyperparameters,
        base_path=base_path,
        output_dir=root / job / "output",
        checkpoint_dir=root / job / "checkpoints",
        seed=seed,
    )
    return pm.tuning_methods[method].spec.run(request)


@pytest.fixture(scope="module")
def texts() -> list[str]:
    return [row["text"] for row in sentiment_data(8, 8, 24)["test"]]


@pytest.fixture(scope="module")
def members(
    pm: PluginManager,
    bert_card: ModelCard,
    bert_dir: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, ModelCard]:
    """Three LoRA classifiers on the tiny BERT: ``a`` and ``b`` (rank 8) of
    other seeds and rows, ``c`` of rank 4."""
    root = tmp_path_factory.mktemp("members")
    other = {
        "train": sentiment_rows(64, 11),
        "dev": sentiment_rows(32, 12),
        "test": sentiment_rows(32, 13),
    }
    a = _tune(pm, root, "a", "lora", bert_card, bert_dir, sentiment_data(64, 32, 32), **LEARN)
    b = _tune(pm, root, "b", "lora", bert_card, bert_dir, other, seed=1, **LEARN)
    c = _tune(pm, root, "c", "lora", bert_card, bert_dir, other, seed=2, epochs=1, r=4)
    # as the registry would hold them: named and versioned, the base as first parent
    return {
        key: attrs.evolve(result.card, name=f"member-{key}", version=1)
        for key, result in {"a": a, "b": b, "c": c}.items()
    }


@pytest.fixture(scope="module")
def spec(pm: PluginManager) -> FusionStrategySpec:
    return pm.fusion_strategies["merge"].spec


def _merge(
    spec: FusionStrategySpec,
    cards: list[ModelCard],
    base: ModelCard,
    base_path: Path,
    out: Path,
    paths: list[Path] | None = None,
    **options: Any,
) -> ModelCard:
    """What the kernel does: check when the fusion is created, then merge."""
    assert spec.check is not None and spec.merge is not None
    checked = spec.check(options, cards)
    request = MergeRequest(
        name="merged",
        members=cards,
        member_paths=paths or [Path(card.source) for card in cards],
        options=checked,
        output_dir=out,
        base=base,
        base_path=base_path,
    )
    return spec.merge(request)


def _served(pm: PluginManager, card: ModelCard, base: ModelCard, tmp: Path) -> Any:
    request = LoadRequest(
        card=card,
        path=Path(card.source),
        base=base,
        base_path=Path(base.source),
        cache_dir=tmp / "cache",
    )
    return pm.providers["transformers"].spec.load(request)


def _scores(model: Any, texts: list[str]) -> torch.Tensor:
    results = model.classify([ClassifyRequest(text=text) for text in texts])
    return torch.tensor([[r.scores[label] for label in LABELS] for r in results])


def _adapter(card: ModelCard) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(Path(card.source) / "adapter_model.safetensors"))


def _config(card: ModelCard) -> dict[str, Any]:
    return json.loads((Path(card.source) / "adapter_config.json").read_text())


# --------------------------------------------------------------------------
# Registration and a light import
# --------------------------------------------------------------------------


def test_the_strategy_is_registered_through_the_entry_point(pm: PluginManager) -> None:
    registered = pm.fusion_strategies["merge"]
    assert registered.plugin == "peft"
    assert registered.spec.merge is fusion.merge
    assert registered.spec.check is fusion.check
    assert registered.spec.combine is None
    assert "LoRA" in registered.spec.description


def test_registering_and_checking_import_neither_torch_nor_peft() -> None:
    code = (
        "import sys\n"
        "from llmos.types import ModelCard\n"
        "from llmos_peft import plugin\n"
        "specs = []\n"
        "plugin.llmos_register_fusion_strategies(specs.append)\n"
        "card = lambda n: ModelCard(name=n, provider='transformers', format='adapter',"
        " parents=('base',), options={'method': 'lora', 'task': 'causal'})\n"
        "specs[0].check({'combination_type': 'ties'}, [card('a'), card('b')])\n"
        "heavy = [m for m in ('torch', 'peft', 'transformers') if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------
# Merging real adapters
# --------------------------------------------------------------------------


def test_linear_weights_pick_a_member_or_mix_them(
    pm: PluginManager,
    spec: FusionStrategySpec,
    members: dict[str, ModelCard],
    bert_card: ModelCard,
    bert_dir: Path,
    texts: list[str],
    tmp_path: Path,
) -> None:
    a, b = members["a"], members["b"]
    score = {
        key: _scores(_served(pm, card, bert_card, tmp_path), texts)
        for key, card in (("a", a), ("b", b))
    }
    assert not torch.allclose(score["a"], score["b"], atol=1e-3)  # two different members
    merged: dict[str, torch.Tensor] = {}
    for weights in ([1, 0], [0, 1], [0.5, 0.5], [1, 1]):
        key = ",".join(str(w) for w in weights)
        card = _merge(
            spec,
            [a, b],
            bert_card,
            bert_dir,
            tmp_path / key,
            combination_type="linear",
            weights=weights,
        )
        assert card.format == ModelFormat.ADAPTER and card.source == str(tmp_path / key)
        merged[key] = _scores(_served(pm, card, bert_card, tmp_path), texts)
    # a weight of 0 leaves a member out, its head included
    assert torch.allclose(merged["1,0"], score["a"], atol=1e-5)
    assert torch.allclose(merged["0,1"], score["b"], atol=1e-5)
    # equal weights: something of both, neither member; the weights' size counts
    for other in (score["a"], score["b"], merged["1,1"]):
        assert (merged["0.5,0.5"] - other).abs().max() > 1e-3
    # the mixed adapter's A and B are the weighted sums of the members'
    sa, sb = _adapter(a), _adapter(b)
    mixed = _adapter(ModelCard(name="m", provider="transformers", source=str(tmp_path / "0.5,0.5")))
    scaling = 16 / 8  # the members' lora_alpha / r
    name = next(n for n in sa if "lora_A" in n)
    expected = (0.5 * scaling) ** 0.5 * (sa[name] + sb[name])
    assert torch.allclose(mixed[name], expected, atol=1e-6)
    head = next(n for n in sa if "classifier" in n and n.endswith("weight"))
    assert torch.allclose(mixed[head], (sa[head] + sb[head]) / 2, atol=1e-6)


def test_ties_and_dare_ties_write_an_adapter_served_like_a_tuned_one(
    pm: PluginManager,
    spec: FusionStrategySpec,
    members: dict[str, ModelCard],
    bert_card: ModelCard,
    bert_dir: Path,
    texts: list[str],
    tmp_path: Path,
) -> None:
    a, b = members["a"], members["b"]
    tuned = {p.name for p in Path(a.source).iterdir() if p.is_file()}
    for kind in ("ties", "dare_ties"):
        out = tmp_path / kind
        card = _merge(spec, [a, b], bert_card, bert_dir, out, combination_type=kind, density=0.7)
        names = {p.name for p in out.rglob("*")}
        assert not [n for n in names if n.endswith(PICKLES)], names
        assert {"adapter_config.json", "adapter_model.safetensors", "llmos_tuning.json"} <= names
        assert {"tokenizer.json", "tokenizer_config.json"} <= names
        assert names <= tuned | {"README.md"}, names - tuned  # a tuned adapter's layout
        assert card.provider == "transformers"
        assert card.format == ModelFormat.ADAPTER
        assert card.tasks == ("text-classification",)
        assert card.options == {"method": "lora", "task": "classifier", "labels": list(LABELS)}
        assert card.parents == (bert_card.ref,)
        assert card.parameters == sum(t.numel() for t in _adapter(card).values())
        config = _config(card)
        assert config["peft_type"] == "LORA" and config["r"] == 8
        assert config["lora_alpha"] == 8 and not config.get("use_rslora")
        assert config["modules_to_save"] == ["classifier", "score"]  # as PEFT names heads
        record = json.loads((out / "llmos_tuning.json").read_text())
        assert record["method"] == "lora" and record["labels"] == list(LABELS)
        assert record["fusion"]["members"] == [a.ref, b.ref]
        assert record["fusion"]["options"]["combination_type"] == kind
        assert record["fusion"]["options"]["density"] == 0.7
        model = _served(pm, card, bert_card, tmp_path)
        assert model.labels == LABELS
        scores = _scores(model, texts)
        assert torch.allclose(scores.sum(-1), torch.ones(len(texts)), atol=1e-5)

    # DARE drops values at random: seeded, so the same options give the same adapter
    again = _merge(
        spec,
        [a, b],
        bert_card,
        bert_dir,
        tmp_path / "again",
        combination_type="dare_ties",
        density=0.7,
    )
    other_seed = _merge(
        spec,
        [a, b],
        bert_card,
        bert_dir,
        tmp_path / "seed",
        combination_type="dare_ties",
        density=0.7,
        seed=5,
    )
    first = _adapter(
        ModelCard(name="x", provider="transformers", source=str(tmp_path / "dare_ties"))
    )
    second, third = _adapter(again), _adapter(other_seed)
    assert all(torch.equal(first[n], second[n]) for n in first)
    assert not all(torch.equal(first[n], third[n]) for n in first)


def test_cat_and_svd_merge_members_of_different_ranks(
    pm: PluginManager,
    spec: FusionStrategySpec,
    members: dict[str, ModelCard],
    bert_card: ModelCard,
    bert_dir: Path,
    texts: list[str],
    tmp_path: Path,
) -> None:
    a, c = members["a"], members["c"]
    cat = _merge(spec, [a, c], bert_card, bert_dir, tmp_path / "cat", weights=[1, 0])
    assert _config(cat)["r"] == 12  # cat, the default: the ranks add up
    # exact: with c weighted 0, it is a again
    expected = _scores(_served(pm, a, bert_card, tmp_path), texts)
    got = _scores(_served(pm, cat, bert_card, tmp_path), texts)
    assert torch.allclose(got, expected, atol=1e-5)
    svd = _merge(
        spec, [a, c], bert_card, bert_dir, tmp_path / "svd", combination_type="svd", svd_rank=6
    )
    assert _config(svd)["r"] == 6
    assert _served(pm, svd, bert_card, tmp_path).labels == LABELS


def test_an_sft_merge_generates(
    pm: PluginManager,
    spec: FusionStrategySpec,
    llama_card: ModelCard,
    llama_dir: Path,
    tmp_path: Path,
) -> None:
    cards = [
        attrs.evolve(
            _tune(
                pm,
                tmp_path,
                f"sft{seed}",
                "lora",
                llama_card,
                llama_dir,
                sft_data(),
                "sft",
                seed=seed,
                epochs=2,
                batch_size=4,
                learning_rate=1e-2,
            ).card,
            name=f"sft-{seed}",
        )
        for seed in (0, 1)
    ]
    card = _merge(spec, cards, llama_card, llama_dir, tmp_path / "merged", combination_type="ties")
    assert card.tasks == ("sft",)
    assert card.options == {"method": "lora", "task": "causal"}
    assert _config(card).get("modules_to_save") in (None, [])
    model = _served(pm, card, llama_card, tmp_path)
    [result] = model.complete(
        [CompletionRequest(prompt="greet kim", sampling=Sampling(temperature=0, max_tokens=4))]
    )
    assert isinstance(result.text, str)


# --------------------------------------------------------------------------
# Refusals, before any work
# --------------------------------------------------------------------------


def _card(name: str, method: str = "lora", base: str = "tiny-bert", **changes: Any) -> ModelCard:
    options = {"method": method, "task": "classifier", "labels": list(LABELS)}
    options.update(changes.pop("options", {}))
    values: dict[str, Any] = {
        "name": name,
        "version": 1,
        "provider": "transformers",
        "format": ModelFormat.ADAPTER,
        "tasks": ("text-classification",),
        "parents": (base,),
        "options": options,
    }
    values.update(changes)
    return ModelCard(**values)


@pytest.mark.parametrize(
    ("cards", "message"),
    [
        ([_card("a")], r"needs two or more members to merge, got 1 \('a@1'\)"),
        (
            [_card("a"), _card("b", base="tiny-llama")],
            r"different bases: 'a@1' of 'tiny-bert', 'b@1' of 'tiny-llama'",
        ),
        (
            [_card("a"), ModelCard(name="tiny-bert", provider="transformers")],
            r"member 'tiny-bert' is not an adapter \(format other, provider transformers\)",
        ),
        (
            [_card("a"), _card("b", method="full", format=ModelFormat.SAFETENSORS)],
            r"member 'b@1' was fully tuned .* such as mean instead",
        ),
        (
            [_card("a"), _card("i", method="ia3")],
            r"member 'i@1' is a ia3 adapter; merge combines LoRA adapters only .* served"
            r" strategy such as mean instead",
        ),
        (
            [_card("a"), _card("p", method="prompt")],
            r"member 'p@1' is a prompt adapter; merge combines LoRA adapters only",
        ),
        (
            [_card("a"), _card("d", method="adalora")],
            r"'d@1' is a adalora adapter.*add_weighted_adapter refuses AdaLoRA",
        ),
        (
            [_card("a"), _card("x", options={"method": None})],
            r"'x@1' is an adapter that llmos-peft did not write",
        ),
        (
            [_card("a"), _card("s", tasks=("sft",), options={"task": "causal", "labels": None})],
            r"different tasks: 'a@1' for text-classification, 's@1' for sft",
        ),
        (
            [_card("a"), _card("l", options={"labels": ["positive", "negative"]})],
            r"different labels: 'a@1' into \['negative', 'positive'\], 'l@1' into"
            r" \['positive', 'negative'\]",
        ),
    ],
)
def test_members_that_cannot_be_merged_are_refused(
    spec: FusionStrategySpec, cards: list[ModelCard], message: str
) -> None:
    assert spec.check is not None
    with pytest.raises(UsageError, match=message):
        spec.check({}, cards)


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"wieghts": [1, 1]}, r"unknown option\(s\) wieghts \(did you mean weights\?\)"),
        ({"combination_type": "average"}, r"combination_type 'average' is not one of cat, "),
        ({"weights": [1]}, r"weights has 1 number\(s\) for 2 members"),
        ({"weights": [1, "x"]}, r"weights must be a list of numbers"),
        ({"weights": [0, -1]}, r"has no positive weight"),
        ({"combination_type": "ties", "density": 0}, r"density must be a number in \(0, 1\]"),
        ({"combination_type": "ties", "density": 1.5}, r"density must be a number in \(0, 1\]"),
        ({"combination_type": "linear", "density": 0.5}, r"density has no effect with .*linear"),
        (
            {"combination_type": "ties", "majority_sign_method": "mean"},
            r"majority_sign_method must be total or frequency",
        ),
        ({"combination_type": "dare_linear", "seed": -1}, r"seed must be an integer >= 0"),
        ({"combination_type": "svd", "svd_rank": 0}, r"svd_rank must be an integer >= 1"),
    ],
)
def test_bad_options_are_refused(
    spec: FusionStrategySpec, options: dict[str, Any], message: str
) -> None:
    assert spec.check is not None
    with pytest.raises(UsageError, match=message):
        spec.check(options, [_card("a"), _card("b")])


def test_the_check_fills_in_the_defaults_that_apply(spec: FusionStrategySpec) -> None:
    assert spec.check is not None
    cards = [_card("a"), _card("b")]
    assert spec.check({}, cards) == {"combination_type": "cat", "weights": [1.0, 1.0]}
    assert spec.check({"combination_type": "dare_ties", "weights": [2, 1]}, cards) == {
        "combination_type": "dare_ties",
        "weights": [2.0, 1.0],
        "density": 0.5,
        "majority_sign_method": "total",
        "seed": 0,
    }
    assert spec.check({"combination_type": "ties_svd", "density": 0.2}, cards) == {
        "combination_type": "ties_svd",
        "weights": [1.0, 1.0],
        "density": 0.2,
        "majority_sign_method": "total",
        "svd_rank": None,
    }


def test_unequal_ranks_are_refused_for_linear_before_and_while_merging(
    spec: FusionStrategySpec,
    members: dict[str, ModelCard],
    bert_card: ModelCard,
    bert_dir: Path,
    tmp_path: Path,
) -> None:
    assert spec.check is not None and spec.merge is not None
    a, c = members["a"], members["c"]
    message = (
        r"combination_type linear needs members of one LoRA rank, and they differ"
        r" \(member-a@1 r=8, member-c@1 r=4\); use combination_type \"cat\""
    )
    with pytest.raises(UsageError, match=message):
        spec.check({"combination_type": "linear"}, [a, c])
    with pytest.raises(UsageError, match="needs members of one LoRA rank"):
        spec.check({"combination_type": "ties"}, [a, c])
    # cards whose folder the check cannot see: the merge refuses before loading
    blind = [attrs.evolve(card, source="") for card in (a, c)]
    request = MergeRequest(
        name="merged",
        members=blind,
        member_paths=[Path(a.source), Path(c.source)],
        options=spec.check({"combination_type": "linear"}, blind),
        output_dir=tmp_path / "out",
        base=bert_card,
        base_path=bert_dir,
    )
    with pytest.raises(UsageError, match=message):
        spec.merge(request)
    assert not (tmp_path / "out").exists()


def test_members_tuned_with_other_tokenizers_are_refused(
    spec: FusionStrategySpec,
    members: dict[str, ModelCard],
    bert_card: ModelCard,
    bert_dir: Path,
    tmp_path: Path,
) -> None:
    a, b = members["a"], members["b"]
    other = tmp_path / "b-other-tokenizer"
    shutil.copytree(b.source, other)
    tokenizer = json.loads((other / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    vocab["good"], vocab["bad"] = vocab["bad"], vocab["good"]
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    b_other = attrs.evolve(b, source=str(other))
    with pytest.raises(UsageError, match=r"different tokenizers: 'member-a@1' .* tokenizer.json"):
        _merge(spec, [a, b_other], bert_card, bert_dir, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    # what the last call left in tokenizer.json (truncation, padding) is no difference
    tokenizer = json.loads((Path(b.source) / "tokenizer.json").read_text())
    tokenizer["truncation"] = {"max_length": 7, "strategy": "LongestFirst", "stride": 0}
    (other / "tokenizer.json").write_text(json.dumps(tokenizer))
    card = _merge(spec, [a, b_other], bert_card, bert_dir, tmp_path / "ok", weights=[1, 1])
    assert Path(card.source, "adapter_model.safetensors").is_file()


def test_a_non_empty_output_folder_is_refused(
    spec: FusionStrategySpec,
    members: dict[str, ModelCard],
    bert_card: ModelCard,
    bert_dir: Path,
    tmp_path: Path,
) -> None:
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "x").write_text("")
    with pytest.raises(UsageError, match="exists and is not an empty folder"):
        _merge(spec, [members["a"], members["b"]], bert_card, bert_dir, tmp_path / "out")


def test_the_kernel_merges_registers_and_serves_the_merged_adapter(
    members: dict[str, ModelCard],
    bert_card: ModelCard,
    texts: list[str],
    tmp_path: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    """``llmos fuse create --strategy merge`` as the kernel runs it: checked,
    merged, moved under the data folder, registered with its lineage, served."""
    from llmos.runtime.kernel import Kernel
    from llmos.types import Capability

    kernel = Kernel.from_config(
        overrides=[
            f"home={str(tmp_path / 'home')!r}",
            f"registry.allowed_roots=[{str(tmp_path_factory.getbasetemp())!r}]",
        ],
        env={"LLMOS_LOAD_PLUGINS": "transformers,peft"},
    )
    kernel.start()
    try:
        kernel.registry.register(bert_card)
        for key in ("a", "b"):
            kernel.registry.register(attrs.evolve(members[key], version=None))
        with pytest.raises(UsageError, match="adapter"):
            kernel.fusions.create(
                "bad-merge", strategy="merge", members=["member-a", bert_card.name]
            )
        card = kernel.fusions.create(
            "merged-ab",
            strategy="merge",
            members=["member-a", "member-b@1"],
            options={"combination_type": "linear", "weights": [1, 0]},
        )
        assert card.ref == "merged-ab@1" and card.format == ModelFormat.ADAPTER
        assert card.options["merge"]["members"] == ["member-a@1", "member-b@1"]
        assert card.options["merge"]["options"]["weights"] == [1, 0]
        assert {"fusion", "merge"} <= set(card.tags)
        assert card.parents == (f"{bert_card.name}@1",)  # the base, pinned: what serves it
        artifact = Path(card.source)
        # in the artifact store, content-addressed: artifacts/<name>/<sha256 of its manifest>
        assert artifact.parent == kernel.home / "artifacts" / "merged-ab"
        assert re.fullmatch(r"[0-9a-f]{64}", artifact.name)
        assert (artifact / "llmos-artifact.json").is_file()
        assert (artifact / "adapter_model.safetensors").is_file()
        assert not [p for p in artifact.rglob("*") if p.suffix in PICKLES]
        requests = [ClassifyRequest(text=text) for text in texts]
        merged = kernel.call("merged-ab", Capability.CLASSIFY, requests)
        alone = kernel.call("member-a", Capability.CLASSIFY, requests)
        for m, a in zip(merged, alone, strict=True):
            assert m.scores == pytest.approx(dict(a.scores), abs=1e-5)
        with pytest.raises(Exception):  # noqa: B017 - a merged model is no fusion card
            kernel.fusions.members_of(card)
        assert [c.name for c in kernel.fusions.list()] == []
    finally:
        kernel.stop()
