"""Two daemons placing the same model on one cluster share its Serve
application: the second attaches (no redeploy), each counts its own calls,
and the application outlives the first daemon to let go of it."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import pytest
from ray import serve

from llmos.types import Capability, CompletionRequest, Sampling

from .conftest import Events, tiny_spec


def greedy(prompt: str) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, sampling=Sampling(max_tokens=8, temperature=0))


def _deployed_at(app: str) -> float:
    return float(serve.status().applications[app].last_deployed_time_s)


def _requests(events: Events, model: str) -> int:
    return len([e for e in events.of("request", model) if e.fields["status"] == "ok"])


@pytest.fixture
def other(cluster: Any, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A second daemon's executor on the same cluster (its own event queue)."""
    from llmos_ray.executor import RayExecutor
    from llmos_ray.testing import HEAD_IP

    executor = RayExecutor(
        cluster.address,
        emit=Events(),
        options={"num_cpus": 0.5, "deployments": {"shared": {"num_replicas": 2}}},
        home=str(tmp_path_factory.mktemp("other-home")),
        event_interval_s=0.1,
        node_ip_address=HEAD_IP,
    )
    yield executor
    executor.close()


def test_a_second_daemon_attaches_to_the_deployed_model_and_counts_its_own_calls(
    executor: Any, events: Events, other: Any, tiny_dir: Path
) -> None:
    executor.options["deployments"] = {"shared": {"num_replicas": 2}}
    first = executor.place(tiny_spec("shared", tiny_dir))
    deployed_at = _deployed_at(first.app)
    expected = first.submit(Capability.COMPLETE, [greedy("the cat")]).result(60)[0].text

    second = other.place(tiny_spec("shared", tiny_dir))
    assert second.app == first.app
    assert _deployed_at(first.app) == deployed_at  # attached, not redeployed
    assert sorted(executor.holders(first.app)) == sorted([executor.events_name, other.events_name])

    mine = _requests(events, "shared")
    for _ in range(3):
        assert second.submit(Capability.COMPLETE, [greedy("the cat")]).result(60)[0].text == (
            expected
        )
    assert _requests(other.emit, "shared") == 3  # the calls' daemon made their events
    assert _requests(events, "shared") == mine  # and the other daemon saw none of them

    # the first daemon lets go: the application stays for the second
    first.close()
    assert executor.holders(first.app) == [other.events_name]
    assert serve.status().applications[first.app].status == "RUNNING"
    assert second.submit(Capability.COMPLETE, [greedy("the cat")]).result(60)[0].text == expected

    # the last one out deletes it
    second.close()
    deadline = time.monotonic() + 60
    while first.app in serve.status().applications:
        assert time.monotonic() < deadline, serve.status().applications[first.app]
        time.sleep(0.2)
    assert executor.holders(first.app) == []


def test_a_daemon_placing_the_model_otherwise_gets_its_own_application(tiny_dir: Path) -> None:
    from llmos_ray.executor import app_name, fingerprint
    from llmos_ray.options import serve_settings

    request = tiny_spec("tiny", tiny_dir)
    one = serve_settings("tiny", {"num_replicas": 1}, {}).deployment_options()
    two = serve_settings("tiny", {"num_replicas": 2}, {}).deployment_options()
    same = app_name("tiny", fingerprint(request, one))
    assert same == app_name("tiny", fingerprint(tiny_spec("tiny", tiny_dir), dict(one)))
    assert same.startswith("llmos-tiny-")
    assert app_name("tiny", fingerprint(request, two)) != same  # replicas differ
    other_options = tiny_spec("tiny", tiny_dir, max_batch_size=3)
    assert app_name("tiny", fingerprint(other_options, one)) != same  # batching differs
    # another llmos installation (namespace) on the same cluster keeps its own
    assert app_name("tiny", fingerprint(request, one, "staging")) != same


def test_two_daemons_placing_at_once_deploy_it_once(
    executor: Any, other: Any, tiny_dir: Path
) -> None:
    executor.options["deployments"] = {"shared": {"num_replicas": 2}}
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        placing = [pool.submit(e.place, tiny_spec("shared", tiny_dir)) for e in (executor, other)]
        first, second = (p.result(300) for p in placing)
    try:
        assert first.app == second.app
        # the daemons' homes differ, so a second deploy would have replaced the replicas
        seen = {
            model._handle.describe.remote().result(timeout_s=60)["replica"]
            for model in (first, second)
            for _ in range(6)
        }
        assert len(seen) == 2, seen
        assert first.health() == {"status": "HEALTHY", "replicas": {"RUNNING": 2}}
    finally:
        first.close()
        second.close()


def test_who_deploys_when_a_daemon_dies_or_fails_mid_deploy(executor: Any) -> None:
    """The placements' rules, on named actors standing for three daemons' queues."""
    import ray

    from llmos_ray.events import EventQueue
    from llmos_ray.placements import Placements

    names = [f"llmos-test-holder-{i}" for i in range(3)]
    queues = [
        ray.remote(EventQueue).options(name=n, namespace=executor.namespace, num_cpus=0).remote()
        for n in names
    ]
    ray.get([q.drain.remote() for q in queues])
    one, two, three = names
    table = Placements(executor.namespace)
    assert table.acquire("app", one) == "deploy"
    assert table.acquire("app", one) == "deploy"  # asked again (a retried call): the same
    assert table.acquire("app", two) == "wait"  # one is deploying it
    ray.kill(queues[0])  # the deploying daemon dies
    deadline = time.monotonic() + 30
    while (step := table.acquire("app", two)) == "wait":
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert step == "deploy"  # so the next to ask deploys it
    table.deployed("app", two, ok=False)  # and fails
    assert table.acquire("app", three) == "deploy"
    table.deployed("app", three, ok=True)
    assert table.acquire("app", two) == "attach"
    assert table.queues("app") == [two, three]
    assert table.release("app", three) == 1
    ray.kill(queues[1])
    deadline = time.monotonic() + 30
    while table.queues("app"):
        assert time.monotonic() < deadline
        time.sleep(0.2)
    assert table.release("app", three) == 0  # the last holder's release: delete it
    assert table.holders() == {}
    ray.kill(queues[2])


def test_the_placements_come_back_after_their_actor_restarts(
    executor: Any, other: Any, tiny_dir: Path
) -> None:
    import ray

    from llmos_ray.executor import HOLD_EVERY_S
    from llmos_ray.placements import NAME

    executor.options["deployments"] = {"shared": {"num_replicas": 2}}
    first = executor.place(tiny_spec("shared", tiny_dir))
    try:
        deployed_at = _deployed_at(first.app)
        actor = ray.get_actor(NAME, namespace=executor.namespace)
        ray.kill(actor, no_restart=False)  # it restarts with no records
        deadline = time.monotonic() + 10 * HOLD_EVERY_S
        while True:  # the holder says again what it holds
            try:
                if executor.holders(first.app) == [executor.events_name]:
                    break
            except ray.exceptions.RayActorError:
                pass  # still restarting
            assert time.monotonic() < deadline
            time.sleep(0.5)
        second = other.place(tiny_spec("shared", tiny_dir))
        assert second.app == first.app
        assert _deployed_at(first.app) == deployed_at  # attached, not deployed again
        first.close()  # and one daemon letting go leaves it to the other
        assert serve.status().applications[first.app].status == "RUNNING"
        second.close()
    finally:
        first.close()
