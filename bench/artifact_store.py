"""What the artifact store's checks cost, against plain file operations on the same bytes.

A synthetic adapter-like folder (one safetensors file of ``--mb`` MiB of
random float32, a config, a tokenizer) is stored and fetched through
:class:`llmos.registry.fsstore.ArtifactStore`; each figure is paired with the
plain operation a store without checks would do on the same bytes, in
interleaved rounds:

* ``verify_hit``  — a fetch whose copy is already in the cache: every file
  hashed again against the manifest. Baseline ``read_once``: reading the
  files once, which any load does anyway.
* ``fetch_file``  — a fetch from a ``file://`` root into an empty cache: read
  the manifest, copy every file while hashing it, the push's checks (names,
  pickles, headers), rename into place. Baseline ``copytree``:
  ``shutil.copytree`` of the same folder.
* ``fetch_memory`` — the same from fsspec's ``memory://`` (no disk on the
  store's side). Same baseline.
* ``put_file`` — storing the folder in a ``file://`` root (copied with the
  push's checks into the cache, hashed, uploaded). Baseline ``copytree`` x 2
  (the cache's copy and the root's).

The JSON has each round's seconds, the medians and the median of the
per-round ratios (checked / plain).

    python bench/artifact_store.py [--mb 256] [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmos.registry.fsstore import ArtifactStore
from llmos.registry.sources import SourcePolicy

RESULTS = Path(__file__).parent / "results"


def make_folder(folder: Path, mb: int) -> None:
    """A safetensors file of ``mb`` MiB (random bytes: no filesystem dedup) and two JSON files."""
    folder.mkdir(parents=True)
    size = mb << 20
    header = json.dumps({"w": {"dtype": "F32", "shape": [size // 4], "data_offsets": [0, size]}})
    header += " " * (-len(header) % 8)
    with (folder / "adapter_model.safetensors").open("wb") as out:
        out.write(len(header).to_bytes(8, "little") + header.encode())
        for _ in range(mb):
            out.write(os.urandom(1 << 20))
    (folder / "adapter_config.json").write_text('{"peft_type": "LORA", "r": 8}')
    (folder / "tokenizer.json").write_text('{"version": "1.0"}')


def timed(run: Callable[[], Any]) -> float:
    started = time.perf_counter()
    run()
    return time.perf_counter() - started


def read_once(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file():
            with path.open("rb") as file:
                while file.read(1 << 20):
                    pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the weights file, MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=RESULTS / "artifact_store.json")
    args = parser.parse_args()
    policy = SourcePolicy(allowed_roots=())
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="llmos-bench-artifacts-") as scratch:
        work = Path(scratch)
        source = work / "adapter"
        make_folder(source, args.mb)
        file_root = (work / "root").as_uri()
        memory_root = f"memory://bench-{uuid.uuid4().hex[:8]}"
        url = ArtifactStore(file_root, work / "seed", policy).put(source, "bench")
        memory_url = ArtifactStore(memory_root, work / "seed", policy).put(source, "bench")
        for index in range(args.rounds):
            row: dict[str, float] = {}
            cache = work / f"cache-{index}"
            store = ArtifactStore(file_root, cache, policy)
            row["fetch_file"] = timed(lambda s=store: s.fetch(url))
            row["copytree"] = timed(lambda i=index: shutil.copytree(source, work / f"copy-{i}"))
            row["verify_hit"] = timed(lambda s=store: s.fetch(url))
            row["read_once"] = timed(lambda: read_once(source))
            memory = ArtifactStore(memory_root, work / f"mcache-{index}", policy)
            row["fetch_memory"] = timed(lambda m=memory: m.fetch(memory_url))
            root = (work / f"root-{index}").as_uri()
            put = ArtifactStore(root, work / f"pcache-{index}", policy)
            row["put_file"] = timed(lambda p=put: p.put(source, "bench"))
            for folder in (cache, work / f"copy-{index}", work / f"mcache-{index}"):
                shutil.rmtree(folder)
            shutil.rmtree(work / f"root-{index}")
            shutil.rmtree(work / f"pcache-{index}")
            rounds.append(row)
            print(json.dumps({k: round(v, 3) for k, v in row.items()}), flush=True)

    def ratio(checked: str, plain: str, times: float = 1.0) -> float:
        return round(statistics.median(r[checked] / (r[plain] * times) for r in rounds), 2)

    medians = {key: round(statistics.median(r[key] for r in rounds), 3) for key in rounds[0]}
    result = {
        "mb": args.mb,
        "rounds": rounds,
        "median_s": medians,
        "ratios": {
            "verify_hit / read_once": ratio("verify_hit", "read_once"),
            "fetch_file / copytree": ratio("fetch_file", "copytree"),
            "fetch_memory / copytree": ratio("fetch_memory", "copytree"),
            "put_file / (2 x copytree)": ratio("put_file", "copytree", 2.0),
        },
        "verify_hit_mb_per_s": round(args.mb / medians["verify_hit"], 1),
        "machine": {
            "python": platform.python_version(),
            "platform": platform.platform(),
            "cpus": os.cpu_count(),
            "load_average": [round(x, 2) for x in os.getloadavg()],
            "date": time.strftime("%Y-%m-%d"),
        },
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
