"""A test plugin, ``llmos-table``: models that answer from tables in their
cards' options, so that every expected output in a test is computed by hand.

* ``scores``: text -> label probabilities (``default`` otherwise);
* ``answers``: prompt (or last chat message) -> text; ``logprobs``:
  continuation -> log-probability; ``vectors``: text -> embedding;
* ``capabilities``: what the model serves (default classify);
* ``stream_raises``: ``stream()`` raises at once (not a generator);
* ``delay_s``: sleep before answering; ``fail``: always raise;
  ``fail_file``: raise while that file exists, as ``fail_kind``
  (``unavailable`` (503), ``overloaded`` (429), ``usage`` (400) or ``crash``,
  a RuntimeError);
* every text asked is recorded in ``llmos_table.CALLS[model name]``.
"""

from __future__ import annotations

import sys
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from llmos.config import load_config
from llmos.runtime.kernel import Kernel
from llmos.testing import write_distribution
from llmos.types import ModelCard

TABLE = """
import os
import threading
import time

from llmos.errors import Overloaded, Unavailable, UsageError
from llmos.plugin import hookimpl
from llmos.types import (
    CallAbandoned, Capability, ChatMessage, ChatResult, ClassifyResult, CompletionResult,
    EmbedResult, ModelBase, ProviderSpec, StreamChunk, Usage, cancel_event,
)

CALLS = {}
ABANDONED = []
LOCK = threading.Lock()


class Table(ModelBase):
    def __init__(self, card):
        super().__init__(card)
        o = card.options
        self.scores = o.get("scores", {})
        self.default = o.get("default", {"pos": 0.5, "neg": 0.5})
        self.delay = float(o.get("delay_s", 0.0))
        self.answers = o.get("answers", {})
        self.logprobs = o.get("logprobs", {})
        self.vectors = o.get("vectors", {})
        self.capabilities = frozenset(Capability(c) for c in o.get("capabilities", ["classify"]))

    def _seen(self, texts):
        with LOCK:
            CALLS.setdefault(self.card.name, []).extend(texts)
        if self.delay:
            # a provider that watches for abandoned calls (llmos.types.cancel_event)
            cancel = cancel_event()
            if cancel is None:
                time.sleep(self.delay)
            elif cancel.wait(self.delay):
                ABANDONED.append(self.card.name)
                raise CallAbandoned(f"{self.card.name}: every caller went away")
        fail_file = self.card.options.get("fail_file")
        if fail_file and os.path.exists(fail_file):
            kind = self.card.options.get("fail_kind", "unavailable")
            if kind == "overloaded":
                raise Overloaded(f"{self.card.name} is busy")
            if kind == "usage":
                raise UsageError(f"{self.card.name} refuses this request")
            if kind == "crash":
                raise RuntimeError(f"{self.card.name} crashed")
            raise Unavailable(f"{self.card.name} is down")

    def classify(self, requests):
        self._seen([r.text for r in requests])
        if self.card.options.get("fail"):
            raise RuntimeError("table says no")
        out = []
        for r in requests:
            scores = self.scores.get(r.text, self.default)
            if r.labels:  # zero-shot: only the labels asked, in their order
                scores = {label: scores.get(label, 0.0) for label in r.labels}
            out.append(ClassifyResult(scores=scores, usage=Usage(prompt_tokens=1)))
        return out

    def complete(self, requests):
        self._seen([r.prompt for r in requests])
        out = []
        for r in requests:
            if r.score_continuations:
                logprobs = tuple(self.logprobs.get(c, -50.0) for c in r.score_continuations)
                out.append(CompletionResult(text="", continuation_logprobs=logprobs))
            else:
                out.append(CompletionResult(text=self.answers.get(r.prompt, "?"),
                                            usage=Usage(prompt_tokens=1, completion_tokens=2)))
        return out

    def chat(self, requests):
        self._seen([r.messages[-1].content for r in requests])
        return [ChatResult(message=ChatMessage("assistant",
                                               self.answers.get(r.messages[-1].content, "?")))
                for r in requests]

    def stream(self, requests):
        if self.card.options.get("stream_raises"):
            raise RuntimeError("no streams today")  # at once: not a generator
        return self._chunks(requests)

    def _chunks(self, requests):
        for index, request in enumerate(requests):
            if hasattr(request, "prompt"):
                text = self.complete([request])[0].text
            else:
                text = self.chat([request])[0].message.content
            half = len(text) // 2
            yield StreamChunk(index=index, text=text[:half])
            yield StreamChunk(index=index, text=text[half:])
            yield StreamChunk(index=index, text="", finish_reason="stop", usage=Usage())

    def embed(self, requests):
        self._seen([r.text for r in requests])
        return [EmbedResult(vector=self.vectors.get(r.text, [0.0, 0.0])) for r in requests]


@hookimpl
def llmos_register_providers(register):
    register(ProviderSpec(name="table", load=lambda request: Table(request.card)))
"""


def install(folder: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """Write the plugin under ``folder`` and put it on the path; yields a
    function returning the imported module (for ``CALLS``)."""
    folder.mkdir(parents=True, exist_ok=True)
    write_distribution(folder, "llmos-table", TABLE)
    monkeypatch.syspath_prepend(str(folder))
    yield lambda: sys.modules["llmos_table"]
    sys.modules.pop("llmos_table", None)


def table_kernel(home: Path, overrides: Sequence[str], recorder: object | None = None) -> Kernel:
    """A kernel that loads only ``llmos-table`` (plugins loaded, not started),
    with ``recorder`` registered as a plugin when given."""
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "llmos-table"},
            overrides=list(overrides),
        )
    )
    kernel.load_plugins()
    if recorder is not None:
        kernel.plugins.register(recorder, "recorder")
    return kernel


def add(kernel: Kernel, name: str, **options: Any) -> ModelCard:
    """Register a ``table`` model."""
    return kernel.registry.register(ModelCard(name=name, provider="table", options=options))
