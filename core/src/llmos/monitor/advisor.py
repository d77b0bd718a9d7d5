"""The advisor: measured figures in, concrete advice out, with its evidence.

Each rule looks at one model's figures over a window (the metric windows),
its live worker (queue, batching settings), its card (provider, format,
tuning provenance) and the latest accuracy check, and says what change would
help: the config key and value, or the command to run, and the figures that
led there. Nothing is advised on too little traffic (``min_requests``).
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import attrs

from llmos.errors import LlmosError

if TYPE_CHECKING:
    from llmos.monitor.service import Monitor

__all__ = ["Advice", "advise"]

#: rows a model must have answered in the window before it is judged
MIN_REQUESTS = 20
#: the vLLM provider against the transformers provider, the same tiny Llama
#: through the same kernel API on 2 CPU cores (bench/vllm_provider.py,
#: bench/results/vllm_provider.json): generated tokens/s, vLLM / transformers
VLLM_BENCHMARK = {
    "benchmark": "bench/vllm_provider.py",
    "tokens_per_s_ratio": 1.65,
    "measured_on": "tiny Llama, fp32, 32 concurrent requests x 64 tokens, 2 CPU cores; "
    "x1.02 with LoRA slots on (enable_lora, the default)",
}
_GENERATIVE = {"text-generation", "chat", "completion"}
_ERROR_FIXES = {
    "queue_full": (
        "requests were refused because the model's queue was full",
        "raise [runtime] max_queue, or serve the model from a [groups.NAME] of several deployments",
    ),
    "timeout": (
        "requests ran past [runtime] request_timeout_s",
        "raise [runtime] request_timeout_s, or ask for fewer tokens per request",
    ),
    "overloaded": (
        "the model was overloaded",
        "serve it from a [groups.NAME] with another deployment to share the load",
    ),
}


@attrs.frozen(kw_only=True)
class Advice:
    """One piece of advice."""

    id: str
    model: str | None
    severity: str  # info, warning, critical
    title: str
    action: str
    evidence: Mapping[str, Any] = attrs.field(factory=dict)
    #: a config snippet that applies the action, when one does
    config: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "model": self.model,
            "severity": self.severity,
            "title": self.title,
            "action": self.action,
            "evidence": dict(self.evidence),
            "config": self.config,
        }


def advise(
    monitor: Monitor, *, window_s: float = 600.0, min_requests: int = MIN_REQUESTS
) -> list[Advice]:
    """Advice for every model with traffic in the last ``window_s``, most
    severe first."""
    summary = monitor.windows.summary(window_s)
    workers = {w.name: w for w in monitor.loaded()}
    out: list[Advice] = []
    for model, figures in summary["models"].items():
        card = _card(monitor, model)
        worker = workers.get(model)
        enough = figures["requests"] >= min_requests
        if enough:
            out += _batching(monitor, model, figures, worker)
            out += _latency(monitor, model, figures, card, monitor.latency_target_ms)
            out += _errors(model, figures)
        out += _engine(model, figures)
        out += _accuracy(monitor, model, figures, card)
    out += _fusions(monitor, min_requests)
    order = {"critical": 0, "warning": 1, "info": 2}
    out.sort(key=lambda a: (order.get(a.severity, 3), a.model or "", a.id))
    return out


def _card(monitor: Monitor, model: str) -> Any:
    try:
        return monitor.cards(model)
    except LlmosError:
        return None


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.0f} ms" if value >= 10 else f"{value:.1f} ms"


def _settings_config(monitor: Monitor, model: str, key: str, value: Any) -> str:
    """Where a deployment's batching key is set: its ``[models.NAME]`` table
    when the config declares it, else the registered card's options (or, for
    every model at once, ``[runtime]``)."""
    name = model.partition("@")[0]
    text = json.dumps(value)
    if name in monitor.config.section("models"):
        return f"[models.{name}]\n{key} = {text}"
    return (
        f"# {model} is a registered card: set its option {key} = {text}, or for every model\n"
        f"[runtime]\n{key} = {text}"
    )


def _batching(
    monitor: Monitor, model: str, figures: Mapping[str, Any], worker: Any
) -> list[Advice]:
    """Requests queue while the model's calls hold one request each."""
    if worker is None or not worker.settings.batching:
        return []
    wait = figures.get("queue_wait_p95_ms")
    call = figures.get("model_p50_ms")
    batch = figures.get("batch_size_mean")
    if wait is None or call is None or batch is None:
        return []
    # Queueing matters when a request waits longer than a call takes.
    if wait < max(call, 1.0) or batch > 1.5:
        return []
    size = worker.settings.max_batch_size
    evidence = {
        "queue_wait_p95_ms": round(wait, 2),
        "model_call_p50_ms": round(call, 2),
        "batch_size_mean": round(batch, 2),
        "max_batch_size": size,
        "rps": round(figures["rps"], 2),
    }
    if size <= 1:
        target = 8
        return [
            Advice(
                id="raise-batch-size",
                model=model,
                severity="warning",
                title=f"{model}: requests queue while every call takes one",
                action=(
                    f"raise max_batch_size from {size} to {target}: requests wait "
                    f"{_ms(wait)} (p95) for calls of {_ms(call)} that take one request each"
                ),
                evidence=evidence,
                config=_settings_config(monitor, model, "max_batch_size", target),
            )
        ]
    return [
        Advice(
            id="wait-for-batch",
            model=model,
            severity="info",
            title=f"{model}: batches stay at one request although requests queue",
            action=(
                f"set max_wait_ms to a few milliseconds (e.g. 5) so that a call gathers the "
                f"requests arriving together; batches average {batch:.2f} of up to {size}"
            ),
            evidence=evidence,
            config=_settings_config(monitor, model, "max_wait_ms", 5),
        )
    ]


def _latency(
    monitor: Monitor, model: str, figures: Mapping[str, Any], card: Any, target_ms: float
) -> list[Advice]:
    """p95 above the target on the transformers provider: vLLM serves faster."""
    p95 = figures.get("latency_p95_ms")
    if not target_ms or p95 is None or p95 <= target_ms or card is None:
        return []
    if card.provider != "transformers" or not _GENERATIVE & set(card.tasks):
        return []
    installed = "vllm" in monitor.providers()
    ratio = VLLM_BENCHMARK.get("tokens_per_s_ratio")
    measured = (
        f" (measured x{ratio:.2f} tokens/s with enable_lora off in {VLLM_BENCHMARK['benchmark']})"
        if ratio
        else ""
    )
    how = "" if installed else "pip install llmos-vllm, then "
    return [
        Advice(
            id="try-vllm",
            model=model,
            severity="warning",
            title=f"{model}: p95 latency {_ms(p95)} is above the {_ms(target_ms)} target",
            action=(
                f"{how}serve it with the vLLM provider, which batches continuously"
                f'{measured}: set provider = "vllm"'
            ),
            evidence={
                "latency_p95_ms": round(p95, 2),
                "latency_target_ms": target_ms,
                "provider": card.provider,
                "tokens_out_per_s": round(figures.get("tokens_out_per_s") or 0.0, 2),
                "vllm_installed": installed,
                **{k: v for k, v in VLLM_BENCHMARK.items() if v is not None},
            },
            config=_vllm_config(monitor, model, card),
        )
    ]


def _vllm_config(monitor: Monitor, model: str, card: Any) -> str:
    name = model.partition("@")[0]
    if name in monitor.config.section("models"):
        return f'[models.{name}]\nprovider = "vllm"'
    return f'[models.{name}-vllm]\nprovider = "vllm"\nsource = {json.dumps(card.source)}'


def _errors(model: str, figures: Mapping[str, Any]) -> list[Advice]:
    rate = figures.get("error_rate") or 0.0
    if rate < 0.05:
        return []
    kind, count = next(iter(figures["errors_by_kind"].items()), ("error", 0))
    what, fix = _ERROR_FIXES.get(
        kind, (f"requests failed with {kind}", f"read the daemon log for its {kind} errors")
    )
    return [
        Advice(
            id="errors",
            model=model,
            severity="critical" if rate >= 0.25 else "warning",
            title=f"{model}: {rate:.0%} of requests failed",
            action=f"{what} ({count} of {figures['requests']}): {fix}",
            evidence={
                "error_rate": round(rate, 4),
                "errors_by_kind": dict(figures["errors_by_kind"]),
                "requests": figures["requests"],
            },
        )
    ]


def _engine(model: str, figures: Mapping[str, Any]) -> list[Advice]:
    """A self-batching engine (vLLM) whose requests wait for KV-cache room."""
    engine = figures.get("engine") or {}
    # the interval's peak where the engine says it: the latest reading of a burst
    # that just ended is that of an idle engine
    usage = engine.get("kv_cache_usage_max", engine.get("kv_cache_usage"))
    waiting = engine.get("waiting_max", 0)
    if usage is None or usage < 0.9 or not waiting:
        return []
    return [
        Advice(
            id="kv-cache",
            model=model,
            severity="warning",
            title=f"{model}: requests wait for KV-cache room ({usage:.0%} used)",
            action=(
                "give the engine more KV cache — kv_cache_gib (CPU) or gpu_memory_utilization "
                "(GPU) in [plugins.vllm] or the card's options — or lower max_num_seqs so "
                "that fewer requests run at once and none is preempted"
            ),
            evidence={
                "kv_cache_usage": usage,
                "waiting_max": waiting,
                "running_max": engine.get("running_max"),
                "preempted": engine.get("preempted"),
            },
            config="[plugins.vllm]\nkv_cache_gib = 4",
        )
    ]


def _accuracy(monitor: Monitor, model: str, figures: Mapping[str, Any], card: Any) -> list[Advice]:
    """The latest accuracy check fell below the registered score: re-tune."""
    evaluation = figures.get("evaluation") or {}
    score, registered = evaluation.get("score"), evaluation.get("registered")
    if score is None or registered is None or card is None:
        return []
    tolerance = 0.02
    for rule in monitor.alerts.rules:
        if rule.metric == "accuracy" and rule.model == model:
            tolerance = rule.tolerance
    if score >= registered - tolerance:
        return []
    provenance = dict(card.options.get("tuning") or {})
    sources = dict(dict(provenance.get("data") or {}).get("sources") or {})
    base = card.parents[0] if card.parents else model
    method = provenance.get("method", "lora")
    command = ["llmos", "tune", "--model", base, "--method", str(method)]
    train = sources.get("train")
    if train and train != "inline":
        command += ["--train", train]
    else:
        command += ["--train", "NEW_TRAIN_FILE"]
    if sources.get("dev") and sources["dev"] != "inline":
        command += ["--dev", sources["dev"]]
    command += ["--name", card.name]
    return [
        Advice(
            id="retune",
            model=model,
            severity="critical",
            title=f"{model}: accuracy {score:.3f} fell below its registered {registered:.3f}",
            action=(
                f"re-tune {base} with {method} on fresh labelled data (the recent "
                f"traffic's, if it drifted): {shlex.join(command)}"
            ),
            evidence={
                "accuracy": score,
                "registered": registered,
                "tolerance": tolerance,
                "rows": evaluation.get("rows"),
                "data": evaluation.get("data"),
                "method": method,
            },
        )
    ]


def _fusions(monitor: Monitor, min_requests: int) -> list[Advice]:
    """A member that always agrees with the fused answer adds nothing but cost."""
    out = []
    for fusion, members in monitor.windows.fusions().items():
        for member, f in members.items():
            if f["answered"] < min_requests:
                continue
            agreed = f["agreed"] / f["answered"]
            others = [m for m in members if m != member]
            if agreed >= 0.99 and others:
                out.append(
                    Advice(
                        id="fusion-member",
                        model=fusion,
                        severity="info",
                        title=f"{fusion}: member {member} agreed with the fused answer "
                        f"on {agreed:.1%} of {f['answered']} rows",
                        action=(
                            f"check its marginal contribution with `llmos eval {fusion} "
                            f"--data DEV_FILE`; if it adds nothing, drop it or make it the "
                            f"cheap first member of a cascade"
                        ),
                        evidence={"member": member, **f},
                    )
                )
    return out
