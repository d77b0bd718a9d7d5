"""Model cards as README-style files.

A card file is front matter between two ``---`` lines, one ``key: <JSON
value>`` per line (JSON values, so no YAML library is needed and every value
round-trips exactly), then a ``# name`` heading and the description::

    ---
    name: "acme/bert-base"
    provider: "transformers"
    tasks: ["text-classification"]
    parameters: 110000000
    ---

    # acme/bert-base

    A pre-trained BERT model for text classification.

The heading is for people and is not read back; the description is the text
after it, trimmed.

A relative local ``source`` in a file (``"source": "weights/bert"``) is read
by :func:`read_card_file` as relative to the file's folder, where its author
wrote it, not to whichever directory the file is registered from.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import attrs

from llmos.errors import UsageError
from llmos.registry.sources import is_path
from llmos.types import ModelCard

__all__ = ["card_from_markdown", "card_to_markdown", "read_card_file", "write_card_file"]

_FENCE = "---"


def card_to_markdown(card: ModelCard) -> str:
    """The card as a card file (see the module docstring)."""
    fields = card.to_dict()
    description = fields.pop("description")
    lines = [_FENCE]
    lines += [f"{key}: {json.dumps(value, ensure_ascii=False)}" for key, value in fields.items()]
    lines += [_FENCE, "", f"# {card.name}", ""]
    if description:
        lines += [description, ""]
    return "\n".join(lines)


def card_from_markdown(text: str) -> ModelCard:
    """Parse a card file; :class:`~llmos.errors.UsageError` names the line at fault."""
    lines = text.removeprefix("\ufeff").replace("\r\n", "\n").split("\n")
    if not lines or lines[0].strip() != _FENCE:
        raise UsageError("a model card file must start with a '---' line")
    fields: dict[str, Any] = {}
    for number, line in enumerate(lines[1:], start=2):
        if line.strip() == _FENCE:
            body = lines[number:]
            break
        if not line.strip():
            continue
        key, colon, value = line.partition(":")
        key = key.strip()
        if not colon or not key:
            raise UsageError(f"line {number}: expected 'key: <JSON value>', got {line!r}")
        if key in fields:
            raise UsageError(f"line {number}: {key!r} is given twice")
        try:
            fields[key] = json.loads(value)
        except json.JSONDecodeError as exc:
            raise UsageError(f"line {number}: the value of {key!r} is not JSON: {exc}") from exc
    else:
        raise UsageError("the front matter of the model card file is never closed with '---'")

    # Skip blank lines and the ``# name`` heading; the rest is the description.
    while body and not body[0].strip():
        body.pop(0)
    if body and body[0].startswith("# "):
        body.pop(0)
    description = "\n".join(body).strip()
    if description:
        if fields.get("description"):
            raise UsageError(
                "the description is given twice: in the front matter and after the heading"
            )
        fields["description"] = description
    return ModelCard.from_dict(fields)


def read_card_file(path: str | os.PathLike[str]) -> ModelCard:
    """Read a card file; errors name the file. A relative local ``source`` is
    made relative to the file's folder (an absolute path, kept unresolved:
    the source check resolves it)."""
    path = Path(path)
    try:
        card = card_from_markdown(path.read_text(encoding="utf-8"))
    except UsageError as exc:
        raise UsageError(f"{path}: {exc.message}") from exc
    source = card.source
    if source and is_path(source) and not source.startswith("~") and not Path(source).is_absolute():
        card = attrs.evolve(card, source=str(path.absolute().parent / source))
    return card


def write_card_file(path: str | os.PathLike[str], card: ModelCard) -> None:
    """Write ``card`` as a card file."""
    Path(path).write_text(card_to_markdown(card), encoding="utf-8")
