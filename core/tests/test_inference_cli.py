"""``llmos chat | complete | embed | classify`` in-process and against a daemon.

The model comes from a plugin distribution on ``PYTHONPATH`` (entry-point
discovery, as an installed plugin), deployed with ``--set models.…``.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread, write_distribution

from .conftest import LLMOS, llmos

PARROT = """
from llmos.plugin import hookimpl
from llmos.types import (Capability, ChatMessage, ChatResult, ClassifyResult, CompletionResult,
                         EmbedResult, ModelBase, ProviderSpec, StreamChunk)


class Parrot(ModelBase):
    capabilities = frozenset(Capability)

    def complete(self, requests):
        return [CompletionResult(text=r.prompt[::-1]) for r in requests]

    def chat(self, requests):
        return [ChatResult(message=ChatMessage("assistant", self._said(r))) for r in requests]

    def _said(self, request):
        if request.messages[-1].content == "temperature?":
            return f"t={request.sampling.temperature}"
        return "you said " + request.messages[-1].content

    def stream(self, requests):
        (request,) = requests
        for i, word in enumerate(self._said(request).split(" ")):
            yield StreamChunk(index=0, text=word if i == 0 else " " + word)
        yield StreamChunk(index=0, text="", finish_reason="stop")

    def embed(self, requests):
        return [EmbedResult(vector=[len(r.text), 1.0]) for r in requests]

    def classify(self, requests):
        return [ClassifyResult(scores={"long": 0.75, "short": 0.25} if len(r.text) > 5
                               else {"long": 0.25, "short": 0.75}) for r in requests]


@hookimpl
def llmos_register_providers(register):
    register(ProviderSpec(name="parrot", load=lambda request: Parrot(request.card)))
"""

DEPLOY = ("--set", 'models.p.provider="parrot"')


@pytest.fixture
def parrot_env(env: dict[str, str]) -> dict[str, str]:
    write_distribution(Path(env["PYTHONPATH"]), "llmos-parrot", PARROT)
    return env


@pytest.fixture
def daemon_url(parrot_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.syspath_prepend(parrot_env["PYTHONPATH"])
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": parrot_env["LLMOS_HOME"] + "-daemon", "LLMOS_LOAD_PLUGINS": ""},
            overrides=['models.p.provider="parrot"'],
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(importlib.import_module("llmos_parrot"), "llmos-parrot")
    try:
        with serve_in_thread(kernel) as url:
            yield url
    finally:
        sys.modules.pop("llmos_parrot", None)


@pytest.mark.parametrize("remote", [False, True], ids=["in-process", "daemon"])
def test_the_four_commands(parrot_env: dict[str, str], remote: bool, request) -> None:
    where = ("--url", request.getfixturevalue("daemon_url")) if remote else ()

    def run(*args: str, stdin: str | None = None) -> str:
        done = subprocess.run(
            [LLMOS, *DEPLOY, *args, *where],
            env=parrot_env,
            input=stdin,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        return done.stdout

    assert run("chat", "p", "hello") == "you said hello\n"
    # greedy unless asked, in this process as against the daemon (whose default is 1)
    assert run("chat", "p", "temperature?") == "t=0.0\n"
    assert run("chat", "p", "temperature?", "--temperature", "0.5") == "t=0.5\n"
    assert run("complete", "p", "abc", "xy") == "cba\nyx\n"
    assert run("complete", "p", stdin="first\nsecond\n") == "tsrif\ndnoces\n"
    assert [json.loads(line) for line in run("embed", "p", "abc").splitlines()] == [[3.0, 1.0]]
    assert run("classify", "p", "tiny", "a longer text") == (
        "short\t0.750\ttiny\nlong\t0.750\ta longer text\n"
    )
    results = json.loads(run("classify", "p", "tiny", "--json"))
    assert results == [{"label": "short", "scores": {"long": 0.25, "short": 0.75}}]


def test_interactive_chat_keeps_the_conversation_until_an_empty_line(
    parrot_env: dict[str, str],
) -> None:
    done = subprocess.run(
        [LLMOS, *DEPLOY, "chat", "p"],
        env=parrot_env,
        input="hi\nagain\n\nnever read\n",
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("you said") == 2
    assert "you said hi" in done.stdout and "you said again" in done.stdout
    assert "never read" not in done.stdout


def test_unknown_model_and_unreachable_daemon_are_one_line_errors(
    parrot_env: dict[str, str],
) -> None:
    run = llmos("chat", "ghost", "hi", env=parrot_env)
    assert run.returncode == 4
    assert run.stderr.strip().splitlines() == [run.stderr.strip()]
    assert "'ghost' not found" in run.stderr
    run = llmos("chat", "p", "hi", "--url", "http://127.0.0.1:9", env=parrot_env)
    assert run.returncode == 1 and "cannot reach the daemon" in run.stderr
