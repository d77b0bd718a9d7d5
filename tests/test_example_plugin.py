"""End to end: pip-install the template plugin, discover it through its entry
point, and run the daemon with it and with a deliberately broken plugin.

Nothing here registers a plugin by hand: pip builds and installs
``contrib/llmos-example`` into a folder of its own, that folder goes on
``PYTHONPATH``, and the kernel finds the plugin the way it finds any
installed one.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "contrib" / "llmos-example"
BIN = Path(sys.executable).parent

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install contrib/llmos-example`` into a fresh target folder."""
    target = tmp_path_factory.mktemp("site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",  # llmos itself is already installed in this environment
            "--no-build-isolation",  # hatchling is in the dev environment; no download
            "--target",
            str(target),
            str(EXAMPLE),
        ],
        check=True,
        timeout=300,
    )
    assert (target / "llmos_example" / "plugin.py").is_file()
    return target


@pytest.fixture
def env(installed: Path, tmp_path: Path) -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")}
    broken = tmp_path / "broken-site"
    broken.mkdir()
    out.update(
        PYTHONPATH=os.pathsep.join([str(installed), str(broken)]),
        LLMOS_HOME=str(tmp_path / "home"),
        LLMOS_LOG_FORMAT="json",
    )
    return out


def add_broken_plugin(env: dict[str, str]) -> None:
    from llmos.testing import write_distribution

    site = Path(env["PYTHONPATH"].split(os.pathsep)[1])
    write_distribution(site, "llmos-broken", "raise RuntimeError('deliberately broken')\n")


def plugins_json(env: dict[str, str]) -> dict[str, dict]:
    run = subprocess.run(
        [BIN / "llmos", "plugins", "--json"], env=env, capture_output=True, text=True, check=False
    )
    assert run.returncode == 0, run.stderr
    return {p["name"]: p for p in json.loads(run.stdout)}


def test_the_installed_example_plugin_is_discovered_with_every_hook(env: dict[str, str]) -> None:
    from llmos.plugin.manager import HOOK_NAMES

    example = plugins_json(env)["example"]
    assert example["status"] == "loaded", example["error"]
    assert (example["distribution"], example["version"]) == ("llmos-example", "0.1.0")
    assert set(example["hooks"]) == HOOK_NAMES
    assert set(example["registered"]) == {
        "providers",
        "fusion_strategies",
        "tuning_methods",
        "monitor_sinks",
        "commands",
        "config_sections",
        "registry_stores",
        "executors",
        "routes",  # `llmos plugins` checks every plugin's routes for collisions
    }


def test_the_example_plugins_own_tests_pass_against_the_installed_copy(
    env: dict[str, str],
) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(EXAMPLE / "tests")],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    assert " passed" in run.stdout


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def daemon(env: dict[str, str]) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    add_broken_plugin(env)
    port = free_port()
    proc = subprocess.Popen(
        [BIN / "llmos", "serve", "--port", str(port)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            assert proc.poll() is None, proc.communicate()[1]
            try:
                if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        else:
            pytest.fail("the daemon did not become ready in 60 s")
        yield url, proc
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def test_the_daemon_starts_with_a_broken_plugin_and_serves_the_example_routes(
    daemon: tuple[str, subprocess.Popen[str]], env: dict[str, str]
) -> None:
    url, proc = daemon
    info = httpx.get(f"{url}/example/info", timeout=10)
    assert info.status_code == 200
    assert info.json()["providers"] == ["example-keyword"]
    assert "/example/info" in httpx.get(f"{url}/openapi.json", timeout=10).json()["paths"]
    rows = plugins_json(env)
    assert rows["llmos-broken"]["status"] == "failed"
    assert "deliberately broken" in rows["llmos-broken"]["error"]
    assert rows["example"]["status"] == "loaded"
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 0
    # the failure was logged, as one structured line naming the distribution
    failures = [
        json.loads(line)
        for line in proc.stderr.read().splitlines()
        if line.startswith("{") and '"plugins.failed"' in line
    ]
    assert [(f["plugin"], f["distribution"]) for f in failures] == [
        ("llmos-broken", "llmos-broken")
    ]
