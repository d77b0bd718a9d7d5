"""Token-id prompts, echo and log-probabilities (issue 15, item 1): what the
vllm provider reports is what the transformers provider reports for the same
tiny Llama — the same tokens, texts and offsets, the same log-probabilities
within float32 noise — for the base and for a LoRA adapter (the prompt's
asked a position at a time, as vLLM's prompt_logprobs kills an engine with
LoRA slots)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from llmos.errors import UsageError
from llmos.runtime.kernel import Kernel
from llmos.types import Capability, ChatRequest, CompletionRequest, Sampling

GREEDY = Sampling(temperature=0, max_tokens=6)
PROMPTS = ["the cat sat", "hello world, how are", "what is the capital of france?"]


def same(ours: Any, theirs: Any) -> None:
    assert ours.logprobs is not None and theirs.logprobs is not None
    a, b = ours.logprobs, theirs.logprobs
    assert a.tokens == b.tokens
    assert a.text_offset == b.text_offset
    assert [v is None for v in a.token_logprobs] == [v is None for v in b.token_logprobs]
    for x, y in zip(a.token_logprobs, b.token_logprobs, strict=True):
        if x is not None:
            assert x == pytest.approx(y, abs=1e-3)
    for x, y in zip(a.top_logprobs, b.top_logprobs, strict=True):
        assert len(x) == len(y)
        assert [v for _, v in x] == pytest.approx([v for _, v in y], abs=1e-3)


@pytest.mark.parametrize("max_tokens", [1, 6])
def test_echo_and_logprobs_match_the_transformers_provider(kernel: Kernel, max_tokens) -> None:
    sampling = Sampling(temperature=0, max_tokens=max_tokens)
    requests = [
        CompletionRequest(prompt=p, sampling=sampling, echo=True, logprobs=1) for p in PROMPTS
    ]
    ours = kernel.call("tiny", Capability.COMPLETE, requests)
    theirs = kernel.call("tiny-hf", Capability.COMPLETE, requests)
    for prompt, a, b in zip(PROMPTS, ours, theirs, strict=True):
        assert a.text == b.text and a.text.startswith(prompt)
        assert a.logprobs.token_logprobs[0] is None
        same(a, b)


def test_logprobs_of_the_answer_alone_and_token_id_prompts(kernel: Kernel, tiny_dir: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    by_text = [CompletionRequest(prompt=p, sampling=GREEDY, logprobs=1) for p in PROMPTS]
    by_ids = [
        CompletionRequest(
            prompt="", prompt_ids=tokenizer(p)["input_ids"], sampling=GREEDY, logprobs=1
        )
        for p in PROMPTS
    ]
    ours = kernel.call("tiny", Capability.COMPLETE, by_text)
    assert kernel.call("tiny", Capability.COMPLETE, by_ids) == ours
    for a, b in zip(ours, kernel.call("tiny-hf", Capability.COMPLETE, by_text), strict=True):
        assert a.text == b.text and "".join(a.logprobs.tokens) == a.text
        same(a, b)


def test_chat_logprobs_match_the_transformers_provider(kernel: Kernel) -> None:
    request = ChatRequest(
        messages=[{"role": "user", "content": "hello"}],
        sampling=GREEDY,
        logprobs=True,
        top_logprobs=1,
    )
    [ours] = kernel.call("tiny", Capability.CHAT, [request])
    [theirs] = kernel.call("tiny-hf", Capability.CHAT, [request])
    assert ours.message.content == theirs.message.content
    same(ours, theirs)


def test_more_than_one_alternative_is_a_400(kernel: Kernel) -> None:
    with pytest.raises(UsageError, match="at most 1") as caught:
        kernel.call(
            "tiny",
            Capability.COMPLETE,
            [CompletionRequest(prompt="x", sampling=GREEDY, logprobs=2)],
        )
    assert caught.value.param == "logprobs"
    chat = ChatRequest(messages=[{"role": "user", "content": "x"}], logprobs=True, top_logprobs=2)
    with pytest.raises(UsageError, match="at most 1") as caught:
        kernel.call("tiny", Capability.CHAT, [chat])
    assert caught.value.param == "top_logprobs"


def test_a_lora_adapter_echoes_logprobs_as_transformers_serves_it(kernel: Kernel) -> None:
    """With LoRA slots on (the default) vLLM's prompt_logprobs kills the
    engine in a batch: the prompt's are asked a position at a time, several
    requests at once, and the engine lives on."""
    requests = [
        CompletionRequest(prompt=q, sampling=GREEDY, echo=True, logprobs=1)
        for q in ("greet kim", "greet lea")
    ]
    ours = kernel.call("lora-a", Capability.COMPLETE, requests)
    theirs = kernel.call("lora-a-hf", Capability.COMPLETE, requests)
    for a, b in zip(ours, theirs, strict=True):
        assert a.text == b.text
        same(a, b)
    assert kernel.call("tiny", Capability.COMPLETE, [requests[0]])  # the engine is alive
