"""The provider against a real llmos daemon over loopback: every capability,
usage and sampling passed through, streaming, pooling, batches.

The upstream (see conftest) is a real daemon requiring an API key; the
downstream is a real kernel that loaded this plugin through its entry point
and serves an ``openai-compatible`` card pointing at the upstream's ``/v1``.
"""

from __future__ import annotations

import concurrent.futures
import json
import time
from typing import Any

import pytest
from openai import APIError, BadRequestError, OpenAI

from llmos.errors import CapabilityNotSupported, Unavailable, UsageError
from llmos.plugin.manager import HOOK_NAMES, PluginManager
from llmos.testing import serve_in_thread
from llmos.types import (
    Capability,
    ChatMessage,
    ChatRequest,
    ClassifyRequest,
    CompletionRequest,
    EmbedRequest,
    Sampling,
    Usage,
)
from llmos_openai.model import OpenAICompatible


def chat(text: str, **sampling: Any) -> ChatRequest:
    return ChatRequest(messages=[ChatMessage("user", text)], sampling=Sampling(**sampling))


def loaded(kernel: Any, name: str) -> OpenAICompatible:
    model = kernel.models.get(name).model
    assert isinstance(model, OpenAICompatible)
    return model


def test_the_plugin_loads_through_its_entry_point() -> None:
    pm = PluginManager()
    pm.load()
    info = {i.name: i for i in pm.plugins()}["openai"]
    assert info.status == "loaded", info.error
    assert info.distribution == "llmos-openai"
    assert set(info.hooks) <= HOOK_NAMES
    spec = pm.providers["openai-compatible"].spec
    assert spec.capabilities == {
        Capability.COMPLETE,
        Capability.CHAT,
        Capability.STREAM,
        Capability.EMBED,
    }
    assert spec.formats == ("remote-api",) and spec.batching


def test_chat_complete_and_embed_with_usage(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url)

    [reply] = kernel.call("remote", Capability.CHAT, [chat("hello there")])
    assert reply.message == ChatMessage("assistant", "reply to hello there")
    assert reply.finish_reason == "stop"
    assert reply.usage == Usage(prompt_tokens=2, completion_tokens=4)

    [done] = kernel.call("remote", Capability.COMPLETE, [CompletionRequest(prompt="once upon")])
    assert (done.text, done.finish_reason) == ("you said once upon", "stop")
    assert done.usage == Usage(prompt_tokens=2, completion_tokens=4)

    vectors = kernel.call(
        "remote", Capability.EMBED, [EmbedRequest(text="a cat"), EmbedRequest(text="dog")]
    )
    assert [v.vector for v in vectors] == [(5.0, 2.0, 1.0), (3.0, 1.0, 1.0)]
    assert sum(v.usage.prompt_tokens for v in vectors) == 3  # the upstream's total, shared out


def test_sampling_reaches_the_upstream(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    upstream.clear()
    sampling = dict(max_tokens=3, temperature=0.3, top_p=0.9, stop=("zz",), seed=5)
    [reply] = kernel.call("remote", Capability.CHAT, [chat("one two three four", **sampling)])
    assert reply.message.content == "reply to one"
    assert reply.finish_reason == "length"  # the upstream's, passed through
    [call] = upstream.calls
    assert call["sampling"] == Sampling(**sampling)

    upstream.clear()
    kernel.call("remote", Capability.COMPLETE, [CompletionRequest(prompt="x")])
    [call] = upstream.calls
    # nothing given, nothing sent: the upstream's defaults (an llmos daemon's
    # OpenAI routes sample at temperature 1 when a request names none, as OpenAI does,
    # and hold it to their api.max_tokens)
    assert call["sampling"] == Sampling(temperature=1.0, max_tokens=4096, max_tokens_is_limit=True)


def test_max_completion_tokens_for_newer_vendors(scripted, downstream, register) -> None:
    kernel = downstream()
    register(
        kernel, "remote", scripted.url, model="o-mini", max_tokens_param="max_completion_tokens"
    )
    kernel.call("remote", Capability.CHAT, [chat("hi", max_tokens=9)])
    body = json.loads(scripted.requests[-1]["body"])
    assert body["max_completion_tokens"] == 9 and "max_tokens" not in body
    assert body["model"] == "o-mini"


@pytest.mark.parametrize("kind", ["chat", "complete"])
def test_stream_concatenates_to_the_plain_answer(upstream, downstream, register, kind) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    if kind == "chat":
        request: Any = chat("tell me a story", max_tokens=5)
        [plain] = kernel.call("remote", Capability.CHAT, [request])
        text = plain.message.content
    else:
        request = CompletionRequest(prompt="tell me a story", sampling=Sampling(max_tokens=5))
        [plain] = kernel.call("remote", Capability.COMPLETE, [request])
        text = plain.text
    chunks = list(kernel.stream("remote", request))
    pieces = [c.text for c in chunks if c.text]
    assert len(pieces) == 5, "one chunk per word came through as it was sent"
    assert "".join(c.text for c in chunks) == text
    last = chunks[-1]
    assert last.finish_reason == plain.finish_reason == "length"
    assert last.usage == plain.usage
    assert all(c.finish_reason is None for c in chunks[:-1])


def test_continuation_scores_and_classify_are_refused(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    with pytest.raises(CapabilityNotSupported, match="no log-probabilities"):
        kernel.call(
            "remote",
            Capability.COMPLETE,
            [CompletionRequest(prompt="x", score_continuations=("a", "b"))],
        )
    with pytest.raises(CapabilityNotSupported, match="does not support classify"):
        kernel.call("remote", Capability.CLASSIFY, [ClassifyRequest(text="x", labels=("a",))])


@pytest.mark.parametrize(
    ("request_", "param"),
    [
        (CompletionRequest(prompt="x", echo=True), "echo"),
        (CompletionRequest(prompt="x", logprobs=1), "logprobs"),
        (CompletionRequest(prompt="", prompt_ids=(1, 2)), "prompt"),
        (ChatRequest(messages=[ChatMessage("user", "hi")], logprobs=True), "logprobs"),
    ],
)
def test_logprobs_echo_and_token_ids_are_refused_naming_the_field(
    upstream, downstream, register, request_, param
) -> None:
    """Not passed on (vendors differ): a 400 naming the field, never an
    answer that left them out."""
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    capability = Capability.CHAT if isinstance(request_, ChatRequest) else Capability.COMPLETE
    with pytest.raises(UsageError, match="does not support") as caught:
        kernel.call("remote", capability, [request_])
    assert caught.value.param == param and caught.value.status == 400


def test_capabilities_option_narrows_the_model(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "embedder", upstream.url, capabilities=["embed"])
    assert kernel.call("embedder", Capability.EMBED, [EmbedRequest(text="x")])
    with pytest.raises(CapabilityNotSupported):
        kernel.call("embedder", Capability.CHAT, [chat("hi")])


def test_sequential_calls_reuse_one_connection(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    model = loaded(kernel, "remote")
    client = model._client
    upstream.clear()
    for i in range(25):
        kernel.call("remote", Capability.CHAT, [chat(f"message {i}")])
    for _ in range(5):
        list(kernel.stream("remote", chat("stream me")))
    kernel.call("remote", Capability.EMBED, [EmbedRequest(text="x")])
    assert len(upstream.seen) == 31
    assert len(upstream.ports()) == 1, "the upstream saw one client connection"
    assert model.connections_opened == 1
    assert loaded(kernel, "remote")._client is client, "one client per loaded model"


def test_a_batch_goes_out_at_once_and_embeddings_as_one_request(
    upstream, downstream, register
) -> None:
    kernel = downstream()
    register(kernel, "slowpoke", upstream.url, model="slow", max_connections=4)
    model = loaded(kernel, "slowpoke")
    assert model.max_batch_size == 4
    upstream.clear()
    started = time.perf_counter()
    replies = model.chat([chat(f"m{i}") for i in range(4)])
    took = time.perf_counter() - started
    assert [r.message.content for r in replies] == [f"reply to m{i}" for i in range(4)]
    # The upstream answers one request at a time in 0.6 s each (max_batch_size=1 there), so
    # four in a row would take 2.4 s; sent at once they queue there, not here.
    assert len(upstream.ports()) == 4, "four requests, four pooled connections, at once"
    assert took < 2.4 + 1.0

    upstream.clear()
    register(kernel, "remote", upstream.url)
    kernel.call("remote", Capability.EMBED, [EmbedRequest(text=t) for t in ("a", "b", "c")])
    assert [s["path"] for s in upstream.seen] == ["/v1/embeddings"]


def test_a_partly_failed_batch_sends_no_request_twice(upstream, downstream, register) -> None:
    """Requests of three callers share a batch; the upstream fails one. The
    kernel retries each caller alone; the two answers that came back are
    not asked for again."""
    kernel = downstream()
    register(kernel, "batched", upstream.url, max_wait_ms=400)
    loaded(kernel, "batched")
    upstream.clear()
    futures = [
        kernel.submit("batched", Capability.CHAT, [chat(text)]) for text in ("a", "boom", "c")
    ]
    assert futures[0].result(10)[0].message.content == "reply to a"
    assert futures[2].result(10)[0].message.content == "reply to c"
    with pytest.raises(Unavailable, match="boom"):
        futures[1].result(10)
    texts = sorted(c["text"] for c in upstream.calls)
    assert texts == ["a", "boom", "boom", "c"], "only the failed request went again"


def test_through_a_downstream_daemon_with_the_openai_client(upstream, downstream, register) -> None:
    """The whole chain a user sees: OpenAI client -> llmos daemon -> this
    provider -> the upstream llmos daemon."""
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    with serve_in_thread(kernel) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        reply = client.chat.completions.create(
            model="remote", messages=[{"role": "user", "content": "hi all"}], max_tokens=10
        )
        assert reply.choices[0].message.content == "reply to hi all"
        assert reply.usage is not None and reply.usage.completion_tokens == 4

        pieces = [
            event.choices[0].delta.content or ""
            for event in client.chat.completions.create(
                model="remote",
                messages=[{"role": "user", "content": "hi all"}],
                stream=True,
            )
            if event.choices
        ]
        assert "".join(pieces) == "reply to hi all" and len([p for p in pieces if p]) == 4

        done = client.completions.create(model="remote", prompt="abc", temperature=0.5)
        assert done.choices[0].text == "you said abc"

        embedded = client.embeddings.create(model="remote", input=["a b", "c"])
        assert [d.embedding for d in embedded.data] == [[3.0, 2.0, 1.0], [1.0, 1.0, 1.0]]


SEVEN = "one two three four five six seven"


def _reply(client: OpenAI, stream: bool, **extra: Any) -> tuple[str, str | None, int]:
    """(text, finish_reason, completion tokens) of a chat, streamed or not."""
    ask: dict[str, Any] = {"model": "remote", "messages": [{"role": "user", "content": SEVEN}]}
    if not stream:
        reply = client.chat.completions.create(**ask, **extra)
        assert reply.usage is not None
        choice = reply.choices[0]
        return choice.message.content or "", choice.finish_reason, reply.usage.completion_tokens
    events = list(
        client.chat.completions.create(
            **ask, **extra, stream=True, stream_options={"include_usage": True}
        )
    )
    text = "".join(e.choices[0].delta.content or "" for e in events if e.choices)
    finish = [e.choices[0].finish_reason for e in events if e.choices][-1]
    assert events[-1].usage is not None
    return text, finish, events[-1].usage.completion_tokens


@pytest.mark.parametrize("stream", [False, True])
def test_the_daemons_max_tokens_limit_is_sent_upstream(
    upstream, downstream, register, stream
) -> None:
    """A request that leaves max_tokens out is held to the downstream daemon's
    api.max_tokens: the provider sends it, the upstream stops there."""
    kernel = downstream("api.max_tokens=5")
    register(kernel, "remote", upstream.url)
    with serve_in_thread(kernel) as url:
        client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
        upstream.clear()
        assert _reply(client, stream) == ("reply to one two three", "length", 5)
        [call] = upstream.calls
        assert call["sampling"].max_tokens == 5
        assert len(upstream.seen) == 1


@pytest.mark.parametrize("stream", [False, True])
def test_a_limit_the_upstream_refuses_is_left_out_and_its_own_bounds_the_answer(
    make_upstream, downstream, register, stream
) -> None:
    """An upstream that refuses max_tokens = the daemon's limit (a model whose
    context or output maximum is smaller; here an llmos daemon whose own
    api.max_tokens is 3) gets the request once more without it, and its
    own default, below the limit, bounds the answer. A max_tokens the
    client asked for is never left out: its refusal is the client's 400."""
    with make_upstream("api.max_tokens=3") as small:
        kernel = downstream("api.max_tokens=5")
        register(kernel, "remote", small.url)
        with serve_in_thread(kernel) as url:
            client = OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
            small.clear()
            assert _reply(client, stream) == ("reply to one", "length", 3)
            assert len(small.seen) == 2, "the limit refused, then the request without it"
            [call] = small.calls
            assert call["sampling"].max_tokens == 3 and call["sampling"].max_tokens_is_limit

            small.clear()
            # (a stream that has begun can only break off: the daemon's
            # streams start before the model's first chunk)
            with pytest.raises(APIError if stream else BadRequestError) as refused:
                _reply(client, stream, max_tokens=5)
            if not stream:
                assert "max_tokens=5 is over the limit of 3" in str(refused.value)
            assert len(small.seen) == 1 and small.calls == []


def test_concurrent_callers_share_the_pool(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url, max_connections=3)
    model = loaded(kernel, "remote")
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        replies = list(
            pool.map(
                lambda i: kernel.call("remote", Capability.CHAT, [chat(f"n{i}")])[0], range(40)
            )
        )
    assert [r.message.content for r in replies] == [f"reply to n{i}" for i in range(40)]
    assert 1 <= model.connections_opened <= 3
