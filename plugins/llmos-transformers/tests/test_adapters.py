"""PEFT adapters served on their base model (format ``adapter``).

The adapters are made here with PEFT itself on the tiny fixtures, so these
tests need peft but not llmos-peft; they are skipped without it.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import structlog
import torch

from llmos.errors import UnsafeSourceError, UsageError
from llmos.plugin.manager import PluginManager
from llmos.types import (
    ClassifyRequest,
    CompletionRequest,
    LoadedModel,
    LoadRequest,
    ModelCard,
    ModelFormat,
    Sampling,
)

peft = pytest.importorskip("peft")

LABELS = ["bad", "good"]
TEXTS = ["the cat sat on the mat.", "a dog ran in the park!", "hello world, how are you today?"]
GREEDY = Sampling(temperature=0, max_tokens=8)


def _card(folder: Path, base: ModelCard, **options: Any) -> ModelCard:
    return ModelCard(
        name="tiny-adapter",
        provider="transformers",
        source=str(folder),
        format=ModelFormat.ADAPTER,
        parents=(base.ref,),
        options=options,
    )


def _base(folder: Path) -> ModelCard:
    return ModelCard(name="tiny-base", provider="transformers", source=str(folder))


def _load(
    pm: PluginManager, card: ModelCard, base: ModelCard, base_path: Path, cache: Path
) -> LoadedModel:
    request = LoadRequest(
        card=card, path=Path(card.source), base=base, base_path=base_path, cache_dir=cache
    )
    return pm.providers["transformers"].spec.load(request)


@pytest.fixture(scope="module")
def lora_classifier(
    tmp_path_factory: pytest.TempPathFactory, encoder_dir: Path
) -> tuple[Path, Any]:
    """A LoRA adapter with a trained-looking head on the sentence-transformers
    BERT, and the unmerged PEFT model it was saved from."""
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(3)
    base = AutoModelForSequenceClassification.from_pretrained(
        encoder_dir, num_labels=2, id2label=dict(enumerate(LABELS))
    )
    config = peft.LoraConfig(task_type="SEQ_CLS", r=4, target_modules=["query", "value"])
    model = peft.get_peft_model(base, config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # a LoRA that changes something
    folder = tmp_path_factory.mktemp("lora-classifier")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model.eval()


def test_a_lora_classifier_is_merged_and_scores_as_peft_does(
    pm: PluginManager, encoder_dir: Path, lora_classifier: tuple[Path, Any], tmp_path: Path
) -> None:
    folder, reference = lora_classifier
    base = _base(encoder_dir)
    with structlog.testing.capture_logs() as logs:
        model = _load(
            pm, _card(folder, base, labels=LABELS, method="lora"), base, encoder_dir, tmp_path
        )
    assert not [e for e in logs if e["event"] == "transformers.unknown_options"]
    assert model.labels == tuple(LABELS)
    results = model.classify([ClassifyRequest(text=t) for t in TEXTS])
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(encoder_dir)
    with torch.no_grad():
        logits = reference(**tokenizer(TEXTS, padding=True, return_tensors="pt")).logits
    expected = torch.softmax(logits, -1)
    got = torch.tensor([[r.scores[label] for label in LABELS] for r in results])
    assert torch.allclose(got, expected, atol=1e-5)
    assert not isinstance(getattr(model, "model", None), peft.PeftModel)  # merged


def test_labels_come_from_the_tuning_record_when_the_card_has_none(
    pm: PluginManager, encoder_dir: Path, lora_classifier: tuple[Path, Any], tmp_path: Path
) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(lora_classifier[0], folder)
    base = _base(encoder_dir)
    with pytest.raises(UsageError, match="names its labels"):
        _load(pm, _card(folder, base), base, encoder_dir, tmp_path)
    (folder / "llmos_tuning.json").write_text(json.dumps({"labels": LABELS}))
    model = _load(pm, _card(folder, base), base, encoder_dir, tmp_path)
    assert model.labels == tuple(LABELS)


def test_what_an_adapter_load_refuses(
    pm: PluginManager, encoder_dir: Path, lora_classifier: tuple[Path, Any], tmp_path: Path
) -> None:
    base = _base(encoder_dir)
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    shutil.copy(lora_classifier[0] / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeSourceError, match="only pickle weights"):
        _load(pm, _card(pickled, base, labels=LABELS), base, encoder_dir, tmp_path)
    card = _card(lora_classifier[0], base, labels=LABELS)
    with pytest.raises(UsageError, match="needs its base model"):
        pm.providers["transformers"].spec.load(LoadRequest(card=card, path=lora_classifier[0]))
    with pytest.raises(UsageError, match="labels must be a list of two or more"):
        _load(pm, _card(lora_classifier[0], base, labels=["one"]), base, encoder_dir, tmp_path)
    with pytest.raises(UsageError, match="not an adapter folder"):
        _load(pm, _card(encoder_dir, base), base, encoder_dir, tmp_path)


@pytest.fixture(scope="module")
def prefix_lm(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> tuple[Path, Any]:
    """A prefix-tuned causal LM whose prefix visibly changes the output."""
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    torch.manual_seed(4)
    model = peft.get_peft_model(
        base, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=3)
    )
    with torch.no_grad():
        for p in model.prompt_encoder.parameters():
            p.mul_(30)
    folder = tmp_path_factory.mktemp("prefix-lm")
    model.save_pretrained(folder, safe_serialization=True)
    return folder, model.eval()


def _greedy(model: Any, ids: list[int], steps: int) -> list[int]:
    out: list[int] = []
    with torch.no_grad():
        for _ in range(steps):
            current = torch.tensor([ids + out])
            logits = model(input_ids=current, attention_mask=torch.ones_like(current)).logits
            out.append(int(logits[0, -1].argmax()))
    return out


def test_a_prefix_tuned_lm_generates_as_its_training_forward_computes(
    pm: PluginManager,
    llama_dir: Path,
    prefix_lm: tuple[Path, Any],
    hf_tokenizer: Any,
    tmp_path: Path,
) -> None:
    folder, reference = prefix_lm
    base = _base(llama_dir)
    model = _load(pm, _card(folder, base), base, llama_dir, tmp_path)
    prompts = ["the cat sat", "hello world, how are"]
    results = model.complete([CompletionRequest(prompt=p, sampling=GREEDY) for p in prompts])
    for prompt, result in zip(prompts, results, strict=True):
        expected = _greedy(reference, hf_tokenizer(prompt)["input_ids"], 8)
        assert result.text == hf_tokenizer.decode(expected, skip_special_tokens=True)
    # scoring runs whole rows on it (it takes no cache of ours): the same numbers
    continuations = (" mat", " on the rug")
    [scored] = model.complete(
        [CompletionRequest(prompt=prompts[0], score_continuations=continuations)]
    )
    prompt = hf_tokenizer(prompts[0])["input_ids"]
    for continuation, logprob in zip(continuations, scored.continuation_logprobs, strict=True):
        cont = hf_tokenizer(continuation, add_special_tokens=False)["input_ids"]
        current = torch.tensor([prompt + cont])
        with torch.no_grad():
            logits = reference(input_ids=current, attention_mask=torch.ones_like(current)).logits
        logprobs = torch.log_softmax(logits[0].float(), dim=-1)
        expected = sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
        assert logprob == pytest.approx(expected, abs=1e-4)
    # the prefix matters: the base alone says something else
    base_model = pm.providers["transformers"].spec.load(
        LoadRequest(card=ModelCard(name="b", provider="transformers"), path=llama_dir)
    )
    alone = base_model.complete([CompletionRequest(prompt=prompts[0], sampling=GREEDY)])
    assert alone[0].text != results[0].text


def test_an_adapter_on_a_gguf_base_uses_the_providers_conversion(
    pm: PluginManager, gguf_file: Path, llama_dir: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(5)
    lora = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(llama_dir),
        peft.LoraConfig(task_type="CAUSAL_LM", r=4, init_lora_weights=False),
    )
    folder = tmp_path / "lora"
    lora.save_pretrained(folder, safe_serialization=True)
    on_gguf = ModelCard(name="tiny-gguf", provider="transformers", source=str(gguf_file))
    from_gguf = _load(pm, _card(folder, on_gguf), on_gguf, gguf_file, tmp_path / "cache")
    assert (tmp_path / "cache" / "tiny-gguf").is_dir()
    on_folder = _base(llama_dir)
    from_folder = _load(pm, _card(folder, on_folder), on_folder, llama_dir, tmp_path / "cache")
    request = [CompletionRequest(prompt="the cat sat", sampling=GREEDY)]
    assert from_gguf.complete(request)[0].text == from_folder.complete(request)[0].text
