"""The methods, their tasks, and their hyper-parameters: defaults and checks.

Nothing here imports torch or peft, so the plugin can register its methods
(with their defaults) when ``llmos plugins`` runs. A job's hyper-parameters
are of two kinds:

* **training** options, the same for every method (:data:`TRAINING`);
* **PEFT** options: any field of the method's PEFT config (``r``,
  ``lora_alpha``, ``target_modules``, ``num_virtual_tokens`` …), whose names
  :mod:`llmos_peft.peft_config` reads from peft itself when the job runs.

:func:`resolve` splits a job's hyper-parameters into the two, fills in the
defaults and refuses an unknown key with the list of valid ones.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attrs

from llmos.errors import UsageError
from llmos.types import validate_model_name

__all__ = [
    "CLASSIFICATION",
    "DEV_SCORES",
    "METHODS",
    "PEFT_DEFAULTS",
    "SFT",
    "TASKS",
    "TRAINING",
    "Option",
    "Resolved",
    "defaults",
    "resolve",
]

CLASSIFICATION = "text-classification"
SFT = "sft"
TASKS = (CLASSIFICATION, SFT)

#: method → one line for listings
METHODS: dict[str, str] = {
    "lora": "LoRA: low-rank updates of the attention projections (PEFT)",
    "adalora": "AdaLoRA: LoRA whose rank budget is reallocated while training (PEFT)",
    "ia3": "IA3: learned scaling of keys, values and feed-forward activations (PEFT)",
    "prefix": "prefix tuning: learned keys and values every layer attends to (PEFT)",
    "prompt": "prompt tuning: learned virtual tokens before the input (PEFT)",
    "full": "full fine-tuning: every weight of the model is trained",
}

#: the methods' own PEFT options, where they differ from peft's defaults
PEFT_DEFAULTS: dict[str, dict[str, Any]] = {
    "lora": {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
    "adalora": {"init_r": 12, "target_r": 8, "lora_alpha": 16, "lora_dropout": 0.05},
    "ia3": {},
    "prefix": {"num_virtual_tokens": 20},
    "prompt": {"num_virtual_tokens": 20, "prompt_tuning_init": "RANDOM"},
    "full": {},
}

#: a method's learning rate: few trained weights take larger steps; IA3's
#: scales and the virtual tokens start far from where they end up
LEARNING_RATES: dict[str, float] = {
    "lora": 2e-4,
    "adalora": 2e-4,
    "ia3": 3e-3,
    "prefix": 1e-2,
    "prompt": 1e-2,
    "full": 5e-5,
}


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _int(low: int, none: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if value is None and none:
            return None
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise UsageError(
                f"hyper-parameter {name} must be an integer >= {low}"
                f"{' or null' if none else ''}, got {value!r}",
                param=name,
            )
        return value

    return check


def _float(low: float, high: float = math.inf, *, open_low: bool = False) -> Callable[..., Any]:
    def check(name: str, value: Any) -> Any:
        ok = (
            not isinstance(value, bool)
            and isinstance(value, int | float)
            and math.isfinite(value)
            and (value > low if open_low else value >= low)
            and value < high
        )
        if not ok:
            bounds = f"{'>' if open_low else '>='} {low}" + (
                f" and < {high}" if high != math.inf else ""
            )
            raise UsageError(
                f"hyper-parameter {name} must be a number {bounds}, got {value!r}", param=name
            )
        return float(value)

    return check


def _bool(none: bool = False) -> Callable[[str, Any], Any]:
    def check(name: str, value: Any) -> Any:
        if (value is None and none) or isinstance(value, bool):
            return value
        raise UsageError(f"hyper-parameter {name} must be true or false, got {value!r}", param=name)

    return check


def _name(name: str, value: Any) -> Any:
    if value is None:
        return None
    return validate_model_name(value)


def _metric(name: str, value: Any) -> Any:
    if value is None:
        return None
    if not isinstance(value, str) or not value.startswith("dev/"):
        raise UsageError(
            f"hyper-parameter metric must name a dev score such as 'dev/accuracy',"
            f" 'dev/macro_f1' or 'dev/loss'; got {value!r}",
            param=name,
        )
    return value


def _device(name: str, value: Any) -> Any:
    if isinstance(value, str) and (
        value in ("auto", "cpu", "cuda") or (value.startswith("cuda:") and value[5:].isdigit())
    ):
        return value
    raise UsageError(f"hyper-parameter device must be auto, cpu, cuda or cuda:N; got {value!r}")


@attrs.frozen
class Option:
    """A training option: its default (``None``: decided when the job runs) and check."""

    default: Any
    check: Callable[[str, Any], Any]
    help: str


#: training options, shared by every method (``learning_rate``'s default is per method)
TRAINING: dict[str, Option] = {
    "name": Option(None, _name, "the tuned model's name; default <base>-<method>"),
    "epochs": Option(3, _int(0), "passes over the train split (0: evaluate the base only)"),
    "batch_size": Option(16, _int(1), "train rows per optimizer step"),
    "eval_batch_size": Option(32, _int(1), "rows per forward pass when evaluating"),
    "learning_rate": Option(None, _float(0, open_low=True), "AdamW's peak learning rate"),
    "weight_decay": Option(0.0, _float(0), "AdamW's decoupled weight decay"),
    "warmup_ratio": Option(0.06, _float(0, 1), "share of the steps the rate rises linearly"),
    "max_grad_norm": Option(1.0, _float(0), "gradient norm clipping; 0 turns it off"),
    "max_length": Option(128, _int(8), "tokens per row (longer rows are cut)"),
    "save_steps": Option(200, _int(0), "checkpoint every N steps (and at each epoch's end)"),
    "save_total_limit": Option(2, _int(1), "step checkpoints kept (the best weights always are)"),
    "report_steps": Option(10, _int(1), "report progress every N steps"),
    "early_stopping_patience": Option(
        None, _int(1, none=True), "stop after N epochs without a better dev metric"
    ),
    "metric": Option(None, _metric, "the dev score early stopping and best weights follow"),
    "min_delta": Option(0.0, _float(0), "how much better the metric must get to count"),
    "load_best": Option(True, _bool(), "end with the weights of the best dev epoch"),
    "device": Option("auto", _device, "cpu, cuda, cuda:N or auto (cuda when there is one)"),
    "threads": Option(None, _int(1, none=True), "torch threads in the worker (torch's default)"),
    "chat_template": Option(
        None, _bool(none=True), "sft: format rows with the chat template (default: if any)"
    ),
}


#: the dev scores each task is evaluated with (the first: the default metric)
DEV_SCORES: dict[str, tuple[str, ...]] = {
    CLASSIFICATION: ("dev/accuracy", "dev/macro_f1", "dev/loss"),
    SFT: ("dev/loss", "dev/perplexity"),
}


def defaults(method: str) -> dict[str, Any]:
    """The defaults a method's spec lists: training options that have one,
    the learning rate, and the method's own PEFT options."""
    out = {key: option.default for key, option in TRAINING.items() if option.default is not None}
    out["learning_rate"] = LEARNING_RATES[method]
    out.update(PEFT_DEFAULTS[method])
    return out


@attrs.frozen(kw_only=True)
class Resolved:
    """A job's hyper-parameters, checked and completed."""

    training: Mapping[str, Any]
    #: options for the PEFT config (empty for ``full``)
    peft: Mapping[str, Any]

    def __getitem__(self, key: str) -> Any:
        return self.training[key]


def resolve(
    method: str, task: str, given: Mapping[str, Any], peft_keys: Collection[str]
) -> Resolved:
    """Split ``given`` into training and PEFT options over the defaults.

    ``peft_keys`` are the PEFT config fields a job may set for ``method``.
    An unknown key raises :class:`~llmos.errors.UsageError` listing the valid ones.
    """
    if method not in METHODS:
        raise UsageError(f"unknown method {method!r}; one of {', '.join(METHODS)}")
    if task not in TASKS:
        raise UsageError(
            f"method {method!r} tunes for {' or '.join(TASKS)}, not {task!r}", param="task"
        )
    unknown = sorted(set(given) - set(TRAINING) - set(peft_keys))
    if unknown:
        peft_part = (
            f"; {method}'s PEFT options: {', '.join(sorted(peft_keys))}"
            if peft_keys
            else f"; {method} has no PEFT options"
        )
        close = difflib.get_close_matches(unknown[0], [*TRAINING, *peft_keys], n=1)
        hint = f" (did you mean {close[0]}?)" if close else ""
        raise UsageError(
            f"unknown hyper-parameter(s) for {method}: {', '.join(unknown)}{hint}."
            " Training options:"
            f" {', '.join(sorted(TRAINING))}{peft_part}",
            param=unknown[0],
        )
    training: dict[str, Any] = {}
    for key, option in TRAINING.items():
        training[key] = option.check(key, given[key]) if key in given else option.default
    if training["learning_rate"] is None:
        training["learning_rate"] = LEARNING_RATES[method]
    if training["metric"] is None:
        training["metric"] = DEV_SCORES[task][0]
    elif training["metric"] not in DEV_SCORES[task]:
        raise UsageError(
            f"metric {training['metric']!r} is not a dev score of {task}; one of"
            f" {', '.join(DEV_SCORES[task])}",
            param="metric",
        )
    peft = {**PEFT_DEFAULTS[method], **{k: v for k, v in given.items() if k in peft_keys}}
    return Resolved(training=training, peft=peft)
