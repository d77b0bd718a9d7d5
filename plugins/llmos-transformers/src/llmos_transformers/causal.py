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

Memory and time are bounded per call. Every input must fit the model's
context (a longer one is refused, never cut). Prompts are run through the
model in steps (a chunked prefill into a key/value cache) before
``generate`` continues from that cache, so no step holds attention scores for
a whole long prompt, and a call whose callers all went away
(:func:`llmos.types.cancel_event`) stops between steps. Rows share a
``generate`` call only while their caches fit ``max_work_memory_mb``.
Scoring (``score_continuations``, zero-shot ``classify``) runs each distinct
prompt once and scores its continuations as rows that continue from copies of
the prompt's cache, in chunks under the same budget, taking the log-softmax
only at the continuation's positions.
"""

from __future__ import annotations

import copy
import inspect
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import structlog
import torch
from transformers import GenerationConfig, StoppingCriteria, StoppingCriteriaList

from llmos.errors import UsageError
from llmos.types import (
    CallAbandoned,
    Capability,
    ChatMessage,
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
    cancel_event,
    logprob_fields,
)
from llmos_transformers import structured, tokens
from llmos_transformers.options import Settings
from llmos_transformers.runtime import release, seeded
from llmos_transformers.tokens import stop_at

__all__ = ["CausalLM"]

log = structlog.get_logger("llmos.transformers")

MIB = 1 << 20
#: the work-memory budget when the options name none (MiB)
DEFAULT_WORK_MEMORY_MB = 1024
#: tokens one prefill step runs at most, and at least (fewer when the
#: attention scores of a step over a long cache would take too much)
_STEP_MAX = 512
_STEP_MIN = 16
#: continuation positions a scoring step takes logits for at most
_PIECE = 256


class _Cancels:
    """The events that stop a call: the worker's (every caller went away)
    and a stream's own (its consumer stopped)."""

    def __init__(self, *events: threading.Event | None) -> None:
        self.events = [e for e in events if e is not None]

    def is_set(self) -> bool:
        return any(e.is_set() for e in self.events)


def _cache_of(output: Any) -> Any:
    """The key/value cache a forward returned (``cache`` in transformers 5,
    ``past_key_values`` before)."""
    for name in ("cache", "past_key_values"):
        value = output.get(name) if hasattr(output, "get") else getattr(output, name, None)
        if value is not None:
            return value
    return None


@attrs.frozen
class _Prompt:
    ids: list[int]
    sampling: Sampling
    #: tokens this request may generate: its max_tokens under the cap and the context
    limit: int
    #: what the generated tokens must be (JSON of a schema), or ``None``
    constraint: structured.Constraint | None = attrs.field(default=None, eq=False)


@attrs.frozen
class _Generated:
    text: str
    finish_reason: str
    usage: Usage
    #: the generated token ids (up to the end-of-sequence token, or the limit)
    ids: tuple[int, ...] = attrs.field(default=(), converter=tuple)


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
        cancel: _Cancels | None,
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


class _Allowed:
    """``generate``'s ``prefix_allowed_tokens_fn``: the tokens a constrained
    row may pick next; any token for a row without a constraint, or one that
    has stopped (``generate`` pads it while the others go on)."""

    def __init__(self, start: int, prompts: Sequence[_Prompt], stop: _RowStop, vocab: int) -> None:
        self.start = start
        self.constraints = [p.constraint for p in prompts]
        self.stop = stop
        self.every = torch.arange(vocab)

    def __call__(self, row: int, ids: torch.Tensor) -> Any:
        constraint = self.constraints[row]
        if constraint is None or self.stop.lengths[row] is not None:
            return self.every
        return constraint.allowed(ids[self.start :].tolist()) or self.every


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

    #: token-id prompts, echo and per-token logprobs (:meth:`_token_logprobs`)
    supports_logprobs = True

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
            # constrained decoding and tool calls (structured.py)
            self.chat_features = frozenset({"response_format", "tools"})
        self.capabilities = frozenset(capabilities)
        self._token_data: Any = None  # lm-format-enforcer's table, built on first use

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
        self._shape(model)

    def _shape(self, model: Any) -> None:
        """What the memory estimates need: bytes of key/value cache per token,
        attention heads, vocabulary, element size; and how the forward takes
        a cache (a prompt- or prefix-tuned wrapper takes none: it is run the
        way it was before, without reused caches)."""
        config = model.config
        heads = int(getattr(config, "num_attention_heads", 0) or 1)
        hidden = int(getattr(config, "hidden_size", 0) or 0)
        kv_heads = int(getattr(config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(config, "head_dim", None) or (hidden // heads if hidden else 64))
        layers = int(getattr(config, "num_hidden_layers", 0) or 1)
        self.elem = next(iter(model.parameters())).element_size()
        self.heads = heads
        self.vocab = int(getattr(config, "vocab_size", 0) or len(self.tokenizer))
        self.kv_token_bytes = 2 * layers * kv_heads * head_dim * self.elem
        try:
            parameters = inspect.signature(model.forward).parameters
        except (TypeError, ValueError):  # pragma: no cover - a forward without a signature
            parameters = {}  # type: ignore[assignment]
        self.cache_kw = next((n for n in ("cache", "past_key_values") if n in parameters), None)
        self.keeps_logits = "logits_to_keep" in parameters
        self.takes_positions = "position_ids" in parameters
        own = self.settings.max_work_memory_mb
        self.budget = DEFAULT_WORK_MEMORY_MB * MIB
        if own is not None:
            self.budget = own * MIB
        elif self.context is not None:  # by default one row at the full context always fits
            self.budget = max(self.budget, self._row_cost(self.context - 1, 1))

    # ------------------------------------------------------------- memory

    def _kv(self, tokens: int) -> int:
        return tokens * self.kv_token_bytes

    def _logits(self, positions: int) -> int:
        """Logits in the model's dtype, a float32 copy and the log-softmax's."""
        return positions * self.vocab * (self.elem + 8)

    def _attention(self, rows: int, queries: int, keys: int) -> int:
        """Attention scores and their softmax, should the kernel materialise them."""
        return rows * self.heads * queries * keys * 8

    def _step(self, rows: int, width: int) -> int:
        """Tokens per prefill step: its attention scores and logits take at
        most a quarter of the budget."""
        per_token = self._attention(rows, 1, width)
        if not self.keeps_logits:
            per_token += self._logits(rows)
        return max(_STEP_MIN, min(_STEP_MAX, self.budget // 4 // max(per_token, 1)))

    def _prefill_cost(self, rows: int, width: int) -> int:
        """What the prefill of ``rows`` prompts ``width`` tokens wide holds at
        its peak, besides their cache: one step, or (a model run without a
        reused cache) the whole prompt at once."""
        if self.cache_kw is None:
            return self._attention(rows, width, width) + self._logits(rows * width)
        step = min(self._step(rows, width), width)
        return self._attention(rows, step, width) + (
            self._logits(rows) if self.keeps_logits else self._logits(rows * step)
        )

    def _row_cost(self, prompt: int, continuation: int) -> int:
        """Peak memory of scoring one continuation of ``prompt`` tokens: the
        prompt's prefill, then its cache and one row continuing from a copy
        (or, run without a reused cache, the whole row's attention and logits)."""
        if self.cache_kw is None:
            return self._kv(prompt + continuation) + self._prefill_cost(1, prompt + continuation)
        prefill = self._kv(prompt) + self._prefill_cost(1, prompt)
        return max(prefill, self._kv(prompt) + self._rows_cost(prompt, [continuation]))

    def _rows_cost(self, prompt: int, continuations: Sequence[int]) -> int:
        """What rows continuing a prompt's cache hold: their copies of it,
        and a piece of logits and attention scores each."""
        width = max(continuations)
        piece = min(width, _PIECE)
        rows = len(continuations)
        return rows * (self._kv(prompt + width) + self._logits(piece)) + self._attention(
            rows, piece, prompt + width
        )

    def _too_big(self, what: str, needed: int) -> UsageError:
        return UsageError(
            f"{what} needs about {needed // MIB + 1} MiB of working memory (key/value caches,"
            f" attention, logits); model {self.card.ref!r} allows {self.budget // MIB} MiB per"
            " call (max_work_memory_mb): shorten the input, or raise max_work_memory_mb in"
            " the model card's options or [plugins.transformers]",
            param="max_work_memory_mb",
        )

    def _stop_if_cancelled(self, cancel: _Cancels | threading.Event | None) -> None:
        if cancel is not None and cancel.is_set():
            raise CallAbandoned(f"model {self.card.ref!r}: every caller went away; stopped")

    # ------------------------------------------------------------ prompts

    def _decode(self, ids: list[int]) -> str:
        return tokens.decode(self.tokenizer, ids)

    def _encode(self, text: str) -> list[int]:
        return tokens.encode(self.tokenizer, text)

    def _chat_ids(self, messages: Sequence[ChatMessage]) -> list[int]:
        return tokens.chat_ids(self.tokenizer, self.card.ref, messages)

    def _prompt(self, ids: list[int], sampling: Sampling) -> _Prompt:
        limit = tokens.generation_limit(
            self.card.ref, ids, sampling, self.settings.max_new_tokens, self.context
        )
        return _Prompt(ids=ids, sampling=sampling, limit=limit)

    def _chat_prompt(self, request: ChatRequest) -> _Prompt:
        """A chat's prompt: its tools (unless ``tool_choice`` is none) and
        what JSON it must answer with rendered, and the constraint its answer
        is generated under, if any (:mod:`llmos_transformers.structured`)."""
        tools = request.tools if request.tool_choice != "none" else ()
        ids = tokens.chat_ids(
            self.tokenizer,
            self.card.ref,
            request.messages,
            tools=tools,
            system=structured.json_prompt(request),
        )
        prompt = self._prompt(ids, request.sampling)
        wanted = structured.answer_schema(request)
        if wanted is None:
            return prompt
        if self._token_data is None:
            self._token_data = structured.token_data(self.tokenizer, self.eos, self.vocab)
        constraint = structured.Constraint(self._token_data, *wanted)
        return attrs.evolve(prompt, constraint=constraint)

    def _request_prompt(self, request: CompletionRequest | ChatRequest) -> _Prompt:
        tokens.check_streamable(request)
        if isinstance(request, ChatRequest):
            return self._chat_prompt(request)
        return self._prompt(tokens.prompt_ids(self.tokenizer, request), request.sampling)

    # --------------------------------------------------------- generation

    def _left_padded(self, rows: Sequence[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row, dtype=torch.long)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    def _prefill(
        self,
        ids: torch.Tensor,
        mask: torch.Tensor | None,
        upto: int,
        cancel: _Cancels | None,
    ) -> tuple[Any, torch.Tensor]:
        """Run ``ids[:, :upto]`` through the model in steps into a key/value
        cache; the cache, and the logits at the last position run. A batch
        with left padding gets the positions ``generate`` gives it (the
        attention mask's running count), so that it continues the same way."""
        rows, width = ids.shape
        positions = None
        if mask is not None and not bool(mask.all()):
            positions = mask.long().cumsum(-1) - 1
            positions.masked_fill_(mask == 0, 1)
        step = self._step(rows, width)
        cache: Any = None
        last: torch.Tensor | None = None
        for at in range(0, upto, step):
            end = min(at + step, upto)
            kwargs: dict[str, Any] = {"input_ids": ids[:, at:end], "use_cache": True}
            if mask is not None:
                kwargs["attention_mask"] = mask[:, :end]
            if positions is not None:
                kwargs["position_ids"] = positions[:, at:end]
            if cache is not None:
                kwargs[str(self.cache_kw)] = cache
            if self.keeps_logits:
                kwargs["logits_to_keep"] = 1
            output = self.model(**kwargs)
            cache, last = _cache_of(output), output.logits[:, -1]
            del output
            self._stop_if_cancelled(cancel)
        assert last is not None
        return cache, last

    def _generate(
        self,
        prompts: Sequence[_Prompt],
        *,
        streamer: _QueueStreamer | None = None,
        cancel: _Cancels | None = None,
    ) -> list[_Generated]:
        """One ``generate`` call for prompts that share their sampling mode.
        The prompts but their last token are run first in steps (stopping
        there if the call is abandoned); ``generate`` goes on from that cache."""
        first = prompts[0].sampling
        sample = tokens.samples(first)
        options: dict[str, Any] = {"do_sample": sample}
        if sample:
            options.update(temperature=first.temperature, top_p=first.top_p or 1.0, top_k=0)
        input_ids, attention_mask = self._left_padded([p.ids for p in prompts])
        start = input_ids.shape[1]
        criterion = _RowStop(start, prompts, self.eos, self._decode, cancel)
        if any(p.constraint is not None for p in prompts):
            options["prefix_allowed_tokens_fn"] = _Allowed(start, prompts, criterion, self.vocab)
        stepped = (
            self.cache_kw is not None
            and start > 1
            and (self.takes_positions or bool(attention_mask.all()))
        )
        with (
            self._lock,
            torch.inference_mode(),
            seeded(first.seed if sample else None, self.device),
        ):
            if stepped:
                cache, _ = self._prefill(input_ids, attention_mask, start - 1, cancel)
                options[str(self.cache_kw)] = cache
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max(p.limit for p in prompts),
                stopping_criteria=StoppingCriteriaList([criterion]),
                streamer=streamer,
                **options,
            )
            options.pop(str(self.cache_kw), None)
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
        return _Generated(text=text, finish_reason=reason, usage=usage, ids=ids)

    def _generation_cost(self, rows: int, width: int, new: int) -> int:
        return rows * self._kv(width + new) + self._prefill_cost(rows, width)

    def _chunks(self, prompts: Sequence[_Prompt], members: list[int]) -> Iterator[list[int]]:
        """``members`` (indices of ``prompts`` that share a sampling mode),
        shortest first, in batches of at most ``max_batch_size`` whose caches
        fit the work-memory budget; a prompt that alone does not fit is refused."""
        size = self.max_batch_size or len(members) or 1
        chunk: list[int] = []
        for i in sorted(members, key=lambda i: len(prompts[i].ids)):
            grown = [*chunk, i]
            width = len(prompts[i].ids)  # the longest so far: sorted
            cost = self._generation_cost(len(grown), width, max(prompts[j].limit for j in grown))
            if chunk and (len(grown) > size or cost > self.budget):
                yield chunk
                grown = [i]
                cost = self._generation_cost(1, width, prompts[i].limit)
            if cost > self.budget:
                raise self._too_big(
                    f"a prompt of {width} tokens generating up to {prompts[i].limit}", cost
                )
            chunk = grown
        if chunk:
            yield chunk

    def _run(self, prompts: Sequence[_Prompt]) -> list[_Generated]:
        """Generate for every prompt, batching those that can share a call."""
        groups: dict[tuple[Any, ...], list[int]] = {}
        for i, prompt in enumerate(prompts):
            sampling = prompt.sampling
            if not tokens.samples(sampling):
                key: tuple[Any, ...] = ("greedy",)
            elif sampling.seed is not None:
                key = ("seeded", i)
            else:
                key = ("sampled", sampling.temperature, sampling.top_p)
            groups.setdefault(key, []).append(i)
        results: list[_Generated | None] = [None] * len(prompts)
        batches = [chunk for members in groups.values() for chunk in self._chunks(prompts, members)]
        cancel = _Cancels(cancel_event())
        for chunk in batches:  # all checked before any runs
            generated = self._generate([prompts[i] for i in chunk], cancel=cancel)
            self._stop_if_cancelled(cancel)
            for i, one in zip(chunk, generated, strict=True):
                results[i] = one
        done = [r for r in results if r is not None]
        assert len(done) == len(prompts)  # every prompt is in exactly one group
        return done

    # ------------------------------------------------------------ scoring

    def _score(
        self, pairs: Sequence[tuple[list[int], list[int]]], what: Sequence[str] = ()
    ) -> list[float]:
        """Sum of the log-probabilities of each continuation's tokens given its
        prompt. Each distinct prompt is run once; its continuations continue
        from its cache. ``what`` names each pair in errors."""
        self._check_scored(pairs, what)  # all checked before any runs
        groups: dict[tuple[int, ...], list[int]] = {}
        for i, (prompt, _) in enumerate(pairs):
            groups.setdefault(tuple(prompt), []).append(i)
        scores = [0.0] * len(pairs)
        cancel = cancel_event()
        for prompt, members in groups.items():
            wanted = [(i, pairs[i][1]) for i in members if pairs[i][1]]
            if not wanted:
                continue
            with self._lock, torch.inference_mode():
                if self.cache_kw is None:
                    self._score_whole(list(prompt), wanted, scores, cancel)
                else:
                    self._score_prompt(list(prompt), wanted, scores, cancel)
        return scores

    def _check_scored(
        self, pairs: Sequence[tuple[list[int], list[int]]], what: Sequence[str]
    ) -> None:
        """Refuse a pair over the context, or one that alone needs more than the budget."""
        for i, (prompt, continuation) in enumerate(pairs):
            name = what[i] if i < len(what) else f"continuation {i}"
            if self.context is not None:
                tokens.check_scored(
                    self.card.ref, name, len(prompt), len(continuation), self.context
                )
            cost = self._row_cost(len(prompt), len(continuation))
            if cost > self.budget:
                raise self._too_big(
                    f"scoring {name} ({len(prompt)} prompt + {len(continuation)} tokens)", cost
                )

    def _score_prompt(
        self,
        prompt: list[int],
        wanted: list[tuple[int, list[int]]],
        scores: list[float],
        cancel: threading.Event | None,
    ) -> None:
        """Score continuations of one prompt: the prompt runs once (in steps)
        into a cache; each continuation's first token is scored from the
        prompt's last logits, the rest by rows that continue from copies of
        the cache, as many rows at a time as the budget allows."""
        ids = torch.tensor([prompt], dtype=torch.long, device=self.device)
        cache, last = self._prefill(ids, None, len(prompt), _Cancels(cancel))
        first = torch.log_softmax(last[0].float(), dim=-1)
        for i, continuation in wanted:
            scores[i] = float(first[continuation[0]])
        rest = sorted((m for m in wanted if len(m[1]) > 1), key=lambda m: len(m[1]))
        at = 0
        while at < len(rest):
            rows = self._rows_fitting(len(prompt), [len(c) for _, c in rest[at:]])
            chunk, at = rest[at : at + rows], at + rows
            # the last chunk continues from the prompt's own cache, not a copy
            own = cache if at >= len(rest) else copy.deepcopy(cache)
            if rows > 1:
                own.batch_repeat_interleave(rows)
            width = max(len(c) for _, c in chunk) - 1
            inputs = torch.full((rows, width), self.pad_id, dtype=torch.long)
            targets = torch.zeros((rows, width), dtype=torch.long)
            real = torch.zeros((rows, width), dtype=torch.bool)
            for row, (_, continuation) in enumerate(chunk):  # right padding: it comes after
                n = len(continuation) - 1
                inputs[row, :n] = torch.tensor(continuation[:-1], dtype=torch.long)
                targets[row, :n] = torch.tensor(continuation[1:], dtype=torch.long)
                real[row, :n] = True
            inputs, targets, real = (t.to(self.device) for t in (inputs, targets, real))
            sums = torch.zeros(rows, dtype=torch.float64, device=self.device)
            for piece in range(0, width, _PIECE):
                end = min(piece + _PIECE, width)
                output = self.model(
                    input_ids=inputs[:, piece:end], use_cache=True, **{str(self.cache_kw): own}
                )
                own = _cache_of(output)
                logits = output.logits.float()
                del output
                picked = logits.gather(-1, targets[:, piece:end, None]).squeeze(-1)
                logprobs = picked - torch.logsumexp(logits, dim=-1)
                del logits
                sums += torch.where(real[:, piece:end], logprobs, 0.0).sum(dim=1).double()
                self._stop_if_cancelled(cancel)
            del own
            for row, (i, _) in enumerate(chunk):
                scores[i] += float(sums[row])
        del cache

    def _rows_fitting(self, prompt: int, continuations: list[int]) -> int:
        """How many of ``continuations`` (lengths, shortest first) one chunk
        of rows takes: their copies of the prompt's cache, and a piece of
        logits each, next to the prompt's own cache and under the budget."""
        rows = 1
        while (
            rows < len(continuations)
            and self._kv(prompt) + self._rows_cost(prompt, continuations[: rows + 1]) <= self.budget
        ):
            rows += 1
        return rows

    def _score_whole(
        self,
        prompt: list[int],
        wanted: list[tuple[int, list[int]]],
        scores: list[float],
        cancel: threading.Event | None,
    ) -> None:
        """Score continuations of one prompt on a model that takes no cache
        (a prompt- or prefix-tuned wrapper): each row is the whole prompt and
        continuation, as many rows at a time as the budget allows, the
        log-softmax taken only at the continuation's positions."""
        at = 0
        while at < len(wanted):
            rows, cost = 0, 0
            for _, continuation in wanted[at:]:
                cost += self._row_cost(len(prompt), len(continuation))
                if rows and cost > self.budget:
                    break
                rows += 1
            chunk, at = wanted[at : at + rows], at + rows
            full = [prompt + continuation for _, continuation in chunk]
            width = max(len(r) for r in full)
            ids = torch.full((len(full), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(full), width), dtype=torch.long)
            for row, tokens_ in enumerate(full):  # right padding: positions stay 0..n-1
                ids[row, : len(tokens_)] = torch.tensor(tokens_, dtype=torch.long)
                mask[row, : len(tokens_)] = 1
            logits = self.model(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device)
            ).logits
            for row, (i, continuation) in enumerate(chunk):
                positions = torch.arange(len(prompt) - 1, len(prompt) + len(continuation) - 1)
                picked = torch.log_softmax(logits[row, positions.to(logits.device)].float(), -1)
                targets = torch.tensor(continuation, dtype=torch.long, device=logits.device)
                scores[i] = float(picked.gather(-1, targets[:, None]).sum())
            del logits
            self._stop_if_cancelled(cancel)

    def _continuation_ids(self, text: str) -> list[int]:
        return tokens.continuation_ids(self.tokenizer, text)

    def _token_logprobs(
        self, ids: list[int], first: int, top: int, following: bool = False
    ) -> tuple[list[float | None], list[list[tuple[int, float]]], int | None]:
        """The log-probability of each of ``ids[first:]`` given the tokens
        before it (``None`` for token 0, which nothing predicts), and the
        ``top`` most likely tokens at its position: the model's own
        distribution (raw logits, whatever the request's temperature).
        ``following``: one more entry, for the most likely token after
        ``ids`` (a greedy continuation of one token, without ``generate``),
        which comes back third (else ``None``).
        The sequence runs in steps into a cache, like a prefill, taking
        logits and their log-softmax only at the positions reported."""
        n = len(ids)
        last = n if following else n - 1  # positions whose logits are needed: < last
        size = last + 1 - first
        chosen: list[float | None] = [None] * size
        tops: list[list[tuple[int, float]]] = [[] for _ in range(size)]
        following_id: int | None = None
        if self.context is not None and last >= self.context:
            raise UsageError(
                f"the prompt and the answer are {last + 1} tokens; model {self.card.ref!r} takes"
                f" at most {self.context} tokens in all",
                param="prompt",
            )
        per_token = self._attention(1, 1, n) + self._logits(1)
        step = max(_STEP_MIN, min(_STEP_MAX, self.budget // 4 // max(per_token, 1)))
        if self.cache_kw is None:  # a model that takes no cache runs it whole
            step = max(last, 1)
        cost = self._kv(n) + self._attention(1, min(step, n), n) + self._logits(min(step, n))
        if cost > self.budget:
            raise self._too_big(f"log-probabilities of {n} tokens", cost)
        cancel = _Cancels(cancel_event())
        tensor = torch.tensor([ids], dtype=torch.long, device=self.device)
        cache: Any = None
        with self._lock, torch.inference_mode():
            # position k's logits predict token k + 1
            for at in range(0, last, step):
                end = min(at + step, last)
                wanted = max(first - 1, at)  # the first position whose logits are needed
                kwargs: dict[str, Any] = {"input_ids": tensor[:, at:end]}
                if self.cache_kw is not None:
                    kwargs["use_cache"] = True
                    if cache is not None:
                        kwargs[str(self.cache_kw)] = cache
                if self.keeps_logits:
                    kwargs["logits_to_keep"] = max(end - wanted, 1)
                output = self.model(**kwargs)
                cache = _cache_of(output) if self.cache_kw is not None else None
                if wanted < end:
                    logits = output.logits[0, -(end - wanted) :].float()
                    del output
                    logprobs = torch.log_softmax(logits, dim=-1)
                    del logits
                    targets = tensor[0, wanted + 1 : end + 1]
                    if end == n:  # past the sequence: its most likely next token
                        following_id = int(logprobs[-1].argmax())
                        targets = torch.cat([targets, targets.new_tensor([following_id])])
                    picked = logprobs.gather(-1, targets[:, None]).squeeze(-1).tolist()
                    if top:
                        values, indices = logprobs.topk(min(top, logprobs.shape[-1]), dim=-1)
                        best = [
                            list(zip(i, v, strict=True))
                            for i, v in zip(indices.tolist(), values.tolist(), strict=True)
                        ]
                    for j, value in enumerate(picked):
                        chosen[wanted + 1 + j - first] = value
                        if top:
                            tops[wanted + 1 + j - first] = best[j]
                    del logprobs
                else:
                    del output
                self._stop_if_cancelled(cancel)
            del cache
        return chosen, tops, following_id

    def _logprobs(
        self, prompt: list[int], answer: _Generated, echo: bool, top: int, text: str
    ) -> Logprobs:
        """The :class:`Logprobs` of an answer's tokens (the prompt's too
        with ``echo``); ``text`` is the result's text the offsets point into."""
        ids = prompt + tokens.kept(self.tokenizer, answer.ids, answer.text)
        first = 0 if echo else len(prompt)
        chosen, tops, _ = self._token_logprobs(ids, first, top)
        return tokens.logprobs(self.tokenizer, ids, first, chosen, tops, text)

    def _one_greedy(self, prompt: _Prompt, echo: bool, top: int) -> tuple[_Generated, Any]:
        """A greedy answer of one token and the log-probabilities of the
        prompt's tokens (``echo``) and its own, from one run of the
        sequence: what an evaluation harness asks for each scored choice
        (``echo``, ``logprobs``, ``max_tokens: 1``), at the cost of one
        forward instead of a ``generate`` and a scoring run."""
        first = 0 if echo else len(prompt.ids)
        chosen, tops, token = self._token_logprobs(prompt.ids, first, top, following=True)
        assert token is not None
        answer = self._finish(prompt, [token])
        if not tokens.kept(self.tokenizer, [token], answer.text):  # cut by a stop string
            chosen, tops = chosen[:-1], tops[:-1]
        return answer, (first, chosen, tops)

    # ------------------------------------------------------- capabilities

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        """Continue each prompt. A request with ``score_continuations`` is
        scored, and generates text only when it sets ``sampling.max_tokens``."""
        prompts: dict[int, _Prompt] = {}
        pairs: list[tuple[list[int], list[int]]] = []
        owners: list[int] = []
        names: list[str] = []
        encoded = [tokens.prompt_ids(self.tokenizer, request) for request in requests]
        for i, (request, ids) in enumerate(zip(requests, encoded, strict=True)):
            if tokens.generates(request):
                prompts[i] = self._prompt(ids, request.sampling)
            for j, continuation in enumerate(request.score_continuations):
                pairs.append((ids, self._continuation_ids(continuation)))
                owners.append(i)
                names.append(f"continuation {j} of prompt {i}")
        self._check_scored(pairs, names)  # before any generation runs
        # a greedy token with logprobs comes from the scoring run itself
        single = {
            i: prompt
            for i, prompt in prompts.items()
            if prompt.limit == 1
            and requests[i].logprobs is not None
            and not tokens.samples(prompt.sampling)
        }
        for i in single:
            del prompts[i]
        generated = dict(zip(prompts, self._run(list(prompts.values())), strict=True))
        scored: dict[int, Any] = {}
        for i, prompt in single.items():
            request = requests[i]
            generated[i], scored[i] = self._one_greedy(prompt, request.echo, request.logprobs or 0)
        logprobs: dict[int, list[float]] = {}
        for owner, score in zip(owners, self._score(pairs, names), strict=True):
            logprobs.setdefault(owner, []).append(score)
        results = [
            tokens.completion_result(generated.get(i), len(ids), logprobs.get(i, ()))
            for i, ids in enumerate(encoded)
        ]
        for i, request in enumerate(requests):
            answer = generated.get(i)
            if answer is None or not (request.echo or request.logprobs is not None):
                continue
            prompt_text = ""
            if request.echo:
                prompt_text = (
                    request.prompt if request.prompt_ids is None else self._decode(encoded[i])
                )
            text = prompt_text + results[i].text
            reported = None
            if i in scored:
                first, chosen, tops = scored[i]
                ids = encoded[i] + tokens.kept(self.tokenizer, answer.ids, answer.text)
                reported = tokens.logprobs(self.tokenizer, ids, first, chosen, tops, text)
            elif request.logprobs is not None:
                reported = self._logprobs(encoded[i], answer, request.echo, request.logprobs, text)
            results[i] = attrs.evolve(results[i], text=text, logprobs=reported)
        return results

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        """Answer each chat; with tools, an answer that is a tool call comes
        back as ``tool_calls`` (:func:`structured.tool_result`)."""
        prompts = [self._chat_prompt(r) for r in requests]
        results = []
        answers = self._run(prompts)
        for prompt, answer in zip(prompts, answers, strict=True):
            if prompt.constraint is not None and answer.finish_reason == "stop":
                structured.check_json(answer.text, prompt.constraint.param)
        for request, prompt, answer in zip(requests, prompts, answers, strict=True):
            reported = None
            if request.logprobs:
                reported = self._logprobs(
                    prompt.ids, answer, False, request.top_logprobs, answer.text
                )
            results.append(structured.tool_result(tokens.chat_result(answer, reported), request))
        return results

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        """Chunks of each request in turn, one per token that adds text; the
        last chunk of a request has its ``finish_reason`` and ``usage``."""
        for index, request in enumerate(requests):
            for field in logprob_fields(request):
                if field != "prompt":  # token ids stream; logprobs are not streamed
                    raise UsageError(f"{field} is not supported with streaming", param=field)
            yield from self._stream_one(index, self._request_prompt(request))

    def _stream_one(self, index: int, prompt: _Prompt) -> Iterator[StreamChunk]:
        events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        cost = self._generation_cost(1, len(prompt.ids), prompt.limit)
        if cost > self.budget:
            raise self._too_big(
                f"a prompt of {len(prompt.ids)} tokens generating up to {prompt.limit}", cost
            )
        cancel = threading.Event()
        # read here, in the caller's thread: the generating thread does not see it
        cancels = _Cancels(cancel, cancel_event())

        def work() -> None:
            try:
                [generated] = self._generate(
                    [prompt], streamer=_QueueStreamer(events), cancel=cancels
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
        names = [
            f"label {label!r} of text {i}"
            for i, request in enumerate(requests)
            for label in request.labels
        ]
        return tokens.zero_shot_results(requests, prompts, self._score(pairs, names))

    def close(self) -> None:
        with self._lock:
            self.model = None
        release()
