"""The defaults the README documents are the ones a job without ``--param`` trains with.

A job's parameters are its method's spec defaults under the user's own (the
job manager merges them at submission); the worker completes them with
:func:`~llmos_peft.options.resolve`. Each method and task is submitted here,
with no parameters, to a real kernel (queued, not run: no training), and what
the worker would train with is compared with the plugin README's tables:
the learning rate per method and task, the training options and the PEFT
options.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.runtime.kernel import Kernel
from llmos.types import ModelCard
from llmos_peft.options import METHODS, TASKS, resolve
from llmos_peft.peft_config import settable_keys

from .conftest import sentiment_data, sft_data

README = Path(__file__).resolve().parents[1] / "README.md"


def section(text: str, heading: str) -> str:
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else None]


def table_rows(text: str) -> list[list[str]]:
    """The cells of every table row whose first cell is a backticked name."""
    return [
        [cell.strip() for cell in line.strip().strip("|").split("|")]
        for line in text.splitlines()
        if line.startswith("| `")
    ]


def literal(cell: str) -> Any:
    """`3` → 3, `true` → True, `auto` → 'auto'."""
    text = cell.strip("`")
    try:
        return json.loads(text)
    except ValueError:
        return text


def documented() -> dict[str, Any]:
    text = README.read_text(encoding="utf-8")
    methods = section(text, "Methods")
    header = next(line for line in methods.splitlines() if line.startswith("| method | trains"))
    columns = [cell.strip() for cell in header.strip().strip("|").split("|")]
    rates = {}
    for row in table_rows(methods.split("Default PEFT options")[0]):
        by_column = dict(zip(columns, row, strict=True))
        rates[row[0].strip("`")] = {
            task: float(by_column[f"learning rate: {task}"]) for task in TASKS
        }
    peft = {}
    for row in table_rows(methods.split("Default PEFT options")[1].split("Not settable")[0]):
        peft[row[0].strip("`")] = {
            key: literal(value) for key, value in re.findall(r"`(\w+)=([^`]+)`", row[1])
        }
    training = {}
    for row in table_rows(section(text, "Training options").split("The numeric PEFT")[0]):
        if re.fullmatch(r"`[^`<]+`", row[1]):  # a literal default, not prose or a pattern
            training[row[0].strip("`")] = literal(row[1])
    return {"rates": rates, "peft": peft, "training": training}


@pytest.fixture(scope="module")
def kernel(bert_card: ModelCard, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    home = tmp_path_factory.mktemp("defaults-home")
    kernel = Kernel.from_config(
        overrides=[
            f"home={str(home)!r}",
            f"registry.allowed_roots=[{str(tmp_path_factory.getbasetemp())!r}]",
            "tuning.max_queued_jobs=100",  # every job here stays queued
        ],
        env={"LLMOS_LOAD_PLUGINS": "transformers,peft"},
    )
    kernel.registry.register(bert_card)
    try:
        yield kernel
    finally:
        kernel.stop()


def test_the_readme_documents_every_method_and_task() -> None:
    docs = documented()
    assert set(docs["rates"]) == set(METHODS)
    assert {"lora", "adalora", "prefix", "prompt"} <= set(docs["peft"])
    assert {"epochs", "batch_size", "warmup_ratio", "max_length", "load_best"} <= set(
        docs["training"]
    )


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("method", list(METHODS))
def test_a_job_without_params_trains_with_the_documented_defaults(
    kernel: Kernel, method: str, task: str
) -> None:
    docs = documented()
    data = sentiment_data(8, 4, 4) if task == "text-classification" else sft_data()
    job = kernel.jobs.submit(
        model="tiny-bert", method=method, task=task, inline=data, params={}, run=False
    )
    # what the worker does with the job's parameters before it loads anything
    hp = resolve(method, task, job.params, settable_keys(method))
    assert hp["learning_rate"] == docs["rates"][method][task]
    for key, value in docs["training"].items():
        assert hp[key] == value, key
    for key, value in docs["peft"].get(method, {}).items():
        assert hp.peft[key] == value, key
    # a given value still wins over every default
    given = kernel.jobs.submit(
        model="tiny-bert",
        method=method,
        task=task,
        inline=data,
        params={"learning_rate": 0.0123, "epochs": 2},
        run=False,
    )
    hp = resolve(method, task, given.params, settable_keys(method))
    assert hp["learning_rate"] == 0.0123 and hp["epochs"] == 2
