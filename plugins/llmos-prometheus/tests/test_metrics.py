"""Each mapping from monitor events to metrics, on a real daemon: requests
over HTTP, ``table`` models, a real tuning worker, fusion and deployment
group; ``/metrics`` scraped over HTTP and parsed by prometheus_client."""

from __future__ import annotations

import concurrent.futures
import math
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from prometheus_client import REGISTRY
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics

from llmos.monitor.bus import EventBus
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.testing import write_distribution, write_safetensors
from llmos.types import Capability, ClassifyRequest, ModelCard, MonitorEvent, MonitorSinkSpec
from llmos_prometheus.options import DURATION_BUCKETS
from llmos_prometheus.sink import PrometheusSink

from .conftest import kernel_for

M = "m@1"  # the reference the kernel resolves model "m" to: the label's value


# --------------------------------------------------------------------------
# Requests
# --------------------------------------------------------------------------


def test_requests_count_rows_and_every_row_is_one_observation(daemon) -> None:
    d = daemon()
    for _ in range(7):
        assert d.classify("m", "x").status_code == 200
    assert d.classify("m", "a", "b", "c").status_code == 200  # one call of three rows
    s = d.events_seen("request", 8)

    ok = {"model": M, "capability": "classify"}
    assert s.get("llmos_requests_total", **ok, status="ok") == 10
    assert s.get("llmos_requests_total", status="error") == 0
    for name in ("llmos_request_duration_seconds", "llmos_queue_wait_seconds"):
        assert s.get(f"{name}_count", **ok) == 10, name
        assert s.get(f"{name}_bucket", **ok, le="+Inf") == 10, name
        assert 0 < s.get(f"{name}_sum", **ok) < 10 * 5, name  # table models: micro-seconds
    # one observation per call: eight calls, one of them of three rows
    assert s.get("llmos_batch_size_count", **ok) == 8
    assert s.get("llmos_batch_size_sum", **ok) == 7 * 1 + 3
    assert s.get("llmos_batch_size_bucket", **ok, le="1.0") == 7
    assert s.get("llmos_model_call_duration_seconds_count", **ok) == 8
    # every table classification reads one token
    assert s.get("llmos_tokens_total", model=M, direction="in") == 10
    assert not s.has("llmos_tokens_total", direction="out"), "none written: no series"
    # the default buckets reach from half a millisecond to five minutes
    bounds = {float(le) for le in s.labels("llmos_request_duration_seconds_bucket", "le")}
    assert bounds == {*DURATION_BUCKETS, math.inf}
    # the sub-millisecond table answers land in the small buckets, not the first big one
    assert s.get("llmos_request_duration_seconds_bucket", **ok, le="0.1") == 10


def test_errors_are_counted_by_their_type_never_their_message(daemon, tmp_path: Path) -> None:
    down = tmp_path / "down"
    d = daemon(
        models={
            "crashy": {"fail_file": str(down), "fail_kind": "crash"},
            "flaky": {"fail_file": str(down), "fail_kind": "unavailable"},
        }
    )
    down.touch()
    for _ in range(3):
        assert d.classify("crashy", "x").status_code == 500
    assert d.classify("flaky", "x", "y").status_code == 503  # one call, two rows
    down.unlink()
    assert d.classify("flaky", "x").status_code == 200
    s = d.events_seen("request", 5)

    crashy = {"model": "crashy@1", "capability": "classify"}
    flaky = {"model": "flaky@1", "capability": "classify"}
    assert s.get("llmos_requests_total", **crashy, status="error") == 3
    assert s.get("llmos_request_errors_total", **crashy, kind="RuntimeError") == 3
    assert s.get("llmos_requests_total", **flaky, status="error") == 2
    assert s.get("llmos_requests_total", **flaky, status="ok") == 1
    assert s.get("llmos_request_errors_total", **flaky, kind="unavailable") == 2
    assert s.labels("llmos_request_errors_total", "kind") == {"RuntimeError", "unavailable"}
    # failed calls were timed too: how long a failure took matters
    assert s.get("llmos_request_duration_seconds_count", **crashy) == 3
    # the messages ("crashy crashed", "flaky is down") are in no label
    assert "crashed" not in s.text and "is down" not in s.text


def test_a_full_queue_is_counted_as_rejected(daemon) -> None:
    d = daemon("runtime.max_queue=1", models={"slow": {"delay_s": 0.3}})
    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        codes = list(pool.map(lambda _: d.classify("slow", "x").status_code, range(6)))
    rejected = codes.count(429)
    assert rejected >= 1 and codes.count(200) == 6 - rejected, codes
    s = d.events_seen("request", 6)
    slow = {"model": "slow@1", "capability": "classify"}
    assert s.get("llmos_requests_total", **slow, status="rejected") == rejected
    assert s.get("llmos_request_errors_total", **slow, kind="queue_full") == rejected
    assert s.get("llmos_requests_total", **slow, status="ok") == 6 - rejected
    # a refused request never reached the model: it has no timings
    assert s.get("llmos_request_duration_seconds_count", **slow) == 6 - rejected


def test_streams_have_a_time_to_first_token(daemon) -> None:
    d = daemon(models={"m": {"capabilities": ["complete", "stream"], "answers": {"hi": "hello"}}})
    for _ in range(4):
        with d.client.stream(
            "POST", "/v1/completions", json={"model": "m", "prompt": "hi", "stream": True}
        ) as response:
            assert response.status_code == 200
            assert '"he"' in "".join(response.iter_text())  # the first of two chunks
    s = d.events_seen("request", 4)
    stream = {"model": M, "capability": "stream"}
    assert s.get("llmos_requests_total", **stream, status="ok") == 4
    assert s.get("llmos_time_to_first_token_seconds_count", **stream) == 4
    ttft = s.get("llmos_time_to_first_token_seconds_sum", **stream)
    assert 0 < ttft <= s.get("llmos_request_duration_seconds_sum", **stream)
    # batched calls have no first token
    assert not s.has("llmos_time_to_first_token_seconds_count", capability="complete")


# --------------------------------------------------------------------------
# Models, fusions, deployment groups
# --------------------------------------------------------------------------


def test_a_model_is_loaded_then_unloaded(daemon) -> None:
    d = daemon()
    assert d.classify("m", "x").status_code == 200
    s = d.events_seen("model.loaded", 1)
    assert s.get("llmos_model_loaded", model=M) == 1
    assert s.get("llmos_model_loads_total", model=M) == 1
    assert 0 < s.get("llmos_model_load_seconds", model=M) < 5

    assert d.kernel.models.unload(M)
    s = d.events_seen("model.unloaded", 1)
    assert s.get("llmos_model_loaded", model=M) == 0
    assert s.get("llmos_model_unloads_total", model=M, reason="requested") == 1


def test_a_fusion_counts_each_members_calls_answers_and_agreements(daemon) -> None:
    d = daemon(
        models={
            "yes": {"default": {"pos": 0.9, "neg": 0.1}},
            "also": {"default": {"pos": 0.8, "neg": 0.2}},
            "no": {"default": {"pos": 0.1, "neg": 0.9}},
        }
    )
    d.kernel.fusions.create("trio", strategy="vote", members=["yes", "also", "no"])
    for _ in range(3):
        response = d.classify("trio", "x", "y")
        assert response.status_code == 200
        assert [r["label"] for r in response.json()["results"]] == ["pos", "pos"]
    s = d.events_seen("fusion.call", 3)
    fusion = s.labels("llmos_fusion_rows_total", "fusion")
    assert len(fusion) == 1
    (trio,) = fusion
    assert trio.startswith("trio")
    assert s.get("llmos_fusion_rows_total", fusion=trio, strategy="vote") == 6
    members = s.labels("llmos_fusion_member_requests_total", "member")
    assert {m.split("@")[0] for m in members} == {"yes", "also", "no"}
    for member in members:
        agreed = 0 if member.startswith("no") else 6
        assert s.get("llmos_fusion_member_requests_total", fusion=trio, member=member) == 6
        assert s.get("llmos_fusion_member_answers_total", fusion=trio, member=member) == 6
        assert s.get("llmos_fusion_member_agreements_total", member=member) == agreed, member
    # each member's own calls are requests of that member too
    assert s.get("llmos_requests_total", model="no@1", status="ok") == 6


def test_deployment_group_retries_and_cooldowns(daemon, tmp_path: Path) -> None:
    down = tmp_path / "down"
    d = daemon(
        'groups.g.deployments=["a"]',
        "groups.g.retries=2",
        "groups.g.backoff_ms=1",
        "groups.g.cooldown_failures=3",
        "groups.g.cooldown_s=30",
        models={"a": {"fail_file": str(down)}},
    )
    down.touch()
    assert d.classify("g", "x").status_code == 503
    # three tries: two retries, and the third failure cools a down
    s = d.events_seen("router.cooldown", 1)
    assert s.get("llmos_router_events_total", group="g", kind="retry") == 2
    assert s.get("llmos_router_events_total", group="g", kind="cooldown") == 1
    assert s.get("llmos_requests_total", model="a@1", status="error") == 3


# --------------------------------------------------------------------------
# Tuning: a real job in a real worker process
# --------------------------------------------------------------------------

STEPS = """
from llmos.plugin import hookimpl
from llmos.testing import write_safetensors
from llmos.types import ModelCard, TuningMethodSpec, TuningResult


def run(request):
    steps = int(request.hyperparameters["steps"])
    for step in range(1, steps + 1):
        request.report({"step": step, "total_steps": steps, "loss": 1.0 / step,
                        "learning_rate": 0.01, "note": "text is not a figure"})
    request.report({"step": steps, "epoch": 1, "dev/accuracy": 0.75, "dev/macro_f1": 0.5})
    write_safetensors(request.output_dir / "model.safetensors", {"w": [2]})
    card = ModelCard(name=request.base.name, provider="table", format="safetensors",
                     source=str(request.output_dir / "model.safetensors"))
    return TuningResult(card=card, scores={"dev/accuracy": 0.75})


@hookimpl
def llmos_register_tuning_methods(register):
    register(TuningMethodSpec(name="steps", run=run, tasks=("text-classification",),
                              defaults={"steps": 3}))
"""
DATA = {
    "train": [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}],
    "dev": [{"text": "fine", "label": "pos"}, {"text": "awful", "label": "neg"}],
}


@pytest.fixture
def steps_plugin(tmp_path: Path, table_module: Any) -> Iterator[None]:
    write_distribution(tmp_path / "site", "llmos-steps", STEPS)  # put on the path by table_module
    yield
    sys.modules.pop("llmos_steps", None)


def _tune(kernel: Kernel, name: str, steps: int) -> str:
    job = kernel.jobs.submit(
        model="base", method="steps", inline=DATA, name=name, params={"steps": steps}
    )
    return job.id


def _register_base(kernel: Kernel) -> None:
    weights = kernel.home / "models" / "base"
    write_safetensors(weights / "model.safetensors", {"w": [2]})
    kernel.registry.register(
        ModelCard(name="base", provider="table", format="safetensors", source=str(weights))
    )


def _succeeded(d: Any, jobs: int) -> Any:
    """Scrape once ``jobs`` jobs have succeeded (worker processes: seconds)."""
    return d.scrape_until(
        lambda s: (
            s.get("llmos_tuning_job_transitions_total", method="steps", state="succeeded") == jobs
        ),
        f"{jobs} tuning jobs to succeed",
        timeout=60,
    )


def test_tuning_progress_becomes_per_job_gauges_and_old_jobs_go(daemon, steps_plugin) -> None:
    d = daemon(
        "plugins.prometheus.finished_jobs=1", plugins="llmos-steps", before_start=_register_base
    )
    first = _tune(d.kernel, "tuned-a", 4)
    s = _succeeded(d, 1)
    job = {"job": first, "model": "tuned-a"}
    assert s.get("llmos_tuning_step", **job) == 4
    assert s.get("llmos_tuning_total_steps", **job) == 4
    assert s.get("llmos_tuning_loss", **job) == pytest.approx(1 / 4)
    assert s.get("llmos_tuning_learning_rate", **job) == pytest.approx(0.01)
    assert s.get("llmos_tuning_epoch", **job) == 1
    assert s.get("llmos_tuning_eval_metric", **job, split="dev", metric="accuracy") == 0.75
    assert s.get("llmos_tuning_eval_metric", **job, split="dev", metric="macro_f1") == 0.5
    assert s.labels("llmos_tuning_eval_metric", "metric") == {"accuracy", "macro_f1"}
    assert "text is not a figure" not in s.text
    assert s.get("llmos_tuning_job_transitions_total", method="steps", state="running") == 1

    # finished_jobs = 1: the next job to end takes the first one's series away
    second = _tune(d.kernel, "tuned-b", 2)
    s = _succeeded(d, 2)
    assert s.get("llmos_tuning_step", job=second) == 2
    assert s.labels("llmos_tuning_step", "job") == {second}
    assert s.labels("llmos_tuning_eval_metric", "job") == {second}


# --------------------------------------------------------------------------
# Alerts (the kernel's alert rules emit these events)
# --------------------------------------------------------------------------


def _alert(kind: str, rule: str, model: str | None) -> MonitorEvent:
    fields = {"alert": rule, "metric": "p95_s", "value": 2.0, "threshold": 1.0, "severity": "page"}
    return MonitorEvent(kind=kind, model=model, fields=fields)


def test_alerts_fire_and_resolve(daemon) -> None:
    d = daemon()
    d.kernel.emit(_alert("alert.firing", "slow", M))
    d.kernel.emit(_alert("alert.firing", "errors", None))
    s = d.events_seen("alert.firing", 2)
    assert s.get("llmos_alerts_firing", alert="slow", model=M) == 1
    assert s.get("llmos_alerts_firing", alert="errors", model="") == 1
    d.kernel.emit(_alert("alert.resolved", "slow", M))
    s = d.events_seen("alert.resolved", 1)
    assert s.get("llmos_alerts_firing", alert="slow", model=M) == 0
    assert s.get("llmos_alerts_firing", alert="errors") == 1


def test_scheduled_accuracy_checks(daemon) -> None:
    d = daemon()
    # the shapes the kernel's accuracy checks emit (llmos.monitor.alerts)
    d.kernel.emit(
        MonitorEvent(
            kind="eval.result",
            model="acme/clf",
            fields={"alert": "drift", "score": 0.8, "registered": 0.9, "rows": 10},
        )
    )
    d.kernel.emit(
        MonitorEvent(
            kind="eval.result",
            model="acme/other",
            fields={"alert": "drift", "error": "no such file: /data/test.tsv"},
        )
    )
    s = d.events_seen("eval.result", 2)
    assert s.get("llmos_eval_accuracy", model="acme/clf") == 0.8
    assert s.get("llmos_eval_registered_accuracy", model="acme/clf") == 0.9
    assert s.get("llmos_eval_failures_total", model="acme/other") == 1
    assert not s.has("llmos_eval_accuracy", model="acme/other")
    assert "no such file" not in s.text


# --------------------------------------------------------------------------
# A slow or failing sink never slows or fails a request
# --------------------------------------------------------------------------


class BadSinks:
    """Two sinks: one raises on every event, one sleeps on every event."""

    def __init__(self, sleep_s: float) -> None:
        self.sleep_s = sleep_s

    @hookimpl
    def llmos_register_monitor_sinks(self, register) -> None:
        sleep_s = self.sleep_s

        class Raising:
            def emit(self, event):
                raise OSError("disk full")

            def close(self):
                pass

        class Sleeping:
            def emit(self, event):
                time.sleep(sleep_s)

            def close(self):
                pass

        register(MonitorSinkSpec(name="raising", create=lambda options: Raising()))
        register(MonitorSinkSpec(name="sleeping", create=lambda options: Sleeping()))


SLEEP_S = 0.25


def test_a_failing_and_a_slow_sink_never_slow_or_fail_requests(daemon) -> None:
    def bad_sinks(kernel: Kernel) -> None:
        kernel.plugins.register(BadSinks(sleep_s=SLEEP_S), "bad-sinks")
        kernel.bus = EventBus(capacity=8)  # a small queue, so that it overflows at once

    d = daemon(before_start=bad_sinks)
    started = time.perf_counter()
    for _ in range(40):
        assert d.classify("m", "x").status_code == 200
    took = time.perf_counter() - started
    # in line, the sleeping sink alone would have taken 40 * SLEEP_S = 10 s
    assert took < 5, f"40 requests took {took:.1f} s behind a slow sink"
    # a request's own overhead stays small: the sinks are not on its path
    (result,) = d.kernel.call("m", Capability.CLASSIFY, [ClassifyRequest(text="x")], timeout=2)
    assert result.label in ("pos", "neg")

    s = d.scrape_until(
        lambda s: s.get("llmos_monitor_sink_errors_total", sink="raising") >= 1,
        "the raising sink's error count",
    )
    # the sleeping sink took at most one event per SLEEP_S; the queue holds 8;
    # every other request event was dropped, and counted
    delivered = math.ceil((time.perf_counter() - started) / SLEEP_S) + 1
    assert s.get("llmos_monitor_events_dropped_total") >= 40 - 8 - delivered
    assert s.get("llmos_monitor_sink_errors_total", sink="sleeping") == 0
    assert s.get("llmos_monitor_sink_errors_total", sink="prometheus") == 0
    assert s.labels("llmos_monitor_sink_errors_total", "sink") >= {"raising", "sleeping"}


# --------------------------------------------------------------------------
# The route, its formats and its auth
# --------------------------------------------------------------------------


def test_openmetrics_when_the_scraper_asks_for_it(daemon) -> None:
    d = daemon()
    assert d.classify("m", "x").status_code == 200
    d.events_seen("request", 1)
    response = d.client.get(
        "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
    )
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/openmetrics-text")
    assert response.text.endswith("# EOF\n")
    families = {f.name: f for f in parse_openmetrics(response.text)}
    assert families["llmos_requests"].type == "counter"
    assert families["llmos_request_duration_seconds"].type == "histogram"
    (sample,) = [s for s in families["llmos_requests"].samples if s.name == "llmos_requests_total"]
    assert sample.labels == {"model": M, "capability": "classify", "status": "ok"}
    assert sample.value == 1


def test_process_figures_are_exported(daemon) -> None:
    d = daemon()
    s = d.scrape()
    assert s.get("process_resident_memory_bytes") > 1e6
    assert s.has("process_cpu_seconds_total") and s.has("python_info")
    assert not s.has("llmos_requests_total"), "no request yet: no series"


def test_process_figures_can_be_switched_off(daemon) -> None:
    s = daemon("plugins.prometheus.process_metrics=false").scrape()
    assert not s.has("process_resident_memory_bytes") and not s.has("python_info")
    assert s.has("llmos_monitor_events_dropped_total")


def test_buckets_come_from_the_options(daemon) -> None:
    d = daemon(
        "plugins.prometheus.buckets=[0.01, 1, 60]", "plugins.prometheus.batch_buckets=[1, 8]"
    )
    assert d.classify("m", "x").status_code == 200
    s = d.events_seen("request", 1)
    les = s.labels("llmos_request_duration_seconds_bucket", "le")
    assert les == {"0.01", "1.0", "60.0", "+Inf"}
    assert s.labels("llmos_batch_size_bucket", "le") == {"1.0", "8.0", "+Inf"}


def test_api_keys_guard_metrics_like_every_other_route(daemon) -> None:
    d = daemon('server.api_keys=["s3cret"]', api_key="s3cret")
    assert d.scrape().has("llmos_monitor_events_dropped_total")
    anonymous = httpx.get(f"{d.url}/metrics", timeout=10)
    assert anonymous.status_code == 401
    assert "missing API key" in anonymous.text


# --------------------------------------------------------------------------
# Bad options and the sink's own registry
# --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (
            "plugins.prometheus.bucket=[1]",
            "[plugins.prometheus]: unknown key(s) bucket; known: batch_buckets, buckets,",
        ),
        ('plugins.prometheus.buckets=["fast", 1]', "'fast' is not a number"),
        ("plugins.prometheus.buckets=[1, 0.5]", "0.5 comes after 1"),
        ("plugins.prometheus.buckets=[0, 1]", "0 is not a finite number > 0"),
        ("plugins.prometheus.buckets=[]", "must be a list of positive numbers in rising order"),
        ("plugins.prometheus.buckets=5", "must be a list of positive numbers in rising order"),
        ('plugins.prometheus.process_metrics="yes"', "must be true or false, got 'yes'"),
        ("plugins.prometheus.finished_jobs=-1", "must be an integer >= 0, got -1"),
    ],
)
def test_bad_options_stop_a_strict_start_with_the_reason(
    tmp_path: Path, table_module: Any, setting: str, message: str
) -> None:
    kernel = kernel_for(tmp_path / "home", [setting])
    with pytest.raises(Exception, match="monitor sink 'prometheus' failed to start") as caught:
        kernel.start()
    assert message in str(caught.value)
    kernel.stop()


def test_a_sink_that_did_not_start_answers_503_with_why(daemon) -> None:
    d = daemon("plugins.prometheus.buckets=[2, 1]", strict=False)
    response = d.client.get("/metrics")
    assert response.status_code == 503
    assert "'prometheus' monitor sink is not running" in response.json()["error"]["message"]
    (info,) = [p for p in d.kernel.plugins.plugins() if p.name == "prometheus"]
    assert info.status == "failed" and "1 comes after 2" in (info.error or "")
    # the daemon itself goes on serving
    assert d.classify("m", "x").status_code == 200


def test_each_sink_keeps_its_own_registry() -> None:
    one, two = PrometheusSink({}), PrometheusSink({"process_metrics": False})
    one.emit(MonitorEvent(kind="request", model="a", capability="classify", fields={"requests": 2}))
    assert (
        one.registry.get_sample_value(
            "llmos_requests_total", {"model": "a", "capability": "classify", "status": "ok"}
        )
        == 2
    )
    assert (
        two.registry.get_sample_value(
            "llmos_requests_total", {"model": "a", "capability": "classify", "status": "ok"}
        )
        is None
    )
    assert not [m.name for m in REGISTRY.collect() if m.name.startswith("llmos_")]


def test_malformed_events_are_skipped_and_plugin_words_are_bounded() -> None:
    sink = PrometheusSink({"process_metrics": False})
    sink.emit(
        MonitorEvent(
            kind="request",
            model="a",
            capability="classify",
            fields={"status": "error", "error": "no such file: /x y", "latency_s": "slow"},
        )
    )
    for i in range(150):
        sink.emit(
            MonitorEvent(
                kind="request",
                model="a",
                capability="classify",
                fields={"status": "error", "error": f"Error{i}", "latency_s": -1},
            )
        )
    values = {
        tuple(sorted(s.labels.items())): s.value
        for metric in sink.registry.collect()
        if metric.name == "llmos_request_errors"
        for s in metric.samples
        if s.name.endswith("_total")
    }
    kinds = {dict(labels)["kind"] for labels in values}
    # a message-like kind is "other"; past 100 distinct kinds, so is every new one
    assert len(kinds) == 101 and "other" in kinds and "Error99" in kinds
    assert sum(values.values()) == 151
    assert sink.registry.get_sample_value(
        "llmos_request_duration_seconds_count", {"model": "a", "capability": "classify"}
    ) in (None, 0.0), "a latency that is not a number >= 0 is not observed"
