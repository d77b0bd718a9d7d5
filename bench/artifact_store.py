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

``--prune-entries N`` measures instead what keeping the cache under
``[artifacts] cache_max_gb`` costs with N entries in it (written to
``results/artifact_store_prune.json``), side by side, in interleaved rounds:

* ``fetch_no_prune`` — a fetch of a small artifact from a ``file://`` root
  into the full cache with ``cache_max_gb = inf`` (no prune) against
  ``fetch_prune``, the same fetch with a cap the cache is under (the prune
  after it lists every entry and finds nothing to do: the common case);
* ``prune_check`` — that prune alone (one ``stat`` per entry; sizes come from
  a memo by digest) and ``prune_cold`` — the first prune of a process, which
  reads every entry's manifest once;
* ``prune_remove_one`` — a prune that finds the cache one entry over and
  removes the least recently used.

    python bench/artifact_store.py --prune-entries 10000 [--rounds 5]
"""

from __future__ import annotations

import argparse
import hashlib
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

from llmos.registry import fsstore
from llmos.registry.fsstore import GB, MANIFEST, ArtifactStore, Manifest, ManifestEntry
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


def machine() -> dict[str, Any]:
    """Where the figures came from, as each result file records it."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "load_average": [round(x, 2) for x in os.getloadavg()],
        "date": time.strftime("%Y-%m-%d"),
    }


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


def fill_cache(cache: Path, count: int) -> int:
    """``count`` entries of 1 MiB each (as their manifests say; the files are
    sparse) aged an hour and more, the oldest first; their bytes in all."""
    cache.mkdir(parents=True)
    total = 0
    old = time.time() - 3600
    for index in range(count):
        name = f"weights-{index}.bin"
        manifest = Manifest("bench", (ManifestEntry(name, 1 << 20, "0" * 64),)).to_bytes()
        digest = hashlib.sha256(manifest).hexdigest()
        folder = cache / digest
        folder.mkdir()
        (folder / MANIFEST).write_bytes(manifest)
        with (folder / name).open("wb") as out:
            out.truncate(1 << 20)
        stamp = old - (count - index)
        os.utime(folder, (stamp, stamp))
        total += (1 << 20) + len(manifest)
    return total


def prune_main(args: argparse.Namespace) -> None:
    policy = SourcePolicy(allowed_roots=())
    rounds: list[dict[str, float]] = []
    with tempfile.TemporaryDirectory(prefix="llmos-bench-prune-") as scratch:
        work = Path(scratch)
        cache = work / "cache"
        started = time.perf_counter()
        held = fill_cache(cache, args.prune_entries)
        print(f"filled {args.prune_entries} entries in {time.perf_counter() - started:.1f} s")
        make_folder(work / "adapter", 1)
        root = (work / "root").as_uri()
        url = ArtifactStore(root, work / "seed", policy).put(work / "adapter", "bench")
        fetched = cache / url.rsplit("/", 1)[1]
        roomy = (held + (8 << 20)) / GB  # a cap the cache stays under
        plain = ArtifactStore(root, cache, policy, cache_max_gb=float("inf"))
        capped = ArtifactStore(root, cache, policy, cache_max_gb=roomy)
        fsstore._SIZES.clear()
        cold = timed(lambda: capped.prune())
        for _ in range(args.rounds):
            row: dict[str, float] = {"prune_cold": cold}
            row["fetch_no_prune"] = timed(lambda: plain.fetch(url))
            shutil.rmtree(fetched)
            row["fetch_prune"] = timed(lambda: capped.fetch(url))
            shutil.rmtree(fetched)
            row["prune_check"] = timed(lambda: capped.prune())
            # one entry over: the oldest goes
            began = time.perf_counter()
            report = capped.prune((held - 1) / GB)
            row["prune_remove_one"] = time.perf_counter() - began
            assert len(report.removed) == 1, report
            held -= report.removed[0].bytes
            rounds.append(row)
            print(json.dumps({k: round(v * 1000, 2) for k, v in row.items()}), flush=True)
    medians_ms = {
        key: round(statistics.median(r[key] for r in rounds) * 1000, 2) for key in rounds[0]
    }
    result = {
        "entries": args.prune_entries,
        "rounds_ms": [{k: round(v * 1000, 2) for k, v in r.items()} for r in rounds],
        "median_ms": medians_ms,
        "prune_added_to_a_fetch_ms": round(
            statistics.median(r["fetch_prune"] - r["fetch_no_prune"] for r in rounds) * 1000, 2
        ),
        "machine": machine(),
    }
    out = args.out or RESULTS / "artifact_store_prune.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "rounds_ms"}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=256, help="size of the weights file, MiB")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument(
        "--prune-entries",
        type=int,
        default=0,
        metavar="N",
        help="measure the cache's prune with N entries instead",
    )
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.prune_entries:
        prune_main(args)
        return
    args.out = args.out or RESULTS / "artifact_store.json"
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
        "machine": machine(),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result["ratios"], indent=2))


if __name__ == "__main__":
    main()
