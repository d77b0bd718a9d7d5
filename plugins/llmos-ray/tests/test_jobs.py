"""Tuning jobs on the cluster (``[tuning] executor = "ray"``): a job whose node
is killed mid-way is queued again by the kernel and resumes from its
checkpoint on the other node."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.testing import write_safetensors
from llmos.tuning.jobs import JobState
from llmos.types import ModelCard

DATA = {
    "train": [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}],
    "dev": [{"text": "fine", "label": "pos"}, {"text": "poor", "label": "neg"}],
}


@pytest.fixture
def kernel(cluster: Any, executor: Any, tmp_path: Path) -> Iterator[Kernel]:
    from llmos_ray.testing import HEAD_IP

    home = tmp_path / "home"
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "llmos-steps,ray"},
            overrides=[
                'tuning.executor="ray"',
                f'plugins.ray.address="{cluster.address}"',
                f'plugins.ray.node_ip_address="{HEAD_IP}"',
                # the first attempt on the worker node: the one the test kills
                "plugins.ray.tuning.num_cpus=0.5",
                "plugins.ray.tuning.resources={worker=1}",
            ],
        )
    )
    kernel.load_plugins()
    kernel.jobs.adopt = True  # as the daemon's: it runs queued jobs and requeued ones
    kernel.start()
    write_safetensors(home / "models" / "base" / "model.safetensors", {"w": [2, 2]})
    kernel.registry.register(
        ModelCard(
            name="base", provider="steps", format="safetensors", source=str(home / "models/base")
        )
    )
    yield kernel
    kernel.stop()


def test_a_job_whose_node_is_killed_resumes_on_the_other_from_its_checkpoint(
    kernel: Kernel, cluster: Any
) -> None:
    job = kernel.jobs.submit(
        model="base", method="steps", inline=DATA, params={"steps": 12, "sleep": 0.5}
    )
    deadline = time.monotonic() + 120
    while not [r for r in kernel.jobs.logs(job.id) if r.get("step", 0) >= 3]:
        assert time.monotonic() < deadline, kernel.jobs.get(job.id)
        time.sleep(0.1)
    first_node = cluster.worker_pids()
    assert first_node
    # the job's worker process runs under the worker node's raylet
    # from now on, any node may run it: the worker node is about to go
    kernel.executor("ray").options["tuning"] = {"num_cpus": 0.5}  # type: ignore[attr-defined]
    cluster.kill_worker()
    try:
        while not (done := kernel.jobs.get(job.id)).done:
            assert time.monotonic() < deadline + 120, done
            time.sleep(0.2)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 2, "queued again when its node was lost, not failed"
        second = [r for r in kernel.jobs.logs(job.id) if r["attempt"] == 2]
        assert second and second[0]["resumed_from"] >= 3, "resumed from the checkpoint"
        assert kernel.registry.store.get(done.result["model"]).parents == ("base@1",)
    finally:
        if not cluster.worker_pids():
            cluster.start_worker()
