"""The peft plugin: tuning methods for text classification and SFT.

What it adds:

* tuning methods ``lora``, ``adalora``, ``ia3``, ``prefix`` and ``prompt``
  (PEFT adapters, served by the transformers provider on their base model)
  and ``full`` (every weight trained; a standalone safetensors model), each
  for the tasks ``text-classification`` and ``sft``;
* the command ``llmos peft merge ADAPTER --out DIR``: an adapter folded into
  its base, saved as a standalone model;
* the fusion strategy ``merge``: LoRA adapters of one base merged in weight
  space into one LoRA adapter (:mod:`llmos_peft.fusion`).

This module imports neither torch nor peft: a method imports them when it
runs, in the job manager's worker process, and the merge strategy when it
merges.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

from llmos.plugin import hookimpl
from llmos.types import (
    CommandSpec,
    FusionStrategySpec,
    TuningMethodSpec,
    TuningRequest,
    TuningResult,
)
from llmos_peft.options import METHODS, TASKS, defaults

__all__ = ["PLUGIN", "check", "run"]

#: the plugin's name: its entry-point name in pyproject.toml
PLUGIN = "peft"


def run(method: str, request: TuningRequest) -> TuningResult:
    """Run ``method`` on ``request`` (see :mod:`llmos_peft.tune`)."""
    from llmos_peft.tune import run as tune

    return tune(method, request)


def check(method: str, task: str, hyperparameters: Mapping[str, Any]) -> None:
    """Check a job's hyper-parameters at submission (imports peft)."""
    from llmos_peft.peft_config import check as check_options

    check_options(method, task, hyperparameters)


@hookimpl
def llmos_register_tuning_methods(register: Callable[[TuningMethodSpec], None]) -> None:
    for method, description in METHODS.items():
        register(
            TuningMethodSpec(
                name=method,
                run=functools.partial(run, method),
                description=description,
                tasks=TASKS,
                defaults=defaults(method),
                check=functools.partial(check, method),
            )
        )


@hookimpl
def llmos_register_commands(register: Callable[[CommandSpec], None]) -> None:
    from llmos_peft.commands import peft_group

    register(CommandSpec(command=peft_group))


@hookimpl
def llmos_register_fusion_strategies(register: Callable[[FusionStrategySpec], None]) -> None:
    from llmos_peft import fusion  # light: torch and peft only once it merges

    register(
        FusionStrategySpec(
            name=fusion.STRATEGY,
            description=(
                "LoRA adapters of one base merged in weight space into one LoRA adapter"
                " (PEFT's add_weighted_adapter: cat, linear, ties, dare_*, *_svd …);"
                " a classifier's heads are averaged"
            ),
            merge=fusion.merge,
            check=fusion.check,
        )
    )
