"""Tests of `llmos models push` checks: what an upload may hold, and how it is stored.

Every attack must be refused with nothing written: the destination does not
exist afterwards, and neither do the folders made for it.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import json
import os
import pickle
import random
import stat
import struct
import sys
import tarfile
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from llmos.errors import PayloadTooLarge, UnsafeSourceError, UsageError
from llmos.registry import artifacts
from llmos.registry.artifacts import RATIO_FLOOR, artifact_dir, store_upload
from llmos.registry.sources import SourcePolicy
from llmos.registry.weights import read_safetensors_header, safetensors_parameter_count


def safetensors_bytes(header: dict[str, Any], data: bytes, *, length: int | None = None) -> bytes:
    """A safetensors file from a raw header; ``length`` overrides the header length."""
    raw = json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if length is None else length) + raw + data


def tensor(dtype: str, shape: list[int], start: int, end: int) -> dict[str, Any]:
    return {"dtype": dtype, "shape": shape, "data_offsets": [start, end]}


GOOD_SAFETENSORS = safetensors_bytes(
    {
        "__metadata__": {"format": "pt"},
        "w": tensor("F32", [2, 3], 0, 24),
        "b": tensor("BF16", [4], 24, 32),
        "n": tensor("F4", [4], 32, 34),
    },
    bytes(range(34)),
)


@pytest.fixture
def home(tmp_path: Path) -> Path:
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


@pytest.fixture
def dest(home: Path) -> Path:
    return artifact_dir(home, "vendor/model")


@pytest.fixture
def policy(home: Path) -> SourcePolicy:
    return SourcePolicy(allowed_roots=(home,))


def model_files() -> dict[str, bytes]:
    return {
        "config.json": b'{"architectures": ["LlamaForCausalLM"]}',
        "model.safetensors": GOOD_SAFETENSORS,
        "tokenizer/tokenizer.json": b'{"version": "1.0"}',
    }


def write_folder(folder: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(data)
    return folder


def stored(dest: Path) -> dict[str, bytes]:
    return {p.relative_to(dest).as_posix(): p.read_bytes() for p in dest.rglob("*") if p.is_file()}


def assert_nothing_written(home: Path, dest: Path) -> None:
    assert not dest.exists()
    assert list(home.iterdir()) == []  # not even home/artifacts, nor a temp folder


# ------------------------------------------------------------------ good pushes


def test_folder_is_stored_and_files_match(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy
) -> None:
    src = write_folder(tmp_path / "my-model", model_files())
    paths = store_upload(src, dest, policy)
    assert dest.parent == home / "artifacts" / "vendor" / "model"
    assert paths == sorted(dest / name for name in model_files())
    assert stored(dest) == model_files()
    assert [p.name for p in dest.parent.iterdir()] == [dest.name]  # no temp folder left


@pytest.mark.parametrize("top", ["my-model/", "./", ""])
def test_tar_gz_is_stored_and_files_match(
    tmp_path: Path, dest: Path, policy: SourcePolicy, top: str
) -> None:
    archive = tmp_path / "m.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        for name, data in model_files().items():
            info = tarfile.TarInfo(top + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    assert store_upload(archive, dest, policy) == sorted(dest / n for n in model_files())
    assert stored(dest) == model_files()  # one common top folder is dropped


def test_zip_is_stored_and_files_match(tmp_path: Path, dest: Path, policy: SourcePolicy) -> None:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("my-model/", b"")
        for name, data in model_files().items():
            zf.writestr(f"my-model/{name}", data)
    store_upload(archive, dest, policy)
    assert stored(dest) == model_files()


def test_single_weights_file(tmp_path: Path, dest: Path, policy: SourcePolicy) -> None:
    src = tmp_path / "tiny.safetensors"
    src.write_bytes(GOOD_SAFETENSORS)
    assert store_upload(src, dest, policy) == [dest / "tiny.safetensors"]
    assert stored(dest) == {"tiny.safetensors": GOOD_SAFETENSORS}


def test_existing_destination_is_never_overwritten(
    tmp_path: Path, dest: Path, policy: SourcePolicy
) -> None:
    dest.mkdir(parents=True)
    (dest / "keep").write_text("old")
    src = write_folder(tmp_path / "m", model_files())
    with pytest.raises(UsageError, match="already exists"):
        store_upload(src, dest, policy)
    assert stored(dest) == {"keep": b"old"}


def test_artifact_dir_checks_the_name_and_is_new_per_upload(home: Path) -> None:
    first, second = artifact_dir(home, "m"), artifact_dir(home, "m")
    assert first.parent == second.parent == home / "artifacts" / "m"
    assert first != second
    with pytest.raises(UsageError):
        artifact_dir(home, "../etc")


# ------------------------------------------------------------------ archive attacks


def tar_with(path: Path, *members: tarfile.TarInfo, data: bytes = b"evil") -> Path:
    with tarfile.open(path, "w") as tar:
        info = tarfile.TarInfo("config.json")
        info.size = 2
        tar.addfile(info, io.BytesIO(b"{}"))
        for member in members:
            if member.isreg():
                member.size = len(data)
                tar.addfile(member, io.BytesIO(data))
            else:
                tar.addfile(member)
    return path


def tar_member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.linkname = linkname
    return info


def zip_with(path: Path, name: str, data: bytes = b"evil", *, mode: int | None = None) -> Path:
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("config.json", b"{}")
        info = zipfile.ZipInfo(name)
        if mode is not None:
            info.create_system = 3
            info.external_attr = mode << 16
        zf.writestr(info, data)
    return path


ARCHIVE_ATTACKS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "tar dot-dot": (
        lambda d: tar_with(d / "a.tar", tar_member("../evil")),
        "member '../evil': its path contains '..'",
    ),
    "tar nested dot-dot": (
        lambda d: tar_with(d / "a.tar", tar_member("ok/../../evil")),
        "its path contains '..'",
    ),
    "tar absolute": (
        lambda d: tar_with(d / "a.tar", tar_member("/etc/x")),
        "member '/etc/x': its path is absolute",
    ),
    "tar symlink": (
        lambda d: tar_with(d / "a.tar", tar_member("link", tarfile.SYMTYPE, "/etc/passwd")),
        "member 'link': symbolic link (to '/etc/passwd')",
    ),
    "tar hardlink": (
        lambda d: tar_with(d / "a.tar", tar_member("hard", tarfile.LNKTYPE, "config.json")),
        "member 'hard': hard link",
    ),
    "tar device": (
        lambda d: tar_with(d / "a.tar", tar_member("dev", tarfile.CHRTYPE)),
        "member 'dev': device file",
    ),
    "tar fifo": (
        lambda d: tar_with(d / "a.tar", tar_member("pipe", tarfile.FIFOTYPE)),
        "member 'pipe': FIFO",
    ),
    "tar drive letter": (
        lambda d: tar_with(d / "a.tar", tar_member("C:/evil")),
        "starts with a drive letter",
    ),
    "tar backslash": (
        lambda d: tar_with(d / "a.tar", tar_member("..\\evil")),
        "contains a backslash",
    ),
    "tar duplicate": (
        lambda d: tar_with(d / "a.tar", tar_member("config.json")),
        "member 'config.json': appears twice",
    ),
    "tar file and folder": (
        lambda d: tar_with(d / "a.tar", tar_member("config.json/x")),
        "member 'config.json': is both a file and a folder",
    ),
    "zip backslash dot-dot": (
        lambda d: zip_with(d / "a.zip", "..\\evil"),
        "member '..\\\\evil': its name contains a backslash",
    ),
    "zip dot-dot": (lambda d: zip_with(d / "a.zip", "a/../../evil"), "its path contains '..'"),
    "zip absolute": (lambda d: zip_with(d / "a.zip", "/evil"), "its path is absolute"),
    "zip drive letter": (lambda d: zip_with(d / "a.zip", "c:evil"), "drive letter"),
    "zip symlink": (
        lambda d: zip_with(d / "a.zip", "link", b"/etc/passwd", mode=stat.S_IFLNK | 0o777),
        "member 'link': symbolic link",
    ),
    "zip fifo": (
        lambda d: zip_with(d / "a.zip", "pipe", b"", mode=stat.S_IFIFO | 0o644),
        "not a regular file",
    ),
}


@pytest.mark.parametrize("attack", ARCHIVE_ATTACKS)
def test_archive_attacks_are_refused_and_nothing_is_written(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy, attack: str
) -> None:
    build, reason = ARCHIVE_ATTACKS[attack]
    archive = build(tmp_path)
    with pytest.raises(UnsafeSourceError) as caught:
        store_upload(archive, dest, policy)
    assert reason in str(caught.value)
    assert str(caught.value).startswith(archive.name)
    assert "nothing was stored" in str(caught.value)
    assert_nothing_written(home, dest)
    assert not (tmp_path / "evil").exists()


def test_symlink_in_a_pushed_folder_is_refused(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy
) -> None:
    src = write_folder(tmp_path / "m", model_files())
    (src / "passwd").symlink_to("/etc/passwd")
    with pytest.raises(UnsafeSourceError, match="member 'passwd': symlink to /etc/passwd"):
        store_upload(src, dest, policy)
    assert_nothing_written(home, dest)


# ------------------------------------------------------------------ size bombs


def test_tar_over_the_size_cap_is_refused_before_unpacking(
    tmp_path: Path, home: Path, dest: Path
) -> None:
    small = SourcePolicy(allowed_roots=(home,), max_push_bytes=1000)
    archive = tar_with(tmp_path / "big.tar.gz", tar_member("blob"), data=bytes(5000))
    with pytest.raises(PayloadTooLarge, match="over \\[registry\\] max_push_bytes = 1000"):
        store_upload(archive, dest, small)
    assert_nothing_written(home, dest)


def test_folder_over_the_size_cap_is_refused(tmp_path: Path, home: Path, dest: Path) -> None:
    small = SourcePolicy(allowed_roots=(home,), max_push_bytes=100)
    src = write_folder(tmp_path / "m", model_files())
    with pytest.raises(PayloadTooLarge):
        store_upload(src, dest, small)
    assert_nothing_written(home, dest)


def test_gzip_bomb_in_a_tar_metadata_record_is_refused(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy
) -> None:
    # A pax header claiming 64 MiB: tarfile would read it into memory whole.
    header = bytearray(512)
    header[0:8] = b"PaxHdr\x00\x00"
    header[100:108] = b"0000644\x00"
    header[124:136] = f"{64 << 20:011o}\x00".encode()
    header[156:157] = b"x"
    header[257:263] = b"ustar\x00"
    header[148:156] = b" " * 8
    header[148:156] = f"{sum(header):06o}\x00 ".encode()
    archive = tmp_path / "bomb.tar.gz"
    with gzip.open(archive, "wb") as out:
        out.write(bytes(header))
        for _ in range(64):
            out.write(bytes(1 << 20))
    assert archive.stat().st_size < 1 << 20
    with pytest.raises(UnsafeSourceError, match="a tar metadata record of 67108864 bytes"):
        store_upload(archive, dest, policy)
    assert_nothing_written(home, dest)


def test_zip_with_a_suspicious_compression_ratio_is_refused(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy
) -> None:
    archive = tmp_path / "bomb.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("zeros.safetensors", bytes(8 << 20))
    with pytest.raises(UnsafeSourceError, match=r"member 'zeros.safetensors': unpacks \d+ bytes"):
        store_upload(archive, dest, policy)
    assert_nothing_written(home, dest)


def test_zip_over_the_size_cap_is_refused(tmp_path: Path, home: Path, dest: Path) -> None:
    small = SourcePolicy(allowed_roots=(home,), max_push_bytes=10)
    archive = zip_with(tmp_path / "a.zip", "blob", bytes(range(200)))
    with pytest.raises(PayloadTooLarge):
        store_upload(archive, dest, small)
    assert_nothing_written(home, dest)


def test_corrupt_archive_is_a_clean_error(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy
) -> None:
    archive = tmp_path / "m.tgz"
    archive.write_bytes(b"\x1f\x8b" + b"not really gzip" * 10)
    with pytest.raises(UsageError, match="not a valid archive"):
        store_upload(archive, dest, policy)
    assert_nothing_written(home, dest)


# ------------------------------------------------------------------ pickles


def torch_zip_checkpoint() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as zf:
        zf.writestr("archive/data.pkl", pickle.dumps({"w": 1}, protocol=2))
        zf.writestr("archive/data/0", bytes(16))
    return buffer.getvalue()


PICKLES: dict[str, tuple[str, bytes, str]] = {
    "bin": ("pytorch_model.bin", pickle.dumps({"w": [1, 2]}, protocol=4), ".bin files are pickles"),
    "pt named": ("adapter.pt", b"anything", ".pt files are pickles"),
    "magic": ("weights", pickle.dumps({"w": 1}, protocol=5), "pickle protocol 5"),
    "magic v2": ("model.data", pickle.dumps([1], protocol=2), "pickle protocol 2"),
    "torch zip": ("weights.model", torch_zip_checkpoint(), "PyTorch zip checkpoint"),
}


@pytest.mark.parametrize("case", PICKLES)
def test_pickles_are_refused_unless_allowed(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy, case: str
) -> None:
    name, data, reason = PICKLES[case]
    src = write_folder(tmp_path / "m", {**model_files(), name: data})
    with pytest.raises(UnsafeSourceError) as caught:
        store_upload(src, dest, policy)
    message = str(caught.value)
    assert f"member {name!r}: pickle weights are refused" in message
    assert reason in message
    assert "allow_pickle = true" in message
    assert_nothing_written(home, dest)

    lax = SourcePolicy(allowed_roots=(home,), allow_pickle=True)
    store_upload(src, dest, lax)
    assert stored(dest)[name] == data


def test_pickle_inside_a_tar_is_refused(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy
) -> None:
    archive = tar_with(tmp_path / "a.tgz", tar_member("weights"), data=pickle.dumps(1, protocol=3))
    with pytest.raises(UnsafeSourceError, match="member 'weights': pickle weights are refused"):
        store_upload(archive, dest, policy)
    assert_nothing_written(home, dest)


# ------------------------------------------------------------------ safetensors


BAD_SAFETENSORS: dict[str, tuple[bytes, str]] = {
    "offsets past EOF": (
        safetensors_bytes({"w": tensor("F32", [4], 0, 16)}, bytes(8)),
        "tensor 'w': data_offsets [0, 16] run past the end of the data section (8 bytes)",
    ),
    "overlapping offsets": (
        safetensors_bytes(
            {"a": tensor("F32", [2], 0, 8), "b": tensor("F32", [2], 4, 12)}, bytes(12)
        ),
        "tensor 'b': data_offsets overlap the previous tensor's",
    ),
    "gap": (
        safetensors_bytes(
            {"a": tensor("F32", [1], 0, 4), "b": tensor("F32", [1], 8, 12)}, bytes(12)
        ),
        "tensor 'b': 4 unaccounted bytes before its data",
    ),
    "trailing bytes": (
        safetensors_bytes({"a": tensor("F32", [1], 0, 4)}, bytes(100)),
        "96 bytes after the last tensor",
    ),
    "bad JSON": (struct.pack("<Q", 9) + b"{not json" + bytes(4), "header is not valid JSON"),
    "not an object": (safetensors_bytes([1, 2], b""), "header is not a JSON object"),  # type: ignore[arg-type]
    "header longer than file": (
        safetensors_bytes({"a": tensor("F32", [1], 0, 4)}, bytes(4), length=10_000),
        "header length 10000 is larger than the file",
    ),
    "huge header length": (
        safetensors_bytes({}, b"", length=2**63),
        f"header length {2**63} is over the 100000000-byte limit",
    ),
    "too short": (b"\x01\x02", "shorter than 8"),
    "unknown dtype": (
        safetensors_bytes({"a": tensor("F128", [1], 0, 16)}, bytes(16)),
        "tensor 'a': unknown dtype 'F128'",
    ),
    "shape and span disagree": (
        safetensors_bytes({"a": tensor("F32", [3], 0, 8)}, bytes(8)),
        "shape [3] of F32 needs 12 bytes but data_offsets span 8",
    ),
    "negative shape": (
        safetensors_bytes({"a": tensor("F32", [-1], 0, 4)}, bytes(4)),
        "shape must be a list of non-negative integers",
    ),
    "reversed offsets": (
        safetensors_bytes({"a": tensor("F32", [0], 4, 0)}, bytes(4)),
        "data_offsets must be [start, end]",
    ),
    "bad metadata": (
        safetensors_bytes({"__metadata__": {"n": 1}}, b""),
        "__metadata__ must map strings to strings",
    ),
}


@pytest.mark.parametrize("case", BAD_SAFETENSORS)
def test_bad_safetensors_are_refused_and_nothing_is_written(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy, case: str
) -> None:
    data, reason = BAD_SAFETENSORS[case]
    src = write_folder(tmp_path / "m", {**model_files(), "model.safetensors": data})
    with pytest.raises(UsageError) as caught:
        store_upload(src, dest, policy)
    message = str(caught.value)
    assert message.startswith("m: member 'model.safetensors': ")
    assert reason in message
    assert_nothing_written(home, dest)


def test_duplicate_keys_in_a_safetensors_header_are_refused(tmp_path: Path) -> None:
    raw = b'{"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},'
    raw += b'"a":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}'
    path = tmp_path / "dup.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + bytes(4))
    with pytest.raises(UsageError, match="key 'a' appears twice"):
        read_safetensors_header(path)


def test_safetensors_header_reading(tmp_path: Path) -> None:
    path = tmp_path / "m.safetensors"
    path.write_bytes(GOOD_SAFETENSORS)
    header = read_safetensors_header(path)
    assert [(t.name, t.dtype, t.shape) for t in header.tensors] == [
        ("w", "F32", (2, 3)),
        ("b", "BF16", (4,)),
        ("n", "F4", (4,)),
    ]
    assert header.metadata == {"format": "pt"}
    assert header.data_size == 34
    assert safetensors_parameter_count(path) == 6 + 4 + 4
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(safetensors_bytes({}, b""))
    assert safetensors_parameter_count(empty) == 0


def test_bad_gguf_in_a_push_is_refused(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy
) -> None:
    src = write_folder(tmp_path / "m", {"m.gguf": b"GGUF" + struct.pack("<IQQ", 3, 0, 1)})
    with pytest.raises(UsageError, match=r"m: member 'm\.gguf': truncated GGUF"):
        store_upload(src, dest, policy)
    assert_nothing_written(home, dest)


def test_zip_member_damaged_inside_is_a_clean_error(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy
) -> None:
    archive = tmp_path / "m.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zf:
        zf.writestr("config.json", b'{"architectures": ["X"]}')
    data = archive.read_bytes().replace(b'"X"', b'"Y"')  # the CRC no longer matches
    archive.write_bytes(data)
    with pytest.raises(UsageError, match=r"m\.zip: not a valid archive: Bad CRC-32"):
        store_upload(archive, dest, policy)
    assert_nothing_written(home, dest)


def test_a_pushed_folder_leaves_out_git_history(
    tmp_path: Path, dest: Path, policy: SourcePolicy
) -> None:
    src = write_folder(tmp_path / "clone", {**model_files(), ".git/lfs/objects/ab": b"blob"})
    store_upload(src, dest, policy)
    assert stored(dest) == model_files()


# ------------------------------------------- decompression bombs, every format
# A gzip tar that unpacked to 200 MB was written to disk before it was
# refused (issue 14): the size and ratio bounds hold for every archive format,
# from the headers before a byte is written and while unpacking.

#: every archive format a push may be, as (file name, how to write it)
FORMATS = {
    "tar": "m.tar",
    "tar.gz": "m.tar.gz",
    "tgz": "m.tgz",
    "tar.bz2": "m.tar.bz2",
    "tar.xz": "m.tar.xz",
    "zip": "m.zip",
}


def archive_of(path: Path, files: dict[str, bytes]) -> Path:
    """A real archive of ``files`` in the format ``path``'s name says, compressed."""
    name = path.name
    if name.endswith(".zip"):
        with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
            for member, data in files.items():
                zf.writestr(member, data)
        return path
    mode = {".tar": "w", ".gz": "w:gz", ".tgz": "w:gz", ".bz2": "w:bz2", ".xz": "w:xz"}
    with tarfile.open(path, mode[path.suffix]) as tar:  # type: ignore[call-overload]
        for member, data in files.items():
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


class WriteWatch:
    """Every file opened for writing and every folder made under ``under``
    while it is on, from Python's audit events (``os.open``, ``open``,
    ``os.mkdir``): how a test sees that a refusal came before any write."""

    def __init__(self) -> None:
        self.under: Path | None = None
        self.seen: list[tuple[str, str]] = []
        sys.addaudithook(self._event)

    def _event(self, event: str, args: tuple[Any, ...]) -> None:
        if self.under is None or event not in ("open", "os.mkdir"):
            return
        path = args[0]
        if not isinstance(path, str | bytes | os.PathLike):
            return
        if event == "open":
            mode, flags = args[1], args[2]
            writing = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
                isinstance(flags, int) and flags & (os.O_WRONLY | os.O_RDWR)
            )
            if not writing:
                return
        if Path(os.fsdecode(path)).is_relative_to(self.under):
            self.seen.append((event, os.fsdecode(path)))

    @contextlib.contextmanager
    def watching(self, under: Path) -> Iterator[list[tuple[str, str]]]:
        self.seen, self.under = [], under
        try:
            yield self.seen
        finally:
            self.under = None


#: one hook for the whole run: audit hooks cannot be removed
_WATCH: list[WriteWatch] = []


@pytest.fixture
def writes() -> WriteWatch:
    if not _WATCH:
        _WATCH.append(WriteWatch())
    return _WATCH[0]


def test_the_write_watch_sees_an_upload_being_written(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy, writes: WriteWatch
) -> None:
    # The check the bomb tests rely on: a push that is stored is seen writing.
    archive = archive_of(tmp_path / "m.tar.gz", model_files())
    with writes.watching(home) as seen:
        store_upload(archive, dest, policy)
    assert {event for event, _ in seen} == {"open", "os.mkdir"}
    assert sum(event == "open" for event, _ in seen) == len(model_files())


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_bomb_20_times_the_cap_is_refused_before_a_byte_is_written(
    tmp_path: Path, home: Path, dest: Path, writes: WriteWatch, fmt: str
) -> None:
    cap = 256 << 10
    small = SourcePolicy(allowed_roots=(home,), max_push_bytes=cap)
    files = {"config.json": b"{}", "model.safetensors": bytes(20 * cap)}
    archive = archive_of(tmp_path / FORMATS[fmt], files)
    with writes.watching(home) as seen, pytest.raises(PayloadTooLarge, match="max_push_bytes"):
        store_upload(archive, dest, small)
    assert seen == []  # no file opened for writing, no folder made
    assert_nothing_written(home, dest)


@pytest.mark.parametrize("fmt", [f for f in FORMATS if f != "tar"])
def test_a_bomb_under_the_cap_is_refused_for_its_ratio_before_a_byte_is_written(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy, writes: WriteWatch, fmt: str
) -> None:
    # 17 MiB of zeros packs into kilobytes: under the 20 GiB default cap, a
    # thousandfold over the ratio. Named .bin, it used to be written whole
    # before the pickle check refused it; named .safetensors, it was stored.
    size = 17 << 20
    for weights in ("model.safetensors", "pytorch_model.bin"):
        archive = archive_of(tmp_path / FORMATS[fmt], {"config.json": b"{}", weights: bytes(size)})
        assert archive.stat().st_size * 100 < size
        with writes.watching(home) as seen, pytest.raises(UnsafeSourceError) as caught:
            store_upload(archive, dest, policy)
        assert seen == []
        assert_nothing_written(home, dest)
        message = str(caught.value)
        assert f"unpacks to {size + 2} bytes from {archive.stat().st_size}, more than" in message
        assert "[registry] max_push_ratio = 100 times its size" in message
        assert "nothing was stored" in message


def test_the_ratio_bound_holds_for_a_zip_of_many_small_members(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy, writes: WriteWatch
) -> None:
    # Members under the per-member floor, 17 MiB of zeros together.
    files = {f"shard-{i:02}.safetensors": bytes(1 << 20) for i in range(17)}
    archive = archive_of(tmp_path / "m.zip", files)
    with writes.watching(home) as seen, pytest.raises(UnsafeSourceError, match="max_push_ratio"):
        store_upload(archive, dest, policy)
    assert seen == []
    assert_nothing_written(home, dest)


@pytest.mark.parametrize("fmt", FORMATS)
def test_archives_within_the_ratio_or_under_its_floor_are_stored(
    tmp_path: Path, dest: Path, policy: SourcePolicy, fmt: str
) -> None:
    # 17 MiB (over the 16 MiB floor) that packs about 50:1, and small files
    # that pack far better than 100:1 but unpack to under the floor.
    rng = random.Random(14)  # seeded: never pickle magic by chance
    blob = b"".join(rng.randbytes(1 << 10) + bytes(49 << 10) for _ in range(350))[: 17 << 20]
    files = {**model_files(), "big.dat": blob, "pad.json": bytes(1 << 20)}
    archive = archive_of(tmp_path / FORMATS[fmt], files)
    store_upload(archive, dest, policy)
    assert stored(dest) == files
    # (15 MiB of zeros; a zip's members of at most 1 MiB each are spared one by one)
    small = {"config.json": b"{}", **{f"zeros-{i}.dat": bytes(1 << 20) for i in range(15)}}
    assert sum(map(len, small.values())) < RATIO_FLOOR
    other = artifact_dir(dest.parents[3], "vendor/small")
    store_upload(archive_of(tmp_path / ("s" + FORMATS[fmt]), small), other, policy)
    assert stored(other) == small


def test_max_push_ratio_is_the_operators_to_raise(tmp_path: Path, home: Path, dest: Path) -> None:
    files = {"config.json": b"{}", "zeros.dat": bytes(17 << 20)}
    archive = archive_of(tmp_path / "m.tar.gz", files)
    with pytest.raises(UnsafeSourceError, match="max_push_ratio = 100"):
        store_upload(archive, dest, SourcePolicy(allowed_roots=(home,)))
    lenient = SourcePolicy(allowed_roots=(home,), max_push_ratio=10_000)
    store_upload(archive, dest, lenient)
    assert stored(dest) == files


def test_unpacking_counts_what_it_writes_and_stops_at_the_bound(tmp_path: Path, home: Path) -> None:
    # The headers are checked first, so no real archive reaches this bound;
    # it holds anyway, chunk by chunk, before each chunk is written: here a
    # budget of 3 MiB against an 8 MiB member.
    archive = archive_of(tmp_path / "m.tar.gz", {"w.safetensors": bytes(8 << 20)})
    cap = 3 << 20
    budget = artifacts._Budget(archive, cap, None, SourcePolicy(allowed_roots=(home,)))
    with tarfile.open(archive) as tar:
        info = tar.getmember("w.safetensors")
        member = artifacts._Member("w.safetensors", info.size, info)
        with pytest.raises(PayloadTooLarge, match=f"max_push_bytes = {cap}"):
            artifacts._write(home, member, artifacts._tar_reader(tar), archive, budget)
    assert (home / "w.safetensors").stat().st_size == cap  # never a byte past it


def test_pickles_are_refused_by_name_before_anything_is_unpacked(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy, writes: WriteWatch
) -> None:
    archive = archive_of(tmp_path / "m.tar.gz", {"config.json": b"{}", "model.pt": b"x" * 100})
    with writes.watching(home) as seen, pytest.raises(UnsafeSourceError, match=r"\.pt files"):
        store_upload(archive, dest, policy)
    assert seen == []
    assert_nothing_written(home, dest)


def test_the_issues_gzip_tar_is_refused_from_its_first_header(
    tmp_path: Path, home: Path, dest: Path, policy: SourcePolicy, writes: WriteWatch
) -> None:
    # The issue's case: ~100 KB of gzip that unpacks to 96 MiB. The header
    # pass refuses it on the member's header, before tarfile reads the stream,
    # saying which bound it passed (the ratio, not max_push_bytes).
    size = 96 << 20
    archive = archive_of(tmp_path / "bomb.tar.gz", {"model.safetensors": bytes(size)})
    with writes.watching(home) as seen, pytest.raises(UnsafeSourceError) as caught:
        store_upload(archive, dest, policy)
    assert seen == []
    assert_nothing_written(home, dest)
    assert f"unpacks to more than {size} bytes from {archive.stat().st_size}" in str(caught.value)
    assert "[registry] max_push_ratio = 100 times its size" in str(caught.value)
