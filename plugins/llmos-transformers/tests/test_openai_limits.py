"""``[api] max_tokens`` bounds a request that leaves max_tokens out, on a real
model, through the official client and a real daemon.

Without it such a request got the provider's default: for this plugin, the
rest of the model's context. The model is the tiny random Llama of
``conftest.py``, which never picks an end-of-sequence token, so only the
limit can stop it early.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread

LIMIT = 5


@pytest.fixture(scope="module")
def client(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    kernel = Kernel(
        load_config(
            env={
                "LLMOS_HOME": str(tmp_path_factory.mktemp("home")),
                "LLMOS_LOAD_PLUGINS": "transformers",
            },
            overrides=[
                "plugins.transformers.threads=1",
                f'registry.allowed_roots=["{llama_dir}"]',
                'models.tiny.provider="transformers"',
                f'models.tiny.source="{llama_dir}"',
                f"api.max_tokens={LIMIT}",
            ],
        )
    )
    with serve_in_thread(kernel, timeout=300) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _ask(client: openai.OpenAI, route: str, **extra: Any) -> Any:
    if route == "chat":
        return client.chat.completions.create(
            model="tiny", messages=[{"role": "user", "content": "the cat sat on"}], **extra
        )
    return client.completions.create(model="tiny", prompt="the cat sat on", **extra)


def _text(choice: Any, route: str, *, delta: bool = False) -> str:
    if route == "chat":
        return (choice.delta.content if delta else choice.message.content) or ""
    return choice.text or ""


@pytest.mark.parametrize("route", ["completions", "chat"])
def test_an_omitted_max_tokens_stops_at_api_max_tokens(client: openai.OpenAI, route: str) -> None:
    reply = _ask(client, route, temperature=0)
    (choice,) = reply.choices
    assert choice.finish_reason == "length"
    assert reply.usage.completion_tokens == LIMIT
    # the same text as a request that asks for the limit itself
    asked = _ask(client, route, temperature=0, max_tokens=LIMIT)
    assert _text(choice, route) == _text(asked.choices[0], route)
    assert _text(choice, route)

    events = list(
        _ask(client, route, temperature=0, stream=True, stream_options={"include_usage": True})
    )
    streamed = "".join(_text(e.choices[0], route, delta=True) for e in events if e.choices)
    assert streamed == _text(choice, route)
    assert [e.choices[0].finish_reason for e in events if e.choices][-1] == "length"
    assert events[-1].usage is not None and events[-1].usage.completion_tokens == LIMIT
