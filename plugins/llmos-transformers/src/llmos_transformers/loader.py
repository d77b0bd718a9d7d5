"""The provider's ``load``: a checked local folder or file in, a served model out.

Order matters for safety and speed: options are merged and checked, the
folder is inspected (pickles refused, the kind decided) — all before torch is
imported — and only then are weights read, with ``use_safetensors=True``,
``local_files_only=True`` and ``trust_remote_code`` only where the operator
allows it. An adapter card (format ``adapter``) is loaded on its base model by
:mod:`llmos_transformers.adapters`.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import structlog

from llmos.errors import UsageError
from llmos.types import Artifacts, LoadedModel, LoadRequest, ModelCard, ModelFormat
from llmos_transformers.layout import Layout, inspect
from llmos_transformers.options import Settings, settings_for

if TYPE_CHECKING:
    import torch

__all__ = ["converted", "load"]

log = structlog.get_logger("llmos.transformers")


def load(request: LoadRequest) -> LoadedModel:
    """Load ``request.card`` from ``request.path`` (see the module docstring)."""
    card = request.card
    if card.format == ModelFormat.ADAPTER:
        from llmos_transformers import adapters

        return adapters.load(request)
    settings = settings_for(card, request.options)
    if request.path is None:
        raise UsageError(
            f"model {card.ref!r}: the transformers provider loads local models only; its"
            f" source {card.source!r} must be a local folder or file (or pkg://). An hf:// or"
            " https:// source needs the network: download it and `llmos models scan` the folder",
            param="source",
        )
    layout = inspect(request.path, settings)
    started = time.perf_counter()

    from llmos_transformers import runtime

    runtime.apply_threads(settings)
    device = runtime.pick_device(settings.device)
    with runtime.quiet_progress():
        layout = converted(layout, card, request.cache_dir, request.artifacts)
        model = _build(request, layout, settings, device)
    log.info(
        "transformers.loaded",
        model=card.ref,
        kind=layout.kind,
        device=str(device),
        dtype=settings.dtype,
        seconds=round(time.perf_counter() - started, 3),
    )
    return model


def converted(
    layout: Layout, card: ModelCard, cache_dir: Path | None, artifacts: Artifacts | None = None
) -> Layout:
    """``layout`` itself, or for a GGUF file the safetensors folder it was
    converted into (once) under ``cache_dir``, or that a shared ``artifacts``
    store holds; ``card`` names the cache entry."""
    if layout.gguf is None:
        return layout
    import attrs

    from llmos_transformers import gguf

    if cache_dir is None:
        raise UsageError(
            f"model {card.ref!r} is a GGUF file, which is converted once into the"
            " provider's cache folder; this load was given none (the kernel gives one)",
            param="source",
        )
    folder = gguf.converted_folder(layout.gguf, cache_dir, card, artifacts)
    return attrs.evolve(layout, folder=folder, gguf=None)


def _build(
    request: LoadRequest, layout: Layout, settings: Settings, device: torch.device
) -> LoadedModel:
    from transformers import AutoModel, AutoModelForCausalLM, AutoModelForSequenceClassification

    from llmos_transformers import runtime

    folder = str(layout.folder)
    kwargs = runtime.pretrained_kwargs(settings)
    tokenizer = runtime.load_tokenizer(layout.folder, settings)
    if layout.kind == "causal":
        from llmos_transformers.causal import CausalLM

        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs).to(device).eval()
        return CausalLM(request.card, model, tokenizer, settings, device)

    from llmos_transformers.encoder import Classifier, Encoder

    if layout.kind == "classifier":
        model = AutoModelForSequenceClassification.from_pretrained(folder, **kwargs)
        return Classifier(request.card, model.to(device).eval(), tokenizer, settings, device)
    model = AutoModel.from_pretrained(folder, **kwargs).to(device).eval()
    return Encoder(request.card, model, tokenizer, settings, device, layout)
