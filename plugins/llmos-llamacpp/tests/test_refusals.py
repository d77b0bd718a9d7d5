"""What the provider cannot do is refused with a clear error naming the
field, never served as if it had not been asked."""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.errors import UsageError
from llmos.registry.sources import SourcePolicy, check_source
from llmos.runtime.kernel import Kernel
from llmos.types import (
    Capability,
    CheckRequest,
    CompletionRequest,
    EmbedRequest,
    LoadRequest,
    ModelCard,
    Sampling,
)
from llmos_llamacpp import plugin

from .conftest import MODEL, SMALL

LONG = "the quick brown fox jumps over the lazy dog " * 20


def test_a_prompt_past_the_context_is_refused(kernel: Kernel) -> None:
    with pytest.raises(UsageError) as caught:
        kernel.call(SMALL, Capability.COMPLETE, [CompletionRequest(prompt=LONG)])
    assert "takes at most 64 tokens" in str(caught.value)
    assert caught.value.param == "prompt"
    # an answer is capped by the room the context leaves: never past it
    prompt = ", ".join(str(i) for i in range(1, 16)) + ","  # about 50 tokens; it counts on
    [result] = kernel.call(
        SMALL,
        Capability.COMPLETE,
        [CompletionRequest(prompt=prompt, sampling=Sampling(temperature=0, max_tokens=200))],
    )
    assert result.finish_reason == "length" and result.usage.total_tokens == 64


def test_an_embedding_input_past_its_context_is_refused(kernel: Kernel) -> None:
    with pytest.raises(UsageError, match="embeds at most 512 tokens"):
        kernel.call(MODEL, Capability.EMBED, [EmbedRequest(text=LONG * 3)])


def test_unknown_and_foreign_options_are_refused(kernel: Kernel) -> None:
    card = kernel.registry.store.get(MODEL)
    for options, named in (
        ({"n_ctxx": 512}, "n_ctxx"),
        ({"threads": 2}, "n_threads"),
        ({"n_ctx": 8}, "from 16 to"),
        ({"n_threads": 0}, "n_threads must be an integer"),
        ({"pooling": "max"}, "mean, cls, last"),
    ):
        bad = ModelCard(name="bad", provider="llamacpp", source=card.source, options=options)
        with pytest.raises(UsageError, match=named):
            kernel.registry.register(bad)
    with pytest.raises(UsageError, match="unknown option"):
        plugin.check(CheckRequest(card=card, options={"n_thread": 1}))


def _load(card: ModelCard, root: Path) -> None:
    path = check_source(card.source, SourcePolicy(allowed_roots=(root,))).path
    plugin.load(LoadRequest(card=card, path=path, options={"n_threads": 1}))


def test_sources_that_are_not_gguf_files_are_refused(root: Path) -> None:
    weights = root / "model.safetensors"
    weights.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      ")
    with pytest.raises(UsageError, match=r"not a \.gguf file"):
        _load(ModelCard(name="st", provider="llamacpp", source=str(weights)), root)
    fake = root / "fake.gguf"
    fake.write_bytes(b"PK\x03\x04 not a gguf file")
    with pytest.raises(UsageError, match="GGUF magic"):
        _load(ModelCard(name="fake", provider="llamacpp", source=str(fake)), root)
    empty = root / "empty"
    empty.mkdir()
    with pytest.raises(UsageError, match=r"holds no \.gguf file"):
        _load(ModelCard(name="empty", provider="llamacpp", source=str(empty)), root)
    with pytest.raises(UsageError, match="GGUF files only"):
        plugin.check(
            CheckRequest(card=ModelCard(name="x", provider="llamacpp", format="safetensors"))
        )
