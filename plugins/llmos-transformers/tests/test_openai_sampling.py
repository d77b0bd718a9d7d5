"""OpenAI's sampling semantics on a real model, through the official client
and a real daemon: ``n`` choices that differ when sampling and repeat for the
same seed, temperature 1 when a request leaves it out, and a model's load
reported apart from llmos's overhead.

The model is the tiny random Llama of ``conftest.py``, served as a
``[models.NAME]`` deployment of this plugin.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread

MESSAGES = [{"role": "user", "content": "the cat sat on"}]


@pytest.fixture(scope="module")
def client(llama_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[openai.OpenAI]:
    home = tmp_path_factory.mktemp("home")
    overrides = ["plugins.transformers.threads=1", f'registry.allowed_roots=["{llama_dir}"]']
    # two deployments of one model: "fresh" is loaded by the load test alone
    for name in ("tiny", "fresh"):
        overrides.append(f'models.{name}.provider="transformers"')
        overrides.append(f'models.{name}.source="{llama_dir}"')
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "transformers"},
            overrides=overrides,
        )
    )
    with serve_in_thread(kernel, timeout=300) as url:
        yield openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=300)


def _texts(reply: object) -> list[str]:
    return [choice.message.content for choice in reply.choices]  # type: ignore[attr-defined]


def test_n_sampled_choices_differ_and_repeat_for_the_same_seed(client: openai.OpenAI) -> None:
    ask = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "temperature": 1, "seed": 7}
    first = _texts(client.chat.completions.create(n=3, **ask))
    assert len(first) == 3
    assert len(set(first)) > 1, first  # the same seed for every choice gave 3 copies of one
    assert _texts(client.chat.completions.create(n=3, **ask)) == first
    # choice 0 keeps the request's seed: n=1 with that seed is the same answer
    assert _texts(client.chat.completions.create(n=1, **ask)) == first[:1]


def test_n_completions_differ_too(client: openai.OpenAI) -> None:
    ask = {"model": "tiny", "prompt": "the cat", "max_tokens": 12, "temperature": 1, "seed": 7}
    first = [c.text for c in client.completions.create(n=3, **ask).choices]
    assert len(set(first)) > 1, first
    assert [c.text for c in client.completions.create(n=3, **ask).choices] == first


def test_n_greedy_choices_are_the_same(client: openai.OpenAI) -> None:
    reply = client.chat.completions.create(
        model="tiny", messages=MESSAGES, max_tokens=12, temperature=0, seed=7, n=3
    )
    texts = _texts(reply)
    assert len(texts) == 3 and len(set(texts)) == 1, texts


def test_a_request_without_temperature_samples_at_1(client: openai.OpenAI) -> None:
    """OpenAI's default: leaving temperature out is temperature 1, not greedy."""
    greedy = _texts(
        client.chat.completions.create(
            model="tiny", messages=MESSAGES, max_tokens=12, temperature=0
        )
    )[0]
    differ = 0
    for seed in range(1, 6):
        ask = {"model": "tiny", "messages": MESSAGES, "max_tokens": 12, "seed": seed}
        default = _texts(client.chat.completions.create(**ask))[0]
        assert default == _texts(client.chat.completions.create(temperature=1, **ask))[0]
        differ += default != greedy
    assert differ > 0


def test_the_first_request_reports_the_load_apart_from_the_overhead(
    client: openai.OpenAI,
) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="fresh", messages=MESSAGES, max_tokens=2, temperature=0
    )
    load = float(raw.headers["x-llmos-load-ms"])
    assert load > 0
    assert float(raw.headers["x-llmos-overhead-ms"]) < load
    again = client.chat.completions.with_raw_response.create(
        model="fresh", messages=MESSAGES, max_tokens=2, temperature=0
    )
    assert float(again.headers["x-llmos-load-ms"]) == 0
