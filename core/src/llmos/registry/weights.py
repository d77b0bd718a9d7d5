"""Weight files read without the libraries that write them: safetensors and
GGUF headers, and pickle detection.

The kernel must not need ``safetensors``, ``gguf`` or torch, and a weight file
may come from anyone, so these readers trust nothing in the file: every length
is checked against the file's size and a cap before anything is read or
allocated. Both ``llmos models scan`` (:mod:`llmos.registry.scan`) and
``llmos models push`` (:mod:`llmos.registry.artifacts`) use them, so there is
one parser per format.

A malformed file raises :class:`~llmos.errors.UsageError` naming the file and
what is wrong with it.
"""

from __future__ import annotations

import enum
import json
import math
import os
import struct
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any, BinaryIO

import attrs

from llmos.errors import UsageError

__all__ = [
    "PICKLE_SUFFIXES",
    "SAFETENSORS_DTYPE_BITS",
    "GGUFHeader",
    "GGUFValueType",
    "Omitted",
    "SafetensorsHeader",
    "TensorInfo",
    "pickle_reason",
    "read_gguf_header",
    "read_safetensors_header",
    "safetensors_parameter_count",
]

#: names of files that hold pickles: loading one runs whatever code it carries
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})


def _problem(path: Path, what: str) -> UsageError:
    return UsageError(f"{path}: {what}", param="source")


# --------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------

#: bits per element of each safetensors dtype (sub-byte float formats included)
SAFETENSORS_DTYPE_BITS: Mapping[str, int] = {
    "BOOL": 8,
    "U8": 8,
    "I8": 8,
    "F8_E5M2": 8,
    "F8_E4M3": 8,
    "F8_E8M0": 8,
    "F4": 4,
    "F6_E2M3": 6,
    "F6_E3M2": 6,
    "I16": 16,
    "U16": 16,
    "F16": 16,
    "BF16": 16,
    "I32": 32,
    "U32": 32,
    "F32": 32,
    "I64": 64,
    "U64": 64,
    "F64": 64,
}
#: the reference implementation refuses longer headers too
SAFETENSORS_MAX_HEADER = 100_000_000


@attrs.frozen
class TensorInfo:
    """One tensor of a safetensors file; offsets are relative to the data section."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def elements(self) -> int:
        return math.prod(self.shape)


@attrs.frozen
class SafetensorsHeader:
    """A validated safetensors header: tensors in file order and ``__metadata__``."""

    tensors: tuple[TensorInfo, ...]
    metadata: Mapping[str, str]
    #: bytes of JSON after the 8-byte length
    header_size: int
    #: bytes after the header
    data_size: int

    @property
    def parameter_count(self) -> int:
        """Elements of every tensor together."""
        return sum(tensor.elements for tensor in self.tensors)


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [key for key, _ in pairs]
    if len(set(keys)) != len(keys):
        duplicated = next(key for key in keys if keys.count(key) > 1)
        raise ValueError(f"key {duplicated!r} appears twice")
    return dict(pairs)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def read_safetensors_header(path: Path, *, label: str | None = None) -> SafetensorsHeader:
    """Read and validate the header of the safetensors file at ``path``.

    Checked as the reference implementation does: a header length that is
    sane and inside the file; JSON that parses to an object without duplicate
    keys; a known dtype, a shape of non-negative integers and
    ``[start, end]`` offsets for every tensor; ``elements x dtype size ==
    end - start``; tensors that tile the data section exactly (no overlap, no
    gap, nothing after the last one), so no bytes hide between tensors.
    Errors name the file as ``label`` when given (an archive member's name).
    """
    file_path, path = Path(path), Path(label if label is not None else path)
    try:
        with open(file_path, "rb") as file:
            size = os.fstat(file.fileno()).st_size
            prefix = file.read(8)
            if len(prefix) < 8:
                raise _problem(path, f"not a safetensors file: {size} bytes, shorter than 8")
            (length,) = struct.unpack("<Q", prefix)
            if length > SAFETENSORS_MAX_HEADER:
                raise _problem(
                    path,
                    f"safetensors header length {length} is over the"
                    f" {SAFETENSORS_MAX_HEADER}-byte limit",
                )
            if length > size - 8:
                raise _problem(
                    path,
                    f"safetensors header length {length} is larger than the file ({size} bytes)",
                )
            raw = file.read(length)
    except OSError as exc:
        raise _problem(path, f"cannot read: {exc.strerror or exc}") from None
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=_no_duplicates)
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise _problem(path, f"safetensors header is not valid JSON: {exc}") from None
    if not isinstance(header, dict):
        raise _problem(path, "safetensors header is not a JSON object")
    data_size = size - 8 - length

    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise _problem(path, "safetensors __metadata__ must map strings to strings")

    tensors = [_tensor(path, name, entry) for name, entry in header.items()]
    expected = 0
    for tensor in sorted(tensors, key=lambda t: (t.start, t.end)):
        if tensor.end > data_size:
            raise _problem(
                path,
                f"tensor {tensor.name!r}: data_offsets [{tensor.start}, {tensor.end}] run"
                f" past the end of the data section ({data_size} bytes)",
            )
        if tensor.start < expected:
            raise _problem(
                path, f"tensor {tensor.name!r}: data_offsets overlap the previous tensor's"
            )
        if tensor.start > expected:
            raise _problem(
                path,
                f"tensor {tensor.name!r}: {tensor.start - expected} unaccounted bytes"
                " before its data",
            )
        expected = tensor.end
    if expected != data_size:
        raise _problem(
            path,
            f"{data_size - expected} bytes after the last tensor are not described by the header",
        )
    return SafetensorsHeader(
        tensors=tuple(tensors), metadata=metadata, header_size=length, data_size=data_size
    )


def _tensor(path: Path, name: str, entry: Any) -> TensorInfo:
    if not isinstance(entry, dict):
        raise _problem(path, f"tensor {name!r}: entry is not a JSON object")
    dtype, shape, offsets = entry.get("dtype"), entry.get("shape"), entry.get("data_offsets")
    if dtype not in SAFETENSORS_DTYPE_BITS:
        raise _problem(path, f"tensor {name!r}: unknown dtype {dtype!r}")
    if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
        raise _problem(path, f"tensor {name!r}: shape must be a list of non-negative integers")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_int(o) and o >= 0 for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise _problem(path, f"tensor {name!r}: data_offsets must be [start, end], start <= end")
    tensor = TensorInfo(name, dtype, tuple(shape), offsets[0], offsets[1])
    bits = tensor.elements * SAFETENSORS_DTYPE_BITS[dtype]
    if bits != (tensor.end - tensor.start) * 8:
        raise _problem(
            path,
            f"tensor {name!r}: shape {list(shape)} of {dtype} needs {bits / 8:g} bytes but"
            f" data_offsets span {tensor.end - tensor.start}",
        )
    return tensor


def safetensors_parameter_count(path: Path) -> int:
    """The number of elements in every tensor of a (validated) safetensors file."""
    return read_safetensors_header(path).parameter_count


# --------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------


class GGUFValueType(enum.IntEnum):
    """The type tags of GGUF metadata values."""

    UINT8 = 0
    INT8 = 1
    UINT16 = 2
    INT16 = 3
    UINT32 = 4
    INT32 = 5
    FLOAT32 = 6
    BOOL = 7
    STRING = 8
    ARRAY = 9
    UINT64 = 10
    INT64 = 11
    FLOAT64 = 12


_GGUF_SCALARS: Mapping[GGUFValueType, str] = {
    GGUFValueType.UINT8: "B",
    GGUFValueType.INT8: "b",
    GGUFValueType.UINT16: "H",
    GGUFValueType.INT16: "h",
    GGUFValueType.UINT32: "I",
    GGUFValueType.INT32: "i",
    GGUFValueType.FLOAT32: "f",
    GGUFValueType.BOOL: "?",
    GGUFValueType.UINT64: "Q",
    GGUFValueType.INT64: "q",
    GGUFValueType.FLOAT64: "d",
}

#: the longest key the format allows
GGUF_MAX_KEY = 65_535
#: more metadata keys than this is not a model file (real ones have tens)
GGUF_MAX_KEYS = 65_536
#: strings longer than this are skipped, not kept (a whole tokenizer.json can be one)
GGUF_KEEP_STRING = 1 << 20
#: arrays longer than this (token lists, merges) are skipped, not kept
GGUF_KEEP_ARRAY = 256
#: all kept values together; past it, further values are omitted
GGUF_KEEP_TOTAL = 16 << 20
#: arrays of arrays deeper than this are refused
GGUF_MAX_DEPTH = 4
#: ggml tensors have at most four dimensions
GGUF_MAX_DIMS = 4


@attrs.frozen
class Omitted:
    """A metadata value that was skipped rather than kept: a long string or array."""

    kind: str  # "string" or "array[<element type>]"
    length: int


@attrs.frozen
class GGUFHeader:
    """The header of a GGUF file: version, counts, metadata, and (optionally)
    the parameter count summed from the tensor infos."""

    version: int
    byte_order: str  # "little" | "big"
    tensor_count: int
    metadata: Mapping[str, Any]
    #: elements of every tensor, when the tensor infos were read
    tensor_parameters: int | None = None


class _Reader:
    """Bounded reads from a GGUF file: every length is checked before use."""

    def __init__(self, file: BinaryIO, path: Path, size: int) -> None:
        self.file, self.path, self.size = file, path, size
        self.pos = 0
        self.order = "<"
        self.kept = 0

    def _need(self, n: int, what: str) -> None:
        if n > self.size - self.pos:
            raise _problem(
                self.path,
                f"truncated GGUF: {what} needs {n} bytes at offset {self.pos}, the file has"
                f" {self.size - self.pos} left",
            )

    def read(self, n: int, what: str) -> bytes:
        self._need(n, what)
        data = self.file.read(n)
        if len(data) != n:  # the file shrank under us
            raise _problem(self.path, f"truncated GGUF: short read of {what}")
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self._need(n, what)
        self.file.seek(n, os.SEEK_CUR)
        self.pos += n

    def unpack(self, fmt: str, what: str) -> Any:
        (value,) = struct.unpack(self.order + fmt, self.read(struct.calcsize(fmt), what))
        return value

    def key(self, what: str) -> str:
        """A metadata key or tensor name: always read, at most 64 KiB."""
        length = self.unpack("Q", f"length of {what}")
        if length > GGUF_MAX_KEY:
            raise _problem(
                self.path, f"GGUF {what} is {length} bytes long; the limit is {GGUF_MAX_KEY}"
            )
        return self.read(length, what).decode("utf-8", errors="replace")

    def string(self, what: str, *, keep: bool = True) -> str | Omitted:
        length = self.unpack("Q", f"length of {what}")
        self._need(length, what)
        if not keep or length > GGUF_KEEP_STRING or self.kept + length > GGUF_KEEP_TOTAL:
            self.skip(length, what)
            return Omitted("string", length)
        self.kept += length
        return self.read(length, what).decode("utf-8", errors="replace")

    def tag(self, kind: int, what: str) -> GGUFValueType:
        try:
            return GGUFValueType(kind)
        except ValueError:
            raise _problem(self.path, f"GGUF {what}: unknown value type {kind}") from None

    def value(self, kind: int, what: str, depth: int = 0, keep: bool = True) -> Any:
        tag = self.tag(kind, what)
        if tag in _GGUF_SCALARS:
            return self.unpack(_GGUF_SCALARS[tag], what)
        if tag is GGUFValueType.STRING:
            return self.string(what, keep=keep)
        if depth >= GGUF_MAX_DEPTH:
            raise _problem(self.path, f"GGUF {what}: arrays nested deeper than {GGUF_MAX_DEPTH}")
        element = self.tag(self.unpack("I", f"element type of {what}"), f"elements of {what}")
        count = self.unpack("Q", f"length of {what}")
        # Every element takes at least one byte, so a count past the end of the
        # file is a lie; refusing it here bounds the loops below.
        self._need(count, f"{count} elements of {what}")
        # Kept elements are charged to the budget at a Python object's cost.
        keep = keep and count <= GGUF_KEEP_ARRAY and self.kept + 32 * count <= GGUF_KEEP_TOTAL
        if keep:
            self.kept += 32 * count
        if element in _GGUF_SCALARS:
            fmt = f"{self.order}{count}{_GGUF_SCALARS[element]}"
            if keep:
                return list(struct.unpack(fmt, self.read(struct.calcsize(fmt), what)))
            self.skip(struct.calcsize(fmt), what)
        elif keep:
            return [self.value(element, f"{what}[{i}]", depth + 1) for i in range(count)]
        else:
            for i in range(count):
                self.value(element, f"{what}[{i}]", depth + 1, keep=False)
        return Omitted(f"array[{element.name.lower()}]", count)


def read_gguf_header(path: Path, *, tensors: bool = False, label: str | None = None) -> GGUFHeader:
    """Read the header and metadata of the GGUF file at ``path`` (versions 2 and 3,
    either byte order).

    Stops before the tensor infos unless ``tensors`` is true, in which case it
    also sums the tensors' element counts (a parameter count for files whose
    metadata lacks ``general.parameter_count``). Long strings and arrays (the
    vocabulary, merges) are skipped and appear as :class:`Omitted`; lengths
    that run past the end of the file or over a cap raise
    :class:`~llmos.errors.UsageError`, so a hostile file cannot make this
    allocate more than a few megabytes. Errors name the file as ``label``
    when given.
    """
    file_path, path = Path(path), Path(label if label is not None else path)
    try:
        with open(file_path, "rb") as file:
            reader = _Reader(file, path, os.fstat(file.fileno()).st_size)
            return _read_gguf(reader, tensors)
    except OSError as exc:
        raise _problem(path, f"cannot read: {exc.strerror or exc}") from None


def _read_gguf(reader: _Reader, tensors: bool) -> GGUFHeader:
    path = reader.path
    if reader.size < 4 or reader.read(4, "magic") != b"GGUF":
        raise _problem(path, "not a GGUF file (no GGUF magic at the start)")
    raw_version = reader.read(4, "version")
    version = struct.unpack("<I", raw_version)[0]
    if version not in (2, 3) and struct.unpack(">I", raw_version)[0] in (2, 3):
        reader.order = ">"
        version = struct.unpack(">I", raw_version)[0]
    if version == 1:
        raise _problem(path, "GGUF version 1 is not supported; convert it with a current llama.cpp")
    if version not in (2, 3):
        raise _problem(path, f"unsupported GGUF version {version} (2 and 3 are read)")
    tensor_count = reader.unpack("Q", "tensor count")
    kv_count = reader.unpack("Q", "metadata count")
    if kv_count > GGUF_MAX_KEYS:
        raise _problem(path, f"GGUF claims {kv_count} metadata keys; the limit is {GGUF_MAX_KEYS}")
    metadata: dict[str, Any] = {}
    for index in range(kv_count):
        key = reader.key(f"metadata key #{index}")
        kind = reader.unpack("I", f"type of {key!r}")
        metadata[key] = reader.value(kind, repr(key))

    parameters = None
    if tensors:
        # A tensor info takes at least 24 bytes (name length, dims, type, offset).
        reader._need(tensor_count * 24, f"{tensor_count} tensor infos")
        parameters = 0
        for index in range(tensor_count):
            what = f"tensor info #{index}"
            reader.key(what)
            n_dims = reader.unpack("I", what)
            if n_dims > GGUF_MAX_DIMS:
                raise _problem(path, f"GGUF {what} has {n_dims} dimensions; ggml allows 4")
            dims = struct.unpack(f"{reader.order}{n_dims}Q", reader.read(8 * n_dims, what))
            reader.skip(12, what)  # ggml type (u32) and data offset (u64)
            parameters += math.prod(dims)
    return GGUFHeader(
        version=version,
        byte_order="little" if reader.order == "<" else "big",
        tensor_count=tensor_count,
        metadata=metadata,
        tensor_parameters=parameters,
    )


# --------------------------------------------------------------------------
# pickle
# --------------------------------------------------------------------------

_PICKLE_MAGIC = {b"\x80\x02", b"\x80\x03", b"\x80\x04", b"\x80\x05"}


def pickle_reason(path: Path) -> str | None:
    """Why the file at ``path`` is (or holds) a pickle, or ``None`` when it is not.

    A pickle is recognised by its name (:data:`PICKLE_SUFFIXES`), by the
    protocol 2-5 magic at its start, or as a PyTorch zip checkpoint (a zip
    holding a ``.pkl`` member) whatever it is called. Protocol 0 and 1
    pickles have no magic; only their name gives them away.
    """
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        return f"{path.suffix.lower()} files are pickles"
    try:
        with path.open("rb") as file:
            start = file.read(4)
    except OSError as exc:
        return f"cannot be read to check for a pickle: {exc.strerror or exc}"
    if start[:2] in _PICKLE_MAGIC:
        return f"it starts with the magic of pickle protocol {start[1]}"
    if start == b"PK\x03\x04":
        try:
            with zipfile.ZipFile(path) as archive:
                if any(name.endswith(".pkl") for name in archive.namelist()):
                    return "it is a PyTorch zip checkpoint (it holds a .pkl pickle)"
        except (zipfile.BadZipFile, OSError, ValueError):
            return None
    return None
