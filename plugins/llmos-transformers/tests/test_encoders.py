"""Encoders through the provider: pooled, normalised embeddings and a
classification head's probabilities."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from llmos.errors import UsageError
from llmos.types import Capability, ClassifyRequest, EmbedRequest

TEXTS = ["the cat sat on the mat.", "hello", "stock markets fell sharply on monday. " * 5]


def manual_mean(folder: Path, texts: list[str], max_length: int, normalize: bool) -> torch.Tensor:
    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModel.from_pretrained(folder).eval()
    vectors = []
    for text in texts:  # one at a time: no padding to get wrong
        ids = tokenizer(text, truncation=True, max_length=max_length, return_tensors="pt")
        with torch.inference_mode():
            hidden = model(**ids).last_hidden_state[0]
        vector = hidden.mean(dim=0)
        vectors.append(torch.nn.functional.normalize(vector, dim=0) if normalize else vector)
    return torch.stack(vectors)


def test_embeddings_are_mean_pooled_unit_vectors(load_model: Any, encoder_dir: Path) -> None:
    model = load_model(encoder_dir, max_batch_size=2)
    assert model.capabilities == {Capability.EMBED}
    results = model.embed([EmbedRequest(text=t) for t in TEXTS])
    vectors = torch.tensor([r.vector for r in results])
    assert vectors.shape == (3, 32)
    assert vectors.norm(dim=1) == pytest.approx([1.0, 1.0, 1.0], abs=1e-5)
    expected = manual_mean(encoder_dir, TEXTS, max_length=16, normalize=True)
    assert torch.allclose(vectors, expected, atol=1e-5)
    # truncated at sentence_bert_config's max_seq_length
    assert results[2].usage.prompt_tokens == 16
    assert 0 < results[1].usage.prompt_tokens < 16


@pytest.mark.parametrize(
    ("key", "manual"),
    [
        ("pooling_mode_cls_token", lambda h: h[0]),
        ("pooling_mode_max_tokens", lambda h: h.amax(dim=0)),
        ("pooling_mode_mean_sqrt_len_tokens", lambda h: h.sum(dim=0) / len(h) ** 0.5),
        ("pooling_mode_lasttoken", lambda h: h[-1]),
    ],
)
def test_pooling_modes_without_normalize(
    load_model: Any, encoder_dir: Path, tmp_path: Path, key: str, manual: Any
) -> None:
    folder = tmp_path / "pooled"
    shutil.copytree(encoder_dir, folder)
    modules = json.loads((folder / "modules.json").read_text())
    (folder / "modules.json").write_text(json.dumps(modules[:2]))  # no Normalize
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({key: True}))
    model = load_model(folder, name="pooled")
    texts = ["the cat", "a dog ran in the park!"]  # batched: the first one is padded
    results = model.embed([EmbedRequest(text=t) for t in texts])

    from transformers import AutoModel, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    bert = AutoModel.from_pretrained(folder).eval()
    for text, result in zip(texts, results, strict=True):
        with torch.inference_mode():
            hidden = bert(**tokenizer(text, return_tensors="pt")).last_hidden_state[0]
        assert torch.allclose(torch.tensor(result.vector), manual(hidden), atol=1e-5)
        assert abs(torch.tensor(result.vector).norm().item() - 1.0) > 1e-3


def test_bare_bert_folder_is_an_encoder(load_model: Any, encoder_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "bare"
    folder.mkdir()
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(encoder_dir / name, folder / name)
    model = load_model(folder, name="bare")
    [result] = model.embed([EmbedRequest(text=TEXTS[0])])
    expected = manual_mean(folder, TEXTS[:1], max_length=64, normalize=False)
    assert torch.allclose(torch.tensor([result.vector]), expected, atol=1e-5)


def test_unsupported_sentence_transformers_module(
    load_model: Any, encoder_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "dense"
    shutil.copytree(encoder_dir, folder)
    modules = json.loads((folder / "modules.json").read_text())
    modules.append(
        {"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"}
    )
    (folder / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(UsageError, match="Dense"):
        load_model(folder, name="dense")


def test_classifier_head_scores(load_model: Any, classifier_dir: Path) -> None:
    model = load_model(classifier_dir, max_batch_size=2)
    assert model.capabilities == {Capability.CLASSIFY}
    results = model.classify([ClassifyRequest(text=t) for t in TEXTS])

    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(classifier_dir)
    head = AutoModelForSequenceClassification.from_pretrained(classifier_dir).eval()
    labels = json.loads((classifier_dir / "config.json").read_text())["id2label"]
    assert labels == {"0": "negative", "1": "neutral", "2": "positive"}
    for text, result in zip(TEXTS, results, strict=True):
        ids = tokenizer(text, truncation=True, max_length=64, return_tensors="pt")
        with torch.inference_mode():
            probabilities = torch.softmax(head(**ids).logits[0], dim=-1).tolist()
        assert list(result.scores) == list(labels.values())
        assert list(result.scores.values()) == pytest.approx(probabilities, abs=1e-5)
        assert sum(result.scores.values()) == pytest.approx(1.0)
        assert result.label == labels[str(max(range(3), key=probabilities.__getitem__))]


def test_classifier_labels_must_be_its_own(load_model: Any, classifier_dir: Path) -> None:
    model = load_model(classifier_dir)
    [own] = model.classify([ClassifyRequest(text="the cat")])
    [reordered] = model.classify(
        [ClassifyRequest(text="the cat", labels=("positive", "negative", "neutral"))]
    )
    assert list(reordered.scores) == ["positive", "negative", "neutral"]
    assert dict(reordered.scores) == pytest.approx(dict(own.scores))
    with pytest.raises(UsageError, match="trained head"):
        model.classify([ClassifyRequest(text="the cat", labels=("spam", "ham"))])
