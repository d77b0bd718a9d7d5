"""The provider's options: what starts an engine, and what each served model adds.

Two kinds of keys, from two places:

* **engine keys** (dtype, context length, KV cache, LoRA slots …) decide the
  vLLM engine a model runs in. They come from the operator's
  ``[plugins.vllm]`` table and the card of the model whose weights the engine
  holds — the model itself, or an adapter's base: an adapter runs in its
  base's engine, so engine keys on an adapter's card are refused;
* **model keys** (``max_new_tokens``, ``zero_shot_template``) belong to each
  served model, base or adapter.

A card's value wins over the operator's, except what only the operator may
grant: running a model folder's own code (``trust_remote_code``) needs
``allow_remote_code`` in the operator's table. Keys the transformers
provider takes but vLLM cannot honour (``device``, ``threads``, ``labels``,
a ``task`` other than ``causal``) are refused with what to do instead, so a
card moved from ``provider = "transformers"`` fails loudly rather than
silently doing something else.

Nothing here imports vLLM or torch.
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
    "ENGINE_KEYS",
    "EngineSettings",
    "ModelSettings",
    "engine_settings",
    "model_settings",
    "stats_interval",
]

log = structlog.get_logger("llmos.vllm")

DTYPES = ("auto", "float32", "bfloat16", "float16")
DEFAULT_MAX_NEW_TOKENS = 256
DEFAULT_ZERO_SHOT_TEMPLATE = "Text: {text}\nLabel: "
#: LoRA ranks vLLM's kernels are built for (``max_lora_rank``)
LORA_RANKS = (8, 16, 32, 64, 128, 256, 320, 512)


@attrs.frozen(kw_only=True)
class EngineSettings:
    """What one vLLM engine is started with; equal settings on one model
    folder share one engine."""

    #: ``auto``: the dtype in the model's config.json
    dtype: str = "auto"
    #: context length (prompt and answer); ``None``: the model's own
    max_model_len: int | None = None
    #: requests decoded together; ``None``: vLLM's default
    max_num_seqs: int | None = None
    max_num_batched_tokens: int | None = None
    #: GPU: share of its memory vLLM may take; ``None``: vLLM's default (0.9)
    gpu_memory_utilization: float | None = None
    #: the KV cache's size in GiB; ``None``: vLLM's own rule (on CPU,
    #: ``VLLM_CPU_KVCACHE_SPACE``)
    kv_cache_gib: float | None = None
    #: no torch.compile and no CUDA graphs: a quicker start, slower steps
    enforce_eager: bool = False
    enable_prefix_caching: bool | None = None
    tensor_parallel_size: int = 1
    #: the engine's random seed (a request's own seed wins for that request)
    seed: int = 0
    #: LoRA slots: on by default, so adapters on this base load without a restart
    enable_lora: bool = True
    max_lora_rank: int = 16
    #: adapters in one batch
    max_loras: int = 4
    #: adapters kept in (CPU) memory; ``None``: vLLM's default (``max_loras``)
    max_cpu_loras: int | None = None
    trust_remote_code: bool = False
    #: the GGUF file to load when the source is a folder holding several
    gguf_file: str | None = None

    def engine_args(self) -> dict[str, Any]:
        """Keyword arguments for vLLM's ``AsyncEngineArgs`` (the model folder aside)."""
        args: dict[str, Any] = {
            "dtype": self.dtype,
            "enforce_eager": self.enforce_eager,
            "tensor_parallel_size": self.tensor_parallel_size,
            "seed": self.seed,
            "trust_remote_code": self.trust_remote_code,
            "enable_lora": self.enable_lora,
        }
        if self.enable_lora:
            args.update(max_lora_rank=self.max_lora_rank, max_loras=self.max_loras)
            if self.max_cpu_loras is not None:
                args["max_cpu_loras"] = self.max_cpu_loras
        optional = {
            "max_model_len": self.max_model_len,
            "max_num_seqs": self.max_num_seqs,
            "max_num_batched_tokens": self.max_num_batched_tokens,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "enable_prefix_caching": self.enable_prefix_caching,
        }
        args.update({k: v for k, v in optional.items() if v is not None})
        if self.kv_cache_gib is not None:
            args["kv_cache_memory_bytes"] = int(self.kv_cache_gib * (1 << 30))
        return args


@attrs.frozen(kw_only=True)
class ModelSettings:
    """One served model's own options."""

    #: the default and the ceiling of tokens generated per request
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    #: zero-shot classification prompt; must contain ``{text}``
    zero_shot_template: str = DEFAULT_ZERO_SHOT_TEMPLATE


ENGINE_KEYS = frozenset(a.name for a in attrs.fields(EngineSettings))
MODEL_KEYS = frozenset(a.name for a in attrs.fields(ModelSettings))
#: keys only the operator's table may hold
OPERATOR_KEYS = frozenset({"allow_remote_code", "stats_interval_s"})
#: keys other parts own: the kernel's queue and batching (``max_batch_size``
#: does nothing here: vLLM batches on its own), llmos-peft's record of how an
#: adapter was made (``task`` is checked: only ``causal``)
_OTHERS_KEYS = frozenset(
    {"max_batch_size", "max_wait_ms", "max_queue", "method", "tuning", "merge", "task"}
)
#: transformers-provider keys vLLM cannot honour, and what to do instead
_NOT_HONOURED = {
    "device": "vLLM runs on the platform its build is for (vllm-cpu: the CPU, vllm: CUDA);"
    " install the other build to move it",
    "threads": "vLLM's CPU worker takes its cores from VLLM_CPU_OMP_THREADS_BIND",
    "labels": "a classification head is served by the transformers provider; vLLM serves"
    " causal LMs and their LoRA adapters",
}


def _positive_int(name: str, value: Any, where: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UsageError(f"{where}: {name} must be a positive integer, got {value!r}", param=name)
    return value


def _check(key: str, value: Any, where: str) -> Any:
    if key == "dtype":
        if value not in DTYPES:
            raise UsageError(
                f"{where}: dtype must be one of {', '.join(DTYPES)}; got {value!r}", param=key
            )
        return value
    if key in ("max_model_len", "max_num_seqs", "max_num_batched_tokens", "max_new_tokens"):
        return _positive_int(key, value, where)
    if key in ("tensor_parallel_size", "max_loras", "max_cpu_loras"):
        return _positive_int(key, value, where)
    if key == "seed":
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise UsageError(f"{where}: seed must be an integer >= 0, got {value!r}", param=key)
        return value
    if key == "max_lora_rank":
        if value not in LORA_RANKS:
            raise UsageError(
                f"{where}: max_lora_rank must be one of {', '.join(map(str, LORA_RANKS))}"
                f" (the ranks vLLM's LoRA kernels take); got {value!r}",
                param=key,
            )
        return value
    if key == "gpu_memory_utilization":
        if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 1:
            raise UsageError(f"{where}: {key} must be in (0, 1], got {value!r}", param=key)
        return float(value)
    if key in ("kv_cache_gib", "stats_interval_s"):
        if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
            raise UsageError(f"{where}: {key} must be a number > 0, got {value!r}", param=key)
        return float(value)
    if key in (
        "enforce_eager",
        "enable_prefix_caching",
        "enable_lora",
        "trust_remote_code",
        "allow_remote_code",
    ):
        if not isinstance(value, bool):
            raise UsageError(f"{where}: {key} must be true or false, got {value!r}", param=key)
        return value
    if key == "zero_shot_template":
        if not isinstance(value, str) or "{text}" not in value:
            raise UsageError(f"{where}: zero_shot_template must be a string containing '{{text}}'")
        return value
    if key == "gguf_file":
        if not isinstance(value, str) or "/" in value or "\\" in value or value.startswith("."):
            raise UsageError(f"{where}: gguf_file must be a plain file name, got {value!r}")
        return value
    raise AssertionError(key)  # pragma: no cover - keys are filtered before


def _checked(table: Mapping[str, Any], allowed: frozenset[str], where: str) -> dict[str, Any]:
    """The ``allowed`` keys of ``table``, checked; refuses what vLLM cannot
    honour, warns about keys nobody knows (another plugin's may share a card)."""
    for key, why in _NOT_HONOURED.items():
        if key in table:
            raise UsageError(
                f"{where}: {key} is not an option of the vllm provider: {why}", param=key
            )
    task = table.get("task")
    if task not in (None, "causal"):
        raise UsageError(
            f"{where}: task {task!r}: the vllm provider serves causal language models (task"
            " causal); encoders and classifiers are served by the transformers provider",
            param="task",
        )
    known = ENGINE_KEYS | MODEL_KEYS | OPERATOR_KEYS | _OTHERS_KEYS
    unknown = sorted(set(table) - known)
    if unknown:
        log.warning("vllm.unknown_options", where=where, keys=unknown)
    return {key: _check(key, value, where) for key, value in table.items() if key in allowed}


def _operator(operator: Mapping[str, Any]) -> dict[str, Any]:
    return _checked(operator, ENGINE_KEYS | MODEL_KEYS | OPERATOR_KEYS, "[plugins.vllm]")


def engine_settings(card: ModelCard, operator: Mapping[str, Any]) -> EngineSettings:
    """The engine that serves ``card``'s weights (a base model's card).

    Raises :class:`~llmos.errors.UsageError` for a bad value or an option
    vLLM cannot honour, and :class:`~llmos.errors.UnsafeSourceError` when
    remote code is asked for but the operator has not allowed it.
    """
    defaults = _operator(operator)
    allowed = defaults.get("allow_remote_code", False)
    where = f"model {card.ref!r} options"
    if "allow_remote_code" in card.options or "stats_interval_s" in card.options:
        raise UsageError(
            f"{where}: allow_remote_code and stats_interval_s are the operator's: set them in"
            " [plugins.vllm]",
            param="options",
        )
    own = _checked(card.options, ENGINE_KEYS | MODEL_KEYS, where)
    merged = {
        **{k: v for k, v in defaults.items() if k in ENGINE_KEYS},
        **{k: v for k, v in own.items() if k in ENGINE_KEYS},
    }
    if merged.get("trust_remote_code") and not allowed:
        raise UnsafeSourceError(
            f"model {card.ref!r} asks for trust_remote_code, which runs the Python code in its"
            " folder; the operator must allow it with [plugins.vllm] allow_remote_code = true",
            param="trust_remote_code",
        )
    settings = EngineSettings(**merged)
    if settings.max_cpu_loras is not None and settings.max_cpu_loras < settings.max_loras:
        raise UsageError(
            f"{where}: max_cpu_loras ({settings.max_cpu_loras}) must be at least max_loras"
            f" ({settings.max_loras})",
            param="max_cpu_loras",
        )
    return settings


def model_settings(card: ModelCard, operator: Mapping[str, Any], *, adapter: bool) -> ModelSettings:
    """The served model's own settings; an adapter's card may hold no engine key."""
    defaults = _operator(operator)
    where = f"model {card.ref!r} options"
    own = _checked(card.options, ENGINE_KEYS | MODEL_KEYS, where)
    if adapter:
        engine_keys = sorted(set(own) & ENGINE_KEYS)
        if engine_keys:
            raise UsageError(
                f"adapter {card.ref!r} sets {', '.join(engine_keys)}: an adapter runs in its"
                " base model's engine, so engine options go on the base's card or in"
                " [plugins.vllm]",
                param="options",
            )
    merged = {
        **{k: v for k, v in defaults.items() if k in MODEL_KEYS},
        **{k: v for k, v in own.items() if k in MODEL_KEYS},
    }
    return ModelSettings(**merged)


def stats_interval(operator: Mapping[str, Any]) -> float:
    """Seconds between two ``engine.stats`` monitor events of a busy engine."""
    return float(_operator(operator).get("stats_interval_s", 1.0))
