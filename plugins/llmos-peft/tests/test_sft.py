"""SFT: the response loss goes down, and every kind of tuned causal LM is
served by the transformers provider the way it was trained."""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos.plugin.manager import PluginManager
from llmos.types import (
    ChatRequest,
    CompletionRequest,
    LoadRequest,
    ModelCard,
    ModelFormat,
    Sampling,
)

from .conftest import record_of, sft_data

GREEDY = Sampling(temperature=0, max_tokens=12)
QUESTION = [{"role": "user", "content": "greet kim"}]


def load(pm: PluginManager, card: ModelCard, base: ModelCard, base_path: Path, tmp: Path) -> Any:
    request = LoadRequest(
        card=card,
        path=Path(card.source),
        base=base,
        base_path=base_path,
        cache_dir=tmp / "cache",
    )
    return pm.providers["transformers"].spec.load(request)


def peft_model(result: Any, llama_dir: Path) -> Any:
    """The adapter on its base through PEFT itself, as it was trained."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(llama_dir)
    return PeftModel.from_pretrained(base, result.card.source).eval()


@torch.no_grad()
def greedy(model: Any, ids: list[int], steps: int, eos: int) -> list[int]:
    """Greedy tokens by full forward passes: the training forward, no cache."""
    out: list[int] = []
    for _ in range(steps):
        current = torch.tensor([ids + out])
        logits = model(input_ids=current, attention_mask=torch.ones_like(current)).logits
        token = int(logits[0, -1].argmax())
        if token == eos:
            break
        out.append(token)
    return out


def test_lora_lowers_the_response_loss(tune: Any, llama_card: ModelCard, llama_dir: Path) -> None:
    result = tune(
        "lora",
        llama_card,
        llama_dir,
        sft_data(),
        task="sft",
        epochs=8,
        batch_size=4,
        learning_rate=3e-2,
    )
    record = record_of(result)
    before = record["history"][0]["dev/loss"]
    assert result.scores["dev/loss"] < before - 1.0
    assert set(result.scores) == {"dev/loss", "dev/perplexity", "test/loss", "test/perplexity"}
    assert result.scores["dev/perplexity"] == pytest.approx(math.exp(result.scores["dev/loss"]))
    assert record["chat_template"] is True
    assert record["hyperparameters"]["target_modules"] == ["q_proj", "v_proj"]
    assert "modules_to_save" not in record["hyperparameters"]
    card = result.card
    assert card.format == ModelFormat.ADAPTER
    assert card.tasks == ("sft",)
    assert card.options == {"method": "lora", "task": "causal"}


def test_a_lora_sft_adapter_chats_through_the_provider(
    tune: Any, pm: PluginManager, llama_card: ModelCard, llama_dir: Path, tmp_path: Path
) -> None:
    result = tune(
        "lora",
        llama_card,
        llama_dir,
        sft_data(),
        task="sft",
        epochs=4,
        batch_size=4,
        learning_rate=3e-2,
    )
    model = load(pm, result.card, llama_card, llama_dir, tmp_path)
    [answer] = model.chat([ChatRequest(messages=QUESTION, sampling=GREEDY)])
    reference = peft_model(result, llama_dir)
    tokenizer = model.tokenizer
    ids = list(
        tokenizer.apply_chat_template(
            QUESTION, add_generation_prompt=True, tokenize=True, return_dict=True
        )["input_ids"]
    )
    expected = greedy(reference, ids, 12, tokenizer.eos_token_id)
    assert answer.message.content == tokenizer.decode(expected, skip_special_tokens=True)


@pytest.mark.parametrize("method", ["prefix", "prompt"])
def test_prefix_and_prompt_adapters_generate_as_they_were_trained(
    tune: Any,
    pm: PluginManager,
    method: str,
    llama_card: ModelCard,
    llama_dir: Path,
    tmp_path: Path,
) -> None:
    result = tune(
        method,
        llama_card,
        llama_dir,
        sft_data(),
        task="sft",
        epochs=3,
        batch_size=4,
        num_virtual_tokens=4,
    )
    model = load(pm, result.card, llama_card, llama_dir, tmp_path)
    reference = peft_model(result, llama_dir)
    tokenizer = model.tokenizer
    prompt = "greet kim hello"
    ids = tokenizer(prompt)["input_ids"]
    expected = greedy(reference, ids, 12, tokenizer.eos_token_id)
    [done] = model.complete([CompletionRequest(prompt=prompt, sampling=GREEDY)])
    assert done.text == tokenizer.decode(expected, skip_special_tokens=True)
    # scores of continuations: the input's own logits, not the virtual tokens'
    continuation = " kim"
    [scored] = model.complete(
        [CompletionRequest(prompt=prompt, score_continuations=(continuation,))]
    )
    extra = tokenizer(continuation, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        full = torch.tensor([ids + extra])
        logits = reference(input_ids=full, attention_mask=torch.ones_like(full)).logits[
            0, -full.shape[1] :
        ]
    logprobs = torch.log_softmax(logits, -1)
    want = sum(float(logprobs[len(ids) - 1 + i, t]) for i, t in enumerate(extra))
    assert scored.continuation_logprobs[0] == pytest.approx(want, abs=1e-4)


def test_full_sft_writes_a_standalone_causal_lm(
    tune: Any, pm: PluginManager, llama_card: ModelCard, llama_dir: Path, tmp_path: Path
) -> None:
    result = tune("full", llama_card, llama_dir, sft_data(), task="sft", epochs=2, batch_size=4)
    card = result.card
    assert card.format == ModelFormat.SAFETENSORS and card.options["task"] == "causal"
    model = pm.providers["transformers"].spec.load(
        LoadRequest(card=card, path=Path(card.source), cache_dir=tmp_path)
    )
    [answer] = model.chat([ChatRequest(messages=QUESTION, sampling=GREEDY)])
    assert isinstance(answer.message.content, str)


def _write_gguf() -> Any:
    """The GGUF writer of llmos-transformers' test fixtures, when its tests are here."""
    path = Path(__file__).parents[2] / "llmos-transformers" / "tests" / "conftest.py"
    if not path.is_file():
        pytest.skip("llmos-transformers' test fixtures (its GGUF writer) are not in this tree")
    spec = importlib.util.spec_from_file_location("_llmos_transformers_fixtures", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.write_gguf


def test_a_gguf_base_is_converted_once_and_its_adapter_served(
    tune: Any, pm: PluginManager, llama_dir: Path, tmp_path: Path
) -> None:
    gguf_file = tmp_path / "tiny.F32.gguf"
    _write_gguf()(llama_dir, gguf_file)
    base = ModelCard(
        name="tiny-gguf", provider="transformers", source=str(gguf_file), family="llama"
    )
    result = tune("lora", base, gguf_file, sft_data(), task="sft", epochs=1, batch_size=8)
    converted = list((tune.root / "job" / "base-cache" / "tiny-gguf").iterdir())
    assert len(converted) == 1 and (converted[0] / "model.safetensors").is_file()
    model = load(pm, result.card, base, gguf_file, tmp_path)
    [answer] = model.chat([ChatRequest(messages=QUESTION, sampling=GREEDY)])
    assert isinstance(answer.message.content, str)
    assert (tmp_path / "cache" / "tiny-gguf").is_dir()  # the provider's own conversion cache
