"""The kernel with ``[runtime] executor = "ray"``: the plugin found through its
entry point, a registered model placed on Serve, and the daemon's API
answering through the deployment's handle."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.testing import EventRecorder, serve_in_thread
from llmos.types import Capability, CompletionRequest, ModelCard, Sampling


@pytest.fixture(scope="module")
def kernel(
    cluster: Any, executor: Any, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Kernel]:
    from llmos_ray.testing import HEAD_IP

    kernel = Kernel(
        load_config(
            env={
                "LLMOS_HOME": str(tmp_path_factory.mktemp("home")),
                "LLMOS_LOAD_PLUGINS": "transformers,ray",
            },
            overrides=[
                f'registry.allowed_roots=["{tiny_dir.parent}"]',
                'runtime.executor="ray"',
                f'plugins.ray.address="{cluster.address}"',
                f'plugins.ray.node_ip_address="{HEAD_IP}"',
                "plugins.ray.num_cpus=0.25",
                "plugins.ray.num_replicas=2",
                "plugins.ray.event_interval_s=0.1",
                "plugins.transformers.threads=1",
            ],
        )
    )
    kernel.load_plugins()
    recorder = EventRecorder()
    kernel.plugins.register(recorder, "recorder")
    kernel.start()
    kernel.recorder = recorder  # type: ignore[attr-defined]
    kernel.registry.register(
        ModelCard(name="tiny-k", provider="transformers", source=str(tiny_dir))
    )
    yield kernel
    kernel.stop()


def test_a_registered_model_is_placed_on_serve_and_answers(kernel: Kernel) -> None:
    assert "ray" in kernel.plugins.executors
    request = CompletionRequest(prompt="the cat", sampling=Sampling(max_tokens=8, temperature=0))
    (first,) = kernel.call("tiny-k@1", Capability.COMPLETE, [request])
    (again,) = kernel.call("tiny-k@1", Capability.COMPLETE, [request])
    assert first.text and first.text == again.text
    worker = kernel.models.peek("tiny-k@1") or kernel.models.get("tiny-k@1")
    placed = worker.model  # type: ignore[union-attr]
    assert type(placed).__name__ == "RayModel"
    assert placed.health() == {"status": "HEALTHY", "replicas": {"RUNNING": 2}}


def test_the_daemons_api_goes_through_the_deployment(kernel: Kernel) -> None:
    (direct,) = kernel.call(
        "tiny-k@1",
        Capability.COMPLETE,
        [CompletionRequest(prompt="the cat", sampling=Sampling(max_tokens=8, temperature=0))],
    )
    with serve_in_thread(kernel) as url:
        response = httpx.post(
            f"{url}/v1/completions",
            json={"model": "tiny-k@1", "prompt": "the cat", "max_tokens": 8, "temperature": 0},
            timeout=120,
        )
        assert response.status_code == 200, response.text
        text = response.json()["choices"][0]["text"]
        streamed = []
        with httpx.stream(
            "POST",
            f"{url}/v1/completions",
            json={
                "model": "tiny-k@1",
                "prompt": "the cat",
                "max_tokens": 8,
                "temperature": 0,
                "stream": True,
            },
            timeout=120,
        ) as stream:
            for line in stream.iter_lines():
                if line.startswith("data: {"):
                    streamed.append(line)
    assert text and len(streamed) > 1
    assert text == direct.text
    # the replica's worker made each call's request event; the kernel's sinks got it
    replicas = {e.fields.get("replica") for e in kernel.recorder.of("request")}  # type: ignore[attr-defined]
    assert replicas - {None}
