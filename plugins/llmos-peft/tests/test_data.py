"""Tokenizing rows, padding batches, masking the SFT loss, and the scores."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from llmos_peft.data import IGNORE, Collator, Example, encode_sft, sft_ids
from llmos_peft.metrics import accuracy, macro_f1


@pytest.fixture(scope="module")
def tokenizer(llama_dir: Path) -> object:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)


def test_the_sft_collator_puts_the_loss_on_response_tokens_only() -> None:
    batch = [
        Example(input_ids=[5, 6, 7, 8, 9], prompt_length=3),  # prompt 5 6 7, response 8 9
        Example(input_ids=[10, 11, 12], prompt_length=1),
    ]
    out = Collator(pad_id=1, sft=True)(batch)
    assert out["input_ids"].tolist() == [[5, 6, 7, 8, 9], [10, 11, 12, 1, 1]]
    assert out["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 0, 0]]
    assert out["labels"].tolist() == [
        [IGNORE, IGNORE, IGNORE, 8, 9],
        [IGNORE, 11, 12, IGNORE, IGNORE],
    ]
    left = Collator(pad_id=1, sft=True, padding_side="left")(batch)
    assert left["labels"].tolist()[1] == [IGNORE, IGNORE, IGNORE, 11, 12]
    classes = Collator(pad_id=0, sft=False)([Example([2, 3], label=1), Example([2], label=0)])
    assert classes["labels"].tolist() == [1, 0]
    assert classes["input_ids"].tolist() == [[2, 3], [2, 0]]


def test_sft_prompts_are_tokenized_as_the_provider_asks_them(tokenizer: object) -> None:
    prompt_ids, response_ids = sft_ids(tokenizer, "greet anna", "hello anna", 128, chat=True)
    asked = tokenizer.apply_chat_template(  # what CausalLM.chat sends
        [{"role": "user", "content": "greet anna"}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
    )["input_ids"]
    assert prompt_ids == list(asked)
    # the response ends the assistant's turn the way the template does: "</s>\n"
    assert tokenizer.decode(response_ids) == "hello anna</s>\n"
    plain_prompt, plain_response = sft_ids(tokenizer, "greet anna", "hello anna", 128, chat=False)
    assert plain_prompt == tokenizer("greet anna")["input_ids"]
    assert plain_response[-1] == tokenizer.eos_token_id


def test_a_long_row_loses_its_prompt_before_its_response(tokenizer: object) -> None:
    prompt, response = sft_ids(tokenizer, "greet anna " * 40, "hello anna", 24, chat=False)
    assert len(prompt) + len(response) == 24
    assert tokenizer.decode(response) == "hello anna</s>"
    [example] = encode_sft(tokenizer, [{"prompt": "greet bob", "response": "hi"}], 64, True, "x")
    collated = Collator(pad_id=1, sft=True)([example])
    kept = [t for t in collated["labels"][0].tolist() if t != IGNORE]
    assert tokenizer.decode(kept) == "hi</s>\n"
    assert torch.equal(collated["input_ids"][0, example.prompt_length :], torch.tensor(kept))


def test_accuracy_and_macro_f1() -> None:
    gold, predicted = [0, 0, 1, 1, 2], [0, 1, 1, 1, 0]
    assert accuracy(gold, predicted) == 3 / 5
    # class 0: tp 1 fp 1 fn 1 -> 0.5; class 1: tp 2 fp 1 fn 0 -> 0.8; class 2: 0
    assert macro_f1(gold, predicted) == pytest.approx((0.5 + 0.8 + 0.0) / 3)
    assert macro_f1([1, 1], [1, 1]) == 1.0
    assert accuracy([], []) == 0.0
