"""GGUF files, converted once into a safetensors folder in the provider's cache.

transformers loads a GGUF file by de-quantizing every tensor (half a minute
for SmolLM2-135M's 98 MB Q4_1 file); the folder it saves loads in seconds.
So the first load converts into ``<cache_dir>/<card name>/<sha256 of the
file>`` and every later load, in any process, reads that folder. The folder
is written under a temporary name and renamed into place, so a reader never
sees half of it and two processes converting at once both end up with one
complete copy. The hash in the name means a changed file is converted again.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import structlog
import torch

from llmos.types import ModelCard
from llmos_transformers.runtime import dtype_kwarg

__all__ = ["MARKER", "convert", "converted_folder", "sha256_of"]

log = structlog.get_logger("llmos.transformers")

#: written last inside a converted folder: its presence means the folder is complete
MARKER = "llmos-converted.json"


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _folder_name(card: ModelCard) -> str:
    return card.name.replace("/", "--")


def converted_folder(gguf: Path, cache_dir: Path, card: ModelCard) -> Path:
    """The safetensors folder converted from ``gguf``, converting it first if
    no complete copy is in ``cache_dir`` yet."""
    digest = sha256_of(gguf)
    target = cache_dir / _folder_name(card) / digest
    if (target / MARKER).is_file():
        log.info("transformers.gguf_cached", model=card.ref, folder=str(target))
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        started = time.perf_counter()
        log.info("transformers.gguf_converting", model=card.ref, file=str(gguf))
        convert(gguf, scratch)
        seconds = time.perf_counter() - started
        (scratch / MARKER).write_text(
            json.dumps(
                {"source": str(gguf), "sha256": digest, "seconds": round(seconds, 3)}, indent=2
            ),
            encoding="utf-8",
        )
        try:
            os.rename(scratch, target)
        except OSError:
            if not (target / MARKER).is_file():  # not a concurrent conversion's copy
                raise
            log.info("transformers.gguf_converted_elsewhere", model=card.ref)
        else:
            log.info("transformers.gguf_converted", model=card.ref, seconds=round(seconds, 1))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    return target


def convert(gguf: Path, out: Path) -> None:
    """De-quantize ``gguf`` into a float32 safetensors model and its tokenizer in ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, local_files_only=True, **dtype_kwarg(torch.float32)
    )
    # The de-quantized model still says it is GGUF-quantized, and
    # save_pretrained refuses such a model; its weights are plain floats now.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
