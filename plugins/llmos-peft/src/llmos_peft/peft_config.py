"""PEFT configs: which options a job may set, and the config a method trains with.

Imports peft; only a running job (or the merge command) imports this module.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import peft
from peft.utils.constants import (
    TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING,
    TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING,
)

from llmos.errors import UsageError
from llmos_peft.options import CLASSIFICATION, check_peft_ranges, resolve

__all__ = ["CONFIG_CLASSES", "check", "classifier_heads", "make_config", "settable_keys"]

CONFIG_CLASSES: dict[str, type[peft.PeftConfig]] = {
    "lora": peft.LoraConfig,
    "adalora": peft.AdaLoraConfig,
    "ia3": peft.IA3Config,
    "prefix": peft.PrefixTuningConfig,
    "prompt": peft.PromptTuningConfig,
}

#: config fields a job does not set: what the method is, what peft reads off
#: the model, bookkeeping, and what this plugin decides (the step count)
_NOT_SETTABLE = frozenset(
    {
        "task_type",
        "peft_type",
        "auto_mapping",
        "peft_version",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "token_dim",
        "num_transformer_submodules",
        "num_attention_heads",
        "num_layers",
        "tokenizer_name_or_path",
        "total_step",
        "megatron_config",
        "megatron_core",
    }
)

#: modules that are a sequence classifier's head, by the names transformers uses
_HEAD_NAMES = ("pre_classifier", "classifier", "score", "classification_head")


def settable_keys(method: str) -> frozenset[str]:
    """The PEFT config fields a job may set for ``method`` (none for ``full``)."""
    config_class = CONFIG_CLASSES.get(method)
    if config_class is None:
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(config_class)) - _NOT_SETTABLE


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return _is_int(value) or isinstance(value, float)


def _is_str_list(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


#: what a value of a PEFT field of a plain annotation must be, and how to say so
_PLAIN_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "int": (_is_int, "an integer"),
    "float": (_is_number, "a number"),
    "bool": (lambda v: isinstance(v, bool), "true or false"),
    "str": (lambda v: isinstance(v, str), "a string"),
    "list[str]": (_is_str_list, "a list of strings"),
    "Union[list[str], str]": (
        lambda v: isinstance(v, str) or _is_str_list(v),
        "a string or a list of strings",
    ),
}


def _annotation(field: dataclasses.Field[Any]) -> tuple[str, bool]:
    """A field's annotation as text without ``Optional``, and whether None is allowed."""
    text = field.type if isinstance(field.type, str) else repr(field.type)
    text = text.replace("typing.", "").replace("<class '", "").replace("'>", "")
    if text.startswith("Optional[") and text.endswith("]"):
        return text[len("Optional[") : -1], True
    return text, False


def _check_types(method: str, options: Mapping[str, Any]) -> None:
    """Refuse a PEFT option whose value is plainly of the wrong type.

    peft's dataclasses do not check types, so ``r = "8"`` would only fail
    deep inside training; fields with richer annotations are left to peft.
    """
    fields = {f.name: f for f in dataclasses.fields(CONFIG_CLASSES[method])}
    for key, value in options.items():
        text, optional = _annotation(fields[key])
        if value is None and optional:
            continue
        expected = _PLAIN_TYPES.get(text)
        if expected is not None and not expected[0](value):
            raise UsageError(
                f"{method}: PEFT option {key} must be {expected[1]}"
                f"{' or null' if optional else ''}, got {value!r}",
                param=key,
            )


def check(method: str, task: str, given: Mapping[str, Any]) -> None:
    """Check a job's hyper-parameters when it is submitted.

    Names are checked against the training options and the method's PEFT
    config, values against the training options' ranges, the PEFT fields'
    types and the numeric PEFT options' ranges, and then peft's own checks
    run on a config built from them — everything that can be known before
    the model is loaded. The worker runs it again before it loads anything.
    """
    resolved = resolve(method, task, given, settable_keys(method))
    if method not in CONFIG_CLASSES:
        return
    options = dict(resolved.peft)
    _check_types(method, options)
    check_peft_ranges(method, options)
    if method == "adalora":
        # the job's step count, known when it runs: checked against it then
        options.setdefault("total_step", 2**31)
    if method == "prompt" and options.get("prompt_tuning_init") == "TEXT":
        options["tokenizer_name_or_path"] = "base"  # the base's own folder, when it runs
    task_type = peft.TaskType.SEQ_CLS if task == CLASSIFICATION else peft.TaskType.CAUSAL_LM
    try:
        CONFIG_CLASSES[method](task_type=task_type, **options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{method}: invalid PEFT options: {exc}") from None


def classifier_heads(model: Any) -> list[str]:
    """The names of ``model``'s classification head modules (trained in full)."""
    return [name for name in _HEAD_NAMES if hasattr(model, name)]


def _default_targets(method: str, model_type: str, options: dict[str, Any]) -> None:
    """Fill in peft's per-architecture default targets, so they are on record."""
    if method in ("lora", "adalora") and options.get("target_modules") is None:
        targets = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if targets is None:
            raise UsageError(
                f"{method}: no default target modules for model type {model_type!r}; set the"
                ' hyper-parameter target_modules (e.g. ["q_proj", "v_proj"])',
                param="target_modules",
            )
        options["target_modules"] = list(targets)
    if method == "ia3" and options.get("target_modules") is None:
        targets = TRANSFORMERS_MODELS_TO_IA3_TARGET_MODULES_MAPPING.get(model_type)
        feedforward = TRANSFORMERS_MODELS_TO_IA3_FEEDFORWARD_MODULES_MAPPING.get(model_type)
        if targets is None or feedforward is None:
            raise UsageError(
                f"ia3: no default target modules for model type {model_type!r}; set the"
                " hyper-parameters target_modules and feedforward_modules",
                param="target_modules",
            )
        options["target_modules"] = list(targets)
        options.setdefault("feedforward_modules", list(feedforward))


def make_config(
    method: str,
    task: str,
    model: Any,
    given: Mapping[str, Any],
    total_steps: int,
    base_folder: Path,
) -> peft.PeftConfig:
    """The PEFT config ``method`` trains ``model`` with, from the job's options.

    Defaults by architecture: LoRA and AdaLoRA target what peft lists for the
    model type (``query``/``value`` for BERT, ``q_proj``/``v_proj`` for
    Llama), IA3 its keys, values and feed-forward output; a classifier's head
    is trained in full (``modules_to_save``). AdaLoRA's schedule follows the
    job's step count: rank is reallocated after the first 10 % of the steps
    and fixed for the last 20 %.
    """
    options = dict(given)
    task_type = peft.TaskType.SEQ_CLS if task == CLASSIFICATION else peft.TaskType.CAUSAL_LM
    _default_targets(method, str(getattr(model.config, "model_type", "")), options)
    if task == CLASSIFICATION and options.get("modules_to_save") is None:
        options["modules_to_save"] = classifier_heads(model)
    if method == "adalora":
        total = max(total_steps, 1)
        options["total_step"] = total
        options.setdefault("tinit", total // 10)
        options.setdefault("tfinal", total // 5)
    if method == "prompt" and options.get("prompt_tuning_init") == "TEXT":
        # peft reads the tokenizer to embed the init text: the base's own, on disk
        options["tokenizer_name_or_path"] = str(base_folder)
    try:
        return CONFIG_CLASSES[method](task_type=task_type, **options)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"{method}: invalid PEFT options: {exc}") from None
