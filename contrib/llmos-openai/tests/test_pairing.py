"""A key goes only to the hosts the operator pairs it with.

Whoever may register a model chooses its ``source``; without a pairing, a
card naming the operator's key (``api_key_env = "OPENAI_API_KEY"``) and a
host of its own would have the daemon send ``Bearer <the operator's key>``
there on the first chat. ``[plugins.openai] key_hosts`` pairs each key with
its hosts; the provider's ``check`` refuses a card naming a key for any
other host when it is registered, and again when it is loaded (a card
registered before the check existed, a config deployment, a pairing the
operator has since removed).

The attacker is a real HTTP server on loopback that records what reaches it;
the upstream a real llmos daemon requiring the key (see conftest).
"""

from __future__ import annotations

from typing import Any

import httpx
import pytest

from llmos.errors import ConfigError, UsageError
from llmos.testing import serve_in_thread
from llmos.types import Capability, ChatMessage, ChatRequest, CheckRequest, ModelCard
from llmos_openai.plugin import check

UPSTREAM_KEY_ENV = "LLMOS_TEST_UPSTREAM_API_KEY"  # conftest's
HI = ChatRequest(messages=[ChatMessage("user", "hi")])
MESSAGES = [{"role": "user", "content": "hi"}]


def _port(url: str) -> int:
    return int(url.rsplit(":", 1)[1])


def _pair(*hosts: str) -> str:
    listed = ", ".join(f'"{host}"' for host in hosts)
    return f"plugins.openai.key_hosts.{UPSTREAM_KEY_ENV}=[{listed}]"


def test_a_registrant_cannot_send_the_operators_key_to_its_own_host(
    upstream, downstream, scripted, upstream_key
) -> None:
    """The attack of the issue, over real HTTP: the registration is a 400
    that says why, nothing is registered, and the attacker hears nothing;
    the paired upstream gets the key."""
    attacker = scripted
    # The attacker listens on loopback too: the pairing's port tells them apart.
    kernel = downstream(_pair(f"127.0.0.1:{_port(upstream.url)}"), paired=False)
    card = {
        "name": "evil",
        "provider": "openai-compatible",
        "format": "remote-api",
        "source": f"{attacker.url}/v1",
        "options": {"model": "echo", "api_key_env": UPSTREAM_KEY_ENV},
    }
    with serve_in_thread(kernel) as url, httpx.Client(base_url=url, timeout=30) as http:
        refused = http.post("/api/models", json=card)
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert (error["type"], error["param"], error["code"]) == (
            "invalid_request_error",
            "options.api_key_env",
            None,
        )
        assert (
            f"api_key_env {UPSTREAM_KEY_ENV} is not paired with host"
            f" 127.0.0.1:{_port(attacker.url)}: the operator pairs keys with hosts in"
            f" [plugins.openai] key_hosts ({UPSTREAM_KEY_ENV} is paired with"
            f" 127.0.0.1:{_port(upstream.url)})"
        ) in error["message"]
        assert http.get("/api/models/evil").status_code == 404
        chat = http.post("/v1/chat/completions", json={"model": "evil", "messages": MESSAGES})
        assert chat.status_code == 404

        # The seed document's form and an ``if_changed`` retry go through the same check.
        seed = http.post(
            "/register",
            json={
                "model_name": "evil",
                "model_url": f"{attacker.url}/v1",
                "provider": "openai-compatible",
            },
        )
        assert seed.status_code == 400, seed.text
        assert http.post("/api/models", json={**card, "if_changed": True}).status_code == 400

        # The paired host works, and gets the key.
        paired = http.post(
            "/api/models", json={**card, "name": "remote", "source": f"{upstream.url}/v1"}
        )
        assert paired.status_code == 201, paired.text
        upstream.clear()
        answer = http.post("/v1/chat/completions", json={"model": "remote", "messages": MESSAGES})
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"] == "reply to hi"
        listed = http.get("/api/models", params={"all_versions": True}).json()["items"]
        assert [item["card"]["name"] for item in listed] == ["remote"]
    assert attacker.requests == [], "nothing reached the attacker's server"
    assert [seen["authorization"] for seen in upstream.seen] == [f"Bearer {upstream_key}"]


def test_a_card_stored_before_the_check_is_refused_at_load(
    upstream, downstream, card, scripted
) -> None:
    """A card registered before this check existed (put straight into the
    store, as registration used to) naming a key its host is not paired with
    never gets the key: the load refuses it, and so does every later call."""
    attacker = scripted
    kernel = downstream(_pair(f"127.0.0.1:{_port(upstream.url)}"), paired=False)
    kernel.registry.store.register(card("evil", attacker.url))
    kernel.registry.store.register(card("remote", upstream.url))
    with serve_in_thread(kernel) as url, httpx.Client(base_url=url, timeout=30) as http:
        for _ in range(2):
            refused = http.post(
                "/v1/chat/completions", json={"model": "evil", "messages": MESSAGES}
            )
            assert refused.status_code == 400, refused.text
            assert "is not paired with host" in refused.json()["error"]["message"]
        assert (
            http.post(
                "/v1/chat/completions", json={"model": "remote", "messages": MESSAGES}
            ).status_code
            == 200
        )
    assert attacker.requests == []
    assert kernel.models.peek("evil") is None


def test_a_pairing_the_operator_removed_is_refused_at_load(upstream, downstream, card) -> None:
    """Registered while paired, then the operator's config changed: the
    next load (another daemon on the same data folder) refuses it."""
    kernel = downstream()
    kernel.registry.register(card("remote", upstream.url))
    assert kernel.call("remote", Capability.CHAT, [HI])
    home = kernel.home
    kernel.stop()
    upstream.clear()
    later = downstream(f'home="{home}"', paired=False)
    with pytest.raises(UsageError, match=r"LLMOS_TEST_UPSTREAM_API_KEY is not paired with host"):
        later.call("remote", Capability.CHAT, [HI])
    assert upstream.seen == []


def test_a_config_deployment_is_held_to_the_same_pairing(upstream, downstream) -> None:
    """``[models.NAME]`` is the operator's own, but one rule holds for every
    card: the deployment's key must be paired with its host too."""
    deployment = (
        'models.mine.provider="openai-compatible"',
        f'models.mine.source="{upstream.url}/v1"',
        f'models.mine.options={{model="echo", api_key_env="{UPSTREAM_KEY_ENV}"}}',
    )
    kernel = downstream(*deployment, paired=False)
    upstream.clear()
    with pytest.raises(UsageError, match=r"is not paired with host 127\.0\.0\.1:\d+"):
        kernel.call("mine", Capability.CHAT, [HI])
    assert upstream.seen == []
    kernel = downstream(*deployment)
    [reply] = kernel.call("mine", Capability.CHAT, [HI])
    assert reply.message.content == "reply to hi"


def test_a_card_without_a_key_needs_no_pairing(upstream, downstream) -> None:
    kernel = downstream(paired=False)
    kernel.registry.register(
        ModelCard(
            name="local",
            provider="openai-compatible",
            source="http://127.0.0.1:1/v1",
            options={"model": "m"},
        )
    )


# --------------------------------------------------------------------------
# How hosts are compared
# --------------------------------------------------------------------------


def _checked(source: str, hosts: Any, key: str = "OPENAI_API_KEY", **operator: Any) -> Any:
    card = ModelCard(
        name="m",
        provider="openai-compatible",
        source=source,
        options={"model": "gpt", "api_key_env": key},
    )
    return check(CheckRequest(card=card, options={"key_hosts": {key: hosts}, **operator}))


@pytest.mark.parametrize(
    ("source", "hosts"),
    [
        ("https://api.openai.com/v1", ["api.openai.com"]),
        ("https://API.OpenAI.com./v1", ["api.openai.com"]),  # case, a trailing dot
        ("https://api.openai.com:8443/v1", ["api.openai.com"]),  # no port: any port
        ("https://api.openai.com/v1", ["api.openai.com:443"]),  # the scheme's own port
        ("http://10.0.0.5:8000/v1", ["10.0.0.5:8000"]),
        ("http://[::1]:8000/v1", ["[::1]:8000"]),
        ("http://[::1]:8000/v1", ["::1"]),
        ("https://eu.openai.azure.com/v1", ["*.openai.azure.com"]),
        ("https://a.b.openai.azure.com/v1", ["*.openai.azure.com"]),
        ("https://api.openai.com/v1", ["myco.example", "api.openai.com"]),
    ],
)
def test_paired_hosts(source: str, hosts: list[str]) -> None:
    options = _checked(source, hosts)
    assert options["api_key_env"] == "OPENAI_API_KEY", "the options come back as they were"


@pytest.mark.parametrize(
    ("source", "hosts"),
    [
        ("https://attacker.example/v1", ["api.openai.com"]),
        ("https://api.openai.com.attacker.example/v1", ["api.openai.com"]),  # no suffixes
        ("https://sub.api.openai.com/v1", ["api.openai.com"]),  # nor subdomains
        ("https://evilopenai.com/v1", ["openai.com"]),
        ("https://api.openai.com:8443/v1", ["api.openai.com:443"]),
        ("http://api.openai.com/v1", ["api.openai.com:443"]),  # http's port is 80
        ("http://[::1]:8001/v1", ["[::1]:8000"]),
        ("https://openai.azure.com/v1", ["*.openai.azure.com"]),  # the domain itself
        ("https://x.evilopenai.azure.com/v1", ["*.openai.azure.com"]),
        ("https://api.openai.com/v1", []),
    ],
)
def test_unpaired_hosts(source: str, hosts: list[str]) -> None:
    with pytest.raises(UsageError, match="OPENAI_API_KEY is not paired with host") as caught:
        _checked(source, hosts)
    assert caught.value.param == "options.api_key_env"


def test_only_the_named_key_pairing_counts() -> None:
    card = ModelCard(
        name="m",
        provider="openai-compatible",
        source="https://attacker.example/v1",
        options={"model": "gpt", "api_key_env": "OPENAI_API_KEY"},
    )
    operator = {"key_hosts": {"OTHER_API_KEY": ["attacker.example"]}}
    with pytest.raises(UsageError, match=r"\(OPENAI_API_KEY is paired with no host\)"):
        check(CheckRequest(card=card, options=operator))
    with pytest.raises(UsageError, match=r"\(OPENAI_API_KEY is paired with no host\)"):
        check(CheckRequest(card=card))  # no key_hosts at all: no key goes anywhere


@pytest.mark.parametrize(
    ("key_hosts", "match"),
    [
        ({"OPENAI_API_KEY": "api.openai.com"}, "must be a list of hosts"),
        ({"OPENAI_API_KEY": ["*"]}, "is not a host"),
        ({"OPENAI_API_KEY": ["api.*.com"]}, "is not a host"),
        ({"OPENAI_API_KEY": ["*openai.com"]}, "is not a host"),
        ({"OPENAI_API_KEY": ["https://api.openai.com"]}, "is not a host"),
        ({"OPENAI_API_KEY": ["api.openai.com:99999"]}, "is not a host"),
        ({"OPENAI_API_KEY": [3]}, "is not a host"),
        ({"not a name": ["api.openai.com"]}, "neither an environment variable"),
        ({"file:k": ["api.openai.com"]}, "secrets_dir, the folder they lie in, is not set"),
        (["OPENAI_API_KEY"], "key_hosts must be a table"),
    ],
)
def test_a_bad_pairing_is_a_config_error(key_hosts: Any, match: str) -> None:
    card = ModelCard(
        name="m",
        provider="openai-compatible",
        source="https://api.openai.com/v1",
        options={"model": "gpt"},
    )
    with pytest.raises(ConfigError, match=match):
        check(CheckRequest(card=card, options={"key_hosts": key_hosts}))
