"""A LoRA adapter tuned by one daemon is served by another that shares only
``[artifacts] root`` (issue 17's shared artifacts), with real parts: two
daemons on loopback, each with its own data folder and registry, a real
tuning job (LoRA on the tiny BERT, in a worker process), and fsspec's
``memory://`` as the bucket both daemons point at.

The second daemon is sent the tuned card over HTTP, fetches the adapter into
its own cache (checked and hashed) when the model is first called, and
classifies exactly as the daemon that tuned it.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos.types import ModelCard

from .conftest import sentiment_data

PLUGINS = "transformers,peft"
CARD_FIELDS = (
    "name", "provider", "source", "tasks", "family", "parameters", "format", "license",
    "description", "tags", "scores", "parents", "options",
)  # fmt: skip
TEXTS = ["a great and lovely film", "an awful, dreadful mess", "fine", "poor"]


@pytest.fixture
def daemons(
    bert_card: ModelCard, tmp_path: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, str, str]]:
    """Two daemons' URLs sharing one memory:// root, and the root."""
    root = f"memory://llmos-peft-{uuid.uuid4().hex[:12]}"
    urls = []
    with ExitStack() as stack:
        for name in ("a", "b"):
            kernel = Kernel.from_config(
                overrides=[
                    f"home={str(tmp_path / name)!r}",
                    f"registry.allowed_roots=[{str(tmp_path_factory.getbasetemp())!r}]",
                    f"artifacts.root={root!r}",
                ],
                env={"LLMOS_LOAD_PLUGINS": PLUGINS},
            )
            kernel.registry.register(bert_card)  # tiny-bert@1 in each registry
            urls.append(stack.enter_context(serve_in_thread(kernel)))
        yield urls[0], urls[1], root


def classify(url: str, model: str) -> list[Any]:
    response = httpx.post(f"{url}/api/classify", json={"model": model, "texts": TEXTS}, timeout=120)
    assert response.status_code == 200, response.text
    return list(response.json()["results"])


@pytest.mark.slow
def test_an_adapter_tuned_on_one_daemon_is_served_by_another(
    daemons: tuple[str, str, str], tmp_path: Path
) -> None:
    tuner, server, root = daemons
    body = {
        "model_name": "tiny-bert",
        "method": "lora",
        "data": sentiment_data(16, 8, 8),
        "params": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-2, "threads": 1},
    }
    tuned = httpx.post(f"{tuner}/microtune", json=body, timeout=300)
    assert tuned.status_code == 200, tuned.text
    card = httpx.get(f"{tuner}/api/models/tiny-bert-lora").json()["card"]
    assert card["format"] == "adapter" and card["parents"] == ["tiny-bert@1"]
    assert card["source"].startswith(f"{root}/tiny-bert-lora/"), card["source"]
    expected = classify(tuner, "tiny-bert-lora")

    made = httpx.post(
        f"{server}/api/models", json={k: card[k] for k in CARD_FIELDS if k in card}, timeout=60
    )
    assert made.status_code == 201, made.text
    assert classify(server, "tiny-bert-lora") == expected
    digest = card["source"].rstrip("/").split("/")[-1]
    fetched = tmp_path / "b" / "cache" / "artifacts" / digest
    assert (fetched / "adapter_model.safetensors").is_file()
    assert not (tmp_path / "b" / "artifacts").exists(), "nothing of the adapter is in B's own store"
