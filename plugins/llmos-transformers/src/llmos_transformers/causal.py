"""Causal language models: completion, chat, streaming, scoring, zero-shot labels.

Every request becomes a list of prompt token ids (a chat through the
tokenizer's chat template), and requests that can share one ``generate`` call
are batched with left padding:

* greedy requests (temperature 0 or unset) together;
* sampled requests without a seed together, per temperature and top_p;
* a sampled request with a seed alone, under its own seeded RNG, so that its
  answer does not depend on what else was in the batch.

Each row stops on its own: at an end-of-sequence token, at its ``max_tokens``
(capped by the ``max_new_tokens`` option) or at the first of its ``stop``
strings, where the text is cut. Streaming runs the same ``generate`` in a
thread and hands out the text as tokens come, so a stream concatenates to what
:meth:`CausalLM.complete` returns.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import structlog
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from llmos.types import (
    Capability,
    ChatMessage,
    ChatRequest,
    ChatResult,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    CompletionResult,
    ModelBase,
    ModelCard,
    Sampling,
    StreamChunk,
    Usage,
)
from llmos_transformers import tokens
from llmos_transformers.options import Settings
from llmos_transformers.runtime import release, seeded
from llmos_transformers.tokens import stop_at

__all__ = ["CausalLM"]

log = structlog.get_logger("llmos.transformers")


@attrs.frozen
class _Prompt:
    ids: list[int]
    sampling: Sampling
    #: tokens this request may generate: its max_tokens under the cap and the context
    limit: int


@attrs.frozen
class _Generated:
    text: str
    finish_reason: str
    usage: Usage


class _RowStop(StoppingCriteria):
    """A per-row stopping criterion: a row is done at an end-of-sequence
    token, at its own limit, or once its text holds one of its stop strings.
    Records how many tokens each row generated; ``cancel`` stops them all."""

    def __init__(
        self,
        start: int,
        prompts: Sequence[_Prompt],
        eos: frozenset[int],
        decode: Callable[[list[int]], str],
        cancel: threading.Event | None,
    ) -> None:
        self.start = start
        self.limits = [p.limit for p in prompts]
        self.stops = [p.sampling.stop for p in prompts]
        self.eos = eos
        self.decode = decode
        self.cancel = cancel
        self.lengths: list[int | None] = [None] * len(prompts)

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        n = input_ids.shape[1] - self.start
        for i, limit in enumerate(self.limits):
            if self.lengths[i] is not None:
                continue
            generated = input_ids[i, self.start :].tolist()
            if (
                generated[-1] in self.eos
                or n >= limit
                or (self.stops[i] and stop_at(self.decode(generated), self.stops[i]) is not None)
            ):
                self.lengths[i] = n
        cancelled = self.cancel is not None and self.cancel.is_set()
        done = [cancelled or length is not None for length in self.lengths]
        return torch.tensor(done, dtype=torch.bool, device=input_ids.device)


class _QueueStreamer:
    """A ``generate`` streamer that hands each new token id to a queue."""

    def __init__(self, out: queue.SimpleQueue[tuple[str, Any]]) -> None:
        self.out = out
        self.prompt_seen = False

    def put(self, value: torch.Tensor) -> None:
        if not self.prompt_seen:  # generate's first put is the prompt
            self.prompt_seen = True
            return
        for token in value.reshape(-1).tolist():
            self.out.put(("token", token))

    def end(self) -> None:
        pass


class CausalLM(ModelBase):
    """A Hugging Face causal LM (or a GGUF file converted to one)."""

    def __init__(
        self,
        card: ModelCard,
        model: Any,
        tokenizer: Any,
        settings: Settings,
        device: torch.device,
    ) -> None:
        super().__init__(card)
        self.model = model
        self.tokenizer = tokenizer
        self.settings = settings
        self.device = device
        self.max_batch_size = settings.max_batch_size
        self.has_chat_template = bool(getattr(tokenizer, "chat_template", None))
        capabilities = {Capability.COMPLETE, Capability.STREAM, Capability.CLASSIFY}
        if self.has_chat_template:
            capabilities.add(Capability.CHAT)
        self.capabilities = frozenset(capabilities)

        eos: set[int] = set()
        for value in (model.generation_config.eos_token_id, tokenizer.eos_token_id):
            if isinstance(value, int):
                eos.add(value)
            elif isinstance(value, list | tuple):
                eos.update(int(v) for v in value)
        self.eos = frozenset(eos)
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = min(eos) if eos else 0
        self.pad_id = int(pad)
        self.bos_id = tokenizer.bos_token_id
        self.context = getattr(model.config, "max_position_embeddings", None)
        # The folder's generation_config.json (do_sample=True, top_k=50, say)
        # would otherwise fill in whatever a request leaves unset: here only
        # the request's Sampling decides.
        model.generation_config = GenerationConfig(
            bos_token_id=self.bos_id,
            eos_token_id=sorted(self.eos) or None,
            pad_token_id=self.pad_id,
        )
        # One call at a time: generate is not re-entrant, and seeding forks the RNG.
        self._lock = threading.RLock()

    # ------------------------------------------------------------ prompts

    def _decode(self, ids: list[int]) -> str:
        return tokens.decode(self.tokenizer, ids)

    def _encode(self, text: str) -> list[int]:
        return tokens.encode(self.tokenizer, text)

    def _chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return tokens.chat_ids(self.tokenizer, self.card.ref, messages)

    def _prompt(self, ids: list[int], sampling: Sampling) -> _Prompt:
        limit = min(
            sampling.max_tokens or self.settings.max_new_tokens, self.settings.max_new_tokens
        )
        if self.context is not None:
            limit = min(limit, tokens.room(self.card.ref, ids, self.context))
        return _Prompt(ids=ids, sampling=sampling, limit=limit)

    def _request_prompt(self, request: CompletionRequest | ChatRequest) -> _Prompt:
        if isinstance(request, ChatRequest):
            return self._prompt(self._chat_ids(request.messages), request.sampling)
        return self._prompt(self._encode(request.prompt), request.sampling)

    # --------------------------------------------------------- generation

    def _left_padded(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _generate(
        self,
        prompts: Sequence[_Prompt],
        *,
        streamer: _QueueStreamer | None = None,
        cancel: threading.Event | None = None,
    ) -> list[_Generated]:
        """One ``generate`` call for prompts that share their sampling mode."""
        first = prompts[0].sampling
        sample = bool(first.temperature)
        options: dict[str, Any] = {"do_sample": sample}
        if sample:
            options.update(temperature=first.temperature, top_p=first.top_p or 1.0, top_k=0)
        input_ids, attention_mask = self._left_padded([p.ids for p in prompts])
        start = input_ids.shape[1]
        criterion = _RowStop(start, prompts, self.eos, self._decode, cancel)
        with (
            self._lock,
            torch.inference_mode(),
            seeded(first.seed if sample else None, self.device),
        ):
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(p.limit for p in prompts),
                stopping_criteria=StoppingCriteriaList([criterion]),
                streamer=streamer,
                **options,
            )
        results = []
        for i, prompt in enumerate(prompts):
            ids = output[i, start:].tolist()
            length = criterion.lengths[i]
            ids = ids[: len(ids) if length is None else length]
            results.append(self._finish(prompt, ids))
        return results

    def _finish(self, prompt: _Prompt, ids: list[int]) -> _Generated:
        """The text of a row's tokens, cut at its first stop string, and why it ended."""
        text, reason = tokens.answer(self.tokenizer, ids, prompt.sampling.stop, self.eos)
        usage = Usage(prompt_tokens=len(prompt.ids), completion_tokens=len(ids))
        return _Generated(text=text, finish_reason=reason, usage=usage)

    def _run(self, prompts: Sequence[_Prompt]) -> list[_Generated]:
        """Generate for every prompt, batching those that can share a call."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, prompt in enumerate(prompts):
            sampling = prompt.sampling
            if not sampling.temperature:
                key: tuple[Any, ...] = ("greedy",)
            elif sampling.seed is not None:
                key = ("seeded", i)
            else:
                key = ("sampled", sampling.temperature, sampling.top_p)
            groups.setdefault(key, []).append(i)
        results: list[_Generated | None] = [None] * len(prompts)
        size = self.max_batch_size or len(prompts)
        for members in groups.values():
            for at in range(0, len(members), size):
                chunk = members[at : at + size]
                for i, generated in zip(
                    chunk, self._generate([prompts[i] for i in chunk]), strict=True
                ):
                    results[i] = generated
        done = [r for r in results if r is not None]
        assert len(done) == len(prompts)  # every prompt is in exactly one group
        return done

    # ------------------------------------------------------------ scoring

    def _score(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        """Sum of the log-probabilities of each continuation's tokens given its prompt."""
        scores: list[float] = []
        size = self.max_batch_size or len(pairs) or 1
        for at in range(0, len(pairs), size):
            chunk = pairs[at : at + size]
            rows = [prompt + continuation for prompt, continuation in chunk]
            width = max(len(r) for r in rows)
            ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(rows), width), dtype=torch.long)
            for i, row in enumerate(rows):  # right padding: positions stay 0..n-1
                ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
                mask[i, : len(row)] = 1
            with self._lock, torch.inference_mode():
                logits = self.model(
                    input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
                ).logits
            logprobs = torch.log_softmax(logits.float(), dim=-1)
            for i, (prompt, continuation) in enumerate(chunk):
                if not continuation:
                    scores.append(0.0)
                    continue
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
                targets = torch.tensor(continuation, dtype=torch.long)
                picked = logprobs[i, positions.to(logprobs.device), targets.to(logprobs.device)]
                scores.append(float(picked.sum()))
        return scores

    def _continuation_ids(self, text: str) -> list[int]:
        return tokens.continuation_ids(self.tokenizer, text)

    # ------------------------------------------------------- capabilities

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        """Continue each prompt. A request with ``score_continuations`` is
        scored, and generates text only when it sets ``sampling.max_tokens``."""
        prompts: dict[int, _Prompt] = {}
        pairs: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        encoded = [self._encode(request.prompt) for request in requests]
        for i, (request, ids) in enumerate(zip(requests, encoded, strict=True)):
            if tokens.generates(request):
                prompts[i] = self._prompt(ids, request.sampling)
            for continuation in request.score_continuations:
                pairs.append((ids, self._continuation_ids(continuation)))
                owners.append(i)
        generated = dict(zip(prompts, self._run(list(prompts.values())), strict=True))
        logprobs: dict[int, list[float]] = {}
        for owner, score in zip(owners, self._score(pairs), strict=True):
            logprobs.setdefault(owner, []).append(score)
        return [
            tokens.completion_result(generated.get(i), len(ids), logprobs.get(i, ()))
            for i, ids in enumerate(encoded)
        ]

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        prompts = [self._prompt(self._chat_ids(r.messages), r.sampling) for r in requests]
        return [tokens.chat_result(g) for g in self._run(prompts)]

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        """Chunks of each request in turn, one per token that adds text; the
        last chunk of a request has its ``finish_reason`` and ``usage``."""
        for index, request in enumerate(requests):
            yield from self._stream_one(index, self._request_prompt(request))

    def _stream_one(self, index: int, prompt: _Prompt) -> Iterator[StreamChunk]:
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        cancel = threading.Event()

        def work() -> None:
            try:
                [generated] = self._generate(
                    [prompt], streamer=_QueueStreamer(events), cancel=cancel
                )
                events.put(("done", generated))
            except BaseException as exc:
                events.put(("error", exc))

        thread = threading.Thread(target=work, name=f"llmos-stream-{self.card.ref}", daemon=True)
        thread.start()
        text = tokens.TextStream(self._decode, prompt.sampling.stop)
        try:
            while True:
                kind, value = events.get()
                if kind == "error":
                    raise value
                if kind == "done":
                    break
                if delta := text.push([value]):
                    yield StreamChunk(index=index, text=delta)
            final: _Generated = value
            rest = text.rest(final.text)
            if rest is None:  # a decoder that rewrote earlier text
                log.warning("transformers.stream_diverged", model=self.card.ref)
            yield StreamChunk(
                index=index, text=rest or "", finish_reason=final.finish_reason, usage=final.usage
            )
        finally:
            cancel.set()  # a consumer that stopped early stops the generation
            thread.join()

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]:
        """Zero-shot: each label's log-likelihood as the continuation of the
        ``zero_shot_template`` prompt, turned into probabilities by a softmax."""
        template = self.settings.zero_shot_template
        prompts, pairs = tokens.zero_shot(self.tokenizer, self.card.ref, template, requests)
        return tokens.zero_shot_results(requests, prompts, self._score(pairs))

    def close(self) -> None:
        with self._lock:
            self.model = None
        release()
