"""A tuning method's ``run``: a :class:`~llmos.types.TuningRequest` in, the
tuned model's folder and card out.

The steps: check the hyper-parameters, seed every generator from the job's
seed, load the base with the task's head and put the method on it, tokenize
the splits, train (resuming from the job's latest checkpoint), go back to the
best dev epoch's weights, score dev and test, and write the artifact —
safetensors weights, the tokenizer and ``llmos_tuning.json`` — into the
job's output folder.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

import numpy as np
import structlog
import torch

from llmos.errors import LlmosError, UsageError
from llmos.types import TuningRequest, TuningResult, validate_model_name
from llmos_peft import artifact
from llmos_peft.data import Collator, encode_classification, encode_sft
from llmos_peft.model import PROMPT_LEARNING, build, max_tokens
from llmos_peft.options import CLASSIFICATION, Resolved, resolve
from llmos_peft.peft_config import check, settable_keys
from llmos_peft.train import Loop
from llmos_transformers import runtime

__all__ = ["run"]

log = structlog.get_logger("llmos.peft")

SPLITS = ("train", "dev", "test")
#: options that change how a run is watched and kept, not what it computes
_OPERATIONAL = frozenset({"name", "save_steps", "save_total_limit", "report_steps", "threads"})


def seed_everything(seed: int, device: torch.device) -> None:
    """Seed every generator; on a GPU also ask for deterministic kernels
    (process-wide, which the job's worker process is)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)  # every CUDA device too
    if device.type == "cuda":
        # cuBLAS is deterministic only with a fixed workspace, set before its first use
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.backends.cudnn.benchmark = False
        torch.use_deterministic_algorithms(True, warn_only=True)


def _splits(request: TuningRequest) -> dict[str, list[Mapping[str, Any]]]:
    unknown = sorted(set(request.data) - set(SPLITS))
    if unknown:
        raise UsageError(f"unknown data split(s) {', '.join(unknown)}; use train, dev and test")
    splits = {name: list(request.data.get(name) or ()) for name in SPLITS}
    if not splits["train"]:
        raise UsageError("the train split has no rows", param="data")
    return splits


def _labels(request: TuningRequest, train: Sequence[Mapping[str, Any]]) -> tuple[str, ...]:
    labels = tuple(request.labels) or tuple(sorted({str(row.get("label")) for row in train}))
    if len(labels) < 2 or len(set(labels)) != len(labels):
        raise UsageError(
            f"text classification needs two or more distinct labels; got {list(labels)}",
            param="labels",
        )
    return labels


def _fingerprint(
    method: str,
    request: TuningRequest,
    hp: Resolved,
    labels: Sequence[str],
    splits: Mapping[str, Sequence[Mapping[str, Any]]],
) -> str:
    """What makes two runs the same run, so a checkpoint is resumed only by its own."""
    digest = hashlib.sha256()
    described = {
        "method": method,
        "task": request.task,
        "base": request.base.ref,
        "labels": list(labels),
        "seed": request.seed,
        "training": {k: v for k, v in hp.training.items() if k not in _OPERATIONAL},
        "peft": dict(hp.peft),
    }
    digest.update(json.dumps(described, sort_keys=True, default=str).encode())
    for name in SPLITS:
        digest.update(f"\n{name}:".encode())
        for row in splits[name]:
            digest.update(json.dumps(row, sort_keys=True, default=str).encode())
    return digest.hexdigest()


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def run(method: str, request: TuningRequest) -> TuningResult:
    """Tune ``request.base`` with ``method`` (see the module docstring)."""
    started = time.perf_counter()
    # the submission's checks again: a request may come from elsewhere than a job
    check(method, request.task, request.hyperparameters)
    hp = resolve(method, request.task, request.hyperparameters, settable_keys(method))
    name = validate_model_name(artifact.card_name(request, method, hp["name"]))
    sft = request.task != CLASSIFICATION
    splits = _splits(request)
    labels = () if sft else _labels(request, splits["train"])
    if hp["early_stopping_patience"] is not None and not splits["dev"]:
        raise UsageError("early stopping needs dev rows", param="early_stopping_patience")
    if request.output_dir is None:
        raise UsageError("the tuning request names no output folder", param="output_dir")
    if hp["threads"] is not None:
        torch.set_num_threads(hp["threads"])
    device = runtime.pick_device(hp["device"])
    seed_everything(request.seed, device)
    steps_per_epoch = math.ceil(len(splits["train"]) / hp["batch_size"])

    with runtime.quiet_progress():
        built = build(method, request, hp, labels, steps_per_epoch * hp["epochs"])
    model, tokenizer = built.model, built.tokenizer
    max_length = max_tokens(model, method, hp.peft, hp["max_length"])
    if method in PROMPT_LEARNING:
        # the provider cuts requests at the tokenizer's limit: leave the virtual tokens room
        tokenizer.model_max_length = min(
            tokenizer.model_max_length, max_tokens(model, method, hp.peft, 10**9)
        )
    chat = False
    if sft:
        has_template = bool(getattr(tokenizer, "chat_template", None))
        chat = has_template if hp["chat_template"] is None else hp["chat_template"]
        if chat and not has_template:
            raise UsageError(
                "chat_template is true, but the base model's tokenizer has no chat template",
                param="chat_template",
            )
    label_ids = {label: i for i, label in enumerate(labels)}
    encoded = {
        split: (
            encode_sft(tokenizer, rows, max_length, chat, split)
            if sft
            else encode_classification(tokenizer, rows, label_ids, max_length, split)
        )
        for split, rows in splits.items()
    }
    model.to(device)
    loop = Loop(
        model=model,
        method=method,
        sft=sft,
        hp=hp,
        train=encoded["train"],
        dev=encoded["dev"],
        collator=Collator(
            pad_id=int(tokenizer.pad_token_id), sft=sft, padding_side=built.padding_side
        ),
        device=device,
        seed=request.seed,
        fingerprint=_fingerprint(method, request, hp, labels, splits),
        checkpoint_dir=request.checkpoint_dir,
        report=request.report,
        should_stop=request.should_stop,
    )
    progress = loop.run()
    if progress.step == 0:
        # an untrained adapter must never be registered as a tuned model
        raise LlmosError(
            f"{method}: the job trained 0 steps ({len(splits['train'])} train rows,"
            f" {hp['epochs']} epochs); nothing was tuned, so nothing is registered"
        )
    restored = loop.restore_best()
    final_epoch = progress.best_epoch if restored else progress.epochs_done
    scores: dict[str, float] = {}
    dev_entry = next((h for h in progress.history if h["epoch"] == final_epoch), None)
    if encoded["dev"]:
        # the final weights are one evaluated epoch's: its dev scores are theirs
        dev_scores = dev_entry or loop.evaluate(encoded["dev"], "dev")
        scores.update({k: float(v) for k, v in dev_scores.items() if k.startswith("dev/")})
    scores.update(loop.evaluate(encoded["test"], "test"))

    model.eval()
    with runtime.quiet_progress():
        weights_bytes = artifact.write(request.output_dir, method, model, tokenizer)
    trainable = sum(p.numel() for _, p in loop.params)
    total = sum(p.numel() for p in model.parameters())
    seconds = time.perf_counter() - started
    artifact.write_record(
        request.output_dir,
        {
            "method": method,
            "task": request.task,
            "labels": list(labels),
            "base": request.base.ref,
            "base_family": request.base.family,
            "seed": request.seed,
            "hyperparameters": {**hp.training, **built.peft_options},
            "max_length": max_length,
            "padding_side": built.padding_side,
            "chat_template": chat if sft else None,
            "sizes": {split: len(rows) for split, rows in splits.items()},
            "scores": scores,
            "trainable_parameters": trainable,
            "total_parameters": total,
            "adapter_bytes": weights_bytes,
            "steps": progress.step,
            "total_steps": loop.total_steps,
            "epochs_done": progress.epochs_done,
            "best_epoch": progress.best_epoch,
            "final_epoch": final_epoch,
            "stopped_early": progress.stopped_early,
            "resumed_from_step": loop.resumed_from,
            "history": progress.history,
            "device": str(device),
            "seconds": round(seconds, 3),
            "versions": {d: _version(d) for d in ("llmos-peft", "peft", "transformers", "torch")},
        },
    )
    card = artifact.card_for(
        request, method, name, labels, scores, trainable if method != "full" else total
    )
    log.info(
        "peft.tuned",
        method=method,
        task=request.task,
        base=request.base.ref,
        steps=progress.step,
        seconds=round(seconds, 1),
        **{k.replace("/", "_"): round(v, 4) for k, v in scores.items()},
    )
    return TuningResult(card=card, scores=scores)
