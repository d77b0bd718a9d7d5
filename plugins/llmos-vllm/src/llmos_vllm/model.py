"""A model served by a vLLM engine: the base, or one LoRA adapter on it.

Requests become prompt token ids, and generated ids become answer text,
through :mod:`llmos_transformers.tokens` — the code the transformers
provider uses — so both providers make the same prompt of a request (a chat
through the tokenizer's chat template) and the same text, stops and stream
chunks of the same tokens. vLLM does the rest: each request goes to the
engine on its own and is batched with whatever else is running, the base's
requests and every adapter's together (an adapter's carry its
``LoRARequest``).

* ``complete`` and ``chat``: greedy when ``temperature`` is 0 or unset, else
  sampled (under the request's ``seed`` when it has one); each request stops
  at an end-of-sequence token of the model's (``stop``), at its first
  ``stop`` string (cut before it; ``stop``) or at its ``max_tokens``, capped
  by ``max_new_tokens`` and the context (``length``);
* ``score_continuations``: the log-probability vLLM gives each token of a
  continuation after the prompt (and the continuation's tokens before it),
  summed;
* ``classify``: zero-shot, the softmax of the labels' scores after the
  ``zero_shot_template`` prompt;
* ``stream``: text as the tokens come; the last chunk of a request has its
  ``finish_reason`` and ``usage``;
* token-id prompts, ``echo`` and ``logprobs`` (chat's ``logprobs`` and
  ``top_logprobs``), with at most 1 most likely token per position (more is
  a 400): vLLM's log-probabilities of each token of the answer (and of the
  prompt with ``echo``), the model's raw distribution, asked one position at
  a time as continuations are scored, and named and placed by
  :func:`llmos_transformers.tokens.logprobs` as the transformers provider does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from llmos.errors import UsageError
from llmos.types import (
    Capability,
    ChatRequest,
    ChatResult,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    CompletionResult,
    Logprobs,
    ModelBase,
    ModelCard,
    Sampling,
    StreamChunk,
    Usage,
    logprob_fields,
)
from llmos_transformers import tokens
from llmos_vllm import engine as engines
from llmos_vllm.engine import Emit, Engine
from llmos_vllm.options import ModelSettings

__all__ = ["Generated", "VllmModel"]


@attrs.frozen
class Generated:
    """One request's answer, with the tokens it was made of."""

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str
    usage: Usage


class VllmModel(ModelBase):
    """A causal LM (or a LoRA adapter on one) served by a shared vLLM engine."""

    #: vLLM batches on its own: the kernel hands requests over as they come
    max_batch_size = None
    #: token-id prompts, echo and logprobs (vLLM's logprobs, a position at a time)
    supports_logprobs = True
    #: response_format and tools are not served yet (vLLM's structured outputs
    #: would do it): the API refuses them with a 400 naming the field rather
    #: than answer free text where JSON or a tool call was asked for
    chat_features: frozenset[str] = frozenset()

    def __init__(
        self,
        card: ModelCard,
        engine: Engine,
        tokenizer: Any,
        settings: ModelSettings,
        *,
        eos: frozenset[int],
        lora: Any = None,
        emit: Emit | None = None,
    ) -> None:
        super().__init__(card)
        self.engine = engine
        self.tokenizer = tokenizer
        self.settings = settings
        self.eos = eos
        self.lora = lora
        self._emit = emit
        capabilities = {Capability.COMPLETE, Capability.STREAM, Capability.CLASSIFY}
        if getattr(tokenizer, "chat_template", None):
            capabilities.add(Capability.CHAT)
        self.capabilities = frozenset(capabilities)

    # ------------------------------------------------------------ prompts

    def _ids(self, request: CompletionRequest | ChatRequest) -> list[int]:
        if isinstance(request, ChatRequest):
            return tokens.chat_ids(self.tokenizer, self.card.ref, request.messages)
        return tokens.prompt_ids(self.tokenizer, request)

    def _room(self, ids: Sequence[int]) -> int:
        """Tokens the context (``max_model_len``) leaves after ``ids``."""
        return tokens.room(self.card.ref, ids, self.engine.max_model_len)

    def _params(
        self,
        ids: Sequence[int],
        sampling: Sampling,
        *,
        delta: bool = False,
    ) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        cap = self.settings.max_new_tokens
        options: dict[str, Any] = {"temperature": 0.0}
        if sampling.temperature:
            options = {"temperature": sampling.temperature, "top_p": sampling.top_p or 1.0}
            if sampling.seed is not None:
                options["seed"] = sampling.seed
        return SamplingParams(
            max_tokens=min(sampling.max_tokens or cap, cap, self._room(ids)),
            # vLLM stops at the stop strings; the text is cut here, as for transformers
            stop=list(sampling.stop) or None,
            stop_token_ids=sorted(self.eos),
            output_kind=RequestOutputKind.DELTA if delta else RequestOutputKind.FINAL_ONLY,
            **options,
        )

    # --------------------------------------------------------- generation

    async def _generate(self, ids: list[int], sampling: Sampling) -> Generated:
        output = await self.engine.generate(ids, self._params(ids, sampling), self.lora)
        done = list(output.outputs[0].token_ids)
        text, reason = tokens.answer(self.tokenizer, done, sampling.stop, self.eos)
        return Generated(
            text=text,
            token_ids=tuple(done),
            finish_reason=reason,
            usage=Usage(prompt_tokens=len(ids), completion_tokens=len(done)),
        )

    def _check_top(self, top: int, param: str) -> None:
        if top > 1:
            raise UsageError(
                f"model {self.card.ref!r} (vLLM) reports at most 1 most likely token per"
                f" position; {param} = {top} asked for more: send 0 or 1, or serve the model"
                " with the transformers provider",
                param=param,
            )

    async def _asked(self, asks: Sequence[tuple[list[int], int]]) -> list[dict[int, Any]]:
        """For each ``(prefix, token)``: vLLM's log-probabilities at the
        position after ``prefix``, ``token``'s among them. One request per
        position, a greedy token with ``logprob_token_ids`` (the requests share
        their cached prefix). Neither ``prompt_logprobs`` (with LoRA slots on,
        vLLM 0.32 fails on it in any batch of two or more requests, and the
        engine dies) nor ``logprobs`` (mixed in a batch with requests of this
        kind, vLLM 0.32 returns -inf garbage for them)."""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        def params(token: int) -> Any:
            return SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprob_token_ids=[token],
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )

        outputs = await asyncio.gather(
            *(self.engine.generate(prefix, params(token), self.lora) for prefix, token in asks)
        )
        return [dict(out.outputs[0].logprobs[0]) for out in outputs]

    async def _positions(self, ids: list[int], first: int) -> list[dict[int, Any]]:
        """vLLM's log-probabilities at positions ``first`` (at least 1) to the
        end of ``ids``: each token's given those before it, and the most
        likely token there."""
        return await self._asked([(ids[:k], ids[k]) for k in range(max(first, 1), len(ids))])

    def _logprobs(
        self, rows: Sequence[tuple[list[int], Generated, bool, int, str]]
    ) -> list[Logprobs]:
        """The :class:`Logprobs` of each ``(prompt, answer, echo, top, text)``:
        of the answer's tokens (the prompt's too with ``echo``), with ``top``
        (0 or 1) most likely tokens each; ``text`` is what the offsets point
        into."""
        sequences = []
        for prompt, answer, echo, _, _ in rows:
            ids = prompt + tokens.kept(self.tokenizer, answer.token_ids, answer.text)
            sequences.append((ids, 0 if echo else len(prompt)))

        async def all_of() -> list[list[dict[int, Any]]]:
            return list(
                await asyncio.gather(*(self._positions(ids, first) for ids, first in sequences))
            )

        reported = []
        for (ids, first), entries, row in zip(
            sequences, self.engine.run(all_of()), rows, strict=True
        ):
            top = row[3]
            chosen: list[float | None] = [None] if first == 0 else []
            tops: list[list[tuple[int, float]]] = [[]] if first == 0 else []
            for k, entry in enumerate(entries, start=max(first, 1)):
                chosen.append(float(entry[ids[k]].logprob))
                ranked = sorted(entry.items(), key=lambda item: -item[1].logprob)
                tops.append([(int(t), float(lp.logprob)) for t, lp in ranked[:top]])
            reported.append(tokens.logprobs(self.tokenizer, ids, first, chosen, tops, row[4]))
        return reported

    async def _score(self, ids: list[int], continuation: list[int]) -> float:
        """Summed log-probability of ``continuation`` after ``ids``: one
        request per token (see :meth:`_asked`)."""
        if not continuation:
            return 0.0
        self._room(ids + continuation[:-1])
        entries = await self._asked(
            [(ids + continuation[:i], token) for i, token in enumerate(continuation)]
        )
        return float(
            sum(entry[token].logprob for entry, token in zip(entries, continuation, strict=True))
        )

    def _scores(self, pairs: Sequence[tuple[list[int], list[int]]]) -> list[float]:
        async def all_of() -> list[float]:
            return list(await asyncio.gather(*(self._score(ids, c) for ids, c in pairs)))

        return self.engine.run(all_of())

    def generate(self, requests: Sequence[CompletionRequest | ChatRequest]) -> list[Generated]:
        """Each request's answer with its token ids (what ``complete`` and
        ``chat`` return, and the ids)."""
        prompts = [self._ids(r) for r in requests]  # bad input fails before any is sent

        async def all_of() -> list[Generated]:
            jobs = zip(prompts, requests, strict=True)
            return list(await asyncio.gather(*(self._generate(ids, r.sampling) for ids, r in jobs)))

        return self.engine.run(all_of())

    # ------------------------------------------------------- capabilities

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        """Continue each prompt. A request with ``score_continuations`` is
        scored, and generates text only when it sets ``sampling.max_tokens``."""
        prompts = [tokens.prompt_ids(self.tokenizer, r) for r in requests]
        for request in requests:
            self._check_top(request.logprobs or 0, "logprobs")
        pairs = [
            (ids, tokens.continuation_ids(self.tokenizer, c))
            for ids, r in zip(prompts, requests, strict=True)
            for c in r.score_continuations
        ]
        wanted = [(i, r) for i, r in enumerate(requests) if tokens.generates(r)]

        async def all_of() -> tuple[list[float], list[Generated]]:
            scores = asyncio.gather(*(self._score(ids, c) for ids, c in pairs))
            answers = asyncio.gather(*(self._generate(prompts[i], r.sampling) for i, r in wanted))
            return list(await scores), list(await answers)

        scores, answers = self.engine.run(all_of())
        generated = dict(zip((i for i, _ in wanted), answers, strict=True))
        results = []
        rows: dict[int, tuple[list[int], Generated, bool, int, str]] = {}
        for i, (ids, request) in enumerate(zip(prompts, requests, strict=True)):
            count = len(request.score_continuations)
            mine, scores = scores[:count], scores[count:]
            result = tokens.completion_result(generated.get(i), len(ids), mine)
            answer = generated.get(i)
            if answer is not None and (request.echo or request.logprobs is not None):
                prompt_text = ""
                if request.echo:
                    prompt_text = (
                        request.prompt
                        if request.prompt_ids is None
                        else tokens.decode(self.tokenizer, ids)
                    )
                result = attrs.evolve(result, text=prompt_text + result.text)
                if request.logprobs is not None:
                    rows[i] = (ids, answer, request.echo, request.logprobs, result.text)
            results.append(result)
        for i, reported in zip(rows, self._logprobs(list(rows.values())), strict=True):
            results[i] = attrs.evolve(results[i], logprobs=reported)
        return results

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        for request in requests:
            self._check_top(request.top_logprobs, "top_logprobs")
        prompts = [self._ids(r) for r in requests]  # bad input fails before any is sent
        answers = self.generate(requests)
        rows = {
            i: (ids, answer, False, request.top_logprobs, answer.text)
            for i, (ids, request, answer) in enumerate(zip(prompts, requests, answers, strict=True))
            if request.logprobs
        }
        reported = dict(zip(rows, self._logprobs(list(rows.values())), strict=True))
        return [tokens.chat_result(answer, reported.get(i)) for i, answer in enumerate(answers)]

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        """Chunks of every request as its tokens come (requests run together;
        their chunks may interleave); closing the stream aborts them."""

        def decode(ids: list[int]) -> str:
            return tokens.decode(self.tokenizer, ids)

        jobs, texts = [], []
        for request in requests:
            for field in logprob_fields(request):
                if field != "prompt":  # token ids stream; logprobs are not streamed
                    raise UsageError(f"{field} is not supported with streaming", param=field)
            ids = self._ids(request)
            jobs.append((ids, self._params(ids, request.sampling, delta=True), self.lora))
            texts.append(tokens.TextStream(decode, request.sampling.stop))
        for index, output in self.engine.stream(jobs):
            text = texts[index]
            delta = text.push(output.outputs[0].token_ids)
            if not output.finished:
                if delta:
                    yield StreamChunk(index=index, text=delta)
                continue
            stops = requests[index].sampling.stop
            final, reason = tokens.answer(self.tokenizer, text.tokens, stops, self.eos)
            usage = Usage(prompt_tokens=len(jobs[index][0]), completion_tokens=len(text.tokens))
            rest = delta + (text.rest(final) or "")
            yield StreamChunk(index=index, text=rest, finish_reason=reason, usage=usage)

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]:
        """Zero-shot: each label's log-likelihood as the continuation of the
        ``zero_shot_template`` prompt, turned into probabilities by a softmax."""
        template = self.settings.zero_shot_template
        prompts, pairs = tokens.zero_shot(self.tokenizer, self.card.ref, template, requests)
        return tokens.zero_shot_results(requests, prompts, self._scores(pairs))

    def close(self) -> None:
        engine, self.engine = self.engine, None  # type: ignore[assignment]
        if engine is not None:
            engines.release(engine, self.card.ref, self._emit)
