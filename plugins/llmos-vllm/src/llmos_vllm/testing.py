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
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)


def write_tiny_llama(folder: Path, *, seed: int = 0, context: int = 256) -> Path:
    """Write the tiny Llama and its tokenizer into ``folder`` (safetensors,
    ``save_pretrained``); ``context`` is its ``max_position_embeddings``."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=320,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(SENTENCES * 3, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )
    tokenizer.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=context,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        initializer_range=0.2,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[:4] = 0  # <unk> <pad> <s> </s>: logit 0, never the best
        model.lm_head.weight[4:] *= 3
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
