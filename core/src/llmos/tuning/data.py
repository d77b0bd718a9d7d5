"""Tuning data: train/dev/test splits from files or an inline body.

:func:`load_splits` reads each split from a JSON Lines, CSV or TSV file (by
suffix) or from an inline mapping ``{"train": [{"text": …, "label": …}], …}``,
recognises the usual column names, and returns a :class:`Dataset` whose rows
are normalised for the task:

* ``text-classification``: ``{"text": str, "label": str}``, the label being
  the label's *name* (``1`` and ``"1"`` are the same label, ``"1"``);
* ``sft``: ``{"prompt": str, "response": str}``.

Files are read a line (or a CSV record) at a time. Every problem is a
:class:`~llmos.errors.UsageError` naming the file and the line, or the inline
split and the row; an inline body over its caps is
:class:`~llmos.errors.PayloadTooLarge`.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs

from llmos.errors import PayloadTooLarge, UsageError

__all__ = [
    "DEFAULT_MAX_DATA_BYTES",
    "DEFAULT_MAX_INLINE_BYTES",
    "DEFAULT_MAX_ROWS",
    "SPLITS",
    "TASKS",
    "Dataset",
    "load_file",
    "load_splits",
    "rows_hash",
    "sort_labels",
]

SPLITS = ("train", "dev", "test")
TASKS = ("text-classification", "sft")

#: the inline body's cap: its rows, encoded as JSON
DEFAULT_MAX_INLINE_BYTES = 10 * 1024 * 1024
#: the most rows of all splits together, from files or inline
DEFAULT_MAX_ROWS = 1_000_000
#: the most bytes of all split files together (``[tuning] max_data_bytes``):
#: every row is held in memory while a job is submitted, and again in its worker
DEFAULT_MAX_DATA_BYTES = 256 * 1024 * 1024

#: column names recognised when none is named, in order of preference
TEXT_COLUMNS = ("text", "sentence", "content", "review", "document", "input")
LABEL_COLUMNS = ("label", "labels", "class", "target", "category")
PROMPT_COLUMNS = ("prompt", "instruction", "question", "input")
RESPONSE_COLUMNS = ("response", "output", "answer", "completion")

_SUFFIXES = {".jsonl": "jsonl", ".json": "jsonl", ".csv": "csv", ".tsv": "tsv"}
_INTEGER = re.compile(r"-?[0-9]+")


# --------------------------------------------------------------------------
# The result
# --------------------------------------------------------------------------


@attrs.frozen(kw_only=True)
class Dataset:
    """Normalised splits and what a model card records about them."""

    task: str
    #: split name → normalised rows
    splits: dict[str, list[dict[str, str]]]
    #: label names in id order (numbers numerically: "0", "1", "2", "10");
    #: empty for ``sft``
    labels: tuple[str, ...] = ()
    label_ids: dict[str, int] = attrs.field(factory=dict)
    #: split name → sha256 of its normalised rows (see :func:`rows_hash`)
    hashes: dict[str, str] = attrs.field(factory=dict)
    #: split name → the file it came from, or ``"inline"``
    sources: dict[str, str] = attrs.field(factory=dict)

    @property
    def sizes(self) -> dict[str, int]:
        return {name: len(rows) for name, rows in self.splits.items()}

    def summary(self) -> dict[str, Any]:
        """Everything but the rows: what a job record or model card keeps."""
        return {
            "task": self.task,
            "labels": list(self.labels),
            "label_ids": dict(self.label_ids),
            "sizes": self.sizes,
            "hashes": dict(self.hashes),
            "sources": dict(self.sources),
        }

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict: :meth:`summary` plus the rows."""
        return {**self.summary(), "splits": {k: list(v) for k, v in self.splits.items()}}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Dataset:
        """Inverse of :meth:`to_dict` (a worker process reads what a job wrote)."""
        try:
            return cls(
                task=data["task"],
                splits={k: [dict(r) for r in v] for k, v in data["splits"].items()},
                labels=tuple(data.get("labels", ())),
                label_ids=dict(data.get("label_ids", {})),
                hashes=dict(data.get("hashes", {})),
                sources=dict(data.get("sources", {})),
            )
        except (KeyError, TypeError, AttributeError) as exc:
            raise UsageError(f"invalid dataset record: {exc!r}") from exc


# --------------------------------------------------------------------------
# Public functions
# --------------------------------------------------------------------------


def load_splits(
    train: str | Path | None = None,
    dev: str | Path | None = None,
    test: str | Path | None = None,
    *,
    inline: Mapping[str, Any] | None = None,
    task: str = "text-classification",
    text_column: str | None = None,
    label_column: str | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    max_inline_bytes: int = DEFAULT_MAX_INLINE_BYTES,
    max_rows: int = DEFAULT_MAX_ROWS,
    max_file_bytes: int = DEFAULT_MAX_DATA_BYTES,
) -> Dataset:
    """Read and check the splits; ``train`` is required, ``dev`` and ``test``
    optional. A split comes from its file argument or from ``inline`` (never
    both). The labels of text classification are the train split's; a dev or
    test label the train split lacks is an error. The files together may
    hold ``max_file_bytes`` (checked before any is read)."""
    reader = _Normaliser(
        task,
        text_column=text_column,
        label_column=label_column,
        prompt_column=prompt_column,
        response_column=response_column,
        max_rows=max_rows,
    )
    paths = {"train": train, "dev": dev, "test": test}
    bodies: dict[str, Any] = {}
    if inline is not None:
        bodies = _check_inline(inline, max_inline_bytes=max_inline_bytes, max_rows=max_rows)
        both = [name for name in bodies if paths[name] is not None]
        if both:
            raise UsageError(
                f"the {both[0]} split is given both as a file and inline; give it once"
            )
    if paths["train"] is None and "train" not in bodies:
        raise UsageError("no train split: give a train file or an inline 'train' list")

    where_of = {name: _local(path) for name, path in paths.items() if path is not None}
    _check_file_sizes(where_of, max_file_bytes)
    splits: dict[str, list[dict[str, str]]] = {}
    sources: dict[str, str] = {}
    budget = max_rows
    for name in SPLITS:  # train first: dev and test are checked against its labels
        if name in where_of:
            where = where_of[name]
            rows = reader.read(_file_records(where), str(where), budget)
            sources[name] = str(where.resolve())
        elif name in bodies:
            rows = reader.read(_inline_records(name, bodies[name]), f"inline {name}", budget)
            sources[name] = "inline"
        else:
            continue
        splits[name] = rows
        budget -= len(rows)
        if name == "train" and task == "text-classification":
            reader.known_labels = {row["label"] for row in rows}
            if len(reader.known_labels) < 2:
                raise UsageError(
                    f"the train split ({sources[name]}) has one label, "
                    f"{next(iter(reader.known_labels))!r}; classification needs two or more"
                )

    labels = sort_labels(reader.known_labels) if task == "text-classification" else ()
    return Dataset(
        task=task,
        splits=splits,
        labels=labels,
        label_ids={label: i for i, label in enumerate(labels)},
        hashes={name: rows_hash(rows) for name, rows in splits.items()},
        sources=sources,
    )


def load_file(
    path: str | Path,
    *,
    task: str = "text-classification",
    text_column: str | None = None,
    label_column: str | None = None,
    prompt_column: str | None = None,
    response_column: str | None = None,
    max_rows: int = DEFAULT_MAX_ROWS,
) -> list[dict[str, str]]:
    """The normalised rows of one file (what ``llmos eval`` reads); no split
    rules, no label checks beyond each row's own."""
    where = _local(path)
    reader = _Normaliser(
        task,
        text_column=text_column,
        label_column=label_column,
        prompt_column=prompt_column,
        response_column=response_column,
        max_rows=max_rows,
    )
    return reader.read(_file_records(where), str(where), max_rows)


def sort_labels(labels: Iterable[str]) -> tuple[str, ...]:
    """Label names in id order: integers numerically ("2" before "10"), then
    the others alphabetically."""
    return tuple(
        sorted(
            set(labels),
            key=lambda s: (0, int(s), s) if _INTEGER.fullmatch(s) else (1, 0, s),
        )
    )


def rows_hash(rows: Iterable[Mapping[str, Any]]) -> str:
    """sha256 of normalised rows: one canonical JSON object a line, so the
    same rows hash alike whichever file format they came from."""
    digest = hashlib.sha256()
    for row in rows:
        line = json.dumps(row, sort_keys=True, ensure_ascii=False, separators=(",", ":"))
        digest.update(line.encode("utf-8"))
        digest.update(b"\n")
    return digest.hexdigest()


# --------------------------------------------------------------------------
# Records: (where, fields, columns) from files and inline bodies
# --------------------------------------------------------------------------

#: one raw record: its place ("line 4"), its fields, and the file's columns
#: (None for JSON Lines, whose objects each carry their own keys)
_Record = tuple[str, Mapping[str, Any], Sequence[str] | None]


def _local(path: str | Path) -> Path:
    """A data file's path, ``~`` expanded; an unknown ``~user`` or a NUL byte
    is a :class:`UsageError`, not an OSError from deep inside."""
    text = str(path)
    if "\x00" in text:
        raise UsageError(f"{text!r}: a path cannot hold a NUL byte")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # pathlib: "Could not determine home directory"
        raise UsageError(
            f"{text}: cannot expand {text.split('/')[0]!r} (no such user); give the path in full"
        ) from None


def _check_file_sizes(paths: Mapping[str, Path], cap: int) -> None:
    """Refuse files over ``cap`` bytes together before any is read."""
    total = 0
    for path in paths.values():
        try:
            total += path.stat().st_size if path.is_file() else 0
        except OSError:
            continue  # reading it says what is wrong
        if total > cap:
            raise PayloadTooLarge(
                f"the data files hold more than {cap:,} bytes ({path} among them);"
                " use fewer rows, or raise [tuning] max_data_bytes"
            )


def _file_records(path: Path) -> Iterator[_Record]:
    if not path.exists():
        raise UsageError(f"{path}: no such file")
    if not path.is_file():
        raise UsageError(f"{path}: not a file")
    kind = _SUFFIXES.get(path.suffix.lower())
    if kind is None:
        raise UsageError(
            f"{path}: unknown file type {path.suffix or '(no suffix)'!r}; "
            "use .jsonl (or .json, one object a line), .csv or .tsv"
        )
    try:
        # utf-8-sig: spreadsheet exports often start with a byte-order mark
        with path.open(encoding="utf-8-sig", newline="") as stream:
            if kind == "jsonl":
                yield from _jsonl_records(path, stream)
            else:
                yield from _csv_records(path, stream, kind)
    except UnicodeDecodeError as exc:
        raise UsageError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None


def _jsonl_records(path: Path, stream: Iterable[str]) -> Iterator[_Record]:
    for number, line in enumerate(stream, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            hint = ""
            if number == 1 and line.lstrip().startswith("["):
                hint = "; write one JSON object a line (JSON Lines), not an array"
            raise UsageError(f"{path}, line {number}: malformed JSON ({exc.msg}){hint}") from None
        if not isinstance(record, dict):
            raise UsageError(
                f"{path}, line {number}: expected a JSON object, got {type(record).__name__}"
            )
        yield f"line {number}", record, None


def _csv_records(path: Path, stream: Any, kind: str) -> Iterator[_Record]:
    if kind == "tsv":
        # TSV has no quoting: a text may hold ' and " (SST-2 does)
        reader = csv.reader(stream, delimiter="\t", quoting=csv.QUOTE_NONE)
    else:
        reader = csv.reader(stream)
    end = 0
    try:
        header: list[str] | None = None
        for fields in reader:
            start, end = end + 1, reader.line_num
            if not fields or (len(fields) == 1 and not fields[0].strip()):
                continue  # a blank line
            if header is None:
                header = [name.strip() for name in fields]
                continue
            if len(fields) != len(header):
                raise UsageError(
                    f"{path}, line {start}: {len(fields)} fields, but the header has "
                    f"{len(header)} ({', '.join(header)})"
                )
            yield f"line {start}", dict(zip(header, fields, strict=True)), header
    except csv.Error as exc:
        raise UsageError(f"{path}, line {reader.line_num}: {exc}") from None
    if header is None:
        raise UsageError(f"{path}: empty file (no header line, no rows)")


def _inline_records(name: str, rows: Sequence[Any]) -> Iterator[_Record]:
    for number, row in enumerate(rows, 1):
        if not isinstance(row, Mapping):
            raise UsageError(f"inline {name}, row {number}: expected an object, got {row!r:.60}")
        yield f"row {number}", row, None


def _check_inline(
    inline: Mapping[str, Any], *, max_inline_bytes: int, max_rows: int
) -> dict[str, Sequence[Any]]:
    if not isinstance(inline, Mapping):
        raise UsageError(
            f"inline data must be an object of splits, got {type(inline).__name__}",
            param="data",
        )
    unknown = sorted(set(inline) - set(SPLITS))
    if unknown:
        raise UsageError(
            f"unknown inline split(s): {', '.join(map(str, unknown))}; use {', '.join(SPLITS)}",
            param="data",
        )
    size = rows = 0
    for name, body in inline.items():
        if not isinstance(body, list | tuple):
            raise UsageError(
                f"inline {name} must be a list of rows, got {type(body).__name__}", param="data"
            )
        rows += len(body)
        if rows > max_rows:
            raise PayloadTooLarge(
                f"the inline data has more than {max_rows:,} rows; "
                "put the splits in files and pass their paths"
            )
        for row in body:
            # the body's size as JSON, counted row by row so a huge one stops early
            size += len(json.dumps(row, ensure_ascii=False, default=str).encode("utf-8"))
            if size > max_inline_bytes:
                raise PayloadTooLarge(
                    f"the inline data is over {max_inline_bytes:,} bytes; "
                    "put the splits in files and pass their paths"
                )
    return {name: inline[name] for name in SPLITS if name in inline}


# --------------------------------------------------------------------------
# Normalising records into rows
# --------------------------------------------------------------------------


class _Normaliser:
    """Turns raw records into checked rows for one task."""

    def __init__(
        self,
        task: str,
        *,
        text_column: str | None,
        label_column: str | None,
        prompt_column: str | None,
        response_column: str | None,
        max_rows: int,
    ) -> None:
        if task not in TASKS:
            raise UsageError(f"unknown task {task!r}: use one of {', '.join(TASKS)}", param="task")
        self.task = task
        if task == "text-classification":
            self.roles = (
                ("text", text_column, TEXT_COLUMNS, "--text-column"),
                ("label", label_column, LABEL_COLUMNS, "--label-column"),
            )
        else:
            self.roles = (
                ("prompt", prompt_column, PROMPT_COLUMNS, "--prompt-column"),
                ("response", response_column, RESPONSE_COLUMNS, "--response-column"),
            )
        #: the train split's labels, once it is read; dev and test must keep to them
        self.known_labels: set[str] = set()
        self.max_rows = max_rows

    def read(self, records: Iterator[_Record], source: str, max_rows: int) -> list[dict[str, str]]:
        rows: list[dict[str, str]] = []
        columns: dict[str, str] | None = None
        for where, record, header in records:
            if columns is None:
                columns = self._columns(source, header if header is not None else list(record))
            if len(rows) >= max_rows:
                raise PayloadTooLarge(
                    f"{source}: the data has more than {self.max_rows:,} rows (max_rows)"
                )
            rows.append(self._row(source, where, record, columns))
        if not rows:
            raise UsageError(f"{source}: no rows")
        return rows

    def _columns(self, source: str, found: Sequence[str]) -> dict[str, str]:
        """role → column name, from the arguments or the usual names."""
        columns: dict[str, str] = {}
        listed = ", ".join(map(str, found)) or "none"
        for role, given, usual, flag in self.roles:
            if given is not None:
                if given not in found:
                    raise UsageError(
                        f"{source}: no column {given!r} (named by {flag}); columns found: {listed}"
                    )
                columns[role] = given
                continue
            match = next((name for name in usual if name in found), None)
            if match is None:
                raise UsageError(
                    f"{source}: no {role} column (looked for {', '.join(usual)}); "
                    f"columns found: {listed}; name yours with {flag}"
                )
            columns[role] = match
        return columns

    def _row(
        self, source: str, where: str, record: Mapping[str, Any], columns: Mapping[str, str]
    ) -> dict[str, str]:
        out: dict[str, str] = {}
        for role, column in columns.items():
            if column not in record:
                raise UsageError(f"{source}, {where}: no {column!r} field")
            value = record[column]
            if role == "label":
                out[role] = self._label(source, where, value)
                continue
            if not isinstance(value, str):
                raise UsageError(
                    f"{source}, {where}: {role} ({column!r}) must be a string, "
                    f"got {type(value).__name__}"
                )
            if not value.strip():
                raise UsageError(f"{source}, {where}: empty {role} ({column!r})")
            out[role] = value
        return out

    def _label(self, source: str, where: str, value: Any) -> str:
        # bool is an int subclass; True as a class label is almost surely a mistake
        if isinstance(value, bool) or not isinstance(value, int | str):
            raise UsageError(
                f"{source}, {where}: a label must be a string or an integer, "
                f"got {type(value).__name__} {value!r:.40}"
            )
        label = str(value).strip()
        if not label:
            raise UsageError(f"{source}, {where}: empty label")
        if self.known_labels and label not in self.known_labels:
            raise UsageError(
                f"{source}, {where}: label {label!r} is not in the train split "
                f"(its labels: {', '.join(sort_labels(self.known_labels))})"
            )
        return label
