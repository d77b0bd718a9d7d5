"""The advisor on real traffic through a running daemon, and the terminal
commands that read the daemon: ``llmos top``, ``llmos advise``, ``llmos alerts``."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from click.testing import CliRunner

from llmos.cli import cli, main
from llmos.monitor.advisor import advise
from llmos.testing import serve_in_thread
from llmos.types import ModelCard, MonitorEvent

from .tables import add, install, table_kernel

FAST_MONITOR = ["monitor.bucket_s=0.5", "monitor.evaluate_every_s=0.1"]


@pytest.fixture
def table_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from install(tmp_path / "site", monkeypatch)


def hammer(url: str, model: str, threads: int = 4, each: int = 8) -> list[int]:
    """``threads`` clients each sending ``each`` one-row requests at once."""
    statuses: list[int] = []
    lock = threading.Lock()

    def client() -> None:
        with httpx.Client(timeout=30) as http:
            for _ in range(each):
                r = http.post(f"{url}/api/classify", json={"model": model, "texts": ["x"]})
                with lock:
                    statuses.append(r.status_code)

    workers = [threading.Thread(target=client) for _ in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    return statuses


def settle(kernel: Any, model: str, rows: int) -> None:
    """Wait until the windows hold ``rows`` requests of ``model`` (the bus is async)."""
    deadline = time.monotonic() + 20
    while kernel.monitor.windows.summary(60)["models"].get(model, {}).get("requests", 0) < rows:
        assert time.monotonic() < deadline, "the events did not reach the windows"
        time.sleep(0.02)


def run(*args: str) -> Any:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_queueing_with_batches_of_one_advises_a_larger_batch_and_top_shows_it(
    tmp_path: Path, table_module: Any
) -> None:
    kernel = table_kernel(tmp_path / "home", [*FAST_MONITOR, "runtime.max_batch_size=1"])
    add(kernel, "m", delay_s=0.02)
    with serve_in_thread(kernel) as url:
        assert hammer(url, "m") == [200] * 32
        settle(kernel, "m@1", 32)
        (advice,) = [a for a in advise(kernel.monitor) if a.id == "raise-batch-size"]
        assert advice.model == "m@1" and advice.severity == "warning"
        assert advice.evidence["max_batch_size"] == 1
        assert advice.evidence["batch_size_mean"] == 1.0
        assert advice.evidence["queue_wait_p95_ms"] > advice.evidence["model_call_p50_ms"] >= 20
        assert "[runtime]\nmax_batch_size = 8" in (advice.config or "")

        out = run("advise", "--url", url)
        assert "raise max_batch_size from 1 to 8" in out and "evidence: queue_wait_p95_ms=" in out
        answer = json.loads(run("advise", "--url", url, "--json"))
        assert [a["id"] for a in answer["data"]] == ["raise-batch-size"]

        frame = run("top", "--url", url, "--once", "--window", "30")
        assert "m@1" in frame and "p95 ms" in frame and "no alerts" in frame
        summary = json.loads(run("top", "--url", url, "--json"))
        assert summary["models"]["m@1"]["requests"] == 32


def test_the_same_traffic_with_batching_on_gets_no_batch_advice(
    tmp_path: Path, table_module: Any
) -> None:
    kernel = table_kernel(tmp_path / "home", [*FAST_MONITOR, "runtime.max_batch_size=8"])
    add(kernel, "m", delay_s=0.02)
    with serve_in_thread(kernel) as url:
        hammer(url, "m")
        settle(kernel, "m@1", 32)
        figures = kernel.monitor.windows.summary(60)["models"]["m@1"]
        assert figures["batch_size_mean"] > 1.5  # the queue was shared by each call
        assert [a.id for a in advise(kernel.monitor)] == []
        assert "No advice" in run("advise", "--url", url)


def test_failing_requests_are_advised_on_with_their_kind(tmp_path: Path, table_module: Any) -> None:
    down = tmp_path / "down"
    down.touch()
    kernel = table_kernel(tmp_path / "home", FAST_MONITOR)
    add(kernel, "flaky", fail_file=str(down), fail_kind="unavailable")
    with serve_in_thread(kernel) as url:
        statuses = hammer(url, "flaky", threads=1, each=25)
        assert set(statuses) == {503}
        settle(kernel, "flaky@1", 25)
        (advice,) = advise(kernel.monitor)
    assert (advice.id, advice.severity) == ("errors", "critical")
    assert advice.evidence["error_rate"] == 1.0
    assert advice.evidence["errors_by_kind"] == {"unavailable": 25}
    assert "requests failed with unavailable (25 of 25)" in advice.action


def test_a_slow_transformers_model_is_pointed_at_vllm(tmp_path: Path, table_module: Any) -> None:
    kernel = table_kernel(tmp_path / "home", [*FAST_MONITOR, "monitor.latency_target_ms=1000"])
    source = tmp_path / "home" / "models" / "gen"
    kernel.registry.register(
        ModelCard(name="gen", provider="transformers", source=str(source), tasks=("chat",)),
        "test",
    )
    kernel.start()
    try:
        # Figures as the worker reports them: 30 chat requests at 3 s each.
        now = datetime.now(UTC)
        for _ in range(30):
            kernel.monitor.windows.observe(
                MonitorEvent(
                    kind="request",
                    time=now,
                    model="gen@1",
                    capability="chat",
                    fields={"status": "ok", "requests": 1, "latency_s": 3.0, "tokens_out": 60},
                )
            )
        (advice,) = advise(kernel.monitor)
    finally:
        kernel.stop()
    assert advice.id == "try-vllm"
    assert advice.evidence["latency_p95_ms"] == pytest.approx(3000, rel=0.01)
    assert advice.evidence["latency_target_ms"] == 1000
    assert advice.evidence["vllm_installed"] is False
    assert advice.action.startswith("pip install llmos-vllm, then serve it with the vLLM provider")
    assert advice.config == f'[models.gen-vllm]\nprovider = "vllm"\nsource = "{source}"'


def test_an_engine_short_of_kv_cache_is_told_to_get_more(tmp_path: Path, table_module: Any) -> None:
    kernel = table_kernel(tmp_path / "home", FAST_MONITOR)
    kernel.start()
    try:
        stats = {
            "engine": "vllm",
            "running": 8,
            "waiting": 5,
            "running_max": 8,
            "waiting_max": 12,
            "kv_cache_usage": 0.97,
            "preempted": 3,
        }
        kernel.monitor.windows.observe(
            MonitorEvent(kind="engine.stats", model="gen@1", fields=stats)
        )
        assert kernel.monitor.windows.summary(60)["models"]["gen@1"]["engine"]["waiting"] == 5
        (advice,) = advise(kernel.monitor)
        # the same engine with room to spare: nothing to say
        kernel.monitor.windows.observe(
            MonitorEvent(
                kind="engine.stats", model="gen@1", fields={**stats, "kv_cache_usage": 0.5}
            )
        )
        assert advise(kernel.monitor) == []
        # a burst that just ended: the engine is idle now, its peak in the interval is what counts
        kernel.monitor.windows.observe(
            MonitorEvent(
                kind="engine.stats",
                model="gen@1",
                fields={**stats, "running": 0, "waiting": 0, "kv_cache_usage": 0.0,
                        "kv_cache_usage_max": 0.97},
            )
        )  # fmt: skip
        (after_burst,) = advise(kernel.monitor)
        assert after_burst.evidence["kv_cache_usage"] == 0.97
    finally:
        kernel.stop()
    assert (advice.id, advice.model, advice.severity) == ("kv-cache", "gen@1", "warning")
    assert advice.evidence == {
        "kv_cache_usage": 0.97,
        "waiting_max": 12,
        "running_max": 8,
        "preempted": 3,
    }
    assert "kv_cache_gib" in advice.action and advice.config == "[plugins.vllm]\nkv_cache_gib = 4"


def test_calls_one_after_another_need_no_larger_batch(tmp_path: Path, table_module: Any) -> None:
    kernel = table_kernel(tmp_path / "home", [*FAST_MONITOR, "runtime.max_batch_size=1"])
    add(kernel, "m", delay_s=0.02)
    with serve_in_thread(kernel) as url:
        hammer(url, "m", threads=1, each=25)  # batches of one, but nobody waits
        settle(kernel, "m@1", 25)
        figures = kernel.monitor.windows.summary(60)["models"]["m@1"]
        assert figures["batch_size_mean"] == 1.0
        assert figures["queue_wait_p95_ms"] < figures["model_p50_ms"]
        assert advise(kernel.monitor) == []


def test_too_little_traffic_gets_no_advice(tmp_path: Path, table_module: Any) -> None:
    kernel = table_kernel(tmp_path / "home", [*FAST_MONITOR, "runtime.max_batch_size=1"])
    add(kernel, "m", delay_s=0.02)
    with serve_in_thread(kernel) as url:
        hammer(url, "m", threads=4, each=4)  # 16 rows < 20
        settle(kernel, "m@1", 16)
        assert advise(kernel.monitor) == []


def test_llmos_alerts_lists_rules_states_and_refusals(tmp_path: Path, table_module: Any) -> None:
    kernel = table_kernel(
        tmp_path / "home",
        [
            *FAST_MONITOR,
            'alerts.busy.metric="rps"',
            "alerts.busy.threshold=0.5",
            'alerts.busy.window="10s"',
            'alerts.bad.metric="p95"',
        ],
    )
    add(kernel, "m")
    with serve_in_thread(kernel) as url:
        hammer(url, "m", threads=2, each=10)
        deadline = time.monotonic() + 20
        while not kernel.monitor.alerts.firing():
            assert time.monotonic() < deadline, kernel.monitor.alerts.states()
            time.sleep(0.05)
        out = run("alerts", "--url", url)
        answer = json.loads(run("alerts", "--url", url, "--json"))
    assert "refused bad: [alerts.bad]: metric must be one of" in " ".join(out.split())
    assert "busy" in out and "firing" in out and "m@1" in out
    assert [(s["alert"], s["status"]) for s in answer["data"]] == [("busy", "firing")]


def test_commands_say_how_to_reach_a_daemon_that_is_not_there(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for command in ("top", "advise", "alerts"):
        assert main([command, "--url", "http://127.0.0.1:9"]) != 0
        err = capsys.readouterr().err
        assert "error: cannot reach the daemon at http://127.0.0.1:9" in err
        assert "start it with `llmos serve`" in err
