"""GGUF files, converted once into a safetensors folder in the provider's cache.

transformers loads a GGUF file by de-quantizing every tensor (half a minute
for SmolLM2-135M's 98 MB Q4_1 file); the folder it saves loads in seconds.
So the first load converts into ``<cache_dir>/<card name>/<sha256 of the
file>`` and every later load, in any process, reads that folder. The folder
is written under a temporary name and renamed into place, so a reader never
sees half of it and two processes converting at once both end up with one
complete copy. The hash in the name means a changed file is converted again.

With a shared artifact store (``[artifacts] root`` set: a bucket, an NFS
mount, handed over as ``LoadRequest.artifacts``) the converted folder is also
put there under the key ``gguf-<sha256 of the file>``, and a daemon that has
not converted the file yet fetches that folder (checked and verified like
any artifact) instead of converting it again.
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

from llmos.errors import LlmosError
from llmos.types import Artifacts, ModelCard
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


def converted_folder(
    gguf: Path, cache_dir: Path, card: ModelCard, artifacts: Artifacts | None = None
) -> Path:
    """The safetensors folder converted from ``gguf``, converting it first if
    no complete copy is in ``cache_dir`` yet, nor in a shared ``artifacts``
    store (where a conversion is put for the other daemons)."""
    digest = sha256_of(gguf)
    target = cache_dir / _folder_name(card) / digest
    if (target / MARKER).is_file():
        log.info("transformers.gguf_cached", model=card.ref, folder=str(target))
        return target
    shared = artifacts if artifacts is not None and artifacts.shared else None
    key = f"gguf-{digest}"
    if shared is not None:
        address = shared.lookup(key)
        if address is not None:
            folder = shared.fetch(address)
            log.info("transformers.gguf_shared", model=card.ref, address=address)
            return folder
    _convert_into(gguf, target, card, digest)
    if shared is not None:
        try:
            shared.put(target, card.name, key=key)
        except LlmosError as exc:  # the model still loads; the next daemon converts too
            log.warning("transformers.gguf_not_shared", model=card.ref, error=exc.message)
    return target


def _convert_into(gguf: Path, target: Path, card: ModelCard, digest: str) -> None:
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
