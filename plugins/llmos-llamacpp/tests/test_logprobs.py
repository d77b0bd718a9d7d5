"""Token log-probabilities: of answers (completions and chat), of echoed
prompts, and their agreement with continuation scores."""

from __future__ import annotations

import math

from llmos.runtime.kernel import Kernel
from llmos.types import Capability, ChatMessage, ChatRequest, CompletionRequest, Sampling

from .conftest import MODEL

PROMPT = "The capital of France is"


def test_greedy_tokens_are_the_most_likely_and_sorted(kernel: Kernel) -> None:
    request = CompletionRequest(
        prompt=PROMPT, sampling=Sampling(temperature=0, max_tokens=8), logprobs=5
    )
    [result] = kernel.call(MODEL, Capability.COMPLETE, [request])
    lp = result.logprobs
    assert lp is not None and len(lp.tokens) == result.usage.completion_tokens == 8
    assert "".join(lp.tokens) == result.text
    for token, chosen, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs, strict=True):
        assert len(top) == 5
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert top[0][0] == token  # greedy: the chosen token is the most likely
        assert chosen is not None and math.isclose(chosen, top[0][1], abs_tol=1e-6)
        assert chosen <= 0 and sum(math.exp(v) for v in values) <= 1 + 1e-6
    assert list(lp.text_offset) == [
        sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))
    ]
    # the first tokens' log-probabilities, scored as a continuation of the
    # prompt (its text tokenizes back to the same tokens: " Paris", ".", "\n")
    head = "".join(lp.tokens[:3])
    [scored] = kernel.call(
        MODEL,
        Capability.COMPLETE,
        [CompletionRequest(prompt=PROMPT, score_continuations=(head,))],
    )
    assert math.isclose(scored.continuation_logprobs[0], sum(lp.token_logprobs[:3]), abs_tol=0.05)


def test_echo_reports_the_prompt_first(kernel: Kernel) -> None:
    request = CompletionRequest(
        prompt=PROMPT, sampling=Sampling(temperature=0, max_tokens=3), logprobs=1, echo=True
    )
    [result] = kernel.call(MODEL, Capability.COMPLETE, [request])
    lp = result.logprobs
    assert result.text.startswith(PROMPT)
    assert len(lp.tokens) == result.usage.prompt_tokens + result.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] == ()
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    assert "".join(lp.tokens) == result.text
    # the same prompt without echo: the answer's own entries are the same
    plain = CompletionRequest(
        prompt=PROMPT, sampling=Sampling(temperature=0, max_tokens=3), logprobs=1
    )
    [alone] = kernel.call(MODEL, Capability.COMPLETE, [plain])
    tail = lp.token_logprobs[-3:]
    assert all(
        math.isclose(a, b, abs_tol=0.05)
        for a, b in zip(tail, alone.logprobs.token_logprobs, strict=True)
    )


def test_token_id_prompts_answer_like_text(kernel: Kernel) -> None:
    model = kernel.models.get(MODEL).model
    ids = model.vocab.encode(PROMPT, add_special_tokens=True)
    sampling = Sampling(temperature=0, max_tokens=6)
    [by_text, by_ids] = [
        kernel.call(MODEL, Capability.COMPLETE, [r])[0]
        for r in (
            CompletionRequest(prompt=PROMPT, sampling=sampling),
            CompletionRequest(prompt="", prompt_ids=ids, sampling=sampling),
        )
    ]
    assert by_text.text == by_ids.text and by_ids.usage.prompt_tokens == len(ids)


def test_chat_logprobs_and_top_logprobs(kernel: Kernel) -> None:
    request = ChatRequest(
        messages=(ChatMessage("user", "Say hello."),),
        sampling=Sampling(temperature=0, max_tokens=6),
        logprobs=True,
        top_logprobs=3,
    )
    [result] = kernel.call(MODEL, Capability.CHAT, [request])
    lp = result.logprobs
    assert lp is not None and "".join(lp.tokens) == result.message.content
    assert all(
        len(top) == 3 and top[0][0] == t for t, top in zip(lp.tokens, lp.top_logprobs, strict=True)
    )
