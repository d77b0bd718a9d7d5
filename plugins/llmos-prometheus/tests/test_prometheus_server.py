"""A real Prometheus server (Debian's ``prometheus`` package) scrapes the
daemon's ``/metrics`` every second, with an API key as the README's scrape
config shows, and the values come back through Prometheus' query API."""

from __future__ import annotations

import contextlib
import math
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.testing import system_tool

KEY = "scrape-key-0123"
TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Prometheus:
    """A running Prometheus and its HTTP API."""

    def __init__(self, process: subprocess.Popen[bytes], url: str, log: Path) -> None:
        self.process = process
        self.url = url
        self.log = log

    def query(self, promql: str) -> list[dict[str, Any]]:
        response = httpx.get(f"{self.url}/api/v1/query", params={"query": promql}, timeout=10)
        body = response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    def value(self, promql: str) -> float | None:
        """The single value ``promql`` answers now, or ``None`` while it answers nothing."""
        result = self.query(promql)
        if not result:
            return None
        assert len(result) == 1, result
        return float(result[0]["value"][1])

    def wait_for(self, promql: str, expected: float) -> float:
        """Poll until ``promql`` answers ``expected``; fail saying what Prometheus saw."""
        deadline = time.monotonic() + TIMEOUT_S
        value = None
        while time.monotonic() < deadline:
            value = self.value(promql)
            if value == expected:
                return value
            time.sleep(0.25)
        pytest.fail(
            f"Prometheus answered {promql} = {value}, not {expected}, after {TIMEOUT_S:.0f} s\n"
            f"{self.diagnosis()}",
            pytrace=False,
        )

    def diagnosis(self) -> str:
        """The scrape targets' health and the tail of Prometheus' own log."""
        try:
            targets = httpx.get(f"{self.url}/api/v1/targets", timeout=5).json()
            health = [
                {k: t.get(k) for k in ("scrapeUrl", "health", "lastError", "lastScrape")}
                for t in targets["data"]["activeTargets"]
            ]
        except (httpx.HTTPError, ValueError, KeyError) as exc:
            health = [{"error": repr(exc)}]
        tail = self.log.read_text(errors="replace")[-3000:]
        return f"targets: {health}\nprometheus log (tail):\n{tail}"


@contextlib.contextmanager
def prometheus(scrape_port: int, folder: Path) -> Iterator[Prometheus]:
    """Start Prometheus on a free loopback port, scraping ``127.0.0.1:scrape_port``
    every second with the API key; stop it afterwards, whatever happens."""
    binary = system_tool("prometheus")
    config = folder / "prometheus.yml"
    # The scrape config the README shows, with the test's port and key.
    config.write_text(
        f"""
global:
  scrape_interval: 1s
  scrape_timeout: 1s
  evaluation_interval: 1s
scrape_configs:
  - job_name: llmos
    metrics_path: /metrics
    authorization:
      type: Bearer
      credentials: {KEY}
    static_configs:
      - targets: ["127.0.0.1:{scrape_port}"]
"""
    )
    port = free_port()
    log = folder / "prometheus.log"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={folder / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            cwd=folder,
        )
    server = Prometheus(process, f"http://127.0.0.1:{port}", log)
    try:
        deadline = time.monotonic() + TIMEOUT_S
        while True:
            if process.poll() is not None:
                pytest.fail(
                    f"prometheus exited with {process.returncode}:\n{log.read_text()[-3000:]}",
                    pytrace=False,
                )
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{server.url}/-/ready", timeout=2).status_code == 200:
                    break
            if time.monotonic() > deadline:
                pytest.fail(f"prometheus not ready in {TIMEOUT_S:.0f} s\n{server.diagnosis()}")
            time.sleep(0.1)
        yield server
    finally:
        process.terminate()
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=15)


@pytest.mark.slow
def test_prometheus_scrapes_the_daemon_and_answers_queries(daemon, tmp_path: Path) -> None:
    system_tool("prometheus")  # skip (or, in CI, fail) before starting anything
    d = daemon(f'server.api_keys=["{KEY}"]', api_key=KEY)
    n = 9
    with prometheus(d.running.port, tmp_path) as prom:
        for _ in range(n):
            assert d.classify("m", "x").status_code == 200
        assert d.classify("m", "a", "b").status_code == 200  # one call of two rows

        selector = '{model="m@1",capability="classify"}'
        prom.wait_for('llmos_requests_total{model="m@1",status="ok"}', n + 2)
        # the scrape used the key: the target is up (an unauthorised scrape is down)
        assert prom.value('up{job="llmos"}') == 1
        assert prom.value(f"sum(llmos_request_duration_seconds_count{selector})") == n + 2
        assert prom.value(f"sum(llmos_batch_size_count{selector})") == n + 1
        assert prom.value('llmos_tokens_total{model="m@1",direction="in"}') == n + 2
        # table models answer in well under 100 ms: so does the median Prometheus computes
        median = prom.value(
            "histogram_quantile(0.5, sum by (le) "
            f"(llmos_request_duration_seconds_bucket{selector}))"
        )
        assert median is not None and 0 < median <= 0.1 and not math.isnan(median)
        assert prom.value('llmos_model_loaded{model="m@1"}') == 1
        assert prom.value("llmos_monitor_events_dropped_total") == 0
        assert prom.value("process_resident_memory_bytes") > 1e6
