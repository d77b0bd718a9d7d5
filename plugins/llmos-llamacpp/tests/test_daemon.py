"""The provider behind the real daemon over HTTP on loopback, with the
official OpenAI client: chat, streaming, completions with logprobs and echo,
embeddings, tool calls and the 400s."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos.types import Capability, ChatMessage, ChatRequest, Sampling

from .conftest import MODEL, make_kernel


@pytest.fixture(scope="module")
def client(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[openai.OpenAI]:
    """A daemon of its own (a fresh data folder) and a client of it."""
    kernel = make_kernel(tmp_path_factory.mktemp("daemon-home"), root)
    try:
        with serve_in_thread(kernel, timeout=120) as url:
            yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=120)
    finally:
        kernel.stop()


def test_chat_and_its_stream_over_http(client: openai.OpenAI, kernel: Kernel) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    reply = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0
    )
    text = reply.choices[0].message.content
    [direct] = kernel.call(
        MODEL,
        Capability.CHAT,
        [
            ChatRequest(
                messages=(ChatMessage("user", messages[0]["content"]),),
                sampling=Sampling(temperature=0, max_tokens=16),
            )
        ],
    )
    assert text and text == direct.message.content
    assert reply.usage.completion_tokens == direct.usage.completion_tokens
    chunks = client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True
    )
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text


def test_completions_with_logprobs_and_echo(client: openai.OpenAI) -> None:
    reply = client.completions.create(
        model=MODEL, prompt="One, two, three,", max_tokens=4, temperature=0, logprobs=2, echo=True
    )
    choice = reply.choices[0]
    assert choice.text.startswith("One, two, three,")
    lp = choice.logprobs
    assert lp.token_logprobs[0] is None
    assert "".join(lp.tokens) == choice.text
    assert all(len(top) == 2 for top in lp.top_logprobs[1:])


def test_embeddings_over_http(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(model=MODEL, input=["a cat", "a dog"])
    assert [len(d.embedding) for d in reply.data] == [576, 576]
    assert reply.usage.prompt_tokens > 0


def test_a_forced_tool_call(client: openai.OpenAI) -> None:
    tool = {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city.",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
    reply = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is the weather in Paris?"}],
        tools=[tool],
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
        max_tokens=40,
        temperature=0,
    )
    [call] = reply.choices[0].message.tool_calls
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)


def test_refusals_are_400s(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError, match="takes at most 4096 tokens"):
        client.completions.create(model=MODEL, prompt="word " * 5000, max_tokens=1)
    with pytest.raises(openai.BadRequestError, match="top_logprobs"):
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "hi"}],
            logprobs=True,
            top_logprobs=30,
        )
