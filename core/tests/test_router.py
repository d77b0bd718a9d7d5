"""Deployment groups: retries, cooldowns, fallbacks and strategies, on real
``table`` models (:mod:`tables`) that fail while a file exists."""

from __future__ import annotations

import concurrent.futures
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.errors import ConfigError, Unavailable, UsageError
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.testing import EventRecorder, serve_in_thread
from llmos.types import (
    Capability,
    ChatMessage,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    ModelCard,
    ProviderSpec,
)

from .tables import add, install, table_kernel


@pytest.fixture
def table_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from install(tmp_path / "site", monkeypatch)


@pytest.fixture
def down(tmp_path: Path) -> dict[str, Path]:
    """Per deployment, the file whose existence makes it fail."""
    return {name: tmp_path / f"{name}.down" for name in ("a", "b", "c")}


@pytest.fixture
def make_kernel(
    tmp_path: Path, table_module: Any, down: dict[str, Path]
) -> Iterator[Callable[..., Kernel]]:
    kernels: list[Kernel] = []

    def make(*overrides: str, recorder: EventRecorder | None = None, **kinds: str) -> Kernel:
        kernel = table_kernel(tmp_path / "home", overrides, recorder)
        if not kernels:
            for name in ("a", "b", "c"):
                add(
                    kernel,
                    name,
                    capabilities=["classify", "complete", "chat", "stream"],
                    default={name: 1.0},
                    answers={"hi": f"hello from {name}"},
                    fail_file=str(down[name]),
                    fail_kind=kinds.get(name, "unavailable"),
                )
        kernel.start()
        kernels.append(kernel)
        return kernel

    yield make
    for kernel in kernels:
        kernel.stop()


def group(name: str, **settings: Any) -> list[str]:
    """``--set`` overrides declaring ``[groups.NAME]``."""
    out = []
    for key, value in settings.items():
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, list | tuple):
            text = "[" + ", ".join(f'"{v}"' for v in value) + "]"
        elif isinstance(value, str):
            text = f'"{value}"'
        else:
            text = str(value)
        out.append(f"groups.{name}.{key}={text}")
    return out


def ask(kernel: Kernel, model: str = "g") -> Any:
    (result,) = kernel.call(model, Capability.CLASSIFY, [ClassifyRequest(text="x")])
    return result


def served_by(result: Any) -> str:
    return result.label  # each table model answers its own name


def calls(table_module: Any, name: str) -> int:
    return len(table_module().CALLS.get(name, []))


# --------------------------------------------------------------------------


def test_round_robin_spreads_calls_and_says_who_answered(make_kernel, table_module) -> None:
    kernel = make_kernel(*group("g", deployments=["a", "b"], strategy="round-robin"))
    answers = [served_by(ask(kernel)) for _ in range(4)]
    assert sorted(answers) == ["a", "a", "b", "b"] and answers[0] != answers[1]
    meta = ask(kernel).meta["router"]
    assert meta["group"] == "g" and meta["deployment"] in ("a", "b")
    assert [a["deployment"] for a in meta["attempts"]] == [meta["deployment"]]


def test_a_failing_deployment_is_retried_elsewhere_then_cooled_down(
    make_kernel, table_module, down: dict[str, Path]
) -> None:
    recorder = EventRecorder()
    kernel = make_kernel(
        *group(
            "g",
            deployments=["a", "b"],
            strategy="round-robin",
            retries=1,
            backoff_ms=1,
            cooldown_failures=2,
            cooldown_s=0.5,
        ),
        recorder=recorder,
    )
    down["a"].touch()
    results = [ask(kernel) for _ in range(6)]
    assert {served_by(r) for r in results} == {"b"}, "every request was answered by b"
    failed = [r for r in results if len(r.meta["router"]["attempts"]) == 2]
    assert failed, "some requests went to a first"
    first, second = failed[0].meta["router"]["attempts"]
    assert first["deployment"] == "a" and "a is down" in first["error"]
    assert second == {**second, "deployment": "b"} and "error" not in second
    # two failures cooled a down: it was asked twice, not once per request
    assert calls(table_module, "a") == 2
    kernel.bus.stop()
    kinds = [e.kind for e in recorder.events if e.kind.startswith("router.")]
    assert kinds.count("router.cooldown") == 1 and "router.retry" in kinds

    # back after its cooldown, once it works again
    down["a"].unlink()
    time.sleep(0.6)
    assert "a" in {served_by(ask(kernel)) for _ in range(4)}


def test_a_group_of_one_cools_down_and_fails_fast_or_waits(
    make_kernel, table_module, down: dict[str, Path]
) -> None:
    kernel = make_kernel(
        *group("g", deployments=["a"], retries=2, backoff_ms=1, cooldown_failures=2, cooldown_s=5),
        *group(
            "patient",
            deployments=["b"],
            retries=1,
            backoff_ms=1,
            cooldown_failures=2,
            cooldown_s=0.4,
            wait_for_cooldown=True,
            max_wait_s=5,
        ),
    )
    down["a"].touch()
    with pytest.raises(Unavailable, match=r"group 'g' could not answer: every deployment"):
        ask(kernel)
    assert calls(table_module, "a") == 2, "retried until cooled down, then stopped"
    started = time.monotonic()
    with pytest.raises(Unavailable, match="cooling down for"):
        ask(kernel)
    assert time.monotonic() - started < 0.5 and calls(table_module, "a") == 2, (
        "an outage costs one cooldown, not three tries per request"
    )

    down["b"].touch()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(ask, kernel, "patient")
        time.sleep(0.2)
        down["b"].unlink()  # b recovers while the request waits out the cooldown
        result = waiting.result(timeout=10)
    assert served_by(result) == "b"
    attempts = result.meta["router"]["attempts"]
    assert [a["deployment"] for a in attempts] == ["b", "b", "b"]
    assert "error" in attempts[0] and "error" not in attempts[-1]


def test_a_request_at_fault_is_not_retried_and_counts_against_nobody(
    make_kernel, table_module, down: dict[str, Path]
) -> None:
    kernel = make_kernel(
        *group("g", deployments=["a", "b"], retries=3, cooldown_failures=1), a="usage"
    )
    down["a"].touch()
    errors = 0
    for _ in range(4):
        try:
            assert served_by(ask(kernel)) == "b"
        except UsageError as exc:
            assert "a refuses this request" in exc.message
            errors += 1
    assert errors == 2, "a's 400s came back as they are, not retried on b"
    assert kernel.router.status()["g"]["deployments"]["a"]["cooling_down_s"] == 0


def test_fallbacks_are_tried_in_order_when_the_group_is_spent(
    make_kernel, table_module, down: dict[str, Path]
) -> None:
    recorder = EventRecorder()
    kernel = make_kernel(
        *group("g", deployments=["a"], retries=0, fallbacks=["h", "c"]),
        *group("h", deployments=["b"], retries=0),
        recorder=recorder,
    )
    down["a"].touch()
    down["b"].touch()
    result = ask(kernel)
    assert served_by(result) == "c"
    attempts = result.meta["router"]["attempts"]
    steps = [("deployment", a["deployment"]) if "deployment" in a else ("fallback", a["fallback"])
             for a in attempts]  # fmt: skip
    assert steps == [
        ("deployment", "a"),
        ("fallback", "h"),
        ("deployment", "b"),
        ("fallback", "c"),
        ("deployment", "c"),
    ]
    assert result.meta["router"]["group"] == "g" and result.meta["router"]["deployment"] == "c"
    kernel.bus.stop()
    hops = [e.fields["to"] for e in recorder.events if e.kind == "router.fallback"]
    assert hops == ["h", "c"]


def test_least_busy_and_latency_based_prefer_the_free_and_the_fast(
    make_kernel, table_module, tmp_path: Path
) -> None:
    kernel = make_kernel(
        *group("busy", deployments=["slow", "fast"], strategy="least-busy"),
        *group("quick", deployments=["slow", "fast"], strategy="latency-based"),
    )
    add(kernel, "slow", default={"slow": 1.0}, delay_s=0.3)
    add(kernel, "fast", default={"fast": 1.0})
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda _: served_by(ask(kernel, "busy")), range(8)))
    assert answers.count("fast") > answers.count("slow")
    first = [served_by(ask(kernel, "quick")) for _ in range(2)]
    assert sorted(first) == ["fast", "slow"], "each is tried once to learn its latency"
    assert {served_by(ask(kernel, "quick")) for _ in range(5)} == {"fast"}


def test_groups_serve_every_route_and_bad_tables_fail_their_own_calls(
    make_kernel, table_module
) -> None:
    kernel = make_kernel(
        *group("g", deployments=["a", "b"]),
        "groups.broken.deployments=[]",
    )
    (text,) = kernel.call("g", Capability.COMPLETE, [CompletionRequest(prompt="hi")])
    assert text.text.startswith("hello from ")
    (chat,) = kernel.call("g", Capability.CHAT, [ChatRequest(messages=[ChatMessage("user", "hi")])])
    assert chat.message.content.startswith("hello from ")
    assert "".join(c.text for c in kernel.stream("g", CompletionRequest(prompt="hi"))).startswith(
        "hello from "
    )
    # a provider whose stream() raises at once ends the stream with its error
    add(kernel, "nostream", capabilities=["stream"], stream_raises=True)
    with pytest.raises(RuntimeError, match="no streams today"):
        list(kernel.stream("nostream", CompletionRequest(prompt="hi")))
    with pytest.raises(ConfigError, match=r"\[groups.broken\]: deployments must be"):
        ask(kernel, "broken")
    with serve_in_thread(kernel) as url:
        body = httpx.post(f"{url}/api/classify", json={"model": "g", "texts": ["x"]}).json()
        meta = body["results"][0]["llmos"]["meta"]["router"]
        assert meta["group"] == "g" and meta["deployment"] == body["results"][0]["label"]
        chat_body = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "g", "messages": [{"role": "user", "content": "hi"}]},
        ).json()
        assert chat_body["choices"][0]["message"]["content"].startswith("hello from ")
        assert "router" in chat_body["choices"][0]["llmos"]["meta"]
        groups = httpx.get(f"{url}/api/groups").json()["data"]
        assert "deployments must be" in groups["broken"]["error"]
        state = groups["g"]
        assert state["strategy"] == "round-robin"
        assert sum(d["calls"] for d in state["deployments"].values()) == 4  # streams aside
        listed = [m["id"] for m in httpx.get(f"{url}/v1/models").json()["data"]]
        assert "g" in listed
    with pytest.raises(ConfigError, match="own deployment"):
        from llmos.runtime.router import GroupSettings

        GroupSettings.from_table("g", {"deployments": ["g"]})


def test_a_caller_that_gives_up_leaves_the_router_quiet(
    make_kernel, table_module, down: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    kernel = make_kernel(*group("g", deployments=["a"], retries=1, backoff_ms=300), a="crash")
    down["a"].touch()
    future = kernel.submit("g", Capability.CLASSIFY, [ClassifyRequest(text="x")])
    time.sleep(0.05)  # the first attempt failed; the retry waits out its backoff
    assert future.cancel(), "the caller gives up (a timeout, a client gone)"
    time.sleep(0.5)  # the retry runs, finds the call cancelled and stops
    assert calls(table_module, "a") == 1, "no attempt after the caller left"
    assert "InvalidStateError" not in caplog.text


def test_a_caller_that_gives_up_stops_the_attempt_under_way(make_kernel, table_module) -> None:
    """Cancelling a group call cancels the deployment call it is waiting on,
    so the deployment's worker stops work that nobody will read (a client that
    hung up on a group used to leave the model busy until it finished)."""
    kernel = make_kernel(*group("g", deployments=["slow"]))
    add(kernel, "slow", default={"slow": 1.0}, delay_s=120)
    future = kernel.submit("g", Capability.CLASSIFY, [ClassifyRequest(text="x")])
    deadline = time.monotonic() + 60
    while calls(table_module, "slow") == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert calls(table_module, "slow") == 1, "the attempt is under way"
    assert future.cancel(), "the caller gives up (a timeout, a client gone)"
    while not table_module().ABANDONED and time.monotonic() < deadline:
        time.sleep(0.01)
    assert table_module().ABANDONED == ["slow"], "the deployment saw its call abandoned"
    while kernel.router.status()["g"]["deployments"]["slow"]["in_flight"] and (
        time.monotonic() < deadline
    ):
        time.sleep(0.01)
    state = kernel.router.status()["g"]["deployments"]["slow"]
    assert state["in_flight"] == 0
    assert state["errors"] == 0, "a caller leaving is not the deployment's failure"


# --------------------------------------------------------------------------
# a group is a model: the kernel's own ``group`` provider serves it


def test_a_group_is_served_by_the_kernels_group_provider_like_any_model(
    make_kernel, table_module
) -> None:
    recorder = EventRecorder()
    kernel = make_kernel(*group("g", deployments=["a", "b"]), recorder=recorder)
    registered = kernel.plugins.providers["group"]
    assert registered.plugin == "llmos" and registered.spec.batching is False
    answered = [served_by(ask(kernel)) for _ in range(3)]
    worker = kernel.models.get("g")
    assert worker.card.provider == "group" and worker.card.format == "group"
    assert worker.card.description == "deployment group of a, b"
    assert "g" in [w.name for w in kernel.models.loaded()]
    kernel.bus.flush()
    # the group adds no request event of its own: the deployment that answered reports it
    assert sorted(e.model for e in recorder.of("request")) == sorted(f"{a}@1" for a in answered)
    # unloading the group's model unloads no deployment
    assert kernel.models.unload("g")
    assert {"a@1", "b@1"} <= {w.name for w in kernel.models.loaded()}
    assert served_by(ask(kernel)) in ("a", "b"), "reloaded on the next call"


def test_a_group_can_be_a_fusion_member(make_kernel, table_module) -> None:
    """Groups and fusions are both models made of models, served by providers:
    a fusion may ask a group (which fails over inside) as one of its members."""
    kernel = make_kernel(*group("g", deployments=["a", "b"]))
    add(kernel, "c2", capabilities=["classify"], default={"a": 0.2, "b": 0.2, "c2": 0.6})
    card = kernel.fusions.create("fz", strategy="mean", members=["g", "c2"])
    assert card.parents  # members pinned (a group by its name)
    (result,) = kernel.call("fz", Capability.CLASSIFY, [ClassifyRequest(text="x")])
    # the group's deployment (a or b) answers 1.0 for its own name, c2 0.2 for it
    assert result.label in ("a", "b")
    assert result.scores[result.label] == pytest.approx(0.6)
    assert result.scores["c2"] == pytest.approx(0.3)


def test_no_card_poses_as_a_group_and_no_plugin_takes_the_name(make_kernel, table_module) -> None:
    kernel = make_kernel(*group("g", deployments=["a"]))
    with pytest.raises(
        UsageError, match=r"provider 'group' is not registered from a card.*\[groups"
    ):
        kernel.registry.submit(ModelCard(name="fake", provider="group"))
    with pytest.raises(UsageError, match=r"format 'group' is not registered from a card"):
        kernel.registry.submit(ModelCard(name="fake", provider="table", format="group"))

    class Thief:
        @hookimpl
        def llmos_register_providers(self, register):
            register(ProviderSpec(name="group", load=lambda request: None))

    info = kernel.plugins.register(Thief(), "thief")
    assert info.status == "failed" and "'group' is registered by both" in (info.error or "")
    assert kernel.plugins.providers["group"].plugin == "llmos"
