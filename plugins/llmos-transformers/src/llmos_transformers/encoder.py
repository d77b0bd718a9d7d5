"""Encoders: sentence embeddings, and classifiers with a trained head.

:class:`Encoder` pools a bare encoder's token vectors the way the folder's
sentence-transformers config says (mean over the attention mask unless told
otherwise) and normalises them to unit length when the folder's
``modules.json`` ends in ``Normalize``. :class:`Classifier` answers with the
softmax of a sequence-classification head over its ``id2label`` names.

An input longer than the model takes (its position embeddings, its
tokenizer's ``model_max_length``) is refused, not cut, with one exception
that is the model's own choice: a sentence-transformers folder's
``max_seq_length`` (256 for MiniLM), at which sentence-transformers itself
truncates, and so does :class:`Encoder`.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from llmos.errors import UsageError
from llmos.types import (
    Capability,
    ClassifyRequest,
    ClassifyResult,
    EmbedRequest,
    EmbedResult,
    ModelBase,
    ModelCard,
    Usage,
)
from llmos_transformers.layout import Layout
from llmos_transformers.options import Settings
from llmos_transformers.runtime import ensure_padding, release

__all__ = ["Classifier", "Encoder", "pool"]

#: tokenizers that do not know their limit say so with a huge model_max_length
_NO_LIMIT = 1_000_000


def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row of ``hidden`` (batch, tokens, width) under ``mask``."""
    weights = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "cls":
        return hidden[:, 0]
    if mode == "max":
        return hidden.masked_fill(weights == 0, torch.finfo(hidden.dtype).min).amax(dim=1)
    if mode == "lasttoken":
        # the last real token of each row, whichever side the padding is on
        positions = torch.arange(mask.shape[1], device=mask.device).expand_as(mask)
        last = (positions * mask).amax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    summed = (hidden * weights).sum(dim=1)
    counts = weights.sum(dim=1).clamp(min=1e-9)
    if mode == "mean_sqrt_len":
        return summed / counts.sqrt()
    return summed / counts


class _EncoderBase(ModelBase):
    def __init__(
        self, card: ModelCard, model: Any, tokenizer: Any, settings: Settings, device: torch.device
    ) -> None:
        super().__init__(card)
        self.model = model
        self.tokenizer = tokenizer
        self.device = device
        self.max_batch_size = settings.max_batch_size
        if tokenizer.pad_token is None:  # GPT-2-style heads batch with eos as padding
            ensure_padding(model, tokenizer)
        self.max_length = self._max_length(None)
        #: cut inputs at ``max_length`` (the folder says so) rather than refuse them
        self.truncates = False
        self._lock = threading.Lock()

    def _max_length(self, own: int | None) -> int | None:
        limits = [own, getattr(self.model.config, "max_position_embeddings", None)]
        model_max = getattr(self.tokenizer, "model_max_length", None)
        if isinstance(model_max, int) and model_max < _NO_LIMIT:
            limits.append(model_max)
        known = [limit for limit in limits if isinstance(limit, int) and limit > 0]
        return min(known) if known else None

    def _check_lengths(self, texts: Sequence[str], param: str) -> None:
        """Refuse any text longer than the model takes (unless it truncates)."""
        if self.truncates or self.max_length is None:
            return
        counts = [len(ids) for ids in self.tokenizer(list(texts))["input_ids"]]
        for i, count in enumerate(counts):
            if count > self.max_length:
                raise UsageError(
                    f"input {i} is {count} tokens; model {self.card.ref!r} takes at most"
                    f" {self.max_length} tokens: shorten it or split it",
                    param=param,
                )

    def _batches(self, texts: Sequence[str]) -> Iterator[tuple[range, dict[str, torch.Tensor]]]:
        size = self.max_batch_size or len(texts) or 1
        for at in range(0, len(texts), size):
            chunk = list(texts[at : at + size])
            encoded = self.tokenizer(
                chunk,
                padding=True,
                truncation=self.max_length is not None,
                max_length=self.max_length,
                return_tensors="pt",
            )
            yield range(at, at + len(chunk)), {k: v.to(self.device) for k, v in encoded.items()}

    def close(self) -> None:
        with self._lock:
            self.model = None
        release()


class Encoder(_EncoderBase):
    """Sentence embeddings from a bare encoder (BertModel and the like)."""

    capabilities = frozenset({Capability.EMBED})

    def __init__(
        self,
        card: ModelCard,
        model: Any,
        tokenizer: Any,
        settings: Settings,
        device: torch.device,
        layout: Layout,
    ) -> None:
        super().__init__(card, model, tokenizer, settings, device)
        self.pooling = layout.pooling
        tokenizer.padding_side = "right"  # cls pooling reads the first position
        self.normalize = layout.normalize
        # sentence-transformers truncates at its own max_seq_length (256 for MiniLM)
        self.max_length = self._max_length(layout.max_seq_length)
        self.truncates = layout.max_seq_length is not None

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult]:
        self._check_lengths([r.text for r in requests], "input")
        results: list[EmbedResult] = []
        for _, encoded in self._batches([r.text for r in requests]):
            with self._lock, torch.inference_mode():
                hidden = self.model(**encoded).last_hidden_state
            mask = encoded["attention_mask"]
            vectors = pool(hidden.float(), mask, self.pooling)
            if self.normalize:
                vectors = torch.nn.functional.normalize(vectors, p=2, dim=1)
            for vector, tokens in zip(
                vectors.cpu().tolist(), mask.sum(dim=1).tolist(), strict=True
            ):
                results.append(EmbedResult(vector=vector, usage=Usage(prompt_tokens=int(tokens))))
        return results


class Classifier(_EncoderBase):
    """A sequence-classification head: probabilities over ``config.id2label``."""

    capabilities = frozenset({Capability.CLASSIFY})

    def __init__(
        self, card: ModelCard, model: Any, tokenizer: Any, settings: Settings, device: torch.device
    ) -> None:
        super().__init__(card, model, tokenizer, settings, device)
        id2label = model.config.id2label
        self.labels = tuple(str(id2label[i]) for i in range(model.config.num_labels))

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]:
        for request in requests:
            if request.labels and set(request.labels) != set(self.labels):
                raise UsageError(
                    f"model {self.card.ref!r} has a trained head with labels"
                    f" {', '.join(self.labels)}; it cannot score other labels"
                    f" ({', '.join(request.labels)}). Leave labels empty, or use a language"
                    " model for zero-shot labels",
                    param="labels",
                )
        self._check_lengths([r.text for r in requests], "text")
        results: list[ClassifyResult] = []
        for span, encoded in self._batches([r.text for r in requests]):
            with self._lock, torch.inference_mode():
                logits = self.model(**encoded).logits
            probabilities = torch.softmax(logits.float(), dim=-1).cpu().tolist()
            tokens = encoded["attention_mask"].sum(dim=1).tolist()
            for i, row, count in zip(span, probabilities, tokens, strict=True):
                by_label = dict(zip(self.labels, row, strict=True))
                order = requests[i].labels or self.labels
                results.append(
                    ClassifyResult(
                        scores={label: by_label[label] for label in order},
                        usage=Usage(prompt_tokens=int(count)),
                    )
                )
        return results
