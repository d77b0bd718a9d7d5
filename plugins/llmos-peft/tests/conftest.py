"""Fixtures: tiny models built in seconds, tiny data sets, and a runner.

* a word-level tokenizer (trained with ``tokenizers``) and a 2-layer BERT,
  hidden 32, laid out like all-MiniLM-L6-v2 (a sentence-transformers folder
  whose model is a bare ``BertModel``);
* a byte-level BPE tokenizer with a chat template and a 2-layer Llama;
* sentiment rows that a word decides ("good" … / "bad" …), and prompt /
  response rows a tiny model can learn.

Nothing touches the network; one torch thread (two were measured many times
slower on a loaded 2-core machine).
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from llmos.logs import configure_logging
from llmos.plugin.manager import PluginManager
from llmos.types import ModelCard, TuningRequest, TuningResult

torch.set_num_threads(1)

GOOD = ["good", "great", "fine", "nice", "lovely", "superb"]
BAD = ["bad", "awful", "poor", "terrible", "boring", "dreadful"]
SUBJECTS = ["the movie", "the film", "this plot", "the acting", "the music", "that book"]
VERBS = ["was", "is", "seemed", "felt"]
FILLER = ["really", "quite", "so", "very", "truly", "rather"]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
NAMES = ["anna", "bob", "carl", "dora", "emil", "fay", "gus", "hana", "ivan", "jon", "kim", "lea"]


def sentiment_rows(n: int, seed: int) -> list[dict[str, str]]:
    """``n`` rows, half positive: the sentiment word alone decides the label."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        positive = i % 2 == 0
        word = rng.choice(GOOD if positive else BAD)
        text = f"{rng.choice(SUBJECTS)} {rng.choice(VERBS)} {rng.choice(FILLER)} {word}"
        rows.append({"text": text, "label": "positive" if positive else "negative"})
    rng.shuffle(rows)
    return rows


def sentiment_data(train: int = 48, dev: int = 24, test: int = 24) -> dict[str, list[Any]]:
    return {
        "train": sentiment_rows(train, 1),
        "dev": sentiment_rows(dev, 2),
        "test": sentiment_rows(test, 3),
    }


def sft_rows(names: list[str]) -> list[dict[str, str]]:
    return [
        {"prompt": f"greet {name}", "response": f"hello {name}, nice to see you"} for name in names
    ]


def sft_data() -> dict[str, list[Any]]:
    return {
        "train": sft_rows(NAMES[:8]),
        "dev": sft_rows(NAMES[8:10]),
        "test": sft_rows(NAMES[10:]),
    }


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging("warning", fmt="console")


# --------------------------------------------------------------------------
# Tiny models
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A sentence-transformers folder like all-MiniLM-L6-v2's: a bare BertModel
    (2 layers, hidden 32) + mean pooling + normalize, with a word-level
    tokenizer that adds [CLS] … [SEP]."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import BertConfig, BertModel, PreTrainedTokenizerFast

    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]
    backend = Tokenizer(models.WordLevel(unk_token="[UNK]"))
    backend.normalizer = normalizers.Lowercase()
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    words = GOOD + BAD + SUBJECTS + VERBS + FILLER
    backend.train_from_iterator(words, trainers.WordLevelTrainer(special_tokens=special))
    backend.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", 2), ("[SEP]", 3)],
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        model_max_length=128,
    )
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        pad_token_id=0,
        # learns the words in fewer steps than BERT's 0.02
        initializer_range=0.1,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-bert")
    BertModel(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {
            "idx": 1,
            "name": "1",
            "path": "1_Pooling",
            "type": "sentence_transformers.models.Pooling",
        },
        {
            "idx": 2,
            "name": "2",
            "path": "2_Normalize",
            "type": "sentence_transformers.models.Normalize",
        },
    ]
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"word_embedding_dimension": 32, "pooling_mode_mean_tokens": True})
    )
    return folder


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-layer LlamaForCausalLM (hidden 32) with a byte-level BPE tokenizer
    that has <unk> <pad> <s> </s> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    corpus = [f"greet {n} hello {n}, nice to see you user: assistant:" for n in NAMES]
    corpus += [r["text"] for r in sentiment_rows(60, 0)]
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<unk>", "<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(corpus * 2, trainer)
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
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        # with 0.02, a hidden size of 32 cannot move the logits off uniform
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def card_of(folder: Path, name: str, family: str) -> ModelCard:
    return ModelCard(name=name, provider="transformers", source=str(folder), family=family)


@pytest.fixture(scope="session")
def bert_card(bert_dir: Path) -> ModelCard:
    return card_of(bert_dir, "tiny-bert", "bert")


@pytest.fixture(scope="session")
def llama_card(llama_dir: Path) -> ModelCard:
    return card_of(llama_dir, "tiny-llama", "llama")


# --------------------------------------------------------------------------
# The plugins, loaded the way the kernel loads them
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pm() -> PluginManager:
    """Plugins found through their entry points, as the kernel finds them."""
    manager = PluginManager()
    manager.load()
    info = {i.name: i for i in manager.plugins()}
    assert info["peft"].status == "loaded", info["peft"].error
    assert info["transformers"].status == "loaded", info["transformers"].error
    return manager


Tune = Callable[..., TuningResult]


@pytest.fixture
def tune(pm: PluginManager, tmp_path: Path) -> Iterator[Tune]:
    """``tune(method, base, base_path, data, task=…, labels=…, seed=0,
    should_stop=…, job="job", **hyperparameters)`` runs the registered method
    on a job folder under ``tmp_path`` (``<job>/output``, ``<job>/checkpoints``);
    the figures it reported are in ``tune.reports[job]``."""
    reports: dict[str, list[Mapping[str, Any]]] = {}

    def run(
        method: str,
        base: ModelCard,
        base_path: Path,
        data: Mapping[str, Any],
        task: str = "text-classification",
        labels: tuple[str, ...] = (),
        seed: int = 0,
        should_stop: Callable[[], bool] = lambda: False,
        job: str = "job",
        **hyperparameters: Any,
    ) -> TuningResult:
        figures = reports.setdefault(job, [])
        request = TuningRequest(
            base=base,
            task=task,
            data=data,
            labels=labels or (("negative", "positive") if task == "text-classification" else ()),
            hyperparameters=hyperparameters,
            base_path=base_path,
            output_dir=tmp_path / job / "output",
            checkpoint_dir=tmp_path / job / "checkpoints",
            seed=seed,
            report=figures.append,
            should_stop=should_stop,
        )
        return pm.tuning_methods[method].spec.run(request)

    run.reports = reports  # type: ignore[attr-defined]
    run.root = tmp_path  # type: ignore[attr-defined]
    yield run


def record_of(result: TuningResult) -> dict[str, Any]:
    return json.loads((Path(result.card.source) / "llmos_tuning.json").read_text())
