"""vLLM's own figures as llmos monitor events, and the provider behind the
real daemon over HTTP on loopback, with the official OpenAI client."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import openai

from llmos.runtime.kernel import Kernel
from llmos.server.app import create_app
from llmos.testing import serve_app
from llmos.types import (
    Capability,
    ChatRequest,
    CompletionRequest,
    ModelCard,
    MonitorEvent,
    Sampling,
)
from llmos_vllm import engine as engines

from .conftest import MakeKernel


def test_vllms_figures_reach_the_monitor(kernel: Kernel) -> None:
    """Twelve requests at once to the base and an adapter: ``engine.stats``
    events say how many ran together, the KV cache they took and which
    adapters ran — figures only vLLM has."""
    # the earlier tests' last events first: a worker emits a call's event after
    # its caller has the answer, and counts it done only then
    deadline = time.monotonic() + 30
    while any(w.busy for w in kernel.models.loaded()) and time.monotonic() < deadline:
        time.sleep(0.01)
    kernel.bus.flush()
    kernel.recorder.events.clear()
    sampling = Sampling(temperature=0, max_tokens=48)

    def call(model: str) -> None:
        kernel.call(
            model, Capability.COMPLETE, [CompletionRequest(prompt="a dog", sampling=sampling)]
        )

    threads = [threading.Thread(target=call, args=(m,)) for m in ["tiny", "lora-a"] * 6]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    # events reach the sinks off the callers' threads, and a call's own event
    # is emitted just after its caller has its answer: wait for the idle engine
    # and for every call's event
    deadline = time.monotonic() + 30

    def tiny_calls() -> list[MonitorEvent]:
        return [e for e in kernel.recorder.of("request") if e.model == "tiny@1"]

    while time.monotonic() < deadline and not (
        any(e.fields["running"] == 0 for e in kernel.recorder.of("engine.stats"))
        and len(tiny_calls()) >= 6
    ):
        time.sleep(0.05)
    stats = kernel.recorder.of("engine.stats")
    assert stats, "no engine.stats event"
    # the engine's model: the base it was started for, as tiny@1 or, when an
    # adapter came first, as the adapters' parent tiny-hf@1 (the same weights)
    assert len({e.model for e in stats}) == 1
    assert stats[0].model in ("tiny@1", "tiny-hf@1")
    fields = [e.fields for e in stats]
    assert {"tiny@1", "lora-a@1"} <= set(fields[-1]["models"])
    assert all(f["engine"] == "vllm" for f in fields)
    assert max(f["running_max"] for f in fields) >= 2  # several requests in one batch
    # the KV cache the requests took: the peak of an interval (the idle event's
    # own reading is 0, and a quick burst may fit in one interval)
    assert max(f["kv_cache_usage_max"] for f in fields) > 0
    assert all(f["kv_cache_usage_max"] >= f["kv_cache_usage"] for f in fields)
    assert sum(f["generation_tokens"] for f in fields) >= 12 * 48
    assert any(f["adapters_running_max"].get("lora-a@1", 0) >= 1 for f in fields)
    last = fields[-1]
    assert (last["running"], last["waiting"]) == (0, 0)  # the last event: idle
    # and the kernel's own per-call events are there as for any model
    calls = tiny_calls()
    assert len(calls) == 6 and all(e.fields["status"] == "ok" for e in calls)


def test_the_daemon_serves_the_engine_over_http(
    make_kernel: MakeKernel, kernel: Kernel, tiny_dir: Path, tmp_path: Path
) -> None:
    """A second kernel (the daemon's) on the same folder joins the running
    engine; chat, a stream and an adapter through ``/v1``."""
    daemon_kernel = make_kernel(tmp_path / "home")
    daemon_kernel.registry.register(ModelCard(name="tiny", provider="vllm", source=str(tiny_dir)))
    for name in ("tiny-hf", "lora-a"):  # the adapter, and its base as its card names it
        daemon_kernel.registry.register(kernel.registry.store.get(name))
    before = len(engines.engines())
    with serve_app(create_app(daemon_kernel), timeout=300) as running:
        client = openai.OpenAI(
            base_url=f"{running.url}/v1", api_key="unused", max_retries=0, timeout=300
        )
        messages = [{"role": "user", "content": "greet kim"}]
        reply = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0
        )
        [reference] = kernel.call("tiny", Capability.CHAT, [_chat("greet kim", 12)])
        assert reply.choices[0].message.content == reference.message.content
        assert reply.usage.completion_tokens == reference.usage.completion_tokens
        stream = client.chat.completions.create(
            model="tiny", messages=messages, max_tokens=12, temperature=0, stream=True
        )
        assert (
            "".join(c.choices[0].delta.content or "" for c in stream) == reference.message.content
        )
        adapted = client.chat.completions.create(
            model="lora-a", messages=messages, max_tokens=12, temperature=0
        )
        [lora] = kernel.call("lora-a", Capability.CHAT, [_chat("greet kim", 12)])
        assert adapted.choices[0].message.content == lora.message.content
        assert len(engines.engines()) == before  # the running engine, not a new one


def _chat(text: str, max_tokens: int) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "user", "content": text}],
        sampling=Sampling(temperature=0, max_tokens=max_tokens),
    )


def test_one_engine_for_the_whole_session(kernel: Kernel) -> None:
    started = kernel.recorder.of("engine.started")
    assert len(started) <= 1  # at most the one this kernel started (another may have)
    assert len(engines.engines()) == 1
