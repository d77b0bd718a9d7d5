"""A node dies under load: every request the client sent either answers right
or fails where the client sees it, and Serve puts the lost replica back."""

from __future__ import annotations

import threading
import time
from pathlib import Path
from typing import Any

from llmos.errors import LlmosError, Unavailable
from llmos.types import Capability, CompletionRequest, Sampling

from .conftest import tiny_spec

#: the bounded client loop: this many callers, each sending this many requests
CALLERS, EACH = 4, 30


def greedy(prompt: str) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, sampling=Sampling(max_tokens=16, temperature=0))


def _nodes(model: Any, tries: int = 12) -> dict[str, str]:
    """replica id -> node id, as the replicas say."""
    seen: dict[str, str] = {}
    for _ in range(tries):
        info = model._handle.describe.remote().result(timeout_s=60)
        seen[info["replica"]] = info["node"]
    return seen


def test_killing_a_replicas_node_under_load_loses_no_request_silently(
    executor: Any, cluster: Any, tiny_dir: Path, tmp_path: Path
) -> None:
    executor.options["deployments"] = {"failover": {"num_replicas": 2}}
    model = executor.place(tiny_spec("failover", tiny_dir))
    try:
        before = _nodes(model)
        assert len(set(before.values())) == 2, "the two replicas should be on both nodes"
        expected = model.submit(Capability.COMPLETE, [greedy("the cat")]).result(60)[0].text

        outcomes: list[tuple[str, Any]] = []
        lock = threading.Lock()
        done = threading.Event()

        def caller() -> None:
            for _ in range(EACH):
                try:
                    (result,) = model.submit(Capability.COMPLETE, [greedy("the cat")]).result(120)
                    outcome: tuple[str, Any] = ("ok", result.text)
                except LlmosError as exc:  # what the kernel turns into an HTTP error
                    outcome = ("failed", exc)
                with lock:
                    outcomes.append(outcome)

        threads = [threading.Thread(target=caller) for _ in range(CALLERS)]
        for thread in threads:
            thread.start()
        while len(outcomes) < 10:  # under load, then the node goes
            time.sleep(0.01)
        killed = cluster.kill_worker()
        assert killed
        killed_at = len(outcomes)
        for thread in threads:
            thread.join(timeout=600)
        done.set()
        assert not any(t.is_alive() for t in threads), "a request never came back"

        # every request accounted for: an answer, the right one, or a failure the caller saw
        assert len(outcomes) == CALLERS * EACH
        answers = [value for kind, value in outcomes if kind == "ok"]
        failures = [value for kind, value in outcomes if kind == "failed"]
        assert all(text == expected for text in answers)
        assert all(isinstance(f, Unavailable) for f in failures), failures
        assert len(answers) > killed_at  # the surviving replica kept answering
        assert len(failures) <= CALLERS  # at most the calls in flight on the dead replica

        # Serve brings the replica back (on the head node: the worker is gone)
        deadline = time.monotonic() + 180
        while model.health() != {"status": "HEALTHY", "replicas": {"RUNNING": 2}}:
            assert time.monotonic() < deadline, model.health()
            time.sleep(0.5)
        # and the handle routes to it once it hears of it (Serve's long poll)
        after: dict[str, str] = {}
        while len(after) < 2:
            assert time.monotonic() < deadline, after
            after.update(_nodes(model, tries=4))
        assert set(after) != set(before)  # a new replica, not the old one back
        for _ in range(4):
            assert (
                model.submit(Capability.COMPLETE, [greedy("the cat")]).result(60)[0].text
                == expected
            )
    finally:
        model.close()
        if not cluster.worker_pids():
            cluster.start_worker()  # the worker node back for the tests after this one
