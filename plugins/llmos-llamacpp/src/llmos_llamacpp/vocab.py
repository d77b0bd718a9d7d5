"""llama.cpp's tokenizer behind the few methods of a Hugging Face tokenizer
that :mod:`llmos_transformers.tokens` calls.

That module turns requests into prompt ids and generated ids into answer
text, stop cuts, stream chunks and logprob names for the transformers and
vLLM providers; given this adapter it does the same here, so a request makes
the same kind of prompt and the same answer text whichever provider serves
it. The chat template is the one the GGUF file carries
(``tokenizer.chat_template``), rendered the way transformers renders it (a
sandboxed Jinja environment, ``trim_blocks``/``lstrip_blocks``), and its text
tokenized with special tokens parsed and no BOS added (the template writes
its own).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

__all__ = ["Vocab"]


def _raise(message: str) -> None:
    raise ValueError(message)


def _tojson(value: Any, indent: int | None = None, **_: Any) -> str:
    # transformers' own tojson: no HTML escaping, non-ASCII kept
    return json.dumps(value, ensure_ascii=False, indent=indent)


class Vocab:
    """The tokenizer of a loaded ``llama_cpp.Llama``, shaped like a Hugging
    Face tokenizer (``__call__``, ``decode``, ``apply_chat_template``,
    ``bos_token_id``, ``eos_token_id``, ``chat_template``, ``len``)."""

    def __init__(self, llama: Any) -> None:
        self.llama = llama
        model = llama._model
        metadata = llama.metadata
        self.chat_template: str | None = metadata.get("tokenizer.chat_template") or None
        bos, eos = model.token_bos(), model.token_eos()
        self.bos_token_id: int | None = bos if bos >= 0 else None
        self.eos_token_id: int | None = eos if eos >= 0 else None
        self.bos_token = model.token_get_text(bos) if bos >= 0 else ""
        self.eos_token = model.token_get_text(eos) if eos >= 0 else ""
        self.n_vocab = int(llama.n_vocab())
        self._template: Any = None

    def __len__(self) -> int:
        return self.n_vocab

    def encode(self, text: str, *, add_special_tokens: bool) -> list[int]:
        """Ids of ``text``; special tokens written in it are parsed as such (as
        a Hugging Face tokenizer does); BOS only when the vocabulary adds one."""
        return list(
            self.llama.tokenize(text.encode("utf-8"), add_bos=add_special_tokens, special=True)
        )

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": self.encode(text, add_special_tokens=add_special_tokens)}

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        """The text of ``ids``; an unfinished UTF-8 sequence becomes U+FFFD, as
        transformers decodes it (streams hold it back until it is whole)."""
        data = self.llama.detokenize(list(ids), special=not skip_special_tokens)
        return bytes(data).decode("utf-8", errors="replace")

    def _compiled(self) -> Any:
        if self._template is None:
            from jinja2.ext import loopcontrols
            from jinja2.sandbox import ImmutableSandboxedEnvironment

            env = ImmutableSandboxedEnvironment(
                trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols]
            )
            env.filters["tojson"] = _tojson
            env.globals["raise_exception"] = _raise
            env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
            self._template = env.from_string(self.chat_template or "")
        return self._template

    def apply_chat_template(
        self,
        conversation: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        tokenize: bool = True,
        return_dict: bool = True,
        **options: Any,
    ) -> Any:
        """The conversation through the GGUF file's chat template: its ids
        (``{"input_ids": [...]}``), or its text when ``tokenize`` is false."""
        text = self._compiled().render(
            messages=conversation,
            add_generation_prompt=add_generation_prompt,
            bos_token=self.bos_token,
            eos_token=self.eos_token,
            **options,
        )
        if not tokenize:
            return text
        ids = self.encode(text, add_special_tokens=False)
        return {"input_ids": ids} if return_dict else ids
