"""Structured output and tool calls on a causal LM (issue 15, item 2).

A random tiny Llama writes nonsense, so whatever JSON it writes is the
constraint's doing: an answer constrained by ``response_format`` parses and
validates against its schema, a forced tool call is a call of the right
tool with valid arguments. The tokenizer here has every byte in its
vocabulary (the shared fixture's has no ``{``), and the model a context long
enough for a schema in its prompt.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema_rs
import pytest

from llmos.errors import UsageError
from llmos.types import (
    ChatMessage,
    ChatRequest,
    LoadedModel,
    ResponseFormat,
    Sampling,
    Tool,
    ToolCall,
)
from llmos_transformers import structured, tokens
from llmos_transformers.testing import CHAT_TEMPLATE, write_json_llama

#: a template that renders tools itself (as Qwen's and Llama 3's do)
TOOLS_TEMPLATE = (
    "{% if tools %}<s>tools: {{ tools | tojson }}</s>\n{% endif %}"
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}"
    "{% if m.tool_calls %} calls: {{ m.tool_calls | tojson }}{% endif %}"
    "{% if m.tool_call_id %} for: {{ m.tool_call_id }}{% endif %}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
TEXTS = [
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}',
    "the cat sat on the mat. what is the weather in paris?",
    '{"answer": true, "colour": "red", "tags": ["a", "b"]}',
]

WEATHER = Tool(
    name="get_weather",
    description="The weather in a city",
    parameters={
        "type": "object",
        "properties": {
            "city": {"type": "string", "maxLength": 12},
            "unit": {"enum": ["c", "f"]},
        },
        "required": ["city", "unit"],
    },
)
TIME = Tool(
    name="get_time",
    description="The time in a time zone",
    parameters={
        "type": "object",
        "properties": {"zone": {"enum": ["utc", "cet"]}},
        "required": ["zone"],
    },
)
#: strings bounded: a random model never closes one on its own
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "note": {"type": "string", "maxLength": 8},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 3},
    },
    "required": ["answer", "colour", "note", "tags"],
    "additionalProperties": False,
}
GREEDY = Sampling(temperature=0, max_tokens=200)
ASK = (ChatMessage("user", "what is the weather in paris?"),)


@pytest.fixture(scope="module")
def json_llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer Llama with a byte-level tokenizer that has all 256 bytes."""
    return write_json_llama(tmp_path_factory.mktemp("json-llama"), texts=TEXTS)


@pytest.fixture(scope="module")
def model(load_model: Any, json_llama_dir: Path) -> LoadedModel:
    return load_model(json_llama_dir, name="json-llama", max_new_tokens=300)


def chat(model: LoadedModel, **fields: Any) -> Any:
    [result] = model.chat([ChatRequest(messages=ASK, sampling=GREEDY, **fields)])
    return result


def test_the_model_declares_what_it_serves(model: LoadedModel) -> None:
    assert {"response_format", "tools"} <= model.chat_features


def test_free_text_is_not_json(model: LoadedModel) -> None:
    # the same model unconstrained: what the constraint has to overcome
    text = chat(model).message.content
    with pytest.raises(ValueError):
        json.loads(text)


def test_json_schema_answers_validate(model: LoadedModel) -> None:
    fmt = ResponseFormat(type="json_schema", schema=SCHEMA, name="answer")
    result = chat(model, response_format=fmt)
    assert result.finish_reason == "stop"
    value = json.loads(result.message.content)
    jsonschema_rs.validate(SCHEMA, value)
    # sampled too, with a seed
    sampled = ChatRequest(
        messages=ASK, sampling=Sampling(temperature=1, seed=7, max_tokens=200), response_format=fmt
    )
    [again] = model.chat([sampled])
    jsonschema_rs.validate(SCHEMA, json.loads(again.message.content))


def test_json_object_answers_are_one_object(model: LoadedModel) -> None:
    result = chat(model, response_format=ResponseFormat(type="json_object"))
    # a random model's keys and strings are long: enough room to close them
    if result.finish_reason == "stop":
        assert isinstance(json.loads(result.message.content), dict)
    else:
        assert result.message.content.lstrip().startswith("{")


def test_required_tool_choice_gives_a_valid_call(model: LoadedModel) -> None:
    result = chat(model, tools=(WEATHER,), tool_choice="required")
    assert result.finish_reason == "tool_calls"
    assert result.message.content == ""
    [call] = result.message.tool_calls
    assert call.name == "get_weather" and call.id.startswith("call_")
    jsonschema_rs.validate(dict(WEATHER.parameters), json.loads(call.arguments))


def test_a_named_tool_is_the_one_called(model: LoadedModel) -> None:
    for tool in (WEATHER, TIME):
        result = chat(model, tools=(WEATHER, TIME), tool_choice="required", tool_name=tool.name)
        [call] = result.tool_calls
        assert call.name == tool.name
        jsonschema_rs.validate(dict(tool.parameters), json.loads(call.arguments))


def test_constrained_and_free_rows_share_a_batch(model: LoadedModel) -> None:
    free = ChatRequest(messages=ASK, sampling=GREEDY)
    forced = ChatRequest(messages=ASK, sampling=GREEDY, tools=(WEATHER,), tool_choice="required")
    [alone] = model.chat([free])
    together = model.chat([free, forced, free])
    assert together[0].message.content == alone.message.content == together[2].message.content
    assert together[1].tool_calls[0].name == "get_weather"


def test_a_call_cut_by_max_tokens_stays_text(model: LoadedModel) -> None:
    short = Sampling(temperature=0, max_tokens=5)
    [result] = model.chat(
        [ChatRequest(messages=ASK, sampling=short, tools=(WEATHER,), tool_choice="required")]
    )
    assert result.finish_reason == "length" and not result.tool_calls


def test_a_streamed_json_answer_is_the_same(model: LoadedModel) -> None:
    fmt = ResponseFormat(type="json_schema", schema=SCHEMA, name="answer")
    request = ChatRequest(messages=ASK, sampling=GREEDY, response_format=fmt)
    chunks = list(model.stream([request]))
    text = "".join(c.text for c in chunks)
    assert text == chat(model, response_format=fmt).message.content
    jsonschema_rs.validate(SCHEMA, json.loads(text))
    with pytest.raises(UsageError) as caught:
        list(model.stream([ChatRequest(messages=ASK, tools=(WEATHER,), tool_choice="required")]))
    assert caught.value.param == "stream" and "answered whole" in caught.value.message


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "no-such-type"},  # refused as it is read
        {"allOf": [{"type": "object"}, {"required": ["a"]}]},  # a keyword it cannot enforce
        {"enum": [1, "a", None]},  # nor mixed enums
        # it gives up half-way, at a reference to nothing: the answer is not JSON
        {"type": "array", "items": {"$ref": "#/$defs/missing"}, "minItems": 1},
    ],
)
def test_a_schema_the_enforcer_cannot_hold_is_a_usage_error(
    model: LoadedModel, schema: dict
) -> None:
    fmt = ResponseFormat(type="json_schema", schema=schema, name="x")
    with pytest.raises(UsageError) as caught:
        chat(model, response_format=fmt)
    assert caught.value.param == "response_format"


def test_one_of_and_const_are_enforced(model: LoadedModel) -> None:
    # pydantic writes const for a Literal; oneOf is read as anyOf
    schema = {
        "type": "object",
        "properties": {
            "kind": {"const": "point", "type": "string"},
            "version": {"const": 2},
            "value": {"oneOf": [{"type": "boolean"}, {"type": "null"}]},
        },
        "required": ["kind", "version", "value"],
        "additionalProperties": False,
    }
    result = chat(model, response_format=ResponseFormat(type="json_schema", schema=schema))
    value = json.loads(result.message.content)
    jsonschema_rs.validate(schema, value)
    assert value["kind"] == "point" and value["version"] == 2


def test_tools_and_calls_are_in_the_prompt(model: LoadedModel) -> None:
    tokenizer = model.tokenizer  # type: ignore[attr-defined]
    call = ToolCall(id="call_1", name="get_weather", arguments='{"city": "Paris", "unit": "c"}')
    messages = (
        ChatMessage("system", "be brief"),
        *ASK,
        ChatMessage("assistant", "", tool_calls=(call,)),
        ChatMessage("tool", "sunny", tool_call_id="call_1"),
    )
    # a template without tools: they go into the system prompt, the call is
    # the assistant's JSON, the tool's answer a user message
    text = tokenizer.decode(tokens.chat_ids(tokenizer, "m", messages, tools=(WEATHER,)))
    assert "<s>system: be brief\n\nYou can call these functions" in text
    assert '"name":"get_weather","description":"The weather in a city"' in text
    assert '<s>assistant: {"name": "get_weather", "arguments": {"city": "Paris"' in text
    assert "<s>user: The function returned: sunny</s>" in text
    # a template with tools renders them itself, and the calls as objects
    tokenizer.chat_template = TOOLS_TEMPLATE
    try:
        text = tokenizer.decode(tokens.chat_ids(tokenizer, "m", messages, tools=(WEATHER,)))
    finally:
        tokenizer.chat_template = CHAT_TEMPLATE
    assert '<s>tools: [{"type": "function", "function": {"name": "get_weather"' in text
    assert "You can call these functions" not in text
    assert '"arguments": {"city": "Paris", "unit": "c"}' in text
    assert "<s>tool: sunny for: call_1</s>" in text


@pytest.mark.parametrize(
    ("text", "names", "content"),
    [
        ('{"name": "get_weather", "arguments": {"city": "Oslo"}}', ["get_weather"], ""),
        ('  ```json\n{"name": "get_time", "arguments": {}}\n```', ["get_time"], ""),
        (
            '[{"name": "get_time", "arguments": {}}, {"name": "get_weather", "parameters": {}}]',
            ["get_time", "get_weather"],
            "",
        ),
        (
            'Let me look.<tool_call>\n{"name": "get_time", "arguments": "{}"}\n</tool_call>',
            ["get_time"],
            "Let me look.",
        ),
        ('{"name": "get_news", "arguments": {}}', [], None),  # not one of the tools
        ('{"city": "Oslo"}', [], None),
        ("It is sunny.", [], None),
        ('{"name": "get_time", "arguments": [1]}', [], None),
    ],
)
def test_tool_calls_are_parsed_from_text(text: str, names: list[str], content: str | None) -> None:
    left, calls = structured.parse_tool_calls(text, (WEATHER, TIME))
    assert [c.name for c in calls] == names
    assert left == (text if content is None else content)
    for call in calls:
        assert isinstance(json.loads(call.arguments), dict)


def test_auto_parses_a_call_and_honours_parallel_tool_calls(model: LoadedModel) -> None:
    # the model answers freely: a forced answer fed back as its text shows the parse
    both = '[{"name": "get_time", "arguments": {"zone": "utc"}}, {"name": "get_time"}]'
    from llmos.types import ChatResult

    result = ChatResult(message=ChatMessage("assistant", both))
    request = ChatRequest(messages=ASK, tools=(WEATHER, TIME))
    assert len(structured.tool_result(result, request).tool_calls) == 2
    one = ChatRequest(messages=ASK, tools=(WEATHER, TIME), parallel_tool_calls=False)
    parsed = structured.tool_result(result, one)
    assert len(parsed.tool_calls) == 1 and parsed.finish_reason == "tool_calls"
    assert json.loads(parsed.tool_calls[0].arguments) == {"zone": "utc"}
    none = ChatRequest(messages=ASK, tools=(WEATHER, TIME), tool_choice="none")
    assert structured.tool_result(result, none) is result


def test_only_schemas_are_rewritten_not_the_data_in_them() -> None:
    schema = {
        "type": "object",
        "default": {"allOf": 1},  # data: neither refused nor rewritten
        "properties": {
            "not": {"const": 3, "examples": [{"oneOf": 1}]},  # a property named "not"
            "b": {"oneOf": [{"type": "null"}], "enum": [{"const": 1}]},
        },
    }
    assert structured._enforceable(schema, "response_format") == {
        "type": "object",
        "default": {"allOf": 1},
        "properties": {
            "not": {"enum": [3], "examples": [{"oneOf": 1}]},
            "b": {"anyOf": [{"type": "null"}], "enum": [{"const": 1}]},
        },
    }


# --------------------------------------------------------------------------
# Over HTTP, with the openai client
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, json_llama_dir: Path) -> Iterator[Any]:
    import openai

    from llmos.config import load_config
    from llmos.runtime.kernel import Kernel
    from llmos.testing import serve_in_thread

    kernel = Kernel(
        load_config(
            env={
                "LLMOS_HOME": str(tmp_path_factory.mktemp("home")),
                "LLMOS_LOAD_PLUGINS": "transformers",
            },
            overrides=[
                "plugins.transformers.threads=1",
                f'registry.allowed_roots=["{json_llama_dir.parent}"]',
                'models.tiny.provider="transformers"',
                f'models.tiny.source="{json_llama_dir}"',
                "models.tiny.options.max_new_tokens=200",
            ],
        )
    )
    with serve_in_thread(kernel, timeout=300) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def test_the_openai_client_reads_tool_calls_and_json(client: Any) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": WEATHER.name,
            "description": WEATHER.description,
            "parameters": dict(WEATHER.parameters),
        },
    }
    messages = [{"role": "user", "content": "what is the weather in paris?"}]
    raw = client.chat.completions.with_raw_response.create(
        model="tiny",
        messages=messages,
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        temperature=0,
    )
    # the first request loaded the model to ask what it serves: a load, not overhead
    assert float(raw.headers["x-llmos-load-ms"]) > 0
    reply = raw.parse()
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None and choice.message.role == "assistant"
    [call] = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather"
    jsonschema_rs.validate(dict(WEATHER.parameters), json.loads(call.function.arguments))
    # the answer's message goes back as it came, with the tool's answer after it
    turn = choice.message.model_dump(exclude_none=True)
    answer = {"role": "tool", "tool_call_id": call.id, "content": "sunny"}
    again = client.chat.completions.create(
        model="tiny", messages=[*messages, turn, answer], temperature=0, max_tokens=5
    )
    assert again.choices[0].message.content and again.choices[0].message.tool_calls is None
    formatted = client.chat.completions.create(
        model="tiny",
        messages=messages,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
        },
        temperature=0,
    )
    jsonschema_rs.validate(SCHEMA, json.loads(formatted.choices[0].message.content))
    streamed = client.chat.completions.create(
        model="tiny",
        messages=messages,
        response_format={"type": "json_schema", "json_schema": {"name": "a", "schema": SCHEMA}},
        temperature=0,
        stream=True,
    )
    text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    assert text == formatted.choices[0].message.content
