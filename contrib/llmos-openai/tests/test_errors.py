"""The upstream's failures as llmos errors: what the real upstream daemon
says (unknown model, bad request, gone, slow), and every status a vendor may
answer, from a scripted server on loopback."""

from __future__ import annotations

import json
import time

import httpx
import pytest

from llmos.errors import (
    AuthenticationError,
    NotFoundError,
    Overloaded,
    PayloadTooLarge,
    RequestTimeout,
    Unavailable,
    UsageError,
)
from llmos.testing import serve_in_thread
from llmos.types import Capability, ChatMessage, ChatRequest, CompletionRequest, Sampling

HI = ChatRequest(messages=[ChatMessage("user", "hi")])


def test_an_unknown_upstream_model_is_not_found(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url, model="gpt-99")
    with pytest.raises(NotFoundError) as caught:
        kernel.call("remote", Capability.CHAT, [HI])
    host = upstream.url.removeprefix("http://")
    assert f"upstream {host} has no model 'gpt-99'" in caught.value.message
    assert "model 'gpt-99' not found" in caught.value.message  # the upstream's words


def test_a_bad_request_is_a_usage_error_with_the_upstreams_words(
    upstream, downstream, register
) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    request = CompletionRequest(prompt="x", sampling=Sampling(max_tokens=100_000))
    with pytest.raises(UsageError, match="max_tokens=100000 is over the limit"):
        kernel.call("remote", Capability.COMPLETE, [request])


def test_an_upstream_model_failure_is_unavailable(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    with pytest.raises(Unavailable, match=r"failed \(503\): the echo model says boom"):
        kernel.call(
            "remote", Capability.CHAT, [ChatRequest(messages=[ChatMessage("user", "boom")])]
        )


def test_a_stopped_upstream_is_unavailable_naming_the_host(
    make_upstream, downstream, register, upstream_key
) -> None:
    kernel = downstream()
    with make_upstream() as gone:
        register(kernel, "remote", gone.url)
        assert kernel.call("remote", Capability.CHAT, [HI])  # a pooled connection is open
    host = gone.url.removeprefix("http://")
    for _ in range(2):  # the kept-alive connection, then a new one
        with pytest.raises(Unavailable, match=f"upstream {host}") as caught:
            kernel.call("remote", Capability.CHAT, [HI])
        assert upstream_key not in caught.value.message
    assert "cannot connect to upstream" in caught.value.message


def test_a_slow_upstream_times_out(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url, model="slow", timeout_s=0.2)
    started = time.perf_counter()
    with pytest.raises(RequestTimeout, match=r"did not answer within 0.2 s \(timeout_s\)"):
        kernel.call("remote", Capability.CHAT, [HI])
    # The slow model answers after 0.6 s; the kernel would wait 300 s.
    assert time.perf_counter() - started < 5


def test_operator_defaults_apply_and_a_card_overrides_them(upstream, downstream, register) -> None:
    kernel = downstream("plugins.openai.timeout_s=0.2")
    register(kernel, "default", upstream.url, model="slow")
    register(kernel, "patient", upstream.url, model="slow", timeout_s=5)
    with pytest.raises(RequestTimeout):
        kernel.call("default", Capability.CHAT, [HI])
    assert kernel.call("patient", Capability.CHAT, [HI])


def test_an_unreachable_host_is_unavailable(downstream, register) -> None:
    import socket

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    kernel = downstream()
    register(kernel, "remote", f"http://127.0.0.1:{port}")
    with pytest.raises(Unavailable, match=f"cannot connect to upstream 127.0.0.1:{port}"):
        kernel.call("remote", Capability.CHAT, [HI])


OPENAI_ERROR = {"error": {"message": "something is off", "type": "x", "code": None}}


@pytest.mark.parametrize(
    ("status", "error", "match"),
    [
        (400, UsageError, r"refused the request: something is off"),
        (422, UsageError, r"refused the request: something is off"),
        (401, AuthenticationError, r"refused the API key from env:LLMOS_TEST_UPSTREAM_API_KEY"),
        (403, AuthenticationError, r"\(403\): something is off"),
        (404, NotFoundError, r"has no model 'vendor-model'"),
        (408, RequestTimeout, r"timed out \(408\)"),
        (413, PayloadTooLarge, r"request too large \(413\)"),
        (429, Overloaded, r"rate-limiting or overloaded \(429\): something is off"),
        (500, Unavailable, r"failed \(500\): something is off"),
        (502, Unavailable, r"failed \(502\)"),
        (503, Unavailable, r"failed \(503\)"),
        (409, UsageError, r"refused the request \(409\)"),
    ],
)
def test_vendor_statuses(scripted, downstream, register, status, error, match) -> None:
    scripted.answer(status, OPENAI_ERROR)
    kernel = downstream()
    register(kernel, "remote", scripted.url, model="vendor-model")
    with pytest.raises(error, match=match) as caught:
        kernel.call("remote", Capability.CHAT, [HI])
    assert type(caught.value) is error


def test_retry_after_is_kept(scripted, downstream, register) -> None:
    scripted.answer(429, {"error": {"message": "slow down"}}, {"Retry-After": "7"})
    kernel = downstream()
    register(kernel, "remote", scripted.url)
    with pytest.raises(Overloaded, match="retry after 7 s") as caught:
        kernel.call("remote", Capability.CHAT, [HI])
    assert caught.value.retry_after == 7.0
    # the daemon in front passes the upstream's wait on to its own client
    with serve_in_thread(kernel) as url:
        answer = httpx.post(
            f"{url}/v1/chat/completions",
            json={"model": "remote", "messages": [{"role": "user", "content": "hi"}]},
        )
    assert answer.status_code == 429 and answer.headers["retry-after"] == "7"


@pytest.mark.parametrize(
    "body",
    [
        {"error": "plain string error"},  # Ollama
        {"object": "error", "message": "plain string error"},  # vLLM
        {"detail": "plain string error"},  # FastAPI
        "plain string error",  # text
    ],
)
def test_error_shapes_of_other_servers(scripted, downstream, register, body) -> None:
    scripted.answer(400, body)
    kernel = downstream()
    register(kernel, "remote", scripted.url)
    with pytest.raises(UsageError, match="refused the request: plain string error"):
        kernel.call("remote", Capability.CHAT, [HI])


def test_an_echoed_key_is_redacted_and_long_messages_trimmed(
    scripted, downstream, register, upstream_key
) -> None:
    message = f"Incorrect API key provided: {upstream_key}. Or sk-abc*****cdef. " + "x" * 1000
    scripted.answer(401, {"error": {"message": message}})
    kernel = downstream()
    register(kernel, "remote", scripted.url)
    with pytest.raises(AuthenticationError) as caught:
        kernel.call("remote", Capability.CHAT, [HI])
    text = caught.value.message
    assert upstream_key not in text and "sk-abc" not in text
    assert "Incorrect API key provided: [redacted]. Or [redacted] xxx" in text
    assert len(text) < 500 and text.endswith("...")


def test_redirects_are_not_followed(scripted, downstream, register) -> None:
    with type(scripted)() as elsewhere:
        scripted.answer(307, "", {"Location": f"{elsewhere.url}/v1/chat/completions"})
        kernel = downstream()
        register(kernel, "remote", scripted.url)
        with pytest.raises(Unavailable, match=r"redirect \(307\).*not followed"):
            kernel.call("remote", Capability.CHAT, [HI])
        assert elsewhere.requests == []


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("not json", "not JSON"),
        ([1, 2], "not a JSON object"),
        ({"choices": []}, "no choices"),
        ({"choices": [{"index": 0}]}, "no message"),
    ],
)
def test_answers_that_are_not_openai_responses(scripted, downstream, register, body, match) -> None:
    scripted.answer(200, json.dumps(body) if not isinstance(body, str) else body)
    kernel = downstream()
    register(kernel, "remote", scripted.url)
    with pytest.raises(Unavailable, match=match):
        kernel.call("remote", Capability.CHAT, [HI])


def test_an_error_event_in_a_stream(scripted, downstream, register) -> None:
    events = [
        {"choices": [{"index": 0, "delta": {"content": "half"}, "finish_reason": None}]},
        {"error": {"message": "the model crashed", "code": 500}},
    ]
    body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
    scripted.answer(200, body, {"Content-Type": "text/event-stream"})
    kernel = downstream()
    register(kernel, "remote", scripted.url)
    handle = kernel.stream("remote", HI)
    assert handle.get(5).text == "half"
    with pytest.raises(Unavailable, match="the model crashed"):
        handle.get(5)


def test_a_stream_refused_before_it_starts(scripted, downstream, register) -> None:
    scripted.answer(401, {"error": {"message": "bad key"}})
    kernel = downstream()
    register(kernel, "remote", scripted.url)
    with pytest.raises(AuthenticationError, match="bad key"):
        list(kernel.stream("remote", HI))
