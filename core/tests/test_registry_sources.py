"""Tests of model source checks: local roots, pkg://, hf://, https:// and what is refused."""

from __future__ import annotations

import socket
import textwrap
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import pytest

from llmos.config import load_config
from llmos.errors import ConfigError, NotFoundError, UnsafeSourceError
from llmos.registry.sources import (
    DEFAULT_MAX_PUSH_BYTES,
    DEFAULT_MAX_PUSH_RATIO,
    ParsedSource,
    SourcePolicy,
    check_source,
    policy_from_config,
    resolve_local,
)
from llmos.runtime.kernel import KERNEL_SECTIONS

Resolver = Callable[..., Sequence[tuple[Any, ...]]]


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


@pytest.fixture
def policy(home: Path, tmp_path: Path) -> SourcePolicy:
    (tmp_path / "models").mkdir()
    return SourcePolicy(allowed_roots=(home, tmp_path / "models"))


def resolver(table: dict[str, list[str]]) -> Resolver:
    """A getaddrinfo stand-in answering from ``table``; unknown names fail like DNS."""

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
        if host not in table:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        out = []
        for address in table[host]:
            family = socket.AF_INET6 if ":" in address else socket.AF_INET
            sockaddr = (address, port, 0, 0) if family == socket.AF_INET6 else (address, port)
            out.append((family, socket.SOCK_STREAM, 6, "", sockaddr))
        return out

    return resolve


def no_dns(host: str, *args: Any, **kwargs: Any) -> list[tuple[Any, ...]]:
    raise AssertionError(f"{host!r} is an address literal; it must not be looked up")


def refused(source: str, policy: SourcePolicy, resolve: Resolver = no_dns) -> str:
    with pytest.raises(UnsafeSourceError) as caught:
        check_source(source, policy, resolve=resolve)
    assert caught.value.type == "unsafe_source"
    assert caught.value.status == 400
    return str(caught.value)


# ------------------------------------------------------------------ local paths


def test_path_under_an_allowed_root_is_accepted_and_resolved(
    home: Path, tmp_path: Path, policy: SourcePolicy
) -> None:
    model = tmp_path / "models" / "tiny"
    model.mkdir()
    assert check_source(str(model), policy) == ParsedSource("path", str(model.resolve()), model)
    # home is a root too, and a path need not exist yet to be registered
    later = home / "artifacts" / "m" / "1"
    assert check_source(str(later), policy).path == later


def test_path_outside_the_roots_is_refused_with_what_to_do(
    tmp_path: Path, policy: SourcePolicy
) -> None:
    message = refused("/etc/passwd", policy)
    assert "outside the allowed roots" in message
    assert str(tmp_path / "home") in message
    assert "[registry] allowed_roots" in message


def test_symlink_out_of_a_root_is_refused_after_resolving(
    tmp_path: Path, policy: SourcePolicy
) -> None:
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    link = tmp_path / "models" / "sneaky"
    link.symlink_to(outside)
    message = refused(str(link), policy)
    assert f"resolves to {outside}" in message


@pytest.mark.parametrize(
    ("suffix", "reason"),
    [
        ("../../etc/passwd", "'..' path segment"),
        ("a/..\\..\\etc", "'..' path segment"),
        ("%2e%2e%2fetc/passwd", "'..' path segment (percent-encoded)"),
        ("%252e%252e%252fetc/passwd", "'..' path segment (percent-encoded)"),
        ("model\x00.gguf", "NUL byte"),
        ("model%00.gguf", "NUL byte (percent-encoded)"),
        ("model\n.gguf", "control character"),
        ("model\ud800.gguf", "not valid Unicode (a lone surrogate)"),  # os.fsencode failed
        ("model\udc80.gguf", "not valid Unicode (a lone surrogate)"),  # a surrogateescape byte
    ],
)
def test_traversal_and_nul_are_refused(
    tmp_path: Path, policy: SourcePolicy, suffix: str, reason: str
) -> None:
    assert reason in refused(f"{tmp_path}/models/{suffix}", policy)


@pytest.mark.parametrize(
    ("source", "shown"),
    [
        ("~nosuchuser-llmos/models/m", "~nosuchuser-llmos"),  # expanduser raised: a 500
        ("~root/models/m", "~root"),
        ("~/models/m", "~"),
        ("~", "~"),
    ],
)
def test_tilde_paths_are_refused_with_what_to_do(
    home: Path, policy: SourcePolicy, monkeypatch: pytest.MonkeyPatch, source: str, shown: str
) -> None:
    # Even where "~" would land under a root: over HTTP it is the daemon's
    # home, not the client's, so it is never expanded.
    monkeypatch.setenv("HOME", str(home))
    (home / "models" / "m").mkdir(parents=True)
    message = refused(source, policy)
    assert f"'{shown}' is not expanded (the daemon's home is not yours)" in message
    assert "absolute path under the data folder or a folder in [registry] allowed_roots" in message
    assert str(home) in message
    assert check_source(str(home / "models" / "m"), policy).kind == "path"


def test_an_unknown_user_in_allowed_roots_is_a_config_error(tmp_path: Path) -> None:
    config_file = tmp_path / "llmos.toml"
    config_file.write_text('[registry]\nallowed_roots = ["~nosuchuser-llmos/models"]\n')
    config = load_config(
        [config_file], env={"LLMOS_HOME": str(tmp_path / "data")}, sections=KERNEL_SECTIONS
    )
    with pytest.raises(ConfigError, match=r"cannot expand '~nosuchuser-llmos' \(no such user\)"):
        policy_from_config(config)


def test_backslash_traversal_alone_is_refused(policy: SourcePolicy) -> None:
    assert "'..' path segment" in refused("..\\..\\windows\\system32", policy)


def test_file_urls_are_refused(policy: SourcePolicy) -> None:
    message = refused("file:///etc/passwd", policy)
    assert "file:// URLs are not accepted" in message
    assert "give the path itself" in message


def test_unknown_scheme_is_refused(policy: SourcePolicy) -> None:
    assert "unknown scheme ftp://" in refused("ftp://host/model", policy)


# ------------------------------------------------------------------ hf:// and pkg://


def test_hf_sources_are_kept_as_given(policy: SourcePolicy) -> None:
    assert check_source("hf://HuggingFaceTB/SmolLM2-135M", policy, resolve=no_dns) == (
        ParsedSource("hf", "hf://HuggingFaceTB/SmolLM2-135M")
    )
    assert check_source("hf://gpt2", policy).value == "hf://gpt2"
    assert "expected hf://org/name" in refused("hf://org/name/extra", policy)
    assert "expected hf://org/name" in refused("hf://", policy)


@pytest.fixture
def installed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An installed-looking distribution ``weightpack`` carrying a weights file, a
    folder, and a link out of its install location."""
    site = tmp_path / "site"
    package = site / "weightpack"
    (package / "weights").mkdir(parents=True)
    (package / "weights" / "model.gguf").write_bytes(b"GGUF")
    (package / "weights" / "config.json").write_text("{}")
    (tmp_path / "outside.gguf").write_bytes(b"GGUF")
    (package / "link.gguf").symlink_to(tmp_path / "outside.gguf")
    info = site / "weightpack-1.0.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: weightpack\nVersion: 1.0\n")
    (info / "RECORD").write_text(
        textwrap.dedent(
            """\
            weightpack/weights/model.gguf,,
            weightpack/weights/config.json,,
            weightpack/link.gguf,,
            weightpack-1.0.dist-info/METADATA,,
            weightpack-1.0.dist-info/RECORD,,
            """
        )
    )
    monkeypatch.syspath_prepend(str(site))
    return site


def test_pkg_source_resolves_inside_the_distribution(installed: Path, policy: SourcePolicy) -> None:
    parsed = check_source("pkg://weightpack/weightpack/weights/model.gguf", policy)
    assert parsed.kind == "pkg"
    assert parsed.value == "pkg://weightpack/weightpack/weights/model.gguf"
    assert parsed.path == (installed / "weightpack" / "weights" / "model.gguf").resolve()
    # a folder of the distribution is a source too
    folder = check_source("pkg://weightpack/weightpack/weights/", policy)
    assert folder.path == (installed / "weightpack" / "weights").resolve()
    assert resolve_local("pkg://weightpack/weightpack/weights", policy) == folder.path


def test_pkg_source_refusals(installed: Path, policy: SourcePolicy) -> None:
    assert "has no file or folder 'other/x.gguf'" in refused(
        "pkg://weightpack/other/x.gguf", policy
    )
    assert "'..' path segment" in refused("pkg://weightpack/weightpack/../../x", policy)
    assert "outside weightpack's install location" in refused(
        "pkg://weightpack/weightpack/link.gguf", policy
    )
    assert "expected pkg://distribution/path" in refused("pkg://weightpack", policy)
    with pytest.raises(NotFoundError, match=r"'no-such-dist' is not installed \(pip install"):
        check_source("pkg://no-such-dist/x.gguf", policy)


# ------------------------------------------------------------------ URLs


def test_public_https_url_is_accepted(policy: SourcePolicy) -> None:
    calls: list[tuple[str, int]] = []
    table = resolver({"api.vendor.example": ["93.184.216.34", "2606:2800:220:1::1"]})

    def resolve(host: str, port: int, *args: Any, **kwargs: Any) -> Any:
        calls.append((host, port))
        return table(host, port)

    parsed = check_source("https://api.vendor.example/v1", policy, resolve=resolve)
    assert parsed == ParsedSource("https", "https://api.vendor.example/v1")
    assert calls == [("api.vendor.example", 443)]


def test_plain_http_is_refused_unless_allowed(policy: SourcePolicy) -> None:
    public = resolver({"host.example": ["93.184.216.34"]})
    message = refused("http://host.example/model", policy, public)
    assert "plain http:// is not accepted" in message
    assert "allow_http = true" in message
    lax = SourcePolicy(allowed_roots=(), allow_http=True)
    assert check_source("http://host.example/model", lax, resolve=public).kind == "https"
    # allowing http does not allow private hosts
    assert "loopback" in refused("http://127.0.0.1:8000/", lax)


def test_credentials_in_urls_are_refused(policy: SourcePolicy) -> None:
    message = refused("https://user:secret@api.vendor.example/v1", policy)
    assert "credentials in URLs are refused" in message


@pytest.mark.parametrize(
    ("host", "reason"),
    [
        ("127.0.0.1", "a loopback address"),
        ("10.1.2.3", "a private (RFC 1918) address"),
        ("172.16.0.1", "a private (RFC 1918) address"),
        ("192.168.1.1", "a private (RFC 1918) address"),
        ("169.254.169.254", "a cloud metadata address"),
        ("169.254.1.1", "a link-local address"),
        ("0.0.0.0", "the unspecified address"),
        ("224.0.0.1", "a multicast address"),
        ("100.64.0.1", "not a public address"),
        ("[::1]", "a loopback address"),
        ("[::]", "the unspecified address"),
        ("[fe80::1]", "a link-local address"),
        ("[fd12:3456::1]", "a unique-local address"),
        ("[ff02::1]", "a multicast address"),
        ("[::ffff:127.0.0.1]", "a loopback address"),
        ("[::ffff:169.254.169.254]", "a cloud metadata address"),
        ("[::ffff:10.0.0.1]", "a private (RFC 1918) address"),
        ("2130706433", "a loopback address"),  # 127.0.0.1 as one number
        ("0x7f.1", "a loopback address"),
        ("0177.0.0.1", "a loopback address"),
        ("127.1", "a loopback address"),
        ("0xa9fea9fe", "a cloud metadata address"),  # 169.254.169.254
        ("localhost", "a loopback address"),
        ("foo.localhost", "a loopback address"),
    ],
)
def test_non_public_hosts_are_refused_without_a_lookup(
    policy: SourcePolicy, host: str, reason: str
) -> None:
    message = refused(f"https://{host}/v1", policy)
    assert reason in message
    if reason != "a cloud metadata address":
        assert "allow_private_urls = true" in message


@pytest.mark.parametrize(
    "host", ["metadata.google.internal", "metadata", "METADATA.google.internal."]
)
def test_metadata_hostnames_are_refused_even_when_private_urls_are_allowed(
    host: str, policy: SourcePolicy
) -> None:
    lax = SourcePolicy(allowed_roots=(), allow_private_urls=True)
    for checked in (policy, lax):
        assert "cloud metadata service" in refused(f"https://{host}/computeMetadata/v1", checked)


def test_a_name_is_refused_if_any_of_its_addresses_is_private(policy: SourcePolicy) -> None:
    mixed = resolver({"rebind.example": ["93.184.216.34", "10.0.0.7"]})
    message = refused("https://rebind.example/x", policy, mixed)
    assert "rebind.example (10.0.0.7) is a private (RFC 1918) address" in message
    v6 = resolver({"v6.example": ["2606:2800:220:1::1", "fe80::1%eth0"]})
    assert "link-local" in refused("https://v6.example/x", policy, v6)


def test_unresolvable_host_is_recorded_for_a_later_check(policy: SourcePolicy) -> None:
    # registering only records the URL (an offline machine must be able to);
    # the download calls check_source again, where it must resolve
    parsed = check_source("https://no-such-host.example/x", policy, resolve=resolver({}))
    assert (parsed.kind, parsed.value) == ("https", "https://no-such-host.example/x")


def test_allow_private_urls_accepts_private_hosts_but_not_metadata(policy: SourcePolicy) -> None:
    lax = SourcePolicy(allowed_roots=(), allow_private_urls=True)
    assert check_source("https://10.0.0.5:8000/v1", lax, resolve=no_dns).kind == "https"
    assert check_source("https://[fd00::5]/v1", lax, resolve=no_dns).kind == "https"
    assert check_source("https://vllm.internal/v1", lax, resolve=no_dns).kind == "https"
    assert "cloud metadata address" in refused("https://169.254.169.254/latest/", lax)
    assert "cloud metadata address" in refused("https://[fd00:ec2::254]/latest/", lax)


# ------------------------------------------------------------------ resolve_local


def test_resolve_local(tmp_path: Path, policy: SourcePolicy) -> None:
    model = tmp_path / "models" / "m.gguf"
    model.write_bytes(b"GGUF")
    assert resolve_local(str(model), policy) == model.resolve()
    with pytest.raises(NotFoundError, match="does not exist"):
        resolve_local(str(tmp_path / "models" / "absent"), policy)
    with pytest.raises(UnsafeSourceError, match="not local"):
        resolve_local("hf://org/name", policy)
    with pytest.raises(UnsafeSourceError, match="outside the allowed roots"):
        resolve_local("/etc/hostname", policy)


# ------------------------------------------------------------------ config


def test_policy_from_config(tmp_path: Path) -> None:
    config_file = tmp_path / "conf" / "llmos.toml"
    config_file.parent.mkdir()
    config_file.write_text(
        textwrap.dedent(
            f"""\
            home = "{tmp_path / "data"}"
            [registry]
            allowed_roots = ["models", "{tmp_path / "abs"}"]
            allow_private_urls = true
            allow_pickle = true
            max_push_bytes = 1000
            """
        )
    )
    policy = policy_from_config(load_config([config_file], env={}, sections=KERNEL_SECTIONS))
    assert policy.allowed_roots == (
        (tmp_path / "data").resolve(),
        (tmp_path / "conf" / "models").resolve(),  # relative to the config file
        (tmp_path / "abs").resolve(),
    )
    assert policy.allow_private_urls and policy.allow_pickle and not policy.allow_http
    assert policy.max_push_bytes == 1000


def test_registry_section_defaults_and_validation(tmp_path: Path) -> None:
    config = load_config([], env={"LLMOS_HOME": str(tmp_path)}, sections=KERNEL_SECTIONS)
    assert config.section("registry") == {
        "store": "sqlite",
        "allowed_roots": [],
        "allow_private_urls": False,
        "allow_http": False,
        "allow_pickle": False,
        "max_push_bytes": DEFAULT_MAX_PUSH_BYTES,
        "max_push_ratio": DEFAULT_MAX_PUSH_RATIO,
    }
    assert DEFAULT_MAX_PUSH_BYTES == 20 * 2**30
    assert DEFAULT_MAX_PUSH_RATIO == 100
    policy = policy_from_config(config)
    assert policy.allowed_roots == (tmp_path.resolve(),)
    assert not (policy.allow_private_urls or policy.allow_http or policy.allow_pickle)

    bad = tmp_path / "bad.toml"
    bad.write_text("[registry]\nmax_push_bytes = 0\n")
    with pytest.raises(ConfigError, match=r"registry\.max_push_bytes: expected a positive integer"):
        load_config([bad], env={}, sections=KERNEL_SECTIONS)
    bad.write_text("[registry]\nmax_push_ratio = 0\n")
    with pytest.raises(ConfigError, match=r"registry\.max_push_ratio: expected a whole number"):
        load_config([bad], env={}, sections=KERNEL_SECTIONS)
