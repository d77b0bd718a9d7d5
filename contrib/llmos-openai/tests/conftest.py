"""Fixtures: a real upstream llmos daemon on loopback, downstream kernels
whose ``openai-compatible`` cards point at it, and small stdlib HTTP servers
(an attacker that records what reaches it, a scripted vendor that answers
what a test tells it).

The upstream serves ``echo`` models from a plugin distribution written here
with ``write_distribution`` (found through its entry point, like any installed
plugin). Their answers are computed from the request, so every expected output
is known: a completion of ``P`` is ``"you said P"``, a chat reply to ``M`` is
``"reply to M"`` (both cut to ``max_tokens`` words, ``finish_reason
"length"``), a stream sends the same words one chunk each, an embedding of
``T`` is ``[len(T), words in T, 1.0]``. Every request the model gets is
recorded with its sampling (``CALLS``); every HTTP request the daemon gets is
recorded with its client port and ``Authorization`` header (``seen``). The
upstream requires an API key, so every test goes through a key.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import pytest

from llmos.config import load_config
from llmos.logs import configure_logging
from llmos.runtime.kernel import Kernel
from llmos.server.app import create_app
from llmos.testing import serve_app, write_distribution
from llmos.types import ModelCard, ModelFormat

ECHO = """
import threading
import time

from llmos.errors import Unavailable
from llmos.plugin import hookimpl
from llmos.types import (
    Capability, ChatMessage, ChatResult, CompletionResult, EmbedResult, ModelBase,
    ProviderSpec, StreamChunk, Usage,
)

CALLS = []
LOCK = threading.Lock()


def answer(prefix, text, sampling):
    words = f"{prefix} {text}".split()
    finish = "stop"
    if sampling.max_tokens is not None and len(words) > sampling.max_tokens:
        words, finish = words[: sampling.max_tokens], "length"
    usage = Usage(prompt_tokens=len(text.split()), completion_tokens=len(words))
    return words, finish, usage


class Echo(ModelBase):
    capabilities = frozenset(
        {Capability.COMPLETE, Capability.CHAT, Capability.STREAM, Capability.EMBED}
    )

    def __init__(self, card):
        super().__init__(card)
        self.delay = float(card.options.get("delay_s", 0.0))

    def _seen(self, capability, text, sampling=None):
        with LOCK:
            CALLS.append(
                {"model": self.card.name, "capability": capability, "text": text,
                 "sampling": sampling}
            )
        if "boom" in text:
            raise Unavailable("the echo model says boom")
        if self.delay:
            time.sleep(self.delay)

    def complete(self, requests):
        out = []
        for r in requests:
            self._seen("complete", r.prompt, r.sampling)
            words, finish, usage = answer("you said", r.prompt, r.sampling)
            out.append(CompletionResult(text=" ".join(words), finish_reason=finish, usage=usage))
        return out

    def chat(self, requests):
        out = []
        for r in requests:
            text = r.messages[-1].content
            self._seen("chat", text, r.sampling)
            words, finish, usage = answer("reply to", text, r.sampling)
            out.append(ChatResult(message=ChatMessage("assistant", " ".join(words)),
                                  finish_reason=finish, usage=usage))
        return out

    def stream(self, requests):
        for i, r in enumerate(requests):
            chat = hasattr(r, "messages")
            text = r.messages[-1].content if chat else r.prompt
            self._seen("stream", text, r.sampling)
            words, finish, usage = answer("reply to" if chat else "you said", text, r.sampling)
            for j, word in enumerate(words):
                yield StreamChunk(index=i, text=(" " if j else "") + word)
            yield StreamChunk(index=i, text="", finish_reason=finish, usage=usage)

    def embed(self, requests):
        out = []
        for r in requests:
            self._seen("embed", r.text)
            n = len(r.text.split())
            out.append(EmbedResult(vector=[float(len(r.text)), float(n), 1.0],
                                   usage=Usage(prompt_tokens=n)))
        return out


@hookimpl
def llmos_register_providers(register):
    register(ProviderSpec(name="echo", load=lambda request: Echo(request.card)))
"""

#: the key the upstream daemon accepts; tests hand it to cards via UPSTREAM_KEY_ENV
UPSTREAM_KEY = "sk-test-upstream-0123456789abcdef"
UPSTREAM_KEY_ENV = "LLMOS_TEST_UPSTREAM_API_KEY"
#: the operator's pairing of that key with the hosts the upstream is reached
#: at (loopback, and the DNS-rebinding tests' name), which downstreams get
#: unless a test asks for ``paired=False``
PAIRING = f'plugins.openai.key_hosts={{{UPSTREAM_KEY_ENV}=["127.0.0.1", "rebind.test"]}}'


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    """Warnings and errors only: the log sink would print every event."""
    configure_logging("warning", fmt="console")


@pytest.fixture(scope="module")
def echo_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    site = tmp_path_factory.mktemp("upstream-site")
    write_distribution(site, "llmos-upstream-echo", ECHO)
    sys.path.insert(0, str(site))
    try:
        yield lambda: sys.modules["llmos_upstream_echo"]
    finally:
        sys.path.remove(str(site))
        sys.modules.pop("llmos_upstream_echo", None)


class _Seen:
    """ASGI middleware (outermost) recording each ``/v1/`` request the
    upstream daemon gets: client port, path, headers."""

    def __init__(self, app: Any, seen: list[dict[str, Any]]) -> None:
        self.app = app
        self.seen = seen

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/"):
            headers = {k.decode().lower(): v.decode() for k, v in scope.get("headers", ())}
            self.seen.append({"port": scope["client"][1], "path": scope["path"], **headers})
        await self.app(scope, receive, send)


@attrs.define
class Upstream:
    url: str
    kernel: Kernel
    seen: list[dict[str, Any]]
    module: Callable[[], Any]

    @property
    def calls(self) -> list[dict[str, Any]]:
        return self.module().CALLS

    def clear(self) -> None:
        self.seen.clear()
        self.module().CALLS.clear()

    def ports(self) -> set[int]:
        return {entry["port"] for entry in self.seen}


@contextlib.contextmanager
def run_upstream(
    home: Path, module: Callable[[], Any], *overrides: str, port: int = 0
) -> Iterator[Upstream]:
    """An llmos daemon serving ``echo`` (and ``slow``, 0.6 s a call),
    requiring :data:`UPSTREAM_KEY`; on ``port`` when given."""
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "llmos-upstream-echo"},
            overrides=[
                f'server.api_keys=["{UPSTREAM_KEY}"]',
                # the DNS-rebinding tests reach it by this name (its own, as far as they go)
                'server.allowed_hosts=["rebind.test"]',
                'models.echo.provider="echo"',
                'models.slow.provider="echo"',
                "models.slow.options={delay_s=0.6}",
                # One request a model call: what the model records is what came over HTTP.
                "runtime.max_batch_size=1",
                *overrides,
            ],
        )
    )
    app = create_app(kernel)
    seen: list[dict[str, Any]] = []
    app.add_middleware(_Seen, seen=seen)
    with serve_app(app, port=port) as running:
        yield Upstream(url=running.url, kernel=kernel, seen=seen, module=module)


@pytest.fixture
def make_upstream(tmp_path: Path, echo_module: Any) -> Callable[..., Any]:
    """``with make_upstream(*overrides) as up:`` a daemon of the test's own
    (one it may stop)."""
    count = iter(range(1000))
    return lambda *overrides, port=0: run_upstream(
        tmp_path / f"up{next(count)}", echo_module, *overrides, port=port
    )


@pytest.fixture(scope="module")
def upstream(tmp_path_factory: pytest.TempPathFactory, echo_module: Any) -> Iterator[Upstream]:
    with run_upstream(tmp_path_factory.mktemp("upstream"), echo_module) as running:
        yield running


@pytest.fixture(autouse=True)
def upstream_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv(UPSTREAM_KEY_ENV, UPSTREAM_KEY)
    return UPSTREAM_KEY


Downstream = Callable[..., Kernel]


@pytest.fixture
def downstream(tmp_path: Path) -> Iterator[Downstream]:
    """``downstream(*overrides, plugins={name: obj}, paired=True)``: a started
    kernel that loads only the ``openai`` plugin (through its entry point) and
    accepts loopback http sources, as a test of a local upstream must; with
    :data:`PAIRING` unless ``paired=False``."""
    kernels: list[Kernel] = []

    def make(
        *overrides: str, plugins: dict[str, object] | None = None, paired: bool = True
    ) -> Kernel:
        kernel = Kernel(
            load_config(
                env={
                    "LLMOS_HOME": str(tmp_path / f"down{len(kernels)}"),
                    "LLMOS_LOAD_PLUGINS": "openai",
                },
                overrides=[
                    "registry.allow_http=true",
                    "registry.allow_private_urls=true",
                    *([PAIRING] if paired else []),
                    *overrides,
                ],
            )
        )
        kernel.load_plugins()
        for name, plugin in (plugins or {}).items():
            kernel.plugins.register(plugin, name)
        kernel.start()
        assert kernel.plugins.providers["openai-compatible"].plugin == "openai"
        kernels.append(kernel)
        return kernel

    yield make
    for kernel in kernels:
        kernel.stop()


def remote_card(name: str, base_url: str, model: str = "echo", **options: Any) -> ModelCard:
    """An ``openai-compatible`` card keyed by :data:`UPSTREAM_KEY_ENV` unless
    the options say otherwise."""
    if "api_key_env" not in options and "api_key_file" not in options:
        options["api_key_env"] = UPSTREAM_KEY_ENV
    options = {k: v for k, v in options.items() if v is not None}
    return ModelCard(
        name=name,
        provider="openai-compatible",
        format=ModelFormat.REMOTE_API,
        source=f"{base_url}/v1",
        options={"model": model, **options},
    )


@pytest.fixture
def card() -> Callable[..., ModelCard]:
    """``card(name, base_url, model="echo", **options)``: see :func:`remote_card`."""
    return remote_card


@pytest.fixture
def register() -> Callable[..., str]:
    """``register(kernel, name, base_url, model="echo", **options)``: register
    :func:`remote_card` in the kernel's registry; returns the name."""

    def add(kernel: Kernel, name: str, base_url: str, model: str = "echo", **options: Any) -> str:
        kernel.registry.register(remote_card(name, base_url, model, **options))
        return name

    return add


# --------------------------------------------------------------------------
# Plain HTTP servers: an attacker, a scripted vendor
# --------------------------------------------------------------------------


@attrs.define
class Reply:
    status: int = 200
    body: bytes | str | dict[str, Any] = b"{}"
    headers: dict[str, str] = attrs.Factory(dict)


class Scripted:
    """A stdlib HTTP server on loopback: records every request (method,
    path, headers, body) and answers ``reply`` (or ``replies[path]``)."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.reply = Reply(
            200,
            {
                "id": "x",
                "object": "chat.completion",
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": "PWNED"},
                        "finish_reason": "stop",
                    }
                ],
            },
        )
        self.replies: dict[str, Reply] = {}
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _handle(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = self.rfile.read(length) if length else b""
                outer.requests.append(
                    {
                        "method": self.command,
                        "path": self.path,
                        "headers": {k.lower(): v for k, v in self.headers.items()},
                        "body": body,
                    }
                )
                reply = outer.replies.get(self.path.split("?")[0], outer.reply)
                raw = reply.body
                if isinstance(raw, dict):
                    raw = json.dumps(raw)
                if isinstance(raw, str):
                    raw = raw.encode()
                self.send_response(reply.status)
                headers = {"Content-Type": "application/json", **reply.headers}
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(raw)))
                self.end_headers()
                self.wfile.write(raw)

            do_GET = do_POST = do_PUT = _handle

            def log_message(self, format: str, *args: Any) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.thread = threading.Thread(
            target=self.server.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def answer(
        self,
        status: int,
        body: bytes | str | dict[str, Any],
        headers: dict[str, str] | None = None,
        path: str | None = None,
    ) -> None:
        """Answer ``path`` (default: every path) with this from now on."""
        reply = Reply(status, body, headers or {})
        if path is None:
            self.reply = reply
        else:
            self.replies[path] = reply

    def __enter__(self) -> Scripted:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def scripted() -> Iterator[Scripted]:
    with Scripted() as server:
        yield server
