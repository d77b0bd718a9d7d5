"""Value types shared by the kernel and every plugin.

Everything here is a frozen attrs class (or a Protocol), importable without
torch or any model library, so a plugin can depend on these shapes alone.

Three groups:

* **the model card** (:class:`ModelCard`): what the registry stores and a
  provider receives when it loads a model;
* **requests and results** for each capability: completion, chat, streaming,
  embedding, classification;
* **the capability protocol of a loaded model** (:class:`LoadedModel`): every
  method is *batch-first* (a sequence of requests in, a list of results out, in
  the same order) and optional; a model declares what it answers in
  :attr:`LoadedModel.capabilities`. A fused model implements the same protocol,
  which is what lets fusions nest and lets the daemon treat them alike.

The plugin specs that registration hooks receive (``ProviderSpec`` and the
rest) are at the end of this module.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import contextvars
import enum
import math
import re
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import attrs

from llmos.errors import CapabilityNotSupported, LlmosError, UsageError

if TYPE_CHECKING:
    import click
    from fastapi import APIRouter

__all__ = [
    "CHAT_FEATURES",
    "Artifacts",
    "Budget",
    "CallAbandoned",
    "Capability",
    "ChatMessage",
    "ChatRequest",
    "ChatResult",
    "CheckRequest",
    "ChunkStream",
    "ClassifyRequest",
    "ClassifyResult",
    "CommandSpec",
    "CompletionRequest",
    "CompletionResult",
    "DispatchingModel",
    "EmbedRequest",
    "EmbedResult",
    "Executor",
    "ExecutorSpec",
    "FitData",
    "FusionCall",
    "FusionStrategySpec",
    "JobHandle",
    "LoadRequest",
    "LoadedModel",
    "Logprobs",
    "MergeRequest",
    "ModelBase",
    "ModelCaller",
    "ModelCard",
    "ModelFormat",
    "MonitorEvent",
    "MonitorSink",
    "MonitorSinkSpec",
    "PlacementRequest",
    "PluginContext",
    "ProviderSpec",
    "RegistryStoreSpec",
    "ResponseFormat",
    "RouteSpec",
    "Sampling",
    "StreamChunk",
    "Tool",
    "ToolCall",
    "TuningMethodSpec",
    "TuningRequest",
    "TuningResult",
    "Usage",
    "cancel_event",
    "cancel_scope",
    "check_chat_features",
    "check_logprobs",
    "logprob_fields",
]


def _utcnow() -> datetime:
    return datetime.now(UTC)


def _tuple_of_str(value: Sequence[str] | str) -> tuple[str, ...]:
    # A bare string is a common slip ("tasks='chat'"); take it as one item
    # rather than as a tuple of characters.
    if isinstance(value, str):
        return (value,)
    return tuple(value)


def _frozen_mapping(value: Mapping[str, Any] | None) -> Mapping[str, Any]:
    return dict(value or {})


# --------------------------------------------------------------------------
# Capabilities
# --------------------------------------------------------------------------


class Capability(enum.StrEnum):
    """What a loaded model can be asked to do."""

    COMPLETE = "complete"
    CHAT = "chat"
    STREAM = "stream"
    EMBED = "embed"
    CLASSIFY = "classify"


# --------------------------------------------------------------------------
# The model card
# --------------------------------------------------------------------------


class ModelFormat(enum.StrEnum):
    """How a model's weights (or its stand-in) are stored."""

    SAFETENSORS = "safetensors"
    GGUF = "gguf"
    REMOTE_API = "remote-api"
    ADAPTER = "adapter"
    FUSION = "fusion"
    #: a deployment group (``[groups.NAME]``): a card the kernel makes from config
    GROUP = "group"
    OTHER = "other"


#: lowercase letters, digits, ``-``, ``_``, ``.``; an optional ``vendor/`` part
NAME_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]*(/[a-z0-9][a-z0-9._-]*)?$")
NAME_MAX_LENGTH = 128


def validate_model_name(name: str) -> str:
    """Return ``name`` if it is a valid model name, else raise :class:`UsageError`.

    Valid: ``model`` or ``vendor/model`` of lowercase letters, digits, ``-``,
    ``_`` and ``.``; never ``..``, never a leading ``/``; at most 128 characters.
    """
    if not isinstance(name, str):
        raise UsageError(f"model name must be a string, got {type(name).__name__}")
    if len(name) > NAME_MAX_LENGTH:
        raise UsageError(
            f"model name is {len(name)} characters long; the limit is {NAME_MAX_LENGTH}"
        )
    if ".." in name:
        raise UsageError(f"model name {name!r} contains '..'")
    if not NAME_PATTERN.match(name):
        raise UsageError(
            f"model name {name!r} is invalid: use 'model' or 'vendor/model' made of "
            "lowercase letters, digits, '-', '_' and '.'"
        )
    return name


def _check_name(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    validate_model_name(value)


@attrs.frozen(kw_only=True)
class ModelCard:
    """A registered model: what it is, where its weights are, who serves it.

    ``provider`` names the plugin that loads it (``transformers``, ``vllm``,
    ``openai-compatible``, ``fusion`` …); ``source`` is where its weights live
    (a path under an allowed root, ``pkg://dist/path``, ``hf://org/name``,
    ``https://…``); ``options`` are handed to the provider unchanged.
    """

    name: str = attrs.field(validator=_check_name)
    version: int | None = None
    provider: str
    source: str = ""
    tasks: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    family: str | None = None
    parameters: int | None = None
    format: ModelFormat = attrs.field(default=ModelFormat.OTHER, converter=ModelFormat)
    license: str | None = None
    description: str = ""
    tags: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    #: evaluation scores, e.g. ``{"test/accuracy": 0.91}``
    scores: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_mapping)
    #: base model of an adapter (one entry) or members of a fusion (several)
    parents: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    #: provider options, e.g. ``{"dtype": "float32"}``
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    created_at: datetime = attrs.field(factory=_utcnow)
    created_by: str | None = None

    @property
    def ref(self) -> str:
        """``name@version`` when the version is known, else ``name``."""
        return self.name if self.version is None else f"{self.name}@{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (enums as strings, time as ISO 8601)."""
        out = attrs.asdict(self, recurse=False)
        out["format"] = str(self.format)
        out["tasks"] = list(self.tasks)
        out["tags"] = list(self.tags)
        out["parents"] = list(self.parents)
        out["scores"] = dict(self.scores)
        out["options"] = dict(self.options)
        out["created_at"] = self.created_at.isoformat()
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ModelCard:
        """Inverse of :meth:`to_dict`; unknown keys are an error, not ignored."""
        known = {a.name for a in attrs.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise UsageError(f"unknown model card field(s): {', '.join(unknown)}")
        values = dict(data)
        if isinstance(values.get("created_at"), str):
            values["created_at"] = datetime.fromisoformat(values["created_at"])
        try:
            return cls(**values)
        except (TypeError, ValueError) as exc:
            raise UsageError(f"invalid model card: {exc}") from exc


# --------------------------------------------------------------------------
# Requests and results
# --------------------------------------------------------------------------


def _check_sampling(instance: Sampling, attribute: attrs.Attribute[Any], value: Any) -> None:
    name = attribute.name
    if value is None:
        return
    if name == "max_tokens" and (not isinstance(value, int) or value < 1):
        raise UsageError(f"max_tokens must be a positive integer, got {value!r}", param=name)
    if name == "temperature" and not (0.0 <= value <= 2.0 and math.isfinite(value)):
        raise UsageError(f"temperature must be between 0 and 2, got {value!r}", param=name)
    if name == "top_p" and not (0.0 < value <= 1.0):
        raise UsageError(f"top_p must be in (0, 1], got {value!r}", param=name)


def _check_budget(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    name = attribute.name
    if name == "max_members" and (
        isinstance(value, bool) or not isinstance(value, int) or value < 1
    ):
        raise UsageError(f"max_members must be an integer >= 1, got {value!r}", param=name)
    if name == "max_latency_ms" and (
        isinstance(value, bool) or not isinstance(value, int | float) or not value > 0
    ):
        raise UsageError(f"max_latency_ms must be a number > 0, got {value!r}", param=name)


@attrs.frozen(kw_only=True)
class Budget:
    """Limits a request puts on a fusion: how many members may be called for
    it, and how long it may take. Past either, the fusion answers with what
    its members have said so far and says so in the result's ``meta``. The
    first member a request reaches always answers: a fusion never answers
    with nothing. Models that are not fusions ignore it."""

    max_members: int | None = attrs.field(default=None, validator=_check_budget)
    max_latency_ms: float | None = attrs.field(default=None, validator=_check_budget)


@attrs.frozen(kw_only=True)
class Sampling:
    """Generation parameters shared by completion, chat and streaming.

    ``None`` means "the provider's default". ``temperature=0`` is greedy.

    ``max_tokens_is_limit``: the request did not ask for ``max_tokens``;
    the value is the daemon's limit (``[api] max_tokens``), filled in so that
    a request that says nothing does not generate to the end of the context.
    A provider generates at most ``max_tokens`` tokens either way; one that
    forwards requests to a server of its own (llmos-openai) may leave such
    a limit out there when that server refuses it (a small model whose
    context cannot hold it), since the server's own default is then smaller.
    """

    max_tokens: int | None = attrs.field(default=None, validator=_check_sampling)
    temperature: float | None = attrs.field(default=None, validator=_check_sampling)
    top_p: float | None = attrs.field(default=None, validator=_check_sampling)
    stop: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    seed: int | None = None
    max_tokens_is_limit: bool = False


@attrs.frozen(kw_only=True)
class Usage:
    """Token counts of one call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


#: OpenAI's limits on the alternatives reported per token: completions' ``logprobs``
#: and chat's ``top_logprobs``
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20


def _check_top(instance: Any, attribute: attrs.Attribute[Any], value: Any) -> None:
    if value is None:
        return
    top = MAX_CHAT_TOP_LOGPROBS if attribute.name == "top_logprobs" else MAX_COMPLETION_LOGPROBS
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= top:
        raise UsageError(
            f"{attribute.name} must be an integer from 0 to {top}, got {value!r}",
            param=attribute.name,
        )


def _token_ids(value: Sequence[int] | None) -> tuple[int, ...] | None:
    return None if value is None else tuple(value)


@attrs.frozen(kw_only=True)
class CompletionRequest:
    """Continue ``prompt`` (or the token ids ``prompt_ids``).

    ``prompt_ids``, ``echo`` and ``logprobs`` are served only by a model
    that declares :attr:`ModelBase.supports_logprobs`; the kernel refuses
    them (a 400 naming the field) for any other, so that no model answers
    as if they had not been asked.
    """

    prompt: str
    sampling: Sampling = attrs.field(factory=Sampling)
    #: when set, also return the log-probability of each of these continuations
    #: of ``prompt`` (zero-shot classification and ranking need it)
    score_continuations: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    budget: Budget | None = None
    #: the prompt as token ids of the model's tokenizer, fed as they are (no
    #: special token added); ``prompt`` is then ignored
    prompt_ids: tuple[int, ...] | None = attrs.field(default=None, converter=_token_ids)
    #: the result's text starts with the prompt, and its ``logprobs`` cover
    #: the prompt's tokens too (the first one has none)
    echo: bool = False
    #: report each token's log-probability and this many most likely
    #: alternatives per token (0 to 5); ``None``: no logprobs
    logprobs: int | None = attrs.field(default=None, validator=_check_top)


def _tops(
    value: Sequence[Sequence[tuple[str, float]]],
) -> tuple[tuple[tuple[str, float], ...], ...]:
    return tuple(tuple((str(t), float(lp)) for t, lp in row) for row in value)


@attrs.frozen(kw_only=True)
class Logprobs:
    """Per-token log-probabilities of an answer's text, in four parallel
    tuples (OpenAI's completions ``logprobs`` object; chat's ``content`` list
    is made from the same): each token's text, its natural-log probability
    under the model (``None`` for a prompt's first token, which nothing
    predicts), the most likely tokens at its position, most likely first,
    and where its text starts in the result's text."""

    tokens: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    token_logprobs: tuple[float | None, ...] = attrs.field(default=(), converter=tuple)
    top_logprobs: tuple[tuple[tuple[str, float], ...], ...] = attrs.field(
        default=(), converter=_tops
    )
    text_offset: tuple[int, ...] = attrs.field(default=(), converter=tuple)

    def __attrs_post_init__(self) -> None:
        n = len(self.tokens)
        if not len(self.token_logprobs) == len(self.top_logprobs) == len(self.text_offset) == n:
            raise ValueError(
                "Logprobs: tokens, token_logprobs, top_logprobs and text_offset must have"
                " one item per token each"
            )


@attrs.frozen(kw_only=True)
class CompletionResult:
    text: str
    finish_reason: str = "stop"  # "stop" | "length" | "error"
    usage: Usage = attrs.field(factory=Usage)
    #: log-probabilities of ``CompletionRequest.score_continuations``, same order
    continuation_logprobs: tuple[float, ...] = ()
    #: per-token log-probabilities, when the request asked for ``logprobs``
    #: (of the prompt's tokens too with ``echo``)
    logprobs: Logprobs | None = None
    #: what the model adds about this answer (a fusion: the members asked,
    #: their latencies and agreement, whether a budget cut it short)
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)


@attrs.frozen(kw_only=True)
class ToolCall:
    """A call of one of a request's tools that an answer asks for: the
    tool's name and its arguments as JSON text (an object), under an id that
    the ``tool`` message answering it quotes (``ChatMessage.tool_call_id``)."""

    id: str
    name: str
    arguments: str = "{}"


@attrs.frozen
class ChatMessage:
    role: str  # "system" | "user" | "assistant" | "tool"
    #: "" for an assistant message that only calls tools
    content: str
    #: the tools an assistant message called (an earlier answer's ``tool_calls``)
    tool_calls: tuple[ToolCall, ...] = attrs.field(default=(), converter=tuple, kw_only=True)
    #: the call a ``tool`` message answers
    tool_call_id: str | None = attrs.field(default=None, kw_only=True)


@attrs.frozen(kw_only=True)
class ResponseFormat:
    """What an answer must be: ``text`` (anything), ``json_object`` (one JSON
    object) or ``json_schema`` (JSON valid against ``schema``, a JSON Schema;
    ``name`` names it, ``strict`` is the client's flag, passed on)."""

    type: str = "text"  # "text" | "json_object" | "json_schema"
    schema: Mapping[str, Any] | None = None
    name: str | None = None
    strict: bool | None = None


@attrs.frozen(kw_only=True)
class Tool:
    """A function the model may call: its name, what it does, and its
    arguments as a JSON Schema of an object."""

    name: str
    description: str = ""
    parameters: Mapping[str, Any] = attrs.field(
        factory=lambda: {"type": "object", "properties": {}}, converter=_frozen_mapping
    )


#: the fields of a chat request that only a model naming them in
#: :attr:`ModelBase.chat_features` serves
CHAT_FEATURES = ("response_format", "tools")


def _messages(value: Sequence[ChatMessage | Mapping[str, str]]) -> tuple[ChatMessage, ...]:
    return tuple(m if isinstance(m, ChatMessage) else ChatMessage(**m) for m in value)


@attrs.frozen(kw_only=True)
class ChatRequest:
    """Answer the last message of a conversation."""

    messages: tuple[ChatMessage, ...] = attrs.field(converter=_messages)
    sampling: Sampling = attrs.field(factory=Sampling)
    budget: Budget | None = None
    #: report the answer's tokens with their log-probabilities (only a model
    #: that declares :attr:`ModelBase.supports_logprobs`; refused otherwise)
    logprobs: bool = False
    #: and this many most likely alternatives per token (0 to 20)
    top_logprobs: int = attrs.field(default=0, validator=_check_top)
    #: the form the answer must take (``None``: free text)
    response_format: ResponseFormat | None = None
    #: functions the model may call instead of answering in text
    tools: tuple[Tool, ...] = attrs.field(default=(), converter=tuple)
    #: "auto" (the model decides), "none" (no call), "required" (at least one
    #: call: of ``tool_name`` when set, else of any of ``tools``)
    tool_choice: str = "auto"
    tool_name: str | None = None
    #: ``False``: at most one tool call in the answer
    parallel_tool_calls: bool = True

    @property
    def may_call_tools(self) -> bool:
        """Whether the answer may be tool calls: tools given, and a
        ``tool_choice`` other than ``"none"``."""
        return bool(self.tools) and self.tool_choice != "none"

    def features(self) -> list[str]:
        """The fields of :data:`CHAT_FEATURES` this request uses: a model
        must name them in ``chat_features`` to be given it."""
        used = []
        if self.response_format is not None and self.response_format.type != "text":
            used.append("response_format")
        if self.tools:
            used.append("tools")
        return used


@attrs.frozen(kw_only=True)
class ChatResult:
    message: ChatMessage
    finish_reason: str = "stop"
    usage: Usage = attrs.field(factory=Usage)
    #: the answer's tokens and their log-probabilities, when asked for
    logprobs: Logprobs | None = None
    #: what the model adds about this answer (a fusion: the members asked,
    #: their latencies and agreement, whether a budget cut it short)
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)

    @property
    def tool_calls(self) -> tuple[ToolCall, ...]:
        return self.message.tool_calls


@attrs.frozen(kw_only=True)
class StreamChunk:
    """One piece of a streamed answer.

    ``index`` is the position of the request in the batch handed to
    :meth:`LoadedModel.stream`; chunks of different requests may interleave.
    The last chunk of a request has a ``finish_reason`` and its ``usage``.

    A streamed chat that may call tools (:attr:`ChatRequest.may_call_tools`)
    is not given to ``stream``: the kernel answers it with the model's
    ``chat``, as one chunk holding the whole answer — its text, its
    ``tool_calls`` (``finish_reason`` ``"tool_calls"``) and its usage.
    """

    index: int
    text: str
    finish_reason: str | None = None
    usage: Usage | None = None
    #: the tool calls of the answer (only on the last chunk of a chat that may call tools)
    tool_calls: tuple[ToolCall, ...] = attrs.field(default=(), converter=tuple)


@attrs.frozen(kw_only=True)
class EmbedRequest:
    text: str
    budget: Budget | None = None


@attrs.frozen(kw_only=True)
class EmbedResult:
    vector: tuple[float, ...] = attrs.field(converter=tuple)
    usage: Usage = attrs.field(factory=Usage)
    #: what the model adds about this answer (a fusion: the members asked,
    #: their latencies and agreement, whether a budget cut it short)
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)


@attrs.frozen(kw_only=True)
class ClassifyRequest:
    """Score ``text`` against labels.

    ``labels`` empty: the model's own label set (a classification head).
    ``labels`` given: zero-shot over these labels.
    """

    text: str
    labels: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    budget: Budget | None = None


@attrs.frozen(kw_only=True)
class ClassifyResult:
    """Probabilities per label (summing to 1) and the best label."""

    scores: Mapping[str, float] = attrs.field(converter=_frozen_mapping)
    usage: Usage = attrs.field(factory=Usage)
    #: what the model adds about this answer (a fusion: the members asked,
    #: their latencies and agreement, whether a budget cut it short)
    meta: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)

    @property
    def label(self) -> str:
        return max(self.scores, key=self.scores.__getitem__)


# --------------------------------------------------------------------------
# The capability protocol of a loaded model
# --------------------------------------------------------------------------


@runtime_checkable
class LoadedModel(Protocol):
    """A model a provider (or a fusion strategy) has loaded and can serve.

    Each capability method takes a sequence of requests and returns results in
    the same order; a model answers only the capabilities it lists in
    :attr:`capabilities` and raises :class:`~llmos.errors.CapabilityNotSupported`
    for the rest. :attr:`max_batch_size` tells the kernel's batcher how many
    requests one call may carry (``None``: no kernel batching — the backend
    batches on its own, as vLLM does).
    """

    card: ModelCard
    capabilities: frozenset[Capability]
    max_batch_size: int | None

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]: ...

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]: ...

    def stream(
        self, requests: Sequence[CompletionRequest | ChatRequest]
    ) -> Iterator[StreamChunk]: ...

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult]: ...

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]: ...

    def close(self) -> None: ...


class ModelBase:
    """A convenient base for :class:`LoadedModel` implementations.

    Subclasses set :attr:`capabilities` and override the methods they declare;
    the others raise :class:`~llmos.errors.CapabilityNotSupported` with a
    message that names the model and what it does support.
    """

    capabilities: frozenset[Capability] = frozenset()
    max_batch_size: int | None = 8
    #: ``True``: ``complete`` honours ``prompt_ids``, ``echo`` and ``logprobs``
    #: and ``chat`` honours ``logprobs``/``top_logprobs``. The kernel refuses
    #: those fields for a model that does not say so (:func:`check_logprobs`).
    supports_logprobs: bool = False
    #: the :data:`CHAT_FEATURES` (``response_format``, ``tools``) that
    #: ``chat`` (and ``stream``, for ``response_format``) honours; the API
    #: refuses the others with a 400 naming the field (:func:`check_chat_features`)
    chat_features: frozenset[str] = frozenset()

    def __init__(self, card: ModelCard) -> None:
        self.card = card

    def _unsupported(self, capability: Capability) -> CapabilityNotSupported:
        have = ", ".join(sorted(self.capabilities)) or "nothing"
        return CapabilityNotSupported(
            f"model {self.card.ref!r} does not support {capability}; it supports: {have}"
        )

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        raise self._unsupported(Capability.COMPLETE)

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        raise self._unsupported(Capability.CHAT)

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        raise self._unsupported(Capability.STREAM)

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult]:
        raise self._unsupported(Capability.EMBED)

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]:
        raise self._unsupported(Capability.CLASSIFY)

    def close(self) -> None:
        """Release what the model holds (weights, threads, connections)."""


def logprob_fields(request: Any) -> list[str]:
    """The fields of ``request`` that only a model declaring
    ``supports_logprobs`` serves (``prompt_ids``, ``echo``, ``logprobs``,
    ``top_logprobs``), as the request sets them."""
    if isinstance(request, CompletionRequest):
        asked = [
            ("prompt", request.prompt_ids is not None),
            ("echo", request.echo),
            ("logprobs", request.logprobs is not None),
        ]
    elif isinstance(request, ChatRequest):
        asked = [("logprobs", request.logprobs), ("top_logprobs", request.top_logprobs > 0)]
    else:
        return []
    return [name for name, on in asked if on]


def check_logprobs(model: Any, name: str, requests: Sequence[Any]) -> None:
    """Refuse requests asking for token ids or log-probabilities of a model
    (named ``name``) that does not declare ``supports_logprobs``: a
    :class:`~llmos.errors.UsageError` naming the field, never an answer that
    ignored it."""
    if getattr(model, "supports_logprobs", False):
        return
    for request in requests:
        for field in logprob_fields(request):
            what = "token-id prompts" if field == "prompt" else field
            raise UsageError(
                f"model {name!r} does not support {what} (its provider does not declare"
                " supports_logprobs): leave it out, or use a model served by"
                " llmos-transformers or llmos-vllm",
                param=field,
            )


def check_chat_features(model: Any, name: str, requests: Sequence[Any]) -> None:
    """Refuse chat requests using a field of :data:`CHAT_FEATURES`
    (``response_format``, ``tools``) that the model (named ``name``) does not
    list in ``chat_features``: a :class:`~llmos.errors.UsageError` naming the
    field, never an answer that ignored it (free text where JSON was asked)."""
    have = getattr(model, "chat_features", frozenset())
    for request in requests:
        if not isinstance(request, ChatRequest):
            continue
        for field in request.features():
            if field not in have:
                raise UsageError(
                    f"model {name!r} does not support {field} (its provider does not list it"
                    " in chat_features): leave it out, or use a model served by"
                    " llmos-transformers",
                    param=field,
                )


# --------------------------------------------------------------------------
# Abandoned calls
# --------------------------------------------------------------------------

#: the cancel event of the model call running in this thread (set by the worker)
_CANCEL: contextvars.ContextVar[threading.Event | None] = contextvars.ContextVar(
    "llmos_cancel", default=None
)


class CallAbandoned(LlmosError):
    """A provider stopped a call early because every caller of it had gone
    away (:func:`cancel_event` was set): nobody reads its results."""

    type = "cancelled"
    status = 499


def cancel_event() -> threading.Event | None:
    """The event the kernel's worker sets once every caller of the running
    model call has gone away (a client that hung up, a caller that timed
    out); ``None`` outside a worker call. A provider's long loops (scoring
    chunks, generation steps) check ``is_set()`` between steps and stop by
    raising :class:`CallAbandoned`, so that the model is free for the next
    request instead of finishing work nobody waits for. Read it in the
    calling thread: a thread the provider starts does not see it."""
    return _CANCEL.get()


@contextlib.contextmanager
def cancel_scope(event: threading.Event) -> Iterator[None]:
    """Make ``event`` what :func:`cancel_event` returns in this block (the worker's side)."""
    token = _CANCEL.set(event)
    try:
        yield
    finally:
        _CANCEL.reset(token)


# --------------------------------------------------------------------------
# Monitoring
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class MonitorEvent:
    """Something the kernel observed, fanned out to every monitor sink.

    ``kind`` is dotted: ``request`` (one model call), ``tuning.progress``,
    ``alert.firing``, ``plugin.failed`` …; ``fields`` holds the figures
    (``latency_s``, ``tokens_out``, ``status`` …).
    """

    kind: str
    time: datetime = attrs.field(factory=_utcnow)
    model: str | None = None
    capability: str | None = None
    fields: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "time": self.time.isoformat(),
            "model": self.model,
            "capability": self.capability,
            "fields": dict(self.fields),
        }


@runtime_checkable
class MonitorSink(Protocol):
    """Receives monitor events. ``emit`` must be quick; a sink that needs I/O
    queues the event and writes it elsewhere. Exceptions are caught and counted
    by the kernel and never reach the call that produced the event."""

    def emit(self, event: MonitorEvent) -> None: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------
# Tuning
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class TuningRequest:
    """What a tuning method is asked to do; it runs in a worker process.

    ``data`` maps split names (``train``, ``dev``, ``test``) to rows:
    ``{"text", "label"}`` for ``text-classification`` (labels already mapped
    to the names in ``labels``), ``{"prompt", "response"}`` for ``sft``.
    ``base_path`` is the base model's checked local folder or file.
    The method writes its final artifact (safetensors only) into
    ``output_dir`` and checkpoints into ``checkpoint_dir``; when that folder
    holds a checkpoint, the method resumes from the latest one — that is how
    a job survives a daemon restart or a SIGKILL. ``report`` takes progress
    figures (``step``, ``total_steps``, ``epoch``, ``loss``, ``learning_rate``,
    ``dev/accuracy`` …); ``should_stop`` turns true when the job is cancelled:
    poll it between steps.
    """

    base: ModelCard
    task: str
    data: Mapping[str, Sequence[Mapping[str, Any]]]
    labels: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    hyperparameters: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    base_path: Path | None = None
    output_dir: Path | None = None
    checkpoint_dir: Path | None = None
    seed: int = 0
    report: Callable[[Mapping[str, Any]], None] = attrs.field(default=lambda figures: None)
    should_stop: Callable[[], bool] = attrs.field(default=lambda: False)


@attrs.frozen(kw_only=True)
class TuningResult:
    """The artifact a method produced and its evaluation scores."""

    card: ModelCard
    scores: Mapping[str, float] = attrs.field(factory=dict, converter=_frozen_mapping)


# --------------------------------------------------------------------------
# Specs handed to the registration hooks' ``register`` callbacks
# --------------------------------------------------------------------------


def _check_spec_name(instance: Any, attribute: attrs.Attribute[str], value: str) -> None:
    if not isinstance(value, str) or not re.fullmatch(r"[a-z0-9][a-z0-9._-]{0,63}", value):
        raise UsageError(
            f"{type(instance).__name__}.name {value!r} is invalid: use 1-64 lowercase "
            "letters, digits, '.', '_' or '-'"
        )


@attrs.frozen(kw_only=True)
class LoadRequest:
    """What a provider's ``load`` receives: one object, so that the kernel can
    hand providers more over time without breaking their signatures.

    ``options`` is the provider plugin's ``[plugins.<plugin>]`` config table
    (the operator's settings); the card's own ``options`` stay on the card.
    A provider decides how the two combine — and must not let a card grant
    itself what only the operator may (``trust_remote_code``, say).
    """

    card: ModelCard
    #: the ``[plugins.<plugin>]`` config table
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    #: the card's source as a local file or folder, already checked against the
    #: registry's source policy; ``None`` for ``hf://``, ``https://`` or no source
    path: Path | None = None
    #: a folder under the data folder this provider may write to (converted
    #: weights, compiled kernels); created by the kernel
    cache_dir: Path | None = None
    #: for an adapter (``format = "adapter"``): the checked local path of its
    #: base model, the card's first parent (``name@version``)
    base_path: Path | None = None
    #: the base model's card, for an adapter
    base: ModelCard | None = None
    #: sends a monitor event to the kernel's sinks: for what a backend
    #: measures itself (a serving engine's running and waiting requests, its
    #: cache use), which no single call's event carries
    emit: Callable[[MonitorEvent], None] | None = None
    #: the kernel's models, for a model made of other models (a fusion, a
    #: deployment group): its calls go through their own workers, batching
    #: and monitoring
    models: ModelCaller | None = None
    #: the kernel's artifact store (``[artifacts]``): what a provider makes
    #: from a model and another daemon would make again (converted weights)
    #: can be kept there under a key, and looked up before it is made
    artifacts: Artifacts | None = None


@attrs.frozen(kw_only=True)
class CheckRequest:
    """What a provider's ``check`` receives: one object, like
    :class:`LoadRequest`, so that the kernel can hand providers more over time.

    ``options`` is the provider plugin's ``[plugins.<plugin>]`` config table:
    the operator's rules a card is checked against (which hosts a key may be
    sent to, say). The card is the one being registered or about to be
    loaded; its ``version`` is ``None`` at registration.
    """

    card: ModelCard
    #: the ``[plugins.<plugin>]`` config table
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)


@attrs.frozen(kw_only=True)
class ProviderSpec:
    """A model provider: turns a :class:`ModelCard` into a :class:`LoadedModel`.

    ``load(request)`` receives a :class:`LoadRequest`. It may be slow
    (weights); the kernel calls it once per model and caches the result.
    ``batching=False`` tells the kernel's batcher to step aside because the
    backend batches continuously on its own.

    ``check(request)`` (optional) receives a :class:`CheckRequest` and
    returns the card's options, completed or normalised, or raises
    :class:`~llmos.errors.UsageError` (with ``param``) for a card its
    provider must not serve. It runs when a card is registered, on every
    path (the HTTP API, the CLI, a scan, a push, a plugin's discovered
    cards), so a bad card is refused before it is stored; and again before
    a model is loaded, for cards registered before the check existed,
    ``[models.NAME]`` deployments and config that changed since. It must be
    quick and must not need the model's weights or secrets: the CLI may run
    it in a process without the daemon's environment. Neither ``check`` nor
    ``load`` is shown an option named for an installed executor (a card's
    ``options.ray`` table is llmos-ray's): it is the executor's, and the
    card keeps it.
    """

    name: str = attrs.field(validator=_check_spec_name)
    load: Callable[[LoadRequest], LoadedModel]
    description: str = ""
    capabilities: frozenset[Capability] = attrs.field(factory=frozenset, converter=frozenset)
    formats: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    batching: bool = True
    check: Callable[[CheckRequest], Mapping[str, Any]] | None = None


class Artifacts(Protocol):
    """The kernel's artifact store as a provider sees it
    (:class:`llmos.registry.fsstore.ArtifactStore`): folders of weights kept
    under ``[artifacts] root`` (a folder, or an fsspec URL a cluster shares),
    each fetched into a local, verified copy before it is used."""

    @property
    def shared(self) -> bool:
        """Whether the operator named the root: only then is it worth keeping
        there what this daemon could make again itself."""
        ...

    @property
    def local(self) -> bool:
        """Whether the root is a local folder, read in place (else a URL,
        fetched from into a local cache)."""
        ...

    def lookup(self, key: str) -> str | None:
        """The address of the artifact filed under ``key``, if it is in the store."""
        ...

    def fetch(self, source: str) -> Path:
        """The verified local folder of the artifact at ``source``."""
        ...

    def put(self, folder: Path, name: str, *, key: str | None = None) -> str:
        """Store ``folder`` (checked like a push) for model ``name``; its address."""
        ...


class ModelCaller(Protocol):
    """What a model made of other models needs from the kernel: asking them
    (through their own workers, batching and monitoring) and reporting.
    The kernel is one; a model that holds this holds nothing else of it."""

    @property
    def request_timeout(self) -> float:
        """The longest a call may take, queue included (``[runtime] request_timeout_s``)."""
        ...

    def submit(
        self, model: str, capability: Capability, requests: Sequence[Any]
    ) -> concurrent.futures.Future[list[Any]]:
        """Queue ``requests`` for ``model``; its results come through the future."""
        ...

    def call(
        self,
        model: str,
        capability: Capability,
        requests: Sequence[Any],
        timeout: float | None = None,
    ) -> list[Any]:
        """Run ``requests`` on ``model`` and wait for the results."""
        ...

    def stream(self, model: str, request: Any) -> ChunkStream:
        """Start streaming one request on ``model``."""
        ...

    def capabilities(self, model: str) -> frozenset[Capability]:
        """What ``model`` serves (loading it on first use)."""
        ...

    def emit(self, event: MonitorEvent) -> None:
        """Send a monitor event to the kernel's sinks; never blocks, never raises."""
        ...


class ChunkStream(Protocol):
    """The chunks of one streamed request, as they come (the kernel's
    :class:`~llmos.runtime.worker.StreamHandle` is one)."""

    def get(self, timeout: float | None = None) -> StreamChunk | None:
        """The next chunk; ``None`` at the end. Raises what the model raised."""
        ...

    def cancel(self) -> None:
        """Stop the generation at the next token."""
        ...

    def __iter__(self) -> Iterator[StreamChunk]: ...


@runtime_checkable
class DispatchingModel(Protocol):
    """A loaded model that sends each call elsewhere — a deployment group to
    one of its deployments, an executor to a remote replica — instead of
    computing it: the kernel hands it calls as they come, with no queue or
    thread of its own, and the model that answers batches and reports them.
    ``submit`` must not block (chain futures); ``submit_stream`` returns the
    stream of the model that answers.

    Optionally, ``health() -> Mapping[str, Any]``: what the place it sends
    calls to says of itself, as JSON values — by convention ``status``
    (``HEALTHY``, ``UPDATING``, ``UNHEALTHY`` …) and ``replicas`` (state ->
    count), e.g. ``{"status": "HEALTHY", "replicas": {"RUNNING": 2}}``.
    ``llmos top`` and ``GET /api/monitor/summary`` show it beside the
    executor the model was placed on; a ``health()`` that raises or takes
    over 2 s is shown as its error, never failing the listing. It is not
    part of the protocol's ``isinstance`` check."""

    card: ModelCard
    capabilities: frozenset[Capability]

    def submit(
        self, capability: Capability, requests: Sequence[Any]
    ) -> concurrent.futures.Future[list[Any]]: ...

    def submit_stream(self, request: Any) -> ChunkStream: ...

    def close(self) -> None: ...


class FusionCall(Protocol):
    """One batch of requests of one capability on its way through a fusion:
    what a strategy's ``combine`` gets. The kernel implements it
    (:class:`llmos.fusion.call.Call`); it calls the members through the
    kernel (their own batching and monitoring), keeps the request's
    :class:`Budget`, and records which member answered which row, and when.
    """

    capability: Capability
    #: the batch; rows are indexes into it
    requests: Sequence[Any]
    #: the members' cards, in the fusion's order
    members: Sequence[ModelCard]
    #: the strategy's options (with what ``fit`` learned)
    options: Mapping[str, Any]

    def ask(
        self, member: int, rows: Sequence[int] | None = None, requests: Sequence[Any] | None = None
    ) -> dict[int, Any]:
        """``member``'s results for ``rows`` (default: all), by row. ``requests``
        (one per row) replace the batch's own. Rows the budget rules out are
        missing from the answer."""
        ...

    def ask_all(
        self, members: Sequence[int] | None = None, rows: Sequence[int] | None = None
    ) -> list[dict[int, Any]]:
        """Several members (default: all) at once, each on ``rows``; a member
        the budget rules out, or that is not back within it, answers ``{}``."""
        ...

    def helper(self, model: str, capability: Capability, requests: Sequence[Any]) -> list[Any]:
        """Call a model that is not a member (a judge, an embedder)."""
        ...

    def note(self, row: int, **facts: Any) -> None:
        """Strategy facts about a row (a route taken, a confidence) for its ``meta``."""
        ...


@attrs.frozen(kw_only=True)
class FitData:
    """Dev data and what each member answered on it: what a strategy's ``fit``
    learns from (weights, thresholds, routes)."""

    texts: tuple[str, ...] = attrs.field(converter=tuple)
    #: the right label of each row
    gold: tuple[str, ...] = attrs.field(converter=tuple)
    #: ``outputs[m][i]``: member ``m``'s scores per label on row ``i``
    outputs: tuple[tuple[Mapping[str, float], ...], ...] = attrs.field(
        converter=lambda rows: tuple(tuple(r) for r in rows)
    )
    #: mean seconds per row of each member (what calling it costs)
    seconds: tuple[float, ...] = attrs.field(converter=tuple)
    members: tuple[ModelCard, ...] = attrs.field(converter=tuple)
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    #: call a model that is not a member (e.g. a router's embedder)
    helper: Callable[[str, Capability, Sequence[Any]], list[Any]] | None = None


@attrs.frozen(kw_only=True)
class MergeRequest:
    """Members merged in weight space into a new model (``merge`` strategies)."""

    #: the new model's name
    name: str
    members: tuple[ModelCard, ...] = attrs.field(converter=tuple)
    #: each member's checked local folder
    member_paths: tuple[Path, ...] = attrs.field(converter=tuple)
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    #: where the merged model's files go (safetensors only)
    output_dir: Path
    #: the base of the members, when they are adapters (their first parent)
    base: ModelCard | None = None
    base_path: Path | None = None


@attrs.frozen(kw_only=True)
class FusionStrategySpec:
    """A way to combine member models into one. Two kinds:

    * served (``combine``): a fusion with this strategy is a model like any
      other; each batch of requests it gets reaches ``combine(call)`` (a
      :class:`FusionCall`), which asks members and returns one result per
      request, in order, for the capabilities listed in ``capabilities``;
    * weight space (``merge``): ``merge(request)`` writes a new model's files
      to ``request.output_dir`` and returns its card (provider, format,
      options; the kernel names, registers and stores it).

    ``check(options, members)`` (optional) validates and completes the
    options when a fusion is created, raising
    :class:`~llmos.errors.UsageError`; ``fit(data)`` (optional) learns
    options from dev data (:class:`FitData`) and returns them. ``needs_fit``
    (``True``, or a function of the checked options) says a fusion cannot be
    created without dev data — a cascade given no thresholds, say.
    """

    name: str = attrs.field(validator=_check_spec_name)
    description: str = ""
    capabilities: frozenset[Capability] = attrs.field(factory=frozenset, converter=frozenset)
    combine: Callable[[FusionCall], list[Any]] | None = None
    merge: Callable[[MergeRequest], ModelCard] | None = None
    check: Callable[[Mapping[str, Any], Sequence[ModelCard]], Mapping[str, Any]] | None = None
    fit: Callable[[FitData], Mapping[str, Any]] | None = None
    needs_fit: bool | Callable[[Mapping[str, Any]], bool] = False

    def __attrs_post_init__(self) -> None:
        if (self.combine is None) == (self.merge is None):
            raise UsageError(
                f"fusion strategy {self.name!r} must have exactly one of combine (served)"
                " and merge (weight space)"
            )
        if self.needs_fit is not False and self.fit is None:
            raise UsageError(f"fusion strategy {self.name!r} needs_fit but has no fit")

    def fit_required(self, options: Mapping[str, Any]) -> bool:
        """Whether a fusion with these options needs dev data to be created."""
        needs = self.needs_fit
        return bool(needs(options) if callable(needs) else needs)


@attrs.frozen(kw_only=True)
class TuningMethodSpec:
    """A way to tune a base model on data; ``run(request)`` does the work in a
    worker process and returns a :class:`TuningResult`.

    ``check(task, hyperparameters)`` (optional) runs when a job is submitted,
    in the submitting process: it raises :class:`~llmos.errors.UsageError` for
    a misspelt or out-of-range hyper-parameter, so the job is refused at once
    instead of failing later in its worker. ``hyperparameters`` are the
    method's ``defaults`` updated with the job's own.
    """

    name: str = attrs.field(validator=_check_spec_name)
    run: Callable[[TuningRequest], TuningResult]
    description: str = ""
    tasks: tuple[str, ...] = attrs.field(default=(), converter=_tuple_of_str)
    defaults: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    check: Callable[[str, Mapping[str, Any]], None] | None = None


@attrs.frozen(kw_only=True)
class BusHealth:
    """The monitor bus's own figures, as :attr:`PluginContext.bus_health` reads them."""

    #: events dropped because the bus's queue was full (a slow sink)
    dropped: int
    #: per sink (and ``(kernel)``, the kernel's own consumers), events it raised on
    sink_errors: Mapping[str, int]
    #: the sinks events go to
    sinks: tuple[str, ...]


@attrs.frozen(kw_only=True)
class PluginContext:
    """What the kernel hands the factory of a service a plugin registers (a
    monitor sink's ``create``, a registry store's): one object, like
    :class:`LoadRequest`, so that the kernel can hand more over time.
    """

    #: the plugin's ``[plugins.<plugin>]`` config table (the operator's settings)
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    #: the kernel's data folder (``LLMOS_HOME``), created already
    home: Path
    #: sends a monitor event to the kernel's sinks (never from a sink's own
    #: ``emit``: the event would come back to it)
    emit: Callable[[MonitorEvent], None] = attrs.field(default=lambda event: None)
    #: the monitor bus's figures now (events dropped, sink errors)
    bus_health: Callable[[], BusHealth] = attrs.field(
        default=lambda: BusHealth(dropped=0, sink_errors={}, sinks=())
    )


@attrs.frozen(kw_only=True)
class MonitorSinkSpec:
    """A place monitor events go: ``create(context)`` (a
    :class:`PluginContext`: the ``[plugins.<plugin>]`` options, the data
    folder) returns a :class:`MonitorSink`."""

    name: str = attrs.field(validator=_check_spec_name)
    create: Callable[[PluginContext], MonitorSink]
    description: str = ""


@attrs.frozen(kw_only=True)
class RegistryStoreSpec:
    """Where the registry keeps model cards: ``create(context)`` (a
    :class:`PluginContext`) returns a
    :class:`~llmos.registry.store.RegistryStore` (versions without gaps,
    aliases, the search language and its ranking); ``[registry] store`` names
    the one a kernel uses (``sqlite``, the kernel's own, by default)."""

    name: str = attrs.field(validator=_check_spec_name)
    create: Callable[[PluginContext], Any]
    description: str = ""


@attrs.frozen(kw_only=True)
class PlacementRequest:
    """What an executor gets to serve one model somewhere else than this
    process (replicas on a cluster): everything the provider's ``load`` would
    get here, as plain values a remote process can rebuild it from.

    The executor loads the model where it places it with the provider named
    here (the same plugin, installed there), keeps the kernel's batching
    settings on each replica, and returns a :class:`DispatchingModel` whose
    calls go to the replicas. ``emit`` is this kernel's: an executor relays
    what its replicas measure to it (it cannot be sent to them)."""

    #: the name the kernel serves it under (``name@3`` or a ``[models.NAME]``)
    key: str
    #: the card, checked by its provider; its options keep the executor's own
    #: table (``options.<executor>``, e.g. ``{"ray": {"num_replicas": 2}}``)
    #: and no other executor's — the provider is never shown one
    card: ModelCard
    #: the provider's name and the plugin that registered it
    provider: str
    plugin: str
    #: the plugin's ``[plugins.<plugin>]`` table
    options: Mapping[str, Any] = attrs.field(factory=dict, converter=_frozen_mapping)
    #: the card's source as a checked local path (which the executor's nodes must
    #: see at the same place: shared storage), or ``None``
    path: str | None = None
    #: an adapter's base model: its card and checked path
    base: ModelCard | None = None
    base_path: str | None = None
    #: the kernel's artifact store where its root is a URL (``s3://…``): a
    #: replica fetches an artifact source (the card's, the base's) from it into
    #: its own node's verified cache instead of reading ``path``; ``None`` for a
    #: local root, whose folder the nodes share
    artifacts: Artifacts | None = attrs.field(default=None, repr=False)
    #: the kernel's batching for this model, for each replica's own worker
    max_batch_size: int = 8
    max_wait_ms: float = 0.0
    max_queue: int = 64
    batching: bool = True
    #: sends a monitor event to this kernel's sinks
    emit: Callable[[MonitorEvent], None] | None = None


class Executor(Protocol):
    """Where served models run, when not in the kernel's process
    (``[runtime] executor``): ``place`` puts a model there and returns the
    model the kernel calls (it dispatches each call to a replica); ``close``
    releases what the kernel placed (at stop).

    An executor that runs tuning jobs too (``[tuning] executor``) also has
    ``start_job(payload) -> JobHandle``: ``payload`` is the job's worker
    payload (plain values: the method, the base model, the data, and the
    job's folders — output, checkpoints, log — which the executor's nodes
    must see at the same paths: shared storage), which
    :func:`llmos.replica.start_job` runs where the executor places it."""

    def place(self, request: PlacementRequest) -> DispatchingModel: ...

    def close(self) -> None: ...


class JobHandle(Protocol):
    """A tuning job's running worker, wherever it runs: the messages it
    sends (``("progress", {...})``, ``("result", {...})``, ``("error", text)``),
    a polite stop (its ``should_stop`` turns true), then terminate and kill.
    ``lost`` turns true when the worker ended because the place it ran on
    went away (a node of a cluster): the kernel queues the job again and it
    resumes from its checkpoints, on whatever node runs it next."""

    #: where it runs, for logs (``pid 123``, ``node 10.0.0.7``)
    where: str
    lost: bool

    def receive(self, timeout: float) -> list[tuple[Any, ...]] | None:
        """Messages that arrived within ``timeout``; ``None`` once the worker
        has ended and everything it sent has been read."""
        ...

    def stop(self) -> None: ...

    def terminate(self) -> None: ...

    def kill(self) -> None: ...

    def join(self, timeout: float | None = None) -> int | None:
        """The worker's exit code (``None``: still running after ``timeout``)."""
        ...

    def close(self) -> None: ...


@attrs.frozen(kw_only=True)
class ExecutorSpec:
    """An executor a plugin offers: ``create(context)`` (a
    :class:`PluginContext`: the plugin's options, the data folder, emit)
    returns the :class:`Executor`; ``[runtime] executor`` (or a
    ``[models.NAME]`` deployment's ``executor``) names the one a model uses.
    ``local`` — the kernel's own worker threads — is the default, and no
    spec."""

    name: str = attrs.field(validator=_check_spec_name)
    create: Callable[[PluginContext], Executor]
    description: str = ""


@attrs.frozen(kw_only=True)
class RouteSpec:
    """HTTP routes a plugin adds to the daemon: a FastAPI ``APIRouter`` mounted
    at ``prefix``. A prefix that collides with a route already mounted is an
    error naming both plugins."""

    router: APIRouter
    prefix: str = ""


@attrs.frozen(kw_only=True)
class CommandSpec:
    """A ``llmos`` sub-command a plugin adds (a click command or group)."""

    command: click.Command
