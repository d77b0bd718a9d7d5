"""Storing pushed weights in the artifact store, after checking every byte of them.

``llmos models push FOLDER|ARCHIVE`` sends weights to the daemon, which
stores them under ``home/artifacts/<name>/<version>/`` with
:func:`store_upload`. What is pushed may come from anyone, so before anything
is kept:

* every archive member is checked: no absolute paths, drive letters,
  backslashes or ``..``; no symlinks, hard links, devices or FIFOs; no
  duplicate names;
* the unpacked size, for every archive format: at most ``[registry]
  max_push_bytes``, and at most ``[registry] max_push_ratio`` times the
  archive's own size (a gzip of zeros unpacks a thousandfold; archives that
  unpack to under 16 MiB are spared the ratio). Both are checked from the
  headers before a byte is written, and again while unpacking: every byte
  written is counted, and unpacking stops at the first chunk that would pass
  either bound, so the disk never holds more than the bounds allow;
  zip members are held to the ratio one by one too;
* pickle-based weights (``.bin``, ``.pt``, ``.ckpt`` ... or any file that
  starts with pickle magic or is a PyTorch zip checkpoint) are refused unless
  ``[registry] allow_pickle``: by name before anything is unpacked, by
  content after;
* ``.safetensors`` and ``.gguf`` headers must be valid
  (:mod:`llmos.registry.weights`).

Files are unpacked into a temporary folder beside the destination, which is
renamed into place only when all checks pass; on any refusal nothing is left
behind. Errors name the member and the reason.
"""

from __future__ import annotations

import bz2
import contextlib
import gzip
import lzma
import os
import re
import shutil
import stat
import tarfile
import tempfile
import uuid
import zipfile
import zlib
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO, TYPE_CHECKING, Any

import attrs
import structlog

from llmos.errors import PayloadTooLarge, UnsafeSourceError, UsageError
from llmos.registry.weights import (
    PICKLE_SUFFIXES,
    pickle_reason,
    read_gguf_header,
    read_safetensors_header,
)
from llmos.types import validate_model_name

if TYPE_CHECKING:
    # annotations only: the source checks build the artifact store, which
    # stores through this module
    from llmos.registry.sources import SourcePolicy

__all__ = [
    "ARCHIVE_SUFFIXES",
    "MAX_MEMBERS",
    "RATIO_FLOOR",
    "artifact_dir",
    "check_folder",
    "store_upload",
]

log = structlog.get_logger("llmos.registry")

ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
#: more files than this in one push is refused
MAX_MEMBERS = 100_000
#: tar metadata records (pax headers, GNU long names) larger than this are refused
_MAX_TAR_META = 1 << 20
#: zip members that unpack to more than ``max_push_ratio`` times their packed
#: size are refused when they unpack to more than this
_ZIP_RATIO_FLOOR = 1 << 20
#: archives that unpack to less than this are not held to ``max_push_ratio``
#: (a few small JSON files compress well)
RATIO_FLOOR = 16 << 20
_CHUNK = 1 << 20


def artifact_dir(home: Path, name: str) -> Path:
    """A new ``home/artifacts/<name>/<upload id>`` path (not created) for a
    valid model name. One folder per upload: the version number is only known
    once the card is registered, and a stored upload is never overwritten."""
    validate_model_name(name)
    return Path(home) / "artifacts" / name / uuid.uuid4().hex[:16]


@attrs.frozen
class _Member:
    """A file to store: its checked relative name, declared size and handle."""

    name: str
    size: int
    ref: Any  # a TarInfo, a ZipInfo or a Path
    #: its compressed size, where the archive records one per member (zip)
    packed: int | None = None


def store_upload(src: Path, dest: Path, policy: SourcePolicy) -> list[Path]:
    """Check the folder, archive or single file at ``src`` and store its files in ``dest``.

    ``src`` is a folder, a ``.tar``/``.tar.gz``/``.tgz``/``.tar.bz2``/
    ``.tar.xz``/``.zip`` archive, or one weights file (a ``.gguf``, a
    ``.safetensors``). When every file of an archive lies in one top-level
    folder, that folder is dropped, so ``tar czf m.tgz my-model/`` stores
    ``my-model``'s contents; a pushed folder's ``.git`` folders are left
    out. ``dest`` must not exist. Returns the stored
    files, sorted. Raises :class:`~llmos.errors.UnsafeSourceError` for
    anything unsafe, :class:`~llmos.errors.PayloadTooLarge` over
    ``policy.max_push_bytes``, :class:`~llmos.errors.UsageError` for anything
    malformed; in every case ``dest`` does not exist afterwards.
    """
    src, dest = Path(src), Path(dest)
    if dest.exists() or dest.is_symlink():
        raise UsageError(f"{dest} already exists; a stored version is never overwritten")
    if not src.exists():
        raise UsageError(f"nothing to push: {src} does not exist", param="source")
    with _source(src, policy) as (members, read):
        total = sum(member.size for member in members)
        _check_size(src, total, policy)
        budget = _Budget(src, policy.max_push_bytes, _ratio_limit(src, policy), policy)
        budget.check(total)
        _check_member_ratios(src, members, policy.max_push_ratio)
        _check_pickle_names(src, members, policy)
        _check_disk(dest, total)
        created = _make_parents(dest.parent)
        temp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent))
        try:
            for member in members:
                _write(temp, member, read, src, budget)
            _check_contents(temp, members, policy, src)
            if dest.exists() or dest.is_symlink():
                raise UsageError(f"{dest} appeared while the push was unpacked; not overwritten")
            os.rename(temp, dest)
        except BaseException:
            shutil.rmtree(temp, ignore_errors=True)
            for folder in reversed(created):
                with contextlib.suppress(OSError):
                    folder.rmdir()
            raise
    log.info("artifact.stored", source=str(src), dest=str(dest), files=len(members), bytes=total)
    return sorted(dest / member.name for member in members)


def check_folder(folder: Path, policy: SourcePolicy, *, label: str | None = None) -> list[Path]:
    """The checks :func:`store_upload` makes, on a folder already written
    (an artifact fetched into the cache, before it is renamed into place):
    regular files with safe names, no links, at most ``policy.max_push_bytes``,
    no pickles (by name and by content) unless ``policy.allow_pickle``, valid
    safetensors and GGUF headers. ``label`` names the folder in errors.
    Returns its files, sorted."""
    folder = Path(folder)
    shown = Path(label) if label is not None else folder
    members = _checked(shown, _folder_members(folder, shown))
    total = sum(member.size for member in members)
    _check_size(shown, total, policy)
    _check_pickle_names(shown, members, policy)
    _check_contents(folder, members, policy, shown)
    return sorted(folder / member.name for member in members)


def _refuse(src: Path, member: str | None, why: str) -> UnsafeSourceError:
    where = f"{src.name}: member {member!r}" if member is not None else src.name
    return UnsafeSourceError(f"{where}: {why}; nothing was stored", param="source")


def _check_size(src: Path, total: int, policy: SourcePolicy) -> None:
    if total > policy.max_push_bytes:
        raise PayloadTooLarge(
            f"{src.name}: unpacks to {total} bytes, over [registry] max_push_bytes ="
            f" {policy.max_push_bytes}; nothing was stored",
            param="source",
        )


def _ratio_limit(src: Path, policy: SourcePolicy) -> int | None:
    """The most an archive at ``src`` may unpack to for its size; ``None`` for
    a folder or a single file, which are their own size."""
    if src.is_dir() or not src.name.lower().endswith(ARCHIVE_SUFFIXES):
        return None
    return max(RATIO_FLOOR, policy.max_push_ratio * src.stat().st_size)


@attrs.define
class _Budget:
    """The bytes an upload may unpack to, counted as they are written.

    The headers' sizes are checked against both bounds before anything is
    unpacked (:meth:`check`); :meth:`charge` holds what is really written to
    them too, chunk by chunk and before each chunk is written, so no archive
    whose headers understate its contents (or a reader that returns more)
    puts more than the bounds on disk."""

    src: Path
    max_bytes: int
    ratio_limit: int | None
    policy: SourcePolicy
    written: int = 0

    @property
    def limit(self) -> int:
        """The fewest bytes over which one of the bounds refuses."""
        return min(self.max_bytes, self.ratio_limit or self.max_bytes)

    def check(self, total: int, *, partial: bool = False) -> None:
        """Refuse ``total`` bytes over either bound (``partial``: at least ``total``)."""
        more = "more than " if partial or self.written else ""
        if total > self.max_bytes:
            raise PayloadTooLarge(
                f"{self.src.name}: unpacks to {more}{total}"
                f" bytes, over [registry] max_push_bytes = {self.max_bytes}; nothing was stored",
                param="source",
            )
        if self.ratio_limit is not None and total > self.ratio_limit:
            packed = self.src.stat().st_size
            raise _refuse(
                self.src,
                None,
                f"unpacks to {more}{total} bytes from"
                f" {packed}, more than [registry] max_push_ratio = {self.policy.max_push_ratio}"
                " times its size (a decompression bomb?)",
            )

    def charge(self, size: int) -> None:
        """Count ``size`` more bytes about to be written; refuse past a bound."""
        self.written += size
        self.check(self.written)


def _check_member_ratios(src: Path, members: list[_Member], max_ratio: int) -> None:
    """Hold each member that records its packed size (a zip's) to the ratio."""
    for member in members:
        if (
            member.packed is not None
            and member.size > _ZIP_RATIO_FLOOR
            and (member.packed == 0 or member.size / member.packed > max_ratio)
        ):
            raise _refuse(
                src,
                member.name,
                f"unpacks {member.packed} bytes to {member.size}, more than"
                f" [registry] max_push_ratio = {max_ratio} times (a zip bomb?)",
            )


def _check_pickle_names(src: Path, members: list[_Member], policy: SourcePolicy) -> None:
    """Refuse pickles by name before anything is unpacked (their contents are
    checked once written, for pickles under another name)."""
    if policy.allow_pickle:
        return
    for member in members:
        suffix = PurePosixPath(member.name).suffix.lower()
        if suffix in PICKLE_SUFFIXES:
            raise _pickle_refusal(src, member.name, f"{suffix} files are pickles")


def _pickle_refusal(src: Path, member: str, reason: str) -> UnsafeSourceError:
    return _refuse(
        src,
        member,
        f"pickle weights are refused ({reason}): loading them runs the code they"
        " carry; convert them to safetensors, or set [registry] allow_pickle = true",
    )


def _check_disk(dest: Path, total: int) -> None:
    existing = dest.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    free = shutil.disk_usage(existing).free
    if total > free:
        raise UsageError(f"not enough disk space for {total} bytes under {existing} ({free} free)")


def _make_parents(folder: Path) -> list[Path]:
    """Create ``folder`` and its missing parents; return those created, outermost first."""
    missing = []
    while not folder.exists():
        missing.append(folder)
        folder = folder.parent
    for path in reversed(missing):
        path.mkdir(exist_ok=True)
    return list(reversed(missing))


# --------------------------------------------------------------------------
# Sources: a folder, a tar, a zip, one file
# --------------------------------------------------------------------------

_Reader = Any  # (member) -> context manager of a binary stream


#: what a damaged archive raises while it is read
_DAMAGED = (
    tarfile.TarError,
    zipfile.BadZipFile,
    gzip.BadGzipFile,
    EOFError,
    zlib.error,
    lzma.LZMAError,
)


def _damaged(src: Path, exc: BaseException) -> UsageError:
    return UsageError(f"{src.name}: not a valid archive: {exc}; nothing was stored")


@contextlib.contextmanager
def _source(src: Path, policy: SourcePolicy) -> Iterator[tuple[list[_Member], _Reader]]:
    """The checked members of ``src`` and how to read each one."""
    if src.is_symlink():
        raise _refuse(src, None, "it is a symlink; push the file or folder itself")
    if src.is_dir():
        yield _checked(src, _folder_members(src)), _open_path
        return
    lower = src.name.lower()
    if not lower.endswith(ARCHIVE_SUFFIXES):
        if not src.is_file():
            raise _refuse(src, None, "not a regular file or folder")
        yield [_Member(src.name, src.stat().st_size, src)], _open_path
        return
    with contextlib.ExitStack() as stack:
        try:
            if lower.endswith(".zip"):
                archive: Any = stack.enter_context(zipfile.ZipFile(src))
                members, read = _zip_members(src, archive), archive.open
            else:
                budget = _Budget(src, policy.max_push_bytes, _ratio_limit(src, policy), policy)
                _tar_prepass(src, budget)
                archive = stack.enter_context(tarfile.open(src, "r:*"))
                members, read = _tar_members(src, archive), _tar_reader(archive)
        except (*_DAMAGED, OSError) as exc:
            raise _damaged(src, exc) from None
        yield _checked(src, _strip_top(members)), read


def _checked(src: Path, members: list[_Member]) -> list[_Member]:
    """``members`` unless two share a name or a file is also a folder."""
    if not members:
        raise UsageError(f"{src.name}: holds no files; nothing was stored", param="source")
    if len(members) > MAX_MEMBERS:
        raise _refuse(src, None, f"{len(members)} files, more than the {MAX_MEMBERS} allowed")
    files: set[str] = set()
    folders: set[str] = set()
    for member in members:
        if member.name in files:
            raise _refuse(src, member.name, "appears twice")
        files.add(member.name)
        folders.update(str(p) for p in PurePosixPath(member.name).parents if str(p) != ".")
    clash = sorted(files & folders)
    if clash:
        raise _refuse(src, clash[0], "is both a file and a folder")
    return members


def _safe_name(src: Path, raw: str) -> str:
    """``raw`` as a relative path inside the destination, or a refusal saying why."""
    if "\x00" in raw:
        raise _refuse(src, raw, "its name contains a NUL byte")
    if any(ord(char) < 0x20 or ord(char) == 0x7F for char in raw):
        raise _refuse(src, raw, "its name contains a control character")
    if "\\" in raw:
        raise _refuse(src, raw, "its name contains a backslash (a Windows path separator)")
    if raw.startswith("/"):
        raise _refuse(src, raw, "its path is absolute")
    if re.match(r"^[A-Za-z]:", raw):
        raise _refuse(src, raw, "its path starts with a drive letter")
    parts = [part for part in raw.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise _refuse(src, raw, "its path contains '..' (it would land outside the folder)")
    return "/".join(parts)


def _strip_top(members: list[_Member]) -> list[_Member]:
    """Drop the top-level folder when every member lies inside the same one."""
    tops = {member.name.split("/", 1)[0] for member in members}
    if len(tops) != 1 or any("/" not in member.name for member in members):
        return members
    return [attrs.evolve(m, name=m.name.split("/", 1)[1]) for m in members]


@contextlib.contextmanager
def _open_path(path: Path) -> Iterator[IO[bytes]]:
    # O_NOFOLLOW: a file swapped for a symlink after the walk is not followed.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
    with os.fdopen(fd, "rb") as file:
        yield file


def _folder_members(src: Path, shown: Path | None = None) -> list[_Member]:
    """The files under ``src``; errors name it as ``shown`` when given."""
    label = shown if shown is not None else src
    members: list[_Member] = []

    def walk(folder: Path, depth: int) -> None:
        if depth > 64:
            raise _refuse(label, str(folder.relative_to(src)), "folders nested too deep")
        for entry in sorted(os.scandir(folder), key=lambda e: e.name):
            path = Path(entry.path)
            name = path.relative_to(src).as_posix()
            if entry.is_symlink():
                raise _refuse(
                    label,
                    name,
                    f"symlink to {os.readlink(path)}; push real files (copy with cp -rL)",
                )
            if entry.is_dir(follow_symlinks=False):
                if entry.name != ".git":  # a clone's history: the weights again, as LFS objects
                    walk(path, depth + 1)
            elif entry.is_file(follow_symlinks=False):
                members.append(_Member(_safe_name(label, name), entry.stat().st_size, path))
                if len(members) > MAX_MEMBERS:
                    raise _refuse(label, None, f"more than {MAX_MEMBERS} files")
            else:
                raise _refuse(label, name, "not a regular file (a device, FIFO or socket)")

    walk(src, 0)
    return members


# ------------------------------------------------------------------ tar


def _tar_members(src: Path, archive: tarfile.TarFile) -> list[_Member]:
    members: list[_Member] = []
    for info in archive:
        if len(members) >= MAX_MEMBERS:
            raise _refuse(src, None, f"more than {MAX_MEMBERS} members")
        raw = info.name
        if info.issym():
            raise _refuse(src, raw, f"symbolic link (to {info.linkname!r}); links are refused")
        if info.islnk():
            raise _refuse(src, raw, f"hard link (to {info.linkname!r}); links are refused")
        if info.ischr() or info.isblk():
            raise _refuse(src, raw, "device file")
        if info.isfifo():
            raise _refuse(src, raw, "FIFO")
        if info.issparse():
            raise _refuse(src, raw, "sparse file; archive it without --sparse")
        name = _safe_name(src, raw)
        if info.isdir():
            continue
        if not info.isreg():
            raise _refuse(src, raw, f"unsupported member type {info.type!r}")
        if not name:
            raise _refuse(src, raw, "a file without a name")
        members.append(_Member(name, info.size, info))
    return members


def _tar_reader(archive: tarfile.TarFile) -> _Reader:
    @contextlib.contextmanager
    def read(info: tarfile.TarInfo) -> Iterator[IO[bytes]]:
        stream = archive.extractfile(info)
        assert stream is not None  # regular members always have one
        with stream:
            yield stream

    return read


def _decompressed(src: Path) -> IO[bytes]:
    with src.open("rb") as file:
        magic = file.read(6)
    if magic[:2] == b"\x1f\x8b":
        return gzip.open(src, "rb")
    if magic[:3] == b"BZh":
        return bz2.open(src, "rb")
    if magic == b"\xfd7zXZ\x00":
        return lzma.open(src, "rb")
    return src.open("rb")


def _tar_number(field: bytes) -> int | None:
    if field[:1] and field[0] & 0x80:  # GNU base-256
        return int.from_bytes(field[1:], "big")
    text = field.rstrip(b"\x00 ").lstrip(b" ")
    try:
        return int(text or b"0", 8)
    except ValueError:
        return None


def _tar_prepass(src: Path, budget: _Budget) -> None:
    """Walk the tar's headers in the decompressed stream without keeping any data.

    :mod:`tarfile` reads a pax header or GNU long name into memory whole, and
    a gzip bomb can make one gigabytes long; this pass refuses those, and an
    archive whose headers declare more than the ``budget`` allows (its size
    or its ratio bound), before :mod:`tarfile` reads anything. It decompresses
    at most that many bytes plus headers.
    """
    declared = count = 0
    slack = 64 << 20  # headers and padding on top of the files themselves
    with _decompressed(src) as stream:
        while True:
            block = stream.read(512)  # damage raises; the caller reports it
            if len(block) < 512 or block == bytes(512):
                return  # the end, or a truncation tarfile will report
            count += 1
            if count > 2 * MAX_MEMBERS:
                raise _refuse(src, None, f"more than {MAX_MEMBERS} members")
            size = _tar_number(block[124:136])
            if size is None:
                return  # a malformed header: tarfile reports it
            if block[156:157] in (b"x", b"g", b"L", b"K") and size > _MAX_TAR_META:
                name = block[:100].split(b"\x00", 1)[0].decode("utf-8", "replace")
                raise _refuse(src, name, f"a tar metadata record of {size} bytes")
            declared += size
            if declared > budget.limit + slack:
                budget.check(declared, partial=True)
            remaining = -(-size // 512) * 512
            while remaining:
                chunk = stream.read(min(remaining, _CHUNK))
                if not chunk:
                    return
                remaining -= len(chunk)


# ------------------------------------------------------------------ zip


def _zip_members(src: Path, archive: zipfile.ZipFile) -> list[_Member]:
    infos = archive.infolist()
    if len(infos) > MAX_MEMBERS:
        raise _refuse(src, None, f"{len(infos)} members, more than the {MAX_MEMBERS} allowed")
    members: list[_Member] = []
    for info in infos:
        raw = info.orig_filename  # ZipInfo.filename is cut at a NUL
        if info.flag_bits & 0x1:
            raise _refuse(src, raw, "encrypted")
        mode = info.external_attr >> 16
        if info.create_system == 3 and stat.S_IFMT(mode):  # a Unix file type is recorded
            if stat.S_ISLNK(mode):
                raise _refuse(src, raw, "symbolic link; links are refused")
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise _refuse(src, raw, "not a regular file (a device, FIFO or socket)")
        name = _safe_name(src, raw)
        if info.is_dir():
            continue
        if not name:
            raise _refuse(src, raw, "a file without a name")
        if info.compress_type not in (
            zipfile.ZIP_STORED,
            zipfile.ZIP_DEFLATED,
            zipfile.ZIP_BZIP2,
            zipfile.ZIP_LZMA,
        ):
            raise _refuse(src, raw, f"unsupported compression method {info.compress_type}")
        members.append(_Member(name, info.file_size, info, info.compress_size))
    return members


# ------------------------------------------------------------------ writing


def _write(temp: Path, member: _Member, read: _Reader, src: Path, budget: _Budget) -> None:
    target = temp.joinpath(*member.name.split("/"))
    # Names are checked and nothing in temp is a link; this is the last guard.
    if not target.resolve().is_relative_to(temp.resolve()):
        raise _refuse(src, member.name, "would land outside the destination")
    target.parent.mkdir(parents=True, exist_ok=True)
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
    written = 0
    try:
        with read(member.ref) as stream, os.fdopen(os.open(target, flags, 0o644), "wb") as out:
            while chunk := stream.read(_CHUNK):
                written += len(chunk)
                if written > member.size:
                    raise _refuse(
                        src, member.name, f"holds more than the {member.size} bytes declared"
                    )
                budget.charge(len(chunk))  # before the write: the disk never holds more
                out.write(chunk)
    except _DAMAGED as exc:
        raise _damaged(src, exc) from None
    if written != member.size:
        raise _refuse(src, member.name, f"holds {written} bytes, not the {member.size} declared")


def _check_contents(temp: Path, members: list[_Member], policy: SourcePolicy, src: Path) -> None:
    for member in members:
        path = temp.joinpath(*member.name.split("/"))
        if not policy.allow_pickle:
            reason = pickle_reason(path)
            if reason is not None:
                raise _pickle_refusal(src, member.name, reason)
        suffix = path.suffix.lower()
        label = f"{src.name}: member {member.name!r}"
        try:
            if suffix == ".safetensors":
                read_safetensors_header(path, label=label)
            elif suffix == ".gguf":
                read_gguf_header(path, label=label)
        except UsageError as exc:
            raise UsageError(f"{exc}; nothing was stored", param="source") from None
