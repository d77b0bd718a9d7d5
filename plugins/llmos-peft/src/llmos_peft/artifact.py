"""The result of a job: its folder (weights, tokenizer, record) and its card."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from llmos.errors import LlmosError
from llmos.registry.weights import PICKLE_SUFFIXES
from llmos.types import ModelCard, ModelFormat, TuningRequest
from llmos_peft.options import CLASSIFICATION, METHODS
from llmos_transformers.adapters import TUNING_RECORD

__all__ = ["TUNING_RECORD", "card_for", "card_name", "write"]


def card_name(request: TuningRequest, method: str, given: str | None) -> str:
    return given or f"{request.base.name}-{method}"


def write(output_dir: Path, method: str, model: Any, tokenizer: Any) -> int:
    """Save the adapter (or the whole model, for ``full``) and the tokenizer
    into ``output_dir`` as safetensors; returns the weights' size in bytes."""
    output_dir.mkdir(parents=True, exist_ok=True)
    if method == "full":
        model.save_pretrained(output_dir)  # transformers 5 writes safetensors only
    else:
        model.save_pretrained(output_dir, safe_serialization=True)
    tokenizer.save_pretrained(output_dir)
    pickles = sorted(
        str(p.relative_to(output_dir))
        for p in output_dir.rglob("*")
        if p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:  # the job manager would refuse the artifact; say why here
        raise LlmosError(f"saving wrote pickle files ({', '.join(pickles)}); nothing is kept")
    return sum(p.stat().st_size for p in output_dir.glob("*.safetensors"))


def write_record(output_dir: Path, record: Mapping[str, Any]) -> None:
    (output_dir / TUNING_RECORD).write_text(
        json.dumps(record, indent=2, default=str), encoding="utf-8"
    )


def card_for(
    request: TuningRequest,
    method: str,
    name: str,
    labels: Sequence[str],
    scores: Mapping[str, float],
    parameters: int,
) -> ModelCard:
    """The tuned model's card. ``options`` are the transformers provider's:
    ``task`` is the head it loads (``classifier`` or ``causal``), ``labels``
    the classifier's label names in head order, ``method`` for the record."""
    classification = request.task == CLASSIFICATION
    options: dict[str, Any] = {
        "method": method,
        "task": "classifier" if classification else "causal",
    }
    if classification:
        options["labels"] = list(labels)
    base = request.base
    return ModelCard(
        name=name,
        provider="transformers",
        source=str(request.output_dir) if request.output_dir is not None else "",
        format=ModelFormat.SAFETENSORS if method == "full" else ModelFormat.ADAPTER,
        tasks=(request.task,),
        family=base.family,
        parameters=parameters,
        license=base.license,
        description=f"{METHODS[method].split(':')[0]} of {base.ref} for {request.task}",
        tags=("tuned", method),
        scores=dict(scores),
        parents=(base.ref,),
        options=options,
    )
