"""Fixtures: a real two-node Ray cluster on this machine, a tiny Llama, and an
executor serving it through llmos-transformers on Serve replicas.

The cluster (:class:`llmos_ray.testing.LocalCluster`: ``ray start --head`` on
127.0.0.3 and ``ray start --address`` on 127.0.0.2 with a resource of its
own) starts once per session and is always stopped, by PID, at the end. The
tiny Llama (2 layers, hidden 32, a trained byte-level tokenizer) is written
with ``save_pretrained`` in a second. The replicas find the transformers
provider through its entry point, as the kernel does.

These tests need Ray, which lives in its own environment (``make test-ray``);
where it is not installed they are not collected.
"""

from __future__ import annotations

import importlib.util
import os
import sys
from collections.abc import Iterator
from pathlib import Path

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"  # as the test cluster's nodes (llmos_ray.testing)

import pytest

from llmos.logs import configure_logging
from llmos.testing import write_distribution
from llmos.types import ModelCard, MonitorEvent, PlacementRequest

if importlib.util.find_spec("ray") is None or importlib.util.find_spec("llmos_ray") is None:
    collect_ignore_glob = ["test_*.py"]

#: a tuning method that counts steps, a checkpoint a step, resuming from the last
STEPS = """
import json
import time

from llmos.plugin import hookimpl
from llmos.testing import write_safetensors
from llmos.types import ModelCard, TuningMethodSpec, TuningResult


def run(request):
    steps = int(request.hyperparameters["steps"])
    folder = request.checkpoint_dir
    saved = sorted(folder.glob("step-*.json"))
    step = json.loads(saved[-1].read_text())["step"] if saved else 0
    resumed_from = step
    while step < steps:
        step += 1
        part = folder / f".step-{step:06d}.part"
        part.write_text(json.dumps({"step": step}))
        part.rename(folder / f"step-{step:06d}.json")
        request.report({"step": step, "total_steps": steps, "resumed_from": resumed_from})
        time.sleep(float(request.hyperparameters.get("sleep", 0)))
    out = request.output_dir
    write_safetensors(out / "model.safetensors", {"w": [2, 2]})
    card = ModelCard(
        name=request.base.name, provider="steps", format="safetensors",
        source=str(out / "model.safetensors"),
    )
    return TuningResult(card=card, scores={"dev/accuracy": 1.0})


@hookimpl
def llmos_register_tuning_methods(register):
    register(TuningMethodSpec(
        name="steps", run=run, tasks=("text-classification",),
        defaults={"steps": 4, "sleep": 0.0},
    ))
"""

TEXTS = [
    "the cat sat on the mat.",
    "a dog ran in the park!",
    "hello world, how are you today?",
    "greet anna hello anna, nice to see you",
]


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging("warning", fmt="console")


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[object]:
    from llmos_ray.testing import LocalCluster

    # the test tuning method's distribution, importable on the nodes and here
    site = tmp_path_factory.mktemp("site")
    write_distribution(site, "llmos-steps", STEPS)
    sys.path.insert(0, str(site))
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), env={"PYTHONPATH": str(site)})
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from llmos_transformers.testing import write_llama

    return write_llama(tmp_path_factory.mktemp("models") / "tiny", texts=TEXTS, context=256)


class Events:
    """The kernel's ``emit`` as the executor gets it: events, kept."""

    def __init__(self) -> None:
        self.events: list[MonitorEvent] = []

    def __call__(self, event: MonitorEvent) -> None:
        self.events.append(event)

    def of(self, kind: str, model: str | None = None) -> list[MonitorEvent]:
        return [e for e in self.events if e.kind == kind and (model is None or e.model == model)]


@pytest.fixture(scope="session")
def events() -> Events:
    return Events()


@pytest.fixture(scope="session")
def executor(
    cluster: object, events: Events, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[object]:
    from llmos_ray.executor import RayExecutor
    from llmos_ray.testing import HEAD_IP

    executor = RayExecutor(
        cluster.address,  # type: ignore[attr-defined]
        emit=events,
        options={"num_cpus": 0.5},
        home=str(tmp_path_factory.mktemp("replica-home")),
        event_interval_s=0.1,
        node_ip_address=HEAD_IP,
    )
    try:
        yield executor
    finally:
        executor.close()
        import ray

        ray.shutdown()


def tiny_spec(key: str, tiny_dir: Path, **fields: object) -> PlacementRequest:
    """What the kernel places for the tiny Llama served by transformers."""
    card = ModelCard(name=key.split("@")[0], provider="transformers", source=str(tiny_dir))
    return PlacementRequest(
        key=key,
        card=card,
        provider="transformers",
        plugin="transformers",
        options={"threads": 1},
        path=str(tiny_dir),
        **fields,  # type: ignore[arg-type]
    )
