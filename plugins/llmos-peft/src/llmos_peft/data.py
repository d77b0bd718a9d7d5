"""Rows to token ids, and batches of them to tensors.

Classification rows are tokenized the way the transformers provider will
tokenize a request to the tuned model (its special tokens, cut at
``max_length``). An SFT row is a prompt and a response: the prompt is
tokenized exactly as the provider tokenizes what it is asked — through the
chat template with the generation prompt when the model chats, else as plain
text — and the response follows it (the rest of the chat template's turn, or
the text and an end-of-sequence token), so the model learns to answer and to
stop. Only the response's tokens carry a loss.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs
import torch

from llmos.errors import UsageError

__all__ = [
    "IGNORE",
    "Collator",
    "Example",
    "encode_classification",
    "encode_sft",
    "sft_ids",
]

#: the label of a token that carries no loss (what transformers' losses skip)
IGNORE = -100


@attrs.frozen
class Example:
    """One tokenized row."""

    input_ids: tuple[int, ...] = attrs.field(converter=tuple)
    #: classification: the label's index; sft: unused
    label: int = IGNORE
    #: sft: how many leading tokens are the prompt (no loss on them)
    prompt_length: int = 0


def encode_classification(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    label_ids: Mapping[str, int],
    max_length: int,
    split: str,
) -> list[Example]:
    """``{"text", "label"}`` rows as examples; an unknown label is an error."""
    texts, labels = [], []
    for number, row in enumerate(rows, 1):
        text, label = row.get("text"), row.get("label")
        if not isinstance(text, str):
            raise UsageError(f"{split} row {number}: no text")
        if str(label) not in label_ids:
            raise UsageError(
                f"{split} row {number}: label {label!r} is not one of the labels"
                f" ({', '.join(label_ids)})"
            )
        texts.append(text)
        labels.append(label_ids[str(label)])
    if not texts:
        return []
    encoded = tokenizer(texts, truncation=True, max_length=max_length)
    return [
        Example(input_ids=ids, label=label)
        for ids, label in zip(encoded["input_ids"], labels, strict=True)
    ]


def sft_ids(
    tokenizer: Any, prompt: str, response: str, max_length: int, chat: bool
) -> tuple[list[int], list[int]]:
    """The token ids of ``prompt`` and of ``response`` after it, cut to
    ``max_length`` in all: the prompt loses its start before the response
    loses its end, and the response keeps at least half of the room."""
    if chat:
        turn = [{"role": "user", "content": prompt}]
        asked = tokenizer.apply_chat_template(
            turn, add_generation_prompt=True, tokenize=True, return_dict=True
        )
        prompt_ids = list(asked["input_ids"])
        prompt_text = tokenizer.apply_chat_template(
            turn, add_generation_prompt=True, tokenize=False
        )
        full = tokenizer.apply_chat_template(
            [*turn, {"role": "assistant", "content": response}], tokenize=False
        )
        # the rest of the assistant's turn (its end marker too); a template that
        # does not render the question the same way both times gets the bare answer
        answer = full[len(prompt_text) :] if full.startswith(prompt_text) else None
    else:
        prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
        answer = None
    if answer is not None:
        response_ids = list(tokenizer(answer, add_special_tokens=False)["input_ids"])
    else:
        response_ids = list(tokenizer(response, add_special_tokens=False)["input_ids"])
        if tokenizer.eos_token_id is not None:
            response_ids.append(int(tokenizer.eos_token_id))
    keep_response = min(len(response_ids), max(max_length - len(prompt_ids), max_length // 2))
    response_ids = response_ids[:keep_response]
    keep_prompt = max_length - len(response_ids)
    prompt_ids = prompt_ids[max(0, len(prompt_ids) - keep_prompt) :]
    return prompt_ids, response_ids


def encode_sft(
    tokenizer: Any,
    rows: Sequence[Mapping[str, Any]],
    max_length: int,
    chat: bool,
    split: str,
) -> list[Example]:
    """``{"prompt", "response"}`` rows as examples (see :func:`sft_ids`)."""
    examples = []
    for number, row in enumerate(rows, 1):
        prompt, response = row.get("prompt"), row.get("response")
        if not isinstance(prompt, str) or not isinstance(response, str):
            raise UsageError(f"{split} row {number}: an sft row needs a prompt and a response")
        prompt_ids, response_ids = sft_ids(tokenizer, prompt, response, max_length, chat)
        if not response_ids:
            raise UsageError(f"{split} row {number}: the response has no tokens")
        examples.append(Example(input_ids=prompt_ids + response_ids, prompt_length=len(prompt_ids)))
    return examples


@attrs.frozen
class Collator:
    """Pads a batch of examples into the tensors a forward pass takes.

    ``labels`` is the class index per row for classification; for sft it is
    the ids themselves with :data:`IGNORE` on the prompt and the padding, so
    the loss covers the response alone.
    """

    pad_id: int
    sft: bool
    padding_side: str = "right"

    def __call__(self, batch: Sequence[Example]) -> dict[str, torch.Tensor]:
        width = max(len(e.input_ids) for e in batch)
        ids = torch.full((len(batch), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        for row, example in enumerate(batch):
            n = len(example.input_ids)
            at = slice(width - n, width) if self.padding_side == "left" else slice(0, n)
            ids[row, at] = torch.tensor(example.input_ids, dtype=torch.long)
            mask[row, at] = 1
            if self.sft:
                labels[row, at] = ids[row, at]
                start = at.start
                labels[row, start : start + example.prompt_length] = IGNORE
        out = {"input_ids": ids, "attention_mask": mask}
        if self.sft:
            out["labels"] = labels
        else:
            out["labels"] = torch.tensor([e.label for e in batch], dtype=torch.long)
        return out
