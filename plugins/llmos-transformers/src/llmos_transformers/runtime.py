"""Torch-side helpers shared by the model kinds: device, dtype, threads, seeds.

Imported only from the load path, never by :mod:`llmos_transformers.plugin`
at import time: torch takes seconds to import.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import structlog

from llmos.errors import UsageError
from llmos_transformers.options import Settings

if TYPE_CHECKING:
    import torch

__all__ = [
    "apply_threads",
    "dtype_kwarg",
    "ensure_padding",
    "load_tokenizer",
    "pick_device",
    "pretrained_kwargs",
    "quiet_progress",
    "release",
    "seeded",
    "tokenizer_kwargs",
    "torch_dtype",
]

log = structlog.get_logger("llmos.transformers")


def pick_device(setting: str) -> torch.device:
    """The torch device ``setting`` names; ``auto`` is cuda when torch sees one."""
    import torch

    if setting == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise UsageError(
            f"device {setting!r} asked for, but torch sees no CUDA device (this torch is"
            f" {torch.__version__}); use device = 'cpu' or 'auto'",
            param="device",
        )
    return torch.device(setting)


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[name]


def apply_threads(settings: Settings) -> None:
    """``torch.set_num_threads`` when the options name a count (it is process-wide)."""
    if settings.threads is not None:
        import torch

        if torch.get_num_threads() != settings.threads:
            log.info("transformers.threads", threads=settings.threads)
            torch.set_num_threads(settings.threads)


def pretrained_kwargs(settings: Settings) -> dict[str, Any]:
    """Keyword arguments every ``from_pretrained`` of a model gets: local files
    only, safetensors only, remote code only when allowed, and the dtype."""
    return {
        "local_files_only": True,
        "use_safetensors": True,
        "trust_remote_code": settings.trust_remote_code,
        **dtype_kwarg(torch_dtype(settings.dtype)),
    }


def dtype_kwarg(dtype: torch.dtype) -> dict[str, Any]:
    """``from_pretrained``'s dtype keyword: ``dtype`` in transformers 5, else ``torch_dtype``."""
    import transformers

    major = int(transformers.__version__.split(".", 1)[0])
    return {("dtype" if major >= 5 else "torch_dtype"): dtype}


def tokenizer_kwargs(settings: Settings) -> dict[str, Any]:
    return {"local_files_only": True, "trust_remote_code": settings.trust_remote_code}


def load_tokenizer(folder: Path, settings: Settings) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder), **tokenizer_kwargs(settings))


def ensure_padding(model: Any, tokenizer: Any) -> None:
    """Give a tokenizer without a pad token one (its end-of-sequence token, else
    its unknown token) and tell the model, whose sequence-classification head
    finds each row's last token by it. GPT-2-style models batch this way."""
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    if getattr(model.config, "pad_token_id", None) is None:
        model.config.pad_token_id = tokenizer.pad_token_id


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device) -> Iterator[None]:
    """Run the block with torch's RNG seeded by ``seed``, and put the process's
    RNG state back afterwards so that seeding one request disturbs no other."""
    if seed is None:
        yield
        return
    import torch

    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def quiet_progress() -> Iterator[None]:
    """No "Loading weights" progress bars on the terminal while loading: the
    provider logs one line per load instead."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def release() -> None:
    """Give back the memory of a model whose last reference was just dropped."""
    gc.collect()
    import torch

    if torch.cuda.is_available():
        torch.cuda.empty_cache()
