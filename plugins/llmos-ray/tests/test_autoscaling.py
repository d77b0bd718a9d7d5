"""Autoscaling on the real cluster: a model placed with a replica range grows
under load within it, and no call fails while Serve adds the replica."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from llmos.types import Capability, CompletionRequest, Sampling

from .conftest import tiny_spec


def test_a_model_with_a_replica_range_scales_up_under_load(executor: Any, tiny_dir: Path) -> None:
    executor.options["deployments"] = {
        "scaled": {
            "autoscaling": {
                "min_replicas": 1,
                "max_replicas": 2,
                "target_ongoing_requests": 1,
                "upscale_delay_s": 0,
                "look_back_period_s": 2,
            }
        }
    }
    model = executor.place(tiny_spec("scaled", tiny_dir))
    try:
        assert model.health() == {"status": "HEALTHY", "replicas": {"RUNNING": 1}}
        stop = threading.Event()
        failures: list[BaseException] = []
        answered = [0]

        def caller() -> None:
            request = CompletionRequest(
                prompt="the cat", sampling=Sampling(max_tokens=32, temperature=0)
            )
            while not stop.is_set():
                try:
                    model.submit(Capability.COMPLETE, [request]).result(120)
                    answered[0] += 1
                except BaseException as exc:  # every failure is the finding
                    failures.append(exc)

        callers = [threading.Thread(target=caller) for _ in range(4)]
        for thread in callers:
            thread.start()
        deadline = time.monotonic() + 120
        try:
            while model.health()["replicas"].get("RUNNING", 0) < 2:
                assert time.monotonic() < deadline, model.health()
                time.sleep(0.5)
        finally:
            stop.set()
            for thread in callers:
                thread.join(timeout=120)
        assert not failures, failures[:3]
        assert answered[0] > 0
        assert model.health()["replicas"] == {"RUNNING": 2}  # and never past max_replicas
    finally:
        model.close()
