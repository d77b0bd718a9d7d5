"""LoRA adapters multiplexed on their base model's replicas (Serve model
multiplexing): one Serve application, each adapter answering as it does when
the provider loads it in process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import attrs
import pytest

from llmos.plugin.manager import PluginManager
from llmos.types import (
    Capability,
    CompletionRequest,
    LoadRequest,
    ModelCard,
    ModelFormat,
    PlacementRequest,
    Sampling,
)

from .conftest import tiny_spec

REQUEST = CompletionRequest(prompt="the cat", sampling=Sampling(max_tokens=8, temperature=0))


def lora(base_dir: Path, folder: Path, seed: int) -> Path:
    """A LoRA adapter on the tiny Llama, written by PEFT, whose random weights
    visibly change the greedy text."""
    import peft
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = peft.get_peft_model(
        AutoModelForCausalLM.from_pretrained(base_dir),
        peft.LoraConfig(
            task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False
        ),
    )
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.mul_(20)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


@pytest.fixture(scope="module")
def adapters(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> list[PlacementRequest]:
    base = tiny_spec("tiny-base@1", tiny_dir)
    out = []
    for i in range(2):
        folder = lora(tiny_dir, tmp_path_factory.mktemp(f"lora-{i}"), seed=i)
        card = ModelCard(
            name=f"lora-{i}",
            version=1,
            provider="transformers",
            source=str(folder),
            format=ModelFormat.ADAPTER,
            parents=("tiny-base@1",),
        )
        base_card = attrs.evolve(base.card, name="tiny-base", version=1)
        out.append(
            attrs.evolve(
                base,
                key=f"lora-{i}@1",
                card=card,
                path=str(folder),
                base=base_card,
                base_path=str(tiny_dir),
            )
        )
    return out


def in_process(request: PlacementRequest, cache: Path) -> str:
    plugins = PluginManager()
    plugins.load()
    model = plugins.providers["transformers"].spec.load(
        LoadRequest(
            card=request.card,
            options=request.options,
            path=Path(request.path or ""),
            cache_dir=cache,
            base=request.base,
            base_path=Path(request.base_path or ""),
        )
    )
    try:
        return model.complete([REQUEST])[0].text
    finally:
        model.close()


def test_adapters_share_their_bases_replicas_and_answer_as_in_process(
    executor: Any, adapters: list[PlacementRequest], tmp_path: Path
) -> None:
    expected = [in_process(a, tmp_path / "cache") for a in adapters]
    assert expected[0] != expected[1]  # the two adapters do differ
    placed = [executor.place(a) for a in adapters]
    (app,) = {m.app for m in placed}  # one application, the base's
    assert app.startswith("llmos-tiny-base-1-")
    base = executor.place(
        attrs.evolve(
            adapters[0],
            key="tiny-base@1",
            card=adapters[0].base,
            path=adapters[0].base_path,
            base=None,
            base_path=None,
        )
    )
    base_text = base.submit(Capability.COMPLETE, [REQUEST]).result(120)[0].text
    for _ in range(2):  # again: the second time from the replica's multiplexing cache
        for model, want in zip(placed, expected, strict=True):
            assert model.submit(Capability.COMPLETE, [REQUEST]).result(120)[0].text == want
    assert base_text not in expected  # the base answers as itself, not as an adapter
    chunks = list(placed[1].submit_stream(REQUEST))
    assert "".join(c.text for c in chunks) == expected[1]
    base.close()
