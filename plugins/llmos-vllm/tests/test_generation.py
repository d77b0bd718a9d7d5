"""The vllm provider through the kernel, against the transformers provider
serving the same tiny Llama: greedy answers token for token, chats, streams,
stop strings, seeds, continuation log-probabilities and zero-shot labels."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest

from llmos.runtime.kernel import Kernel
from llmos.types import (
    Capability,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    ProviderSpec,
    Sampling,
)

PROMPTS = [
    "the cat sat",
    "hello world, how are",
    "what is the capital of france?",
    "a dog",
    "stock markets fell sharply on monday. a kitten",
]
GREEDY = Sampling(temperature=0, max_tokens=24)


def completions(kernel: Kernel, model: str, sampling: Sampling = GREEDY) -> list:
    requests = [CompletionRequest(prompt=p, sampling=sampling) for p in PROMPTS]
    return kernel.call(model, Capability.COMPLETE, requests)


def test_the_plugin_is_found_through_its_entry_point(kernel: Kernel) -> None:
    info = {i.name: i for i in kernel.plugins.plugins()}["vllm"]
    assert info.status == "loaded", info.error
    assert info.distribution == "llmos-vllm"
    spec: ProviderSpec = kernel.plugins.providers["vllm"].spec
    assert spec.batching is False  # the kernel's batcher steps aside
    assert {Capability.COMPLETE, Capability.CHAT, Capability.STREAM} <= spec.capabilities


def test_greedy_completions_match_the_transformers_provider(kernel: Kernel) -> None:
    ours = completions(kernel, "tiny")
    theirs = completions(kernel, "tiny-hf")
    assert [r.text for r in ours] == [r.text for r in theirs]
    assert [r.usage for r in ours] == [r.usage for r in theirs]
    assert [r.finish_reason for r in ours] == [r.finish_reason for r in theirs] == ["length"] * 5
    assert all(r.usage.completion_tokens == 24 for r in ours)
    assert len({r.text for r in ours}) == len(PROMPTS)  # answers that depend on the prompt


def test_the_same_tokens_as_transformers_generate(kernel: Kernel, tiny_dir: Path) -> None:
    """Token ids, not only text: vLLM's against transformers' own greedy
    ``generate`` on the same weights."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = kernel.models.get("tiny").model
    generated = model.generate([CompletionRequest(prompt=p, sampling=GREEDY) for p in PROMPTS])
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    reference = AutoModelForCausalLM.from_pretrained(tiny_dir).eval()
    for prompt, ours in zip(PROMPTS, generated, strict=True):
        ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
        with torch.inference_mode():
            out = reference.generate(ids, max_new_tokens=24, do_sample=False)
        assert list(ours.token_ids) == out[0, ids.shape[1] :].tolist()


def test_a_chat_matches_the_transformers_provider(kernel: Kernel) -> None:
    messages = [{"role": "user", "content": "hello world, how are you today?"}]
    request = ChatRequest(messages=messages, sampling=GREEDY)
    [ours] = kernel.call("tiny", Capability.CHAT, [request])
    [theirs] = kernel.call("tiny-hf", Capability.CHAT, [request])
    assert ours.message.role == "assistant"
    assert ours.message.content == theirs.message.content
    assert ours.usage == theirs.usage


def test_a_stop_string_cuts_the_answer_as_transformers_does(kernel: Kernel) -> None:
    [full] = completions(kernel, "tiny")[:1]
    stop = full.text[8:11]  # three characters from the middle of the greedy answer
    sampling = Sampling(temperature=0, max_tokens=24, stop=(stop,))
    [ours] = completions(kernel, "tiny", sampling)[:1]
    [theirs] = completions(kernel, "tiny-hf", sampling)[:1]
    assert ours.finish_reason == theirs.finish_reason == "stop"
    assert ours.text == theirs.text == full.text[: full.text.index(stop)]
    assert ours.usage == theirs.usage


def test_a_stream_concatenates_to_the_completion(kernel: Kernel) -> None:
    request = CompletionRequest(prompt=PROMPTS[1], sampling=GREEDY)
    [done] = kernel.call("tiny", Capability.COMPLETE, [request])
    chunks = list(kernel.stream("tiny", request))
    assert len(chunks) > 5  # token by token, not one piece
    assert "".join(c.text for c in chunks) == done.text
    assert [c.finish_reason for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1].finish_reason == "length"
    assert chunks[-1].usage == done.usage


def test_a_stream_holds_back_the_start_of_a_stop_string(kernel: Kernel) -> None:
    [full] = completions(kernel, "tiny")[:1]
    stop = full.text[10:14]
    request = CompletionRequest(
        prompt=PROMPTS[0], sampling=Sampling(temperature=0, max_tokens=24, stop=(stop,))
    )
    chunks = list(kernel.stream("tiny", request))
    assert "".join(c.text for c in chunks) == full.text[: full.text.index(stop)]
    assert chunks[-1].finish_reason == "stop"


def test_a_stream_stopped_early_frees_the_engine(kernel: Kernel) -> None:
    handle = kernel.stream(
        "tiny", CompletionRequest(prompt="a dog", sampling=Sampling(max_tokens=200))
    )
    first = handle.get(timeout=120)
    assert first is not None and first.text
    handle.cancel()
    while handle.get(timeout=120) is not None:  # the worker ends the stream
        pass
    # the engine goes on serving
    assert completions(kernel, "tiny")[0].usage.completion_tokens == 24


def test_a_seed_reproduces_a_sampled_answer(kernel: Kernel) -> None:
    sampled = Sampling(temperature=1.0, max_tokens=24, seed=7)
    first = kernel.call(
        "tiny", Capability.COMPLETE, [CompletionRequest(prompt="a dog", sampling=sampled)]
    )
    again = kernel.call(
        "tiny", Capability.COMPLETE, [CompletionRequest(prompt="a dog", sampling=sampled)]
    )
    other = Sampling(temperature=1.0, max_tokens=24, seed=8)
    moved = kernel.call(
        "tiny", Capability.COMPLETE, [CompletionRequest(prompt="a dog", sampling=other)]
    )
    assert first[0].text == again[0].text
    assert moved[0].text != first[0].text


def test_continuation_log_probabilities_match_the_transformers_provider(kernel: Kernel) -> None:
    request = CompletionRequest(
        prompt="the cat sat on the", score_continuations=(" mat.", " rug", " park!", "")
    )
    [ours] = kernel.call("tiny", Capability.COMPLETE, [request])
    [theirs] = kernel.call("tiny-hf", Capability.COMPLETE, [request])
    assert ours.text == "" and ours.usage.completion_tokens == 0  # scored only
    assert ours.continuation_logprobs == pytest.approx(theirs.continuation_logprobs, abs=1e-4)
    assert ours.continuation_logprobs[3] == 0.0
    assert all(lp < 0 for lp in ours.continuation_logprobs[:3])


def test_zero_shot_labels_match_the_transformers_provider(kernel: Kernel) -> None:
    requests = [
        ClassifyRequest(text="a kitten is on the rug.", labels=("cat", "dog", "stocks")),
        ClassifyRequest(text="markets fell", labels=("up", "down")),
    ]
    ours = kernel.call("tiny", Capability.CLASSIFY, requests)
    theirs = kernel.call("tiny-hf", Capability.CLASSIFY, requests)
    for mine, reference in zip(ours, theirs, strict=True):
        assert mine.scores == pytest.approx(dict(reference.scores), abs=1e-4)
        assert sum(mine.scores.values()) == pytest.approx(1.0)


def test_concurrent_callers_are_batched_by_vllm(kernel: Kernel) -> None:
    """Eight callers at once: the kernel hands each request over as it comes
    (no batcher in between) and every answer is the one it gets alone."""
    alone = completions(kernel, "tiny")
    results: dict[int, str] = {}

    def call(i: int) -> None:
        request = CompletionRequest(prompt=PROMPTS[i % len(PROMPTS)], sampling=GREEDY)
        results[i] = kernel.call("tiny", Capability.COMPLETE, [request])[0].text

    threads = [threading.Thread(target=call, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: alone[i % len(PROMPTS)].text for i in range(8)}
    worker = kernel.models.get("tiny")
    assert worker.settings.batching is False
