"""A tiny Llama for tests and benchmarks, made in a second with no network.

vLLM's CPU attention takes head sizes of 32 and more, so this model is a
little wider than llmos-transformers' test Llama: 2 layers, hidden 64, two
heads of 32 (one key/value head), a byte-level BPE tokenizer trained with
``tokenizers`` on a few sentences, with a chat template. Its output head
never picks a special token and is scaled up, so greedy text is long and far
from ties: two engines computing in float32 pick the same tokens.
"""

from __future__ import annotations

from pathlib import Path

from llmos_transformers.testing import CHAT_TEMPLATE, write_llama

__all__ = ["CHAT_TEMPLATE", "SENTENCES", "write_tiny_llama"]

SENTENCES = [
    "the cat sat on the mat.",
    "a dog ran in the park!",
    "what is the capital of france? paris is.",
    "hello world, how are you today?",
    "stock markets fell sharply on monday.",
    "a kitten is on the rug.",
    "greet anna hello anna, nice to see you",
    "user: assistant: system:",
]


def write_tiny_llama(folder: Path, *, seed: int = 0, context: int = 256) -> Path:
    """Write the tiny Llama and its tokenizer into ``folder`` (safetensors,
    ``save_pretrained``); ``context`` is its ``max_position_embeddings``."""
    return write_llama(
        folder,
        texts=SENTENCES,
        chat_template=CHAT_TEMPLATE,
        vocab_size=320,
        hidden_size=64,
        heads=2,
        kv_heads=1,
        context=context,
        head_scale=3.0,
        seed=seed,
    )
