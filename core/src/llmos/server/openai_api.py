"""The OpenAI-compatible API, so every OpenAI client works against llmos.

``/v1/models``, ``/v1/completions``, ``/v1/chat/completions`` (``stream:
true`` as server-sent events), ``/v1/embeddings``, and llmos's own
``/api/classify``. Requests are validated with caps before they reach a
model; every call goes through the kernel (resolution, batching, events).
``GET /v1/models/{id}`` answers for one model. Sampling defaults are
OpenAI's (temperature 1), and ``n`` choices sample with seeds of their own.
Responses carry ``x-llmos-overhead-ms``: the time the request spent in llmos
outside the model, its queue and the model's load (``x-llmos-load-ms``).
"""

from __future__ import annotations

import asyncio
import base64
import functools
import json
import re
import struct
import time
import typing
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, Sequence
from typing import Annotated, Any, Literal, Self, TypeVar, cast

import attrs
from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from llmos.errors import LlmosError, NotFoundError, UsageError
from llmos.runtime.kernel import Kernel
from llmos.runtime.limits import queued_cap
from llmos.runtime.worker import StreamHandle
from llmos.types import (
    MAX_CHAT_TOP_LOGPROBS,
    MAX_COMPLETION_LOGPROBS,
    Budget,
    Capability,
    ChatMessage,
    ChatRequest,
    ChatResult,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    CompletionResult,
    EmbedRequest,
    EmbedResult,
    Logprobs,
    ModelCard,
    ResponseFormat,
    Sampling,
    StreamChunk,
    Tool,
    ToolCall,
    Usage,
    check_chat_features,
)

T = TypeVar("T")
R = TypeVar("R", CompletionRequest, ChatRequest)

#: what a request that leaves it out samples with: OpenAI's default
DEFAULT_TEMPERATURE = 1.0

#: JSON integers as OpenAI reads them: 64-bit signed. A seed past them would
#: overflow in the backend (torch takes at most 2^64 - 1) as a 500.
_INT64 = 2**63


def _same(value: Any, default: Any) -> bool:
    """``value == default`` without Python's ``False == 0``: ``"logprobs": 0``
    is not ``false``, ``"presence_penalty": false`` is not ``0``."""
    if isinstance(value, bool) or isinstance(default, bool):
        return value is default
    return bool(value == default)


def _unicode(text: str, param: str) -> None:
    """Refuse text that is not Unicode: JSON's ``"\\ud800"`` decodes to a lone
    surrogate, which every tokenizer (and the JSON answer echoing it) fails
    to encode — a 500 deep in a model instead of a 400 here."""
    if text.isascii():
        return
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise UsageError(
            f"{param} holds a lone surrogate ({text[exc.start]!a} at character {exc.start}), "
            "which is not text: a \\ud800-\\udbff escape must be followed by a "
            "\\udc00-\\udfff one; send the text as UTF-8",
            param=param,
        ) from None


def _texts(value: str | Sequence[str], param: str) -> None:
    """:func:`_unicode` for a field holding a string or a list of them."""
    if isinstance(value, str):
        _unicode(value, param)
    else:
        for i, text in enumerate(value):
            _unicode(text, f"{param}.{i}")


def _string_or_strings(value: Any) -> Any:
    """The type check of a ``str | list[str]`` field, as one error at the field
    (pydantic reports a failed union once per member, at ``prompt.str`` and
    ``prompt.list[str]``). OpenAI also takes token ids there; llmos does not."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        for i, item in enumerate(value):
            if not isinstance(item, str):
                raise PydanticCustomError(
                    "string_type",
                    "item {i} is not a string: llmos takes text, not token ids (LangChain's "
                    "OpenAIEmbeddings sends ids unless check_embedding_ctx_length=False)",
                    {"i": i},
                )
        return value
    raise PydanticCustomError("string_type", "must be a string or a list of strings")


#: a string or a list of them (prompt, input, stop), checked as one type
_Strings = Annotated[str | list[str], BeforeValidator(_string_or_strings)]


def _token_ids(value: list[Any]) -> bool:
    """Whether ``value`` is a list of token ids (JSON integers, not booleans)."""
    return bool(value) and all(type(item) is int for item in value)


def _prompt_forms(value: Any) -> Any:
    """A completion's prompt as OpenAI takes it: a string, a list of strings,
    a list of token ids, or a list of lists of token ids; checked as one
    type, so that a mistake is one error at ``prompt``."""
    if isinstance(value, list) and value and not isinstance(value[0], str):
        if _token_ids(value):
            return value
        for i, item in enumerate(value):
            if not (isinstance(item, list) and _token_ids(item)):
                raise PydanticCustomError(
                    "prompt_type",
                    "item {i} is not a non-empty list of token ids: a prompt is a string, a "
                    "list of strings, a list of token ids or a list of lists of them",
                    {"i": i},
                )
        return value
    return _string_or_strings(value)


#: what a completion's prompt may be (text or token ids, one or several)
_Prompts = Annotated[str | list[str] | list[int] | list[list[int]], BeforeValidator(_prompt_forms)]


def _off(*values: Any) -> Any:
    """An OpenAI field that changes the answer and that llmos does not
    implement. It is declared, so that the schema lists it and a typo next to
    it is still caught, and accepted only with a value that means "off"
    (OpenAI's default): anything else is a 400 naming it, never an answer that
    silently ignored it."""
    shown = " or ".join(json.dumps(v) for v in values)
    return Field(
        default=None,
        description=f"Not supported by llmos (yet): only {shown} (OpenAI's default) is accepted.",
        json_schema_extra={"enum": list(values), "x-llmos-unsupported": True},
    )


def _ignored(why: str) -> Any:
    """A field clients send routinely that cannot change llmos's answer:
    accepted and ignored, for the reason given."""
    return Field(
        default=None,
        description=f"Accepted and ignored: {why}.",
        json_schema_extra={"x-llmos-ignored": True},
    )


class _Strict(BaseModel):
    """A request object: types are strict (``"5"`` is not 5, ``"yes"`` is not
    true; a JSON integer is still a number), NaN and infinity are refused
    (Python's JSON reader accepts them), and a field llmos does not know is a
    400 naming it — that is how a typo such as ``temprature`` gets caught."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        names = _fields_of(cls)
        unknown = [key for key in data if key not in names]
        if not unknown:
            return data
        known = ", ".join(
            name
            for name, field in cls.model_fields.items()
            if not isinstance(field.json_schema_extra, dict)  # neither _off nor _ignored
        )
        message = f"unknown field (a typo?); the fields llmos implements here are: {known}"
        raise ValidationError.from_exception_data(
            cls.__name__,
            [
                {
                    "type": PydanticCustomError("extra_forbidden", message),
                    "loc": (key,),
                    "input": data[key],
                }
                for key in unknown
            ],
        )


# Both per class, once: a request's validation is on every call's path.


@functools.cache
def _fields_of(cls: type[_Strict]) -> frozenset[str]:
    return frozenset(cls.model_fields)


@functools.cache
def _offs_of(cls: type[_Strict]) -> dict[str, list[Any]]:
    """The fields of ``cls`` declared with :func:`_off`, and their "off" values."""
    offs = {}
    for name, field in cls.model_fields.items():
        extra = field.json_schema_extra
        if isinstance(extra, dict) and extra.get("x-llmos-unsupported"):
            offs[name] = cast(list[Any], extra["enum"])
    return offs


def _is_strict(kind: Any) -> bool:
    return isinstance(kind, type) and issubclass(kind, _Strict)


@functools.cache
def _nested_of(cls: type[_Strict]) -> frozenset[str]:
    """The fields of ``cls`` that hold a list of request objects (messages)."""
    nested = set()
    for name, field in cls.model_fields.items():
        args = typing.get_args(field.annotation)
        if typing.get_origin(field.annotation) is list and _is_strict(args[0]):
            nested.add(name)
    return frozenset(nested)


def _refusals(model: _Strict, prefix: str = "") -> Iterator[tuple[str, list[Any]]]:
    """``(param, accepted values)`` of each unsupported field of ``model`` (and
    of the request objects in its lists: chat messages) that is not off."""
    cls = type(model)
    given = model.model_fields_set  # a field left out is off
    offs = _offs_of(cls)
    for name in sorted(given.intersection(offs)):
        off = offs[name]
        if not any(_same(getattr(model, name), o) for o in off):
            yield prefix + name, off
    for name in sorted(given.intersection(_nested_of(cls))):
        for i, item in enumerate(getattr(model, name)):
            yield from _refusals(item, f"{prefix}{name}.{i}.")


class LlmosIn(_Strict):
    """llmos's own request fields, under ``"llmos"`` (OpenAI clients send
    them as ``extra_body``): a fusion's budget."""

    max_members: int | None = Field(
        default=None, ge=1, description="A fusion asks at most this many members"
    )
    max_latency_ms: float | None = Field(
        default=None, gt=0, description="A fusion answers with what it has after this long"
    )

    def budget(self) -> Budget | None:
        if self.max_members is None and self.max_latency_ms is None:
            return None
        return Budget(max_members=self.max_members, max_latency_ms=self.max_latency_ms)


class _Body(_Strict):
    model: str = Field(min_length=1, max_length=300)
    llmos: LlmosIn | None = None

    @model_validator(mode="after")
    def _implemented(self) -> Self:
        for param, off in _refusals(self):
            shown = " or ".join(json.dumps(v) for v in off)
            raise UsageError(
                f"{param} is not supported by llmos (yet): leave it out, or send {shown}",
                param=param,
                code="unsupported_parameter",
            )
        _unicode(self.model, "model")
        return self

    def budget(self) -> Budget | None:
        return None if self.llmos is None else self.llmos.budget()


def _meta(result: Any) -> dict[str, Any]:
    """``{"llmos": {"meta": ...}}`` for a result that carries meta (a fusion's
    accounting), else nothing: plain answers keep OpenAI's exact shape."""
    meta = getattr(result, "meta", None)
    return {"llmos": {"meta": dict(meta)}} if meta else {}


class StreamOptions(_Strict):
    include_usage: bool | None = Field(
        default=None,
        description="One more event before [DONE]: no choices, the usage of the whole request.",
    )
    include_obfuscation: bool | None = _ignored(
        "llmos pads no stream events; the text streamed is the same"
    )


class _Sampled(_Body):
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    stop: _Strings | None = None
    seed: int | None = Field(default=None, ge=-_INT64, lt=_INT64)
    n: int = Field(default=1, ge=1)
    stream: bool = False
    stream_options: StreamOptions | None = None
    # OpenAI's, for both routes
    logit_bias: Any = _off(None, {})
    presence_penalty: Any = _off(None, 0)
    frequency_penalty: Any = _off(None, 0)
    # the end user, for the vendor's abuse monitoring: llmos does none
    user: str | None = _ignored("names the end user for abuse monitoring, which llmos does not do")

    @field_validator("n", "stream", mode="before")
    @classmethod
    def _null_is_default(cls, value: Any, info: ValidationInfo) -> Any:
        # the openai client sends an explicit None as null; OpenAI reads it as the default
        if value is None:
            return cls.model_fields[str(info.field_name)].default
        return value

    @field_validator("stop")
    @classmethod
    def _stops(cls, value: str | list[str] | None) -> str | list[str] | None:
        if isinstance(value, list) and len(value) > 4:
            raise ValueError("at most 4 stop sequences")
        return value

    @model_validator(mode="after")
    def _sampled(self) -> Self:
        if self.stream_options is not None and not self.stream:
            raise UsageError(
                "stream_options is only allowed with stream: true", param="stream_options"
            )
        if self.stop is not None:
            _texts(self.stop, "stop")
        return self

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


#: OpenAI's rule for function and schema names
_NAME = r"^[a-zA-Z0-9_-]{1,64}$"


class FunctionCallIn(_Strict):
    name: str = Field(min_length=1)
    arguments: str = Field(description="The arguments, as JSON text of an object.")


class ToolCallIn(_Strict):
    """A tool call of an earlier assistant answer, as the client sends it back."""

    id: str = Field(min_length=1)
    type: Literal["function"] = "function"
    function: FunctionCallIn


class ChatMessageIn(_Strict):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: str | list[dict[str, Any]] | None = Field(
        default=None, description="Null (or left out) only in an assistant message with tool_calls."
    )
    # what the message is a part of, not what it says: chat templates have no
    # place for it, and the content is passed on in full
    name: str | None = _ignored("a participant's name; chat templates have no place for it")
    tool_call_id: str | None = Field(
        default=None, description="In a tool message: the id of the tool call it answers."
    )
    # what an assistant message from an earlier answer carries, null when it
    # has nothing (the openai client's message objects do)
    tool_calls: list[ToolCallIn] | None = Field(
        default=None, description="In an assistant message: the tools it called."
    )
    function_call: Any = _off(None)
    refusal: Any = _off(None)
    audio: Any = _off(None)
    annotations: Any = _off(None, [])

    @model_validator(mode="after")
    def _content_or_calls(self) -> Self:
        if self.content is None and not (self.role == "assistant" and self.tool_calls):
            raise UsageError(
                "content is null: only an assistant message with tool_calls may leave it out",
                param="messages",
            )
        if self.tool_calls and self.role != "assistant":
            raise UsageError("only an assistant message has tool_calls", param="messages")
        return self

    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        parts = []
        for part in self.content:
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise UsageError("only text content parts are supported", param="messages")
            parts.append(part["text"])
        return "".join(parts)


class FunctionIn(_Strict):
    name: str = Field(pattern=_NAME, description="a-z, A-Z, 0-9, _ and -, at most 64")
    description: str | None = None
    parameters: dict[str, Any] | None = Field(
        default=None, description="A JSON Schema of the arguments object (none: no arguments)."
    )
    strict: bool | None = None

    def tool(self) -> Tool:
        parameters = self.parameters
        if parameters is None:
            parameters = {"type": "object", "properties": {}}
        elif parameters.get("type", "object") != "object":
            raise UsageError(
                f"tool {self.name!r}: parameters must be the JSON Schema of an object"
                ' ("type": "object"): a tool takes named arguments',
                param="tools",
            )
        return Tool(name=self.name, description=self.description or "", parameters=parameters)


class ToolIn(_Strict):
    type: Literal["function"]
    function: FunctionIn


class FunctionNameIn(_Strict):
    name: str = Field(min_length=1)


class ToolChoiceIn(_Strict):
    """``{"type": "function", "function": {"name": ...}}``: call that tool."""

    type: Literal["function"]
    function: FunctionNameIn


#: the keys of response_format.json_schema (a dict: a field named "schema"
#: would shadow pydantic's BaseModel.schema)
_JSON_SCHEMA_KEYS = {"name": str, "description": str, "schema": dict, "strict": bool}


class ResponseFormatIn(_Strict):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: dict[str, Any] | None = Field(
        default=None,
        description='With "type": "json_schema": name, description, schema (a JSON Schema)'
        " and strict.",
    )

    @model_validator(mode="after")
    def _schema_given(self) -> Self:
        spec = self.json_schema
        if (self.type == "json_schema") != (spec is not None):
            raise UsageError(
                'response_format: json_schema is given with "type": "json_schema", and only then',
                param="response_format",
            )
        if spec is None:
            return self
        for key, value in spec.items():
            kind = _JSON_SCHEMA_KEYS.get(key)
            if kind is None:
                raise UsageError(
                    f"response_format.json_schema.{key} is not a field of json_schema: it"
                    f" takes {', '.join(_JSON_SCHEMA_KEYS)}",
                    param=f"response_format.json_schema.{key}",
                )
            if value is not None and not isinstance(value, kind):
                raise UsageError(
                    f"response_format.json_schema.{key} must be a {kind.__name__}",
                    param=f"response_format.json_schema.{key}",
                )
        if not isinstance(spec.get("name"), str) or not re.match(_NAME, spec["name"]):
            raise UsageError(
                "response_format.json_schema.name is required: a-z, A-Z, 0-9, _ and -,"
                " at most 64 characters",
                param="response_format.json_schema.name",
            )
        return self

    def value(self) -> ResponseFormat | None:
        if self.type == "text":
            return None
        spec = self.json_schema or {}
        return ResponseFormat(
            type=self.type,
            schema=spec.get("schema") or ({} if self.type == "json_schema" else None),
            name=spec.get("name"),
            strict=spec.get("strict"),
        )


class ChatCompletionBody(_Sampled):
    messages: list[ChatMessageIn] = Field(min_length=1)
    logprobs: bool | None = Field(
        default=None,
        description="The answer's tokens with their log-probabilities (served by models whose"
        " provider supports it; others answer 400).",
    )
    top_logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_CHAT_TOP_LOGPROBS,
        description="With logprobs: this many most likely tokens at each position.",
    )
    response_format: ResponseFormatIn | None = Field(
        default=None,
        description="json_object or json_schema: the answer is constrained to it (models whose"
        " provider supports it; others answer 400).",
    )
    tools: list[ToolIn] | None = Field(
        default=None,
        description="Functions the model may call (models whose provider supports it; others"
        " answer 400).",
    )
    tool_choice: Literal["none", "auto", "required"] | ToolChoiceIn | None = None
    parallel_tool_calls: bool | None = Field(
        default=None, description="false: at most one tool call in an answer."
    )
    # answer-changing OpenAI fields llmos does not implement
    functions: Any = _off(None, [])
    function_call: Any = _off(None, "none")
    modalities: Any = _off(None, ["text"])
    audio: Any = _off(None)
    prediction: Any = _off(None)
    reasoning_effort: Any = _off(None)
    verbosity: Any = _off(None)
    web_search_options: Any = _off(None)
    moderation: Any = _off(None)
    # fields clients send routinely that cannot change the answer
    safety_identifier: str | None = _ignored(
        "names the end user for abuse monitoring (the successor of user)"
    )
    metadata: dict[str, str] | None = _ignored("tags for stored completions; llmos stores none")
    store: bool | None = _ignored("asks the vendor to keep the answer; llmos keeps none")
    service_tier: str | None = _ignored("a vendor's price and latency tier; llmos has one")
    prompt_cache_key: str | None = _ignored("a prompt-cache hint; the answer is the same")
    prompt_cache_retention: str | None = _ignored("a prompt-cache hint; the answer is the same")
    prompt_cache_options: dict[str, Any] | None = _ignored(
        "a prompt-cache hint; the answer is the same"
    )

    @model_validator(mode="after")
    def _chat_logprobs(self) -> Self:
        if self.top_logprobs and not self.logprobs:
            raise UsageError(
                "top_logprobs needs logprobs: true (it says how many alternatives each of"
                " the logprobs lists)",
                param="top_logprobs",
            )
        if self.stream and self.logprobs:
            raise UsageError("logprobs is not supported with stream: true", param="logprobs")
        return self

    @model_validator(mode="after")
    def _chat_texts(self) -> Self:
        for i, message in enumerate(self.messages):
            if isinstance(message.content, str):
                _unicode(message.content, f"messages.{i}.content")
            else:
                for j, part in enumerate(message.content or []):
                    if isinstance(part.get("text"), str):
                        _unicode(part["text"], f"messages.{i}.content.{j}.text")
        return self

    @model_validator(mode="after")
    def _chat_tools(self) -> Self:
        names = [t.function.name for t in self.tools or []]
        for name in names:
            if names.count(name) > 1:
                raise UsageError(f"tool {name!r} is given twice: names must differ", param="tools")
        choice = self.tool_choice
        if isinstance(choice, ToolChoiceIn) and choice.function.name not in names:
            raise UsageError(
                f"tool_choice names tool {choice.function.name!r}, which is not one of tools"
                f" ({', '.join(names) or 'none given'})",
                param="tool_choice",
            )
        if choice is not None and choice not in ("none", "auto") and not names:
            raise UsageError(
                "tool_choice asks for a tool call, but no tools are given", param="tool_choice"
            )
        return self

    def tool_fields(self) -> dict[str, Any]:
        """The ChatRequest fields of ``response_format``, ``tools`` and
        ``tool_choice``. ``tool_choice: "none"`` sends no tools: a model that
        may not call them has no use for their descriptions."""
        choice = self.tool_choice
        fields: dict[str, Any] = {
            "response_format": self.response_format.value() if self.response_format else None,
            "parallel_tool_calls": self.parallel_tool_calls is not False,
        }
        if self.tools and choice != "none":
            fields["tools"] = tuple(t.function.tool() for t in self.tools)
            if isinstance(choice, ToolChoiceIn):
                fields["tool_choice"], fields["tool_name"] = "required", choice.function.name
            else:
                fields["tool_choice"] = choice or "auto"
        return fields


class CompletionBody(_Sampled):
    prompt: _Prompts
    logprobs: int | None = Field(
        default=None,
        ge=0,
        le=MAX_COMPLETION_LOGPROBS,
        description="Each token's log-probability and this many most likely tokens at its"
        " position (served by models whose provider supports it; others answer 400).",
    )
    echo: bool | None = Field(
        default=None, description="The answer's text (and logprobs) start with the prompt's."
    )
    # answer-changing OpenAI fields llmos does not implement
    suffix: Any = _off(None, "")
    best_of: Any = _off(None, 1)

    @model_validator(mode="after")
    def _prompts(self) -> Self:
        if isinstance(self.prompt, str) or all(isinstance(p, str) for p in self.prompt):
            _texts(cast(str | list[str], self.prompt), "prompt")
        if self.stream and (self.echo or self.logprobs is not None):
            param = "echo" if self.echo else "logprobs"
            raise UsageError(f"{param} is not supported with stream: true", param=param)
        return self

    def prompts(self) -> list[str | list[int]]:
        """The prompts, each a string or a list of token ids."""
        prompt = self.prompt
        if isinstance(prompt, str):
            return [prompt]
        if prompt and isinstance(prompt[0], int):
            return [cast(list[int], prompt)]
        return cast(list[str | list[int]], list(prompt))

    @field_validator("best_of", mode="before")
    @classmethod
    def _best_of(cls, value: Any, info: ValidationInfo) -> Any:
        # best_of = n is "generate n, return n": the default when n is given
        n = info.data.get("n", 1)
        return 1 if _same(value, n) else value


class EmbeddingBody(_Body):
    input: _Strings
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(default=None, ge=1)
    user: str | None = _ignored("names the end user for abuse monitoring, which llmos does not do")

    @model_validator(mode="after")
    def _inputs(self) -> Self:
        _texts(self.input, "input")
        return self


class ClassifyBody(_Body):
    texts: list[str] = Field(min_length=1)
    labels: list[Annotated[str, Field(min_length=1)]] = Field(default_factory=list, max_length=100)

    @model_validator(mode="after")
    def _classify(self) -> Self:
        _texts(self.texts, "texts")
        _texts(self.labels, "labels")
        seen: set[str] = set()
        for label in self.labels:
            if label in seen:
                raise UsageError(
                    f"label {label!r} is given twice: labels must be distinct, or its scores "
                    "would count twice and not sum to 1",
                    param="labels",
                )
            seen.add(label)
        return self


class _Caps:
    def __init__(self, kernel: Kernel) -> None:
        api = kernel.config.section("api")
        self.max_tokens = int(api.get("max_tokens", 4096))
        self.max_chars = int(api.get("max_prompt_chars", 200_000))
        # a request's inputs and choices all wait in one model's queue
        self.max_n, self.n_key = queued_cap(kernel.config, "max_n", 8)
        self.max_inputs, self.inputs_key = queued_cap(kernel.config, "max_inputs", 64)

    def count(self, count: int, param: str) -> None:
        if count > self.max_inputs:
            raise UsageError(
                f"{count} inputs in one request; the limit is {self.max_inputs} "
                f"({self.inputs_key}): send them in smaller batches",
                param=param,
            )

    def lengths(self, texts: Sequence[str | Sequence[int]], param: str) -> None:
        for text in texts:
            if len(text) > self.max_chars:
                raise UsageError(
                    f"an input of {len(text)} characters (or token ids) is longer than the limit"
                    f" of {self.max_chars} (api.max_prompt_chars)",
                    param=param,
                )

    def texts(self, texts: Sequence[str | Sequence[int]], param: str) -> None:
        self.count(len(texts), param)
        self.lengths(texts, param)

    def classify(self, texts: Sequence[str], labels: Sequence[str]) -> None:
        """Zero-shot classify scores every label after every text, so its work
        grows with texts x label length: each label is held to
        ``max_prompt_chars`` like a text, and the characters scored in all (each
        text once, plus its labels) to ``max_inputs`` x ``max_prompt_chars`` —
        the most a completions request may send."""
        self.texts(texts, "texts")
        self.lengths(labels, "labels")
        scored = sum(len(t) for t in texts) + len(texts) * sum(len(label) for label in labels)
        budget = self.max_inputs * self.max_chars
        if scored > budget:
            raise UsageError(
                f"this request scores {scored} characters (each text once, plus every label"
                f" after each text); the limit is {budget} ({self.inputs_key} x"
                " api.max_prompt_chars): send fewer texts or shorter labels per request",
                param="labels",
            )

    def sampling(self, body: _Sampled) -> Sampling:
        if body.n > self.max_n:
            raise UsageError(
                f"n={body.n} is over the limit of {self.max_n} ({self.n_key})", param="n"
            )
        max_tokens = body.max_completion_tokens or body.max_tokens
        if max_tokens is not None and max_tokens > self.max_tokens:
            raise UsageError(
                f"max_tokens={max_tokens} is over the limit of {self.max_tokens} (api.max_tokens)",
                param="max_tokens",
            )
        # A request that leaves max_tokens out is held to the limit too, not
        # to the provider's default (a local model's: the rest of its
        # context); it stops there with finish_reason "length".
        is_limit = max_tokens is None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        self.lengths(stop, "stop")
        # OpenAI's default, not the provider's: a request that leaves it out
        # samples at temperature 1, as it would against OpenAI (the kernel's
        # own default, which the CLI uses, is greedy). top_p stays unset: every
        # provider reads that as 1, OpenAI's default, and a remote one is not
        # sent a parameter its model may refuse (OpenAI's reasoning models).
        return Sampling(
            max_tokens=self.max_tokens if max_tokens is None else max_tokens,
            temperature=DEFAULT_TEMPERATURE if body.temperature is None else body.temperature,
            top_p=body.top_p,
            stop=tuple(stop),
            seed=body.seed,
            max_tokens_is_limit=is_limit,
        )


def _wrap64(seed: int) -> int:
    """``seed`` wrapped into a signed 64-bit integer, the range a seed takes."""
    return (seed + _INT64) % (2 * _INT64) - _INT64


def _choices(request: R, n: int) -> list[R]:
    """One request per choice. With a seed, choice ``i`` samples with seed
    ``seed + i``: the choices differ from each other (the same seed would
    give ``n`` copies of one sample) and the whole answer is the same for the
    same seed. Choice 0 keeps the seed itself, so ``n=1`` answers as before;
    greedy choices are all the same, as they must be."""
    sampling = request.sampling
    if n == 1 or sampling.seed is None:
        return [request] * n
    return [
        attrs.evolve(request, sampling=attrs.evolve(sampling, seed=_wrap64(sampling.seed + i)))
        for i in range(n)
    ]


def _completion_logprobs(logprobs: Logprobs | None) -> dict[str, Any] | None:
    """OpenAI's completions ``logprobs`` object: four parallel lists; a
    token with no log-probability (an echoed prompt's first) has no
    alternatives either (``null``)."""
    if logprobs is None:
        return None
    return {
        "tokens": list(logprobs.tokens),
        "token_logprobs": list(logprobs.token_logprobs),
        "top_logprobs": [
            None if lp is None else dict(top)
            for lp, top in zip(logprobs.token_logprobs, logprobs.top_logprobs, strict=True)
        ],
        "text_offset": list(logprobs.text_offset),
    }


def _token(token: str, logprob: float | None) -> dict[str, Any]:
    return {"token": token, "logprob": logprob, "bytes": list(token.encode("utf-8"))}


def _chat_logprobs(logprobs: Logprobs | None) -> dict[str, Any] | None:
    """OpenAI's chat ``logprobs`` object: one entry per token of the answer."""
    if logprobs is None:
        return None
    content = [
        {**_token(token, lp), "top_logprobs": [_token(t, v) for t, v in top]}
        for token, lp, top in zip(
            logprobs.tokens, logprobs.token_logprobs, logprobs.top_logprobs, strict=True
        )
    ]
    return {"content": content, "refusal": None}


def _usage(usages: Sequence[Usage]) -> dict[str, int]:
    prompt = sum(u.prompt_tokens for u in usages)
    completion = sum(u.completion_tokens for u in usages)
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _overhead(started: float, timing: dict[str, float]) -> dict[str, str]:
    """The timing headers. The overhead is what is left of the request's time
    outside the model, its queue and loading the model (``x-llmos-load-ms``,
    0 unless this request waited for a load): a first request that loads a
    model for 40 s has not spent 40 s in llmos's own code."""
    total = time.perf_counter() - started
    load = timing.get("load_s", 0.0)
    inside = timing.get("model_s", 0.0) + timing.get("queue_wait_s", 0.0) + load
    return {
        "x-llmos-overhead-ms": f"{max(total - inside, 0.0) * 1000:.3f}",
        "x-llmos-queue-ms": f"{timing.get('queue_wait_s', 0.0) * 1000:.3f}",
        "x-llmos-load-ms": f"{load * 1000:.3f}",
        "x-llmos-batch-size": str(int(timing.get("batch_size", 0))),
    }


def _sse(data: Any) -> bytes:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n".encode()


async def _stream_response(
    kernel: Kernel,
    model: str,
    request: CompletionRequest | ChatRequest,
    envelope: dict[str, Any],
    chat: bool,
    usage: bool,
) -> StreamingResponse:
    # Resolve, load and queue before the response starts, so that an unknown
    # model or a full queue is an ordinary JSON error, not a broken stream.
    handle = await asyncio.to_thread(kernel.stream, model, request)
    tools = isinstance(request, ChatRequest) and request.may_call_tools
    return StreamingResponse(
        _stream_events(kernel, handle, envelope, chat, usage, tools=tools),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )


def _tool_call_deltas(chunk: StreamChunk) -> Iterator[dict[str, Any]]:
    """The deltas of an answer that calls tools, as OpenAI streams them: its
    text (if any), then each call — first its ``index``, ``id``, ``type``
    and ``function.name`` (``arguments`` ``""``), then its arguments."""
    if chunk.text:
        yield {"content": chunk.text}
    for i, call in enumerate(chunk.tool_calls):
        function = {"name": call.name, "arguments": ""}
        yield {
            "tool_calls": [{"index": i, "id": call.id, "type": "function", "function": function}]
        }
        yield {"tool_calls": [{"index": i, "function": {"arguments": call.arguments}}]}


async def _stream_events(
    kernel: Kernel,
    handle: StreamHandle,
    envelope: dict[str, Any],
    chat: bool,
    usage: bool,
    *,
    tools: bool = False,
) -> AsyncIterator[bytes]:
    """The stream's events. Without ``usage`` (``stream_options.include_usage``)
    the last choice's event carries the usage, as llmos always did; with it,
    as OpenAI does: ``"usage": null`` on every choice's event and one more
    event, with no choices, carrying it — never both, so that a client adding
    up the usage it sees (LangChain does) counts it once.

    A chat that may call ``tools`` comes whole, in one chunk (the kernel
    answers it with the model's ``chat``: a tool call is known only once the
    answer is): its content or its ``tool_calls`` deltas, then the event
    with the ``finish_reason``, as OpenAI sends them."""
    if usage:
        envelope = {**envelope, "usage": None}
    total: Usage | None = None
    try:
        if chat:
            # OpenAI's first delta: null content where tool calls may follow
            role = {"role": "assistant", "content": None} if tools else {"role": "assistant"}
            yield _sse({**envelope, "choices": [{"index": 0, "delta": role}]})
        while True:
            chunk: StreamChunk | None = await asyncio.to_thread(handle.get, kernel.request_timeout)
            if chunk is None:
                break
            if chat and chunk.tool_calls:
                for delta in _tool_call_deltas(chunk):
                    part = {"index": 0, "delta": delta, "finish_reason": None}
                    yield _sse({**envelope, "choices": [part]})
                choice: dict[str, Any] = {"index": 0, "delta": {}}
            elif chat:
                choice = {"index": 0, "delta": {"content": chunk.text} if chunk.text else {}}
            else:
                choice = {"index": 0, "text": chunk.text}
            choice["finish_reason"] = chunk.finish_reason
            event = {**envelope, "choices": [choice]}
            if chunk.usage is not None:
                total = chunk.usage
                if not usage:
                    event["usage"] = _usage([chunk.usage])
            yield _sse(event)
        if usage:
            yield _sse({**envelope, "choices": [], "usage": _usage([total] if total else [])})
        yield b"data: [DONE]\n\n"
    finally:
        # Also reached when the client disconnects: stop generating for it.
        handle.cancel()


#: nginx's status for "the client closed the request"; nobody reads it
CLIENT_CLOSED = 499


async def _unless_disconnected(request: Request, work: Awaitable[T]) -> T | Response:
    """Await ``work``, or cancel it when the client disconnects first.

    Starlette does not cancel a handler whose client went away, so a request
    still queued for a busy model would run for no one. Cancelling the
    kernel call takes it out of the model's queue.
    """
    task = asyncio.ensure_future(work)

    async def disconnected() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass

    watcher = asyncio.ensure_future(disconnected())
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    return Response(status_code=CLIENT_CLOSED)


async def _respond(
    kernel: Kernel,
    http: Request,
    model: str,
    capability: Capability,
    requests: Sequence[Any],
    started: float,
    payload: Callable[[list[Any]], dict[str, Any]],
    loaded: float = 0.0,
) -> Response:
    """Run the requests through the kernel (cancelled if the client hangs up)
    and answer ``payload(results)`` with the overhead headers; ``loaded``:
    seconds this request already spent loading the model (not overhead)."""
    timing: dict[str, float] = {"load_s": loaded} if loaded else {}
    results = await _unless_disconnected(
        http, kernel.acall(model, capability, requests, timing=timing)
    )
    if isinstance(results, Response):
        return results
    return JSONResponse(payload(results), headers=_overhead(started, timing))


def _model_object(model_id: str, card: ModelCard) -> dict[str, Any]:
    """OpenAI's model object for registered model ``model_id``: its card says
    when it was made and which provider serves it."""
    created = int(card.created_at.timestamp())
    return {"id": model_id, "object": "model", "created": created, "owned_by": card.provider}


def _configured_models(kernel: Kernel) -> Iterator[dict[str, Any]]:
    """The model objects of the config's groups and ``[models.NAME]``
    deployments, in the order ``/v1/models`` lists them."""
    for name in kernel.config.section("groups"):
        yield {"id": name, "object": "model", "created": 0, "owned_by": "group"}
    for name, table in kernel.config.section("models").items():
        owner = table.get("provider", "config") if isinstance(table, dict) else "config"
        yield {"id": name, "object": "model", "created": 0, "owned_by": owner}


def _chat_message(message: ChatMessageIn) -> ChatMessage:
    calls = tuple(
        ToolCall(id=c.id, name=c.function.name, arguments=c.function.arguments)
        for c in message.tool_calls or ()
    )
    return ChatMessage(
        message.role, message.text(), tool_calls=calls, tool_call_id=message.tool_call_id
    )


def _message_out(message: ChatMessage) -> dict[str, Any]:
    """An answer's message as OpenAI shapes it: with tool calls, their list
    and ``content`` null when the model said nothing besides."""
    if not message.tool_calls:
        return {"role": "assistant", "content": message.content}
    return {
        "role": "assistant",
        "content": message.content or None,
        "tool_calls": [
            {
                "id": call.id,
                "type": "function",
                "function": {"name": call.name, "arguments": call.arguments},
            }
            for call in message.tool_calls
        ],
    }


async def _check_features(kernel: Kernel, model: str, request: ChatRequest) -> float:
    """Refuse ``response_format`` and ``tools`` (a 400 naming the field)
    unless the model's provider says it serves them (``chat_features``), so
    that no model answers free text where JSON or a tool call was asked for.
    A deployment group is refused: its deployments may differ. Returns the
    seconds spent loading the model to ask it (0 when it was loaded)."""
    features = request.features()
    if not features:
        return 0.0
    if kernel.router.has(model):
        raise UsageError(
            f"model {model!r} is a deployment group: {features[0]} is served only by a model"
            " named directly (its deployments may differ in what they support)",
            param=features[0],
        )
    loading: dict[str, float] = {}
    worker = kernel.models.peek(model) or await asyncio.to_thread(
        kernel.models.get, model, timing=loading
    )
    check_chat_features(worker.model, model, [request])
    return loading.get("load_s", 0.0)


def openai_router(kernel: Kernel) -> APIRouter:
    """The OpenAI-compatible routes and ``/api/classify`` over ``kernel``."""
    router = APIRouter(tags=["openai-compatible"])
    caps = _Caps(kernel)

    @router.get("/v1/models", summary="List the models a client can use")
    def list_models() -> dict[str, Any]:
        data = [*_configured_models(kernel)]
        cursor = None
        while True:
            page = kernel.registry.store.search("", sort="name", limit=1000, cursor=cursor)
            data.extend(_model_object(hit.card.name, hit.card) for hit in page.items)
            if not (cursor := page.next_cursor):
                break
        return {"object": "list", "data": data}

    @router.get("/v1/models/{model_id:path}", summary="One model a client can use")
    def retrieve_model(model_id: str) -> dict[str, Any]:
        """What ``client.models.retrieve`` reads: a group, a ``[models.NAME]``
        deployment or a registered model (``name``, ``name@2``, ``name@alias``;
        names may hold ``/``), as ``/v1/models`` lists it; 404 otherwise."""
        for model in _configured_models(kernel):
            if model["id"] == model_id:
                return model
        try:
            card = kernel.registry.store.get(model_id)
        except LlmosError as exc:
            if exc.status >= 500:
                raise
            # a malformed name (a 400 from the registry) is no model either
            raise NotFoundError(
                f"model {model_id[:200]!r} not found; GET /v1/models lists the models",
                param="model",
                code="model_not_found",
            ) from None
        return _model_object(model_id, card)

    @router.post("/v1/chat/completions", summary="Chat (OpenAI-compatible)", response_model=None)
    async def chat_completions(body: ChatCompletionBody, http: Request) -> Response:
        started = time.perf_counter()
        messages = tuple(_chat_message(m) for m in body.messages)
        # a conversation's messages are one input: their number is not capped
        caps.lengths([m.content for m in messages], "messages")
        request = ChatRequest(
            messages=messages,
            sampling=caps.sampling(body),
            budget=body.budget(),
            logprobs=bool(body.logprobs),
            top_logprobs=body.top_logprobs or 0,
            **body.tool_fields(),
        )
        loaded = await _check_features(kernel, body.model, request)
        envelope = {
            "id": f"chatcmpl-{uuid.uuid4().hex}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:
            if body.n != 1:
                raise UsageError("stream with n > 1 is not supported", param="n")
            chunk_envelope = {**envelope, "object": "chat.completion.chunk"}
            return await _stream_response(
                kernel, body.model, request, chunk_envelope, chat=True, usage=body.include_usage
            )

        def payload(results: list[ChatResult]) -> dict[str, Any]:
            choices = [
                {
                    "index": i,
                    "message": _message_out(r.message),
                    "finish_reason": r.finish_reason,
                    **({"logprobs": _chat_logprobs(r.logprobs)} if body.logprobs else {}),
                    **_meta(r),
                }
                for i, r in enumerate(results)
            ]
            return {**envelope, "choices": choices, "usage": _usage([r.usage for r in results])}

        return await _respond(
            kernel,
            http,
            body.model,
            Capability.CHAT,
            _choices(request, body.n),
            started,
            payload,
            loaded=loaded,
        )

    @router.post(
        "/v1/completions", summary="Complete text (OpenAI-compatible)", response_model=None
    )
    async def completions(body: CompletionBody, http: Request) -> Response:
        started = time.perf_counter()
        prompts = body.prompts()
        if not prompts:
            raise UsageError("prompt is empty", param="prompt")
        caps.texts(prompts, "prompt")
        sampling = caps.sampling(body)
        requests = [
            choice
            for p in prompts
            for choice in _choices(
                CompletionRequest(
                    prompt=p if isinstance(p, str) else "",
                    # token ids are fed as they are: only a model that supports them
                    # takes them (the kernel refuses the rest, naming prompt)
                    prompt_ids=None if isinstance(p, str) else p,
                    sampling=sampling,
                    budget=body.budget(),
                    echo=bool(body.echo),
                    logprobs=body.logprobs,
                ),
                body.n,
            )
        ]
        caps.count(len(requests), "n")  # n times the prompts is capped too
        envelope = {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": body.model,
        }
        if body.stream:
            if len(requests) != 1:
                raise UsageError("stream takes one prompt and n = 1", param="stream")
            return await _stream_response(
                kernel, body.model, requests[0], envelope, chat=False, usage=body.include_usage
            )

        def payload(results: list[CompletionResult]) -> dict[str, Any]:
            choices = [
                {
                    "index": i,
                    "text": r.text,
                    "finish_reason": r.finish_reason,
                    "logprobs": _completion_logprobs(r.logprobs),
                    **_meta(r),
                }
                for i, r in enumerate(results)
            ]
            return {**envelope, "choices": choices, "usage": _usage([r.usage for r in results])}

        return await _respond(
            kernel, http, body.model, Capability.COMPLETE, requests, started, payload
        )

    @router.post("/v1/embeddings", summary="Embed texts (OpenAI-compatible)", response_model=None)
    async def embeddings(body: EmbeddingBody, http: Request) -> Response:
        started = time.perf_counter()
        texts = [body.input] if isinstance(body.input, str) else body.input
        base64_floats = body.encoding_format == "base64"
        if not texts:
            raise UsageError("input is empty", param="input")
        caps.texts(texts, "input")

        def payload(results: list[EmbedResult]) -> dict[str, Any]:
            data = []
            for i, result in enumerate(results):
                vector = list(result.vector)
                if body.dimensions is not None:
                    if not 1 <= body.dimensions <= len(vector):
                        raise UsageError(
                            f"dimensions must be between 1 and {len(vector)}", param="dimensions"
                        )
                    vector = vector[: body.dimensions]
                embedding: Any = (
                    base64.b64encode(struct.pack(f"<{len(vector)}f", *vector)).decode()
                    if base64_floats
                    else vector
                )
                data.append(
                    {"object": "embedding", "index": i, "embedding": embedding, **_meta(result)}
                )
            usage = _usage([r.usage for r in results])
            return {
                "object": "list",
                "data": data,
                "model": body.model,
                "usage": {
                    "prompt_tokens": usage["prompt_tokens"],
                    "total_tokens": usage["total_tokens"],
                },
            }

        requests = [EmbedRequest(text=t, budget=body.budget()) for t in texts]
        return await _respond(
            kernel, http, body.model, Capability.EMBED, requests, started, payload
        )

    @router.post("/api/classify", summary="Label scores for a batch of texts", response_model=None)
    async def classify(body: ClassifyBody, http: Request) -> Response:
        started = time.perf_counter()
        caps.classify(body.texts, body.labels)

        def payload(results: list[ClassifyResult]) -> dict[str, Any]:
            return {
                "model": body.model,
                "results": [
                    {"label": r.label, "scores": dict(r.scores), **_meta(r)} for r in results
                ],
                "usage": _usage([r.usage for r in results]),
            }

        requests = [
            ClassifyRequest(text=t, labels=tuple(body.labels), budget=body.budget())
            for t in body.texts
        ]
        return await _respond(
            kernel, http, body.model, Capability.CLASSIFY, requests, started, payload
        )

    return router
