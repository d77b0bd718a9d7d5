"""The deployment config mapping: defaults, layering, and errors that say what to do."""

from __future__ import annotations

from typing import Any

import pytest

from llmos.errors import ConfigError
from llmos_ray.options import Autoscaling, serve_settings


def test_defaults_give_one_replica_with_room_for_a_batch() -> None:
    settings = serve_settings("m", {"address": "auto"}, max_batch_size=32)
    assert settings.num_replicas == 1 and settings.autoscaling is None
    assert settings.max_ongoing_requests == 64
    options = settings.deployment_options()
    assert options["num_replicas"] == 1
    assert options["ray_actor_options"] == {"num_cpus": 1.0, "num_gpus": 0.0}


def test_layers_plugin_then_card_then_operator_per_model() -> None:
    plugin = {
        "address": "auto",
        "num_cpus": 2,
        "memory_mb": 512,
        "deployments": {"m": {"num_gpus": 1, "resources": {"big": 1}}},
    }
    card = {"ray": {"autoscaling": {"min_replicas": 1, "max_replicas": 4}, "num_cpus": 0.5}}
    settings = serve_settings("m", plugin, card)
    assert settings.autoscaling == Autoscaling(min_replicas=1, max_replicas=4)
    options = settings.deployment_options()
    assert "num_replicas" not in options
    assert options["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 4,
        "target_ongoing_requests": 2.0,
    }
    assert options["ray_actor_options"] == {
        "num_cpus": 0.5,
        "num_gpus": 1.0,
        "memory": 512 * 1024 * 1024,
        "resources": {"big": 1.0},
    }
    # another model gets the plugin's defaults only
    assert serve_settings("other", plugin).deployment_options()["ray_actor_options"] == {
        "num_cpus": 2.0,
        "num_gpus": 0.0,
        "memory": 512 * 1024 * 1024,
    }


@pytest.mark.parametrize(
    ("plugin", "card", "message"),
    [
        ({"num_replica": 2}, None, "unknown key(s) num_replica; known:"),
        ({"num_replicas": 0}, None, "num_replicas = 0; it takes an integer >= 1"),
        ({"num_cpus": -1}, None, "num_cpus = -1; it takes a number >= 0"),
        ({"num_cpus": True}, None, "num_cpus = True"),
        (
            {},
            {"ray": {"num_replicas": 2, "autoscaling": {"max_replicas": 3}}},
            "num_replicas and autoscaling both set",
        ),
        (
            {"autoscaling": {"min_replicas": 3, "max_replicas": 2}},
            None,
            "min_replicas (3) is above max_replicas (2)",
        ),
        ({"autoscaling": {"target": 1}}, None, "autoscaling: unknown key(s) target"),
        (
            {"autoscaling": {"target_ongoing_requests": 0}},
            None,
            "target_ongoing_requests = 0; it takes a number > 0",
        ),
        (
            {"autoscaling": {"upscale_delay_s": -1}},
            None,
            "upscale_delay_s = -1; it takes a number of seconds >= 0",
        ),
        ({"autoscaling": {"look_back_period_s": 0}}, None, "look_back_period_s = 0; it takes"),
        ({"max_queued_requests": 0}, None, "or -1 for no limit"),
        ({"deployments": {"m": 3}}, None, "[plugins.ray.deployments.m] must be a table"),
        ({"max_ongoing_requests": 4}, None, "below its max_batch_size (8)"),
    ],
)
def test_bad_config_is_refused_with_the_key_and_what_it_takes(
    plugin: dict[str, object], card: dict[str, object] | None, message: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        serve_settings("m", plugin, card, max_batch_size=8)
    assert message in caught.value.message


def test_max_queued_requests_may_be_unlimited() -> None:
    assert serve_settings("m", {"max_queued_requests": -1}).max_queued_requests == -1


def test_autoscaling_timing_reaches_serve_only_when_set() -> None:
    quick = {"autoscaling": {"max_replicas": 2, "upscale_delay_s": 0, "look_back_period_s": 2}}
    assert serve_settings("m", quick).deployment_options()["autoscaling_config"] == {
        "min_replicas": 1,
        "max_replicas": 2,
        "target_ongoing_requests": 2.0,
        "upscale_delay_s": 0.0,
        "look_back_period_s": 2.0,
    }


def test_an_address_nothing_answers_on_is_refused_at_once() -> None:
    import socket
    import time

    from llmos.errors import Unavailable
    from llmos_ray.executor import check_reachable

    with socket.socket() as sock:  # a port that was free a moment ago: nothing listens
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    started = time.monotonic()
    for address in (f"127.0.0.1:{port}", f"ray://127.0.0.1:{port}"):
        with pytest.raises(Unavailable) as caught:
            check_reachable(address, timeout_s=5)
        assert f"the Ray cluster at {address}" in caught.value.message
        assert f"ray start --head --port {port}" in caught.value.message
    assert time.monotonic() - started < 5  # refused, not retried for minutes
    with pytest.raises(ConfigError, match='give "auto", "HOST:PORT"'):
        check_reachable("head-node", timeout_s=1)
    check_reachable("auto", timeout_s=1)  # Ray's to find


def test_a_running_clusters_address_passes_the_check(cluster: Any) -> None:
    from llmos_ray.executor import check_reachable

    check_reachable(cluster.address, timeout_s=5)  # the test cluster's head answers
