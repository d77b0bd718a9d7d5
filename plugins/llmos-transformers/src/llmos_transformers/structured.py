"""Structured output: JSON-constrained decoding, and tool calls in and out.

``response_format`` (``json_object``, ``json_schema``) and ``tool_choice``
``required`` (or one named tool) constrain decoding with lm-format-enforcer
(the pure-Python library vLLM also ships): at each step only the tokens that
keep the text a valid prefix of JSON matching the schema may be picked, and
the end-of-sequence token only once the JSON is complete. The answer is then
valid JSON for any model, a random one included, unless ``max_tokens`` cuts it
first (``finish_reason: "length"``, as OpenAI does).

Tool calls take this shape, which the tools prompt asks for and a forced call
is constrained to::

    {"name": "<tool name>", "arguments": {...}}

With ``tool_choice`` ``auto`` the model answers freely, and its answer is a
tool call when it is one such object, a JSON list of them, or one or more
``<tool_call>...</tool_call>`` blocks each holding one (the markup of Qwen's
and Hermes' chat templates). Anything else is text.

Nothing here imports torch.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Sequence
from typing import Any

import attrs
import structlog

from llmos.errors import UsageError
from llmos.types import ChatMessage, ChatRequest, ChatResult, Tool, ToolCall

__all__ = [
    "Constraint",
    "answer_schema",
    "check_json",
    "json_prompt",
    "parse_tool_calls",
    "token_data",
    "tool_call_schema",
    "tool_result",
    "tools_prompt",
]

log = structlog.get_logger("llmos.transformers")

#: whitespace a constrained answer may put in a row: enough for indented JSON,
#: few enough that a model drawn to whitespace cannot spend its tokens on it
MAX_WHITESPACE = 4

#: characters JSON takes nowhere raw (a tab neither, inside a string): a
#: token holding one is left out of constrained answers, or json.loads would
#: refuse them (newlines lm-format-enforcer keeps out of strings itself). So
#: is a token that is a piece of a character's UTF-8 bytes: the parser reads
#: decoded text, and half a character is none (characters a vocabulary only
#: spells in byte pieces cannot appear in a constrained answer).
_CONTROL = re.compile(r"[\x00-\x09\x0b\x0c\x0e-\x1f]")
_TAGGED = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_FENCED = re.compile(r"^```(?:json)?\s*(.*?)\s*```$", re.DOTALL)


def token_data(tokenizer: Any, eos: frozenset[int], vocab: int) -> Any:
    """What lm-format-enforcer needs of a tokenizer (each regular token's
    text, whether it starts a word), built once per model: a second or so for
    a 50k vocabulary. Its own transformers integration does not import under
    transformers 5, so the table is built here from the tokenizer alone."""
    from lmformatenforcer.tokenenforcer import TokenEnforcerTokenizerData

    special = set(tokenizer.all_special_ids)
    zero = tokenizer.encode("0", add_special_tokens=False)[-1]
    regular = []
    for token in range(min(vocab, len(tokenizer))):
        if token in special:
            continue
        # after a "0", a token that starts a word shows its leading space
        after_zero = tokenizer.decode([zero, token])[1:]
        if _CONTROL.search(after_zero) or "\ufffd" in after_zero:
            continue
        alone = tokenizer.decode([token])
        regular.append((token, after_zero, len(after_zero) > len(alone)))

    def decode(ids: list[int]) -> str:
        return str(tokenizer.decode(ids)).rstrip("\ufffd")

    return TokenEnforcerTokenizerData(regular, decode, sorted(eos), False, vocab)


#: JSON Schema keywords lm-format-enforcer does not enforce: refused (a 400
#: naming the field) rather than answered with JSON that ignores them
_UNENFORCED = ("allOf", "not", "if", "then", "else", "patternProperties", "dependentSchemas")
#: keywords whose values are JSON data, not schemas
_DATA = ("enum", "default", "examples", "title", "description", "required")


def _enforceable(schema: Any, param: str) -> Any:
    """``schema`` as lm-format-enforcer reads it: ``oneOf`` as ``anyOf`` (a
    generated value matches one of them either way, as good as), a ``const``
    that is not a string as a one-value ``enum`` (pydantic writes ``const``
    for a ``Literal``); a keyword it cannot enforce is a :class:`UsageError`."""
    if isinstance(schema, list):
        return [_enforceable(item, param) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out: dict[str, Any] = {}
    for key, value in schema.items():
        if key in _DATA:  # values, not schemas: kept as they are
            out[key] = value
            continue
        if key in _UNENFORCED:
            raise UsageError(
                f"{param}: the JSON Schema uses {key!r}, which llmos cannot enforce while"
                " generating: express it with properties, required, enum, anyOf and $ref",
                param=param,
            )
        if key == "oneOf":
            key = "anyOf"
        if key == "const" and not isinstance(value, str):
            key, value = "enum", [value]
        if key in ("properties", "$defs", "definitions") and isinstance(value, dict):
            out[key] = {name: _enforceable(sub, param) for name, sub in value.items()}
        else:
            out[key] = _enforceable(value, param)
    return out


class Constraint:
    """The tokens a row may pick next, given what it generated so far: one
    per request (the parser keeps the request's state). A schema the
    enforcer cannot read, or cannot start an answer for, is a
    :class:`UsageError` naming ``param``, before anything is generated."""

    def __init__(self, data: Any, schema: dict[str, Any], param: str) -> None:
        from lmformatenforcer import JsonSchemaParser
        from lmformatenforcer.tokenenforcer import TokenEnforcer

        self.param = param
        schema = _enforceable(schema, param)
        try:
            parser = JsonSchemaParser(schema)
            self.enforcer = TokenEnforcer(data, parser)  # gives the parser its config
            config = parser.config
            config.max_consecutive_whitespaces = MAX_WHITESPACE
            self.enforcer.get_allowed_tokens([])  # the schema's root, checked now
        except Exception as exc:  # pydantic's or the parser's errors
            raise UsageError(
                f"{param}: this JSON Schema cannot be enforced: {type(exc).__name__}:"
                f" {(str(exc).splitlines() or [''])[0]}",
                param=param,
            ) from exc

    def allowed(self, generated: list[int]) -> list[int]:
        try:
            return list(self.enforcer.get_allowed_tokens(generated).allowed_tokens)
        except Exception:  # a part of the schema it cannot enforce: the row ends here
            log.warning("structured.enforcer_failed", param=self.param, exc_info=True)
            return list(self.enforcer.eos_token_id)


def check_json(text: str, param: str) -> None:
    """Refuse an answer generated under a JSON constraint that is not JSON:
    the enforcer gave up on a part of the schema it could not enforce (it
    ends the answer there), and the client must not get it as if it fit."""
    try:
        json.loads(text, strict=False)
    except ValueError:
        raise UsageError(
            f"{param}: llmos could not hold the answer to this JSON Schema (lm-format-enforcer"
            " gave up on a part of it): simplify the schema",
            param=param,
        ) from None


def tool_call_schema(tools: Sequence[Tool]) -> dict[str, Any]:
    """The JSON Schema of a call of one of ``tools``: ``{"name", "arguments"}``."""
    options = [
        {
            "type": "object",
            "properties": {"name": {"enum": [tool.name]}, "arguments": dict(tool.parameters)},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        }
        for tool in tools
    ]
    return options[0] if len(options) == 1 else {"anyOf": options}


def _forced_tools(request: ChatRequest) -> list[Tool]:
    """The tools a request forces a call of (``tool_choice`` required)."""
    if not request.tools or request.tool_choice != "required":
        return []
    if request.tool_name is None:
        return list(request.tools)
    forced = [tool for tool in request.tools if tool.name == request.tool_name]
    if not forced:
        raise UsageError(
            f"tool_choice names tool {request.tool_name!r}, which is not one of tools",
            param="tool_choice",
        )
    return forced


def answer_schema(request: ChatRequest) -> tuple[dict[str, Any], str] | None:
    """The JSON Schema a request's answer is constrained to, and the field
    that asked for it; ``None``: free text. A forced tool call comes first,
    then ``response_format``."""
    forced = _forced_tools(request)
    if forced:
        return tool_call_schema(forced), "tool_choice"
    fmt = request.response_format
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return {"type": "object"}, "response_format"
    if fmt.type == "json_schema":
        if not isinstance(fmt.schema, dict):
            raise UsageError("response_format: json_schema needs a schema", param="response_format")
        return dict(fmt.schema), "response_format"
    raise UsageError(f"response_format type {fmt.type!r} is unknown", param="response_format")


def json_prompt(request: ChatRequest) -> str:
    """What the system prompt says of a ``response_format``, so that the
    model knows what the constraint will hold it to (a small model follows a
    schema it has read much better than one it only runs into)."""
    fmt = request.response_format
    if fmt is None or fmt.type == "text" or _forced_tools(request):
        return ""
    if fmt.type == "json_object":
        return "Answer with one JSON object."
    return "Answer with one JSON object that follows this JSON Schema:\n" + json.dumps(
        fmt.schema, separators=(",", ":")
    )


def tools_prompt(tools: Sequence[Tool]) -> str:
    """The tools, described in a system prompt, for a chat template that
    takes no ``tools`` of its own."""
    lines = [
        "You can call these functions. To call one, answer with only a JSON object"
        ' {"name": <function name>, "arguments": <object of its arguments>}.',
        "The functions:",
    ]
    for tool in tools:
        spec = {"name": tool.name, "description": tool.description, "parameters": tool.parameters}
        lines.append(json.dumps(spec, separators=(",", ":")))
    return "\n".join(lines)


def _call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def _calls_in(value: Any, names: set[str]) -> list[ToolCall] | None:
    """The tool calls a parsed JSON value is, or ``None`` if it is not
    (only) calls of known tools."""
    items = value if isinstance(value, list) else [value]
    calls = []
    for item in items:
        if not isinstance(item, dict) or item.get("name") not in names:
            return None
        arguments = item.get("arguments", item.get("parameters", {}))
        if isinstance(arguments, str):  # some models write them as JSON text
            try:
                arguments = json.loads(arguments)
            except ValueError:
                return None
        if not isinstance(arguments, dict):
            return None
        calls.append(ToolCall(id=_call_id(), name=item["name"], arguments=json.dumps(arguments)))
    return calls or None


def parse_tool_calls(text: str, tools: Sequence[Tool]) -> tuple[str, list[ToolCall]]:
    """``(content, calls)`` of an answer: the tool calls it is (see the
    module's docstring) and the text left besides; no calls: the text as is."""
    names = {tool.name for tool in tools}
    tagged = _TAGGED.findall(text)
    if tagged:
        calls: list[ToolCall] = []
        for block in tagged:
            try:
                found = _calls_in(json.loads(block, strict=False), names)
            except ValueError:
                return text, []
            if found is None:
                return text, []
            calls.extend(found)
        return _TAGGED.sub("", text).strip(), calls
    body = text.strip()
    fenced = _FENCED.match(body)
    if fenced:
        body = fenced.group(1)
    try:
        found = _calls_in(json.loads(body, strict=False), names)
    except ValueError:
        return text, []
    return ("", found) if found else (text, [])


def tool_result(result: ChatResult, request: ChatRequest) -> ChatResult:
    """``result`` with the tool calls its text is, when the request gave
    tools it may call: content and ``tool_calls`` split, ``finish_reason``
    ``tool_calls``. A text cut by ``max_tokens`` stays text."""
    if not request.tools or request.tool_choice == "none" or result.finish_reason != "stop":
        return result
    content, calls = parse_tool_calls(result.message.content, request.tools)
    if not calls:
        return result
    if not request.parallel_tool_calls:
        calls = calls[:1]
    message = ChatMessage("assistant", content, tool_calls=tuple(calls))
    return attrs.evolve(result, message=message, finish_reason="tool_calls")
