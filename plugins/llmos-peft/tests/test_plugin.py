"""Registration, a light import, and the hyper-parameter checks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmos.errors import UsageError
from llmos.plugin.manager import HOOK_NAMES, PluginManager
from llmos.types import ModelCard
from llmos_peft.options import CLASSIFICATION, LEARNING_RATES, METHODS, TASKS, TRAINING, resolve
from llmos_peft.peft_config import settable_keys

from .conftest import sentiment_data


def test_the_entry_point_registers_six_methods_for_two_tasks(pm: PluginManager) -> None:
    info = {i.name: i for i in pm.plugins()}["peft"]
    assert info.distribution == "llmos-peft"
    assert set(info.hooks) <= HOOK_NAMES
    methods = {name: r.spec for name, r in pm.tuning_methods.items() if r.plugin == "peft"}
    assert set(methods) == {"lora", "adalora", "ia3", "prefix", "prompt", "full"}
    for spec in methods.values():
        assert spec.tasks == ("text-classification", "sft")
        assert spec.defaults["epochs"] == 3 and spec.defaults["batch_size"] == 16
        assert spec.defaults["max_length"] == 128
    assert {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05}.items() <= methods[
        "lora"
    ].defaults.items()
    # per method and task, so filled in when the job runs (see the README test below)
    assert all("learning_rate" not in spec.defaults for spec in methods.values())
    assert "r" not in methods["full"].defaults
    assert "peft" in pm.commands


def test_importing_the_plugin_imports_neither_torch_nor_peft() -> None:
    code = (
        "import sys, llmos_peft.plugin;"
        "heavy = [m for m in ('torch', 'peft', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_an_unknown_hyper_parameter_names_the_valid_ones() -> None:
    with pytest.raises(UsageError) as caught:
        resolve("lora", "sft", {"rank": 4}, settable_keys("lora"))
    message = str(caught.value)
    assert "unknown hyper-parameter(s) for lora: rank" in message
    for valid in ("learning_rate", "epochs", "r", "lora_alpha", "target_modules"):
        assert valid in message
    with pytest.raises(UsageError, match="full has no PEFT options"):
        resolve("full", "sft", {"r": 4}, settable_keys("full"))


def test_peft_options_pass_through_and_values_are_checked() -> None:
    hp = resolve(
        "lora",
        "text-classification",
        {"r": 16, "lora_alpha": 32, "target_modules": ["query"], "epochs": 1},
        settable_keys("lora"),
    )
    assert hp.peft == {"r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "target_modules": ["query"]}
    assert hp["epochs"] == 1 and hp["learning_rate"] == LEARNING_RATES[CLASSIFICATION]["lora"]
    assert hp["metric"] == "dev/accuracy"
    sft = resolve("lora", "sft", {}, settable_keys("lora"))
    assert sft["metric"] == "dev/loss" and sft["learning_rate"] == 2e-4
    assert resolve("lora", "sft", {"learning_rate": 5e-3}, ())["learning_rate"] == 5e-3
    for bad in ({"epochs": -1}, {"learning_rate": 0}, {"batch_size": 1.5}, {"metric": "loss"}):
        with pytest.raises(UsageError, match="hyper-parameter"):
            resolve("lora", "sft", bad, settable_keys("lora"))
    with pytest.raises(UsageError, match="not a dev score of text-classification"):
        resolve("lora", "text-classification", {"metric": "dev/perplexity"}, ())
    assert set(TRAINING) & settable_keys("adalora") == set()
    assert {"num_virtual_tokens", "prompt_tuning_init"} <= settable_keys("prompt")
    assert "total_step" not in settable_keys("adalora")  # decided from the step count
    assert set(METHODS) and TASKS == ("text-classification", "sft")


def test_run_refuses_bad_hyper_parameters_before_loading_anything(
    tune: Any, bert_card: ModelCard, bert_dir: Path
) -> None:
    with pytest.raises(UsageError, match="unknown hyper-parameter"):
        tune("lora", bert_card, bert_dir, sentiment_data(), alpha=3)
    with pytest.raises(UsageError, match="invalid PEFT options"):
        tune("adalora", bert_card, bert_dir, sentiment_data(), tinit=100, epochs=1)
    with pytest.raises(UsageError, match="early stopping needs dev rows"):
        data = {"train": sentiment_data()["train"]}
        tune("lora", bert_card, bert_dir, data, early_stopping_patience=1)


def test_the_submission_check_catches_typos_types_and_peft_refusals(pm: PluginManager) -> None:
    spec = pm.tuning_methods["lora"].spec
    assert spec.check is not None
    spec.check("sft", {**spec.defaults, "r": 4, "target_modules": ["q_proj"]})  # fine
    with pytest.raises(UsageError, match=r"lora: lora_alpah \(did you mean lora_alpha\?\)"):
        spec.check("sft", {"lora_alpah": 4})
    with pytest.raises(UsageError, match="PEFT option r must be an integer, got '8'"):
        spec.check("sft", {"r": "8"})
    with pytest.raises(UsageError, match="target_modules must be a string or a list of strings"):
        spec.check("sft", {"target_modules": [1, 2]})
    with pytest.raises(UsageError, match="lora_dropout must be a number"):
        spec.check("sft", {"lora_dropout": "high"})
    # peft's own checks run on the config the job would build
    with pytest.raises(UsageError, match=r"invalid PEFT options.*layers_to_transform"):
        spec.check("sft", {"target_modules": "q_proj", "layers_to_transform": [0]})
    # AdaLoRA's schedule is checked against the step count when the job runs
    pm.tuning_methods["adalora"].spec.check("text-classification", {"tinit": 50, "tfinal": 100})
    # prompt tuning from text gets the base's tokenizer only when it runs
    pm.tuning_methods["prompt"].spec.check(
        "sft", {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": "Classify:"}
    )
    with pytest.raises(UsageError, match="full has no PEFT options"):
        pm.tuning_methods["full"].spec.check("sft", {"r": 8})
