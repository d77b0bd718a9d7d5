"""What a card (and the operator) may say about an ``openai-compatible`` model.

Two sources, kept apart on purpose:

* the **card** (``ModelCard.options``; anyone who may register models writes
  it): the upstream model id, where the key comes from (``api_key_env`` or
  ``api_key_file``, never the key itself), timeouts, pool size,
  capabilities, extra non-secret headers;
* the **operator** (``[plugins.openai]``, ``LoadRequest.options``): default
  timeouts and pool size, and the rules a card cannot get around — which
  key may be sent to which host (``key_hosts``: a card naming a key for a
  host the operator did not pair it with is refused), the folder key files
  must lie in (``secrets_dir``), optionally which environment variables a
  card may name at all (``key_envs``) and the only hosts models may point at
  (``allowed_hosts``).

The base URL is the card's ``source``, which the kernel checked against the
registry's source policy before ``load`` was called. :func:`check_settings`
is everything but reading the key: the provider's ``check`` runs it when a
card is registered (in a process that may not have the key), and
:func:`load_settings` runs it again before it reads the key.
"""

from __future__ import annotations

import fnmatch
import os
import re
import urllib.parse
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from llmos.errors import ConfigError, UnsafeSourceError, UsageError
from llmos.types import Capability

__all__ = [
    "CARD_OPTIONS",
    "OPERATOR_OPTIONS",
    "Secret",
    "Settings",
    "check_settings",
    "load_settings",
]

#: what a card may put in ``options``; the last three are the kernel's
#: batching keys (it reads them from the card itself)
CARD_OPTIONS = frozenset(
    {
        "model",
        "api_key_env",
        "api_key_file",
        "timeout_s",
        "connect_timeout_s",
        "max_connections",
        "capabilities",
        "headers",
        "max_tokens_param",
        "stream_usage",
        "max_batch_size",
        "max_wait_ms",
        "max_queue",
    }
)
#: what ``[plugins.openai]`` may hold
OPERATOR_OPTIONS = frozenset(
    {
        "timeout_s",
        "connect_timeout_s",
        "max_connections",
        "secrets_dir",
        "key_hosts",
        "key_envs",
        "allowed_hosts",
    }
)
#: option names that would put a secret in the registry; refused with a pointer
_SECRET_OPTIONS = frozenset(
    {"api_key", "key", "apikey", "token", "access_token", "secret", "password", "authorization"}
)
#: headers that carry credentials: a card may not set them (they would sit
#: in the registry)
_CREDENTIAL_HEADERS = frozenset(
    {"authorization", "proxy-authorization", "api-key", "x-api-key", "cookie"}
)
#: headers the HTTP client owns
_CLIENT_HEADERS = frozenset(
    {"host", "content-length", "content-type", "transfer-encoding", "connection"}
)
_HEADER_NAME = re.compile(r"^[A-Za-z0-9!#$%&'*+.^_`|~-]{1,64}$")
_ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
_MAX_KEY_FILE_BYTES = 64 * 1024

SUPPORTED = frozenset({Capability.COMPLETE, Capability.CHAT, Capability.STREAM, Capability.EMBED})
DEFAULT_TIMEOUT_S = 120.0
DEFAULT_CONNECT_TIMEOUT_S = 5.0
DEFAULT_MAX_CONNECTIONS = 8
#: a ``key_hosts`` entry for a key file rather than an environment variable
FILE_PREFIX = "file:"
_DEFAULT_PORTS = {"http": 80, "https": 443}
#: what a host in ``key_hosts`` may be made of (a name or an IPv4 or IPv6 address)
_HOST_CHARS = re.compile(r"^[a-z0-9_.:-]+$")


class Secret:
    """An API key: kept in memory, never shown. ``repr`` and ``str`` hide it;
    :meth:`reveal` is for the one place that sends it."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def redact(self, text: str) -> str:
        """``text`` with the key (and what looks like a masked form of it) removed."""
        if self._value and self._value in text:
            text = text.replace(self._value, "[redacted]")
        # Vendors echo a masked key ("sk-proj-****abcd"): drop those too.
        return re.sub(r"\S*\*{3,}\S*", "[redacted]", text)

    def __repr__(self) -> str:
        return "Secret('[redacted]')"

    __str__ = __repr__

    def __reduce__(self) -> Any:
        raise TypeError("an API key is not pickled")


@attrs.frozen(kw_only=True)
class Settings:
    """One model's settings, checked. ``key`` is ``None`` for servers that
    need none (a local vLLM or Ollama)."""

    base_url: str
    #: the base URL's host name, lower case
    host: str
    #: ``host[:port]``, for messages
    netloc: str
    upstream_model: str
    key: Secret | None = attrs.field(repr=False)
    #: where the key came from, for logs: ``env:NAME``, ``file:PATH`` or ``none``
    key_source: str
    timeout_s: float
    connect_timeout_s: float
    max_connections: int
    capabilities: frozenset[Capability]
    headers: Mapping[str, str]
    max_tokens_param: str
    stream_usage: bool


def load_settings(
    source: str, card_options: Mapping[str, Any], operator: Mapping[str, Any], ref: str
) -> Settings:
    """Check a card's source and options against the operator's rules
    (:func:`check_settings`) and read its key. Raises :class:`UsageError` for
    a card that is wrong (a key not paired with its host among them),
    :class:`ConfigError` for a key that cannot be read and
    :class:`UnsafeSourceError` for a host the operator does not allow."""
    settings = check_settings(source, card_options, operator, ref)
    key = _read_key(card_options, operator, f"model {ref!r}")
    return attrs.evolve(settings, key=key)


def check_settings(
    source: str, card_options: Mapping[str, Any], operator: Mapping[str, Any], ref: str
) -> Settings:
    """:func:`load_settings` without reading the key (``key`` is ``None``;
    ``key_source`` says where it will come from): what registration checks."""
    where = f"model {ref!r}"
    _check_operator(operator)
    unknown_secret = sorted(k for k in card_options if k.lower() in _SECRET_OPTIONS)
    if unknown_secret:
        raise UsageError(
            f"{where}: option {unknown_secret[0]!r} refused: a key must never be stored in the"
            " registry; name an environment variable with api_key_env (e.g."
            " api_key_env=OPENAI_API_KEY) or a file under [plugins.openai] secrets_dir with"
            " api_key_file",
            param="options",
        )
    unknown = sorted(set(card_options) - CARD_OPTIONS)
    if unknown:
        raise UsageError(
            f"{where}: unknown option(s) {', '.join(unknown)};"
            f" known: {', '.join(sorted(CARD_OPTIONS))}",
            param="options",
        )
    base_url, host, netloc = _base_url(source, where, operator)
    model = card_options.get("model")
    if not isinstance(model, str) or not model.strip():
        raise UsageError(
            f"{where}: options.model must name the upstream model (e.g. 'gpt-4o-mini')",
            param="options.model",
        )
    key_source = _check_key(card_options, operator, where, base_url, netloc)
    return Settings(
        base_url=base_url,
        host=host,
        netloc=netloc,
        upstream_model=model,
        key=None,
        key_source=key_source,
        timeout_s=_number(card_options, operator, "timeout_s", DEFAULT_TIMEOUT_S, where),
        connect_timeout_s=_number(
            card_options, operator, "connect_timeout_s", DEFAULT_CONNECT_TIMEOUT_S, where
        ),
        max_connections=_connections(card_options, operator, where),
        capabilities=_capabilities(card_options.get("capabilities"), where),
        headers=_headers(card_options.get("headers"), where),
        max_tokens_param=_choice(
            card_options, "max_tokens_param", ("max_tokens", "max_completion_tokens"), where
        ),
        stream_usage=_flag(card_options, "stream_usage", True, where),
    )


# --------------------------------------------------------------------------
# The parts
# --------------------------------------------------------------------------


def _check_operator(operator: Mapping[str, Any]) -> None:
    unknown = sorted(set(operator) - OPERATOR_OPTIONS)
    if unknown:
        raise ConfigError(
            f"[plugins.openai]: unknown option(s) {', '.join(unknown)};"
            f" known: {', '.join(sorted(OPERATOR_OPTIONS))}"
        )
    for name in ("key_envs", "allowed_hosts"):
        value = operator.get(name)
        if value is not None and (
            not isinstance(value, list | tuple) or not all(isinstance(v, str) for v in value)
        ):
            raise ConfigError(f"[plugins.openai] {name} must be a list of strings")
    pairs = _key_hosts(operator)
    if any(k.startswith(FILE_PREFIX) for k in pairs) and not operator.get("secrets_dir"):
        raise ConfigError(
            f"[plugins.openai] key_hosts pairs key files ({FILE_PREFIX}NAME) but secrets_dir,"
            " the folder they lie in, is not set"
        )


def _base_url(source: str, where: str, operator: Mapping[str, Any]) -> tuple[str, str, str]:
    """The card's source as a base URL: http(s), no query or fragment.

    The kernel has already checked it against the registry's source policy
    (scheme, credentials, private and metadata addresses)."""
    if not source:
        raise UsageError(
            f"{where}: the card's source must be the API's base URL, e.g."
            " https://api.openai.com/v1",
            param="source",
        )
    parts = urllib.parse.urlsplit(source)
    if parts.scheme.lower() not in ("http", "https"):
        raise UsageError(
            f"{where}: source {source!r} is not an http(s) URL; an openai-compatible model's"
            " source is the API's base URL, e.g. https://api.openai.com/v1",
            param="source",
        )
    if parts.query or parts.fragment or "@" in parts.netloc:
        raise UsageError(
            f"{where}: the base URL {source!r} must have no query, fragment or credentials",
            param="source",
        )
    host = (parts.hostname or "").rstrip(".").lower()
    if not host:
        raise UsageError(f"{where}: the base URL {source!r} has no host", param="source")
    allowed = operator.get("allowed_hosts")
    if allowed and not any(fnmatch.fnmatchcase(host, p.lower()) for p in allowed):
        raise UnsafeSourceError(
            f"{where}: host {host!r} is not in [plugins.openai] allowed_hosts"
            f" ({', '.join(allowed)})",
            param="source",
        )
    return urllib.parse.urlunsplit(parts).rstrip("/"), host, parts.netloc.lower()


def _check_key(
    options: Mapping[str, Any],
    operator: Mapping[str, Any],
    where: str,
    base_url: str,
    netloc: str,
) -> str:
    """Where the card's key comes from (``env:NAME``, ``file:PATH`` or
    ``none``), once it is known to be paired with the base URL's host."""
    env, file = options.get("api_key_env"), options.get("api_key_file")
    if env is not None and file is not None:
        raise UsageError(f"{where}: give api_key_env or api_key_file, not both", param="options")
    if env is not None:
        _check_env_name(env, operator, where)
        _check_paired(("api_key_env", env, env), operator, where, base_url, netloc)
        return f"env:{env}"
    if file is not None:
        path = _key_path(file, operator, where)
        entry = f'"{FILE_PREFIX}{file}"'
        _check_paired(("api_key_file", file, entry), operator, where, base_url, netloc, path)
        return f"file:{path}"
    return "none"


def _read_key(options: Mapping[str, Any], operator: Mapping[str, Any], where: str) -> Secret | None:
    """The key :func:`_check_key` passed, read now (at load, in the daemon)."""
    env, file = options.get("api_key_env"), options.get("api_key_file")
    if env is not None:
        return _key_from_env(env, where)
    if file is not None:
        return _key_from_file(_key_path(file, operator, where), where)
    return None


def _check_env_name(name: Any, operator: Mapping[str, Any], where: str) -> None:
    if not isinstance(name, str) or not _ENV_NAME.match(name):
        raise UsageError(
            f"{where}: api_key_env must be an environment variable's name, got {name!r}",
            param="options.api_key_env",
        )
    patterns = tuple(operator.get("key_envs") or ())
    if patterns and not any(fnmatch.fnmatchcase(name, pattern) for pattern in patterns):
        raise UsageError(
            f"{where}: api_key_env {name!r} is not one the operator allows (patterns:"
            f" {', '.join(patterns)}; set [plugins.openai] key_envs to change them)",
            param="options.api_key_env",
        )


def _key_hosts(operator: Mapping[str, Any]) -> dict[str, tuple[tuple[str, int | None], ...]]:
    """``[plugins.openai] key_hosts``, checked: key (an environment variable's
    name, or ``file:NAME`` for a key file) -> the hosts it may be sent to, as
    ``(host, port or None)``."""
    table = operator.get("key_hosts")
    if table is None:
        return {}
    if not isinstance(table, Mapping):
        raise ConfigError(
            "[plugins.openai] key_hosts must be a table: key -> hosts, e.g."
            ' { OPENAI_API_KEY = ["api.openai.com"] }'
        )
    out = {}
    for key, hosts in table.items():
        is_file = isinstance(key, str) and key.startswith(FILE_PREFIX)
        if not isinstance(key, str) or not (
            _ENV_NAME.match(key) or (is_file and key[len(FILE_PREFIX) :].strip())
        ):
            raise ConfigError(
                f"[plugins.openai] key_hosts: {key!r} is neither an environment variable's name"
                f" nor {FILE_PREFIX}NAME (a key file in secrets_dir)"
            )
        if isinstance(hosts, str) or not isinstance(hosts, list | tuple):
            raise ConfigError(
                f'[plugins.openai] key_hosts.{key} must be a list of hosts, e.g. ["api.openai.com"]'
            )
        out[key] = tuple(_host_pattern(host, key) for host in hosts)
    return out


def _host_pattern(value: Any, key: str) -> tuple[str, int | None]:
    """``host``, ``host:port``, ``[v6]:port`` or ``*.domain`` as ``(host, port)``."""
    bad = ConfigError(
        f"[plugins.openai] key_hosts.{key}: {value!r} is not a host (api.openai.com,"
        " 10.0.0.5:8000, [::1]:8000, or *.example.com for its subdomains)"
    )
    if not isinstance(value, str):
        raise bad
    text = value.strip().lower()
    port: str | None = None
    if text.startswith("["):
        host, closed, rest = text[1:].partition("]")
        if not closed or (rest and not rest.startswith(":")):
            raise bad
        port = rest[1:] if rest else None
    elif text.count(":") == 1:
        host, port = text.split(":")
    else:
        host = text  # a name, an IPv4 or a bare IPv6 address
    host = host.rstrip(".")
    bare = host[2:] if host.startswith("*.") else host
    if not bare or not _HOST_CHARS.match(bare) or bare.startswith("."):
        raise bad
    if port is not None and not (port.isdigit() and 0 < int(port) < 65536):
        raise bad
    return host, int(port) if port is not None else None


def _host_matches(pattern: tuple[str, int | None], host: str, port: int | None) -> bool:
    """Exact host (and port when the pattern has one); ``*.domain`` matches
    names under ``domain``, not ``domain`` itself. No other wildcards."""
    name, want = pattern
    if want is not None and want != port:
        return False
    if name.startswith("*."):
        return host.endswith(name[1:])
    return host == name


def _check_paired(
    key: tuple[str, str, str],
    operator: Mapping[str, Any],
    where: str,
    base_url: str,
    netloc: str,
    path: Path | None = None,
) -> None:
    """Refuse a key the operator did not pair with the base URL's host.

    ``key`` is ``(option, its value, its key_hosts entry)``; ``path`` is a
    key file's resolved path (entries are compared by the file they name).
    Whoever registers a card chooses its source: without the pairing, a card
    could send the operator's key to a host of its choosing.
    """
    option, value, entry = key
    parts = urllib.parse.urlsplit(base_url)
    host = (parts.hostname or "").rstrip(".").lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(parts.scheme.lower())
    except ValueError:
        raise UsageError(f"{where}: the base URL {base_url!r} has an invalid port") from None
    pairs = _key_hosts(operator)
    if path is None:
        hosts = pairs.get(value, ())
    else:
        root = Path(str(operator.get("secrets_dir"))).expanduser().resolve()
        hosts = tuple(
            pattern
            for name, patterns in pairs.items()
            if name.startswith(FILE_PREFIX)
            and (root / Path(name[len(FILE_PREFIX) :]).expanduser()).resolve() == path
            for pattern in patterns
        )
    if any(_host_matches(pattern, host, port) for pattern in hosts):
        return
    shown = ", ".join(f"{h}:{p}" if p is not None else h for h, p in hosts) or "no host"
    raise UsageError(
        f"{where}: {option} {value} is not paired with host {netloc}: the operator pairs keys"
        f" with hosts in [plugins.openai] key_hosts ({value} is paired with {shown}); point the"
        f" card at a paired host, or, if that host is meant to get the key, the operator adds"
        f' {entry} = ["{netloc}"] there',
        param=f"options.{option}",
    )


def _key_from_env(name: str, where: str) -> Secret:
    value = os.environ.get(name, "").strip()
    if not value:
        raise ConfigError(
            f"{where}: the environment variable {name} (options.api_key_env) is not set or"
            " empty in the daemon's environment; set it and retry",
            param="options.api_key_env",
        )
    return _checked(value, where, f"${name}")


def _key_path(value: Any, operator: Mapping[str, Any], where: str) -> Path:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: api_key_file must be a file name", param="options.api_key_file")
    secrets_dir = operator.get("secrets_dir")
    if not secrets_dir:
        # A card names the file and the host the key is sent to: without a
        # folder the operator chose, any readable file could be sent anywhere.
        raise UsageError(
            f"{where}: api_key_file needs [plugins.openai] secrets_dir, the folder key files"
            " must lie in; the operator sets it in the config",
            param="options.api_key_file",
        )
    if ".." in re.split(r"[/\\]", value) or "\x00" in value:
        raise UnsafeSourceError(
            f"{where}: api_key_file {value!r} contains a '..' segment; name a file inside"
            " [plugins.openai] secrets_dir",
            param="options.api_key_file",
        )
    if value.startswith("~"):
        # Not expanded: over HTTP it would be the daemon's home, and ``~user``
        # of an unknown user raises (a 500) or says whether the account exists.
        raise UsageError(
            f"{where}: api_key_file {value[:100]!r} starts with '~'; name a file inside"
            " [plugins.openai] secrets_dir (relative to it, or an absolute path in it)",
            param="options.api_key_file",
        )
    root = Path(str(secrets_dir)).expanduser().resolve()
    path = (root / Path(value)).resolve()  # an absolute value replaces root
    if not path.is_relative_to(root):
        raise UnsafeSourceError(
            f"{where}: api_key_file {value!r} is outside [plugins.openai] secrets_dir ({root})",
            param="options.api_key_file",
        )
    return path


def _key_from_file(path: Path, where: str) -> Secret:
    try:
        if path.stat().st_size > _MAX_KEY_FILE_BYTES:
            raise ConfigError(f"{where}: key file {path} is larger than 64 KiB; is it a key?")
        value = path.read_text(encoding="utf-8").strip()
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: key file {path} (options.api_key_file) does not exist",
            param="options.api_key_file",
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{where}: cannot read key file {path}: {type(exc).__name__}",
            param="options.api_key_file",
        ) from None
    if not value:
        raise ConfigError(f"{where}: key file {path} is empty", param="options.api_key_file")
    return _checked(value, where, str(path))


def _checked(value: str, where: str, origin: str) -> Secret:
    # Never echo the value: say what is wrong with it.
    if any(ord(c) < 0x21 or ord(c) > 0x7E for c in value):
        raise ConfigError(
            f"{where}: the key in {origin} has spaces, line breaks or non-ASCII characters,"
            " which cannot go in an HTTP header; check it"
        )
    return Secret(value)


def _number(
    options: Mapping[str, Any], operator: Mapping[str, Any], name: str, default: float, where: str
) -> float:
    value = options.get(name, operator.get(name, default))
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 3600:
        raise UsageError(
            f"{where}: {name} must be a number of seconds in (0, 3600], got {value!r}",
            param=f"options.{name}",
        )
    return float(value)


def _connections(options: Mapping[str, Any], operator: Mapping[str, Any], where: str) -> int:
    value = options.get("max_connections", operator.get("max_connections", DEFAULT_MAX_CONNECTIONS))
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 256:
        raise UsageError(
            f"{where}: max_connections must be an integer in [1, 256], got {value!r}",
            param="options.max_connections",
        )
    return value


def _capabilities(value: Any, where: str) -> frozenset[Capability]:
    if value is None:
        return SUPPORTED
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list | tuple) or not names:
        raise UsageError(f"{where}: capabilities must be a non-empty list", param="options")
    out = set()
    for name in names:
        try:
            capability = Capability(name)
        except ValueError:
            capability = None
        if capability not in SUPPORTED:
            raise UsageError(
                f"{where}: capability {name!r} is not served over the OpenAI API; choose from"
                f" {', '.join(sorted(SUPPORTED))}",
                param="options.capabilities",
            )
        out.add(capability)
    return frozenset(out)


def _headers(value: Any, where: str) -> Mapping[str, str]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: headers must be a table of strings", param="options.headers")
    out = {}
    for name, text in value.items():
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise UsageError(f"{where}: invalid header name {name!r}", param="options.headers")
        if name.lower() in _CREDENTIAL_HEADERS:
            raise UsageError(
                f"{where}: header {name!r} cannot be set in a card: the key comes from"
                " api_key_env or api_key_file, never from the registry",
                param="options.headers",
            )
        if name.lower() in _CLIENT_HEADERS:
            raise UsageError(
                f"{where}: header {name!r} is set by the HTTP client", param="options.headers"
            )
        if not isinstance(text, str) or any(ord(c) < 0x20 or ord(c) == 0x7F for c in text):
            raise UsageError(
                f"{where}: header {name!r} must be a one-line string", param="options.headers"
            )
        out[name] = text
    return out


def _choice(options: Mapping[str, Any], name: str, allowed: tuple[str, ...], where: str) -> str:
    value = options.get(name, allowed[0])
    if value not in allowed:
        raise UsageError(
            f"{where}: {name} must be one of {', '.join(allowed)}, got {value!r}",
            param=f"options.{name}",
        )
    return str(value)


def _flag(options: Mapping[str, Any], name: str, default: bool, where: str) -> bool:
    value = options.get(name, default)
    if not isinstance(value, bool):
        raise UsageError(f"{where}: {name} must be true or false", param=f"options.{name}")
    return value
