"""Tests of llmos-llm-bridge against real llm plugins.

The main subject is ``llm-markov`` from PyPI, a real llm plugin that needs no
network: its model ``markov`` answers with a Markov chain built from the
prompt's words. The tests need ``llm`` and ``llm-markov`` installed
(``pip install llm llm-markov``) and skip, saying so, without them.

The bridge itself is loaded the way the kernel loads any plugin, through its
``llmos`` entry point: if the distribution is not installed (``pip install -e
contrib/llmos-llm-bridge``), the module fixture ``pip install --target``\\ s
it into a temporary folder and puts that on ``sys.path`` for these tests only.

A few tests also register small llm plugins of their own with llm's real
plugin manager (an echo model that reports what llm handed it, an embedding
model, a broken plugin), to check what markov cannot show: conversation
history, usage figures, options, keys, embeddings, and a broken llm plugin.
"""

from __future__ import annotations

import importlib
import itertools
import json
import subprocess
import sys
import time
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import httpx
import pytest
from structlog.testing import capture_logs

llm = pytest.importorskip(
    "llm", reason="the llm package is not installed (pip install llm llm-markov)"
)
pytest.importorskip(
    "llm_markov", reason="the llm-markov plugin is not installed (pip install llm-markov)"
)

from llmos.config import load_config  # noqa: E402
from llmos.errors import LlmosError, NotFoundError, UsageError  # noqa: E402
from llmos.plugin.manager import PluginManager  # noqa: E402
from llmos.runtime.kernel import Kernel  # noqa: E402
from llmos.testing import serve_in_thread  # noqa: E402
from llmos.types import (  # noqa: E402
    Capability,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    EmbedRequest,
    LoadRequest,
    ModelCard,
    ModelFormat,
    Sampling,
)

pytestmark = pytest.mark.slow  # a pip install, kernels, a daemon

DIST = Path(__file__).resolve().parents[1]
PLUGIN = "llm-bridge"

#: any prompt: markov answers with words of it
TEXT = "the cat sat on the mat and the dog sat on the log while the cat ran"
#: a prompt whose chain has one way only: y x y x y x ...
ALTERNATING = "x y x y x y"

CONFIG = """
[models.markov-short]
provider = "llm"
options = { model = "markov", options = { delay = 0.0 }, sampling = { max_tokens = "length" } }

[models.ghost]
provider = "llm"
options = { model = "no-such-llm-model" }
"""


# --------------------------------------------------------------------------
# Fixtures
# --------------------------------------------------------------------------


@pytest.fixture(scope="module", autouse=True)
def llm_home(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """llm's user folder (keys.json, aliases.json) in a temporary folder,
    not the user's own."""
    path = tmp_path_factory.mktemp("llm-user")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LLM_USER_PATH", str(path))
        yield path


@pytest.fixture(scope="module", autouse=True)
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """The bridge as an installed distribution, found through its entry point."""
    try:
        metadata.distribution("llmos-llm-bridge")
    except metadata.PackageNotFoundError:
        pass
    else:  # pip install -e, or PYTHONPATH to a --target folder
        yield
        return
    target = tmp_path_factory.mktemp("bridge-site")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--disable-pip-version-check",
            "--no-deps",  # llmos and llm are already installed here
            "--no-build-isolation",  # hatchling is in the dev environment; no download
            "--target",
            str(target),
            str(DIST),
        ],
        check=True,
        timeout=300,
    )
    sys.path.insert(0, str(target))
    importlib.invalidate_caches()
    try:
        yield
    finally:
        sys.path.remove(str(target))
        importlib.invalidate_caches()


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Kernel]:
    home = tmp_path_factory.mktemp("llmos")
    config = home / "llmos.toml"
    config.write_text(CONFIG)
    env = {"LLMOS_HOME": str(home / "home"), "LLMOS_LOAD_PLUGINS": PLUGIN}
    kernel = Kernel(load_config([config], env=env))
    kernel.start()
    try:
        yield kernel
    finally:
        kernel.stop()


def words(text: str) -> list[str]:
    return text.split()


def assert_markov(prompt: str, answer: str) -> None:
    """``answer`` is a walk on ``prompt``'s word chain: every word is a word
    of the prompt, and a word that has successors in the prompt is followed
    by one of them (llm-markov starts its walk at the prompt's first word)."""
    vocabulary = words(prompt)
    successors: dict[str, set[str]] = {}
    for a, b in itertools.pairwise(vocabulary):
        successors.setdefault(a, set()).add(b)
    walk = [vocabulary[0], *words(answer)]
    assert set(walk) <= set(vocabulary), answer
    for a, b in itertools.pairwise(walk):
        if a in successors:
            assert b in successors[a], f"{a!r} -> {b!r} is not in the prompt: {answer!r}"


# --------------------------------------------------------------------------
# An llm plugin of the tests' own, registered with llm's plugin manager
# --------------------------------------------------------------------------


def _text(message: Any) -> str:
    return "".join(getattr(part, "text", "") or "" for part in message.parts)


class EchoOptions(llm.Options):
    max_tokens: int | None = None
    stop: str | None = None
    flavour: str | None = None


class Echo(llm.KeyModel):
    """Answers with a JSON report of what llm handed it."""

    model_id = "llmos-test/Echo:1"
    needs_key = "llmos-test"
    key_env_var = "LLMOS_TEST_LLM_KEY"
    can_stream = True

    class Options(EchoOptions):
        pass

    def execute(self, prompt, stream, response, conversation, key):  # type: ignore[no-untyped-def]
        report = {
            "prompt": prompt.prompt,
            "system": prompt.system,
            "messages": [[m.role, _text(m)] for m in prompt.messages],
            "history": [
                [r.prompt.prompt, r.prompt.system, r.text()] for r in conversation.responses
            ]
            if conversation is not None
            else None,
            # a stop sequence reversed, or the report would stop at itself
            "options": {
                k: v[::-1] if k == "stop" else v
                for k, v in dict(prompt.options).items()
                if v is not None
            },
            "has_key": bool(key),
        }
        response.set_usage(input=7, output=3)
        text = json.dumps(report)
        # several chunks, so that streaming and stop sequences see pieces
        for i in range(0, len(text), 16):
            yield text[i : i + 16]


class SingleTurn(llm.Model):
    model_id = "llmos-test-single"
    supports_conversation = False

    def execute(self, prompt, stream, response, conversation):  # type: ignore[no-untyped-def]
        yield "ok"


class Lengths(llm.EmbeddingModel):
    model_id = "llmos-test-lengths"

    def embed_batch(self, items):  # type: ignore[no-untyped-def]
        for item in items:
            yield [float(len(item)), float(len(item.split()))]


class TestPlugin:
    @llm.hookimpl
    def register_models(self, register):  # type: ignore[no-untyped-def]
        register(Echo(), aliases=("llmos-echo",))
        register(SingleTurn())

    @llm.hookimpl
    def register_embedding_models(self, register):  # type: ignore[no-untyped-def]
        register(Lengths())


class RaisingPlugin:
    @llm.hookimpl
    def register_models(self, register):  # type: ignore[no-untyped-def]
        raise RuntimeError("deliberately broken register_models")


@pytest.fixture
def echo_plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setenv("LLMOS_TEST_LLM_KEY", "sk-test-not-a-real-key")
    llm.load_plugins()
    llm.pm.register(TestPlugin(), name="llmos-test-plugin")
    try:
        yield
    finally:
        llm.pm.unregister(name="llmos-test-plugin")


def load_card(card: ModelCard) -> Any:
    from llmos_llm_bridge.plugin import load

    return load(LoadRequest(card=card))


def echo(options: dict[str, Any] | None = None) -> Any:
    return load_card(
        ModelCard(
            name="echo", provider="llm", options={"model": "llmos-test/Echo:1", **(options or {})}
        )
    )


# --------------------------------------------------------------------------
# The plugin, found through its entry point
# --------------------------------------------------------------------------


def test_the_entry_point_loads_the_provider_and_the_model_source() -> None:
    pm = PluginManager()
    pm.load()
    info = {i.name: i for i in pm.plugins()}[PLUGIN]
    assert info.status == "loaded", info.error
    assert info.distribution == "llmos-llm-bridge"
    assert set(info.hooks) == {"llmos_register_providers", "llmos_discover_models"}
    spec = pm.providers["llm"].spec
    assert {Capability.CHAT, Capability.STREAM, Capability.COMPLETE} <= spec.capabilities


def test_discovery_registers_markov_through_a_real_kernel(kernel: Kernel) -> None:
    info = {i.name: i for i in kernel.plugins.plugins()}[PLUGIN]
    assert info.status == "loaded", info.error
    card = kernel.registry.store.get("llm/markov")
    assert card.provider == "llm"
    assert card.options == {"model": "markov"}
    assert card.tasks == ("chat", "text-generation")
    assert card.format == ModelFormat.OTHER  # needs no key: runs here
    assert "llm-markov 0.1" in card.description
    assert set(card.tags) >= {"llm", "llm-markov"}
    # llm's built-in OpenAI models are offered too, as remote APIs needing a key
    gpt = kernel.registry.store.get("llm/gpt-4o-mini")
    assert gpt.format == ModelFormat.REMOTE_API
    assert "llm keys set openai" in gpt.description
    # discovery again registers nothing new
    assert not kernel.discover_models().registered


# --------------------------------------------------------------------------
# Complete, chat, stream: markov through the kernel
# --------------------------------------------------------------------------


def test_complete_answers_with_a_walk_on_the_prompts_words(kernel: Kernel) -> None:
    [result] = kernel.call("llm/markov", Capability.COMPLETE, [CompletionRequest(prompt=TEXT)])
    assert len(words(result.text)) == 100  # llm-markov's default length
    assert_markov(TEXT, result.text)
    assert result.finish_reason == "stop"
    # markov reports no usage: whitespace-word estimates
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (len(words(TEXT)), 100)


def test_chat_answers_the_last_user_message(kernel: Kernel) -> None:
    request = ChatRequest(
        messages=[ChatMessage("system", "be brief"), ChatMessage("user", TEXT)],
        sampling=Sampling(max_tokens=12),
    )
    [result] = kernel.call("markov-short", Capability.CHAT, [request])
    assert result.message.role == "assistant"
    assert len(words(result.message.content)) == 12  # max_tokens went to markov's length
    assert_markov(TEXT, result.message.content)
    assert result.usage.prompt_tokens == 2 + len(words(TEXT))


def test_a_chain_with_one_way_is_deterministic_and_stop_cuts_it(kernel: Kernel) -> None:
    def complete(**sampling: Any) -> str:
        request = CompletionRequest(prompt=ALTERNATING, sampling=Sampling(**sampling))
        [result] = kernel.call("markov-short", Capability.COMPLETE, [request])
        return result.text

    assert complete(max_tokens=6) == "y x y x y x "
    assert complete(max_tokens=6, stop=["x y x"]) == "y "


def test_stream_yields_chunks_that_add_up_and_end_with_a_finish_reason(kernel: Kernel) -> None:
    request = ChatRequest(
        messages=[ChatMessage("user", ALTERNATING)], sampling=Sampling(max_tokens=8)
    )
    chunks = list(kernel.stream("markov-short", request))
    assert len([c for c in chunks if c.text]) == 8  # one per word, as llm streams them
    assert "".join(c.text for c in chunks) == "y x y x y x y x "
    assert [c.finish_reason for c in chunks] == [None] * (len(chunks) - 1) + ["stop"]
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8
    # a stop sequence split across chunks ("y " then "x ") is still found
    request = CompletionRequest(prompt=ALTERNATING, sampling=Sampling(max_tokens=8, stop=["x y"]))
    chunks = list(kernel.stream("markov-short", request))
    assert "".join(c.text for c in chunks) == "y "
    assert chunks[-1].finish_reason == "stop"


def test_the_discovered_card_streams_too(kernel: Kernel) -> None:
    # llm/markov itself: markov's defaults (100 words, 20 ms apart when streamed)
    chunks = list(kernel.stream("llm/markov", CompletionRequest(prompt=TEXT)))
    text = "".join(c.text for c in chunks)
    assert len(words(text)) == 100
    assert_markov(TEXT, text)
    assert chunks[-1].finish_reason == "stop"


def test_a_cancelled_stream_stops_llms_generation(kernel: Kernel) -> None:
    # llm/markov streams 100 words 20 ms apart: 2 s if nobody stops it
    started = time.monotonic()
    handle = kernel.stream("llm/markov", CompletionRequest(prompt=TEXT))
    got = [handle.get(timeout=10) for _ in range(3)]
    handle.cancel()
    rest = list(handle)
    assert all(c is not None and c.text for c in got)
    assert len(rest) <= 2  # at most the chunk already on its way
    assert time.monotonic() - started < 1.5


def test_a_built_in_llm_model_without_its_key_says_how_to_set_it(
    kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    # llm's own OpenAI models fail before any network: llm has no key
    # (LLM_USER_PATH is an empty folder here)
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    request = ChatRequest(messages=[ChatMessage("user", "hi")])
    with pytest.raises(LlmosError) as caught:
        kernel.call("llm/gpt-4o-mini", Capability.CHAT, [request])
    assert "llm keys set openai" in caught.value.message
    assert "OPENAI_API_KEY" in caught.value.message


def test_an_unknown_llm_model_is_a_clear_error(kernel: Kernel) -> None:
    with pytest.raises(NotFoundError) as caught:
        kernel.call("ghost", Capability.CHAT, [ChatRequest(messages=[ChatMessage("user", "hi")])])
    message = caught.value.message
    assert "no-such-llm-model" in message
    assert "markov" in message  # the installed ids are listed
    assert "llm models" in message


def test_bad_card_options_are_refused_when_loading() -> None:
    with pytest.raises(UsageError, match="length"):
        load_card(
            ModelCard(
                name="m", provider="llm", options={"model": "markov", "options": {"length": 1}}
            )
        )
    with pytest.raises(UsageError, match="unknown llm card option"):
        load_card(
            ModelCard(name="m", provider="llm", options={"model": "markov", "temperature": 1})
        )
    with pytest.raises(UsageError, match="exactly one"):
        load_card(ModelCard(name="m", provider="llm", options={}))
    with pytest.raises(UsageError, match="no option 'max_len'"):
        load_card(
            ModelCard(
                name="m",
                provider="llm",
                options={"model": "markov", "sampling": {"max_tokens": "max_len"}},
            )
        )


def test_chat_requests_llm_cannot_answer_are_refused() -> None:
    markov = load_card(ModelCard(name="m", provider="llm", options={"model": "markov"}))
    with pytest.raises(UsageError, match="last message must be a user message"):
        markov.chat(
            [ChatRequest(messages=[ChatMessage("user", "a b"), ChatMessage("assistant", "b")])]
        )
    with pytest.raises(UsageError, match="role 'tool'"):
        markov.chat([ChatRequest(messages=[ChatMessage("tool", "42"), ChatMessage("user", "a b")])])
    with pytest.raises(UsageError, match="continuations"):
        markov.complete([CompletionRequest(prompt="a b", score_continuations=["c"])])


# --------------------------------------------------------------------------
# The daemon: /v1/chat/completions, streamed and not
# --------------------------------------------------------------------------


def sse(response: httpx.Response) -> list[Any]:
    events = []
    for line in response.iter_lines():
        if line.startswith("data: "):
            data = line[len("data: ") :]
            events.append(data if data == "[DONE]" else json.loads(data))
    return events


def test_the_daemon_serves_llm_models_over_the_openai_api(kernel: Kernel) -> None:
    with serve_in_thread(kernel) as url, httpx.Client(base_url=url, timeout=60) as client:
        listed = {m["id"] for m in client.get("/v1/models").json()["data"]}
        assert {"llm/markov", "markov-short"} <= listed

        body = {"model": "llm/markov", "messages": [{"role": "user", "content": TEXT}]}
        answer = client.post("/v1/chat/completions", json=body)
        assert answer.status_code == 200, answer.text
        payload = answer.json()
        content = payload["choices"][0]["message"]["content"]
        assert_markov(TEXT, content)
        assert payload["choices"][0]["finish_reason"] == "stop"
        assert payload["usage"]["completion_tokens"] == 100

        body = {
            "model": "markov-short",
            "messages": [{"role": "user", "content": ALTERNATING}],
            "max_tokens": 4,
            "stream": True,
        }
        with client.stream("POST", "/v1/chat/completions", json=body) as streamed:
            assert streamed.status_code == 200
            events = sse(streamed)
        assert events[-1] == "[DONE]"
        chunks = events[:-1]
        deltas = [c["choices"][0]["delta"].get("content", "") for c in chunks]
        assert "".join(deltas) == "y x y x "
        assert len([d for d in deltas if d]) == 4
        assert chunks[-1]["choices"][0]["finish_reason"] == "stop"
        assert chunks[-1]["usage"]["completion_tokens"] == 4

        missing = client.post(
            "/v1/chat/completions",
            json={"model": "ghost", "messages": [{"role": "user", "content": "hi"}]},
        )
        assert missing.status_code == 404
        assert "no-such-llm-model" in missing.text


# --------------------------------------------------------------------------
# What markov cannot show: history, usage, options, keys, embeddings
# --------------------------------------------------------------------------


@pytest.mark.usefixtures("echo_plugin")
def test_a_conversation_reaches_both_kinds_of_llm_plugin() -> None:
    model = echo({"system": "card system"})
    messages = [
        ChatMessage("system", "be kind"),
        ChatMessage("user", "hi"),
        ChatMessage("assistant", "hello"),
        ChatMessage("user", "how"),
        ChatMessage("user", "are you"),
    ]
    [result] = model.chat([ChatRequest(messages=messages)])
    seen = json.loads(result.message.content)
    system = "card system\n\nbe kind"
    assert seen["prompt"] == "how\n\nare you"
    assert seen["system"] == system
    # what plugins reading prompt.messages get (llm's OpenAI models)
    assert seen["messages"] == [
        ["system", system],
        ["user", "hi"],
        ["assistant", "hello"],
        ["user", "how\n\nare you"],
    ]
    # what plugins reading conversation.responses get (older plugins)
    assert seen["history"] == [["hi", system, "hello"]]
    assert seen["has_key"] is True
    # the plugin's own usage figures, not estimates
    assert (result.usage.prompt_tokens, result.usage.completion_tokens) == (7, 3)


@pytest.mark.usefixtures("echo_plugin")
def test_sampling_and_card_options_reach_llm() -> None:
    model = echo({"options": {"flavour": "mint"}})
    sampling = Sampling(max_tokens=5, stop=["<|end|>"], temperature=0.5)  # echo has no temperature
    [result] = model.complete([CompletionRequest(prompt="p", sampling=sampling)])
    seen = json.loads(result.text)
    assert seen["options"] == {"flavour": "mint", "max_tokens": 5, "stop": ">|dne|<"}
    assert seen["history"] is None and seen["messages"] == [["user", "p"]]
    # two stop sequences do not fit echo's one-string option: cut by the bridge only
    sampling = Sampling(stop=['"prompt"', "zz"])
    [result] = model.complete([CompletionRequest(prompt="p", sampling=sampling)])
    assert result.text == "{"
    # an alias works as well as the id
    alias = load_card(ModelCard(name="a", provider="llm", options={"model": "llmos-echo"}))
    assert alias.model_id == "llmos-test/Echo:1"


@pytest.mark.usefixtures("echo_plugin")
def test_a_missing_key_fails_the_load_with_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("LLMOS_TEST_LLM_KEY")
    with pytest.raises(LlmosError) as caught:
        echo()
    assert "llm keys set llmos-test" in caught.value.message
    assert "LLMOS_TEST_LLM_KEY" in caught.value.message


@pytest.mark.usefixtures("echo_plugin")
def test_a_single_turn_model_refuses_history() -> None:
    model = load_card(ModelCard(name="s", provider="llm", options={"model": "llmos-test-single"}))
    [result] = model.chat([ChatRequest(messages=[ChatMessage("user", "hi")])])
    assert result.message.content == "ok"
    history = [ChatMessage("user", "a"), ChatMessage("assistant", "b"), ChatMessage("user", "c")]
    with pytest.raises(UsageError, match="single prompts only"):
        model.chat([ChatRequest(messages=history)])


@pytest.mark.usefixtures("echo_plugin")
def test_embedding_models_are_discovered_and_embed() -> None:
    from llmos_llm_bridge.plugin import cards

    found = {c.name: c for c in cards()}
    card = found["llm/llmos-test-lengths"]
    assert card.tasks == ("embedding",)
    assert card.options == {"embedding_model": "llmos-test-lengths"}
    assert found["llm/llmos-test-echo-1"].options == {"model": "llmos-test/Echo:1"}
    model = load_card(card)
    assert model.capabilities == {Capability.EMBED}
    results = model.embed([EmbedRequest(text="a cat"), EmbedRequest(text="sits on the mat")])
    assert [r.vector for r in results] == [(5.0, 2.0), (15.0, 4.0)]


# --------------------------------------------------------------------------
# Names, and broken llm plugins
# --------------------------------------------------------------------------


def test_llm_ids_become_valid_unique_llmos_names() -> None:
    from llmos.types import validate_model_name
    from llmos_llm_bridge.catalogue import Entry, card_names, sanitize

    assert sanitize("anthropic/claude-3-opus") == "anthropic-claude-3-opus"
    assert sanitize("llama3:8b") == "llama3-8b"
    assert sanitize("GPT-4o") == "gpt-4o"
    assert sanitize("..weird  id..x") == "weird-id.x"

    def entry(model_id: str, kind: str = "chat") -> Entry:
        return Entry(model_id, kind, None, (), "d", "1")

    ids = ["GPT-4o", "gpt-4o", "a/b", "a-b", "x" * 300]
    names = card_names([entry(i) for i in ids] + [entry("gpt-4o", "embedding")])
    assert len(set(names.values())) == len(names)
    for name in names.values():
        assert validate_model_name(name) == name and name.startswith("llm/")
    assert names[("chat", "GPT-4o")] == "llm/gpt-4o"  # sorted first, keeps the plain name
    assert names[("chat", "gpt-4o")].startswith("llm/gpt-4o-")
    # the same names whatever the order plugins register in
    again = card_names([entry(i) for i in reversed(ids)] + [entry("gpt-4o", "embedding")])
    assert again == names


def write_llm_plugin(root: Path, dist: str, source: str) -> None:
    """What pip leaves behind for a one-module llm plugin."""
    module = dist.replace("-", "_")
    (root / f"{module}.py").write_text(source)
    info = root / f"{module}-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n")
    (info / "entry_points.txt").write_text(f"[llm]\n{dist} = {module}\n")


def test_a_broken_llm_plugin_is_skipped_with_a_warning(tmp_path: Path) -> None:
    from llmos_llm_bridge.catalogue import catalogue
    from llmos_llm_bridge.plugin import cards

    write_llm_plugin(tmp_path, "llmos-test-broken", "raise ImportError('deliberately broken')\n")
    sys.path.insert(0, str(tmp_path))
    importlib.invalidate_caches()
    llm.pm.register(RaisingPlugin(), name="llmos-test-raising")
    try:
        with capture_logs() as logs:
            found = catalogue()
            again = catalogue()
            names = {c.name for c in cards()}
        failed = dict(found.failures)
        assert "deliberately broken" in failed["llmos-test-broken"]
        assert any("deliberately broken register_models" in e for e in failed.values())
        assert dict(again.failures).keys() == failed.keys()
        # the other plugins' models are still there
        assert "markov" in {e.model_id for e in found.entries}
        assert "llm/markov" in names
        warned = [e["llm_plugin"] for e in logs if e["event"] == "llm_bridge.llm_plugin_failed"]
        assert warned.count("llmos-test-broken") == 1  # once per process, not per call
        # and an unknown model's error names what could not be loaded
        with pytest.raises(NotFoundError, match="llmos-test-broken"):
            load_card(ModelCard(name="m", provider="llm", options={"model": "nope"}))
    finally:
        llm.pm.unregister(name="llmos-test-raising")
        sys.path.remove(str(tmp_path))
        importlib.invalidate_caches()
