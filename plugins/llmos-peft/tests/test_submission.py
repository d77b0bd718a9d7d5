"""A job's hyper-parameters and data checked when it is submitted, through the
daemon's HTTP API (``/api/tuning/jobs`` and the seed's ``/microtune``) and
``llmos tune``, with this plugin installed as the kernel finds it.

Every out-of-range value is a 400 naming ``params.<name>`` and the range,
and creates no job; one valid job runs to the end (one epoch on the tiny
BERT) and registers its model.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos.types import ModelCard
from llmos_peft.options import PEFT_RANGES, TRAINING, Range, ranges

from .conftest import sentiment_data

LLMOS = shutil.which("llmos", path=str(Path(sys.executable).parent))
PLUGINS = "transformers,peft"


@pytest.fixture(scope="module")
def daemon(
    bert_card: ModelCard, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[str, list[str]]]:
    """The daemon's URL, and the ``--set`` options that give the CLI its data folder."""
    home = tmp_path_factory.mktemp("daemon-home")
    overrides = [
        f"home={str(home)!r}",
        f"registry.allowed_roots=[{str(tmp_path_factory.getbasetemp())!r}]",
    ]
    kernel = Kernel.from_config(overrides=overrides, env={"LLMOS_LOAD_PLUGINS": PLUGINS})
    kernel.registry.register(bert_card)
    with serve_in_thread(kernel) as url:
        yield url, overrides


def job(method: str = "lora", task: str = "text-classification", **params: Any) -> dict[str, Any]:
    return {
        "model": "tiny-bert",
        "method": method,
        "task": task,
        "data": sentiment_data(8, 4, 4),
        "params": params,
    }


#: (method, task, params, the param named, what the message says)
BAD: list[tuple[str, str, dict[str, Any], str, str]] = [
    ("lora", "text-classification", {"r": -1}, "r", "between 1 and 256, got -1"),
    ("lora", "text-classification", {"r": 10**6}, "r", "between 1 and 256, got 1000000"),
    ("lora", "sft", {"epochs": 0}, "epochs", "between 1 and 100, got 0"),
    ("lora", "text-classification", {"batch_size": 10**6}, "batch_size", "between 1 and 1024"),
    ("lora", "sft", {"max_length": 10**9}, "max_length", "between 8 and 8192, got 1000000000"),
    ("lora", "text-classification", {"learning_rate": 0}, "learning_rate", "> 0 and <= 1"),
    ("lora", "text-classification", {"lora_dropout": 1.0}, "lora_dropout", ">= 0 and < 1"),
    ("lora", "text-classification", {"lora_alpha": 0}, "lora_alpha", "between 1 and 1024"),
    (
        "lora",
        "text-classification",
        {"rank_pattern": {"query": 4096}},
        "rank_pattern['query']",
        "between 1 and 256, got 4096",
    ),
    ("adalora", "text-classification", {"init_r": 0}, "init_r", "between 1 and 256, got 0"),
    ("adalora", "sft", {"target_r": 64}, "target_r", "at most init_r (12)"),
    ("adalora", "text-classification", {"beta1": 1.5}, "beta1", ">= 0 and < 1"),
    ("ia3", "text-classification", {"eval_batch_size": 0}, "eval_batch_size", "between 1"),
    ("prefix", "sft", {"num_virtual_tokens": 10**6}, "num_virtual_tokens", "between 1 and 512"),
    ("prompt", "text-classification", {"num_virtual_tokens": -1}, "num_virtual_tokens", "got -1"),
    ("full", "sft", {"weight_decay": -1}, "weight_decay", "between 0 and 1, got -1"),
    ("full", "text-classification", {"save_total_limit": 1000}, "save_total_limit", "1 and 20"),
    ("full", "text-classification", {"threads": 0}, "threads", "between 1 and 256 (or null)"),
    ("lora", "text-classification", {"warmup_ratio": float("inf")}, "warmup_ratio", "got inf"),
    # an integer past a float's range (was a 500: OverflowError in the check)
    ("lora", "sft", {"learning_rate": 10**400}, "learning_rate", "got 1000000000"),
]


def test_every_numeric_option_has_both_bounds() -> None:
    for method, table in PEFT_RANGES.items():
        described = ranges(method)
        for key, option in TRAINING.items():
            if isinstance(option.check, Range):
                assert key in described
        for key, bound in table.items():
            assert bound.low > -float("inf") and bound.high < float("inf"), (method, key)
            assert described[key] == bound.describe()


def test_out_of_range_values_are_400s_and_create_no_job(daemon: tuple[str, list[str]]) -> None:
    url, _ = daemon
    for method, task, params, name, says in BAD:
        # JSON has no infinity: sent as a huge float, which Python reads back as inf
        body = json.dumps(job(method, task, **params)).replace("Infinity", "1e999")
        response = httpx.post(
            f"{url}/api/tuning/jobs", content=body, headers={"Content-Type": "application/json"}
        )
        assert response.status_code == 400, (method, params, response.text)
        error = response.json()["error"]
        assert error["param"] == f"params.{name}", (method, params, error)
        assert says in error["message"], (method, params, error)
        assert error["type"] == "invalid_request_error"
    # the seed's route goes through the same checks
    seed = {"model_name": "tiny-bert", "data": sentiment_data(8, 4, 4), "params": {"r": -1}}
    refused = httpx.post(f"{url}/microtune", json=seed)
    assert refused.status_code == 400
    assert refused.json()["error"]["param"] == "params.r"
    assert "between 1 and 256, got -1" in refused.json()["error"]["message"]
    assert httpx.get(f"{url}/api/tuning/jobs").json()["jobs"] == []


def test_bad_data_is_refused_with_what_is_wrong(daemon: tuple[str, list[str]]) -> None:
    url, _ = daemon
    train = sentiment_data(8, 4, 4)["train"]
    cases = [
        ({"train": []}, "inline train: no rows"),
        (
            {"train": train, "dev": [{"text": "so so", "label": "neutral"}]},
            "label 'neutral' is not in the train split",
        ),
        ({"train": [{"text": r["text"]} for r in train]}, "no label column"),
        ({"train": [{**r, "label": "positive"} for r in train]}, "classification needs two"),
    ]
    for data, says in cases:
        response = httpx.post(f"{url}/api/tuning/jobs", json={**job(), "data": data})
        assert response.status_code == 400, (data, response.text)
        assert says in response.json()["error"]["message"]
    assert httpx.get(f"{url}/api/tuning/jobs").json()["jobs"] == []


def test_llmos_tune_refuses_an_out_of_range_value_at_once(
    daemon: tuple[str, list[str]], tmp_path: Path
) -> None:
    assert LLMOS, "the llmos console script is not installed (make install)"
    url, overrides = daemon
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in sentiment_data(8, 4, 4)["train"]))
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env["LLMOS_LOAD_PLUGINS"] = PLUGINS
    sets = [arg for override in overrides for arg in ("--set", override)]
    args = ["tune", "--model", "tiny-bert", "--method", "lora", "--train", str(train)]

    def tune(*extra: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [LLMOS, *sets, *args, *extra],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    local = tune("--param", "r=-1")  # this data folder: the kernel in the command checks
    assert local.returncode == 2, local.stderr
    assert "hyper-parameter r must be an integer between 1 and 256, got -1" in local.stderr
    remote = tune("--url", url, "--param", "epochs=0")  # the daemon checks
    assert remote.returncode == 1, remote.stderr
    assert "answered 400: hyper-parameter epochs must be an integer between 1 and 100" in (
        remote.stderr
    )
    assert httpx.get(f"{url}/api/tuning/jobs").json()["jobs"] == []


def test_a_valid_job_still_runs_and_registers_its_model(daemon: tuple[str, list[str]]) -> None:
    url, _ = daemon
    body = {
        "model_name": "tiny-bert",
        "method": "lora",
        "data": sentiment_data(16, 8, 8),
        "params": {"epochs": 1, "batch_size": 8, "learning_rate": 3e-2, "threads": 1},
    }
    response = httpx.post(f"{url}/microtune", json=body, timeout=300)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["model"] == "tiny-bert-lora@1"
    assert {"dev/accuracy", "test/accuracy"} <= set(answer["scores"])
    job_of = httpx.get(f"{url}/api/tuning/jobs/{answer['job']}").json()["job"]
    assert job_of["state"] == "succeeded" and job_of["params"]["epochs"] == 1
    card = httpx.get(f"{url}/api/models/tiny-bert-lora").json()["card"]
    assert card["parents"] == ["tiny-bert@1"]
