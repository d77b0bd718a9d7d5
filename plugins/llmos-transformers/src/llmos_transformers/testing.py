"""Tiny models for tests: built from a config in a second, no hub, no network.

:func:`write_llama` writes a 2-layer Llama of a chosen width whose byte-level
tokenizer has all 256 bytes; its output head is scaled up and never picks a
special token, so a random model still writes long, varied text.
:func:`write_json_llama` is the one this plugin's structured-output tests and
the repository's client matrix serve (trained on JSON, so constrained decoding
can spell any answer); llmos-vllm's test model is another.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "JSON_TEXTS", "write_json_llama", "write_llama"]

#: a plain chat template: ``<s>role: content</s>`` per message
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
#: what the tokenizer is trained on: a tool call, a question, a JSON object
JSON_TEXTS: tuple[str, ...] = (
    '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "c"}}',
    "the cat sat on the mat. what is the weather in paris?",
    '{"answer": true, "colour": "red", "tags": ["a", "b"]}',
)


def write_json_llama(
    folder: Path,
    *,
    texts: Sequence[str] = JSON_TEXTS,
    chat_template: str = CHAT_TEMPLATE,
    context: int = 4096,
    seed: int = 0,
) -> Path:
    """Write the model and its tokenizer into ``folder`` (safetensors) and return it."""
    return write_llama(
        folder, texts=texts, chat_template=chat_template, context=context, seed=seed
    )


def write_llama(
    folder: Path,
    *,
    texts: Sequence[str],
    chat_template: str = CHAT_TEMPLATE,
    vocab_size: int = 400,
    hidden_size: int = 32,
    heads: int = 4,
    kv_heads: int = 2,
    context: int = 4096,
    head_scale: float = 4.0,
    seed: int = 0,
) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on ``texts``
    (all 256 bytes in its alphabet), written into ``folder``. Its output head
    gives the four special tokens logit 0 (never the best) and is scaled by
    ``head_scale`` elsewhere, so greedy text is long and far from ties."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts) * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.chat_template = chat_template
    folder.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(folder)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=2 * hidden_size,
        num_hidden_layers=2,
        num_attention_heads=heads,
        num_key_value_heads=kv_heads,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # with 0.02, a hidden size of 32 cannot move the logits off uniform
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[:4] = 0  # <unk> <pad> <s> </s>: never, unless forced
        model.lm_head.weight[4:] *= head_scale
    model.save_pretrained(folder)
    return folder
