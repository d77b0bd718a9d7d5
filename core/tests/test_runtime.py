"""The kernel runtime: resolution, lazy loading, batching, queues, events.

The models here are a real provider plugin registered in-process: a small
deterministic model whose calls the tests can observe (batch sizes, loads,
cancellation), which is what these properties are about.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import attrs
import pytest
from click.testing import CliRunner

from llmos.cli import cli
from llmos.config import load_config
from llmos.errors import (
    CapabilityNotSupported,
    ConfigError,
    NotFoundError,
    Overloaded,
    PluginError,
    RequestTimeout,
    UsageError,
)
from llmos.plugin import hookimpl
from llmos.plugin.manager import PluginManager
from llmos.replica import Replica
from llmos.runtime.kernel import Kernel
from llmos.runtime.models import HEALTH_TIMEOUT_S
from llmos.testing import serve_in_thread, write_safetensors
from llmos.types import (
    Capability,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    CompletionResult,
    ExecutorSpec,
    LoadRequest,
    ModelBase,
    ModelCard,
    MonitorEvent,
    MonitorSinkSpec,
    PlacementRequest,
    ProviderSpec,
    ResponseFormat,
    StreamChunk,
    Tool,
    Usage,
)


class Upper(ModelBase):
    """Completes a prompt with itself upper-cased; records every call."""

    capabilities = frozenset({Capability.COMPLETE, Capability.STREAM})

    def __init__(self, card: ModelCard, recorder: Recorder) -> None:
        super().__init__(card)
        self.recorder = recorder
        # max_batch_size None: the backend batches on its own (as vLLM does)
        self.max_batch_size = None if card.options.get("own") else card.options.get("batch", 8)

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        self.recorder.batches.append(len(requests))
        if self.card.options.get("meet"):  # passes only when four calls run at once
            self.recorder.meeting.wait(timeout=10)
        delay = self.card.options.get("delay", 0)
        if delay:
            self.recorder.started.set()
            time.sleep(delay)
        if any(r.prompt == "boom" for r in requests):
            raise ValueError("cannot complete 'boom'")
        return [
            CompletionResult(
                text=r.prompt.upper(),
                usage=Usage(prompt_tokens=len(r.prompt), completion_tokens=len(r.prompt)),
            )
            for r in requests
        ]

    def stream(self, requests: Sequence[CompletionRequest]) -> Iterator[StreamChunk]:
        try:
            for i in range(1000):
                time.sleep(0.01)
                self.recorder.tokens += 1
                yield StreamChunk(index=0, text=str(i))
            yield StreamChunk(index=0, text="", finish_reason="stop", usage=Usage())
        finally:
            self.recorder.stream_closed.set()

    def close(self) -> None:
        self.recorder.closed.append(self.card.name)


class Recorder:
    def __init__(self) -> None:
        self.loads: list[str] = []
        self.batches: list[int] = []
        self.closed: list[str] = []
        self.events: list[MonitorEvent] = []
        self.tokens = 0
        self.started = threading.Event()
        self.stream_closed = threading.Event()
        self.meeting = threading.Barrier(4)
        self.health_calls: list[str] = []
        self.release = threading.Event()


class UpperPlugin:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder

    @hookimpl
    def llmos_register_providers(self, register):
        def load(request: LoadRequest) -> Upper:
            self.recorder.loads.append(request.card.name)
            if request.card.options.get("report") and request.emit is not None:
                # what a backend measures itself reaches the kernel's sinks
                request.emit(MonitorEvent(kind="upper.figures", model=request.card.name))
            time.sleep(0.05)  # loading takes a moment: concurrent first calls overlap
            return Upper(request.card, self.recorder)

        register(ProviderSpec(name="upper", load=load))

    @hookimpl
    def llmos_register_monitor_sinks(self, register):
        recorder = self.recorder

        class Sink:
            def emit(self, event):
                recorder.events.append(event)

            def close(self):
                pass

        register(MonitorSinkSpec(name="recorder", create=lambda options: Sink()))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def make_kernel(tmp_path: Path, recorder: Recorder):
    kernels: list[Kernel] = []

    def make(*overrides: str) -> Kernel:
        kernel = Kernel(
            load_config(
                overrides=list(overrides),
                env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_LOAD_PLUGINS": ""},
            )
        )
        kernel.load_plugins()
        kernel.plugins.register(UpperPlugin(recorder), "upper-plugin")
        kernel.start()
        kernels.append(kernel)
        return kernel

    yield make
    for kernel in kernels:
        kernel.stop()


def prompts(*texts: str) -> list[CompletionRequest]:
    return [CompletionRequest(prompt=t) for t in texts]


def test_a_configured_deployment_resolves_and_loads_once(make_kernel, recorder) -> None:
    kernel = make_kernel('models.shout.provider="upper"', "models.shout.options.batch=4")
    results: list[list[CompletionResult]] = []

    def call(text: str) -> None:
        results.append(kernel.call("shout", Capability.COMPLETE, prompts(text)))

    threads = [threading.Thread(target=call, args=(f"p{i}",)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert recorder.loads == ["shout"], "concurrent first requests must share one load"
    assert sorted(r[0].text for r in results) == [f"P{i}" for i in range(6)]


def test_a_registered_model_resolves_by_name_version_and_alias(make_kernel, recorder) -> None:
    kernel = make_kernel()
    kernel.registry.register(ModelCard(name="acme/up", provider="upper", description="v1"))
    kernel.registry.register(ModelCard(name="acme/up", provider="upper", description="v2"))
    kernel.registry.store.set_alias("acme/up", "prod", 1)
    assert kernel.models.resolve("acme/up").key == "acme/up@2"
    assert kernel.models.resolve("acme/up@prod").key == "acme/up@1"
    assert kernel.call("acme/up@1", "complete", prompts("hi"))[0].text == "HI"


def test_unknown_model_and_unknown_provider_say_what_to_do(make_kernel) -> None:
    kernel = make_kernel('models.orphan.provider="nope"')
    with pytest.raises(NotFoundError, match=r"'ghost' not found.*llmos models search"):
        kernel.call("ghost", "complete", prompts("x"))
    with pytest.raises(NotFoundError, match=r"provider 'nope'.*providers: upper"):
        kernel.call("orphan", "complete", prompts("x"))
    # a [models.NAME] table is checked with the rest of the config, not at its first call
    with pytest.raises(ConfigError) as caught:
        _ = make_kernel('models.bad.provider="upper"', "models.bad.colour=1").config
    assert str(caught.value) == (
        "--set models.bad.colour=1: models.bad.colour: unknown key (known: description,"
        " executor, family, format, license, max_batch_size, max_queue, max_wait_ms, options,"
        " parameters, provider, source, tags, tasks)"
    )


def test_concurrent_requests_are_grouped_into_batches(make_kernel, recorder) -> None:
    kernel = make_kernel(
        'models.up.provider="upper"', "models.up.max_wait_ms=200", "models.up.options.batch=8"
    )
    kernel.call("up", "complete", prompts("warm"))  # load first
    recorder.batches.clear()
    futures = [kernel.submit("up", "complete", prompts(f"r{i}")) for i in range(8)]
    assert [f.result(10)[0].text for f in futures] == [f"R{i}" for i in range(8)]
    assert recorder.batches == [8], "eight requests inside the wait window make one call"


def test_batching_steps_aside_for_a_model_that_batches_on_its_own(make_kernel, recorder) -> None:
    kernel = make_kernel(
        'models.up.provider="upper"', "models.up.max_wait_ms=200", "models.up.options.own=true"
    )
    futures = [kernel.submit("up", "complete", prompts(f"r{i}")) for i in range(4)]
    assert [f.result(10)[0].text for f in futures] == [f"R{i}" for i in range(4)]
    assert recorder.batches == [1, 1, 1, 1]


def test_a_model_that_batches_on_its_own_gets_concurrent_requests_at_once(
    make_kernel, recorder
) -> None:
    # Each call waits at a barrier that four concurrent calls pass: served one
    # after another, the first would break it (BrokenBarrierError).
    kernel = make_kernel(
        'models.up.provider="upper"', "models.up.options.own=true", "models.up.options.meet=true"
    )
    futures = [kernel.submit("up", "complete", prompts(f"r{i}")) for i in range(4)]
    assert [f.result(20)[0].text for f in futures] == [f"R{i}" for i in range(4)]
    assert recorder.batches == [1, 1, 1, 1]


def test_max_queue_bounds_what_a_self_batching_model_has_in_flight(make_kernel, recorder) -> None:
    kernel = make_kernel(
        'models.slow.provider="upper"',
        "models.slow.options.own=true",
        "models.slow.options.delay=0.5",
        "models.slow.max_queue=2",
    )
    kernel.call("slow", "complete", prompts("warm"))
    running = [kernel.submit("slow", "complete", prompts(t)) for t in ("a", "b")]
    with pytest.raises(Overloaded, match="2 requests queued"):
        kernel.submit("slow", "complete", prompts("c"))
    assert [f.result(10)[0].text for f in running] == ["A", "B"]
    assert kernel.call("slow", "complete", prompts("d"))[0].text == "D"


def test_a_provider_sends_its_own_figures_to_the_sinks(make_kernel, recorder) -> None:
    kernel = make_kernel('models.up.provider="upper"', "models.up.options.report=true")
    kernel.call("up", "complete", prompts("x"))
    kernel.bus.stop()  # deliver what is queued
    assert [e.model for e in recorder.events if e.kind == "upper.figures"] == ["up"]


def test_one_bad_request_does_not_fail_its_batch_neighbours(make_kernel, recorder) -> None:
    kernel = make_kernel('models.up.provider="upper"', "models.up.max_wait_ms=200")
    kernel.call("up", "complete", prompts("warm"))
    futures = [kernel.submit("up", "complete", prompts(t)) for t in ("a", "boom", "c")]
    assert futures[0].result(10)[0].text == "A"
    assert futures[2].result(10)[0].text == "C"
    with pytest.raises(ValueError, match="boom"):
        futures[1].result(10)


def test_a_full_queue_answers_overloaded(make_kernel, recorder) -> None:
    kernel = make_kernel(
        'models.slow.provider="upper"',
        "models.slow.options.delay=0.5",
        "models.slow.max_queue=2",
        "models.slow.options.batch=1",
    )
    first = kernel.submit("slow", "complete", prompts("a"))
    assert recorder.started.wait(5)
    queued = [kernel.submit("slow", "complete", prompts(t)) for t in ("b", "c")]
    with pytest.raises(Overloaded, match="limit 2"):
        kernel.submit("slow", "complete", prompts("d"))
    assert [f.result(10)[0].text for f in (first, *queued)] == ["A", "B", "C"]
    rejected = [e for e in recorder.events if e.fields.get("status") == "rejected"]
    assert len(rejected) == 1 and rejected[0].model == "slow"


def test_timeout_takes_the_request_out_of_the_queue(make_kernel, recorder) -> None:
    kernel = make_kernel(
        'models.slow.provider="upper"',
        "models.slow.options.delay=0.5",
        "models.slow.options.batch=1",
    )
    blocker = kernel.submit("slow", "complete", prompts("a"))
    assert recorder.started.wait(5)
    with pytest.raises(RequestTimeout):
        kernel.call("slow", "complete", prompts("late"), timeout=0.1)
    blocker.result(10)
    kernel.call("slow", "complete", prompts("b"))
    assert recorder.batches == [1, 1], "the timed-out request never reached the model"


def test_cancelling_a_stream_stops_the_generation(make_kernel, recorder) -> None:
    kernel = make_kernel('models.up.provider="upper"')
    handle = kernel.stream("up", CompletionRequest(prompt="x"))
    first = [handle.get(timeout=5) for _ in range(3)]
    assert [c.text for c in first] == ["0", "1", "2"]
    handle.cancel()
    assert recorder.stream_closed.wait(5), "the model's generator was closed"
    assert recorder.tokens < 100
    time.sleep(0.1)
    event = next(e for e in recorder.events if e.capability == "stream")
    assert event.fields["status"] == "cancelled" and event.fields["ttft_s"] > 0


def test_every_call_emits_one_request_event(make_kernel, recorder) -> None:
    kernel = make_kernel('models.up.provider="upper"')
    kernel.call("up", "complete", prompts("abc", "de"))
    kernel.stop()
    (event,) = [e for e in recorder.events if e.kind == "request"]
    assert (event.model, event.capability) == ("up", "complete")
    fields = event.fields
    assert fields["status"] == "ok" and fields["requests"] == 2 and fields["batch_size"] == 2
    assert (fields["tokens_in"], fields["tokens_out"]) == (5, 5)
    assert fields["latency_s"] >= fields["model_s"] >= 0 and fields["queue_wait_s"] >= 0
    assert any(e.kind == "model.loaded" and e.model == "up" for e in recorder.events)


def test_capability_not_declared_is_refused_before_queueing(make_kernel) -> None:
    kernel = make_kernel('models.up.provider="upper"')
    with pytest.raises(CapabilityNotSupported, match="supports: complete, stream"):
        kernel.call("up", "embed", [])


def test_chat_features_a_model_does_not_list_are_refused_by_the_kernel_too(
    make_kernel, recorder
) -> None:
    """Not only the HTTP layer: a plugin or CLI calling the kernel with
    response_format or tools on a model without them gets a 400 naming the
    field, never free text where JSON or a tool call was asked for."""
    kernel = make_kernel('models.up.provider="upper"')
    ask = (ChatMessage("user", "x"),)
    json_only = ChatRequest(messages=ask, response_format=ResponseFormat(type="json_object"))
    with pytest.raises(UsageError, match="does not support response_format") as refused:
        kernel.stream("up", json_only)
    assert refused.value.param == "response_format"
    tools = (Tool(name="f", parameters={"type": "object"}),)
    with pytest.raises(UsageError, match="does not support tools"):
        kernel.stream("up", ChatRequest(messages=ask, tools=tools))
    assert recorder.tokens == 0, "the model never ran"


def test_idle_models_are_unloaded_lru_under_the_memory_budget(make_kernel, recorder) -> None:
    kernel = make_kernel(
        "runtime.memory_budget_mb=10",
        'models.a.provider="upper"',
        "models.a.parameters=1500000",  # 6 MB at 4 bytes a parameter
        'models.b.provider="upper"',
        "models.b.parameters=1500000",
    )
    kernel.call("a", "complete", prompts("x"))
    kernel.call("b", "complete", prompts("x"))
    assert recorder.closed == ["a"], "a was idle and least recently used"
    assert [w.name for w in kernel.models.loaded()] == ["b"]
    kernel.call("a", "complete", prompts("x"))
    assert recorder.loads == ["a", "b", "a"]


def test_a_remote_model_takes_no_room_from_local_ones(make_kernel, recorder) -> None:
    kernel = make_kernel(
        "runtime.memory_budget_mb=10",
        'models.a.provider="upper"',
        "models.a.parameters=1500000",  # 6 MB
        'models.far.provider="upper"',
        'models.far.format="remote-api"',
        "models.far.parameters=70000000000",  # 70B, served elsewhere
    )
    kernel.call("a", "complete", prompts("x"))
    kernel.call("far", "complete", prompts("x"))
    assert recorder.closed == [], "nothing was unloaded for weights that are not here"
    assert sorted(w.name for w in kernel.models.loaded()) == ["a", "far"]


def test_acall_works_from_asyncio_and_cancellation_frees_the_slot(make_kernel, recorder) -> None:
    kernel = make_kernel(
        'models.slow.provider="upper"',
        "models.slow.options.delay=0.3",
        "models.slow.options.batch=1",
    )

    async def scenario() -> str:
        blocker = asyncio.ensure_future(kernel.acall("slow", "complete", prompts("a")))
        await asyncio.sleep(0.05)
        doomed = asyncio.ensure_future(kernel.acall("slow", "complete", prompts("gone")))
        await asyncio.sleep(0.05)
        doomed.cancel()  # the client went away while queued
        await blocker
        return (await kernel.acall("slow", "complete", prompts("b")))[0].text

    assert asyncio.run(scenario()) == "B"
    assert recorder.batches == [1, 1], "the cancelled request never reached the model"


def test_without_a_wait_requests_queued_behind_a_busy_model_share_its_next_call(
    make_kernel, recorder
) -> None:
    kernel = make_kernel('models.slow.provider="upper"', "models.slow.options.delay=0.3")
    first = kernel.submit("slow", "complete", prompts("a"))
    assert recorder.started.wait(5)
    queued = [kernel.submit("slow", "complete", prompts(f"q{i}")) for i in range(5)]
    assert first.result(10)[0].text == "A"
    assert [f.result(10)[0].text for f in queued] == [f"Q{i}" for i in range(5)]
    assert recorder.batches == [1, 5], "an idle model answers at once; the queue forms one batch"


def test_a_model_idle_past_idle_unload_s_is_unloaded(make_kernel, recorder) -> None:
    kernel = make_kernel("runtime.idle_unload_s=0.2", 'models.up.provider="upper"')
    kernel.call("up", "complete", prompts("x"))
    deadline = time.monotonic() + 5
    while kernel.models.loaded() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert kernel.models.loaded() == [] and recorder.closed == ["up"]
    assert any(e.kind == "model.unloaded" and e.fields["why"] == "idle" for e in recorder.events)


def test_preload_loads_models_in_the_background_at_start(make_kernel, recorder) -> None:
    make_kernel('models.up.provider="upper"', 'runtime.preload=["up", "ghost"]')
    deadline = time.monotonic() + 5
    while recorder.loads != ["up"] and time.monotonic() < deadline:
        time.sleep(0.02)
    assert recorder.loads == ["up"], "preloaded without any request; the unknown one is logged"


def test_a_call_larger_than_the_whole_queue_is_a_usage_error(make_kernel) -> None:
    kernel = make_kernel('models.up.provider="upper"', "models.up.max_queue=4")
    with pytest.raises(UsageError, match=r"queues at most 4 .*smaller batches"):
        kernel.call("up", "complete", prompts(*"abcde"))
    assert [r.text for r in kernel.call("up", "complete", prompts(*"abcd"))] == list("ABCD")


# --------------------------------------------------------------------------
# a plugin's model made of other models: LoadRequest.models, DispatchingModel


class Relay:
    """A dispatching model (what a remote executor's handle is): each call
    goes on, unchanged, to the model its card names, through the kernel."""

    max_batch_size = None

    def __init__(self, request: LoadRequest) -> None:
        assert request.models is not None
        self.card = request.card
        self.capabilities = frozenset({Capability.COMPLETE, Capability.STREAM})
        self.models = request.models
        self.to = request.card.options["to"]
        self.closed = False

    def submit(self, capability, requests):
        return self.models.submit(self.to, capability, requests)

    def submit_stream(self, request):
        return self.models.stream(self.to, request)

    def close(self) -> None:
        self.closed = True


class RelayPlugin:
    @hookimpl
    def llmos_register_providers(self, register):
        register(ProviderSpec(name="relay", load=Relay, batching=False))


def test_a_plugins_dispatching_model_calls_others_through_the_kernel(make_kernel, recorder) -> None:
    kernel = make_kernel(
        'models.shout.provider="upper"',
        'models.relay.provider="relay"',
        'models.relay.options.to="shout"',
    )
    kernel.plugins.register(RelayPlugin(), "relay-plugin")
    (result,) = kernel.call("relay", Capability.COMPLETE, prompts("hi"))
    assert result.text == "HI" and recorder.loads == ["shout"]
    worker = kernel.models.get("relay")
    assert isinstance(worker.model, Relay), "the kernel calls it directly, with no queue"
    assert worker.queued == 0 and not worker.busy
    chunks = kernel.stream("relay", CompletionRequest(prompt="x"))
    assert next(iter(chunks)).text == "0"
    chunks.cancel()
    with pytest.raises(CapabilityNotSupported, match="'relay' does not support embed"):
        kernel.call("relay", Capability.EMBED, [])
    kernel.bus.flush()
    # the model that computed the answer reports it, the relay adds nothing
    assert {e.model for e in recorder.events if e.kind == "request"} == {"shout"}
    model = worker.model
    assert kernel.models.unload("relay") and model.closed
    assert "shout" in [w.name for w in kernel.models.loaded()]


# --------------------------------------------------------------------------
# executors: [runtime] executor places models somewhere else


class PooledModel:
    """A placed model as an executor returns it: its calls run on a thread
    pool of the 'replica' (a real executor: a remote process)."""

    max_batch_size = None

    def __init__(self, model: Upper, pool: concurrent.futures.ThreadPoolExecutor) -> None:
        self.card = model.card
        self.capabilities = model.capabilities
        self.model = model
        self.pool = pool

    def submit(self, capability, requests):
        return self.pool.submit(getattr(self.model, str(capability)), list(requests))

    def submit_stream(self, request):
        raise CapabilityNotSupported("no streams on this replica")

    def health(self):
        """As the card's ``health`` option says: the replicas' state, an
        unreachable cluster, an answer that is no mapping, or no answer."""
        self.model.recorder.health_calls.append(self.card.name)
        how = self.card.options.get("health")
        if how == "raise":
            raise RuntimeError("the cluster is unreachable")
        if how == "text":
            return "fine"
        if how == "hang":
            self.model.recorder.release.wait(30)
        return {"status": "HEALTHY", "replicas": {"RUNNING": 2}}

    def close(self) -> None:
        self.model.close()


class PoolExecutor:
    def __init__(self, recorder: Recorder, broken: bool = False) -> None:
        self.recorder = recorder
        self.broken = broken
        self.placed: list[PlacementRequest] = []
        self.pool = concurrent.futures.ThreadPoolExecutor(2)
        self.closed = False

    def place(self, request: PlacementRequest):
        self.placed.append(request)
        if self.broken:
            return object()  # not a DispatchingModel
        # a replica rebuilds the model from plain values, with the provider named
        assert request.provider in ("upper", "strict")
        return PooledModel(Upper(request.card, self.recorder), self.pool)

    def close(self) -> None:
        self.closed = True
        self.pool.shutdown()


class PoolPlugin:
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.executors: list[PoolExecutor] = []

    @hookimpl
    def llmos_register_executors(self, register):
        def create(context, broken=False):
            assert context.options == {"replicas": 2}  # its [plugins.pool-plugin] table
            self.executors.append(PoolExecutor(self.recorder, broken))
            return self.executors[-1]

        register(ExecutorSpec(name="pool", create=create, description="a test pool"))
        register(ExecutorSpec(name="broken", create=lambda c: create(c, broken=True)))


@pytest.fixture
def placing_kernel(tmp_path: Path, recorder: Recorder):
    kernels: list[tuple[Kernel, PoolPlugin]] = []

    def make(*overrides: str) -> tuple[Kernel, PoolPlugin]:
        kernel = Kernel(
            load_config(
                overrides=['plugins."pool-plugin".replicas=2', *overrides],
                env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_LOAD_PLUGINS": ""},
            )
        )
        kernel.load_plugins()
        kernel.plugins.register(UpperPlugin(recorder), "upper-plugin")
        pool = PoolPlugin(recorder)
        kernel.plugins.register(pool, "pool-plugin")
        kernel.start()
        kernels.append((kernel, pool))
        return kernel, pool

    yield make
    for kernel, _ in kernels:
        kernel.stop()


def test_the_configured_executor_places_models_and_the_kernel_dispatches_to_them(
    placing_kernel, recorder
) -> None:
    kernel, pool = placing_kernel(
        'runtime.executor="pool"',
        'models.shout.provider="upper"',
        "models.shout.max_batch_size=4",
        'models.here.provider="upper"',
        'models.here.executor="local"',
        'groups.g.deployments=["shout"]',
    )
    (result,) = kernel.call("shout", Capability.COMPLETE, prompts("hi"))
    assert result.text == "HI"
    (executor,) = pool.executors
    (placed,) = executor.placed
    assert (placed.key, placed.provider, placed.plugin) == ("shout", "upper", "upper-plugin")
    assert placed.max_batch_size == 4 and placed.batching and placed.emit is not None
    assert recorder.loads == [], "the provider's load ran on the replica, not in the kernel"
    # a deployment that says local is loaded here; a group runs here, its member is placed
    kernel.call("here", Capability.COMPLETE, prompts("x"))
    assert recorder.loads == ["here"]
    (routed,) = kernel.call("g", Capability.COMPLETE, prompts("y"))
    assert routed.text == "Y" and [p.key for p in executor.placed] == ["shout"]
    kernel.bus.flush()
    loaded = {e.model: e.fields for e in recorder.events if e.kind == "model.loaded"}
    assert loaded["shout"]["executor"] == "pool" and "executor" not in loaded["here"]
    kernel.stop()
    assert executor.closed and recorder.closed.count("shout") == 1


def test_kernel_executor_is_the_one_models_are_placed_on_created_once(placing_kernel) -> None:
    kernel, pool = placing_kernel('runtime.executor="pool"', 'models.shout.provider="upper"')
    assert pool.executors == [], "not created at start"
    executor = kernel.executor("pool")
    assert pool.executors == [executor], "created on first use, with its plugin's context"
    kernel.call("shout", Capability.COMPLETE, prompts("hi"))
    assert kernel.executor("pool") is executor, "the model was placed on the same one"
    assert [p.key for p in executor.placed] == ["shout"] and len(pool.executors) == 1
    with pytest.raises(
        ConfigError, match=r"executor 'ray'.*executors: local, broken, pool\).*install"
    ):
        kernel.executor("ray")
    with pytest.raises(ConfigError, match=r"'local' is the kernel's own.*executors: broken, pool"):
        kernel.executor("local")
    kernel.stop()
    assert executor.closed


def test_top_shows_placed_models_health_and_a_failing_or_hung_one_as_its_error(
    placing_kernel, recorder
) -> None:
    kernel, _ = placing_kernel(
        'runtime.executor="pool"',
        *(f'models.{n}.provider="upper"' for n in ("ok", "down", "odd", "hung", "here")),
        'models.down.options.health="raise"',
        'models.odd.options.health="text"',
        'models.hung.options.health="hang"',
        'models.here.executor="local"',
    )
    for name in ("ok", "down", "odd", "hung", "here"):
        kernel.call(name, Capability.COMPLETE, prompts("x"))
    runner = CliRunner()
    try:
        with serve_in_thread(kernel) as url:
            started = time.monotonic()
            shown = runner.invoke(cli, ["top", "--url", url, "--json"], catch_exceptions=False)
            took = time.monotonic() - started
            assert shown.exit_code == 0, shown.output
            models = json.loads(shown.output)["models"]
            assert {n: models[n]["placed"] for n in models} == {
                **dict.fromkeys(("ok", "down", "odd", "hung"), "pool"),
                "here": None,
            }
            assert models["ok"]["health"] == {"status": "HEALTHY", "replicas": {"RUNNING": 2}}
            assert models["down"]["health"] == {"error": "RuntimeError: the cluster is unreachable"}
            assert models["odd"]["health"] == {
                "error": "TypeError: health() returned str, not a mapping"
            }
            assert models["hung"]["health"]["error"].startswith("health() has not answered in 2.")
            assert "health" not in models["here"], "a model computed here offers none"
            # the hung call held up the listing for HEALTH_TIMEOUT_S, not more
            assert HEALTH_TIMEOUT_S <= took < HEALTH_TIMEOUT_S + 3
            started = time.monotonic()
            frame = runner.invoke(cli, ["top", "--url", url, "--once"], catch_exceptions=False)
            assert time.monotonic() - started < 1.5, "the call still hung is not waited for again"
            assert recorder.health_calls.count("hung") == 1, "nor asked again"
            assert recorder.health_calls.count("ok") == 2
            rows = {
                line.strip("│").split("│")[0].strip(): line
                for line in frame.output.splitlines()
                if line.startswith("│")
            }
            assert "pool HEALTHY 2 RUNNING" in rows["ok"]
            assert "pool error: RuntimeError: the cluster is unreachable" in rows["down"]
            assert "pool error: health() has not answered in" in rows["hung"]
            assert rows["here"].rstrip(" │").endswith(" -")
    finally:
        recorder.release.set()


def test_an_unknown_or_broken_executor_is_refused_with_the_known_ones(
    placing_kernel, tmp_path
) -> None:
    with pytest.raises(ConfigError, match=r"executor 'ray'.*executors: local, broken, pool"):
        placing_kernel('runtime.executor="ray"')
    kernel, _ = placing_kernel(
        'models.a.provider="upper"',
        'models.a.executor="nowhere"',
        'models.b.provider="upper"',
        'models.b.executor="broken"',
    )
    with pytest.raises(ConfigError, match=r"executor 'nowhere'.*executors: local, broken, pool"):
        kernel.call("a", Capability.COMPLETE, prompts("x"))
    with pytest.raises(PluginError, match=r"'broken' placed 'b' but returned object"):
        kernel.call("b", Capability.COMPLETE, prompts("x"))


class StrictPlugin:
    """A provider whose check refuses any option it does not know, as
    llmos-openai's and llmos-llamacpp's do; it records what it is shown."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.checked: list[dict] = []
        self.loaded: list[dict] = []

    @hookimpl
    def llmos_register_providers(self, register):
        def check(request):
            self.checked.append(dict(request.card.options))
            unknown = sorted(set(request.card.options) - {"delay", "batch"})
            if unknown:
                raise UsageError(f"unknown option(s) {', '.join(unknown)}", param="options")
            return request.card.options

        def load(request):
            self.loaded.append(dict(request.card.options))
            return Upper(request.card, self.recorder)

        register(ProviderSpec(name="strict", load=load, check=check))


def test_a_cards_table_for_an_executor_goes_to_it_and_never_to_the_provider(
    placing_kernel, recorder
) -> None:
    kernel, pool = placing_kernel(
        'runtime.executor="pool"',
        'models.here.provider="strict"',
        'models.here.executor="local"',
        "models.here.options.pool={replicas=3}",
        "models.here.options.broken={x=1}",
    )
    strict = StrictPlugin(recorder)
    kernel.plugins.register(strict, "strict-plugin")
    card = ModelCard(
        name="placed", provider="strict", options={"batch": 4, "pool": {"replicas": 3}}
    )
    assert kernel.registry.register(card).options == card.options, "kept on the card"
    assert strict.checked == [{"batch": 4}], "its provider's check is not shown it"
    kernel.call("placed", Capability.COMPLETE, prompts("hi"))
    (placed,) = pool.executors[0].placed
    assert placed.card.options == {"batch": 4, "pool": {"replicas": 3}}, "the executor gets it"
    assert strict.checked == [{"batch": 4}] * 2, "checked again at load, still without it"
    # placed on pool, another executor's table is not sent along
    kernel.registry.register(attrs.evolve(card, options={"batch": 4, "broken": {"x": 1}}))
    kernel.call("placed", Capability.COMPLETE, prompts("hi"))  # still version 1, loaded
    kernel.models.unload("placed@1")
    kernel.call("placed@2", Capability.COMPLETE, prompts("hi"))
    assert pool.executors[0].placed[-1].card.options == {"batch": 4}
    # a model loaded here: its provider loads it without any executor's table
    (result,) = kernel.call("here", Capability.COMPLETE, prompts("x"))
    assert result.text == "X" and strict.loaded == [{}]
    # a key that names no executor is still the provider's to refuse
    with pytest.raises(UsageError, match=r"unknown option\(s\) poool"):
        kernel.registry.register(attrs.evolve(card, options={"poool": {"replicas": 3}}))


def test_a_replica_shows_its_provider_no_executors_table(
    tmp_path: Path, recorder: Recorder
) -> None:
    plugins = PluginManager()
    plugins.load(entry_points=[])
    strict = StrictPlugin(recorder)
    plugins.register(strict, "strict-plugin")
    plugins.register(PoolPlugin(recorder), "pool-plugin")
    card = ModelCard(name="shout", provider="strict", options={"pool": {"replicas": 3}})
    request = PlacementRequest(key="shout", card=card, provider="strict", plugin="strict-plugin")
    replica = Replica(request, home=tmp_path, plugins=plugins)
    try:
        assert strict.checked == [{}] and strict.loaded == [{}]
        assert replica.card.options == {}
    finally:
        replica.close()


def test_unloading_a_dispatching_model_waits_for_its_calls_in_flight(
    placing_kernel, recorder
) -> None:
    kernel, pool = placing_kernel('runtime.executor="pool"', 'models.slow.provider="upper"')
    kernel.call("slow", Capability.COMPLETE, prompts("warm"))  # placed
    executor = pool.executors[0]
    replica = kernel.models.get("slow").model
    replica.model.card = attrs.evolve(replica.model.card, options={"delay": 0.5})
    future = kernel.submit("slow", Capability.COMPLETE, prompts("late"))
    assert recorder.started.wait(10), "the call is running on the replica"
    assert kernel.models.unload("slow")
    assert future.done() and future.result()[0].text == "LATE", "it finished first"
    assert recorder.closed == ["slow"] and not executor.closed


def test_a_replica_loads_the_named_provider_here_and_batches_like_the_kernel(
    tmp_path: Path, recorder: Recorder
) -> None:
    plugins = PluginManager()
    plugins.load(entry_points=[])
    plugins.register(UpperPlugin(recorder), "upper-plugin")
    card = ModelCard(name="shout", provider="upper", options={"delay": 0.2})
    request = PlacementRequest(key="shout", card=card, provider="upper", plugin="upper-plugin")
    events: list[MonitorEvent] = []
    replica = Replica(request, home=tmp_path, emit=events.append, plugins=plugins)
    try:
        assert recorder.loads == ["shout"] and (tmp_path / "cache" / "upper").is_dir()
        first = replica.submit(Capability.COMPLETE, prompts("a"))
        assert recorder.started.wait(10)
        # queued while the model is busy: they share its next call
        rest = [replica.submit(Capability.COMPLETE, prompts(t)) for t in ("b", "c")]
        assert [f.result(10)[0].text for f in (first, *rest)] == ["A", "B", "C"]
        assert recorder.batches == [1, 2]
        assert [e.fields["batch_size"] for e in events if e.kind == "request"] == [1, 2, 2]
    finally:
        replica.close()
    assert recorder.closed == ["shout"]
    missing = attrs.evolve(request, provider="vllm")
    with pytest.raises(NotFoundError, match=r"provider 'vllm'.*install llmos-vllm on every node"):
        Replica(missing, home=tmp_path, plugins=plugins)


class PathsPlugin:
    """The ``upper`` provider, keeping the path each load was given."""

    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.paths: list[Path | None] = []

    @hookimpl
    def llmos_register_providers(self, register):
        def load(request: LoadRequest) -> Upper:
            self.paths.append(request.path)
            return Upper(request.card, self.recorder)

        register(ProviderSpec(name="upper", load=load))


def test_a_replica_fetches_an_artifact_at_a_url_root_into_its_own_nodes_cache(
    placing_kernel, recorder, tmp_path: Path
) -> None:
    root = (tmp_path / "bucket").as_uri()  # a URL root, as s3://… is for a cluster
    kernel, pool = placing_kernel('runtime.executor="pool"', f'artifacts.root="{root}"')
    store = kernel.registry.policy.artifacts
    weights = tmp_path / "weights"
    write_safetensors(weights / "model.safetensors", {"w": [2, 2]})
    url = store.put(weights, "shout")
    kernel.registry.register(ModelCard(name="shout", provider="upper", source=url))
    kernel.call("shout", Capability.COMPLETE, prompts("hi"))
    (placed,) = pool.executors[0].placed
    assert placed.artifacts is store, "the executor gets the store to fetch from"
    digest = url.rsplit("/", 1)[1]

    # a replica on another node fetches it into that node's cache, verified
    node = tmp_path / "node-b"
    plugins = PluginManager()
    plugins.load(entry_points=[])
    paths = PathsPlugin(recorder)
    plugins.register(paths, "upper-plugin")
    replica = Replica(placed, home=node, plugins=plugins)
    try:
        (path,) = paths.paths
        assert path is not None and path.is_relative_to(node / "cache" / "artifacts" / digest)
        assert (path / "model.safetensors").is_file() if path.is_dir() else path.is_file()
    finally:
        replica.close()
    # a changed copy in that node's cache is refused, not served
    (node / "cache" / "artifacts" / digest / "model.safetensors").write_bytes(b"not weights")
    Replica(placed, home=node, plugins=plugins).close()  # fetched again, verified
    assert paths.paths[-1] == path


def test_a_local_artifact_root_ships_no_store_the_nodes_read_it_by_path(
    placing_kernel, tmp_path: Path
) -> None:
    kernel, pool = placing_kernel('runtime.executor="pool"', 'models.shout.provider="upper"')
    assert kernel.registry.policy.artifacts is not None and kernel.registry.policy.artifacts.local
    kernel.call("shout", Capability.COMPLETE, prompts("hi"))
    (placed,) = pool.executors[0].placed
    assert placed.artifacts is None
