"""The artifact store: tuned adapters and converted weights, kept where every daemon can read them.

A tuning job's result (and any folder of weights llmos makes) is stored with
:meth:`ArtifactStore.put` under ``[artifacts] root``: the data folder's
``artifacts/`` by default, or any folder or `fsspec <https://filesystem-spec.readthedocs.io>`_
URL the operator names (``s3://bucket/llmos``, ``gs://…``, ``memory://…``,
an NFS mount, ``https://mirror/llmos`` read-only) so that the daemons of a
cluster share one copy. Each artifact is a folder::

    ROOT/<model name>/<sha256 of its manifest>/
        llmos-artifact.json      the manifest: every file's name, size and sha256
        adapter_model.safetensors, tokenizer.json, …

Its address is content-addressed: the last segment is the hash of the
manifest, and the manifest holds the hash of every file, so an address names
one set of bytes; a copy changed in the store (or in the local cache) after
it was put is refused, not served.

Where the root is a local folder, an artifact's address is its path and
providers read it in place, as they read any model folder (the root is an
allowed source root). Where it is a URL, a card's ``source`` is the URL, and
:meth:`ArtifactStore.fetch` copies the artifact into the local cache
(``[artifacts] cache``, ``home/cache/artifacts/<digest>``) before it is
loaded, with the checks a push gets (:mod:`llmos.registry.artifacts`): names
that stay inside the folder, regular files only (no links), at most
``[registry] max_push_bytes`` in all, no pickles unless ``[registry]
allow_pickle``, valid safetensors and GGUF headers; and, on top of those,
every byte against its hash. A copy already in the cache is hashed again
before it is used.

The cache is a copy (the root is the source of truth), kept under ``[artifacts]
cache_max_gb``: after each fetch (and each put that leaves a copy there) the
least recently used entries past the cap are removed (:meth:`ArtifactStore.prune`,
``llmos artifacts prune``). An entry's last use is its folder's mtime, touched
by every fetch; an entry a loaded model was read from is pinned (a shared
``flock`` on its manifest, held by the daemon until the model is unloaded, so
that another process's prune sees it too), and one used in the last
:data:`RECENT_S` seconds is kept as well, for the time between a fetch and the
load that pins it. Only ``CACHE/<sha256>/`` folders are ever removed (never a
link, never anything else in the folder), and a cache that is, or lies inside
or around, a local root is refused rather than pruned.

The root is the operator's config, so it is trusted, ``file://`` and plain
``http://`` included; a card that comes from anyone else (the HTTP API) may
name a URL only inside it (:func:`llmos.registry.sources.check_source`).
"""

from __future__ import annotations

import collections
import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from llmos.errors import (
    ConfigError,
    LlmosError,
    NotFoundError,
    PayloadTooLarge,
    Unavailable,
    UnsafeSourceError,
    UsageError,
)
from llmos.registry.artifacts import check_folder, store_upload
from llmos.types import validate_model_name

try:
    import fcntl
except ImportError:  # Windows: only this process's pins are seen
    fcntl = None  # type: ignore[assignment]

if TYPE_CHECKING:
    from llmos.registry.sources import SourcePolicy

__all__ = [
    "MANIFEST",
    "ArtifactStore",
    "CacheEntry",
    "CacheListing",
    "Manifest",
    "ManifestEntry",
    "Pin",
    "PruneReport",
    "is_url",
    "store_of",
]

log = structlog.get_logger("llmos.registry")

#: the manifest's file name inside an artifact's folder
MANIFEST = "llmos-artifact.json"
#: what a manifest says it is
FORMAT = "llmos-artifact/1"
#: a manifest larger than this is refused before it is parsed
MAX_MANIFEST_BYTES = 16 << 20
_CHUNK = 1 << 20
_DIGEST = re.compile(r"^[0-9a-f]{64}$")
_SCHEME = re.compile(r"^([A-Za-z][A-Za-z0-9+.-]*)://")
_SEGMENT = re.compile(r"^[A-Za-z0-9._-]+$")
#: a key names an artifact anyone could remake from it (``gguf-<sha256>``)
_KEY = re.compile(r"^[a-z0-9][a-z0-9._-]{0,127}$")
#: where keys are kept, under the root: ``ROOT/.keys/<key>`` holds an address
KEYS = ".keys"
#: a cache entry used (fetched, or found in the cache) this recently is never
#: pruned: the time between a fetch and the load that pins it, with room to spare
RECENT_S = 10 * 60.0
#: ``[artifacts] cache_max_gb`` is in GB of 10**9 bytes
GB = 10**9
#: with no ``cache_max_gb``, the cache may hold this share of what it could
#: hold: its own bytes plus the free space of its disk
DEFAULT_CACHE_SHARE = 0.5


def is_url(root: str) -> bool:
    """Whether ``root`` is a URL (``scheme://…``) rather than a local folder."""
    found = _SCHEME.match(root)
    return found is not None and len(found.group(1)) > 1  # C:// is a drive


@attrs.frozen
class ManifestEntry:
    """One file of an artifact."""

    name: str
    size: int
    sha256: str


@attrs.frozen
class Manifest:
    """What an artifact holds; its hash is the last segment of the artifact's address."""

    name: str
    files: tuple[ManifestEntry, ...]

    def to_bytes(self) -> bytes:
        body = {
            "format": FORMAT,
            "name": self.name,
            "files": [attrs.asdict(entry) for entry in self.files],
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    @property
    def total(self) -> int:
        return sum(entry.size for entry in self.files)

    @classmethod
    def parse(cls, data: bytes, where: str) -> Manifest:
        """A manifest read from the store, every field checked; the names are
        checked again as members before anything is written."""

        def bad(why: str) -> UnsafeSourceError:
            return UnsafeSourceError(f"artifact {where}: its manifest {why}", param="source")

        try:
            body = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise bad(f"is not JSON ({exc})") from None
        if not isinstance(body, dict) or body.get("format") != FORMAT:
            raise bad(f"is not an {FORMAT} manifest")
        files = body.get("files")
        if not isinstance(files, list) or not files:
            raise bad("lists no files")
        entries = []
        seen: set[str] = set()
        for item in files:
            if not isinstance(item, dict) or set(item) != {"name", "size", "sha256"}:
                raise bad(f"has a malformed entry {str(item)[:200]!r}")
            name, size, digest = item["name"], item["size"], item["sha256"]
            if not isinstance(name, str) or not _safe_member(name) or name == MANIFEST:
                raise bad(f"names a file {str(name)[:200]!r} that is not a plain relative path")
            if isinstance(size, bool) or not isinstance(size, int) or size < 0:
                raise bad(f"gives {name!r} a size of {size!r}")
            if not isinstance(digest, str) or not _DIGEST.match(digest):
                raise bad(f"gives {name!r} a malformed sha256")
            if name in seen:
                raise bad(f"lists {name!r} twice")
            seen.add(name)
            entries.append(ManifestEntry(name, size, digest))
        name = body.get("name")
        if not isinstance(name, str):
            raise bad("has no model name")
        return cls(name, tuple(entries))


def _safe_member(name: str) -> bool:
    """``a/b.safetensors``: relative, no empty, ``.`` or ``..`` segment, no odd characters."""
    parts = name.split("/")
    return all(part not in ("", ".", "..") and _SEGMENT.match(part) for part in parts)


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as file:
        while chunk := file.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _manifest_of(folder: Path, name: str) -> Manifest:
    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.name != MANIFEST)
    return Manifest(
        name,
        tuple(
            ManifestEntry(p.relative_to(folder).as_posix(), p.stat().st_size, _sha256_file(p))
            for p in files
        ),
    )


@attrs.frozen
class Located:
    """An address inside the store, taken apart."""

    #: the artifact's folder, as a path on the store's filesystem
    folder: str
    digest: str
    #: a file or folder inside the artifact the address points at ("" for the artifact)
    inner: str


@attrs.frozen
class ArtifactStore:
    """Artifacts under ``root`` (a local folder or an fsspec URL), fetched into ``cache``.

    ``limits`` is the registry's source policy: fetched artifacts are held to
    its ``max_push_bytes`` and ``allow_pickle`` like pushes.
    ``storage_options`` go to fsspec (credentials, endpoints), never into a
    log or a repr.
    """

    root: str = attrs.field(converter=lambda root: str(root).rstrip("/") or "/")
    cache: Path = attrs.field(converter=Path)
    limits: SourcePolicy
    storage_options: Mapping[str, Any] = attrs.field(factory=dict, repr=False, eq=False)
    #: whether the operator named the root (``[artifacts] root``): then it is
    #: worth sharing what a daemon could remake (converted weights) there; the
    #: default root is the data folder's own
    shared: bool = True
    #: ``[artifacts] cache_max_gb``: the cache's cap in GB (``inf``: none);
    #: ``None``: :data:`DEFAULT_CACHE_SHARE` of what its disk could give it
    cache_max_gb: float | None = None

    @property
    def local(self) -> bool:
        """Whether the root is a local folder, read in place (no cache)."""
        return not is_url(self.root)

    @property
    def read_only(self) -> bool:
        """Whether the root can only be read (``http://``, ``https://``: a mirror)."""
        return self.root.split("://", 1)[0].lower() in ("http", "https")

    @property
    def local_root(self) -> Path | None:
        """The root as a resolved local folder; ``None`` for a URL root."""
        return Path(self.root).resolve() if self.local else None

    def _fs(self) -> tuple[Any, str]:
        # imported here: fsspec takes ~0.1 s to import, and only a URL root
        # needs it (every CLI command builds the source policy)
        import fsspec

        try:
            fs, path = fsspec.core.url_to_fs(self.root, **dict(self.storage_options))
        except (ImportError, ValueError) as exc:
            raise LlmosError(
                f"[artifacts] root {self.root!r}: fsspec cannot open it ({exc}); install the"
                " filesystem's package (s3fs for s3://, gcsfs for gs://, …)"
            ) from None
        return fs, str(path).rstrip("/")

    @contextlib.contextmanager
    def _reaching(self, what: str) -> Iterator[None]:
        """The store failing under us (a network error, an outage, refused
        credentials: whatever the filesystem's package raises) as a 503 that
        names the root; llmos's own refusals pass as they are."""
        try:
            yield
        except LlmosError:
            raise
        except Exception as exc:
            raise Unavailable(
                f"{what}: the artifact store at {self.root} failed ({type(exc).__name__}:"
                f" {str(exc)[:300]}); retry, or check [artifacts] root and storage_options"
            ) from exc

    # -- addresses ------------------------------------------------------------

    def owns(self, source: str) -> bool:
        """Whether ``source`` is a URL inside a URL root (a local root's
        artifacts are plain paths, checked like any other)."""
        return not self.local and source.startswith(self.root + "/")

    def _locate(self, source: str) -> Located:
        """``source`` taken apart: ROOT/<name>/<digest>[/inner]; a refusal otherwise."""
        if self.local:
            base = self.local_root
            assert base is not None
            try:
                rest = Path(source).resolve().relative_to(base).as_posix()
            except ValueError:
                raise self._outside(source) from None
        elif self.owns(source):
            rest = urllib.parse.unquote(source[len(self.root) + 1 :])
        else:
            raise self._outside(source)
        parts = rest.split("/")
        for at in (1, 2):  # a name is `model` or `vendor/model`
            if len(parts) > at and _DIGEST.match(parts[at]):
                name, inner = "/".join(parts[:at]), "/".join(parts[at + 1 :])
                if not _valid_name(name) or (inner and not _safe_member(inner)):
                    break
                _, path = self._fs() if not self.local else (None, self.root)
                return Located(f"{path}/{name}/{parts[at]}", parts[at], inner)
        raise UnsafeSourceError(
            f"source {source[:200]!r} refused: inside the artifact root it must be"
            f" {self.root}/<model name>/<sha256>[/<file>]",
            param="source",
        )

    def _outside(self, source: str) -> UnsafeSourceError:
        return UnsafeSourceError(
            f"source {source[:200]!r} refused: it is not inside [artifacts] root ({self.root})",
            param="source",
        )

    def address(self, name: str, digest: str) -> str:
        """The address an artifact of ``name`` with manifest hash ``digest`` has."""
        return f"{self.root}/{name}/{digest}"

    # -- put ------------------------------------------------------------------

    def put(self, folder: Path, name: str, *, key: str | None = None) -> str:
        """Store the folder of weights at ``folder`` as an artifact of model
        ``name`` and return its address (a path for a local root, a URL
        otherwise). ``key`` (``gguf-<sha256>``) also files the address under
        that key, for :meth:`lookup`: what another daemon would otherwise
        make again (converted weights) is found by what it was made from.

        The folder gets the checks a push gets (links, names, size, pickles,
        headers: :func:`~llmos.registry.artifacts.store_upload`) while it is
        copied into a staging folder; the manifest is made from that copy, so
        what is stored is what was checked. Storing the same files again
        returns the same address and writes nothing. With a URL root the
        staged copy becomes the local cache's, so this daemon does not fetch
        what it has just put.
        """
        validate_model_name(name)
        _check_key(key)
        if self.read_only:
            raise UsageError(
                f"[artifacts] root {self.root!r} is read-only (an HTTP mirror); tuned models"
                " and converted weights are stored by a daemon whose root is the store itself"
            )
        staging_parent = self._staging_parent(name)
        staging_parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=".put-", dir=staging_parent))
        try:
            staged = scratch / "files"
            store_upload(Path(folder), staged, self.limits)
            manifest = _manifest_of(staged, name)
            data = manifest.to_bytes()
            digest = hashlib.sha256(data).hexdigest()
            (staged / MANIFEST).write_bytes(data)
            if self.local:
                final = Path(self.root) / name / digest
            else:
                with self._reaching(f"storing an artifact of {name!r}"):
                    self._upload(staged, name, digest, data)
                final = self.cache / digest
            _settle(staged, final)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        if not self.local:  # the staged copy is now the cache's
            _touch(final)
            self._prune_quietly()
        address = str(final) if self.local else self.address(name, digest)
        if key is not None:
            with self._reaching(f"filing {address!r} under the key {key!r}"):
                self._write_key(key, f"{name}/{digest}")
        log.info("artifact.put", model=name, address=address, bytes=manifest.total, key=key)
        return address

    # -- keys -----------------------------------------------------------------

    def lookup(self, key: str) -> str | None:
        """The address :meth:`put` filed under ``key``, if that artifact is
        (still) complete in the store. The address's digest is checked when
        it is fetched, so a key can only lead to an artifact of the store."""
        _check_key(key)
        try:
            if self.local:
                pointer = Path(self.root) / KEYS / key
                text = pointer.read_bytes()[:512] if pointer.is_file() else None
            else:
                fs, path = self._fs()
                remote = f"{path}/{KEYS}/{key}"
                try:
                    text = _read_capped(fs, remote)
                except FileNotFoundError as exc:
                    if not _missing(exc):
                        raise
                    text = None
        except Exception as exc:  # whatever the filesystem raises: the caller makes it anew
            log.warning("artifact.key_unreadable", key=key, error=f"{type(exc).__name__}: {exc}")
            return None
        if not text:
            return None
        relative = text.decode("utf-8", "replace").strip()
        address = str(Path(self.root) / relative) if self.local else f"{self.root}/{relative}"
        try:
            located = self._locate(address)
        except UnsafeSourceError:
            log.warning("artifact.key_invalid", key=key, address=address[:200])
            return None
        try:
            complete = not located.inner and self.exists(address)
        except Unavailable as exc:
            log.warning("artifact.key_unreadable", key=key, error=exc.message)
            return None
        return address if complete else None

    def _write_key(self, key: str, relative: str) -> None:
        data = relative.encode()
        if self.local:
            pointer = Path(self.root) / KEYS / key
            pointer.parent.mkdir(parents=True, exist_ok=True)
            temp = pointer.with_name(f".{key}.{os.getpid()}.partial")
            temp.write_bytes(data)
            os.replace(temp, pointer)
            return
        fs, path = self._fs()
        fs.makedirs(f"{path}/{KEYS}", exist_ok=True)
        with fs.open(f"{path}/{KEYS}/{key}", "wb") as out:
            out.write(data)

    def _staging_parent(self, name: str) -> Path:
        # beside where it ends up, so that the last step is a rename
        return Path(self.root) / name if self.local else self.cache

    def _upload(self, staged: Path, name: str, digest: str, data: bytes) -> None:
        fs, path = self._fs()
        folder = f"{path}/{name}/{digest}"
        try:
            if (
                fs.exists(f"{folder}/{MANIFEST}")
                and _read_capped(fs, f"{folder}/{MANIFEST}") == data
            ):
                return  # the same files are there already
            for file in sorted(p for p in staged.rglob("*") if p.is_file() and p.name != MANIFEST):
                remote = f"{folder}/{file.relative_to(staged).as_posix()}"
                fs.makedirs(remote.rsplit("/", 1)[0], exist_ok=True)
                fs.put_file(str(file), remote)
            # the manifest last: an artifact whose manifest is there is complete
            with fs.open(f"{folder}/{MANIFEST}", "wb") as out:
                out.write(data)
        except NotImplementedError:
            raise UsageError(
                f"[artifacts] root {self.root!r} is read-only here (its filesystem cannot"
                " write); point this daemon's root at the store itself"
            ) from None

    # -- fetch ----------------------------------------------------------------

    def fetch(self, source: str) -> Path:
        """The local, verified folder (or file inside it) of the artifact at ``source``.

        A local root's artifact is verified in place. A URL root's is taken
        from the cache when a copy there still matches every hash, else copied
        into the cache with the checks of a push (see the module docstring).
        """
        where = self._locate(source)
        if self.local:
            folder = Path(where.folder)
            problem = _verify(folder, where.digest)
            if problem is not None:
                raise UnsafeSourceError(
                    f"artifact {source[:200]!r}: {problem}; it changed after it was stored",
                    param="source",
                )
        else:
            folder = self.cache / where.digest
            # its last use, before it is verified: a prune running meanwhile keeps it
            _touch(folder)
            problem = _verify(folder, where.digest) if folder.exists() else "not cached"
            if problem is not None:
                if folder.exists():
                    log.warning("artifact.cache_invalid", address=source, problem=problem)
                    shutil.rmtree(folder, ignore_errors=True)
                with self._reaching(f"fetching {source[:200]!r}"):
                    self._download(source, where, folder)
                _touch(folder)
                self._prune_quietly()
        target = folder.joinpath(*where.inner.split("/")) if where.inner else folder
        if not target.exists():
            raise NotFoundError(
                f"artifact {source[:200]!r}: it holds no {where.inner!r}", param="source"
            )
        return target

    def _download(self, source: str, where: Located, dest: Path) -> None:
        fs, _ = self._fs()
        shown = source[:200]
        # read, not fs.exists: some filesystems (HTTP) answer False for an outage
        try:
            data = _read_capped(fs, f"{where.folder}/{MANIFEST}")
        except FileNotFoundError as exc:
            if not _missing(exc):
                raise
            raise NotFoundError(
                f"artifact {shown!r} is not in the store (no {MANIFEST}); was it deleted,"
                " or is this daemon's [artifacts] root another store?",
                param="source",
            ) from None
        if data is None:
            raise UnsafeSourceError(
                f"artifact {shown!r}: its manifest is over {MAX_MANIFEST_BYTES} bytes",
                param="source",
            )
        if hashlib.sha256(data).hexdigest() != where.digest:
            raise UnsafeSourceError(
                f"artifact {shown!r}: its manifest does not match the address's sha256 (it was"
                " changed after it was stored); nothing was fetched",
                param="source",
            )
        manifest = Manifest.parse(data, shown)
        if manifest.total > self.limits.max_push_bytes:
            raise PayloadTooLarge(
                f"artifact {shown!r}: holds {manifest.total} bytes, over [registry]"
                f" max_push_bytes = {self.limits.max_push_bytes}; nothing was fetched",
                param="source",
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        scratch = Path(tempfile.mkdtemp(prefix=f".{where.digest[:16]}.", dir=dest.parent))
        try:
            staged = scratch / "files"
            staged.mkdir()
            for entry in manifest.files:
                self._download_file(fs, where.folder, entry, staged, shown)
            (staged / MANIFEST).write_bytes(data)
            # the checks a push gets: links, names, size, pickles, headers
            check_folder(staged, self.limits, label=shown)
            _settle(staged, dest)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        log.info("artifact.fetched", address=source, bytes=manifest.total, cache=str(dest))

    def _download_file(
        self, fs: Any, folder: str, entry: ManifestEntry, staged: Path, shown: str
    ) -> None:
        remote = f"{folder}/{entry.name}"
        try:
            info = fs.info(remote)
        except FileNotFoundError as exc:
            if not _missing(exc):
                raise
            raise UnsafeSourceError(
                f"artifact {shown!r}: {entry.name!r} is listed but missing", param="source"
            ) from None
        if info.get("islink") or info.get("type") != "file":
            raise UnsafeSourceError(
                f"artifact {shown!r}: member {entry.name!r} is not a regular file (a link or a"
                " folder); nothing was fetched",
                param="source",
            )
        target = staged.joinpath(*entry.name.split("/"))
        target.parent.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256()
        written = 0
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        with fs.open(remote, "rb") as stream, os.fdopen(os.open(target, flags, 0o644), "wb") as out:
            while chunk := stream.read(_CHUNK):
                written += len(chunk)
                if written > entry.size:
                    raise UnsafeSourceError(
                        f"artifact {shown!r}: member {entry.name!r} holds more than the"
                        f" {entry.size} bytes its manifest declares; nothing was fetched",
                        param="source",
                    )
                digest.update(chunk)
                out.write(chunk)
        if written != entry.size or digest.hexdigest() != entry.sha256:
            raise UnsafeSourceError(
                f"artifact {shown!r}: member {entry.name!r} does not match its manifest's size"
                " and sha256 (changed after it was stored); nothing was fetched",
                param="source",
            )

    # -- the cache ------------------------------------------------------------

    def cache_cap(self) -> int | None:
        """The cache's cap in bytes (``None``: no cap): ``[artifacts]
        cache_max_gb``, or :data:`DEFAULT_CACHE_SHARE` of the cache's bytes
        plus its disk's free space."""
        if self.cache_max_gb is not None:
            return None if self.cache_max_gb == float("inf") else int(self.cache_max_gb * GB)
        return self._default_cap(sum(size for _, _, size in _scan(self.cache)))

    def _default_cap(self, held: int) -> int:
        free = shutil.disk_usage(_existing(self.cache)).free
        return int((held + free) * DEFAULT_CACHE_SHARE)

    def cache_listing(self) -> CacheListing:
        """What the cache holds, least recently used first, with its cap."""
        self._check_cache_apart()
        entries = _entries(self.cache)
        held = sum(entry.bytes for entry in entries)
        return CacheListing(
            cache=self.cache,
            cap_bytes=self.cache_cap()
            if self.cache_max_gb is not None
            else self._default_cap(held),
            configured=self.cache_max_gb is not None,
            entries=tuple(attrs.evolve(entry, in_use=_in_use(entry.path)) for entry in entries),
        )

    def prune(
        self, max_gb: float | None = None, *, dry_run: bool = False, now: float | None = None
    ) -> PruneReport:
        """Remove the least recently used cache entries until the cache holds
        at most ``max_gb`` GB (``inf``: no cap; default: :meth:`cache_cap`),
        keeping entries in use (pinned by a loaded model, here or in another
        process) and entries used in the last :data:`RECENT_S` seconds. ``dry_run`` says what would
        go and removes nothing. Only ``CACHE/<sha256>/`` folders are touched."""
        self._check_cache_apart()
        now = time.time() if now is None else now
        scanned = _scan(self.cache)
        before = total = sum(size for _, _, size in scanned)
        if max_gb is not None:
            cap = None if max_gb == float("inf") else int(max_gb * GB)
        elif self.cache_max_gb is not None:
            cap = self.cache_cap()
        else:
            cap = self._default_cap(total)
        removed: list[CacheEntry] = []
        in_use: list[CacheEntry] = []
        recent: list[CacheEntry] = []
        for used, digest, size in scanned:
            if cap is None or total <= cap:
                break
            entry = CacheEntry(digest, self.cache / digest, size, used)
            if now - entry.last_used < RECENT_S:
                recent.append(entry)
            elif not _remove_entry(self.cache, entry, dry_run=dry_run):
                in_use.append(attrs.evolve(entry, in_use=True))
            else:
                removed.append(entry)
                total -= entry.bytes
        report = PruneReport(
            cache=self.cache,
            cap_bytes=cap,
            before_bytes=before,
            after_bytes=total,
            removed=tuple(removed),
            kept_in_use=tuple(in_use),
            kept_recent=tuple(recent),
            dry_run=dry_run,
        )
        if removed and not dry_run:
            log.info(
                "artifact.cache_pruned",
                cache=str(self.cache),
                removed=len(removed),
                freed=before - total,
                bytes=total,
                cap=cap,
            )
        if cap is not None and total > cap:
            log.warning(
                "artifact.cache_over_cap",
                cache=str(self.cache),
                bytes=total,
                cap=cap,
                in_use=len(in_use),
                recent=len(recent),
            )
        return report

    def _prune_quietly(self) -> None:
        """The prune after a fetch or a put: a cache that cannot be pruned is
        logged, never a failed fetch."""
        if self.cache_max_gb == float("inf"):
            return
        try:
            self.prune()
        except (OSError, LlmosError) as exc:
            log.warning("artifact.cache_prune_failed", cache=str(self.cache), error=str(exc))

    def _check_cache_apart(self) -> None:
        """Refuse a cache that is the root, or lies inside or around it (a
        local or ``file://`` root): pruning it would remove the store's own
        artifacts, of which the cache is only a copy."""
        root = self._root_folder()
        if root is None:
            return
        cache = self.cache.resolve()
        if cache.is_relative_to(root) or root.is_relative_to(cache):
            raise ConfigError(
                f"[artifacts] cache {str(self.cache)!r} overlaps [artifacts] root {self.root!r};"
                " the cache is a copy that llmos prunes: give it a folder of its own"
            )

    def _root_folder(self) -> Path | None:
        """The root as a local folder: a folder root's, or a ``file://`` URL's path."""
        if self.local:
            return self.local_root
        if self.root.split("://", 1)[0].lower() == "file":
            return Path(urllib.parse.unquote(urllib.parse.urlsplit(self.root).path)).resolve()
        return None

    def pin(self, path: Path | None) -> Pin | None:
        """A hold on the cache entry ``path`` lies in (a model is loaded from
        it), so that no prune removes it until :meth:`Pin.close`; ``None``
        when ``path`` is not in the cache."""
        if path is None or self.local:
            return None
        try:
            relative = Path(path).resolve().relative_to(self.cache.resolve())
        except (ValueError, OSError):
            return None
        if not relative.parts or not _DIGEST.match(relative.parts[0]):
            return None
        return Pin(self.cache / relative.parts[0])

    # -- exists, delete -------------------------------------------------------

    def exists(self, source: str) -> bool:
        """Whether the artifact at ``source`` is complete in the store."""
        where = self._locate(source)
        if self.local:
            return (Path(where.folder) / MANIFEST).is_file()
        fs, _ = self._fs()
        with self._reaching(f"looking for {source[:200]!r}"):
            try:
                fs.info(f"{where.folder}/{MANIFEST}")  # not fs.exists, which hides outages
            except FileNotFoundError as exc:
                if not _missing(exc):
                    raise
                return False
            return True

    def delete(self, source: str) -> None:
        """Remove the artifact at ``source`` from the store and the local cache.
        Cards that name it fail to load afterwards (with a message saying so)."""
        where = self._locate(source)
        if where.inner:
            raise UsageError(
                f"delete the artifact itself ({source.rsplit('/' + where.inner, 1)[0]}),"
                " not a file inside it",
                param="source",
            )
        if self.local:
            shutil.rmtree(where.folder, ignore_errors=True)
        else:
            fs, _ = self._fs()
            with (
                self._reaching(f"deleting {source[:200]!r}"),
                contextlib.suppress(FileNotFoundError),
            ):
                # the manifest first: a half-deleted artifact is not complete
                fs.rm(f"{where.folder}/{MANIFEST}")
                fs.rm(where.folder, recursive=True)
            shutil.rmtree(self.cache / where.digest, ignore_errors=True)
        log.info("artifact.deleted", address=source)


def store_of(policy: SourcePolicy, home: Path) -> ArtifactStore:
    """Where made models go: the ``[artifacts]`` store the policy carries, or
    the data folder's ``artifacts/`` (with its cache beside it)."""
    if policy.artifacts is not None:
        return policy.artifacts
    return ArtifactStore(home / "artifacts", home / "cache" / "artifacts", policy)


def _missing(exc: FileNotFoundError) -> bool:
    """Whether ``exc`` means the file is not there, rather than an outage
    dressed as one: fsspec's HTTP filesystem raises FileNotFoundError for a
    refused connection too, chained to the real cause (a 404 is one)."""
    cause = exc.__cause__
    while isinstance(cause, FileNotFoundError):
        cause = cause.__cause__
    return cause is None or getattr(cause, "status", None) == 404


def _check_key(key: str | None) -> None:
    if key is not None and not _KEY.match(key):
        raise UsageError(
            f"artifact key {str(key)[:200]!r}: use lowercase letters, digits, '.', '_' and '-'"
            " (at most 128)"
        )


def _valid_name(name: str) -> bool:
    try:
        validate_model_name(name)
    except UsageError:
        return False
    return True


def _read_capped(fs: Any, path: str) -> bytes | None:
    """The file's bytes, or ``None`` when it is over :data:`MAX_MANIFEST_BYTES`."""
    with fs.open(path, "rb") as file:
        data = file.read(MAX_MANIFEST_BYTES + 1)
    return None if len(data) > MAX_MANIFEST_BYTES else data


def _verify(folder: Path, digest: str) -> str | None:
    """Why the artifact folder at ``folder`` is not the one ``digest`` names, or ``None``."""
    manifest_path = folder / MANIFEST
    if folder.is_symlink() or not manifest_path.is_file() or manifest_path.is_symlink():
        return f"{folder} has no {MANIFEST}"
    data = manifest_path.read_bytes()
    if hashlib.sha256(data).hexdigest() != digest:
        return "its manifest does not match its sha256"
    try:
        manifest = Manifest.parse(data, str(folder))
    except UnsafeSourceError as exc:
        return exc.message
    expected = {entry.name: entry for entry in manifest.files}
    found = set()
    for path in _walk(folder):
        name = path.relative_to(folder).as_posix()
        if name == MANIFEST:
            continue
        entry = expected.get(name)
        if path.is_symlink() or entry is None:
            return f"{name!r} is not in its manifest"
        if path.stat().st_size != entry.size or _sha256_file(path) != entry.sha256:
            return f"{name!r} does not match its manifest's sha256"
        found.add(name)
    missing = sorted(set(expected) - found)
    return f"{missing[0]!r} is missing" if missing else None


def _walk(folder: Path) -> Iterator[Path]:
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        path = Path(entry.path)
        if entry.is_dir(follow_symlinks=False):
            yield from _walk(path)
        else:
            yield path


def _settle(staged: Path, final: Path) -> None:
    """Rename the checked ``staged`` folder to ``final``, unless a complete
    copy (another put or fetch of the same artifact) got there first."""
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(staged, final)
    except OSError:
        if not (final / MANIFEST).is_file():
            raise
    else:
        return
    log.info("artifact.already_there", folder=str(final))


# -- the cache's entries --------------------------------------------------------


@attrs.frozen
class CacheEntry:
    """One fetched artifact in the local cache: ``CACHE/<sha256>/``."""

    digest: str
    path: Path
    bytes: int
    #: when it was last fetched or found in the cache (its folder's mtime), epoch seconds
    last_used: float
    #: whether a loaded model holds it (set by listings and by a prune that skipped it)
    in_use: bool = False

    def to_dict(self) -> dict[str, Any]:
        return {
            "digest": self.digest,
            "path": str(self.path),
            "bytes": self.bytes,
            "last_used": _iso(self.last_used),
            "in_use": self.in_use,
        }


@attrs.frozen
class CacheListing:
    """What ``llmos artifacts cache`` shows."""

    cache: Path
    #: the cap in bytes, ``None`` for none
    cap_bytes: int | None
    #: whether ``[artifacts] cache_max_gb`` set the cap (else it is the default share)
    configured: bool
    #: least recently used first
    entries: tuple[CacheEntry, ...]

    @property
    def bytes(self) -> int:
        return sum(entry.bytes for entry in self.entries)

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": str(self.cache),
            "cap_bytes": self.cap_bytes,
            "cap_from": "cache_max_gb" if self.configured else "default",
            "bytes": self.bytes,
            "entries": [entry.to_dict() for entry in self.entries],
        }


@attrs.frozen
class PruneReport:
    """What a prune removed (or, with ``dry_run``, would remove) and what it kept."""

    cache: Path
    cap_bytes: int | None
    before_bytes: int
    after_bytes: int
    #: least recently used first
    removed: tuple[CacheEntry, ...]
    #: past the cap but pinned by a loaded model
    kept_in_use: tuple[CacheEntry, ...]
    #: past the cap but used in the last :data:`RECENT_S` seconds
    kept_recent: tuple[CacheEntry, ...]
    dry_run: bool

    def to_dict(self) -> dict[str, Any]:
        return {
            "cache": str(self.cache),
            "cap_bytes": self.cap_bytes,
            "before_bytes": self.before_bytes,
            "after_bytes": self.after_bytes,
            "dry_run": self.dry_run,
            "removed": [entry.to_dict() for entry in self.removed],
            "kept_in_use": [entry.to_dict() for entry in self.kept_in_use],
            "kept_recent": [entry.to_dict() for entry in self.kept_recent],
        }


#: this process's pins, by entry folder: seen where ``flock`` is missing, and
#: checked before asking the lock
_PINNED: collections.Counter[str] = collections.Counter()
_PINNED_LOCK = threading.Lock()
#: each entry's bytes, by digest: an entry is content-addressed, so its size
#: never changes, and a prune after each fetch does not read every manifest again
_SIZES: dict[str, int] = {}


class Pin:
    """A hold on a cache entry while a model loaded from it is served: a
    shared ``flock`` on its manifest (which another process's prune asks for
    exclusively, without waiting) and a count in this process.
    :meth:`close` lets it go; so does the process ending."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._file: Any = None
        with _PINNED_LOCK:
            _PINNED[str(folder)] += 1
        if fcntl is not None:
            try:
                self._file = (folder / MANIFEST).open("rb")
                fcntl.flock(self._file.fileno(), fcntl.LOCK_SH)
            except OSError:  # gone already: the load that wants it fails on its own
                if self._file is not None:
                    self._file.close()
                self._file = None
        self._open = True

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        if self._file is not None:
            self._file.close()  # the lock goes with it
        with _PINNED_LOCK:
            _PINNED[str(self.folder)] -= 1
            if _PINNED[str(self.folder)] <= 0:
                del _PINNED[str(self.folder)]

    def __repr__(self) -> str:
        return f"Pin({str(self.folder)!r})"


def _entries(cache: Path) -> list[CacheEntry]:
    """The cache's entries (see :func:`_scan`)."""
    return [CacheEntry(digest, cache / digest, size, used) for used, digest, size in _scan(cache)]


def _scan(cache: Path) -> list[tuple[float, str, int]]:
    """The cache's entries as (last use, digest, bytes), least recently used
    first: real folders named by a sha256, directly in it (scratch folders,
    links and anything else are not entries). Plain tuples: this runs after
    every fetch, over every entry."""
    try:
        listed = os.scandir(cache)
    except FileNotFoundError:
        return []
    out = []
    with listed:
        for item in listed:
            if not _DIGEST.match(item.name) or not item.is_dir(follow_symlinks=False):
                continue
            try:
                used = item.stat(follow_symlinks=False).st_mtime
            except FileNotFoundError:  # pruned or refetched meanwhile
                continue
            size = _SIZES.get(item.name)
            if size is None:
                size = _entry_size(Path(item.path), item.name)
            out.append((used, item.name, size))
    out.sort()
    return out


def _entry_size(folder: Path, digest: str) -> int:
    """An entry's bytes: its manifest's total, remembered by digest; an
    entry whose manifest is not the one its name says is walked."""
    known = _SIZES.get(digest)
    if known is not None:
        return known
    try:
        data = (folder / MANIFEST).read_bytes()[: MAX_MANIFEST_BYTES + 1]
        if hashlib.sha256(data).hexdigest() == digest:
            size = Manifest.parse(data, str(folder)).total + len(data)
            _SIZES[digest] = size
            return size
    except (OSError, UnsafeSourceError):
        pass
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            with contextlib.suppress(OSError):
                total += os.lstat(os.path.join(root, name)).st_size
    return total


def _in_use(folder: Path) -> bool:
    """Whether a model loaded from ``folder`` holds it, in this process or another."""
    with _PINNED_LOCK:
        if _PINNED.get(str(folder)):
            return True
    if fcntl is None:
        return False
    try:
        with (folder / MANIFEST).open("rb") as file:
            try:
                fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
    except OSError:
        return False
    return False


def _remove_entry(cache: Path, entry: CacheEntry, *, dry_run: bool) -> bool:
    """Remove ``entry`` (renamed out of the way under an exclusive lock, then
    deleted), unless it is in use; whether it went (or, dry, would go)."""
    with _PINNED_LOCK:
        if _PINNED.get(str(entry.path)):
            return False
    with contextlib.ExitStack() as stack:
        if fcntl is not None:
            try:
                file = stack.enter_context((entry.path / MANIFEST).open("rb"))
            except OSError:
                file = None  # no manifest: a broken entry nothing can load
            if file is not None:
                try:
                    fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    return False
        if dry_run:
            return True
        try:
            if entry.path.stat().st_mtime != entry.last_used:
                return False  # used since it was listed: the next prune decides
            doomed = Path(tempfile.mkdtemp(prefix=f".prune-{entry.digest[:16]}.", dir=cache))
            os.rename(entry.path, doomed / "entry")
        except FileNotFoundError:
            return True  # removed meanwhile (a delete, another prune)
    shutil.rmtree(doomed, ignore_errors=True)
    return True


def _touch(folder: Path) -> None:
    """Mark a cache entry used now (its folder's mtime)."""
    with contextlib.suppress(FileNotFoundError):
        os.utime(folder)


def _existing(path: Path) -> Path:
    """``path`` or its nearest folder that exists (for the disk it is on)."""
    for candidate in (path, *path.parents):
        if candidate.exists():
            return candidate
    return path


def _iso(epoch: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(epoch))
