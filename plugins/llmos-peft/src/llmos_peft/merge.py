"""An adapter folded into its base model: a standalone safetensors folder.

Only methods whose weights fold into the base's can be merged (LoRA, AdaLoRA,
IA3); a prefix or prompt is extra input, not a change of weights.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import attrs

from llmos.errors import UsageError
from llmos.types import ModelCard, ModelFormat
from llmos_transformers import runtime
from llmos_transformers.adapters import (
    MERGEABLE,
    TUNING_RECORD,
    attach,
    base_layout,
    load_base,
    read_adapter,
)
from llmos_transformers.options import Settings, settings_for

__all__ = ["export_merged"]


def export_merged(
    card_path: Path,
    base_path: Path,
    out_dir: Path,
    *,
    card: ModelCard | None = None,
    base: ModelCard | None = None,
    cache_dir: Path | None = None,
) -> Path:
    """Merge the adapter in ``card_path`` into the base at ``base_path`` and
    save the result (weights, tokenizer, a copy of the tuning record) to
    ``out_dir``, which must not exist yet or be empty.

    ``card`` and ``base`` are the registered cards, when known (the adapter's
    labels and head, the base's GGUF options); a GGUF base is converted into
    ``cache_dir`` (a temporary folder when not given).
    """
    card = card or ModelCard(name="adapter", provider="transformers", format=ModelFormat.ADAPTER)
    base = base or ModelCard(name="base", provider="transformers")
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise UsageError(f"{out_dir} exists and is not an empty folder", param="out")
    settings = attrs.evolve(settings_for(card, {}), dtype="float32")
    info = read_adapter(Path(card_path), card, settings)
    if info.peft_type not in MERGEABLE:
        raise UsageError(
            f"{card_path}: a {info.peft_type} adapter cannot be merged into its base (only"
            " LoRA, AdaLoRA and IA3 change the base's weights); serve it as an adapter",
            param="adapter",
        )
    base_settings: Settings = attrs.evolve(
        settings_for(base, {}), dtype="float32", task=None, labels=()
    )
    scratch_cache = None
    if cache_dir is None:
        scratch_cache = Path(tempfile.mkdtemp(prefix="llmos-peft-merge-"))
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    try:
        with runtime.quiet_progress():
            layout = base_layout(Path(base_path), base, base_settings, cache_dir or scratch_cache)
            own = info.folder if (info.folder / "tokenizer_config.json").is_file() else None
            model, tokenizer = load_base(layout, info.kind, base_settings, info.labels, own)
            merged = attach(model, info)
            merged.save_pretrained(staging)
            tokenizer.save_pretrained(staging)
        record = info.folder / TUNING_RECORD
        if record.is_file():
            data = json.loads(record.read_text(encoding="utf-8"))
            data["merged_from"] = str(card_path)
            (staging / TUNING_RECORD).write_text(json.dumps(data, indent=2), encoding="utf-8")
        if out_dir.exists():
            out_dir.rmdir()
        os.rename(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if scratch_cache is not None:
            shutil.rmtree(scratch_cache, ignore_errors=True)
    return out_dir
