"""GGUF conversions shared through the artifact store (``LoadRequest.artifacts``).

Two "daemons" — two cache folders — share only an ``[artifacts] root``
(fsspec's in-process ``memory://``, as a bucket): the first converts the tiny
Llama's GGUF file and puts the folder there under ``gguf-<sha256>``; the
second finds it by the file's hash, fetches it (verified) and serves the same
answers without converting. A root the operator did not name (the data
folder's own) is not used for conversions.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import pytest

from llmos.plugin.manager import PluginManager
from llmos.registry.fsstore import ArtifactStore
from llmos.registry.sources import SourcePolicy
from llmos.types import CompletionRequest, LoadedModel, LoadRequest, ModelCard, Sampling
from llmos_transformers import gguf as gguf_module

GREEDY = Sampling(temperature=0, max_tokens=10)
PROMPTS = [CompletionRequest(prompt=p, sampling=GREEDY) for p in ("the cat", "hello world")]


@pytest.fixture
def load(pm: PluginManager) -> Iterator[Any]:
    spec = pm.providers["transformers"].spec
    loaded: list[LoadedModel] = []

    def run(path: Path, cache_dir: Path, artifacts: ArtifactStore) -> LoadedModel:
        card = ModelCard(name="vendor/tiny-gguf", provider="transformers", source=str(path))
        request = LoadRequest(card=card, path=path, cache_dir=cache_dir, artifacts=artifacts)
        model = spec.load(request)
        loaded.append(model)
        return model

    yield run
    for model in loaded:
        model.close()


def test_a_conversion_is_put_once_and_fetched_by_another_daemon(
    load: Any, llama: Any, gguf_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = f"memory://llmos-gguf-{uuid.uuid4().hex[:12]}"
    limits = SourcePolicy(allowed_roots=())
    first = ArtifactStore(root, tmp_path / "a" / "artifacts", limits)
    second = ArtifactStore(root, tmp_path / "b" / "artifacts", limits)
    expected = [r.text for r in llama.complete(PROMPTS)]

    model = load(gguf_file, tmp_path / "a" / "cache", first)
    assert [r.text for r in model.complete(PROMPTS)] == expected
    digest = gguf_module.sha256_of(gguf_file)
    address = second.lookup(f"gguf-{digest}")
    assert address is not None and address.startswith(f"{root}/vendor/tiny-gguf/")

    def refuse(gguf: Path, out: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_module, "convert", refuse)
    again = load(gguf_file, tmp_path / "b" / "cache", second)
    assert [r.text for r in again.complete(PROMPTS)] == expected
    fetched = tmp_path / "b" / "artifacts" / address.rsplit("/", 1)[1]
    assert (fetched / "model.safetensors").is_file()
    assert not (tmp_path / "b" / "cache" / "vendor--tiny-gguf").exists()


def test_the_default_root_keeps_conversions_in_the_cache_only(
    load: Any, gguf_file: Path, tmp_path: Path
) -> None:
    root = f"memory://llmos-gguf-{uuid.uuid4().hex[:12]}"
    store = ArtifactStore(
        root, tmp_path / "artifacts", SourcePolicy(allowed_roots=()), shared=False
    )
    load(gguf_file, tmp_path / "cache", store)
    digest = gguf_module.sha256_of(gguf_file)
    assert (tmp_path / "cache" / "vendor--tiny-gguf" / digest / gguf_module.MARKER).is_file()
    fs, path = fsspec.core.url_to_fs(root)
    assert not fs.exists(path), "nothing was put in a root the operator did not name"
