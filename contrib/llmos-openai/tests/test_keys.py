"""API keys: read at load from an environment variable or a file the
operator allows, kept in memory, sent only to the card's base URL — and only
to a host the operator pairs the key with — and never in the registry, a log
line, an error message or a monitor event.

The upstream daemon requires :data:`conftest.UPSTREAM_KEY`; the cards name
``LLMOS_TEST_UPSTREAM_API_KEY``, which the autouse fixture sets to it and
the downstreams pair with loopback (:data:`conftest.PAIRING`).
"""

from __future__ import annotations

import logging
from pathlib import Path

import attrs
import pytest

from llmos.errors import AuthenticationError, ConfigError, UnsafeSourceError, UsageError
from llmos.logs import configure_logging
from llmos.testing import EventRecorder
from llmos.types import (
    Capability,
    ChatMessage,
    ChatRequest,
    CompletionRequest,
    LoadRequest,
    ModelCard,
)
from llmos_openai.plugin import load

KEY = "sk-test-upstream-0123456789abcdef"  # conftest.UPSTREAM_KEY
HI = ChatRequest(messages=[ChatMessage("user", "hi")])
#: ``[plugins.openai]`` pairing the test key with loopback
OPERATOR = {"key_hosts": {"LLMOS_TEST_UPSTREAM_API_KEY": ["127.0.0.1"]}}


def test_the_right_key_from_the_environment_works(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url)
    upstream.clear()
    [reply] = kernel.call("remote", Capability.CHAT, [HI])
    assert reply.message.content == "reply to hi"
    assert upstream.seen[-1]["authorization"] == f"Bearer {KEY}"


def test_a_wrong_key_is_an_authentication_error(
    upstream, downstream, register, monkeypatch
) -> None:
    monkeypatch.setenv("WRONG_API_KEY", "sk-not-the-right-one-42")
    kernel = downstream('plugins.openai.key_hosts.WRONG_API_KEY=["127.0.0.1"]')
    register(kernel, "remote", upstream.url, api_key_env="WRONG_API_KEY")
    with pytest.raises(AuthenticationError) as caught:
        kernel.call("remote", Capability.CHAT, [HI])
    message = caught.value.message
    assert "refused the API key from env:WRONG_API_KEY" in message
    assert "invalid API key" in message  # the upstream's own words
    assert "sk-not-the-right-one-42" not in message


def test_no_key_for_a_server_that_wants_one(upstream, downstream) -> None:
    kernel = downstream()
    kernel.registry.register(
        ModelCard(
            name="remote",
            provider="openai-compatible",
            source=f"{upstream.url}/v1",
            options={"model": "echo"},
        )
    )
    with pytest.raises(AuthenticationError, match=r"wants an API key.*api_key_env"):
        kernel.call("remote", Capability.CHAT, [HI])


def test_a_missing_variable_is_named(upstream, downstream, register, monkeypatch) -> None:
    monkeypatch.delenv("ABSENT_API_KEY", raising=False)
    kernel = downstream('plugins.openai.key_hosts.ABSENT_API_KEY=["127.0.0.1"]')
    # Registration does not need the key (the CLI may register without it) ...
    register(kernel, "remote", upstream.url, api_key_env="ABSENT_API_KEY")
    # ... loading does.
    with pytest.raises(ConfigError, match=r"environment variable ABSENT_API_KEY .* not set"):
        kernel.call("remote", Capability.CHAT, [HI])


@pytest.mark.parametrize("option", ["api_key", "token", "Authorization"])
def test_a_key_in_the_card_is_refused(upstream, downstream, register, card, option) -> None:
    kernel = downstream()
    with pytest.raises(UsageError, match=r"never be stored in the registry.*api_key_env"):
        register(kernel, "remote", upstream.url, **{option: KEY})
    # One stored before cards were checked at registration is refused when loaded.
    kernel.registry.store.register(card("remote", upstream.url, **{option: KEY}))
    with pytest.raises(UsageError, match=r"never be stored in the registry.*api_key_env"):
        kernel.call("remote", Capability.CHAT, [HI])


def test_a_key_in_the_card_headers_is_refused(upstream, downstream, register) -> None:
    kernel = downstream()
    with pytest.raises(UsageError, match="header 'Authorization' cannot be set in a card"):
        register(kernel, "remote", upstream.url, headers={"Authorization": f"Bearer {KEY}"})


def test_extra_headers_are_sent(upstream, downstream, register) -> None:
    kernel = downstream()
    register(kernel, "remote", upstream.url, headers={"OpenAI-Organization": "org-1"})
    upstream.clear()
    kernel.call("remote", Capability.CHAT, [HI])
    assert upstream.seen[-1]["openai-organization"] == "org-1"


def test_only_variables_the_operator_pairs(upstream, downstream, register, monkeypatch) -> None:
    """A card chooses where it points, so naming any variable would let it
    send any secret of the daemon's environment anywhere."""
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", KEY)
    kernel = downstream()
    with pytest.raises(
        UsageError,
        match=r"api_key_env AWS_SECRET_ACCESS_KEY is not paired with host 127\.0\.0\.1:\d+: .*"
        r"key_hosts \(AWS_SECRET_ACCESS_KEY is paired with no host\)",
    ):
        register(kernel, "remote", upstream.url, api_key_env="AWS_SECRET_ACCESS_KEY")
    # Paired by the operator, it may be named; key_envs, when set, narrows further.
    pair = 'plugins.openai.key_hosts.AWS_SECRET_ACCESS_KEY=["127.0.0.1"]'
    kernel = downstream(pair, 'plugins.openai.key_envs=["*_API_KEY"]')
    with pytest.raises(UsageError, match=r"not one the operator allows \(patterns: \*_API_KEY"):
        register(kernel, "remote", upstream.url, api_key_env="AWS_SECRET_ACCESS_KEY")
    kernel = downstream(pair)
    register(kernel, "remote", upstream.url, api_key_env="AWS_SECRET_ACCESS_KEY")
    assert kernel.call("remote", Capability.CHAT, [HI])


def test_a_key_file_under_the_secrets_dir(upstream, downstream, register, tmp_path) -> None:
    secrets = tmp_path / "secrets"
    (secrets / "vendor").mkdir(parents=True)
    (secrets / "vendor" / "key").write_text(KEY + "\n")
    (secrets / "other").write_text(KEY + "\n")
    kernel = downstream(
        f'plugins.openai.secrets_dir="{secrets}"',
        'plugins.openai.key_hosts."file:vendor/key"=["127.0.0.1"]',
    )
    register(kernel, "remote", upstream.url, api_key_file="vendor/key")
    [reply] = kernel.call("remote", Capability.CHAT, [HI])
    assert reply.message.content == "reply to hi"
    # An absolute path inside the folder is fine too: pairings name files, not spellings.
    register(kernel, "remote2", upstream.url, api_key_file=str(secrets / "vendor" / "key"))
    assert kernel.call("remote2", Capability.CHAT, [HI])
    # A file the operator did not pair is refused at registration.
    with pytest.raises(
        UsageError,
        match=r"api_key_file other is not paired with host .*\(other is paired with no host\)"
        r'.*"file:other" = \["127\.0\.0\.1:\d+"\]',
    ):
        register(kernel, "remote3", upstream.url, api_key_file="other")


@pytest.mark.parametrize(
    ("name", "error", "match"),
    [
        ("../outside", UnsafeSourceError, "'..' segment"),
        ("vendor/../../outside", UnsafeSourceError, "'..' segment"),
        ("{outside}", UnsafeSourceError, "outside \\[plugins.openai\\] secrets_dir"),
        ("link", UnsafeSourceError, "outside \\[plugins.openai\\] secrets_dir"),
        # expanduser() of an unknown user raised RuntimeError: a 500
        ("~nosuchuser-llmos/key", UsageError, "starts with '~'"),
        ("~/key", UsageError, "starts with '~'"),
    ],
)
def test_key_files_outside_the_secrets_dir_are_refused_at_registration(
    upstream, downstream, register, tmp_path, name, error, match
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    outside = tmp_path / "outside"
    outside.write_text("sk-outside-secret")
    (secrets / "link").symlink_to(outside)
    kernel = downstream(f'plugins.openai.secrets_dir="{secrets}"')
    with pytest.raises(error, match=match):
        register(kernel, "remote", upstream.url, api_key_file=name.format(outside=outside))


@pytest.mark.parametrize(("name", "match"), [("missing", "does not exist"), ("empty", "is empty")])
def test_key_files_that_cannot_be_read_fail_the_load(
    upstream, downstream, register, tmp_path, name, match
) -> None:
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "empty").write_text("\n")
    kernel = downstream(
        f'plugins.openai.secrets_dir="{secrets}"',
        f'plugins.openai.key_hosts."file:{name}"=["127.0.0.1"]',
    )
    register(kernel, "remote", upstream.url, api_key_file=name)
    with pytest.raises(ConfigError, match=match):
        kernel.call("remote", Capability.CHAT, [HI])


def test_a_key_file_needs_a_secrets_dir(upstream, downstream, register, tmp_path) -> None:
    (tmp_path / "key").write_text(KEY)
    kernel = downstream()
    with pytest.raises(UsageError, match=r"needs \[plugins.openai\] secrets_dir"):
        register(kernel, "remote", upstream.url, api_key_file=str(tmp_path / "key"))


def test_card_options_are_checked(upstream, card) -> None:
    good = card("remote", upstream.url)
    for options, match in [
        ({"api_key_envv": "X_API_KEY"}, "unknown option.*api_key_envv"),
        ({"model": ""}, "options.model must name the upstream model"),
        ({"timeout_s": 0}, "timeout_s must be a number"),
        ({"max_connections": 0}, "max_connections must be an integer"),
        ({"capabilities": ["classify"]}, "capability 'classify' is not served"),
        ({"api_key_file": "k"}, "not both"),
        ({"stream_usage": "yes"}, "stream_usage must be true or false"),
    ]:
        bad = attrs.evolve(good, options={**good.options, **options})
        with pytest.raises(UsageError, match=match):
            load(LoadRequest(card=bad, options=OPERATOR))
    with pytest.raises(ConfigError, match=r"unknown option.*typo"):
        load(LoadRequest(card=good, options={"typo": 1}))


def test_the_key_is_in_no_log_line_registry_error_or_event(
    upstream, downstream, register, monkeypatch, capfd, caplog
) -> None:
    """Everything at debug level, structlog and the standard library (httpx,
    httpcore) alike, while the model loads, answers, streams and fails."""
    wrong = "sk-wrong-key-that-must-not-leak-77"
    monkeypatch.setenv("WRONG_API_KEY", wrong)
    configure_logging("debug", fmt="json")
    logging.getLogger().setLevel(logging.DEBUG)  # httpx/httpcore debug lines too
    quieted = {name: logging.getLogger(name).level for name in ("httpx", "httpcore")}
    for name in quieted:  # another library may have quieted them (litellm does)
        logging.getLogger(name).setLevel(logging.NOTSET)
    try:
        recorder = EventRecorder("test-events")
        kernel = downstream(
            'plugins.openai.key_hosts.WRONG_API_KEY=["127.0.0.1"]',
            plugins={"test-events": recorder},
        )
        register(kernel, "remote", upstream.url)
        register(kernel, "wrong", upstream.url, api_key_env="WRONG_API_KEY")
        register(kernel, "missing", upstream.url, model="no-such-model")
        model = kernel.models.get("remote").model
        kernel.call("remote", Capability.CHAT, [HI])
        kernel.call("remote", Capability.COMPLETE, [CompletionRequest(prompt="x")])
        list(kernel.stream("remote", HI))
        for name in ("wrong", "missing"):
            with pytest.raises(Exception) as caught:
                kernel.call(name, Capability.CHAT, [HI])
            assert KEY not in str(caught.value) and wrong not in str(caught.value)
        kernel.models.unload("remote")
        texts = [repr(model), repr(model.settings), str(attrs.asdict(model.settings))]
        kernel.stop()
    finally:
        configure_logging("warning", fmt="console")
        for name, level in quieted.items():
            logging.getLogger(name).setLevel(level)
    out, err = capfd.readouterr()
    assert "openai.loaded" in err and "env:LLMOS_TEST_UPSTREAM_API_KEY" in err
    assert "HTTP Request: POST" in err, "the httpx lines were captured too"
    events = " ".join(str(e.to_dict()) for e in recorder.events)
    assert "authentication_error" in events
    registry = b"".join(p.read_bytes() for p in Path(kernel.home).rglob("*") if p.is_file())
    for text in (out, err, caplog.text, events, *texts):
        assert KEY not in text
        assert wrong not in text
    assert KEY.encode() not in registry
