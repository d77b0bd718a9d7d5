"""Causal LMs through the provider: generation, batching, sampling, stops,
chat, streaming, continuation scores and zero-shot labels."""

from __future__ import annotations

import math
import threading
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos.errors import CapabilityNotSupported, UsageError
from llmos.types import (
    Capability,
    ChatMessage,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    LoadedModel,
    Sampling,
)

GREEDY = Sampling(temperature=0, max_tokens=12)
PROMPTS = ["the cat", "a dog ran in the park and", "hello world, how are you"]


def direct_greedy(hf_llama: Any, ids: list[int], max_new: int) -> list[int]:
    """What transformers' own generate gives for ``ids``, new tokens only."""
    with torch.inference_mode():
        out = hf_llama.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False)
    return out[0, len(ids) :].tolist()


def test_capabilities_and_batch_size(llama: LoadedModel) -> None:
    assert llama.capabilities == {
        Capability.COMPLETE,
        Capability.CHAT,
        Capability.STREAM,
        Capability.CLASSIFY,
    }
    assert llama.max_batch_size == 4


def test_greedy_equals_transformers_generate(
    llama: LoadedModel, hf_llama: Any, hf_tokenizer: Any
) -> None:
    for prompt in PROMPTS:
        ids = hf_tokenizer(prompt)["input_ids"]
        expected = direct_greedy(hf_llama, ids, 12)
        [result] = llama.complete([CompletionRequest(prompt=prompt, sampling=GREEDY)])
        assert result.text == hf_tokenizer.decode(expected, skip_special_tokens=True)
        assert result.text.strip()  # the fixture's model never emits special tokens
        assert result.usage.prompt_tokens == len(ids)
        assert result.usage.completion_tokens == len(expected) == 12
        assert result.finish_reason == "length"


def test_unset_temperature_is_greedy(llama: LoadedModel) -> None:
    [a] = llama.complete([CompletionRequest(prompt="the cat", sampling=GREEDY)])
    [b] = llama.complete([CompletionRequest(prompt="the cat", sampling=Sampling(max_tokens=12))])
    assert a.text == b.text


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-6])
def test_a_temperature_too_small_for_float32_is_greedy(
    llama: LoadedModel, temperature: float
) -> None:
    """1e-300 is 0 in float32: dividing the logits by it gave NaN probabilities
    and a RuntimeError in torch.multinomial (a 500, found by the fuzz suite)."""
    [greedy] = llama.complete([CompletionRequest(prompt="the cat", sampling=GREEDY)])
    tiny = Sampling(temperature=temperature, top_p=5e-324, max_tokens=12, seed=3)
    [a] = llama.complete([CompletionRequest(prompt="the cat", sampling=tiny)])
    [b] = llama.chat([ChatRequest(messages=(ChatMessage("user", "the cat"),), sampling=tiny)])
    assert a.text == greedy.text
    assert b.finish_reason in ("stop", "length")


def test_batch_with_left_padding_equals_one_at_a_time(llama: LoadedModel) -> None:
    requests = [CompletionRequest(prompt=p, sampling=GREEDY) for p in PROMPTS]
    alone = [llama.complete([r])[0] for r in requests]
    together = llama.complete(requests)
    assert [r.text for r in together] == [r.text for r in alone]
    assert [r.usage for r in together] == [r.usage for r in alone]
    # more requests than max_batch_size (4): split into calls, order kept
    many = llama.complete(requests * 3)
    assert [r.text for r in many] == [r.text for r in alone] * 3


def test_rows_stop_at_their_own_max_tokens(llama: LoadedModel) -> None:
    requests = [
        CompletionRequest(prompt=p, sampling=Sampling(temperature=0, max_tokens=n))
        for p, n in zip(PROMPTS, (3, 9, 5), strict=True)
    ]
    results = llama.complete(requests)
    assert [r.usage.completion_tokens for r in results] == [3, 9, 5]
    assert {r.finish_reason for r in results} == {"length"}
    for request, result in zip(requests, results, strict=True):
        [alone] = llama.complete([request])
        assert alone.text == result.text


def test_max_new_tokens_caps_max_tokens(load_model: Any, llama_dir: Path) -> None:
    model = load_model(llama_dir, max_new_tokens=4)
    [result] = model.complete(
        [CompletionRequest(prompt="the cat", sampling=Sampling(max_tokens=50))]
    )
    assert result.usage.completion_tokens == 4
    assert result.finish_reason == "length"
    [default] = model.complete([CompletionRequest(prompt="the cat")])
    assert default.usage.completion_tokens == 4


def test_seed_reproduces_sampling(llama: LoadedModel) -> None:
    def sample(seed: int, *others: CompletionRequest) -> str:
        request = CompletionRequest(
            prompt="the cat", sampling=Sampling(temperature=1.5, max_tokens=12, seed=seed)
        )
        return llama.complete([*others, request])[-1].text

    first = sample(7)
    assert sample(7) == first
    # the same seed in a batch with other requests gives the same text
    neighbours = [CompletionRequest(prompt=p, sampling=GREEDY) for p in PROMPTS]
    neighbours.append(
        CompletionRequest(prompt="hello", sampling=Sampling(temperature=0.8, max_tokens=5))
    )
    assert sample(7, *neighbours) == first
    mixed = llama.complete(neighbours)
    alone = [llama.complete([r])[0] for r in neighbours[:3]]
    assert [r.text for r in mixed[:3]] == [r.text for r in alone]
    assert mixed[3].usage.completion_tokens == 5
    assert len({sample(seed) for seed in range(5)}) > 1  # sampling, not greedy
    # seeding one request leaves the process's RNG as it was
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    sample(9)
    assert torch.equal(torch.rand(3), expected)


def test_stop_string_cuts_text(llama: LoadedModel) -> None:
    [full] = llama.complete(
        [CompletionRequest(prompt="the cat", sampling=Sampling(temperature=0, max_tokens=20))]
    )
    assert full.finish_reason == "length"
    stop = full.text[6:9]
    assert stop.strip()
    cut = full.text.find(stop)
    [result] = llama.complete(
        [
            CompletionRequest(
                prompt="the cat",
                sampling=Sampling(temperature=0, max_tokens=20, stop=("never-there", stop)),
            )
        ]
    )
    assert result.text == full.text[:cut]
    assert result.finish_reason == "stop"
    assert result.usage.completion_tokens < 20  # generation stopped there, not at the limit


def test_chat_uses_the_template(
    llama: LoadedModel, hf_llama: Any, hf_tokenizer: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    messages = [
        ChatMessage("system", "you are a cat."),
        ChatMessage("user", "what is the capital of france?"),
    ]
    expected_ids = hf_tokenizer.apply_chat_template(
        [{"role": m.role, "content": m.content} for m in messages],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    seen: list[list[int]] = []
    generate = llama.model.generate  # type: ignore[attr-defined]

    def spy(**kwargs: Any) -> Any:
        ids, mask = kwargs["input_ids"], kwargs["attention_mask"]
        seen.extend(row[m.bool()].tolist() for row, m in zip(ids, mask, strict=True))
        return generate(**kwargs)

    monkeypatch.setattr(llama.model, "generate", spy)  # type: ignore[attr-defined]
    [result] = llama.chat([ChatRequest(messages=messages, sampling=GREEDY)])
    assert seen == [list(expected_ids)]
    assert result.message.role == "assistant"
    expected = direct_greedy(hf_llama, list(expected_ids), 12)
    assert result.message.content == hf_tokenizer.decode(expected, skip_special_tokens=True)
    assert result.usage.prompt_tokens == len(expected_ids)


def test_chat_without_template_is_a_usage_error(load_model: Any, llama_nochat_dir: Path) -> None:
    model = load_model(llama_nochat_dir)
    assert Capability.CHAT not in model.capabilities
    request = ChatRequest(messages=[ChatMessage("user", "hi")])
    with pytest.raises(UsageError, match="no chat template"):
        model.chat([request])
    with pytest.raises(UsageError, match="no chat template"):
        list(model.stream([request]))
    [result] = model.complete([CompletionRequest(prompt="hi", sampling=GREEDY)])
    assert result.text


def test_stream_concatenates_to_the_greedy_text(llama: LoadedModel) -> None:
    requests = [
        CompletionRequest(prompt="the cat", sampling=GREEDY),
        ChatRequest(messages=[ChatMessage("user", "hello")], sampling=GREEDY),
    ]
    [completion] = llama.complete([requests[0]])  # type: ignore[list-item]
    [chat] = llama.chat([requests[1]])  # type: ignore[list-item]
    chunks = list(llama.stream(requests))
    for index, expected in enumerate((completion, chat)):
        mine = [c for c in chunks if c.index == index]
        assert len(mine) > 3  # token by token, not one lump
        assert "".join(c.text for c in mine) == (
            expected.text if index == 0 else expected.message.content  # type: ignore[union-attr]
        )
        assert all(c.finish_reason is None and c.usage is None for c in mine[:-1])
        assert mine[-1].finish_reason == expected.finish_reason == "length"
        assert mine[-1].usage == expected.usage


def test_stream_with_stop_string(llama: LoadedModel) -> None:
    [full] = llama.complete([CompletionRequest(prompt="hello", sampling=GREEDY)])
    stop = full.text[4:7]
    request = CompletionRequest(
        prompt="hello", sampling=Sampling(temperature=0, max_tokens=12, stop=(stop,))
    )
    [expected] = llama.complete([request])
    chunks = list(llama.stream([request]))
    assert "".join(c.text for c in chunks) == expected.text == full.text[: full.text.find(stop)]
    assert chunks[-1].finish_reason == "stop"
    assert stop not in "".join(c.text for c in chunks)


def test_closing_a_stream_stops_generation(llama: LoadedModel) -> None:
    before = threading.active_count()
    stream = llama.stream(
        [CompletionRequest(prompt="the cat", sampling=Sampling(temperature=0, max_tokens=32))]
    )
    first = next(stream)
    assert first.text
    stream.close()  # type: ignore[attr-defined]
    assert threading.active_count() == before
    # the model is free again
    [result] = llama.complete([CompletionRequest(prompt="the cat", sampling=GREEDY)])
    assert result.text


def test_score_continuations_equal_manual_log_softmax(
    llama: LoadedModel, hf_llama: Any, hf_tokenizer: Any
) -> None:
    requests = [
        CompletionRequest(prompt="the cat sat on the", score_continuations=(" mat", " rug.")),
        CompletionRequest(prompt="a dog", score_continuations=(" ran in the park",)),
    ]
    results = llama.complete(requests)
    for request, result in zip(requests, results, strict=True):
        assert result.text == ""  # scoring only: no max_tokens asked for
        prompt = hf_tokenizer(request.prompt)["input_ids"]
        expected = []
        for continuation in request.score_continuations:
            cont = hf_tokenizer(continuation, add_special_tokens=False)["input_ids"]
            with torch.inference_mode():
                logits = hf_llama(torch.tensor([prompt + cont])).logits[0]
            logprobs = torch.log_softmax(logits, dim=-1)
            expected.append(
                sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(cont))
            )
        assert result.continuation_logprobs == pytest.approx(expected, abs=1e-4)
        assert all(lp < 0 for lp in result.continuation_logprobs)


def test_score_and_generate_together(llama: LoadedModel) -> None:
    [plain] = llama.complete([CompletionRequest(prompt="the cat", sampling=GREEDY)])
    [both] = llama.complete(
        [CompletionRequest(prompt="the cat", sampling=GREEDY, score_continuations=(" sat",))]
    )
    assert both.text == plain.text
    assert len(both.continuation_logprobs) == 1


def test_zero_shot_classify(llama: LoadedModel) -> None:
    labels = ("animal", "finance", "geography")
    requests = [
        ClassifyRequest(text="a kitten is on the rug.", labels=labels),
        ClassifyRequest(text="stock markets fell", labels=labels[:2]),
    ]
    results = llama.classify(requests)
    for request, result in zip(requests, results, strict=True):
        assert tuple(result.scores) == request.labels
        assert sum(result.scores.values()) == pytest.approx(1.0)
        assert result.usage.prompt_tokens > 0
    # the scores are the softmax of the labels' log-likelihoods after the template
    [scored] = llama.complete(
        [
            CompletionRequest(
                prompt="Text: a kitten is on the rug.\nLabel: ", score_continuations=labels
            )
        ]
    )
    weights = [math.exp(lp) for lp in scored.continuation_logprobs]
    expected = {label: w / sum(weights) for label, w in zip(labels, weights, strict=True)}
    assert results[0].scores == pytest.approx(expected)
    with pytest.raises(UsageError, match="labels"):
        llama.classify([ClassifyRequest(text="no labels")])


def test_embed_is_not_offered(llama: LoadedModel) -> None:
    from llmos.types import EmbedRequest

    with pytest.raises(CapabilityNotSupported):
        llama.embed([EmbedRequest(text="x")])


def test_prompt_longer_than_the_context(llama: LoadedModel) -> None:
    with pytest.raises(UsageError, match="at most 128 tokens"):
        llama.complete([CompletionRequest(prompt="the cat sat on the mat. " * 40)])


def test_dtype_option(load_model: Any, llama_dir: Path) -> None:
    model = load_model(llama_dir, dtype="bfloat16")
    assert model.model.dtype == torch.bfloat16
    [result] = model.complete([CompletionRequest(prompt="the cat", sampling=GREEDY)])
    assert result.usage.completion_tokens == 12
