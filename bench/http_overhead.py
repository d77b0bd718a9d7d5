"""What the daemon adds to a trivial call, side by side in one process.

Four ways to get the same answer from the same trivial model, each timed over
the same number of sequential calls:

* ``direct``  — ``model.complete([request])``: the floor;
* ``kernel``  — ``Kernel.call``: resolution, queue, worker thread, events;
* ``bare_http`` — a bare FastAPI route on uvicorn returning the same JSON
  through httpx with keep-alive: what the web stack itself costs;
* ``llmos_http`` — ``POST /v1/completions`` on the llmos daemon, same client.

Reports p50/p95/mean in ms and the added ms of each over ``direct``; the
goal for ``llmos_http`` minus ``direct`` is under 2 ms at the median
(LiteLLM publishes 2-12 ms). Also reports the daemon's own
``x-llmos-overhead-ms`` header. JSON goes to bench/results/http_overhead.json.

    python bench/http_overhead.py [--calls 2000] [--out PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from llmos.config import load_config
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos.types import (
    Capability,
    CompletionRequest,
    CompletionResult,
    ModelBase,
    ProviderSpec,
    Usage,
)

RESULTS = Path(__file__).parent / "results"


class Trivial(ModelBase):
    capabilities = frozenset({Capability.COMPLETE})

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        return [
            CompletionResult(text="ok", usage=Usage(prompt_tokens=1, completion_tokens=1))
            for _ in requests
        ]


class TrivialPlugin:
    @hookimpl
    def llmos_register_providers(self, register):
        register(ProviderSpec(name="trivial", load=lambda request: Trivial(request.card)))


def timed(calls: int, fn: Callable[[], object], warmup: int = 100) -> list[float]:
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(calls):
        started = time.perf_counter()
        fn()
        out.append((time.perf_counter() - started) * 1000)
    return out


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 4),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
    }


def bare_server() -> tuple[uvicorn.Server, threading.Thread, str]:
    app = FastAPI()
    payload = {"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "ok"}]}

    @app.post("/v1/completions")
    async def completions(body: dict) -> dict:
        return payload

    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_config=None, access_log=False)
    )
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    return server, thread, f"http://127.0.0.1:{port}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--out", type=Path, default=RESULTS / "http_overhead.json")
    args = parser.parse_args()

    home = Path(tempfile.mkdtemp(prefix="llmos-bench-"))
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "", "LLMOS_DISABLE_PLUGINS": ""},
            overrides=['models.trivial.provider="trivial"'],
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(TrivialPlugin(), "trivial")
    request = CompletionRequest(prompt="hi")
    body = {"model": "trivial", "prompt": "hi", "max_tokens": 1}
    results: dict[str, dict[str, float]] = {}
    server_overheads: list[float] = []

    with serve_in_thread(kernel) as url, httpx.Client(base_url=url) as client:
        model = kernel.models.get("trivial").model
        results["direct"] = summary(timed(args.calls, lambda: model.complete([request])))
        results["kernel"] = summary(
            timed(args.calls, lambda: kernel.call("trivial", "complete", [request]))
        )

        def llmos_call() -> None:
            response = client.post("/v1/completions", json=body)
            server_overheads.append(float(response.headers["x-llmos-overhead-ms"]))

        results["llmos_http"] = summary(timed(args.calls, llmos_call))
    server, thread, bare_url = bare_server()
    with httpx.Client(base_url=bare_url) as client:
        results["bare_http"] = summary(
            timed(args.calls, lambda: client.post("/v1/completions", json=body))
        )
    server.should_exit = True
    thread.join(10)

    floor = results["direct"]["p50_ms"]
    added = {
        name: round(figures["p50_ms"] - floor, 4)
        for name, figures in results.items()
        if name != "direct"
    }
    report = {
        "benchmark": "http_overhead",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "calls": args.calls,
        "results": results,
        "added_p50_ms_over_direct": added,
        "llmos_over_bare_http_p50_ms": round(
            results["llmos_http"]["p50_ms"] - results["bare_http"]["p50_ms"], 4
        ),
        "ratio_llmos_http_to_bare_http_p50": round(
            results["llmos_http"]["p50_ms"] / results["bare_http"]["p50_ms"], 3
        ),
        "server_reported_overhead_ms": summary(server_overheads),
        "goal": {
            "llmos_http added p50 < 2 ms": added["llmos_http"] < 2.0,
            "value_ms": added["llmos_http"],
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, figures in results.items():
        print(f"{name:12} p50 {figures['p50_ms']:8.3f} ms   p95 {figures['p95_ms']:8.3f} ms")
    print(f"added by the llmos daemon over a direct call (p50): {added['llmos_http']:.3f} ms")
    print(f"llmos over a bare FastAPI route (p50): {report['llmos_over_bare_http_p50_ms']:.3f} ms")
    print(f"wrote {args.out}")
    kernel.stop()


if __name__ == "__main__":
    main()
