"""Text classification: learning, every method's artifact, stopping, resuming,
early stopping, and the artifact served by the transformers provider."""

from __future__ import annotations

import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from llmos.errors import UsageError
from llmos.plugin.manager import PluginManager
from llmos.types import ClassifyRequest, LoadRequest, ModelCard, ModelFormat
from llmos_peft.errors import Cancelled
from llmos_peft.merge import export_merged

from .conftest import record_of, sentiment_data

PICKLES = (".bin", ".pt", ".pth", ".pkl", ".ckpt")
#: enough steps for the tiny BERT to find the sentiment words
LEARN = {"epochs": 6, "batch_size": 8, "learning_rate": 3e-2}


@pytest.fixture(scope="module")
def data() -> dict[str, list[Any]]:
    return sentiment_data(64, 32, 32)


def served(pm: PluginManager, card: ModelCard, path: Path, base: ModelCard, tmp: Path) -> Any:
    spec = pm.providers["transformers"].spec
    request = LoadRequest(
        card=card, path=path, base=base, base_path=Path(base.source), cache_dir=tmp / "cache"
    )
    return spec.load(request)


def classify(model: Any, rows: list[dict[str, str]]) -> list[Any]:
    return model.classify([ClassifyRequest(text=row["text"]) for row in rows])


def provider_accuracy(model: Any, rows: list[dict[str, str]]) -> float:
    results = classify(model, rows)
    return sum(r.label == row["label"] for r, row in zip(results, rows, strict=True)) / len(rows)


def test_lora_learns_the_words_and_beats_the_untrained_head(
    tune: Any, bert_card: ModelCard, bert_dir: Path, data: dict[str, Any]
) -> None:
    result = tune("lora", bert_card, bert_dir, data, report_steps=1, **LEARN)
    record = record_of(result)
    untrained = record["history"][0]
    assert untrained["epoch"] == 0
    # 0.9+ on CPU; 0.84 (27 of 32) on an H200 with torch 2.11, whose kernels
    # round differently: the bar is what "learnt the words" means on either
    assert result.scores["dev/accuracy"] >= 0.8
    assert result.scores["dev/accuracy"] > untrained["dev/accuracy"] + 0.3
    assert result.scores["test/accuracy"] >= 0.8
    assert set(result.scores) == {
        "dev/accuracy",
        "dev/macro_f1",
        "dev/loss",
        "test/accuracy",
        "test/macro_f1",
        "test/loss",
    }
    assert record["hyperparameters"]["target_modules"] == ["query", "value"]
    assert record["hyperparameters"]["modules_to_save"] == ["classifier"]
    assert record["sizes"] == {"train": 64, "dev": 32, "test": 32}
    assert record["trainable_parameters"] == result.card.parameters
    # progress: every step reported with its figures, and dev scores at each epoch's end
    reports = tune.reports["job"]
    steps = [r for r in reports if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 49))
    assert {"total_steps", "epoch", "learning_rate", "samples_per_s", "eta_s"} <= set(steps[0])
    assert steps[0]["total_steps"] == 48
    epochs = [r for r in reports if "dev/accuracy" in r]
    assert [r["epoch"] for r in epochs] == [0, 1, 2, 3, 4, 5, 6]
    assert "dev/macro_f1" in epochs[-1]


@pytest.mark.parametrize("method", ["lora", "adalora", "ia3", "prefix", "prompt", "full"])
def test_each_method_writes_a_safetensors_artifact_served_as_evaluated(
    tune: Any,
    pm: PluginManager,
    method: str,
    bert_card: ModelCard,
    bert_dir: Path,
    llama_card: ModelCard,
    llama_dir: Path,
    data: dict[str, Any],
) -> None:
    # prefix tuning needs cached keys and values, which only a causal LM takes
    base, folder = (llama_card, llama_dir) if method == "prefix" else (bert_card, bert_dir)
    result = tune(method, base, folder, data, epochs=1, batch_size=16)
    card = result.card
    output = Path(card.source)
    assert output == tune.root / "job" / "output"
    names = {p.name for p in output.rglob("*")}
    assert not [n for n in names if n.endswith(PICKLES)], names
    assert "llmos_tuning.json" in names
    if method == "full":
        assert card.format == ModelFormat.SAFETENSORS
        assert "model.safetensors" in names and "config.json" in names
    else:
        assert card.format == ModelFormat.ADAPTER
        assert {"adapter_model.safetensors", "adapter_config.json"} <= names
    assert card.name == f"{base.name}-{method}"
    assert card.provider == "transformers"
    assert card.tasks == ("text-classification",)
    assert card.parents == (base.ref,)
    assert card.family == base.family
    assert card.options == {
        "method": method,
        "task": "classifier",
        "labels": ["negative", "positive"],
    }
    assert card.scores == result.scores and "test/accuracy" in card.scores
    record = record_of(result)
    assert record["method"] == method and record["epochs_done"] == 1
    assert record["adapter_bytes"] > 0
    # served by the transformers provider, it scores the test rows as evaluated
    model = served(pm, card, output, base, tune.root)
    assert model.labels == ("negative", "positive")
    results = classify(model, data["test"])
    loss = -sum(
        math.log(r.scores[row["label"]]) for r, row in zip(results, data["test"], strict=True)
    )
    assert loss / len(results) == pytest.approx(result.scores["test/loss"], abs=1e-4)
    assert provider_accuracy(model, data["test"]) == result.scores["test/accuracy"]


def test_prefix_tuning_an_encoder_is_refused_clearly(
    tune: Any, bert_card: ModelCard, bert_dir: Path, data: dict[str, Any]
) -> None:
    with pytest.raises(UsageError, match="prefix tuning needs a model that takes cached keys"):
        tune("prefix", bert_card, bert_dir, data, epochs=1)


def test_should_stop_stops_within_a_step_and_leaves_a_checkpoint(
    tune: Any, bert_card: ModelCard, bert_dir: Path, data: dict[str, Any]
) -> None:
    def should_stop() -> bool:
        # true once step 3 has been reported: the next step must not start
        return any(r.get("step") == 3 and "loss" in r for r in tune.reports["job"])

    with pytest.raises(Cancelled, match="cancelled") as caught:
        tune(
            "lora",
            bert_card,
            bert_dir,
            data,
            should_stop=should_stop,
            report_steps=1,
            epochs=3,
            batch_size=8,
        )
    assert caught.value.step == 3
    steps = [r["step"] for r in tune.reports["job"] if "loss" in r]
    assert steps == [1, 2, 3]
    assert (tune.root / "job" / "checkpoints" / "step-000000003" / "weights.safetensors").is_file()
    assert not (tune.root / "job" / "output" / "llmos_tuning.json").exists()


def _adapter(result: Any) -> dict[str, torch.Tensor]:
    [weights] = Path(result.card.source).glob("*.safetensors")
    return safetensors.torch.load_file(str(weights))


# AdaLoRA also keeps its rank allocator's state; full checkpoints every weight
@pytest.mark.parametrize("method", ["lora", "adalora", "full"])
def test_a_resumed_run_ends_where_an_uninterrupted_one_does(
    tune: Any, method: str, bert_card: ModelCard, bert_dir: Path, data: dict[str, Any]
) -> None:
    settings = {"epochs": 2, "batch_size": 8, "save_steps": 2, "report_steps": 1}
    whole = tune(method, bert_card, bert_dir, data, job="whole", **settings)

    def stop_at_5() -> bool:
        return any(r.get("step") == 5 for r in tune.reports["parts"])

    with pytest.raises(Cancelled):
        tune(method, bert_card, bert_dir, data, job="parts", should_stop=stop_at_5, **settings)
    checkpoints = tune.root / "parts" / "checkpoints"
    assert sorted(p.name for p in checkpoints.glob("step-*")) == [
        "step-000000004",
        "step-000000005",
    ]
    state = torch.load(checkpoints / "step-000000004" / "trainer.pt", weights_only=True)
    assert {"optimizer", "scheduler", "rng"} <= set(state)
    if method == "adalora":
        assert state["adalora"]["exp_avg_ipt"]  # the rank allocator's importance so far
    # as if killed before the checkpoint written on stopping: resume from the periodic one
    shutil.rmtree(checkpoints / "step-000000005")
    resumed = tune(method, bert_card, bert_dir, data, job="parts", **settings)

    assert record_of(resumed)["resumed_from_step"] == 4
    assert resumed.scores == whole.scores
    a, b = _adapter(whole), _adapter(resumed)
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name
    assert record_of(resumed)["history"] == record_of(whole)["history"]

    with pytest.raises(UsageError, match="is of another run"):
        tune(method, bert_card, bert_dir, data, job="parts", **{**settings, "weight_decay": 0.1})


def test_early_stopping_stops_and_keeps_the_best_epoch(
    tune: Any, bert_card: ModelCard, bert_dir: Path, data: dict[str, Any]
) -> None:
    # a min_delta no epoch can beat: the first epoch stays the best
    result = tune(
        "lora",
        bert_card,
        bert_dir,
        data,
        epochs=10,
        batch_size=8,
        learning_rate=3e-2,
        metric="dev/loss",
        min_delta=100.0,
        early_stopping_patience=2,
    )
    record = record_of(result)
    assert record["stopped_early"] is True
    assert record["epochs_done"] == 3 and record["steps"] == 24
    assert record["best_epoch"] == 1 and record["final_epoch"] == 1
    first, last = record["history"][1], record["history"][3]
    assert result.scores["dev/loss"] == first["dev/loss"] != last["dev/loss"]
    best = safetensors.torch.load_file(
        str(tune.root / "job" / "checkpoints" / "best-epoch-1.safetensors")
    )
    saved = _adapter(result)
    for name, tensor in best.items():
        if "lora_B" in name:  # PEFT's saved names drop the adapter's name
            assert torch.equal(saved[name.replace(".default", "")], tensor)


def test_the_adapter_is_served_by_the_provider_and_merges(
    tune: Any,
    pm: PluginManager,
    bert_card: ModelCard,
    bert_dir: Path,
    data: dict[str, Any],
    tmp_path: Path,
) -> None:
    result = tune("lora", bert_card, bert_dir, data, **LEARN)
    output = Path(result.card.source)
    model = served(pm, result.card, output, bert_card, tmp_path)
    assert model.labels == ("negative", "positive")
    assert provider_accuracy(model, data["test"]) == result.scores["test/accuracy"]
    assert provider_accuracy(model, data["dev"]) == result.scores["dev/accuracy"]

    # the same adapter, unmerged, through PEFT itself: the same probabilities
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = AutoModelForSequenceClassification.from_pretrained(
        bert_dir, num_labels=2, id2label={0: "negative", 1: "positive"}
    )
    reference = PeftModel.from_pretrained(base, output).eval()
    tokenizer = AutoTokenizer.from_pretrained(output)
    texts = [row["text"] for row in data["test"]]
    with torch.no_grad():
        expected = torch.softmax(
            reference(**tokenizer(texts, padding=True, return_tensors="pt")).logits, -1
        )
    got = torch.tensor(
        [[r.scores["negative"], r.scores["positive"]] for r in classify(model, data["test"])]
    )
    assert torch.allclose(got, expected, atol=1e-5)

    # merged into a standalone classifier: loads as one, with the label names
    merged = export_merged(output, bert_dir, tmp_path / "merged")
    assert not [p for p in merged.iterdir() if p.suffix in PICKLES]
    standalone = ModelCard(name="merged", provider="transformers", source=str(merged))
    plain = pm.providers["transformers"].spec.load(
        LoadRequest(card=standalone, path=merged, cache_dir=tmp_path / "cache")
    )
    assert plain.labels == ("negative", "positive")
    merged_scores = torch.tensor(
        [[r.scores["negative"], r.scores["positive"]] for r in classify(plain, data["test"])]
    )
    assert torch.allclose(merged_scores, expected, atol=1e-5)

    # the same through the command line, with the adapter in the registry
    home = tmp_path / "home"
    overrides = [
        "--set",
        f"home={str(home)!r}",
        "--set",
        f"registry.allowed_roots=[{str(tmp_path.parent)!r}]",
    ]
    from llmos.cli import cli
    from llmos.runtime.kernel import Kernel

    kernel = Kernel.from_config(overrides=[overrides[1], overrides[3]])
    kernel.registry.register(bert_card)
    kernel.registry.register(result.card)
    kernel.registry.close()
    outcome = CliRunner().invoke(
        cli, [*overrides, "peft", "merge", result.card.name, "--out", str(tmp_path / "by-ref")]
    )
    assert outcome.exit_code == 0, outcome.output
    assert (tmp_path / "by-ref" / "model.safetensors").is_file()
    refused = CliRunner().invoke(
        cli, [*overrides, "peft", "merge", str(output), "--out", str(tmp_path / "x")]
    )
    assert isinstance(refused.exception, UsageError) and "needs --base" in str(refused.exception)


def test_a_fully_tuned_classifier_loads_with_its_label_names(
    tune: Any,
    pm: PluginManager,
    bert_card: ModelCard,
    bert_dir: Path,
    data: dict[str, Any],
    tmp_path: Path,
) -> None:
    result = tune("full", bert_card, bert_dir, data, epochs=4, batch_size=8, learning_rate=3e-3)
    assert result.scores["test/accuracy"] >= 0.9
    output = Path(result.card.source)
    model = served(pm, result.card, output, bert_card, tmp_path)
    assert model.labels == ("negative", "positive")
    assert provider_accuracy(model, data["test"]) == result.scores["test/accuracy"]
