"""Fixtures: a tiny Llama, LoRA adapters tuned by llmos-peft, and a kernel
serving them through both providers — vLLM's real engine, one per session.

Everything runs for real: the plugins are found through their entry points,
the tiny Llama is written with ``save_pretrained`` (a tokenizer trained with
``tokenizers``), the adapters come out of llmos-peft's ``lora`` method, and
the vLLM engine (``enforce_eager``, float32, a 256-token context, a 1 GiB KV
cache) starts once and is shared by every test (20-50 s on 2 cores).

These tests need vLLM, which lives in its own environment (``make
test-vllm``); where it is not installed — the main ``.venv`` of ``make
test`` — they are not collected at all.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Before torch, vLLM or huggingface_hub is imported: no hub, one thread per
# process, a small KV cache for vLLM's CPU worker.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import attrs
import pytest

from llmos.config import load_config
from llmos.logs import configure_logging
from llmos.runtime.kernel import Kernel
from llmos.testing import EventRecorder
from llmos.types import ModelCard, TuningRequest

if importlib.util.find_spec("vllm") is None:
    collect_ignore_glob = ["test_*.py"]

PROVIDERS = "transformers,vllm,peft"
#: the operator's [plugins.vllm] table for every kernel here
VLLM_OPTIONS = [
    'plugins.vllm.dtype="float32"',
    "plugins.vllm.enforce_eager=true",
    "plugins.vllm.max_model_len=256",
    "plugins.vllm.max_lora_rank=8",
    "plugins.vllm.stats_interval_s=0.2",
    "plugins.transformers.threads=1",
]
NAMES = ["anna", "bob", "carl", "dora", "emil", "fay", "gus", "hana", "ivan", "jon", "kim", "lea"]


def sft_data(response: str) -> dict[str, list[dict[str, str]]]:
    """prompt/response rows a tiny model learns in a few steps: ``greet NAME``
    answered by ``response`` with the name in it."""

    def rows(names: list[str]) -> list[dict[str, str]]:
        return [{"prompt": f"greet {n}", "response": response.format(name=n)} for n in names]

    return {"train": rows(NAMES[:8]), "dev": rows(NAMES[8:10]), "test": rows(NAMES[10:])}


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging("warning", fmt="console")


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder every model of these tests lies under (the registry's allowed root)."""
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def tiny_dir(root: Path) -> Path:
    from llmos_vllm.testing import write_tiny_llama

    return write_tiny_llama(root / "tiny-llama")


MakeKernel = Callable[[Path], Kernel]


@pytest.fixture(scope="session")
def make_kernel(root: Path) -> Iterator[MakeKernel]:
    """``make_kernel(home)``: a started kernel with the three plugins found
    through their entry points and an :class:`EventRecorder` (``kernel.recorder``)."""
    kernels: list[Kernel] = []

    def make(home: Path) -> Kernel:
        kernel = Kernel(
            load_config(
                env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": PROVIDERS},
                overrides=[f'registry.allowed_roots=["{root}"]', *VLLM_OPTIONS],
            )
        )
        kernel.load_plugins()
        recorder = EventRecorder()
        kernel.plugins.register(recorder, "recorder")
        kernel.start()
        kernel.recorder = recorder  # type: ignore[attr-defined]
        kernels.append(kernel)
        return kernel

    yield make
    for kernel in kernels:
        kernel.stop()


def tune_lora(
    kernel: Kernel, base: ModelCard, base_path: Path, out: Path, response: str
) -> ModelCard:
    """A LoRA adapter for ``sft`` tuned by llmos-peft's own ``lora`` method on
    ``base``: its card, as the method returns it (provider ``transformers``)."""
    request = TuningRequest(
        base=base,
        task="sft",
        data=sft_data(response),
        hyperparameters={"epochs": 6, "batch_size": 4, "learning_rate": 3e-2, "r": 4},
        base_path=base_path,
        output_dir=out / "output",
        checkpoint_dir=out / "checkpoints",
    )
    return kernel.plugins.tuning_methods["lora"].spec.run(request).card


@pytest.fixture(scope="session")
def kernel(make_kernel: MakeKernel, tiny_dir: Path, root: Path, tmp_path_factory: Any) -> Kernel:
    """The session's kernel: the tiny Llama registered twice, as ``tiny``
    (provider vllm) and ``tiny-hf`` (provider transformers), and two LoRA
    adapters tuned on it by llmos-peft, each registered as llmos-peft made it
    (``lora-a-hf``, ``lora-b-hf``: provider transformers) and again for vLLM
    (``lora-a``, ``lora-b``: provider vllm, the same folder and parents)."""
    kernel = make_kernel(tmp_path_factory.mktemp("home"))
    registry = kernel.registry
    registry.register(ModelCard(name="tiny", provider="vllm", source=str(tiny_dir)))
    base = registry.register(
        ModelCard(name="tiny-hf", provider="transformers", source=str(tiny_dir))
    )
    for name, response in (("lora-a", "hello {name}, nice to see you"), ("lora-b", "bye {name}!")):
        card = tune_lora(kernel, base, tiny_dir, root / name, response)
        registry.register(attrs.evolve(card, name=f"{name}-hf"))
        registry.register(attrs.evolve(card, name=name, provider="vllm"))
    return kernel
