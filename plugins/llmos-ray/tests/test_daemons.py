"""Two llmos daemons — real ``llmos serve`` processes — sharing one PostgreSQL
registry and one Ray cluster, as a cluster behind a load balancer runs them.

A model registered through one daemon is known to the other; served with two
replicas, it answers through both daemons from the same Serve application
(deployed once); each daemon counts the calls it made. A daemon that dies
without a word does not take the application with it, and the last daemon
to stop deletes it.

Needs PostgreSQL's binaries (``make system-packages``) beside Ray: without
them these tests skip, unless ``LLMOS_REQUIRE_SYSTEM_TOOLS=1`` (CI) says
they must run.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from ray import serve

MODEL = "tiny-d"
PROMPT = {"prompt": "the cat", "max_tokens": 8, "temperature": 0}


@attrs.define
class Daemon:
    """One ``llmos serve`` process and what it was started with."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def get(self, path: str, **params: Any) -> Any:
        response = httpx.get(f"{self.url}{path}", params=params, timeout=60)
        assert response.status_code == 200, (path, response.text)
        return response.json()

    def complete(self) -> str:
        response = httpx.post(
            f"{self.url}/v1/completions", json={"model": MODEL, **PROMPT}, timeout=300
        )
        assert response.status_code == 200, (self.name, response.text, self.tail())
        return str(response.json()["choices"][0]["text"])

    def requests(self) -> int:
        figures = self.get("/api/monitor/summary", window="10m")["models"]
        return int(figures.get(f"{MODEL}@1", {}).get("requests", 0))

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return int(self.proc.returncode)


@pytest.fixture(scope="module")
def dsn() -> Iterator[str]:
    """A throwaway PostgreSQL server from Debian's binaries."""
    from llmos_postgres.testing import server_for_tests

    with server_for_tests() as server:
        yield server.dsn


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _start(name: str, cluster: Any, dsn: str, tiny_dir: Path, root: Path) -> Daemon:
    from llmos_ray.testing import HEAD_IP

    home = root / name
    home.mkdir()
    port = _free_port()
    settings = [
        "registry.store=postgres",
        f'registry.allowed_roots=["{tiny_dir.parent}"]',
        'runtime.executor="ray"',
        f'plugins.ray.address="{cluster.address}"',
        f'plugins.ray.node_ip_address="{HEAD_IP}"',
        "plugins.ray.num_cpus=0.25",
        "plugins.ray.num_replicas=2",
        "plugins.ray.event_interval_s=0.1",
        "plugins.transformers.threads=1",
    ]
    env = {
        **os.environ,
        "LLMOS_HOME": str(home),
        "LLMOS_LOAD_PLUGINS": "transformers,ray,postgres",
        "LLMOS_POSTGRES_DSN": dsn,
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
    }
    env.pop("PYTEST_CURRENT_TEST", None)
    log = root / f"{name}.log"
    command = [str(Path(sys.executable).with_name("llmos"))]
    for setting in settings:
        command += ["--set", setting]
    command += ["serve", "--port", str(port)]
    with log.open("wb") as out:
        proc = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT)
    daemon = Daemon(name, f"http://127.0.0.1:{port}", proc, log)
    deadline = time.monotonic() + 120
    while True:
        assert proc.poll() is None, f"daemon {name} exited:\n{daemon.tail()}"
        try:
            if httpx.get(f"{daemon.url}/readyz", timeout=2).status_code == 200:
                return daemon
        except httpx.TransportError:
            pass
        assert time.monotonic() < deadline, f"daemon {name} not ready in 120 s:\n{daemon.tail()}"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def daemons(
    cluster: Any, dsn: str, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[list[Daemon]]:
    root = tmp_path_factory.mktemp("daemons")
    started: list[Daemon] = []
    try:
        for name in ("a", "b"):
            started.append(_start(name, cluster, dsn, tiny_dir, root))
        yield started
    finally:
        for daemon in started:
            daemon.stop(signal.SIGKILL)


def _apps() -> dict[str, Any]:
    return {n: a for n, a in serve.status().applications.items() if n.startswith("llmos-tiny-d-")}


def test_a_model_registered_through_one_daemon_answers_through_both_from_one_deployment(
    daemons: list[Daemon], executor: Any, tiny_dir: Path
) -> None:
    a, b = daemons
    created = httpx.post(
        f"{a.url}/api/models",
        json={"name": MODEL, "provider": "transformers", "source": str(tiny_dir)},
        timeout=60,
    )
    assert created.status_code == 201, created.text
    assert created.json()["card"]["version"] == 1
    # the other daemon reads the same registry
    versions = b.get(f"/api/models/{MODEL}/versions")["versions"]
    assert [v["card"]["version"] for v in versions] == [1]

    first = a.complete()
    assert first
    assert b.complete() == first  # greedy: the same answer, through the other daemon
    (app,) = _apps()  # one Serve application for both daemons, not one each
    deployed_at = _apps()[app].last_deployed_time_s
    for _ in range(2):
        assert a.complete() == first
    for _ in range(3):
        assert b.complete() == first
    assert _apps()[app].last_deployed_time_s == deployed_at  # never redeployed
    assert len(executor.holders(app)) == 2
    health = b.get("/api/monitor/summary")["models"][f"{MODEL}@1"].get("health")
    assert health == {"status": "HEALTHY", "replicas": {"RUNNING": 2}}

    # each daemon's monitor counts the calls it made, not the other's
    deadline = time.monotonic() + 30
    while (a.requests(), b.requests()) != (3, 4):
        assert time.monotonic() < deadline, (a.requests(), b.requests())
        time.sleep(0.2)


def test_a_daemon_that_dies_leaves_the_deployment_to_the_other_and_the_last_deletes_it(
    daemons: list[Daemon], executor: Any
) -> None:
    a, b = daemons
    (app,) = _apps()
    expected = b.complete()
    a.stop(signal.SIGKILL)  # a crash: no word to the cluster
    for _ in range(3):
        assert b.complete() == expected
    assert b.stop(signal.SIGTERM) == 0
    # b let go last (a's hold died with a's Ray driver): the application is deleted
    deadline = time.monotonic() + 60
    while _apps():
        assert time.monotonic() < deadline, (_apps(), executor.holders(app))
        time.sleep(0.5)
    assert executor.holders(app) == []
