"""The methods, their tasks, and their hyper-parameters: defaults and checks.

Nothing here imports torch or peft, so the plugin can register its methods
(with their defaults) when ``llmos plugins`` runs. A job's hyper-parameters
are of two kinds:

* **training** options, the same for every method (:data:`TRAINING`);
* **PEFT** options: any field of the method's PEFT config (``r``,
  ``lora_alpha``, ``target_modules``, ``num_virtual_tokens`` …), whose names
  :mod:`llmos_peft.peft_config` reads from peft itself when the job runs.

:func:`resolve` splits a job's hyper-parameters into the two, fills in the
defaults, refuses an unknown key with the list of valid ones and a training
option outside its :class:`Range`; :func:`check_peft_ranges` does the same for
the numeric PEFT options (:data:`PEFT_RANGES`). Every number has both bounds.
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
    "LEARNING_RATES",
    "METHODS",
    "PEFT_DEFAULTS",
    "PEFT_RANGES",
    "SFT",
    "TASKS",
    "TRAINING",
    "Option",
    "Range",
    "Resolved",
    "check_peft_ranges",
    "defaults",
    "learning_rate",
    "ranges",
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

#: a method's learning rate for each task, when the job names none: few
#: trained weights take larger steps; IA3's scales and the virtual tokens
#: start far from where they end up. Text classification's were measured
#: (``bench/tuning_defaults_sweep.py``: MiniLM, 3,000 SST-2 phrases, the best
#: of a grid on 500 dev rows, scored on 1,000 others): the classifier's head
#: starts from random weights and trains at the adapter's rate, and at the
#: 2e-4 usual for LoRA it had not caught up after 3 epochs (0.805 held out).
#: AdaLoRA needs more than LoRA: its update is B·diag(E)·A with E (the
#: singular values) starting at zero and A, B at std 0.02, so each AdamW step
#: moves it far less than a step of LoRA's B does; at 2e-3 it was at 0.58 dev
#: after one epoch and ended 5.2 points under LoRA; at 1e-2 it is within 2
#: points of LoRA on dev and held-out rows on both seeds measured (5e-3 was
#: 2.4 under on one; 2e-2 is lower on both).
#: sft keeps the usual rates: a causal LM's head is its own, already trained.
LEARNING_RATES: dict[str, dict[str, float]] = {
    CLASSIFICATION: {
        "lora": 2e-3,
        "adalora": 1e-2,
        "ia3": 1e-2,
        "prefix": 1e-2,
        "prompt": 1e-2,
        "full": 5e-5,
    },
    SFT: {
        "lora": 2e-4,
        "adalora": 2e-4,
        "ia3": 3e-3,
        "prefix": 1e-2,
        "prompt": 1e-2,
        "full": 5e-5,
    },
}


def learning_rate(method: str, task: str) -> float:
    """The learning rate a ``method`` job for ``task`` takes when it names none."""
    return LEARNING_RATES[task][method]


# --------------------------------------------------------------------------
# Checks
# --------------------------------------------------------------------------


def _shown(number: float) -> str:
    """``256``, ``0.5``, ``1e-06``: a bound as a user would type it."""
    return str(int(number)) if float(number).is_integer() else repr(number)


def _given(value: Any) -> str:
    """A value as a message shows it: its repr, cut short (a 400-digit number)."""
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}..."


@attrs.frozen
class Range:
    """The values a numeric hyper-parameter may take.

    Every number has both bounds: the lower one refuses what makes no sense
    (a rank of -1, no epochs), the upper one what would hurt the machine
    before it taught the model anything (a rank of a million, a batch of a
    million rows). ``open_low`` / ``open_high`` leave the bound itself out.
    """

    low: float
    high: float
    integer: bool = False
    open_low: bool = False
    open_high: bool = False
    #: ``None`` is a value too (the option is off or decided later)
    none: bool = False

    def describe(self) -> str:
        """``between 1 and 256``, ``> 0 and <= 1``: what the messages and docs say."""
        if not self.open_low and not self.open_high:
            text = f"between {_shown(self.low)} and {_shown(self.high)}"
        else:
            low = f"{'>' if self.open_low else '>='} {_shown(self.low)}"
            high = f"{'<' if self.open_high else '<='} {_shown(self.high)}"
            text = f"{low} and {high}"
        return text + (" (or null)" if self.none else "")

    def contains(self, value: Any) -> bool:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return False
        if self.integer and not isinstance(value, int):
            return False
        if isinstance(value, float) and not math.isfinite(value):
            return False  # (an int is finite, and too large for a float past 1e308)
        above = value > self.low if self.open_low else value >= self.low
        below = value < self.high if self.open_high else value <= self.high
        return above and below

    def __call__(self, name: str, value: Any) -> Any:
        """Check ``value``; return it (a float for a number range)."""
        if value is None and self.none:
            return None
        if not self.contains(value):
            kind = "an integer" if self.integer else "a number"
            raise UsageError(
                f"hyper-parameter {name} must be {kind} {self.describe()}, got {_given(value)}",
                param=name,
            )
        return value if self.integer else float(value)


def _int(low: int, high: int, none: bool = False) -> Range:
    return Range(low, high, integer=True, none=none)


def _float(low: float, high: float, *, open_low: bool = False, open_high: bool = False) -> Range:
    return Range(low, high, open_low=open_low, open_high=open_high)


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


#: the most steps a schedule option (``save_steps``, AdaLoRA's ``tinit`` …) names
MAX_STEPS = 10_000_000

#: training options, shared by every method (``learning_rate``'s default is per
#: method and task: :data:`LEARNING_RATES`). The upper bounds stop what would
#: hurt the machine before it taught the model anything: a batch of more than
#: 1,024 rows, rows of more than 8,192 tokens (the loop trains in float32
#: without gradient checkpointing; a model's own context cuts shorter when it
#: is shorter), more than 100 epochs, more than 20 step checkpoints on disk
#: (``full`` keeps the whole model in each).
TRAINING: dict[str, Option] = {
    "name": Option(None, _name, "the tuned model's name; default <base>-<method>"),
    "epochs": Option(3, _int(1, 100), "passes over the train split"),
    "batch_size": Option(16, _int(1, 1024), "train rows per optimizer step"),
    "eval_batch_size": Option(32, _int(1, 1024), "rows per forward pass when evaluating"),
    "learning_rate": Option(
        None, _float(0, 1, open_low=True), "AdamW's peak learning rate (default: method's, task's)"
    ),
    "weight_decay": Option(0.0, _float(0, 1), "AdamW's decoupled weight decay"),
    "warmup_ratio": Option(
        0.06, _float(0, 1, open_high=True), "share of the steps the rate rises linearly"
    ),
    "max_grad_norm": Option(1.0, _float(0, 1000), "gradient norm clipping; 0 turns it off"),
    "max_length": Option(128, _int(8, 8192), "tokens per row (longer rows are cut)"),
    "save_steps": Option(
        200, _int(0, MAX_STEPS), "checkpoint every N steps (and at each epoch's end)"
    ),
    "save_total_limit": Option(
        2, _int(1, 20), "step checkpoints kept (the best weights always are)"
    ),
    "report_steps": Option(10, _int(1, MAX_STEPS), "report progress every N steps"),
    "early_stopping_patience": Option(
        None, _int(1, 100, none=True), "stop after N epochs without a better dev metric"
    ),
    "metric": Option(None, _metric, "the dev score early stopping and best weights follow"),
    "min_delta": Option(0.0, _float(0, 1000), "how much better the metric must get to count"),
    "load_best": Option(True, _bool(), "end with the weights of the best dev epoch"),
    "device": Option("auto", _device, "cpu, cuda, cuda:N or auto (cuda when there is one)"),
    "threads": Option(
        None, _int(1, 256, none=True), "torch threads in the worker (torch's default)"
    ),
    "chat_template": Option(
        None, _bool(none=True), "sft: format rows with the chat template (default: if any)"
    ),
}

#: a LoRA rank: past 256 an adapter costs what full tuning does and learns no more
RANK = _int(1, 256)
#: LoRA's scale is alpha / r (alpha / sqrt(r) with rsLoRA): 0 or less undoes the update
ALPHA = _int(1, 1024)
DROPOUT = _float(0, 1, open_high=True)
#: virtual tokens take the model's positions before the input's
VIRTUAL_TOKENS = _int(1, 512)

#: the ranges of the methods' numeric PEFT options; the other PEFT options are
#: checked for their type, and by peft itself when the config is built
PEFT_RANGES: dict[str, dict[str, Range]] = {
    "lora": {
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": DROPOUT,
        "qalora_group_size": _int(1, 4096),
    },
    "adalora": {
        "init_r": RANK,
        "target_r": RANK,
        "r": RANK,
        "lora_alpha": ALPHA,
        "lora_dropout": DROPOUT,
        "qalora_group_size": _int(1, 4096),
        "tinit": _int(0, MAX_STEPS),
        "tfinal": _int(0, MAX_STEPS),
        "deltaT": _int(1, MAX_STEPS),
        "beta1": _float(0, 1, open_high=True),
        "beta2": _float(0, 1, open_high=True),
        "orth_reg_weight": _float(0, 100),
    },
    "ia3": {},
    "prefix": {"num_virtual_tokens": VIRTUAL_TOKENS, "encoder_hidden_size": _int(1, 16384)},
    "prompt": {"num_virtual_tokens": VIRTUAL_TOKENS},
    "full": {},
}

#: PEFT options that map module names to ranks or alphas: each value has the range
_PATTERNS = {"rank_pattern": RANK, "alpha_pattern": ALPHA}


def check_peft_ranges(method: str, options: Mapping[str, Any]) -> None:
    """Refuse a numeric PEFT option outside its range (see :data:`PEFT_RANGES`).

    Types are checked first (:mod:`llmos_peft.peft_config`), so a value
    here is of the right kind, or ``None`` where peft allows it.
    """
    ranges = PEFT_RANGES.get(method, {})
    for key, value in options.items():
        if key in ranges and value is not None:
            ranges[key](key, value)
        elif key in _PATTERNS and isinstance(value, Mapping):
            for module, number in value.items():
                _PATTERNS[key](f"{key}[{module!r}]", number)
    if method == "adalora":
        init_r, target_r = options.get("init_r"), options.get("target_r")
        if isinstance(init_r, int) and isinstance(target_r, int) and target_r > init_r:
            raise UsageError(
                f"hyper-parameter target_r ({target_r}) must be at most init_r ({init_r}):"
                " AdaLoRA prunes ranks from init_r down to target_r",
                param="target_r",
            )


def ranges(method: str) -> dict[str, str]:
    """Every numeric hyper-parameter of ``method`` and its range, described."""
    out = {
        key: option.check.describe()
        for key, option in TRAINING.items()
        if isinstance(option.check, Range)
    }
    out.update({key: r.describe() for key, r in PEFT_RANGES[method].items()})
    return out


#: the dev scores each task is evaluated with (the first: the default metric)
DEV_SCORES: dict[str, tuple[str, ...]] = {
    CLASSIFICATION: ("dev/accuracy", "dev/macro_f1", "dev/loss"),
    SFT: ("dev/loss", "dev/perplexity"),
}


def defaults(method: str) -> dict[str, Any]:
    """The defaults a method's spec lists: training options that have one,
    and the method's own PEFT options.

    The learning rate is not among them: it depends on the task too
    (:func:`learning_rate`), and a spec's defaults are every job's
    parameters, whatever its task; :func:`resolve` fills it in.
    """
    out = {key: option.default for key, option in TRAINING.items() if option.default is not None}
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
        training["learning_rate"] = learning_rate(method, task)
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
