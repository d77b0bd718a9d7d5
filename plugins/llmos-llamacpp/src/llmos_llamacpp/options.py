"""The provider's options: the card's own over the operator's defaults.

A card's ``options`` and the operator's ``[plugins.llamacpp]`` table take the
same keys; the card's value wins. Every key is checked against its range
before a byte of the model is read. A key this provider does not know is an
error that lists the keys it does know (a misspelt ``n_ctx`` would otherwise
silently leave the default in place), except the keys other parts of llmos
write on cards (the kernel's batching keys, llmos-peft's record of how a
model was made). Keys of the transformers provider that mean something else
here are refused with what to use instead, so a card moved from
``provider = "transformers"`` fails loudly.

Nothing here imports llama_cpp.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import attrs

from llmos.errors import UsageError
from llmos.types import ModelCard

__all__ = [
    "DEFAULT_MAX_NEW_TOKENS",
    "DEFAULT_N_CTX",
    "DEFAULT_ZERO_SHOT_TEMPLATE",
    "KEYS",
    "POOLINGS",
    "Settings",
    "checked_options",
    "default_threads",
    "settings_for",
]

DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_ZERO_SHOT_TEMPLATE = "Text: {text}\nLabel: "
#: the context when the options name none (capped by the model's own)
DEFAULT_N_CTX = 4096
POOLINGS = ("mean", "cls", "last")
#: the most threads a default takes: decoding a small model is bound by memory
#: bandwidth, and past a few cores more threads only wait on each other
_MAX_DEFAULT_THREADS = 8


def default_threads() -> int:
    """Threads when the options name none: the cores this process may run on
    (its CPU affinity, what a container grants), at most 8."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        cores = os.cpu_count() or 1
    return max(1, min(cores, _MAX_DEFAULT_THREADS))


@attrs.frozen(kw_only=True)
class Settings:
    """One model's effective options, checked."""

    #: context length (prompt and answer, in tokens); ``None``: the model's
    #: trained context, at most :data:`DEFAULT_N_CTX`
    n_ctx: int | None = None
    #: threads of a decoding step; ``None``: :func:`default_threads`
    n_threads: int | None = None
    #: threads of a prompt's evaluation; ``None``: ``n_threads``
    n_threads_batch: int | None = None
    #: prompt tokens evaluated per step
    n_batch: int = 512
    #: the seed of a sampled request that names none; ``None``: a fresh one each time
    seed: int | None = None
    #: the default and the ceiling of tokens generated per request
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    #: zero-shot classification prompt; must contain ``{text}``
    zero_shot_template: str = DEFAULT_ZERO_SHOT_TEMPLATE
    #: the GGUF file to load when the source is a folder holding several
    gguf_file: str | None = None
    #: serve ``embed`` (a second llama.cpp context, made on first use)
    embeddings: bool = True
    #: how token vectors become one text vector
    pooling: str = "mean"
    #: map the file instead of reading it into memory (pages shared between
    #: processes and with the embedding context)
    use_mmap: bool = True

    @property
    def threads(self) -> int:
        return self.n_threads or default_threads()

    @property
    def threads_batch(self) -> int:
        return self.n_threads_batch or self.threads


#: every key of :class:`Settings`
KEYS = frozenset(a.name for a in attrs.fields(Settings))
#: keys other parts own, known here so that they are not refused: the kernel's
#: batching, llmos-peft's and the job manager's record of how a model was made
_OTHERS_KEYS = frozenset(
    {"max_batch_size", "max_wait_ms", "max_queue", "method", "tuning", "merge", "task"}
)
#: keys of the transformers provider this one takes otherwise, and what to do instead
_NOT_HONOURED = {
    "threads": "use n_threads (and n_threads_batch for prompts)",
    "dtype": "a GGUF file holds its own quantization; pick the file of the quantization wanted",
    "device": "this build of llama.cpp runs on the CPU",
    "trust_remote_code": "a GGUF file holds no code",
    "labels": "a classification head is served by the transformers provider",
    "max_work_memory_mb": "the context (n_ctx) bounds llama.cpp's memory: lower n_ctx",
}
_RANGES: dict[str, tuple[int, int]] = {
    "n_ctx": (16, 1 << 20),
    "n_threads": (1, 512),
    "n_threads_batch": (1, 512),
    "n_batch": (1, 1 << 16),
    "seed": (0, (1 << 32) - 2),  # 2**32 - 1 is llama.cpp's "random"
    "max_new_tokens": (1, 1 << 20),
}


def _check(key: str, value: Any, where: str) -> Any:
    if key in _RANGES:
        low, high = _RANGES[key]
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise UsageError(
                f"{where}: {key} must be an integer from {low} to {high}, got {value!r}",
                param=key,
            )
        return value
    if key in ("embeddings", "use_mmap"):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {key} must be true or false, got {value!r}", param=key)
        return value
    if key == "pooling":
        if value not in POOLINGS:
            raise UsageError(
                f"{where}: pooling must be one of {', '.join(POOLINGS)}; got {value!r}",
                param=key,
            )
        return value
    if key == "zero_shot_template":
        if not isinstance(value, str) or "{text}" not in value:
            raise UsageError(
                f"{where}: zero_shot_template must be a string containing '{{text}}'", param=key
            )
        return value
    if key == "gguf_file":
        if (
            not isinstance(value, str)
            or "/" in value
            or "\\" in value
            or value.startswith(".")
            or not value.endswith(".gguf")
        ):
            raise UsageError(
                f"{where}: gguf_file must be a plain file name ending in .gguf, got {value!r}",
                param=key,
            )
        return value
    raise AssertionError(key)  # pragma: no cover - keys are filtered before


def _checked(table: Mapping[str, Any], where: str) -> dict[str, Any]:
    for key, why in _NOT_HONOURED.items():
        if key in table:
            raise UsageError(
                f"{where}: {key} is not an option of the llamacpp provider: {why}", param=key
            )
    task = table.get("task")
    if task not in (None, "causal"):
        raise UsageError(
            f"{where}: task {task!r}: the llamacpp provider serves causal language models"
            " (task causal); encoders and classifiers are served by the transformers provider",
            param="task",
        )
    unknown = sorted(set(table) - KEYS - _OTHERS_KEYS)
    if unknown:
        raise UsageError(
            f"{where}: unknown option(s) {', '.join(map(repr, unknown))} for the llamacpp"
            f" provider; it takes: {', '.join(sorted(KEYS))}",
            param=unknown[0],
        )
    return {key: _check(key, value, where) for key, value in table.items() if key in KEYS}


def checked_options(card: ModelCard) -> dict[str, Any]:
    """The card's own options, checked (what the provider's ``check`` returns)."""
    return {**card.options, **_checked(card.options, f"model {card.ref!r} options")}


def settings_for(card: ModelCard, operator: Mapping[str, Any]) -> Settings:
    """The effective :class:`Settings` of ``card`` under the operator's
    ``[plugins.llamacpp]`` table; a bad value or an unknown key is a
    :class:`~llmos.errors.UsageError` naming it."""
    defaults = _checked(operator, "[plugins.llamacpp]")
    own = _checked(card.options, f"model {card.ref!r} options")
    return Settings(**{**defaults, **own})
