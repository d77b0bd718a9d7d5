"""Where requests go: only to the base URL the registry (or config) holds.

CVE-2024-6587 (LiteLLM): a client-supplied ``api_base`` made the proxy send
its provider key to the client's host. Here a request body has no say in the
URL or the headers: a real downstream daemon gets bodies and headers naming
an attacker's server on loopback, and the attacker hears nothing. Sources
are checked by the registry's rules when registered, again when loaded, and
each connection's address again when it is opened (DNS rebinding).
"""

from __future__ import annotations

import socket
from typing import Any

import httpx
import pytest
from openai import BadRequestError, OpenAI

from llmos.errors import UnsafeSourceError, UsageError
from llmos.testing import serve_in_thread
from llmos.types import Capability, ChatMessage, ChatRequest, ModelCard

HI = ChatRequest(messages=[ChatMessage("user", "hi")])


def test_request_bodies_and_headers_cannot_redirect_a_model(
    upstream, downstream, register, scripted, upstream_key
) -> None:
    """Fields that would redirect a call (``api_base`` and the like) are
    refused by name — an OpenAI request has no such fields — and headers that
    try it are ignored; none of it reaches the attacker."""
    attacker = scripted
    evil = f"{attacker.url}/v1"
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    upstream.clear()
    messages = [{"role": "user", "content": "hi"}]
    smuggled: dict[str, Any] = {
        "api_base": evil,
        "base_url": evil,
        "api_key": "sk-attacker",
        "extra_headers": {"Authorization": "Bearer sk-attacker", "Host": "evil"},
        "headers": {"X-Evil": "1"},
        "extra_body": {"api_base": evil},
        "azure_endpoint": evil,
        "custom_llm_provider": "openai",
    }
    header_tricks = {
        "X-Forwarded-Host": attacker.url,
        "Forwarded": f"host={attacker.url}",
        "X-Api-Base": evil,
        "Authorization": "Bearer sk-attacker",
    }
    bodies = {
        "/v1/chat/completions": {"model": "remote", "messages": messages},
        "/v1/completions": {"model": "remote", "prompt": "hi"},
        "/v1/embeddings": {"model": "remote", "input": "hi"},
    }
    with serve_in_thread(kernel) as url, httpx.Client(base_url=url, timeout=30) as http:
        for path, body in bodies.items():
            for field, value in smuggled.items():
                refused = http.post(path, json={**body, field: value}, headers=header_tricks)
                assert refused.status_code == 400, (path, field, refused.text)
                assert refused.json()["error"]["param"] == field
        assert upstream.seen == [], "a refused request is not sent anywhere"

        answers = [
            http.post(
                "/v1/chat/completions",
                json={**bodies["/v1/chat/completions"], "metadata": {"api_base": evil}},
                headers=header_tricks,
            ),
            http.post(
                "/v1/chat/completions",
                json={**bodies["/v1/chat/completions"], "stream": True},
                headers=header_tricks,
            ),
            http.post("/v1/completions", json=bodies["/v1/completions"], headers=header_tricks),
            http.post("/v1/embeddings", json=bodies["/v1/embeddings"], headers=header_tricks),
        ]
        assert [a.status_code for a in answers] == [200] * 4
        assert answers[0].json()["choices"][0]["message"]["content"] == "reply to hi"
        assert '"content":"reply"' in answers[1].text
        assert answers[2].json()["choices"][0]["text"] == "you said hi"

        # llmos's own extras take a fusion budget and nothing else.
        refused = http.post(
            "/v1/chat/completions",
            json={"model": "remote", "messages": messages, "llmos": {"api_base": evil}},
        )
        assert refused.status_code == 400
        # A URL where a model name goes is just an invalid name.
        unknown = http.post("/v1/chat/completions", json={"model": evil, "messages": messages})
        assert unknown.status_code == 400 and "model name" in unknown.json()["error"]["message"]

        client = OpenAI(base_url=f"{url}/v1", api_key="sk-attacker", max_retries=0)
        reply = client.chat.completions.create(
            model="remote", messages=messages, extra_headers={"X-Api-Base": evil}
        )
        assert reply.choices[0].message.content == "reply to hi"
        with pytest.raises(BadRequestError, match="api_base"):
            client.chat.completions.create(
                model="remote", messages=messages, extra_body={"api_base": evil, "base_url": evil}
            )

    assert attacker.requests == [], "nothing reached the attacker's server"
    assert len(upstream.seen) == 5
    for request in upstream.seen:
        assert request["authorization"] == f"Bearer {upstream_key}"
        assert "x-evil" not in request and "x-api-base" not in request
        assert not any(attacker.url in str(value) for value in request.values())


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("file:///etc/passwd", "file:// URLs are not accepted"),
        ("https://user:secret@api.openai.com/v1", "credentials in URLs are refused"),
        ("https://sk-key@api.openai.com/v1", "credentials in URLs are refused"),
        ("http://169.254.169.254/v1", "cloud metadata address"),
        ("http://0xa9fea9fe/v1", "cloud metadata address"),  # 169.254.169.254, spelt in hex
        ("http://[fd00:ec2::254]/v1", "cloud metadata address"),
        ("http://metadata.google.internal/computeMetadata/v1", "cloud metadata service"),
        ("http://100.100.100.200/v1", "cloud metadata address"),
    ],
)
def test_unsafe_sources_are_refused_even_with_private_urls_allowed(
    downstream, card, source, why
) -> None:
    kernel = downstream()  # allow_http and allow_private_urls are on
    bad = card("remote", "http://127.0.0.1:1")
    with pytest.raises(UnsafeSourceError, match=why):
        kernel.registry.register(
            ModelCard(name="remote", provider=bad.provider, source=source, options=bad.options)
        )


@pytest.mark.parametrize(
    ("source", "why"),
    [
        ("http://api.example.com/v1", "plain http:// is not accepted"),
        ("https://127.0.0.1:8000/v1", "loopback address"),
        ("https://10.1.2.3/v1", "private"),
        ("https://localhost/v1", "loopback address"),
    ],
)
def test_the_default_policy_refuses_http_and_private_hosts(tmp_path, source, why, card) -> None:
    from llmos.config import load_config
    from llmos.runtime.kernel import Kernel

    kernel = Kernel(load_config(env={"LLMOS_HOME": str(tmp_path), "LLMOS_LOAD_PLUGINS": "openai"}))
    try:
        kernel.start()
        bad = card("remote", "http://127.0.0.1:1")
        with pytest.raises(UnsafeSourceError, match=why):
            kernel.registry.register(
                ModelCard(name="remote", provider=bad.provider, source=source, options=bad.options)
            )
    finally:
        kernel.stop()


def test_a_config_deployment_is_checked_when_loaded(downstream) -> None:
    kernel = downstream(
        'models.meta.provider="openai-compatible"',
        'models.meta.source="http://169.254.169.254/latest/v1"',
        'models.meta.options={model="x", api_key_env="LLMOS_TEST_UPSTREAM_API_KEY"}',
    )
    with pytest.raises(UnsafeSourceError, match="cloud metadata address"):
        kernel.call("meta", Capability.CHAT, [HI])


@pytest.mark.parametrize("source", ["{home}", "hf://openai/gpt-oss"])
def test_a_source_that_is_not_a_url_is_refused(downstream, card, source) -> None:
    kernel = downstream()
    good = card("remote", "http://127.0.0.1:1")
    with pytest.raises(UsageError, match=r"is not an http\(s\) URL"):
        kernel.registry.register(
            ModelCard(
                name="remote",
                provider=good.provider,
                source=source.format(home=kernel.home),
                options=good.options,
            )
        )


def test_a_base_url_with_a_query_is_refused(upstream, downstream, card) -> None:
    kernel = downstream()
    good = card("remote", upstream.url)
    with pytest.raises(UsageError, match="must have no query"):
        kernel.registry.register(
            ModelCard(
                name="remote",
                provider=good.provider,
                source=f"{upstream.url}/v1?api-version=1",
                options=good.options,
            )
        )


def test_allowed_hosts(upstream, downstream, register) -> None:
    kernel = downstream('plugins.openai.allowed_hosts=["api.openai.com", "*.example.com"]')
    with pytest.raises(UnsafeSourceError, match=r"not in \[plugins.openai\] allowed_hosts"):
        register(kernel, "remote", upstream.url)
    kernel = downstream('plugins.openai.allowed_hosts=["127.0.0.1"]')
    register(kernel, "remote", upstream.url)
    assert kernel.call("remote", Capability.CHAT, [HI])


# --------------------------------------------------------------------------
# DNS rebinding: each connection's address is checked when it is opened
# --------------------------------------------------------------------------


@pytest.fixture
def dns(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """``rebind.test`` resolves to the addresses pushed on the returned list,
    the last one pushed first (each answer is used once, the last one kept)."""
    answers: list[str] = []
    real = socket.getaddrinfo

    def fake(host: str, port: Any, *args: Any, **kwargs: Any) -> Any:
        if host != "rebind.test":
            return real(host, port, *args, **kwargs)
        address = answers.pop(0) if len(answers) > 1 else answers[0]
        family = socket.AF_INET6 if ":" in address else socket.AF_INET
        return [(family, socket.SOCK_STREAM, 6, "", (address, port))]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    return answers


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def test_a_host_that_turns_private_after_loading_is_refused(
    upstream, downstream, register, dns
) -> None:
    kernel = downstream()
    dns.extend(["93.184.216.34", "127.0.0.1"])  # public when loaded, loopback later
    register(kernel, "remote", f"http://rebind.test:{_port(upstream.url)}")
    upstream.clear()
    with pytest.raises(UnsafeSourceError, match=r"rebind\.test: it now resolves to .*loopback"):
        kernel.call("remote", Capability.CHAT, [HI])
    assert upstream.seen == []


def test_a_host_that_turns_into_a_metadata_address_is_refused(
    upstream, downstream, register, dns
) -> None:
    kernel = downstream()
    dns.extend(["127.0.0.1", "169.254.169.254"])  # private (allowed) when loaded
    register(kernel, "remote", f"http://rebind.test:{_port(upstream.url)}")
    with pytest.raises(UnsafeSourceError, match="cloud metadata address"):
        kernel.call("remote", Capability.CHAT, [HI])


def test_a_host_that_resolves_to_metadata_is_refused_at_load(downstream, register, dns) -> None:
    kernel = downstream()
    dns.append("169.254.169.254")
    register(kernel, "remote", "http://rebind.test:80")
    with pytest.raises(UnsafeSourceError, match=r"resolves to 169\.254\.169\.254"):
        kernel.call("remote", Capability.CHAT, [HI])


def test_a_host_that_stays_where_it_was_works(upstream, downstream, register, dns) -> None:
    kernel = downstream()
    dns.append("127.0.0.1")
    register(kernel, "remote", f"http://rebind.test:{_port(upstream.url)}")
    [reply] = kernel.call("remote", Capability.CHAT, [HI])
    assert reply.message.content == "reply to hi"
