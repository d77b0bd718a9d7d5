"""A real Ray cluster of two nodes on this machine, for tests and benchmarks.

:class:`LocalCluster` runs ``ray start --head`` and ``ray start --address``
as a person would, each node on an address of its own in the loopback range
(``127.0.0.3`` the head, ``127.0.0.2`` the worker: Ray turns ``127.0.0.1``
into the machine's outside address, which these tests must not use), with
small CPU counts, capped object stores, no dashboard, no usage stats, and a
temporary folder of its own. GCS health checks are fast (a dead node is
known in about 2 s, not 30 s).

:meth:`LocalCluster.kill_worker` kills the worker node the hard way (its
raylet and every process under it, SIGKILL), as a lost machine would be;
:meth:`LocalCluster.stop` kills every process of the cluster by PID —
those whose command line names its temporary folder, and their children —
never another Ray on the same machine.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import psutil

__all__ = ["HEAD_IP", "WORKER_IP", "LocalCluster"]

HEAD_IP = "127.0.0.3"
WORKER_IP = "127.0.0.2"

#: a node missing 3 health checks 500 ms apart is dead
SYSTEM_CONFIG = {
    "health_check_period_ms": 500,
    "health_check_timeout_ms": 1000,
    "health_check_failure_threshold": 3,
}


def _free_port(host: str) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class LocalCluster:
    """Two Ray nodes on this machine, started and stopped by their PIDs."""

    def __init__(
        self,
        root: Path,
        *,
        head_cpus: float = 2,
        worker_cpus: float = 1,
        worker_resources: Mapping[str, float] | None = None,
        object_store_mb: int = 100,
        memory_mb: int = 4096,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self.root = Path(root)
        self.head_cpus = head_cpus
        self.worker_cpus = worker_cpus
        self.worker_resources = dict(worker_resources or {"worker": 1})
        self.object_store_mb = object_store_mb
        self.memory_mb = memory_mb
        #: more environment for the nodes (their workers inherit it: PYTHONPATH, say)
        self.extra_env = dict(env or {})
        self.port = _free_port(HEAD_IP)
        self.timings: dict[str, float] = {}
        self._ray = str(Path(sys.executable).with_name("ray"))

    @property
    def address(self) -> str:
        return f"{HEAD_IP}:{self.port}"

    def env(self) -> dict[str, str]:
        # what the nodes' workers (the replicas) inherit: no hub, one torch thread;
        # no token auth, which a head turns on by itself where ~/.ray/auth_token
        # exists and a second node started the same way then fails to join
        return {
            **os.environ,
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "HF_HUB_OFFLINE": "1",
            "OMP_NUM_THREADS": "1",
            **self.extra_env,
        }

    def _start(self, what: str, args: list[str]) -> None:
        started = time.perf_counter()
        log = self.root / f"{what}.log"
        with log.open("ab") as out:
            code = subprocess.run(
                [self._ray, "start", *args],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=self.env(),
                timeout=120,
                check=False,
            ).returncode
        if code != 0:
            raise RuntimeError(f"ray start ({what}) failed with {code}; see {log}")
        self.timings[f"{what}_start_s"] = time.perf_counter() - started

    def _common(self) -> list[str]:
        return [
            "--disable-usage-stats",
            f"--object-store-memory={self.object_store_mb * 1024 * 1024}",
            f"--memory={self.memory_mb * 1024 * 1024}",
        ]

    def start_head(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self._start(
            "head",
            [
                "--head",
                f"--node-ip-address={HEAD_IP}",
                f"--port={self.port}",
                f"--num-cpus={self.head_cpus}",
                "--include-dashboard=false",
                f"--temp-dir={self.root / 'ray'}",
                f"--system-config={json.dumps(SYSTEM_CONFIG)}",
                '--resources={"head": 1}',
                *self._common(),
            ],
        )

    def start_worker(self) -> None:
        self._start(
            "worker",
            [
                f"--address={self.address}",
                f"--node-ip-address={WORKER_IP}",
                f"--num-cpus={self.worker_cpus}",
                f"--resources={json.dumps(self.worker_resources)}",
                *self._common(),
            ],
        )

    def start(self) -> LocalCluster:
        self.start_head()
        self.start_worker()
        return self

    # -- processes -------------------------------------------------------------

    def _mine(self) -> list[psutil.Process]:
        """Every process of this cluster: those naming its folder, and their children."""
        marker = str(self.root / "ray")
        found: dict[int, psutil.Process] = {}
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or ()):
                    found[proc.pid] = proc
                    for child in proc.children(recursive=True):
                        found[child.pid] = child
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return list(found.values())

    def _raylet(self, ip: str) -> psutil.Process | None:
        for proc in self._mine():
            try:
                cmdline = proc.cmdline()
            except psutil.NoSuchProcess:
                continue
            if cmdline and cmdline[0].endswith("raylet") and f"--node_ip_address={ip}" in cmdline:
                return proc
        return None

    def worker_pids(self) -> list[int]:
        """The worker node's raylet and every process under it (its workers, agents)."""
        raylet = self._raylet(WORKER_IP)
        if raylet is None:
            return []
        return [raylet.pid, *(c.pid for c in raylet.children(recursive=True))]

    def kill_worker(self) -> list[int]:
        """SIGKILL the worker node: its raylet and all under it. The PIDs killed."""
        pids = self.worker_pids()
        _kill(pids)
        return pids

    def rss_mb(self) -> float:
        """Resident memory of every process of the cluster, MiB."""
        total = 0
        for proc in self._mine():
            try:
                total += proc.memory_info().rss
            except psutil.NoSuchProcess:
                continue
        return total / 2**20

    def stop(self) -> None:
        """Kill every process of the cluster (by PID), however it was left."""
        procs = self._mine()
        for proc in procs:
            try:
                proc.send_signal(signal.SIGTERM)
            except psutil.NoSuchProcess:
                continue
        _, alive = psutil.wait_procs(procs, timeout=5)
        _kill([p.pid for p in alive])


def _kill(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            continue
