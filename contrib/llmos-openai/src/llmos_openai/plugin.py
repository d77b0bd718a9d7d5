"""The ``openai`` plugin: provider ``openai-compatible``.

A card served by it::

    [models.gpt4o-mini]
    provider = "openai-compatible"
    format = "remote-api"
    source = "https://api.openai.com/v1"          # the base URL, checked like any source
    options = { model = "gpt-4o-mini", api_key_env = "OPENAI_API_KEY" }

Operator settings are the ``[plugins.openai]`` table (see
:mod:`llmos_openai.settings`); a card may name a key only for a host the
operator pairs it with there (``key_hosts``), which :func:`check` enforces
when the card is registered and :func:`load` again when it is loaded.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import structlog

from llmos.plugin import hookimpl
from llmos.types import CheckRequest, LoadRequest, ModelFormat, ProviderSpec
from llmos_openai.model import OpenAICompatible
from llmos_openai.settings import SUPPORTED, check_settings, load_settings

__all__ = ["PROVIDER", "check", "llmos_register_providers", "load"]

PROVIDER = "openai-compatible"

log = structlog.get_logger("llmos_openai")


def check(request: CheckRequest) -> Mapping[str, Any]:
    """The provider's ``check``: the card's source and options against the
    operator's rules, its key's pairing with the source's host among them;
    the key itself is not read (the registering process may not have it)."""
    card = request.card
    check_settings(card.source, card.options, request.options, card.ref)
    return card.options


def load(request: LoadRequest) -> OpenAICompatible:
    """Check the card, read its key, open its client."""
    card = request.card
    settings = load_settings(card.source, card.options, request.options, card.ref)
    model = OpenAICompatible(card, settings)
    log.info(
        "openai.loaded",
        model=card.ref,
        upstream=settings.base_url,
        upstream_model=settings.upstream_model,
        key=settings.key_source,  # where it came from; never the key
        max_connections=settings.max_connections,
    )
    return model


@hookimpl
def llmos_register_providers(register):  # type: ignore[no-untyped-def]
    register(
        ProviderSpec(
            name=PROVIDER,
            load=load,
            check=check,
            description="any server speaking the OpenAI API (OpenAI, vLLM, LiteLLM, Ollama, llmos)",
            capabilities=SUPPORTED,
            formats=(str(ModelFormat.REMOTE_API),),
        )
    )
