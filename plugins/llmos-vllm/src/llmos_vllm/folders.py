"""Model and adapter folders, checked before vLLM sees them.

The model's folder is read by llmos-transformers' own checks, so both
providers accept and refuse the same things: safetensors only (a folder of
pickles is refused), a causal LM, and a GGUF file converted once into a
float32 safetensors folder in the provider's cache — the weights the
transformers provider serves, so the two answer alike.

An adapter must be one vLLM serves per request: a PEFT LoRA for a causal LM
(what llmos-peft writes for ``sft``), with no extra trained modules, DoRA or
bias, a rank within the engine's ``max_lora_rank``, and weights that fit the
base — checked against the base's ``config.json`` here, with a message that
says which, rather than as an error from inside vLLM's worker.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs

from llmos.errors import UsageError
from llmos.types import ModelCard
from llmos_vllm.options import LORA_RANKS, EngineSettings

__all__ = ["LoraAdapter", "check_adapter", "check_rank", "load_tokenizer", "model_folder"]


def _transformers_settings(settings: EngineSettings) -> Any:
    from llmos_transformers.options import Settings

    return Settings(gguf_file=settings.gguf_file, trust_remote_code=settings.trust_remote_code)


def model_folder(
    path: Path, card: ModelCard, settings: EngineSettings, cache_dir: Path | None
) -> Path:
    """The safetensors folder vLLM loads for ``card`` (its source at ``path``)."""
    from llmos_transformers.layout import inspect
    from llmos_transformers.loader import converted

    layout = inspect(path, _transformers_settings(settings))
    if layout.kind != "causal":
        raise UsageError(
            f"model {card.ref!r} ({layout.architecture}) is not a causal language model but"
            f" {layout.kind}: the vllm provider serves causal language models; serve it with the"
            " transformers provider",
            param="provider",
        )
    return converted(layout, card, cache_dir).folder


def load_tokenizer(folder: Path, settings: EngineSettings) -> Any:
    """The Hugging Face tokenizer in ``folder``: prompts and chats are made
    into tokens the way the transformers provider makes them."""
    from llmos_transformers.runtime import load_tokenizer as load

    return load(folder, _transformers_settings(settings))


@attrs.frozen(kw_only=True)
class LoraAdapter:
    """A LoRA adapter vLLM can serve on its base."""

    folder: Path
    rank: int
    #: the folder holds the tokenizer it was tuned with
    has_tokenizer: bool


#: LoRA weight names: ``…layers.<n>.<block>.<module>.lora_A.weight``
_LORA_WEIGHT = re.compile(r"layers\.(\d+)\.[a-z_]+\.([a-z_]+)\.lora_([AB])\.weight$")
_UNSUPPORTED = {
    "modules_to_save": "extra trained modules (modules_to_save)",
    "use_dora": "DoRA",
    "lora_bias": "LoRA bias",
}


def _config(folder: Path) -> dict[str, Any]:
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UsageError(f"{folder / 'config.json'}: cannot read JSON: {exc}") from None
    return data if isinstance(data, dict) else {}


def _module_sizes(config: dict[str, Any]) -> dict[str, tuple[int, int]]:
    """``(inputs, outputs)`` of a Llama-style model's linear modules, from its
    config; ``{}`` when the config does not say."""
    try:
        hidden = int(config["hidden_size"])
        heads = int(config["num_attention_heads"])
        kv_heads = int(config.get("num_key_value_heads") or heads)
        head_dim = int(config.get("head_dim") or hidden // heads)
        inner = int(config["intermediate_size"])
    except (KeyError, TypeError, ValueError):
        return {}
    return {
        "q_proj": (hidden, heads * head_dim),
        "k_proj": (hidden, kv_heads * head_dim),
        "v_proj": (hidden, kv_heads * head_dim),
        "o_proj": (heads * head_dim, hidden),
        "gate_proj": (hidden, inner),
        "up_proj": (hidden, inner),
        "down_proj": (inner, hidden),
    }


def _check_fit(folder: Path, card: ModelCard, base: ModelCard, base_folder: Path) -> None:
    """Refuse an adapter whose weights do not fit the base's modules."""
    from safetensors import safe_open

    config = _config(base_folder)
    sizes = _module_sizes(config)
    layers = config.get("num_hidden_layers")
    with safe_open(str(folder / "adapter_model.safetensors"), framework="numpy") as weights:
        for name in weights.keys():  # noqa: SIM118 - safe_open is not a mapping
            match = _LORA_WEIGHT.search(name)
            if match is None:
                continue
            layer, module, which = int(match[1]), match[2], match[3]
            shape = weights.get_slice(name).get_shape()
            inputs, outputs = sizes.get(module, (shape[1], shape[0]))
            if isinstance(layers, int) and layer >= layers:
                got = f"a layer {layer}; the base has {layers} layers"
            elif which == "A" and shape[1] != inputs:
                got = f"{module} of layer {layer} with {shape[1]} inputs; the base's has {inputs}"
            elif which == "B" and shape[0] != outputs:
                got = f"{module} of layer {layer} with {shape[0]} outputs; the base's has {outputs}"
            else:
                continue
            raise UsageError(
                f"adapter {card.ref!r} does not fit base model {base.ref!r}: it adapts {got}."
                " It was tuned on another base; serve it on that one",
                param="parents",
            )


def check_adapter(
    folder: Path,
    card: ModelCard,
    base: ModelCard,
    base_folder: Path,
    settings: EngineSettings,
) -> LoraAdapter:
    """The adapter in ``folder``, checked for vLLM and for its base (see the
    module docstring); raises :class:`~llmos.errors.UsageError` (or
    :class:`~llmos.errors.UnsafeSourceError` for pickle weights) saying why not."""
    from llmos_transformers.adapters import ADAPTER_CONFIG, TUNING_RECORD, read_adapter

    info = read_adapter(folder, card, attrs.evolve(_transformers_settings(settings), task=None))
    if info.peft_type != "LORA" or info.kind != "causal":
        raise UsageError(
            f"adapter {card.ref!r} is {info.peft_type} on a {info.kind} model; the vllm provider"
            " serves LoRA adapters of causal LMs (llmos-peft's lora method with task sft):"
            " serve this one with the transformers provider",
            param="provider",
        )
    config = json.loads((folder / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise UsageError(
                f"adapter {card.ref!r} has {what}, which vLLM does not serve; serve it with the"
                " transformers provider, or merge it (llmos peft merge)",
                param="provider",
            )
    if config.get("bias", "none") != "none":
        raise UsageError(
            f"adapter {card.ref!r} trains biases (bias = {config['bias']!r}), which vLLM does"
            " not serve; serve it with the transformers provider",
            param="provider",
        )
    record = folder / TUNING_RECORD
    if record.is_file():
        tuned_on = str(json.loads(record.read_text(encoding="utf-8")).get("base") or "")
        if tuned_on and tuned_on.split("@")[0] != base.name:
            raise UsageError(
                f"adapter {card.ref!r} was tuned on {tuned_on!r}, not on {base.ref!r} (its"
                " parents); serve it on the base it was tuned on",
                param="parents",
            )
    _check_fit(folder, card, base, base_folder)
    ranks = [int(config.get("r") or 0), *map(int, (config.get("rank_pattern") or {}).values())]
    adapter = LoraAdapter(
        folder=folder,
        rank=max(ranks),
        has_tokenizer=(folder / "tokenizer_config.json").is_file(),
    )
    check_rank(card, adapter, settings)
    return adapter


def check_rank(card: ModelCard, adapter: LoraAdapter, settings: EngineSettings) -> None:
    """Refuse an adapter whose rank the engine's LoRA slots cannot hold."""
    if adapter.rank > settings.max_lora_rank:
        fits = min((r for r in LORA_RANKS if r >= adapter.rank), default=max(LORA_RANKS))
        raise UsageError(
            f"adapter {card.ref!r} has rank {adapter.rank}, more than max_lora_rank"
            f" ({settings.max_lora_rank}) of its base's engine; set max_lora_rank to {fits} on"
            " the base (or in [plugins.vllm])",
            param="max_lora_rank",
        )
