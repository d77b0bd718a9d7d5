"""Checkpoints in the job's checkpoint folder, and resuming from the latest.

A checkpoint is a folder ``step-<000000123>`` holding:

* ``weights.safetensors`` — the trained weights (the adapter and any head,
  or the whole model for ``full``);
* ``trainer.pt`` — the optimizer's and scheduler's state and every random
  number generator's (torch, CUDA, Python, NumPy), plus AdaLoRA's rank
  allocator;
* ``state.json`` — where training is (step, epochs done, best dev score,
  patience, history) and the run's fingerprint.

It is written under a hidden name and renamed into place, so a checkpoint
that exists is complete; an interrupted write leaves only a hidden folder,
removed the next time. The best dev epoch's weights are kept apart
(``best-epoch-<n>.safetensors``) for as long as a checkpoint refers to them.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import safetensors.torch
import torch

from llmos.errors import UsageError

__all__ = [
    "Progress",
    "Snapshot",
    "latest",
    "load",
    "load_weights",
    "restore_rng",
    "rng_state",
    "save",
    "save_best",
]

WEIGHTS = "weights.safetensors"
TRAINER = "trainer.pt"
STATE = "state.json"
_STEP = re.compile(r"^step-(\d+)$")


@attrs.define(kw_only=True)
class Progress:
    """Where training is; JSON in ``state.json``."""

    fingerprint: str
    step: int = 0
    epochs_done: int = 0
    best_score: float | None = None
    best_epoch: int | None = None
    #: the file of the best epoch's weights, in the checkpoint folder
    best_weights: str | None = None
    #: epochs in a row without a better dev metric
    bad_epochs: int = 0
    #: the current epoch's summed train loss and its steps (for its mean)
    epoch_loss: float = 0.0
    epoch_steps: int = 0
    stopped_early: bool = False
    #: one entry per evaluated epoch (epoch 0: before training)
    history: list[dict[str, Any]] = attrs.Factory(list)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Snapshot:
    """A checkpoint read back."""

    path: Path
    weights: dict[str, torch.Tensor]
    trainer: dict[str, Any]
    progress: Progress


def rng_state() -> dict[str, Any]:
    """Every random number generator training draws from."""
    name, keys, position, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        # plain lists: loading stays within torch's weights-only unpickler
        "numpy": [name, keys.tolist(), position, has_gauss, cached],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.array(keys, dtype=np.uint32), position, has_gauss, cached))


def _steps(folder: Path) -> list[tuple[int, Path]]:
    found = []
    for path in folder.iterdir() if folder.is_dir() else ():
        match = _STEP.match(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest(folder: Path) -> Path | None:
    """The newest complete checkpoint in ``folder``, or ``None``."""
    steps = _steps(folder)
    return steps[-1][1] if steps else None


def _tensors(weights: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in weights.items()}


def save(
    folder: Path,
    weights: Mapping[str, torch.Tensor],
    trainer: Mapping[str, Any],
    progress: Progress,
    keep: int,
) -> Path:
    """Write a checkpoint of ``progress.step``; keep the newest ``keep``."""
    folder.mkdir(parents=True, exist_ok=True)
    target = folder / f"step-{progress.step:09d}"
    scratch = Path(tempfile.mkdtemp(prefix=".writing-", dir=folder))
    try:
        safetensors.torch.save_file(_tensors(weights), str(scratch / WEIGHTS))
        # torch.save pickles: acceptable only because this folder is the job's
        # private checkpoint folder, written by llmos itself, and it is read
        # back with torch.load(weights_only=True), which builds tensors and
        # plain containers and runs no code. Nothing here is ever an artifact.
        torch.save(dict(trainer), scratch / TRAINER)
        (scratch / STATE).write_text(json.dumps(progress.to_dict(), indent=2), encoding="utf-8")
        if target.exists():  # the same step again (a run stopped right after resuming)
            shutil.rmtree(target)
        os.rename(scratch, target)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    _prune(folder, keep)
    return target


def _prune(folder: Path, keep: int) -> None:
    steps = _steps(folder)
    for _, path in steps[:-keep]:
        shutil.rmtree(path, ignore_errors=True)
    wanted = set()
    for _, path in steps[-keep:]:
        state = json.loads((path / STATE).read_text(encoding="utf-8"))
        if state.get("best_weights"):
            wanted.add(state["best_weights"])
    for path in folder.glob("best-epoch-*.safetensors"):
        if path.name not in wanted:
            path.unlink(missing_ok=True)
    for path in folder.glob(".writing-*"):
        shutil.rmtree(path, ignore_errors=True)


def save_best(folder: Path, weights: Mapping[str, torch.Tensor], epoch: int) -> str:
    """Keep the weights of the best epoch so far; returns the file's name."""
    folder.mkdir(parents=True, exist_ok=True)
    name = f"best-epoch-{epoch}.safetensors"
    scratch = folder / f".writing-{name}"
    safetensors.torch.save_file(_tensors(weights), str(scratch))
    os.replace(scratch, folder / name)
    return name


def load_weights(path: Path) -> dict[str, torch.Tensor]:
    return safetensors.torch.load_file(str(path))


def load(path: Path, fingerprint: str) -> Snapshot:
    """Read the checkpoint at ``path``; refuse one of a different run."""
    state = json.loads((path / STATE).read_text(encoding="utf-8"))
    progress = Progress(**state)
    if progress.fingerprint != fingerprint:
        raise UsageError(
            f"the checkpoint {path} is of another run (a different method, base model, data,"
            " labels, seed or hyper-parameters); resume with the same job, or give this one an"
            " empty checkpoint folder"
        )
    trainer = torch.load(path / TRAINER, map_location="cpu", weights_only=True)
    return Snapshot(
        path=path, weights=load_weights(path / WEIGHTS), trainer=trainer, progress=progress
    )
