"""Ray Serve executor (llmos-ray) against the in-process worker, on a trivial model.

A two-node Ray cluster on this machine (llmos_ray.testing.LocalCluster:
``ray start --head`` on 127.0.0.3, ``ray start --address`` on 127.0.0.2),
the 2-layer test Llama of llmos-transformers, greedy, a few tokens. Three
ways of calling it, all with the kernel's own worker and batching:

* ``local``: :class:`llmos.replica.Replica` in this process — the in-process
  worker the kernel uses without an executor (a future per call);
* ``ray-1``: the ``ray`` executor's placed model, 1 replica;
* ``ray-2``: the same with 2 replicas (one per node).

Overhead: ``--calls`` sequential calls of one request on each way,
interleaved call by call (local, ray-1, local, ray-1 …) so the machine's load
hits both alike; reported: p50 of each and the p50 of the per-pair
differences (the goal: under 3 ms added).

Scaling: ``--clients`` threads each sending ``--each`` calls back to back,
on ray-1 then ray-2 then ray-1 again (the mean of the two ray-1 runs is the
baseline, so a drift of the machine's load shows); reported: throughput and
p95 of each, and the ratios ray-2 / ray-1. On a 2-core machine the two
replicas share the same cores, so the ratio says what Serve's routing costs
or gains there, not what a second machine would give.

Serve's floor: the p50 of ``--calls`` handle calls, made the way llmos-ray
makes them, to a deployment that does nothing — what any Serve call costs on
this machine, llmos or not.

Cluster start time and memory (the RSS of every process of the cluster)
are recorded too. JSON to bench/results/ray_scaling.json. Needs .venv-ray
(``make test-ray``):

    .venv-ray/bin/python bench/ray_scaling.py [--calls 200] [--clients 4] [--each 40]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ["RAY_AUTH_MODE"] = "disabled"  # as its cluster's nodes (llmos_ray.testing)

from ray import serve

from llmos.replica import Replica
from llmos.types import (
    Capability,
    CompletionRequest,
    ModelCard,
    PlacementRequest,
    Sampling,
)
from llmos_ray.executor import RayExecutor
from llmos_ray.testing import HEAD_IP, LocalCluster
from llmos_transformers.testing import write_llama

TEXTS = ["the cat sat on the mat.", "a dog ran in the park!", "hello world, how are you today?"]
REQUEST = CompletionRequest(prompt="the cat", sampling=Sampling(max_tokens=4, temperature=0))


def placement(key: str, folder: Path) -> PlacementRequest:
    card = ModelCard(name=key, provider="transformers", source=str(folder))
    return PlacementRequest(
        key=key,
        card=card,
        provider="transformers",
        plugin="transformers",
        options={"threads": 1},
        path=str(folder),
    )


class Noop:
    """A Serve deployment that answers at once: Serve's own floor."""

    async def call(self, capability: str, requests: list[Any], adapter: Any = None) -> list[Any]:
        return []


def noop_floor(executor: RayExecutor, calls: int) -> float:
    """p50 ms of a call through a handle, from a thread, to a deployment doing nothing."""
    handle = serve.run(
        serve.deployment(Noop).options(ray_actor_options={"num_cpus": 0.1}).bind(),
        name="llmos-bench-noop",
        route_prefix=None,
    )

    async def call() -> Any:
        return await handle.call.remote("complete", [])

    seconds = []
    for _ in range(calls):
        started = time.perf_counter()
        executor.run(call()).result(60)
        seconds.append(time.perf_counter() - started)
    serve.delete("llmos-bench-noop")
    return 1000 * statistics.median(seconds)


def one(model: Any) -> float:
    started = time.perf_counter()
    model.submit(Capability.COMPLETE, [REQUEST]).result(120)
    return time.perf_counter() - started


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def load(model: Any, clients: int, each: int) -> dict[str, float]:
    latencies: list[float] = []
    lock = threading.Lock()

    def client() -> None:
        for _ in range(each):
            seconds = one(model)
            with lock:
                latencies.append(seconds)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    wall = time.perf_counter() - started
    return {
        "calls": len(latencies),
        "throughput_per_s": len(latencies) / wall,
        "p50_ms": 1000 * pct(latencies, 0.5),
        "p95_ms": 1000 * pct(latencies, 0.95),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--each", type=int, default=40)
    parser.add_argument("--out", default="bench/results/ray_scaling.json")
    args = parser.parse_args()

    root = Path(tempfile.mkdtemp(prefix="llmos-ray-bench-"))
    cluster = LocalCluster(root / "cluster")
    record: dict[str, Any] = {"args": vars(args), "python": sys.version.split()[0]}
    try:
        cluster.start()
        record["cluster"] = {**cluster.timings, "idle_rss_mb": cluster.rss_mb()}
        folder = write_llama(root / "tiny", texts=TEXTS, context=256)
        local = Replica(placement("tiny-local", folder), home=root / "home")
        events: list[Any] = []
        executor = RayExecutor(
            cluster.address,
            emit=events.append,
            options={"num_cpus": 0.5, "deployments": {"tiny-2": {"num_replicas": 2}}},
            home=str(root / "home"),
            node_ip_address=HEAD_IP,
        )
        started = time.perf_counter()
        ray1 = executor.place(placement("tiny-1", folder))
        record["cluster"]["place_1_replica_s"] = time.perf_counter() - started
        started = time.perf_counter()
        ray2 = executor.place(placement("tiny-2", folder))
        record["cluster"]["place_2_replicas_s"] = time.perf_counter() - started
        record["cluster"]["serving_rss_mb"] = cluster.rss_mb()
        for model in (local, ray1, ray2):  # warm up
            for _ in range(5):
                one(model)

        pairs = [(one(local), one(ray1)) for _ in range(args.calls)]
        local_s = [a for a, _ in pairs]
        ray_s = [b for _, b in pairs]
        added = [b - a for a, b in pairs]
        record["overhead"] = {
            "local_p50_ms": 1000 * statistics.median(local_s),
            "ray_p50_ms": 1000 * statistics.median(ray_s),
            "added_p50_ms": 1000 * statistics.median(added),
            "added_p95_ms": 1000 * pct(added, 0.95),
            "goal_added_p50_ms": 3.0,
        }
        record["overhead"]["goal_met"] = record["overhead"]["added_p50_ms"] < 3.0
        # what any Serve call costs here, llmos or not: a handle call to a no-op deployment
        record["overhead"]["serve_noop_p50_ms"] = noop_floor(executor, args.calls)

        first = load(ray1, args.clients, args.each)
        two = load(ray2, args.clients, args.each)
        second = load(ray1, args.clients, args.each)
        base_tp = (first["throughput_per_s"] + second["throughput_per_s"]) / 2
        base_p95 = (first["p95_ms"] + second["p95_ms"]) / 2
        record["scaling"] = {
            "ray_1_first": first,
            "ray_2": two,
            "ray_1_second": second,
            "throughput_ratio_2_vs_1": two["throughput_per_s"] / base_tp,
            "p95_ratio_2_vs_1": two["p95_ms"] / base_p95,
        }
        record["load_average"] = os.getloadavg()
        local.close()
        executor.close()
    finally:
        cluster.stop()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps(record, indent=2))


if __name__ == "__main__":
    main()
