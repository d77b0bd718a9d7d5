"""llm's models as llmos loaded models.

:class:`LlmChatModel` wraps an ``llm.Model`` (complete, chat, stream);
:class:`LlmEmbeddingModel` wraps an ``llm.EmbeddingModel`` (embed).

**Threads.** llm's models make no promise of thread safety (a local model
holds one runtime; a remote one may hold one HTTP client). The bridge relies
on the kernel's rule that a loaded model is called from one worker thread at
a time, and on getting its own llm model object at each load (llm's plugins
build new objects on every ``register_models`` call), so two llmos models
never share one. ``max_batch_size = 1``: llm has no batching, so a batch
would only be run one prompt after the other.

**Conversations.** A :class:`~llmos.types.ChatRequest`'s messages become one
llm prompt: the system messages (after the card's ``system``) joined as the
system prompt, the user messages after the last assistant message joined as
the prompt, and the turns before it as history. The history reaches both
kinds of llm plugin: as ``messages=`` (``prompt.messages``, what llm's own
OpenAI models read) and as the conversation's completed responses
(``conversation.responses``, what older plugins read).

**Usage.** From llm's response (``input_tokens`` / ``output_tokens``, which
plugins set with ``response.set_usage``) when the plugin reports it; else an
*estimate*: the number of whitespace-separated words of the prompt and of the
answer.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from llmos.errors import LlmosError, UsageError
from llmos.types import (
    Capability,
    ChatMessage,
    ChatRequest,
    ChatResult,
    CompletionRequest,
    CompletionResult,
    EmbedRequest,
    EmbedResult,
    ModelBase,
    ModelCard,
    Sampling,
    StreamChunk,
    Usage,
)

__all__ = ["SAMPLING_FIELDS", "LlmChatModel", "LlmEmbeddingModel", "resolve_sampling"]

#: llmos sampling field -> the llm option names tried for it, in order, when
#: the card does not say (``options.sampling``)
SAMPLING_FIELDS: dict[str, tuple[str, ...]] = {
    "max_tokens": ("max_tokens", "max_output_tokens", "max_completion_tokens"),
    "temperature": ("temperature",),
    "top_p": ("top_p",),
    "seed": ("seed",),
    "stop": ("stop", "stop_sequences"),
}


def _option_fields(model: Any) -> dict[str, Any]:
    return dict(getattr(model.Options, "model_fields", {}))


def _accepts(model: Any, option: str, value: Any) -> bool:
    try:
        model.Options(**{option: value})
    except Exception:
        return False
    return True


def resolve_sampling(
    model: Any, model_id: str, overrides: Mapping[str, Any]
) -> tuple[dict[str, str], str | None]:
    """Which llm option each llmos sampling field goes to.

    Returns ``({field: option}, stop_shape)``; ``stop_shape`` is ``"list"`` or
    ``"str"`` (an option like OpenAI's ``stop`` takes one string) when ``stop``
    is mapped. ``overrides`` is the card's ``sampling`` table: ``{"max_tokens":
    "length"}`` sends ``max_tokens`` to the option ``length``; an empty string
    or ``false`` maps the field to nothing.
    """
    fields = _option_fields(model)
    unknown = sorted(set(overrides) - set(SAMPLING_FIELDS))
    if unknown:
        raise UsageError(
            f"options.sampling: unknown field(s) {', '.join(unknown)}; "
            f"known: {', '.join(SAMPLING_FIELDS)}"
        )
    mapping: dict[str, str] = {}
    for field, candidates in SAMPLING_FIELDS.items():
        if field in overrides:
            target = overrides[field]
            if not target:
                continue
            if not isinstance(target, str) or target not in fields:
                raise UsageError(
                    f"options.sampling.{field}: llm model {model_id!r} has no option "
                    f"{target!r}; its options: {', '.join(sorted(fields)) or 'none'}"
                )
            mapping[field] = target
            continue
        found = next((c for c in candidates if c in fields), None)
        if found is not None:
            mapping[field] = found
    stop_shape = None
    if "stop" in mapping:
        if _accepts(model, mapping["stop"], ["x"]):
            stop_shape = "list"
        elif _accepts(model, mapping["stop"], "x"):
            stop_shape = "str"
        else:
            del mapping["stop"]
    return mapping, stop_shape


@contextlib.contextmanager
def _llm_errors(model_id: str) -> Iterator[None]:
    """llm's exceptions as llmos errors: one line each, no traceback."""
    from pydantic import ValidationError

    try:
        yield
    except LlmosError:
        raise
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'options'}: {e['msg']}" for e in exc.errors()
        )
        raise UsageError(f"llm model {model_id!r} refused its options: {problems}") from None
    except Exception as exc:
        from llm.errors import ConversationNotSupported, ModelError, NeedsKeyException

        if isinstance(exc, ConversationNotSupported):
            raise UsageError(
                f"llm model {model_id!r} answers single prompts only: send one user message"
                " (and system messages), no assistant turns"
            ) from None
        if isinstance(exc, NeedsKeyException):
            raise LlmosError(f"llm model {model_id!r} needs an API key: {exc}") from None
        if isinstance(exc, ModelError):
            raise LlmosError(f"llm model {model_id!r}: {exc}") from exc
        raise LlmosError(f"llm model {model_id!r} failed: {type(exc).__name__}: {exc}") from exc


class _StopFilter:
    """Cuts text at the first stop sequence, also when one is split across
    chunks: it holds back the last ``len(longest stop) - 1`` characters."""

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = [s for s in stops if s]
        self.hold = max((len(s) for s in self.stops), default=1) - 1
        self.buffer = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.buffer += text
        hits = [i for i in (self.buffer.find(s) for s in self.stops) if i != -1]
        if hits:
            out, self.buffer, self.stopped = self.buffer[: min(hits)], "", True
            return out
        keep = min(self.hold, len(self.buffer))
        cut = len(self.buffer) - keep
        out, self.buffer = self.buffer[:cut], self.buffer[cut:]
        return out

    def flush(self) -> str:
        out, self.buffer = self.buffer, ""
        return out


def _words(*texts: str | None) -> int:
    return sum(len(t.split()) for t in texts if t)


class LlmChatModel(ModelBase):
    """An ``llm.Model`` served as an llmos model: complete, chat, stream."""

    capabilities = frozenset({Capability.COMPLETE, Capability.CHAT, Capability.STREAM})
    max_batch_size = 1

    def __init__(
        self,
        card: ModelCard,
        model: Any,
        *,
        options: Mapping[str, Any],
        system: str | None,
        sampling: Mapping[str, Any],
    ) -> None:
        super().__init__(card)
        self.llm_model = model
        self.model_id: str = model.model_id
        self.system = system or None
        with _llm_errors(self.model_id):
            model.Options(**options)  # the card's options, checked once, here
        self.options = dict(options)
        self.sampling, self.stop_shape = resolve_sampling(model, self.model_id, sampling)

    # -- llmos capabilities ---------------------------------------------------

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        results = []
        for request in requests:
            text, usage, reason = self._collect(request)
            results.append(CompletionResult(text=text, finish_reason=reason, usage=usage))
        return results

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        results = []
        for request in requests:
            text, usage, reason = self._collect(request)
            results.append(
                ChatResult(
                    message=ChatMessage("assistant", text), finish_reason=reason, usage=usage
                )
            )
        return results

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        for index, request in enumerate(requests):
            pieces = self._run(request, stream=True)
            try:
                while True:
                    try:
                        piece = next(pieces)
                    except StopIteration as done:
                        usage, reason = done.value
                        break
                    if piece:
                        yield StreamChunk(index=index, text=piece)
            finally:
                pieces.close()  # a cancelled stream stops llm's generation too
            yield StreamChunk(index=index, text="", finish_reason=reason, usage=usage)

    # -- internals ------------------------------------------------------------

    def _collect(self, request: CompletionRequest | ChatRequest) -> tuple[str, Usage, str]:
        pieces = self._run(request, stream=False)
        out: list[str] = []
        while True:
            try:
                out.append(next(pieces))
            except StopIteration as done:
                usage, reason = done.value
                return "".join(out), usage, reason

    def _options(self, sampling: Sampling) -> dict[str, Any]:
        options = dict(self.options)
        for field, option in self.sampling.items():
            value = getattr(sampling, field)
            if field == "stop":
                if not value:
                    continue
                if self.stop_shape == "str":
                    if len(value) != 1:
                        continue  # several stops, one-string option: cut here only
                    value = value[0]
                else:
                    value = list(value)
            if value is not None:
                options[option] = value
        return options

    def _run(self, request: CompletionRequest | ChatRequest, *, stream: bool) -> Iterator[str]:
        """Yield the answer's text as llm produces it, cut at a stop
        sequence; return ``(usage, finish_reason)``."""
        if isinstance(request, CompletionRequest) and request.score_continuations:
            raise UsageError(
                f"llm model {self.model_id!r} cannot score continuations (no log-probabilities)"
            )
        with _llm_errors(self.model_id):
            options = self._options(request.sampling)
            if isinstance(request, ChatRequest):
                response, said = self._chat_response(request.messages, options, stream)
            else:
                response = self.llm_model.prompt(
                    request.prompt, system=self.system, stream=stream, options=options
                )
                said = _words(self.system, request.prompt)
        stops = _StopFilter(request.sampling.stop)
        text: list[str] = []
        chunks = iter(response)
        try:
            with _llm_errors(self.model_id):
                for chunk in chunks:
                    piece = stops.feed(chunk)
                    if piece:
                        text.append(piece)
                        yield piece
                    if stops.stopped:
                        break
            rest = stops.flush()
            if rest:
                text.append(rest)
                yield rest
        finally:
            close = getattr(chunks, "close", None)
            if close is not None:
                close()
        # Read the plugin's figures directly: response.usage() would run an
        # answer cut short by a stop sequence all over again.
        tokens_in = getattr(response, "input_tokens", None)
        tokens_out = getattr(response, "output_tokens", None)
        answer = "".join(text)
        usage = Usage(
            prompt_tokens=tokens_in if isinstance(tokens_in, int) else said,
            completion_tokens=tokens_out if isinstance(tokens_out, int) else _words(answer),
        )
        return usage, "stop"

    def _chat_response(
        self, messages: Sequence[ChatMessage], options: dict[str, Any], stream: bool
    ) -> tuple[Any, int]:
        import llm

        systems = [self.system] if self.system else []
        history: list[tuple[str, str]] = []  # (role, text) before the last user turn
        pending: list[str] = []  # user messages after the last assistant message
        turns: list[tuple[str, str]] = []  # (user text, assistant text)
        for message in messages:
            if message.role == "system":
                systems.append(message.content)
            elif message.role == "user":
                pending.append(message.content)
            elif message.role == "assistant":
                history.extend(("user", text) for text in pending)
                history.append(("assistant", message.content))
                turns.append(("\n\n".join(pending), message.content))
                pending = []
            else:
                raise UsageError(
                    f"llm model {self.model_id!r}: message role {message.role!r} is not"
                    " supported; use system, user and assistant"
                )
        if not pending:
            raise UsageError(
                "the last message must be a user message: llm models answer a user's prompt"
            )
        prompt = "\n\n".join(pending)
        system = "\n\n".join(s for s in systems if s) or None
        said = _words(system, *(m.content for m in messages if m.role != "system"))
        if not turns:
            response = self.llm_model.prompt(prompt, system=system, stream=stream, options=options)
            return response, said
        chain = [llm.system(system)] if system else []
        chain += [llm.user(t) if role == "user" else llm.assistant(t) for role, t in history]
        conversation = self.llm_model.conversation()
        conversation.responses.extend(
            self._earlier_response(user, assistant, system) for user, assistant in turns
        )
        response = conversation.prompt(
            prompt, system=system, messages=chain, stream=stream, options=options
        )
        return response, said

    def _earlier_response(self, user: str, assistant: str, system: str | None) -> Any:
        """A finished llm response for an earlier turn, built with llm's own
        ``Response.from_dict``, for plugins that read ``conversation.responses``
        (``response.prompt.prompt``, ``.system`` and ``.text()``)."""
        import llm

        sent = ([llm.system(system)] if system else []) + [llm.user(user)]
        data: dict[str, Any] = {
            "model": self.model_id,
            "prompt": {"messages": [m.to_dict() for m in sent]},
            "messages": [llm.assistant(assistant).to_dict()],
        }
        if system:
            data["prompt"]["system"] = system
        response = llm.Response.from_dict(data, model=self.llm_model)
        response.prompt = llm.Prompt(user, model=self.llm_model, system=system)
        return response


class LlmEmbeddingModel(ModelBase):
    """An ``llm.EmbeddingModel`` served as an llmos model: embed."""

    capabilities = frozenset({Capability.EMBED})

    def __init__(self, card: ModelCard, model: Any) -> None:
        super().__init__(card)
        self.llm_model = model
        self.model_id: str = model.model_id
        # embed_multi splits what the kernel batches into the model's own batches
        self.max_batch_size = 32

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult]:
        texts = [r.text for r in requests]
        with _llm_errors(self.model_id):
            vectors = list(self.llm_model.embed_multi(texts))
        if len(vectors) != len(texts):
            raise LlmosError(
                f"llm embedding model {self.model_id!r} returned {len(vectors)} vectors"
                f" for {len(texts)} texts"
            )
        return [
            EmbedResult(
                vector=tuple(float(x) for x in vector), usage=Usage(prompt_tokens=_words(text))
            )
            for text, vector in zip(texts, vectors, strict=True)
        ]
