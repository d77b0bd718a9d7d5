"""The llm bridge: every model simonw/llm's installed plugins register,
served by llmos.

* provider ``llm``: loads the llm model a card names —
  ``options = {"model": "<llm model id or alias>"}`` for a chat model
  (complete, chat, stream), ``{"embedding_model": "<id>"}`` for an
  embedding model (embed);
* model source: one card per model llm knows, named ``llm/<id>`` (see
  :func:`llmos_llm_bridge.catalogue.card_names`).

Card options (``ModelCard.options``, or a ``[models.NAME]`` deployment):

``model`` / ``embedding_model``
    the llm model id or alias (exactly one of the two).
``options``
    llm options sent with every prompt (``{"temperature": 0.2}``; what a
    model takes: ``llm models --options``), checked against the model's
    options when it loads.
``system``
    a system prompt put before the request's own system messages.
``sampling``
    where llmos's sampling fields go, ``{"max_tokens": "length"}``; by default
    ``max_tokens``, ``temperature``, ``top_p``, ``seed`` and ``stop`` go to the
    llm option of the same name when the model has one (``max_tokens`` also to
    ``max_output_tokens``; ``stop`` also to ``stop_sequences``). Stop
    sequences are also enforced by the bridge on the text it returns.

API keys stay llm's business: llm plugins read them from llm's key store
(``llm keys set openai``: ``keys.json`` in llm's user folder,
``$LLM_USER_PATH``) or from their environment variable (``OPENAI_API_KEY`` …)
in the daemon's environment. The bridge never reads, stores nor logs a key;
it only asks the model, when loading it, whether it has one, so that a
missing key is a clear load error instead of a failure on every request.

``llm`` is imported only when a card is discovered or loaded, never when the
plugin is loaded (CLI start-up stays quick, and llmos keeps working when llm
is missing).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from llmos.errors import LlmosError, UsageError
from llmos.plugin import hookimpl
from llmos.types import (
    Capability,
    LoadedModel,
    LoadRequest,
    ModelCard,
    ModelFormat,
    ProviderSpec,
)

__all__ = ["PLUGIN", "PROVIDER", "card_for", "cards", "load"]

log = structlog.get_logger("llmos_llm_bridge")

#: the plugin's name: its entry-point name in pyproject.toml
PLUGIN = "llm-bridge"
#: what the cards put in ``provider``
PROVIDER = "llm"

#: card options this provider reads, plus the kernel's batching keys
_OPTIONS = {"model", "embedding_model", "options", "system", "sampling"}
_KERNEL_OPTIONS = {"max_batch_size", "max_wait_ms", "max_queue"}


def _require_llm() -> None:
    try:
        import llm  # noqa: F401
    except ImportError as exc:
        raise LlmosError(
            f"the llm bridge needs the `llm` package ({exc}); install it: pip install llm"
        ) from None


def _table(options: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    value = options.get(key) or {}
    if not isinstance(value, Mapping):
        raise UsageError(f"llm card option {key!r} must be a table, got {type(value).__name__}")
    return value


def load(request: LoadRequest) -> LoadedModel:
    """The provider's ``load``: find the llm model the card names and wrap it."""
    from llmos_llm_bridge import catalogue as cat
    from llmos_llm_bridge.model import LlmChatModel, LlmEmbeddingModel, _llm_errors

    card = request.card
    options = dict(card.options)
    unknown = sorted(set(options) - _OPTIONS - _KERNEL_OPTIONS)
    if unknown:
        raise UsageError(
            f"model {card.name!r}: unknown llm card option(s) {', '.join(unknown)};"
            f" known: {', '.join(sorted(_OPTIONS))}"
        )
    chat_id, embed_id = options.get("model"), options.get("embedding_model")
    if (chat_id is None) == (embed_id is None):
        raise UsageError(
            f"model {card.name!r}: an llm card names exactly one of options.model (an llm"
            " model id, `llm models`) and options.embedding_model (`llm embed-models`)"
        )
    name = chat_id if chat_id is not None else embed_id
    if not isinstance(name, str) or not name:
        raise UsageError(f"model {card.name!r}: the llm model id must be a non-empty string")
    system = options.get("system")
    if system is not None and not isinstance(system, str):
        raise UsageError(f"model {card.name!r}: option 'system' must be a string")
    _require_llm()
    kind = cat.CHAT if chat_id is not None else cat.EMBEDDING
    entry = cat.find(cat.catalogue(), kind, name)
    model = entry.model
    if getattr(model, "needs_key", None):
        with _llm_errors(entry.model_id):
            model.get_key()  # raises NeedsKeyException; the key itself is not kept
    if kind == cat.EMBEDDING:
        if options.get("options") or options.get("sampling") or system:
            raise UsageError(
                f"model {card.name!r}: an llm embedding model takes no options, system or sampling"
            )
        return LlmEmbeddingModel(card, model)
    return LlmChatModel(
        card,
        model,
        options=_table(options, "options"),
        system=system,
        sampling=_table(options, "sampling"),
    )


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
                "models of simonw/llm's installed plugins (options.model: an llm model id)"
            ),
            capabilities={
                Capability.COMPLETE,
                Capability.CHAT,
                Capability.STREAM,
                Capability.EMBED,
            },
            formats=(ModelFormat.REMOTE_API, ModelFormat.OTHER),
        )
    )


# --------------------------------------------------------------------------
# Model source
# --------------------------------------------------------------------------


def card_for(entry: Any, name: str) -> ModelCard:
    """The llmos card of one llm model."""
    from llmos_llm_bridge.catalogue import CHAT

    model = entry.model
    needs_key = getattr(model, "needs_key", None)
    origin = (
        f"built into llm {entry.version}"
        if entry.distribution == "llm"
        else f"from the llm plugin {entry.distribution} {entry.version}".rstrip()
    )
    description = f"{model} ({origin})"
    if entry.aliases:
        description += f"; llm aliases: {', '.join(entry.aliases)}"
    if needs_key:
        description += f"; needs a key: `llm keys set {needs_key}`"
    chat = entry.kind == CHAT
    tags = ["llm", entry.distribution]
    if needs_key:
        tags.append("needs-key")
    return ModelCard(
        name=name,
        provider=PROVIDER,
        tasks=("chat", "text-generation") if chat else ("embedding",),
        # A model that needs a key is a vendor's API; the others run here
        # (or on a server llm's plugin knows, like Ollama's).
        format=ModelFormat.REMOTE_API if needs_key else ModelFormat.OTHER,
        description=description,
        tags=tuple(tags),
        options={"model" if chat else "embedding_model": entry.model_id},
    )


def cards() -> list[ModelCard]:
    """One card per model llm's plugins register (the last registration of
    an id wins, as in llm)."""
    from llmos_llm_bridge.catalogue import card_names, catalogue

    entries = {(e.kind, e.model_id): e for e in catalogue().entries}
    names = card_names(entries.values())
    return [card_for(entries[key], names[key]) for key in sorted(entries, key=names.get)]


@hookimpl
def llmos_discover_models(register: Callable[[ModelCard], None]) -> None:
    # Discovery must never fail the kernel: a broken llm plugin is skipped
    # inside catalogue(); anything else (llm missing, llm broken) is a warning
    # and no cards.
    try:
        found = cards()
    except ImportError as exc:
        log.warning("llm_bridge.llm_missing", error=str(exc), hint="pip install llm")
        return
    except Exception as exc:
        log.warning("llm_bridge.discovery_failed", error=f"{type(exc).__name__}: {exc}")
        return
    for card in found:
        register(card)
