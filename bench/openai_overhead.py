"""What llmos's ``openai-compatible`` provider adds over calling the upstream directly.

One upstream — an llmos daemon in a subprocess serving a trivial chat model
(it answers ``ok`` at once, behind an API key) — and the same chat request
sent to it five ways, interleaved rep by rep (the order rotates every rep, so
drift in the machine hits every way alike):

* ``openai_direct`` — the official ``openai`` client straight to the upstream:
  the baseline the issue names;
* ``httpx_direct`` — a bare keep-alive ``httpx.Client`` posting the same JSON:
  the floor of any Python HTTP client;
* ``llmos_model`` — the provider's loaded model called directly
  (``model.chat([request])``): the provider without the kernel;
* ``llmos_provider`` — ``Kernel.call`` on a model whose card says
  ``provider = "openai-compatible"``: resolution, queue, worker thread,
  events, then the provider — what the goal is about;
* ``llmos_router`` — ``Kernel.call`` on a deployment group (``[groups.routed]``,
  round-robin over two ``openai-compatible`` deployments of the same
  upstream): the router's pick, its future chain and meta on top of the
  provider — "provider plus router", the issue's figure;
* ``llmos_proxy`` — the ``openai`` client to an llmos daemon (in this
  process) serving that model: client -> llmos -> upstream, the figure
  comparable to LiteLLM's published proxy overhead (2-12 ms median).

Reports p50/p95/mean ms of each, and the added ms of the llmos ways over
``openai_direct``: the difference of the medians, the difference of the p95s,
and the median of the rep-by-rep differences; also each llmos way's median
over ``httpx_direct``. Goal: ``llmos_provider`` and ``llmos_router`` add
under 2 ms at the median. JSON goes to bench/results/openai_overhead.json.

    python bench/openai_overhead.py [--reps 2000] [--warmup 200] [--out PATH]

Needs the ``llmos-openai`` distribution installed (``make install`` does).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import httpx
from openai import OpenAI

from llmos.config import load_config
from llmos.logs import configure_logging
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread, write_distribution
from llmos.types import Capability, ChatMessage, ChatRequest, Sampling

RESULTS = Path(__file__).parent / "results"
KEY = "bench-upstream-key"
KEY_ENV = "BENCH_UPSTREAM_API_KEY"
PROMPT = "Say ok."

TRIVIAL = """
from llmos.plugin import hookimpl
from llmos.types import Capability, ChatMessage, ChatResult, ModelBase, ProviderSpec, Usage


class Trivial(ModelBase):
    capabilities = frozenset({Capability.CHAT})

    def chat(self, requests):
        return [
            ChatResult(message=ChatMessage("assistant", "ok"),
                       usage=Usage(prompt_tokens=3, completion_tokens=1))
            for _ in requests
        ]


@hookimpl
def llmos_register_providers(register):
    register(ProviderSpec(name="trivial", load=lambda request: Trivial(request.card)))
"""


def summary(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_ms": round(statistics.median(ordered), 4),
        "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))], 4),
        "mean_ms": round(statistics.fmean(ordered), 4),
    }


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_upstream(work: Path) -> tuple[subprocess.Popen[bytes], str]:
    """``llmos serve`` in a subprocess with the trivial model, behind a key."""
    site = work / "site"
    site.mkdir()
    write_distribution(site, "llmos-bench-trivial", TRIVIAL)
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    env.update(
        PYTHONPATH=str(site),
        LLMOS_HOME=str(work / "upstream"),
        LLMOS_LOAD_PLUGINS="llmos-bench-trivial",
        LLMOS_LOG_FORMAT="json",
    )
    command = [
        str(Path(sys.executable).parent / "llmos"),
        "--set",
        f"server.port={port}",
        "--set",
        f'server.api_keys=["{KEY}"]',
        "--set",
        'models.trivial.provider="trivial"',
        "--set",
        "server.log_level=warning",
        "serve",
    ]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                return process, url
        except httpx.TransportError:
            pass
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            raise RuntimeError("the upstream daemon did not start")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=2000)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--out", type=Path, default=RESULTS / "openai_overhead.json")
    args = parser.parse_args()

    configure_logging("warning")  # as a daemon runs: no line per call on the terminal
    work = Path(tempfile.mkdtemp(prefix="llmos-bench-openai-"))
    upstream, up_url = start_upstream(work)
    os.environ[KEY_ENV] = KEY
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(work / "downstream"), "LLMOS_LOAD_PLUGINS": "openai"},
            overrides=[
                "registry.allow_http=true",
                "registry.allow_private_urls=true",
                f'plugins.openai.key_hosts={{{KEY_ENV}=["127.0.0.1"]}}',  # the key's only host
                'models.remote.provider="openai-compatible"',
                'models.remote.format="remote-api"',
                f'models.remote.source="{up_url}/v1"',
                f'models.remote.options={{model="trivial", api_key_env="{KEY_ENV}"}}',
                'models.remote2.provider="openai-compatible"',
                'models.remote2.format="remote-api"',
                f'models.remote2.source="{up_url}/v1"',
                f'models.remote2.options={{model="trivial", api_key_env="{KEY_ENV}"}}',
                'groups.routed.deployments=["remote", "remote2"]',
            ],
        )
    )
    kernel.start()
    messages = [{"role": "user", "content": PROMPT}]
    request = ChatRequest(messages=[ChatMessage("user", PROMPT)], sampling=Sampling(max_tokens=1))
    body = {"model": "trivial", "messages": messages, "max_tokens": 1}
    samples: dict[str, list[float]] = {}
    try:
        with (
            serve_in_thread(kernel) as down_url,
            httpx.Client(
                base_url=f"{up_url}/v1", headers={"Authorization": f"Bearer {KEY}"}
            ) as raw,
        ):
            direct = OpenAI(base_url=f"{up_url}/v1", api_key=KEY, max_retries=0)
            proxied = OpenAI(base_url=f"{down_url}/v1", api_key="unused", max_retries=0)
            model = kernel.models.get("remote").model

            def check(text: str) -> None:
                assert text == "ok", text

            ways: dict[str, Callable[[], None]] = {
                "openai_direct": lambda: check(
                    direct.chat.completions.create(model="trivial", messages=messages, max_tokens=1)
                    .choices[0]
                    .message.content
                ),
                "httpx_direct": lambda: check(
                    raw.post("chat/completions", json=body).json()["choices"][0]["message"][
                        "content"
                    ]
                ),
                "llmos_model": lambda: check(model.chat([request])[0].message.content),
                "llmos_provider": lambda: check(
                    kernel.call("remote", Capability.CHAT, [request])[0].message.content
                ),
                "llmos_router": lambda: check(
                    kernel.call("routed", Capability.CHAT, [request])[0].message.content
                ),
                "llmos_proxy": lambda: check(
                    proxied.chat.completions.create(model="remote", messages=messages, max_tokens=1)
                    .choices[0]
                    .message.content
                ),
            }
            names = list(ways)
            for name in names:
                for _ in range(args.warmup):
                    ways[name]()
                samples[name] = []
            for rep in range(args.reps):
                shift = rep % len(names)
                for name in names[shift:] + names[:shift]:
                    started = time.perf_counter()
                    ways[name]()
                    samples[name].append((time.perf_counter() - started) * 1000)
            connections = getattr(model, "connections_opened", None)
    finally:
        kernel.stop()
        upstream.terminate()
        upstream.wait(30)

    results = {name: summary(values) for name, values in samples.items()}
    base = samples["openai_direct"]
    added = {}
    for name in ("httpx_direct", "llmos_model", "llmos_provider", "llmos_router", "llmos_proxy"):
        paired = [a - b for a, b in zip(samples[name], base, strict=True)]
        added[name] = {
            "p50_diff_ms": round(results[name]["p50_ms"] - results["openai_direct"]["p50_ms"], 4),
            "p95_diff_ms": round(results[name]["p95_ms"] - results["openai_direct"]["p95_ms"], 4),
            "median_paired_diff_ms": round(statistics.median(paired), 4),
        }
    floor = results["httpx_direct"]["p50_ms"]
    over_floor = {
        name: round(results[name]["p50_ms"] - floor, 4)
        for name in ("llmos_model", "llmos_provider", "llmos_router", "llmos_proxy")
    }
    value = added["llmos_provider"]["p50_diff_ms"]
    report = {
        "benchmark": "openai_overhead",
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "platform": platform.platform(),
        },
        "reps": args.reps,
        "warmup": args.warmup,
        "request": {"endpoint": "/v1/chat/completions", "prompt": PROMPT, "max_tokens": 1},
        "results": results,
        "added_over_openai_direct": added,
        "added_p50_ms_over_httpx_direct": over_floor,
        "provider_connections_opened": connections,
        "goal": {
            "llmos_provider added p50 < 2 ms": value < 2.0,
            "value_ms": value,
            "llmos_router added p50 < 2 ms": added["llmos_router"]["p50_diff_ms"] < 2.0,
            "router_value_ms": added["llmos_router"]["p50_diff_ms"],
        },
        "reference": "LiteLLM publishes 2-12 ms median proxy overhead",
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    for name, figures in results.items():
        print(
            f"{name:15} p50 {figures['p50_ms']:7.3f} ms   p95 {figures['p95_ms']:7.3f} ms"
            f"   mean {figures['mean_ms']:7.3f} ms"
        )
    for name, figures in added.items():
        print(
            f"{name:15} over openai_direct: p50 {figures['p50_diff_ms']:+7.3f} ms"
            f"   p95 {figures['p95_diff_ms']:+7.3f} ms"
            f"   paired median {figures['median_paired_diff_ms']:+7.3f} ms"
        )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
