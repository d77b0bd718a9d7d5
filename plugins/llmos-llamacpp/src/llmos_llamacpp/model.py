"""A GGUF model served by llama.cpp: completion, chat, streaming, logprobs,
continuation scoring, zero-shot labels and embeddings.

One ``llama_cpp.Llama`` holds the weights (as the file stores them: no
conversion) and one context with one sequence, which is not thread-safe:
every call takes :attr:`LlamaCppModel._lock`, and requests of a batch run one
after the other (``max_batch_size = 1``, so the kernel hands them over one by
one and none waits for another's answer). The context's key/value cache is
kept between calls: a prompt that starts like the previous one (a chat's
system prompt and earlier turns, the zero-shot prompt of several labels)
evaluates only what differs.

Requests become prompt ids and generated ids become text through
:mod:`llmos_transformers.tokens` (:class:`~llmos_llamacpp.vocab.Vocab` gives
it llama.cpp's tokenizer), as for the other providers:

* ``complete``/``chat``: greedy when ``temperature`` is 0 or unset, else
  sampled (temperature, then ``top_p``) under the request's ``seed``, else
  the ``seed`` option, else a fresh one; a request stops at an
  end-of-sequence token (``stop``), at its first ``stop`` string (cut before
  it; ``stop``) or at its ``max_tokens``, capped by ``max_new_tokens`` and
  the context (``length``). A prompt that leaves the context no room is
  refused with its length and the limit;
* ``response_format`` (``json_object``, ``json_schema``) and ``tools``: the
  answer is generated under a llama.cpp grammar made from the JSON Schema
  (a forced tool call's, or the format's); tool calls are parsed out of the
  answer as the transformers provider does;
* ``logprobs``/``top_logprobs`` and ``echo``: the model's raw distribution
  (whatever the temperature) at each answer token, read from the logits the
  token was sampled from; a prompt's, from one more evaluation of it with
  logits at every position;
* ``score_continuations`` and zero-shot ``classify``: each continuation
  evaluated after its prompt (kept in the cache across a prompt's labels),
  the log-probabilities of its tokens summed;
* ``embed``: a second context in embedding mode (pooled, unit length),
  created on the first ``embed`` call; a text longer than its context is
  refused, never cut.

A call whose callers all went away (:func:`llmos.types.cancel_event`) stops
before the next token (or the next chunk of a prompt) with
:class:`~llmos.types.CallAbandoned`.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import structlog

from llmos.errors import UsageError
from llmos.types import (
    CallAbandoned,
    Capability,
    ChatRequest,
    ChatResult,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    CompletionResult,
    EmbedRequest,
    EmbedResult,
    ModelBase,
    ModelCard,
    Sampling,
    StreamChunk,
    Usage,
    cancel_event,
    logprob_fields,
)
from llmos_llamacpp.options import Settings
from llmos_llamacpp.vocab import Vocab
from llmos_transformers import structured, tokens

__all__ = ["LlamaCppModel"]

log = structlog.get_logger("llmos.llamacpp")

#: positions evaluated per step when every position's logits are read (a step
#: holds ``_LOGIT_STEP x n_vocab`` floats: 12 MiB for a 49k vocabulary)
_LOGIT_STEP = 64


@attrs.frozen
class _Generated:
    text: str
    finish_reason: str
    usage: Usage
    ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)
    #: per generated token: its log-probability and the ``top`` most likely
    #: ``(id, logprob)`` (when asked for)
    chosen: tuple[float, ...] = ()
    tops: tuple[tuple[tuple[int, float], ...], ...] = ()


@attrs.frozen
class _Prompt:
    ids: list[int]
    sampling: Sampling
    limit: int
    #: JSON Schema the answer must follow (a grammar is made of it), and the
    #: field that asked for it
    schema: tuple[dict[str, Any], str] | None = None


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    rows = logits.astype(np.float64)
    top = rows.max(axis=-1, keepdims=True)
    return rows - top - np.log(np.exp(rows - top).sum(axis=-1, keepdims=True))


def _top(row: np.ndarray, top: int) -> list[tuple[int, float]]:
    """The ``top`` most likely ``(id, logprob)`` of a log-softmax row, most likely first."""
    if top <= 0:
        return []
    picked = np.argpartition(-row, top - 1)[:top]
    picked = picked[np.argsort(-row[picked], kind="stable")]
    return [(int(i), float(row[i])) for i in picked]


class LlamaCppModel(ModelBase):
    """A GGUF causal LM in a llama.cpp context (see the module docstring)."""

    #: one context, one sequence: requests are handed over one at a time
    max_batch_size = 1
    #: token-id prompts, echo, logprobs and top_logprobs (up to OpenAI's limits)
    supports_logprobs = True

    def __init__(
        self,
        card: ModelCard,
        llama: Any,
        settings: Settings,
        path: Path,
        *,
        make_embedder: Callable[[], Any] | None = None,
    ) -> None:
        super().__init__(card)
        self.llama = llama
        self.settings = settings
        self.path = path
        self.vocab = Vocab(llama)
        # what was asked for: llama.cpp pads its own context (to 256), but the
        # Llama object keeps token ids for the context asked for, no more
        self.context = min(int(llama.n_ctx()), len(llama.input_ids))
        self.n_vocab = len(self.vocab)
        self._make_embedder = make_embedder
        self._embedder: Any = None
        self._embed_lock = threading.Lock()
        self._lock = threading.Lock()
        eos = {
            t
            for t in (llama._model.token_eos(), llama._model.token_eot())
            if isinstance(t, int) and t >= 0
        }
        # tokens the vocabulary marks end-of-generation (SmolLM2: <|im_end|>)
        import llama_cpp

        vocab = llama._model.vocab
        for token in range(self.n_vocab):
            if llama_cpp.llama_vocab_is_eog(vocab, token):
                eos.add(token)
        self.eos = frozenset(eos)
        capabilities = {Capability.COMPLETE, Capability.STREAM, Capability.CLASSIFY}
        if self.vocab.chat_template:
            capabilities.add(Capability.CHAT)
            # answers held to a JSON Schema by a llama.cpp grammar
            self.chat_features = frozenset({"response_format", "tools"})
        if make_embedder is not None:
            capabilities.add(Capability.EMBED)
        self.capabilities = frozenset(capabilities)

    # ------------------------------------------------------------- helpers

    def _stop_if_cancelled(self, cancel: Any) -> None:
        if cancel is not None and cancel.is_set():
            raise CallAbandoned(f"model {self.card.ref!r}: every caller went away; stopped")

    def _prompt(self, ids: list[int], sampling: Sampling) -> _Prompt:
        limit = tokens.generation_limit(
            self.card.ref, ids, sampling, self.settings.max_new_tokens, self.context
        )
        return _Prompt(ids=ids, sampling=sampling, limit=limit)

    def _chat_prompt(self, request: ChatRequest) -> _Prompt:
        tools = request.tools if request.tool_choice != "none" else ()
        ids = tokens.chat_ids(
            self.vocab,
            self.card.ref,
            request.messages,
            tools=tools,
            system=structured.json_prompt(request),
        )
        return attrs.evolve(
            self._prompt(ids, request.sampling), schema=structured.answer_schema(request)
        )

    def _request_prompt(self, request: CompletionRequest | ChatRequest) -> _Prompt:
        tokens.check_streamable(request)
        if isinstance(request, ChatRequest):
            return self._chat_prompt(request)
        return self._prompt(tokens.prompt_ids(self.vocab, request), request.sampling)

    def _grammar(self, schema: tuple[dict[str, Any], str] | None) -> Any:
        if schema is None:
            return None
        from llama_cpp import LlamaGrammar

        wanted, param = schema
        try:
            return LlamaGrammar.from_json_schema(json.dumps(wanted), verbose=False)
        except Exception as exc:  # the converter's own errors: a schema it cannot hold
            raise UsageError(
                f"{param}: llama.cpp cannot turn this JSON Schema into a grammar"
                f" ({type(exc).__name__}: {exc}): simplify the schema",
                param=param,
            ) from exc

    # ------------------------------------------------------ the context

    def _keep(self, ids: Sequence[int], most: int) -> None:
        """Keep at most ``most`` leading tokens of the context, those it shares
        with ``ids``; the rest of its cache is dropped."""
        llama = self.llama
        limit = min(llama.n_tokens, most, len(ids))
        differ = np.flatnonzero(llama.input_ids[:limit] != np.asarray(ids[:limit]))
        shared = int(differ[0]) if len(differ) else limit
        if shared < llama.n_tokens:
            if not llama._ctx.kv_cache_seq_rm(-1, shared, -1):
                llama.reset()
                llama._ctx.kv_cache_clear()
                shared = 0
            llama.n_tokens = shared

    def _feed(self, ids: Sequence[int], cancel: Any) -> None:
        """Evaluate ``ids`` after the context's tokens (the last one's logits
        kept), a batch at a time, stopping between batches if cancelled."""
        step = self.llama.n_batch
        for at in range(0, len(ids), step):
            self._stop_if_cancelled(cancel)
            self.llama.eval(ids[at : at + step])

    def _sync(self, ids: list[int], cancel: Any) -> None:
        """Make the context hold ``ids``, with the last one's logits: what is
        shared with what it holds is kept, and the last token is always run
        alone. llama.cpp's logits for a token run in a batch differ from its
        logits run alone (by up to 0.5 on SmolLM2 Q4_1), so running the last
        token alone, whatever the cache held, is what makes an answer the
        same for the same prompt and seed on a fresh or a reused cache."""
        self._keep(ids, len(ids) - 1)
        self._feed(ids[self.llama.n_tokens : -1], cancel)
        self._stop_if_cancelled(cancel)
        self.llama.eval(ids[-1:])

    def _last_logits(self) -> np.ndarray:
        pointer = self.llama._ctx.get_logits_ith(-1)
        return np.ctypeslib.as_array(pointer, shape=(self.n_vocab,))

    def _positions(
        self, ids: list[int], first: int, top: int, cancel: Any
    ) -> tuple[list[float | None], list[list[tuple[int, float]]]]:
        """The log-probability of each of ``ids[first:]`` given those before
        it (``None`` for token 0, which nothing predicts) and the ``top`` most
        likely tokens at its position. The positions before ``first - 1``
        come from the cache where they can; the rest are evaluated with
        logits at every position, :data:`_LOGIT_STEP` at a time."""
        import llama_cpp

        chosen: list[float | None] = [None] if first == 0 else []
        tops: list[list[tuple[int, float]]] = [[]] if first == 0 else []
        start = max(first, 1) - 1  # the first position whose logits are needed
        end = len(ids) - 1  # the last one (it predicts ids[-1])
        if len(ids) <= max(first, 1):  # nothing to report past the first token
            return chosen, tops
        if len(ids) - 1 > self.context:
            raise UsageError(
                f"the prompt and the answer are {len(ids)} tokens; model {self.card.ref!r}"
                f" takes at most {self.context} tokens in all",
                param="prompt",
            )
        llama = self.llama
        self._keep(ids, start)
        self._feed(ids[llama.n_tokens : start], cancel)
        batch = llama._batch
        for at in range(start, end, _LOGIT_STEP):
            self._stop_if_cancelled(cancel)
            piece = ids[at : min(at + _LOGIT_STEP, end)]
            llama._ctx.kv_cache_seq_rm(-1, llama.n_tokens, -1)
            batch.set_batch(batch=piece, n_past=llama.n_tokens, logits_all=True)
            llama._ctx.decode(batch)
            llama.input_ids[llama.n_tokens : llama.n_tokens + len(piece)] = piece
            llama.n_tokens += len(piece)
            logits = np.ctypeslib.as_array(
                llama_cpp.llama_get_logits(llama._ctx.ctx), shape=(len(piece), self.n_vocab)
            )
            rows = _log_softmax(logits)
            for j, row in enumerate(rows):
                target = ids[at + j + 1]
                chosen.append(float(row[target]))
                tops.append(_top(row, top))
        return chosen, tops

    # --------------------------------------------------------- generation

    def _sampler(self, sampling: Sampling, grammar: Any) -> Any:
        from llama_cpp._internals import LlamaSampler

        sampler = LlamaSampler()
        if grammar is not None:
            sampler.add_grammar(self.llama._model, grammar)
        if not tokens.samples(sampling):
            sampler.add_greedy()
            return sampler
        seed = sampling.seed if sampling.seed is not None else self.settings.seed
        if seed is None:
            seed = random.SystemRandom().randrange(1 << 31)
        sampler.add_temp(float(sampling.temperature or 1.0))
        sampler.add_top_p(float(sampling.top_p or 1.0), 1)
        sampler.add_dist(int(seed) & 0xFFFFFFFF)
        return sampler

    def _tokens(
        self,
        prompt: _Prompt,
        cancel: Any,
        top: int | None = None,
        scores: list[tuple[float, list[tuple[int, float]]]] | None = None,
    ) -> Iterator[int]:
        """Generate ``prompt``'s answer token by token (the caller holds the
        lock); with ``top`` set, each token's log-probability and the ``top``
        most likely go to ``scores`` as it comes."""
        sampler = self._sampler(prompt.sampling, self._grammar(prompt.schema))
        stops = prompt.sampling.stop
        self._sync(prompt.ids, cancel)
        out: list[int] = []
        while True:
            self._stop_if_cancelled(cancel)
            if top is not None:
                row = _log_softmax(self._last_logits())
            token = int(sampler.sample(self.llama._ctx, -1))
            if top is not None and scores is not None:
                scores.append((float(row[token]), _top(row, top)))
            out.append(token)
            yield token
            if (
                token in self.eos
                or len(out) >= prompt.limit
                or (stops and tokens.stop_at(self.vocab.decode(out, True), stops) is not None)
            ):
                return
            self.llama.eval([token])

    def _generate(self, prompt: _Prompt, top: int | None, cancel: Any) -> _Generated:
        scores: list[tuple[float, list[tuple[int, float]]]] = []
        out = list(self._tokens(prompt, cancel, top, scores))
        text, reason = tokens.answer(self.vocab, out, prompt.sampling.stop, self.eos)
        return _Generated(
            text=text,
            finish_reason=reason,
            usage=Usage(prompt_tokens=len(prompt.ids), completion_tokens=len(out)),
            ids=out,
            chosen=tuple(s[0] for s in scores),
            tops=tuple(tuple(s[1]) for s in scores),
        )

    def _reported(
        self, prompt: list[int], answer: _Generated, echo: bool, top: int, text: str, cancel: Any
    ) -> Any:
        """The answer's :class:`~llmos.types.Logprobs` (the prompt's tokens
        first with ``echo``); ``text`` is what the offsets point into."""
        kept = tokens.kept(self.vocab, answer.ids, answer.text)
        chosen: list[float | None] = list(answer.chosen[: len(kept)])
        tops = [list(t) for t in answer.tops[: len(kept)]]
        first = len(prompt)
        if echo:
            before, before_tops = self._positions(prompt, 0, top, cancel)
            chosen, tops, first = before + chosen, before_tops + tops, 0
        return tokens.logprobs(self.vocab, prompt + kept, first, chosen, tops, text)

    def _score(self, ids: list[int], continuation: list[int], what: str, cancel: Any) -> float:
        if not continuation:
            return 0.0
        tokens.check_scored(self.card.ref, what, len(ids), len(continuation), self.context)
        chosen, _ = self._positions(ids + continuation, len(ids), 0, cancel)
        return float(sum(lp for lp in chosen if lp is not None))

    # ------------------------------------------------------- capabilities

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        """Continue each prompt. A request with ``score_continuations`` is
        scored, and generates text only when it sets ``sampling.max_tokens``."""
        encoded = [tokens.prompt_ids(self.vocab, r) for r in requests]
        prompts = {
            i: self._prompt(ids, r.sampling)
            for i, (r, ids) in enumerate(zip(requests, encoded, strict=True))
            if tokens.generates(r)
        }
        continuations = [
            [tokens.continuation_ids(self.vocab, c) for c in r.score_continuations]
            for r in requests
        ]
        for i, (ids, mine) in enumerate(zip(encoded, continuations, strict=True)):
            for j, c in enumerate(mine):  # refused before anything runs
                what = f"continuation {j} of prompt {i}"
                tokens.check_scored(self.card.ref, what, len(ids), len(c), self.context)
        cancel = cancel_event()
        results = []
        with self._lock:
            for i, request in enumerate(requests):
                ids = encoded[i]
                scores = [
                    self._score(ids, c, f"continuation {j} of prompt {i}", cancel)
                    for j, c in enumerate(continuations[i])
                ]
                answer = None
                if i in prompts:
                    answer = self._generate(prompts[i], request.logprobs, cancel)
                result = tokens.completion_result(answer, len(ids), scores)
                if answer is not None and (request.echo or request.logprobs is not None):
                    prompt_text = ""
                    if request.echo:
                        prompt_text = (
                            request.prompt
                            if request.prompt_ids is None
                            else tokens.decode(self.vocab, ids)
                        )
                    text = prompt_text + result.text
                    reported = None
                    if request.logprobs is not None:
                        reported = self._reported(
                            ids, answer, request.echo, request.logprobs, text, cancel
                        )
                    result = attrs.evolve(result, text=text, logprobs=reported)
                results.append(result)
        return results

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Answer each chat; with tools, an answer that is a tool call comes
        back as ``tool_calls`` (:func:`structured.tool_result`)."""
        prompts = [self._chat_prompt(r) for r in requests]
        cancel = cancel_event()
        results = []
        with self._lock:
            for request, prompt in zip(requests, prompts, strict=True):
                top = request.top_logprobs if request.logprobs else None
                answer = self._generate(prompt, top, cancel)
                if prompt.schema is not None and answer.finish_reason == "stop":
                    structured.check_json(answer.text, prompt.schema[1])
                reported = None
                if request.logprobs:
                    reported = self._reported(
                        prompt.ids, answer, False, request.top_logprobs, answer.text, cancel
                    )
                result = tokens.chat_result(answer, reported)
                results.append(structured.tool_result(result, request))
        return results

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        """Chunks of each request in turn, one per token that adds text; the
        last chunk of a request has its ``finish_reason`` and ``usage``. The
        context stays locked while the stream is read; closing the stream
        stops the generation and frees it."""
        for request in requests:
            for field in logprob_fields(request):
                if field != "prompt":  # token ids stream; logprobs are not streamed
                    raise UsageError(f"{field} is not supported with streaming", param=field)
        prompts = [self._request_prompt(r) for r in requests]
        cancel = cancel_event()
        with self._lock:
            for index, prompt in enumerate(prompts):
                text = tokens.TextStream(
                    lambda ids: tokens.decode(self.vocab, ids), prompt.sampling.stop
                )
                for token in self._tokens(prompt, cancel):
                    if delta := text.push([token]):
                        yield StreamChunk(index=index, text=delta)
                final, reason = tokens.answer(
                    self.vocab, text.tokens, prompt.sampling.stop, self.eos
                )
                usage = Usage(prompt_tokens=len(prompt.ids), completion_tokens=len(text.tokens))
                rest = text.rest(final)
                if rest is None:  # a decoder that rewrote earlier text
                    log.warning("llamacpp.stream_diverged", model=self.card.ref)
                yield StreamChunk(index=index, text=rest or "", finish_reason=reason, usage=usage)

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]:
        """Zero-shot: each label's log-likelihood as the continuation of the
        ``zero_shot_template`` prompt, turned into probabilities by a softmax."""
        template = self.settings.zero_shot_template
        prompts, pairs = tokens.zero_shot(self.vocab, self.card.ref, template, requests)
        names = [
            f"label {label!r} of text {i}"
            for i, request in enumerate(requests)
            for label in request.labels
        ]
        for (ids, c), what in zip(pairs, names, strict=True):
            tokens.check_scored(self.card.ref, what, len(ids), len(c), self.context)
        cancel = cancel_event()
        with self._lock:
            scores = [
                self._score(ids, c, what, cancel)
                for (ids, c), what in zip(pairs, names, strict=True)
            ]
        return tokens.zero_shot_results(requests, prompts, scores)

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult]:
        """Each text's pooled vector, unit length, from the embedding context
        (made on the first call). A text longer than that context is refused."""
        if self._make_embedder is None:
            raise self._unsupported(Capability.EMBED)
        cancel = cancel_event()
        with self._embed_lock:
            if self._embedder is None:
                self._embedder = self._make_embedder()
            embedder = self._embedder
            limit = int(embedder.n_batch)
            results = []
            for i, request in enumerate(requests):
                ids = embedder.tokenize(request.text.encode("utf-8"))  # as embed() does
                if len(ids) > limit:
                    raise UsageError(
                        f"input {i} is {len(ids)} tokens; model {self.card.ref!r} embeds at"
                        f" most {limit} tokens (n_ctx): shorten the text",
                        param="input",
                    )
                self._stop_if_cancelled(cancel)
                vector = embedder.embed(request.text, normalize=True)
                results.append(
                    EmbedResult(
                        vector=[float(v) for v in vector], usage=Usage(prompt_tokens=len(ids))
                    )
                )
        return results

    def close(self) -> None:
        with self._lock, self._embed_lock:
            for held in (self.llama, self._embedder):
                if held is not None:
                    held.close()
            self.llama = None
            self._embedder = None
