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
  ``finish_reason`` and ``usage``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator, Sequence
from typing import Any

import attrs

from llmos.types import (
    Capability,
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
    #: token-id prompts, echo and logprobs are not served yet (vLLM's
    #: prompt_logprobs/logprobs would do it): the kernel refuses them with a
    #: 400 naming the field rather than answer without them
    supports_logprobs = False
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
        return tokens.encode(self.tokenizer, request.prompt)

    def _room(self, ids: Sequence[int]) -> int:
        """Tokens the context (``max_model_len``) leaves after ``ids``."""
        return tokens.room(self.card.ref, ids, self.engine.max_model_len)

    def _params(self, ids: Sequence[int], sampling: Sampling, *, delta: bool = False) -> Any:
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

    async def _score(self, ids: list[int], continuation: list[int]) -> float:
        """Summed log-probability of ``continuation`` after ``ids``: one
        request per token, each asking for that token's log-probability at the
        one position it generates. (vLLM's ``prompt_logprobs`` would take one
        request, but with LoRA on, vLLM 0.32 fails on it in any batch of two
        or more requests, and the engine dies.)"""
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        if not continuation:
            return 0.0
        self._room(ids + continuation[:-1])

        def params(token: int) -> Any:
            return SamplingParams(
                max_tokens=1,
                temperature=0.0,
                logprob_token_ids=[token],
                detokenize=False,
                output_kind=RequestOutputKind.FINAL_ONLY,
            )

        outputs = await asyncio.gather(
            *(
                self.engine.generate(ids + continuation[:i], params(token), self.lora)
                for i, token in enumerate(continuation)
            )
        )
        return float(
            sum(
                out.outputs[0].logprobs[0][token].logprob
                for out, token in zip(outputs, continuation, strict=True)
            )
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
        prompts = [tokens.encode(self.tokenizer, r.prompt) for r in requests]
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
        for i, (ids, request) in enumerate(zip(prompts, requests, strict=True)):
            count = len(request.score_continuations)
            mine, scores = scores[:count], scores[count:]
            results.append(tokens.completion_result(generated.get(i), len(ids), mine))
        return results

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        return [tokens.chat_result(g) for g in self.generate(requests)]

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        """Chunks of every request as its tokens come (requests run together;
        their chunks may interleave); closing the stream aborts them."""

        def decode(ids: list[int]) -> str:
            return tokens.decode(self.tokenizer, ids)

        jobs, texts = [], []
        for request in requests:
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
