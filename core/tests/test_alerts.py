"""Alert rules: parsing, the pending/firing/resolved cycle, the webhook
against a real local receiver, accuracy checks, and the whole path through a
running daemon (traffic -> windows -> rule -> event, webhook, /api/alerts)."""

from __future__ import annotations

import http.server
import json
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.errors import ConfigError
from llmos.monitor.alerts import AlertManager, AlertRule, Webhook
from llmos.monitor.metrics import MetricWindows
from llmos.testing import EventRecorder, serve_in_thread
from llmos.types import Capability, ClassifyRequest, ModelCard, MonitorEvent

from .tables import add, install, table_kernel

# --------------------------------------------------------------------------
# A real webhook receiver on loopback
# --------------------------------------------------------------------------


class Receiver:
    """An HTTP server that records POSTed JSON bodies and headers and answers
    with the statuses queued in ``answers`` (then 200)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.answers: list[int] = []
        self.redirect_to: str | None = None
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.headers.append(dict(self.headers))
                status = receiver.answers.pop(0) if receiver.answers else 200
                if receiver.redirect_to:
                    self.send_response(307)
                    self.send_header("Location", receiver.redirect_to)
                    self.end_headers()
                    return
                if status == 200:
                    receiver.bodies.append(json.loads(body))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def wait(self, n: int, timeout: float = 20.0) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        while len(self.bodies) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.bodies)} webhook bodies, wanted {n}")
            time.sleep(0.02)
        return self.bodies

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    r = Receiver()
    yield r
    r.close()


# --------------------------------------------------------------------------
# Rules
# --------------------------------------------------------------------------


def test_a_rule_is_read_with_durations_and_defaults() -> None:
    rule = AlertRule.from_table(
        "slow",
        {
            "metric": "latency_p95_ms",
            "model": "chat-*",
            "threshold": 500,
            "window": "5m",
            "for": "30s",
        },
    )
    assert (rule.window_s, rule.for_s, rule.op, rule.severity) == (300.0, 30.0, ">", "warning")
    assert rule.matches("chat-small") and not rule.matches("embedder")
    drift = AlertRule.from_table("drift", {"metric": "accuracy", "model": "m", "every": "1h"})
    assert (drift.op, drift.threshold, drift.every_s, drift.tolerance) == ("<", None, 3600.0, 0.02)


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"metric": "latency", "threshold": 1}, "metric must be one of"),
        ({"metric": "rps"}, "threshold is required"),
        ({"metric": "rps", "threshold": "high"}, "threshold must be a number"),
        ({"metric": "rps", "threshold": 1, "op": "=>"}, "op must be one of"),
        ({"metric": "rps", "threshold": 1, "window": "5 min"}, "not a duration"),
        ({"metric": "rps", "threshold": 1, "severity": "loud"}, "severity must be"),
        ({"metric": "rps", "threshold": 1, "thresold": 2}, "unknown key"),
        ({"metric": "rps", "threshold": 1, "min_requests": 0}, "min_requests"),
        ({"metric": "accuracy", "model": "m-*"}, "names one model"),
        ({"metric": "rps", "threshold": 1, "webhook": "https://u:p@example.com/x"}, "credentials"),
        ({"metric": "rps", "threshold": 1, "webhook": "file:///etc/passwd"}, "not an http"),
    ],
)
def test_bad_rules_are_refused_with_the_reason(table: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        AlertRule.from_table("r", table)


# --------------------------------------------------------------------------
# The cycle, on a hand-driven clock
# --------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def slow(model: str, when: float, latency_s: float) -> MonitorEvent:
    return MonitorEvent(
        kind="request",
        time=datetime.fromtimestamp(when, UTC),
        model=model,
        capability="classify",
        fields={"status": "ok", "requests": 1, "latency_s": latency_s},
    )


def test_pending_then_firing_after_for_then_resolved() -> None:
    clock = Clock(1_000.0)
    windows = MetricWindows(bucket_s=1, keep_s=600, clock=clock)
    events: list[MonitorEvent] = []
    rule = AlertRule.from_table(
        "slow",
        {
            "metric": "latency_p95_ms",
            "threshold": 100,
            "window": "10s",
            "for": "5s",
            "min_requests": 2,
        },
    )
    manager = AlertManager([rule], windows, events.append, clock=clock)

    windows.observe(slow("m", 999.5, 0.5))
    assert manager.evaluate() == []  # one request: below min_requests, no verdict
    assert manager.states()[0]["status"] == "inactive"
    windows.observe(slow("m", 999.6, 0.5))
    assert manager.evaluate() == []
    assert manager.states()[0]["status"] == "pending"
    clock.now = 1_004.0
    assert manager.evaluate() == []  # pending 4 s of 5
    clock.now = 1_005.0
    (fired,) = manager.evaluate()
    assert fired["status"] == "firing" and fired["value"] == pytest.approx(500, rel=0.01)
    assert [e.kind for e in events] == ["alert.firing"]
    assert events[0].model == "m" and events[0].fields["alert"] == "slow"
    assert events[0].fields["threshold"] == 100
    assert manager.firing()[0]["model"] == "m"
    clock.now = 1_006.0
    assert manager.evaluate() == []  # still firing: announced once
    clock.now = 1_020.0  # the slow requests left the 10 s window
    (resolved,) = manager.evaluate()
    assert resolved["status"] == "resolved" and resolved["resolved_at"] == 1_020.0
    assert [e.kind for e in events] == ["alert.firing", "alert.resolved"]
    assert manager.firing() == []


def test_a_blip_shorter_than_for_never_fires() -> None:
    clock = Clock(2_000.0)
    windows = MetricWindows(bucket_s=1, keep_s=600, clock=clock)
    events: list[MonitorEvent] = []
    rule = AlertRule.from_table(
        "errors", {"metric": "error_rate", "threshold": 0.5, "window": "2s", "for": "10s"}
    )
    manager = AlertManager([rule], windows, events.append, clock=clock)
    windows.observe(
        MonitorEvent(
            kind="request",
            model="m",
            time=datetime.fromtimestamp(1_999.5, UTC),
            fields={"status": "error", "requests": 1, "error": "Boom"},
        )
    )
    manager.evaluate()
    assert manager.states()[0]["status"] == "pending"
    clock.now = 2_005.0  # the error left the window before `for` passed
    manager.evaluate()
    assert manager.states()[0]["status"] == "inactive" and events == []


# --------------------------------------------------------------------------
# The webhook
# --------------------------------------------------------------------------


def test_webhook_posts_json_with_the_token_and_retries_5xx(receiver: Receiver) -> None:
    receiver.answers = [503, 500]
    hook = Webhook(receiver.url, token="s3cret", backoff_s=0.01)
    hook.post({"alert": "a", "status": "firing"})
    (body,) = receiver.wait(1)
    hook.close()
    assert body == {"alert": "a", "status": "firing"}
    assert len(receiver.headers) == 3  # two refusals, then delivered
    assert receiver.headers[-1]["Authorization"] == "Bearer s3cret"
    assert receiver.headers[-1]["Content-Type"] == "application/json"
    assert (hook.sent, hook.failed) == (1, 0)


def test_webhook_gives_up_on_4xx_at_once_and_follows_no_redirect(receiver: Receiver) -> None:
    receiver.answers = [400]
    hook = Webhook(receiver.url, backoff_s=0.01, retries=3)
    hook.post({"alert": "a"})
    hook.close()
    assert (hook.sent, hook.failed, len(receiver.headers)) == (0, 1, 1)

    other = Receiver()
    try:
        receiver.redirect_to = other.url
        hook = Webhook(receiver.url, backoff_s=0.01, retries=0)
        hook.post({"alert": "b"})
        hook.close()
        assert hook.failed == 1 and other.headers == []  # never sent where it was redirected
    finally:
        other.close()


def test_a_webhook_that_never_answers_does_not_hold_the_caller() -> None:
    hook = Webhook("http://127.0.0.1:9/none", backoff_s=0.01, retries=0, capacity=2, timeout_s=1)
    started = time.perf_counter()
    for n in range(50):
        hook.post({"n": n})
    assert time.perf_counter() - started < 1.0  # 50 posts queued or dropped, none waited
    assert hook.dropped >= 47
    hook.close()


# --------------------------------------------------------------------------
# Through a running daemon
# --------------------------------------------------------------------------


@pytest.fixture
def table_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from install(tmp_path / "site", monkeypatch)


def monitor_overrides(**extra: Any) -> list[str]:
    settings = {"bucket_s": 0.25, "evaluate_every_s": 0.1, "sample_every_s": 0.2, **extra}
    return [f"monitor.{k}={json.dumps(v)}" for k, v in settings.items()]


def rule(name: str, **table: Any) -> list[str]:
    return [f"alerts.{name}.{k}={json.dumps(v)}" for k, v in table.items()]


def wait_for(check: Callable[[], Any], timeout: float = 20.0, what: str = "") -> Any:
    deadline = time.monotonic() + timeout
    while not (value := check()):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what or check}")
        time.sleep(0.05)
    return value


def test_slow_traffic_fires_an_alert_to_sinks_webhook_and_api_then_resolves(
    tmp_path: Path, table_module: Any, receiver: Receiver
) -> None:
    recorder = EventRecorder()
    overrides = [
        *monitor_overrides(webhook_url=receiver.url),
        *rule(
            "slow",
            metric="latency_p95_ms",
            model="slow*",
            threshold=30,
            window="1s",
            min_requests=3,
            severity="critical",
        ),
    ]
    kernel = table_kernel(tmp_path / "home", overrides, recorder)
    add(kernel, "slow-model", delay_s=0.05)
    add(kernel, "fast-model")
    with serve_in_thread(kernel) as url:
        for _ in range(5):
            for model in ("slow-model", "fast-model"):
                response = httpx.post(
                    f"{url}/api/classify", json={"model": model, "texts": ["x"]}, timeout=10
                )
                assert response.status_code == 200
        (fired,) = receiver.wait(1)
        assert fired["status"] == "firing" and fired["alert"] == "slow"
        assert fired["model"] == "slow-model@1" and fired["severity"] == "critical"
        assert fired["value"] > 30 and fired["threshold"] == 30
        alerts = httpx.get(f"{url}/api/alerts").json()
        firing = [s for s in alerts["data"] if s["status"] == "firing"]
        assert [(s["alert"], s["model"]) for s in firing] == [("slow", "slow-model@1")]
        summary = httpx.get(f"{url}/api/monitor/summary?window=10").json()
        assert [a["model"] for a in summary["alerts_firing"]] == ["slow-model@1"]
        # No traffic for longer than the window: resolved.
        bodies = receiver.wait(2, timeout=10)
        assert bodies[1]["status"] == "resolved" and bodies[1]["model"] == "slow-model@1"
        assert alerts["webhook"]["failed"] == 0
    kinds = [e.kind for e in recorder.events if e.kind.startswith("alert.")]
    assert kinds == ["alert.firing", "alert.resolved"]


def test_a_bad_rule_is_reported_and_the_others_still_run(tmp_path: Path, table_module: Any) -> None:
    overrides = [
        *monitor_overrides(),
        *rule("typo", metric="latency_p95", threshold=1),
        *rule("ok", metric="rps", threshold=1000),
    ]
    kernel = table_kernel(tmp_path / "home", overrides)
    with serve_in_thread(kernel) as url:
        alerts = httpx.get(f"{url}/api/alerts").json()
    assert "metric must be one of" in alerts["refused"]["typo"]
    assert [r["name"] for r in alerts["rules"]] == ["ok"]


def test_accuracy_check_fires_when_the_score_falls_below_the_registered_one(
    tmp_path: Path, table_module: Any, receiver: Receiver
) -> None:
    test_file = tmp_path / "test.jsonl"
    rows = [("good one", "pos"), ("good two", "pos"), ("bad one", "neg"), ("bad two", "neg")]
    test_file.write_text("".join(json.dumps({"text": t, "label": y}) + "\n" for t, y in rows))
    overrides = [
        *monitor_overrides(webhook_url=receiver.url),
        *rule("drift", metric="accuracy", model="clf", every="1h", tolerance=0.05),
    ]
    kernel = table_kernel(tmp_path / "home", overrides)
    add(kernel, "base")
    # Registered at 0.95; it now gets the two "bad" rows wrong: 0.5.
    kernel.registry.register(
        ModelCard(
            name="clf",
            provider="table",
            parents=("base@1",),
            scores={"test/accuracy": 0.95},
            options={
                "scores": {
                    "good one": {"pos": 0.9, "neg": 0.1},
                    "good two": {"pos": 0.9, "neg": 0.1},
                    "bad one": {"pos": 0.9, "neg": 0.1},
                    "bad two": {"pos": 0.9, "neg": 0.1},
                },
                "tuning": {
                    "method": "lora",
                    "labels": ["neg", "pos"],
                    "data": {
                        "sources": {"test": str(test_file), "train": str(tmp_path / "train.jsonl")}
                    },
                },
            },
        ),
        "test",
    )
    with serve_in_thread(kernel) as url:
        (fired,) = receiver.wait(1)
        assert (fired["alert"], fired["status"], fired["model"]) == ("drift", "firing", "clf@1")
        assert fired["value"] == 0.5 and fired["threshold"] == pytest.approx(0.90)
        advice = httpx.get(f"{url}/api/advice").json()["data"]
    (retune,) = [a for a in advice if a["id"] == "retune"]
    assert retune["model"] == "clf@1" and retune["evidence"]["accuracy"] == 0.5
    assert (
        "llmos tune --model base@1 --method lora --train " + str(tmp_path / "train.jsonl")
        in (retune["action"])
    )


def test_an_accuracy_check_without_data_says_what_to_set(tmp_path: Path, table_module: Any) -> None:
    kernel = table_kernel(
        tmp_path / "home", [*monitor_overrides(), *rule("drift", metric="accuracy", model="m")]
    )
    add(kernel, "m")
    kernel.start()
    try:
        (drift,) = kernel.monitor.alerts.rules
        event = kernel.monitor.check_accuracy(drift)
    finally:
        kernel.stop()
    assert event is not None and "score" not in event.fields
    assert 'name one with data = "PATH"' in event.fields["error"]


def test_monitor_summary_and_series_over_http_match_the_traffic(
    tmp_path: Path, table_module: Any
) -> None:
    kernel = table_kernel(tmp_path / "home", monitor_overrides())
    add(kernel, "m", capabilities=["classify", "embed"], vectors={"x": [1.0, 0.0]})
    with serve_in_thread(kernel) as url:
        kernel.call("m", Capability.CLASSIFY, [ClassifyRequest(text="x")] * 3)
        response = httpx.post(f"{url}/api/classify", json={"model": "m", "texts": ["a", "b"]})
        assert response.status_code == 200
        summary = wait_for(
            lambda: (
                (s := httpx.get(f"{url}/api/monitor/summary?window=30").json())["models"]
                .get("m@1", {})
                .get("requests")
                == 5
                and s
            ),
            what="5 requests in the summary",
        )
        m = summary["models"]["m@1"]  # deployments are name@version
        assert m["loaded"] is True and m["queued"] == 0 and m["provider"] == "table"
        assert m["capabilities"] == {"classify": 5} and m["errors"] == 0
        assert m["latency_p50_ms"] is not None and summary["process"]["rss_mb"] > 0
        # a bare name takes in every version
        series = httpx.get(f"{url}/api/monitor/series?model=m&window=10&step=1").json()
        assert series["step_s"] == 1.0 and len(series["points"]) == 10
        assert sum(p["requests"] for p in series["points"]) == 5
        bad = httpx.get(f"{url}/api/monitor/summary?window=forever")
        assert bad.status_code == 400 and "not a duration" in bad.text
        too_long = httpx.get(f"{url}/api/monitor/series?window=2h")
        assert too_long.status_code == 400 and "keep_s" in too_long.text
