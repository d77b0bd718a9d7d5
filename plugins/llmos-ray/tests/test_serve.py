"""A model served on a real two-node Ray cluster, through llmos-transformers on
Serve replicas: answers, batching on the replica, streams, errors, events."""

from __future__ import annotations

import concurrent.futures
import time
from pathlib import Path
from typing import Any

import pytest

from llmos.errors import CapabilityNotSupported
from llmos.plugin.manager import PluginManager
from llmos.types import Capability, CompletionRequest, EmbedRequest, LoadRequest, Sampling

from .conftest import Events, tiny_spec

PROMPTS = ["the cat", "a dog ran", "hello world", "greet anna"]


def greedy(prompt: str, tokens: int = 8) -> CompletionRequest:
    return CompletionRequest(prompt=prompt, sampling=Sampling(max_tokens=tokens, temperature=0))


@pytest.fixture(scope="module")
def served(executor: Any, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The tiny Llama as a Serve application of 2 replicas (half a CPU each)."""
    executor.options["deployments"] = {"tiny": {"num_replicas": 2}}
    model = executor.place(tiny_spec("tiny", tiny_dir))
    yield model
    model.close()


@pytest.fixture(scope="module")
def in_process(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The same model loaded by the same provider in this process: the reference."""
    plugins = PluginManager()
    plugins.load()
    card = tiny_spec("tiny", tiny_dir).card
    request = LoadRequest(
        card=card,
        options={"threads": 1},
        path=tiny_dir,
        cache_dir=tmp_path_factory.mktemp("cache-local"),
    )
    model = plugins.providers["transformers"].spec.load(request)
    yield model
    model.close()


def test_two_replicas_on_two_nodes_answer_as_the_provider_does(
    served: Any, in_process: Any
) -> None:
    assert served.health() == {"status": "HEALTHY", "replicas": {"RUNNING": 2}}
    expected = in_process.complete([greedy(p) for p in PROMPTS])
    seen: set[str] = set()
    for _ in range(4):
        for prompt, want in zip(PROMPTS, expected, strict=True):
            future = served.submit(Capability.COMPLETE, [greedy(prompt)])
            (got,) = future.result(60)
            assert got.text == want.text and got.text
            assert got.usage == want.usage
            seen.add(future.timing["replica"])
    assert len(seen) == 2  # both replicas answered
    nodes = {served._handle.describe.remote().result(timeout_s=30)["node"] for _ in range(10)}
    assert len(nodes) == 2  # Serve spread them over both nodes


def test_concurrent_callers_share_batches_on_the_replica(served: Any, in_process: Any) -> None:
    expected = {
        p: r.text
        for p, r in zip(PROMPTS, in_process.complete([greedy(p, 24) for p in PROMPTS]), strict=True)
    }
    futures = [served.submit(Capability.COMPLETE, [greedy(p, 24)]) for p in PROMPTS * 6]
    results = [(f, f.result(120)) for f in futures]
    for (_future, (got,)), prompt in zip(results, PROMPTS * 6, strict=True):
        assert got.text == expected[prompt]  # each caller gets its own row of the batch
    assert max(f.timing["batch_size"] for f, _ in results) > 1


def test_a_caller_with_several_requests_gets_them_in_order(served: Any, in_process: Any) -> None:
    expected = [r.text for r in in_process.complete([greedy(p) for p in PROMPTS])]
    got = served.submit(Capability.COMPLETE, [greedy(p) for p in PROMPTS]).result(60)
    assert [r.text for r in got] == expected


def test_stream_gives_the_completion_chunk_by_chunk(served: Any, in_process: Any) -> None:
    (want,) = in_process.complete([greedy("the cat", 12)])
    chunks = list(served.submit_stream(greedy("the cat", 12)))
    assert len(chunks) > 1
    assert "".join(c.text for c in chunks) == want.text
    assert chunks[-1].finish_reason is not None and chunks[-1].usage is not None


def test_the_models_own_errors_reach_the_caller_as_they_are(served: Any) -> None:
    assert Capability.EMBED not in served.capabilities
    with pytest.raises(CapabilityNotSupported) as caught:  # raised on the replica
        served.submit(Capability.EMBED, [EmbedRequest(text="x")]).result(60)
    assert "does not support embed" in caught.value.message
    assert caught.value.status == 400  # the same 400 the in-process worker gives
    # and the replicas are still serving
    assert served.submit(Capability.COMPLETE, [greedy("the cat")]).result(60)[0].text


def test_events_from_replicas_and_calls_reach_the_kernels_emit(served: Any, events: Events) -> None:
    served.submit(Capability.COMPLETE, [greedy("a dog ran")]).result(60)
    deadline = time.monotonic() + 30
    while len(events.of("ray.replica.loaded", "tiny")) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    loaded = events.of("ray.replica.loaded", "tiny")
    assert len({e.fields["replica"] for e in loaded}) == 2  # one per replica, from the replica
    assert all(e.fields["provider"] == "transformers" for e in loaded)
    # each call's request event: the replica worker's timing, made into the event here
    requests = [e for e in events.of("request", "tiny") if e.fields["status"] == "ok"]
    assert requests and all(e.fields["replica"] for e in requests)
    last = requests[-1].fields
    assert last["tokens_out"] > 0 and last["model_s"] > 0 and last["batch_size"] >= 1
    # what the caller waited: the replica's latency and the time Ray added
    assert last["latency_s"] >= last["call_s"] >= last["replica_latency_s"] >= last["model_s"]
    assert last["ray_s"] == pytest.approx(last["call_s"] - last["replica_latency_s"])
    assert last["ray_s"] > 0


def test_a_cancelled_call_is_not_left_running(served: Any) -> None:
    future = served.submit(Capability.COMPLETE, [greedy("the cat", 200)])
    future.cancel()
    with pytest.raises(concurrent.futures.CancelledError):
        future.result(30)
    assert served.submit(Capability.COMPLETE, [greedy("the cat")]).result(60)[0].text
