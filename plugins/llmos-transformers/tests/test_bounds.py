"""Bounds on a causal LM's work: the context, the work-memory budget, and
calls that stop once every caller has gone away.

Scoring runs each prompt once and its continuations from copies of the
prompt's cache; these tests hold it to the straightforward computation (the
whole prompt and continuation in one forward, log-softmax over every
position) on the tiny Llama, and make the chunking happen by giving a model a
small budget.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos.errors import UsageError
from llmos.runtime.worker import BatchSettings, ModelWorker
from llmos.types import (
    CallAbandoned,
    Capability,
    ChatMessage,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbedRequest,
    LoadedModel,
    MonitorEvent,
    Sampling,
    cancel_scope,
)
from llmos_transformers import causal

LONG = "the cat sat on the mat. a dog ran in the park! " * 6  # about 100 of 128 tokens
LABELS = ("animal", "finance", "geography", "a dog ran", "stock markets fell sharply")


def reference_score(hf_llama: Any, prompt: list[int], continuation: list[int]) -> float:
    """The sum of the continuation's log-probabilities, the plain way."""
    if not continuation:
        return 0.0
    with torch.inference_mode():
        logits = hf_llama(torch.tensor([prompt + continuation])).logits[0]
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    return sum(float(logprobs[len(prompt) - 1 + j, t]) for j, t in enumerate(continuation))


@pytest.fixture
def small(load_model: Any, llama_dir: Path) -> Iterator[LoadedModel]:
    """A tiny Llama of its own, whose budget a test may lower."""
    model = load_model(llama_dir, name="tiny-bounds", max_batch_size=4, max_new_tokens=32)
    yield model


class Forwards:
    """Counts the model's top-level forward calls (prefill steps, generation
    steps, scoring pieces); ``at(n, action)`` runs ``action`` on the n-th."""

    def __init__(self, model: LoadedModel) -> None:
        self.calls = 0
        self.actions: dict[int, Any] = {}
        module = model.model  # type: ignore[attr-defined]
        self.handle = module.register_forward_pre_hook(self._hook)

    def _hook(self, module: Any, args: Any) -> None:
        self.calls += 1
        if (action := self.actions.get(self.calls)) is not None:
            action()

    def at(self, n: int, action: Any) -> None:
        self.actions[n] = action

    def close(self) -> None:
        self.handle.remove()


@pytest.fixture
def forwards(small: LoadedModel) -> Iterator[Forwards]:
    counter = Forwards(small)
    yield counter
    counter.close()


# --------------------------------------------------------------- exactness


def test_scores_equal_the_full_sequence_computation(
    llama: LoadedModel, hf_llama: Any, hf_tokenizer: Any
) -> None:
    continuations = (" mat", " rug.", " ran in the park", "", " mat", "!")  # one empty, one twice
    requests = [
        CompletionRequest(prompt="the cat sat on the", score_continuations=continuations),
        CompletionRequest(prompt="a dog", score_continuations=(" ran in the park", " sat")),
        CompletionRequest(prompt="the cat sat on the", score_continuations=(" rug.",)),
    ]
    results = llama.complete(requests)
    for request, result in zip(requests, results, strict=True):
        prompt = hf_tokenizer(request.prompt)["input_ids"]
        expected = [
            reference_score(
                hf_llama, prompt, hf_tokenizer(c, add_special_tokens=False)["input_ids"]
            )
            for c in request.score_continuations
        ]
        assert result.continuation_logprobs == pytest.approx(expected, abs=1e-4)


def test_chunked_scoring_equals_the_full_sequence_computation(
    small: LoadedModel,
    hf_llama: Any,
    hf_tokenizer: Any,
    forwards: Forwards,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A budget of a few rows, pieces of two positions and prefill steps of
    16 tokens: the copies of the prompt's cache, the pieces and the steps
    add up to the same numbers."""
    monkeypatch.setattr(causal, "_PIECE", 2)
    prompt_text = "Text: " + LONG + "\nLabel: "
    prompt = hf_tokenizer(prompt_text)["input_ids"]
    two_rows = small._kv(len(prompt)) + small._rows_cost(len(prompt), [8, 8])  # type: ignore[attr-defined]
    small.budget = two_rows  # type: ignore[attr-defined]  # (prefill steps shrink to fit)
    assert small._row_cost(len(prompt), 8) <= two_rows  # type: ignore[attr-defined]
    assert small._rows_fitting(len(prompt), [5] * len(LABELS)) < len(LABELS)  # type: ignore[attr-defined]
    results = small.classify([ClassifyRequest(text=LONG, labels=LABELS)])
    assert forwards.calls > len(prompt) // 16 + 2  # stepped and chunked
    scores = [
        reference_score(
            hf_llama, prompt, hf_tokenizer(label, add_special_tokens=False)["input_ids"]
        )
        for label in LABELS
    ]
    weights = [math.exp(s - max(scores)) for s in scores]
    expected = {label: w / sum(weights) for label, w in zip(LABELS, weights, strict=True)}
    assert dict(results[0].scores) == pytest.approx(expected, abs=1e-4)
    [scored] = small.complete([CompletionRequest(prompt=prompt_text, score_continuations=LABELS)])
    assert scored.continuation_logprobs == pytest.approx(scores, abs=1e-4)


def test_duplicate_labels_do_not_break_scoring(llama: LoadedModel) -> None:
    [result] = llama.classify([ClassifyRequest(text="a kitten", labels=("animal", "animal"))])
    assert set(result.scores) == {"animal"}  # (the HTTP layer refuses duplicates)


def test_stepped_prefill_generates_what_one_forward_does(
    small: LoadedModel, hf_llama: Any, hf_tokenizer: Any, forwards: Forwards
) -> None:
    """Prompts of different lengths (left padding), run in prefill steps of
    16 tokens, continue exactly as transformers' own generate does."""
    small.budget = 1  # type: ignore[attr-defined]  # the smallest steps, one row a call
    prompts = [LONG[:200], "the cat", LONG[:120]]
    with pytest.raises(UsageError, match="max_work_memory_mb"):
        small.complete([CompletionRequest(prompt=prompts[0], sampling=Sampling(max_tokens=4))])
    small.budget = small._generation_cost(2, 60, 8)  # type: ignore[attr-defined]  # two rows
    results = small.complete(
        [
            CompletionRequest(prompt=p, sampling=Sampling(temperature=0, max_tokens=8))
            for p in prompts
        ]
    )
    for text, result in zip(prompts, results, strict=True):
        ids = hf_tokenizer(text)["input_ids"]
        with torch.inference_mode():
            out = hf_llama.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
        assert result.text == hf_tokenizer.decode(out[0, len(ids) :], skip_special_tokens=True)


def test_rows_share_a_generate_call_only_within_the_budget(small: LoadedModel) -> None:
    rows: list[int] = []
    inner = small.model.generate  # type: ignore[attr-defined]

    def generate(**kwargs: Any) -> Any:
        rows.append(int(kwargs["input_ids"].shape[0]))
        return inner(**kwargs)

    small.model.generate = generate  # type: ignore[attr-defined]
    try:
        requests = [
            CompletionRequest(prompt=LONG[: 60 + 10 * i], sampling=Sampling(max_tokens=4))
            for i in range(4)
        ]
        small.complete(requests)
        assert rows == [4]  # the default budget: one call
        rows.clear()
        prompts = [small._prompt(small._encode(r.prompt), r.sampling) for r in requests]  # type: ignore[attr-defined]
        widths = [len(p.ids) for p in prompts]
        small.budget = small._generation_cost(2, max(widths), 4)  # type: ignore[attr-defined]
        sizes = [len(chunk) for chunk in small._chunks(prompts, [0, 1, 2, 3])]  # type: ignore[attr-defined]
        assert max(sizes) < 4 and sum(sizes) == 4
        small.complete(requests)
        assert rows == sizes
    finally:
        del small.model.generate  # type: ignore[attr-defined]


# ------------------------------------------------------------------ context


def test_every_capability_refuses_input_over_the_context(llama: LoadedModel) -> None:
    too_long = "the cat sat on the mat. " * 40  # > 128 tokens
    with pytest.raises(UsageError, match=r"at most 128 tokens"):
        llama.classify([ClassifyRequest(text=too_long, labels=("a", "b"))])
    with pytest.raises(UsageError, match=r"at most 128 tokens"):
        llama.complete([CompletionRequest(prompt=too_long, score_continuations=(" a",))])
    with pytest.raises(UsageError, match=r"at most 128 tokens"):
        llama.chat([ChatRequest(messages=[ChatMessage("user", too_long)])])
    with pytest.raises(UsageError, match=r"at most 128 tokens"):
        list(llama.stream([CompletionRequest(prompt=too_long)]))


def test_a_continuation_must_fit_the_context_with_its_prompt(
    llama: LoadedModel, hf_tokenizer: Any
) -> None:
    """The prompt fits, the prompt and the label together do not: refused,
    naming both counts, rather than scored past the model's positions."""
    text = LONG + "the cat sat on the mat. "
    prompt = len(hf_tokenizer("Text: " + text + "\nLabel: ")["input_ids"])
    assert prompt < 128
    label = " the cat sat on the mat." * 8
    with pytest.raises(UsageError, match=rf"the prompt \({prompt} tokens\) and the continuation"):
        llama.classify([ClassifyRequest(text=text, labels=("a", label))])


def test_encoders_refuse_input_over_their_limit(
    load_model: Any, classifier_dir: Path, encoder_dir: Path, tmp_path: Path
) -> None:
    import shutil

    too_long = "the cat sat on the mat. " * 20  # > 64 tokens
    classifier = load_model(classifier_dir, name="tiny-classifier-bounds")
    with pytest.raises(UsageError, match=r"tokens; model .* takes at most 64 tokens"):
        classifier.classify([ClassifyRequest(text=too_long)])
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(encoder_dir / name, bare / name)
    encoder = load_model(bare, name="bare-bounds")
    with pytest.raises(UsageError, match=r"takes at most 64 tokens"):
        encoder.embed([EmbedRequest(text=too_long)])
    # a sentence-transformers folder truncates at its max_seq_length, as
    # sentence-transformers does (its own, deliberate choice)
    st = load_model(encoder_dir, name="st-bounds")
    [result] = st.embed([EmbedRequest(text=too_long)])
    assert result.usage.prompt_tokens == 16


# ------------------------------------------------------------------- budget


def test_scoring_over_the_budget_is_refused_naming_the_option(small: LoadedModel) -> None:
    small.budget = 1  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match=r"max_work_memory_mb") as caught:
        small.classify([ClassifyRequest(text="a kitten", labels=("animal", "finance"))])
    assert "label 'animal' of text 0" in str(caught.value)


def test_default_budget_admits_a_full_context_row(llama: LoadedModel) -> None:
    assert llama.budget >= causal.DEFAULT_WORK_MEMORY_MB * causal.MIB  # type: ignore[attr-defined]
    assert llama.budget >= llama._row_cost(127, 1)  # type: ignore[attr-defined]


def test_max_work_memory_mb_option(load_model: Any, llama_dir: Path) -> None:
    model = load_model(llama_dir, name="tiny-budget", max_work_memory_mb=3)
    assert model.budget == 3 * causal.MIB  # type: ignore[attr-defined]
    with pytest.raises(UsageError, match="max_work_memory_mb must be a positive integer"):
        load_model(llama_dir, name="tiny-budget-bad", max_work_memory_mb=0)


# ------------------------------------------------------------ cancellation


def test_abandoned_scoring_stops_between_steps(small: LoadedModel, forwards: Forwards) -> None:
    small.budget = small._row_cost(120, 8)  # type: ignore[attr-defined]
    cancel = threading.Event()
    forwards.at(2, cancel.set)
    with cancel_scope(cancel), pytest.raises(CallAbandoned):
        small.classify([ClassifyRequest(text=LONG, labels=LABELS)])
    assert forwards.calls == 2  # stopped after the step during which it was cancelled
    [result] = small.classify([ClassifyRequest(text="a kitten", labels=("animal", "finance"))])
    assert sum(result.scores.values()) == pytest.approx(1.0)


def test_abandoned_generation_stops_between_steps(small: LoadedModel, forwards: Forwards) -> None:
    cancel = threading.Event()
    request = CompletionRequest(prompt="the cat", sampling=Sampling(temperature=0, max_tokens=32))
    forwards.at(3, cancel.set)  # during generation: prefill is one step here
    with cancel_scope(cancel), pytest.raises(CallAbandoned):
        small.complete([request])
    assert forwards.calls == 3
    forwards.calls = 0
    forwards.actions.clear()
    cancel.clear()
    small.budget = small._row_cost(120, 8)  # type: ignore[attr-defined]  # stepped prefill
    forwards.at(2, cancel.set)
    long = CompletionRequest(prompt=LONG, sampling=Sampling(temperature=0, max_tokens=32))
    with cancel_scope(cancel), pytest.raises(CallAbandoned):
        small.complete([long])
    assert forwards.calls == 2


def test_abandoned_stream_stops_in_its_prefill(small: LoadedModel, forwards: Forwards) -> None:
    small.budget = small._row_cost(120, 8)  # type: ignore[attr-defined]
    cancel = threading.Event()
    forwards.at(2, cancel.set)
    long = CompletionRequest(prompt=LONG, sampling=Sampling(temperature=0, max_tokens=32))
    with cancel_scope(cancel), pytest.raises(CallAbandoned):
        list(small.stream([long]))
    assert forwards.calls == 2


def _worker(model: LoadedModel, events: list[MonitorEvent], **settings: Any) -> ModelWorker:
    return ModelWorker("tiny", model, BatchSettings(**settings), events.append)


def test_a_caller_that_goes_away_frees_the_model(small: LoadedModel, forwards: Forwards) -> None:
    """What the daemon does when a client hangs up: the task awaiting the
    call is cancelled while the model runs it. The call stops at its next
    step, and the model answers the next request."""
    small.budget = small._row_cost(120, 8)  # type: ignore[attr-defined]  # many steps
    started, cancelled = threading.Event(), threading.Event()

    def first_step() -> None:
        started.set()
        assert cancelled.wait(30)

    forwards.at(1, first_step)
    events: list[MonitorEvent] = []
    worker = _worker(small, events)
    try:

        async def go() -> None:
            future = worker.submit(Capability.CLASSIFY, [ClassifyRequest(text=LONG, labels=LABELS)])
            task = asyncio.ensure_future(asyncio.wrap_future(future))
            assert await asyncio.to_thread(started.wait, 30)
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            for _ in range(100):  # wrap_future hands the cancel on in a callback
                if future.abandoned:  # type: ignore[attr-defined]
                    break
                await asyncio.sleep(0)
            assert future.abandoned  # type: ignore[attr-defined]
            cancelled.set()
            with pytest.raises(CallAbandoned):
                await asyncio.to_thread(future.result, 60)

        asyncio.run(go())
        assert forwards.calls == 1  # the step under way, then nothing
        after = worker.submit(
            Capability.CLASSIFY, [ClassifyRequest(text="a kitten", labels=LABELS)]
        )
        assert len(after.result(60)) == 1
        assert [e.fields["status"] for e in events] == ["cancelled", "ok"]
    finally:
        worker.close()


def test_a_call_goes_on_while_one_of_its_callers_waits(
    small: LoadedModel, forwards: Forwards
) -> None:
    started, cancelled = threading.Event(), threading.Event()

    def first_step() -> None:
        started.set()
        assert cancelled.wait(30)

    forwards.at(1, first_step)
    events: list[MonitorEvent] = []
    worker = _worker(small, events, max_batch_size=2, max_wait_ms=60_000)
    try:
        gone = worker.submit(Capability.CLASSIFY, [ClassifyRequest(text=LONG, labels=LABELS)])
        kept = worker.submit(Capability.CLASSIFY, [ClassifyRequest(text="a kitten", labels=LABELS)])
        assert started.wait(30)
        assert gone.cancel() is False  # running: not taken back, only marked
        cancelled.set()
        [result] = kept.result(60)
        [alone] = small.classify([ClassifyRequest(text="a kitten", labels=LABELS)])
        assert dict(result.scores) == pytest.approx(dict(alone.scores), abs=1e-6)
        assert [e.fields["status"] for e in events] == ["ok", "ok"]
    finally:
        worker.close()
