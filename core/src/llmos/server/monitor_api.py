"""Monitoring over HTTP — what the dashboard, ``llmos top`` and
``llmos advise`` read:

* ``GET /api/monitor/summary?window=60`` — every model's figures over the
  window (requests, rps, errors by kind, latency/queue/ttft percentiles,
  tokens/s, batch sizes), its live queue and batching settings, for a
  loaded model the executor it was ``placed`` on (``null``: this process)
  and its ``health`` when it offers one (an executor's view of its
  replicas; ``{"error": ...}`` when that failed or took over 2 s), the
  process's latest sample, the firing alerts, and the monitor's
  ``bucket_s`` (the finest step) and ``keep_s`` (the longest window);
* ``GET /api/monitor/series?model=M&window=600&step=10`` — points over time
  for charts (``model`` omitted: all models together);
* ``GET /api/monitor/jobs`` — tuning jobs with their loss and dev curves;
* ``GET /api/monitor/fusions`` — per fusion, per member: rows asked,
  answered, agreed;
* ``GET /api/monitor/process`` — the process's memory and CPU samples;
* ``GET /api/alerts`` — every rule's state per model, recent firings and
  resolutions, rules the config got wrong;
* ``GET /api/advice?window=600`` — the advisor's advice with its evidence.

Windows are durations (``60``, ``"5m"``); the longest is what the monitor
keeps (``[monitor] keep_s``).
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Query
from fastapi.concurrency import run_in_threadpool

from llmos.errors import UsageError
from llmos.monitor.advisor import advise
from llmos.monitor.metrics import METRICS, RequestStats, parse_duration
from llmos.runtime.kernel import Kernel

__all__ = ["monitor_router"]

_TAGS = ["monitoring"]
#: points a series may have (a chart has a few hundred pixels)
MAX_POINTS = 2_000


def monitor_router(kernel: Kernel) -> APIRouter:
    router = APIRouter()

    def duration(value: str, what: str, default: float) -> float:
        if value == "":
            return default
        try:
            seconds = parse_duration(value, what)
        except ValueError as exc:
            raise UsageError(str(exc)) from None
        keep = kernel.monitor.windows.keep_s
        if seconds > keep:
            raise UsageError(
                f"{what} {value!r} is longer than the {keep:.0f} s the monitor keeps "
                "([monitor] keep_s); the sqlite sink's history has more (llmos report)"
            )
        return seconds

    @router.get("/api/monitor/summary", tags=_TAGS, summary="Every model's live figures")
    def summary(window: str = Query("60", description="e.g. 60, 5m")) -> dict[str, Any]:
        monitor = kernel.monitor
        out = monitor.windows.summary(duration(window, "window", 60.0))
        live = {w.name: w for w in kernel.models.loaded()}
        health = kernel.models.health()
        for name, worker in live.items():
            figures = out["models"].setdefault(
                name, {**RequestStats().figures(out["window_s"]), "capabilities": {}}
            )
            figures.update(
                loaded=True,
                queued=worker.queued,
                in_flight=worker.in_flight,
                provider=worker.card.provider,
                max_batch_size=worker.settings.max_batch_size,
                batching=worker.settings.batching,
                placed=worker.placed_on,
            )
            if name in health:
                figures["health"] = health[name]
        out["alerts_firing"] = monitor.alerts.firing()
        out["events_dropped"] = kernel.bus.dropped
        out["sink_errors"] = dict(kernel.bus.sink_errors)
        out["metrics"] = METRICS
        # what a window or a step may be (the dashboard offers no longer window)
        out["bucket_s"] = monitor.windows.bucket_s
        out["keep_s"] = monitor.windows.keep_s
        return out

    @router.get("/api/monitor/series", tags=_TAGS, summary="A model's figures over time")
    def series(
        model: str | None = Query(None, description="a model; omitted: all together"),
        window: str = Query("600"),
        step: str = Query("", description="seconds between points (default: window/60)"),
    ) -> dict[str, Any]:
        windows = kernel.monitor.windows
        span = duration(window, "window", 600.0)
        every = duration(step, "step", 0.0) or None
        if every is not None and span / max(every, windows.bucket_s) > MAX_POINTS:
            raise UsageError(f"window/step asks for more than {MAX_POINTS} points; widen the step")
        return windows.series(model, span, every)

    @router.get("/api/monitor/jobs", tags=_TAGS, summary="Tuning jobs and their curves")
    def jobs() -> dict[str, Any]:
        return {"data": kernel.monitor.windows.jobs()}

    @router.get("/api/monitor/fusions", tags=_TAGS, summary="Per-member figures of fusions")
    def fusions() -> dict[str, Any]:
        return {"data": kernel.monitor.windows.fusions()}

    @router.get("/api/monitor/process", tags=_TAGS, summary="The daemon's memory and CPU")
    def process(
        window: str = Query("", description="only the samples of this window"),
    ) -> dict[str, Any]:
        samples = kernel.monitor.windows.process()
        if window:
            since = time.time() - duration(window, "window", 0.0)
            samples = [s for s in samples if s["time"] >= since]
        return {"data": samples}

    @router.get("/api/alerts", tags=_TAGS, summary="Alert rules, their states and history")
    def alerts() -> dict[str, Any]:
        manager = kernel.monitor.alerts
        return {
            "data": manager.states(),
            "history": list(reversed(manager.history)),
            "rules": [
                {
                    "name": r.name,
                    "metric": r.metric,
                    "model": r.model,
                    "op": r.op,
                    "threshold": r.threshold,
                    "window_s": r.window_s,
                    "for_s": r.for_s,
                    "severity": r.severity,
                }
                for r in manager.rules
            ],
            "refused": dict(kernel.monitor.refused),
            "webhook": None
            if manager.webhook is None
            else {
                "sent": manager.webhook.sent,
                "failed": manager.webhook.failed,
                "dropped": manager.webhook.dropped,
            },
        }

    @router.get("/api/advice", tags=_TAGS, summary="Advice from the measured figures")
    async def advice(window: str = Query("600")) -> dict[str, Any]:
        span = duration(window, "window", 600.0)
        found = await run_in_threadpool(advise, kernel.monitor, window_s=span)
        return {"window_s": span, "data": [a.to_dict() for a in found]}

    return router
