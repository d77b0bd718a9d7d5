"""The provider's options: the card's own over the operator's defaults.

A :class:`~llmos.types.LoadRequest` carries two option tables: the card's
``options`` (what whoever registered the model asked for) and
``request.options``, the ``[plugins.transformers]`` config table (the
operator's settings). A card's value wins over the operator's default, except
for what only the operator may grant: running code from a model's folder
(``trust_remote_code``) needs ``allow_remote_code`` in the operator's table.

Nothing here imports torch, so options are checked before any weight is read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs
import structlog

from llmos.errors import UnsafeSourceError, UsageError
from llmos.types import ModelCard

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_ZERO_SHOT_TEMPLATE",
    "DTYPES",
    "TASKS",
    "Settings",
    "settings_for",
]

log = structlog.get_logger("llmos.transformers")

DTYPES = ("float32", "bfloat16", "float16")
TASKS = ("causal", "encoder", "classifier")
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_ZERO_SHOT_TEMPLATE = "Text: {text}\nLabel: "

#: keys a card's options and the operator's table share
_SHARED_KEYS = frozenset(
    {
        "dtype",
        "max_batch_size",
        "max_new_tokens",
        "device",
        "threads",
        "trust_remote_code",
        "task",
        "zero_shot_template",
        "gguf_file",
        "labels",
        "max_work_memory_mb",
    }
)
#: keys only the operator's table may hold
_OPERATOR_KEYS = frozenset({"allow_remote_code"})
#: keys written on a card for the record — llmos-peft's ``method``, the job
#: manager's ``tuning`` provenance: known, so not warned about, and not used here
_RECORD_KEYS = frozenset({"method", "tuning", "merge"})


@attrs.frozen(kw_only=True)
class Settings:
    """One model's effective options, checked."""

    dtype: str = "float32"
    max_batch_size: int = 8
    #: the default and the ceiling of tokens generated per request
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    #: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (cuda when torch sees one)
    device: str = "auto"
    #: torch's intra-op threads; ``None`` leaves torch's default
    threads: int | None = None
    trust_remote_code: bool = False
    #: force the model kind instead of reading it from config.json
    task: str | None = None
    #: zero-shot classification prompt on a causal LM; must contain ``{text}``
    zero_shot_template: str = DEFAULT_ZERO_SHOT_TEMPLATE
    #: the GGUF file to load when the source is a folder holding several
    gguf_file: str | None = None
    #: an adapter on a classification head: its label names, in the head's order
    labels: tuple[str, ...] = ()
    #: memory (MiB, estimated) one call of a causal LM may take beyond its weights —
    #: key/value caches, attention scores, logits: generation and scoring are split
    #: into chunks under it, and a row that alone needs more is refused. ``None``:
    #: 1024, or what one row at the model's full context needs when that is more
    max_work_memory_mb: int | None = None


def _positive_int(name: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{where}: {name} must be a positive integer, got {value!r}", param=name)
    return value


def _bool(name: str, value: Any, where: str) -> bool:
    if not isinstance(value, bool):
        raise UsageError(f"{where}: {name} must be true or false, got {value!r}", param=name)
    return value


def _choice(name: str, value: Any, choices: tuple[str, ...], where: str) -> str:
    if value not in choices:
        raise UsageError(
            f"{where}: {name} must be one of {', '.join(choices)}; got {value!r}", param=name
        )
    return str(value)


def _device(value: Any, where: str) -> str:
    if isinstance(value, str) and (
        value in ("cpu", "cuda", "auto") or (value.startswith("cuda:") and value[5:].isdigit())
    ):
        return value
    raise UsageError(f"{where}: device must be cpu, cuda, cuda:N or auto; got {value!r}")


def _check(key: str, value: Any, where: str) -> Any:
    if key == "dtype":
        return _choice(key, value, DTYPES, where)
    if key in ("max_batch_size", "max_new_tokens", "threads", "max_work_memory_mb"):
        return _positive_int(key, value, where)
    if key == "device":
        return _device(value, where)
    if key in ("trust_remote_code", "allow_remote_code"):
        return _bool(key, value, where)
    if key == "task":
        return _choice(key, value, TASKS, where)
    if key == "zero_shot_template":
        if not isinstance(value, str) or "{text}" not in value:
            raise UsageError(f"{where}: zero_shot_template must be a string containing '{{text}}'")
        return value
    if key == "gguf_file":
        if not isinstance(value, str) or "/" in value or "\\" in value or value.startswith("."):
            raise UsageError(f"{where}: gguf_file must be a plain file name, got {value!r}")
        return value
    if key == "labels":
        if (
            not isinstance(value, list | tuple)
            or len(value) < 2
            or not all(isinstance(label, str) and label for label in value)
            or len(set(value)) != len(value)
        ):
            raise UsageError(
                f"{where}: labels must be a list of two or more distinct label names,"
                f" got {value!r}",
                param=key,
            )
        return tuple(value)
    raise AssertionError(key)  # pragma: no cover - keys are filtered before


def _checked(table: Mapping[str, Any], allowed: frozenset[str], where: str) -> dict[str, Any]:
    unknown = sorted(set(table) - allowed - _RECORD_KEYS)
    if unknown:
        # A misspelt key would otherwise be silently ignored; other plugins'
        # keys can share a card, so warn rather than fail.
        log.warning("transformers.unknown_options", where=where, keys=unknown)
    return {key: _check(key, value, where) for key, value in table.items() if key in allowed}


def settings_for(card: ModelCard, operator: Mapping[str, Any]) -> Settings:
    """The effective :class:`Settings` of ``card`` under the operator's table.

    Raises :class:`~llmos.errors.UsageError` for a bad value, and
    :class:`~llmos.errors.UnsafeSourceError` when remote code is asked for
    but the operator has not set ``allow_remote_code = true``.
    """
    defaults = _checked(operator, _SHARED_KEYS | _OPERATOR_KEYS, "[plugins.transformers]")
    if "allow_remote_code" in card.options:
        log.warning("transformers.card_cannot_allow_remote_code", model=card.ref)
    own = _checked(card.options, _SHARED_KEYS | _OPERATOR_KEYS, f"model {card.ref!r} options")
    own.pop("allow_remote_code", None)  # only the operator grants it
    allowed = defaults.pop("allow_remote_code", False)
    merged = {**defaults, **own}
    if merged.get("trust_remote_code") and not allowed:
        raise UnsafeSourceError(
            f"model {card.ref!r} asks for trust_remote_code, which runs the Python code in its"
            " folder; the operator must allow it with [plugins.transformers]"
            " allow_remote_code = true",
            param="trust_remote_code",
        )
    return Settings(**merged)
