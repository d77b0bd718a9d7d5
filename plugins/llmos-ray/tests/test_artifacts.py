"""A model kept in the artifact store at a URL root (as ``s3://…`` is on a
cluster): each replica fetches it into its own node's verified cache; the
daemon's copy is never needed."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from llmos.registry.fsstore import ArtifactStore
from llmos.registry.sources import SourcePolicy
from llmos.types import Capability, CompletionRequest, ModelCard, Sampling

from .conftest import tiny_spec


def test_a_model_in_a_url_artifact_store_is_fetched_by_its_replicas(
    executor: Any, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> None:
    root = tmp_path_factory.mktemp("bucket").as_uri()  # file://…: a URL root, fetched from
    store = ArtifactStore(
        root=root,
        cache=tmp_path_factory.mktemp("daemon-cache"),
        limits=SourcePolicy(allowed_roots=()),
    )
    url = store.put(tiny_dir, "tiny-art")
    daemon_cache = sorted(store.cache.rglob("*"))  # what putting it left here
    card = ModelCard(name="tiny-art", provider="transformers", source=url)
    # no path from the daemon: the replicas have only the store and the address
    request = attrs.evolve(tiny_spec("tiny-art", tiny_dir), card=card, path=None, artifacts=store)
    model = executor.place(request)
    try:
        greedy = CompletionRequest(prompt="the cat", sampling=Sampling(max_tokens=8, temperature=0))
        (answer,) = model.submit(Capability.COMPLETE, [greedy]).result(120)
        assert answer.text
        digest = url.rsplit("/", 1)[1]
        fetched = Path(executor.home) / "cache" / "artifacts" / digest
        assert (fetched / "config.json").is_file(), "fetched into the replicas' own cache"
        assert sorted(store.cache.rglob("*")) == daemon_cache, "the daemon's cache was not used"
    finally:
        model.close()
