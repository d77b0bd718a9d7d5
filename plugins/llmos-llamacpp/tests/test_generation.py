"""Chat, completion, streaming, sampling, scoring, structured answers and
embeddings of the bundled SmolLM2 GGUF file, through the kernel."""

from __future__ import annotations

import json
import math
import threading

import pytest

from llmos.runtime.kernel import Kernel
from llmos.types import (
    CallAbandoned,
    Capability,
    ChatMessage,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbedRequest,
    ModelFormat,
    ResponseFormat,
    Sampling,
    cancel_scope,
)

from .conftest import MODEL

GREEDY = Sampling(temperature=0, max_tokens=24)
QUESTION = (ChatMessage("user", "What is the capital of France?"),)


def chat(kernel: Kernel, request: ChatRequest):  # type: ignore[no-untyped-def]
    [result] = kernel.call(MODEL, Capability.CHAT, [request])
    return result


def complete(kernel: Kernel, request: CompletionRequest):  # type: ignore[no-untyped-def]
    [result] = kernel.call(MODEL, Capability.COMPLETE, [request])
    return result


def test_the_bundled_card_is_discovered(kernel: Kernel) -> None:
    card = kernel.registry.store.get(MODEL)
    assert card.provider == "llamacpp"
    assert card.format == ModelFormat.GGUF
    assert card.source.endswith("SmolLM2-135M-Instruct.Q4_1.gguf")
    model = kernel.models.get(MODEL).model
    assert {Capability.CHAT, Capability.EMBED, Capability.COMPLETE} <= model.capabilities
    assert model.context == 4096  # the default, under the model's trained 8192


def test_greedy_chat_is_deterministic_and_answers(kernel: Kernel) -> None:
    first = chat(kernel, ChatRequest(messages=QUESTION, sampling=GREEDY))
    second = chat(kernel, ChatRequest(messages=QUESTION, sampling=GREEDY))
    assert first.message.content == second.message.content
    assert first.message.role == "assistant"
    assert first.usage.prompt_tokens > 10
    assert 0 < first.usage.completion_tokens <= 24
    # the template's end-of-turn token ends the answer and is not in its text
    assert "<|im_end|>" not in first.message.content


def test_max_tokens_and_stop_strings(kernel: Kernel) -> None:
    prompt = "The days of the week are Monday, Tuesday,"
    full = complete(kernel, CompletionRequest(prompt=prompt, sampling=GREEDY))
    assert full.finish_reason == "length" and full.usage.completion_tokens == 24
    five = complete(
        kernel, CompletionRequest(prompt=prompt, sampling=Sampling(temperature=0, max_tokens=5))
    )
    assert five.usage.completion_tokens == 5 and five.finish_reason == "length"
    assert full.text.startswith(five.text)
    stop = "Friday"
    assert stop in full.text
    cut = complete(
        kernel,
        CompletionRequest(
            prompt=prompt, sampling=Sampling(temperature=0, max_tokens=24, stop=(stop,))
        ),
    )
    assert cut.finish_reason == "stop"
    assert cut.text == full.text[: full.text.index(stop)]


def test_streams_join_to_the_answer(kernel: Kernel) -> None:
    for request in (
        ChatRequest(messages=QUESTION, sampling=GREEDY),
        CompletionRequest(prompt="Once upon a time", sampling=GREEDY),
    ):
        capability = Capability.CHAT if isinstance(request, ChatRequest) else Capability.COMPLETE
        [whole] = kernel.call(MODEL, capability, [request])
        chunks = list(kernel.stream(MODEL, request))
        text = whole.message.content if isinstance(request, ChatRequest) else whole.text
        assert len(chunks) > 3
        assert "".join(c.text for c in chunks) == text
        assert chunks[-1].finish_reason == whole.finish_reason
        assert chunks[-1].usage == whole.usage


def test_sampling_follows_the_seed(kernel: Kernel) -> None:
    def sampled(seed: int) -> str:
        sampling = Sampling(temperature=1.0, top_p=0.95, max_tokens=24, seed=seed)
        return complete(
            kernel, CompletionRequest(prompt="My favourite food is", sampling=sampling)
        ).text

    assert sampled(7) == sampled(7)
    assert len({sampled(7), sampled(8), sampled(9)}) > 1
    # top_p keeps the most likely tokens: at 1e-6 only the first, the greedy one
    narrow = Sampling(temperature=1.5, top_p=1e-6, max_tokens=24, seed=3)
    prompt = "My favourite food is"
    assert (
        complete(kernel, CompletionRequest(prompt=prompt, sampling=narrow)).text
        == complete(kernel, CompletionRequest(prompt=prompt, sampling=GREEDY)).text
    )


def test_json_schema_answers_hold_to_it(kernel: Kernel) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "country": {"type": "string"}},
        "required": ["city", "country"],
        "additionalProperties": False,
    }
    request = ChatRequest(
        messages=(ChatMessage("user", "Name a city and its country."),),
        sampling=Sampling(temperature=0, max_tokens=48),
        response_format=ResponseFormat(type="json_schema", schema=schema),
    )
    answer = json.loads(chat(kernel, request).message.content)
    assert set(answer) == {"city", "country"}
    assert all(isinstance(v, str) for v in answer.values())


def test_zero_shot_labels_are_the_softmax_of_continuation_scores(kernel: Kernel) -> None:
    labels = ("positive", "negative")
    text = "I loved this film, it was wonderful."
    [result] = kernel.call(MODEL, Capability.CLASSIFY, [ClassifyRequest(text=text, labels=labels)])
    assert math.isclose(sum(result.scores.values()), 1.0, rel_tol=1e-9)
    prompt = f"Text: {text}\nLabel: "
    scored = complete(kernel, CompletionRequest(prompt=prompt, score_continuations=labels))
    assert scored.text == "" and scored.usage.completion_tokens == 0
    a, b = scored.continuation_logprobs
    assert a < 0 and b < 0
    assert math.isclose(result.scores["positive"], 1 / (1 + math.exp(b - a)), rel_tol=1e-6)


def test_embeddings_place_similar_sentences_closer(kernel: Kernel) -> None:
    texts = [
        "The cat sat on the mat.",
        "A kitten was sitting on the rug.",
        "Stock markets fell sharply on Monday.",
    ]
    results = kernel.call(MODEL, Capability.EMBED, [EmbedRequest(text=t) for t in texts])
    vectors = [r.vector for r in results]
    assert all(len(v) == 576 for v in vectors)  # SmolLM2-135M's width
    assert all(math.isclose(sum(x * x for x in v), 1.0, rel_tol=1e-4) for v in vectors)

    def cosine(a: tuple[float, ...], b: tuple[float, ...]) -> float:
        return sum(x * y for x, y in zip(a, b, strict=True))

    assert cosine(vectors[0], vectors[1]) > cosine(vectors[0], vectors[2])
    assert results[0].usage.prompt_tokens > 0


def test_a_call_whose_callers_left_stops(kernel: Kernel) -> None:
    """Cancellation is checked per token: an event set while a stream runs
    stops it with CallAbandoned, and the model answers the next call."""
    model = kernel.models.get(MODEL).model
    event = threading.Event()
    request = CompletionRequest(
        prompt="Once upon a time", sampling=Sampling(temperature=0, max_tokens=200)
    )
    with cancel_scope(event):
        stream = model.stream([request])
        got = [next(stream), next(stream)]
        event.set()
        with pytest.raises(CallAbandoned):
            for chunk in stream:
                got.append(chunk)
    assert len(got) < 10
    assert (
        complete(
            kernel,
            CompletionRequest(prompt="Hello", sampling=Sampling(temperature=0, max_tokens=3)),
        ).usage.completion_tokens
        == 3
    )


def test_concurrent_calls_share_the_context_safely(kernel: Kernel) -> None:
    """Calls from several threads straight into the model (no kernel queue
    in between) take turns on the one llama.cpp context: each gets the
    answer it gets alone."""
    model = kernel.models.get(MODEL).model
    prompts = ["Once upon a time", "The best way to learn", "My favourite food is"]
    alone = {
        p: model.complete([CompletionRequest(prompt=p, sampling=GREEDY)])[0].text for p in prompts
    }
    got: dict[str, str] = {}

    def call(prompt: str) -> None:
        got[prompt] = model.complete([CompletionRequest(prompt=prompt, sampling=GREEDY)])[0].text

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts * 2]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == alone


def test_a_model_without_embeddings_says_so(kernel: Kernel) -> None:
    from llmos.errors import CapabilityNotSupported

    from .conftest import SMALL

    with pytest.raises(CapabilityNotSupported, match="does not support embed"):
        kernel.call(SMALL, Capability.EMBED, [EmbedRequest(text="a cat")])
