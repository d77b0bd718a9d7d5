"""Tiny models for tests: built from a config in a second, no hub, no network.

:func:`write_json_llama` writes a 2-layer Llama whose byte-level tokenizer has
all 256 bytes, so that constrained decoding (JSON, tool calls) can spell any
answer; its output head is scaled up and never picks a special token, so a
random model still writes long, varied text. The tests of this plugin and the
repository's client matrix serve it.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

__all__ = ["CHAT_TEMPLATE", "JSON_TEXTS", "write_json_llama"]

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
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
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
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
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
        model.lm_head.weight[:4] = 0  # never a special token unless forced
        model.lm_head.weight *= 4
    model.save_pretrained(folder)
    return folder
