"""The kernel's deployment groups over real remote deployments: two upstream
llmos daemons behind ``openai-compatible`` cards, one stopped while requests
flow, then brought back on its port."""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Callable
from typing import Any

from llmos.runtime.kernel import Kernel
from llmos.types import Capability, ChatMessage, ChatRequest


def ask(kernel: Kernel) -> Any:
    (result,) = kernel.call(
        "chat", Capability.CHAT, [ChatRequest(messages=[ChatMessage("user", "ping")])]
    )
    return result


def test_requests_fail_over_from_a_stopped_upstream_and_return_when_it_is_back(
    make_upstream: Callable[..., Any], downstream: Callable[..., Kernel], register: Any
) -> None:
    with make_upstream() as b:
        upstream_a = make_upstream()
        a = upstream_a.__enter__()
        port_a = int(a.url.rsplit(":", 1)[1])
        kernel = downstream(
            'groups.chat.deployments=["remote-a", "remote-b"]',
            'groups.chat.strategy="round-robin"',
            "groups.chat.retries=2",
            "groups.chat.backoff_ms=5",
            "groups.chat.cooldown_failures=1",
            "groups.chat.cooldown_s=1.5",
        )
        register(kernel, "remote-a", a.url, connect_timeout_s=1)
        register(kernel, "remote-b", b.url, connect_timeout_s=1)
        assert {ask(kernel).meta["router"]["deployment"] for _ in range(4)} == {
            "remote-a",
            "remote-b",
        }

        # load from 4 threads while upstream a stops
        answers: list[Any] = []
        errors: list[BaseException] = []
        stop = threading.Event()

        def load() -> None:
            while not stop.is_set():
                try:
                    answers.append(ask(kernel))
                except BaseException as exc:
                    errors.append(exc)

        with concurrent.futures.ThreadPoolExecutor(4) as pool:
            for _ in range(4):
                pool.submit(load)
            time.sleep(0.3)
            upstream_a.__exit__(None, None, None)  # a stops (graceful: in-flight ones finish)
            stopped_at = len(answers)
            time.sleep(0.6)
            stop.set()
        assert not errors, errors[:3]
        after = answers[stopped_at + 8 :]
        assert after and {r.meta["router"]["deployment"] for r in after} == {"remote-b"}
        failed_over = [r for r in answers if len(r.meta["router"]["attempts"]) > 1]
        assert failed_over, "some requests met a's closed port and went on to b"
        first = failed_over[0].meta["router"]["attempts"][0]
        assert first["deployment"] == "remote-a" and "error" in first
        state = kernel.router.status()["chat"]["deployments"]
        assert state["remote-a"]["errors"] >= 1
        assert state["remote-a"]["cooling_down_s"] > 0, "the stopped upstream is cooled down"
        a_calls_while_cooling = state["remote-a"]["calls"]
        ask(kernel)
        assert kernel.router.status()["chat"]["deployments"]["remote-a"]["calls"] == (
            a_calls_while_cooling
        ), "a cooling deployment is not tried"

        # a comes back on its port; once its cooldown ends it is used again
        with make_upstream(port=port_a) as a_again:
            time.sleep(1.6)
            served = {ask(kernel).meta["router"]["deployment"] for _ in range(6)}
            assert served == {"remote-a", "remote-b"}
            assert a_again.seen, "the restarted upstream was called"
