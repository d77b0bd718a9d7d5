"""Registry search and registration benchmark.

Measures :class:`llmos.registry.SQLiteStore` on synthetic model cards and puts
each figure next to a baseline run in the same process, on the same cards:

* search latency (p50/p95/mean, LIMIT 20) at 1k, 100k and 1M cards for five
  query classes: selective keyword, broad keyword, keyword + filter,
  filter-only and OR queries (plus one very common word, for information);
  baseline: the same queries as a naive ``LIKE`` scan of one plain table;
* registration throughput: single ``register()`` calls from 1 and from 4
  processes on one file, and the ``register_many`` bulk rate;
* MLflow's ``search_registered_models`` on the same 10k cards, when ``mlflow``
  is importable (skipped with a message otherwise).

Results are JSON (``bench/results/registry_search.json`` by default); a short
table is printed at the end. See ``bench/README.md``.

    python bench/registry_search.py --quick                 # 1k cards, < 1 min
    python bench/registry_search.py --cache ~/.cache/llmos-bench   # 1k, 100k, 1M
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from llmos.logs import configure_logging
from llmos.registry import SQLiteStore
from llmos.registry.query import And, Compare, Filter, Node, Not, Or, Text, parse_query
from llmos.registry.store import MIGRATIONS, MMAP_SIZE
from llmos.types import ModelCard

#: bump when the generated cards change: cached databases are keyed by it
GENERATOR_VERSION = 1
HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "results" / "registry_search.json"
QUICK_OUT = HERE / "results" / "registry_search-quick.json"
DEFAULT_SIZES = (1_000, 100_000, 1_000_000)
LIMIT = 20
GOAL_MS = 10.0
GOAL_KEY = "keyword+filter p95 at 1M < 10 ms"


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ====================================================================== cards
#
# The vocabulary is fixed (its own seed), so the concrete query words are the
# same whatever --seed says; --seed only changes which cards are drawn.

_COMMON_WORDS = (  # noqa: SIM905 (word lists read better as text)
    "the a of and for model on with to in is trained this fine-tuned dataset language data "
    "base version tasks text performance english using large small evaluation benchmark "
    "training pretrained weights tokens context accuracy results checkpoint open quantized "
    "instruction tuned multilingual parameters architecture transformer inference fast "
    "efficient research license released improved domain corpus samples learning rate "
    "epochs batch size sequence length vocabulary tokenizer layers attention heads hidden "
    "embedding decoder encoder downstream zero-shot few-shot prompt responses chat generation "
    "classification reasoning knowledge safety alignment preference feedback reward synthetic "
    "web books wikipedia papers scientific news reviews conversations instructions examples "
    "labels metrics f1 bleu rouge perplexity latency memory gpu cpu edge mobile deployment "
    "production experimental community merged adapter lora distilled compressed pruned int8 "
    "int4"
).split()

#: domain phrase -> the tasks it goes with (descriptions favour matching phrases)
_PHRASES: dict[str, tuple[str, ...]] = {
    "text classification": ("text-classification",),
    "sentiment analysis": ("text-classification",),
    "spam detection": ("text-classification",),
    "toxicity detection": ("text-classification",),
    "zero-shot classification": ("zero-shot-classification", "text-classification"),
    "natural language inference": ("zero-shot-classification", "text-classification"),
    "question answering": ("question-answering",),
    "table question answering": ("question-answering",),
    "named entity recognition": ("token-classification",),
    "part of speech tagging": ("token-classification",),
    "code generation": ("code-generation",),
    "code completion": ("code-generation",),
    "speech recognition": ("speech-recognition",),
    "speech translation": ("speech-recognition", "translation"),
    "text to speech": ("text-to-speech",),
    "machine translation": ("translation",),
    "summarization": ("summarization",),
    "abstractive summarization": ("summarization",),
    "instruction following": ("chat", "text-generation"),
    "dialogue": ("chat",),
    "function calling": ("chat", "text-generation"),
    "math reasoning": ("text-generation", "chat"),
    "long context": ("text-generation",),
    "story writing": ("text-generation",),
    "language modeling": ("text-generation", "fill-mask"),
    "masked language modeling": ("fill-mask",),
    "semantic search": ("embedding", "feature-extraction"),
    "sentence embeddings": ("embedding", "feature-extraction"),
    "retrieval augmented generation": ("embedding", "reranking", "text-generation"),
    "passage reranking": ("reranking",),
    "paraphrase detection": ("text-classification", "embedding"),
    "image classification": ("image-classification",),
    "image captioning": ("image-classification",),
    "document understanding": ("question-answering", "token-classification"),
}

_NLP_ENCODER = (
    "fill-mask",
    "text-classification",
    "token-classification",
    "question-answering",
    "embedding",
    "zero-shot-classification",
)
_SEQ2SEQ = ("text2text-generation", "summarization", "translation", "question-answering")
_DECODER = ("text-generation", "chat", "question-answering", "code-generation")
_CODE = ("code-generation", "text-generation")
_SPEECH = ("speech-recognition", "text-to-speech")
_EMBED = ("embedding", "feature-extraction", "reranking")
_VISION = ("image-classification", "embedding", "zero-shot-classification")

#: (family, its tasks, whether it is an NLP family), most popular first
_FAMILIES: tuple[tuple[str, tuple[str, ...], bool], ...] = (
    ("llama", _DECODER, True),
    ("bert", _NLP_ENCODER, True),
    ("mistral", _DECODER, True),
    ("qwen", _DECODER, True),
    ("roberta", _NLP_ENCODER, True),
    ("gpt2", _DECODER, True),
    ("t5", _SEQ2SEQ, True),
    ("distilbert", _NLP_ENCODER, True),
    ("gemma", _DECODER, True),
    ("phi", _DECODER, True),
    ("whisper", _SPEECH, False),
    ("deberta", _NLP_ENCODER, True),
    ("bge", _EMBED, True),
    ("mixtral", _DECODER, True),
    ("flan-t5", _SEQ2SEQ, True),
    ("bart", _SEQ2SEQ, True),
    ("xlm-roberta", _NLP_ENCODER, True),
    ("falcon", _DECODER, True),
    ("e5", _EMBED, True),
    ("starcoder", _CODE, False),
    ("codellama", _CODE, False),
    ("minilm", _NLP_ENCODER + _EMBED, True),
    ("mpnet", _EMBED, True),
    ("gte", _EMBED, True),
    ("electra", _NLP_ENCODER, True),
    ("albert", _NLP_ENCODER, True),
    ("pythia", _DECODER, True),
    ("opt", _DECODER, True),
    ("bloom", _DECODER, True),
    ("gpt-neox", _DECODER, True),
    ("yi", _DECODER, True),
    ("deepseek", _DECODER + _CODE, True),
    ("olmo", _DECODER, True),
    ("mbart", _SEQ2SEQ, True),
    ("marian", ("translation",), True),
    ("pegasus", ("summarization",), True),
    ("wav2vec2", ("speech-recognition",), False),
    ("hubert", ("speech-recognition",), False),
    ("vit", _VISION, False),
    ("clip", _VISION, False),
)

_VARIANTS = (  # noqa: SIM905 (word lists read better as text)
    "base instruct chat it ft sft dpo lora qlora gguf awq gptq int8 int4 distilled v2 v3 "
    "large small medium uncased cased multilingual code math med legal fin en de zh ja"
).split()

_REAL_VENDORS = (  # noqa: SIM905 (word lists read better as text)
    "meta-llama mistralai google microsoft huggingface facebook qwen deepseek-ai tiiuae "
    "bigscience eleutherai allenai nvidia ibm stabilityai thebloke sentence-transformers "
    "baai intfloat openai cohere 01-ai apple amazon alibaba tencent baidu naver-ai lmsys "
    "nousresearch teknium cognitivecomputations openchat upstage databricks mosaicml "
    "togethercomputer cerebras salesforce"
).split()

#: position of the vendor a selective keyword query looks for (mid-popularity)
_QUERY_VENDOR_RANK = 60

_LICENSES = (
    ("apache-2.0", 35),
    ("mit", 20),
    ("llama2", 5),
    ("llama3", 5),
    ("cc-by-4.0", 8),
    ("cc-by-nc-4.0", 5),
    ("openrail", 5),
    ("gpl-3.0", 2),
    ("bsd-3-clause", 3),
    ("other", 5),
    (None, 7),
)
#: (format, provider choices) with weights
_FORMATS = (
    ("safetensors", ("transformers", "transformers", "transformers", "vllm"), 60),
    ("gguf", ("llama-cpp",), 15),
    ("adapter", ("transformers", "peft"), 10),
    ("remote-api", ("openai-compatible", "anthropic-compatible"), 5),
    ("other", ("onnxruntime", "ctranslate2", "mlx"), 10),
)

_GENERAL_TAGS = (  # noqa: SIM905 (word lists read better as text)
    "transformers pytorch safetensors text-generation-inference endpoints-compatible "
    "autotrain conversational custom-code research production experimental benchmark "
    "open-weights commercial community baseline sota tiny efficient"
).split()
_LANGUAGE_TAGS = (  # noqa: SIM905 (word lists read better as text)
    "en de fr es it pt nl pl ru uk cs sv da no fi tr ar he fa hi bn ur ta te zh ja ko vi th "
    "id ms sw yo ha am el hu ro bg multilingual"
).split()
_DOMAIN_TAGS = (  # noqa: SIM905 (word lists read better as text)
    "medical clinical biomedical legal finance insurance chemistry biology physics math code "
    "education news social-media customer-support ecommerce security cybersecurity gaming "
    "music art agriculture climate energy retail hr marketing tourism sports government "
    "academic patents scientific twitter reddit reviews email dialog poetry storytelling"
).split()
_TECHNIQUE_TAGS = (  # noqa: SIM905 (word lists read better as text)
    "lora qlora peft adapter quantized int8 int4 fp16 bf16 awq gptq gguf exl2 onnx openvino "
    "tensorrt distilled pruned merged moe rlhf dpo orpo sft instruct chat base long-context "
    "rope-scaling flash-attention sparse mamba rwkv retrieval rag function-calling tool-use "
    "json-mode uncensored safety-tuned"
).split()

_CONSONANTS = "bdfgklmnprstvz"
_VOWELS = "aeiou"


def _zipf_cumulative(count: int, exponent: float = 1.0, shift: float = 1.0) -> list[float]:
    total, cumulative = 0.0, []
    for rank in range(count):
        total += 1.0 / (rank + shift) ** exponent
        cumulative.append(total)
    return cumulative


def _pseudo_words(rng: random.Random, count: int, taken: set[str]) -> list[str]:
    """Pronounceable made-up words (CV syllables), none of them in ``taken``."""
    words: list[str] = []
    while len(words) < count:
        syllables = rng.choice((2, 2, 3, 3, 3, 4))
        word = "".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables))
        if rng.random() < 0.3:
            word += rng.choice("nrslt")
        if word not in taken:
            taken.add(word)
            words.append(word)
    return words


class Vocabulary:
    """Everything cards are drawn from; fixed, whatever the card seed."""

    def __init__(self) -> None:
        rng = random.Random("llmos-bench-vocabulary")
        taken = set(_COMMON_WORDS) | {f for f, _, _ in _FAMILIES} | set(_VARIANTS)
        taken |= {w for phrase in _PHRASES for w in phrase.split()}
        taken |= set(_REAL_VENDORS) | {"sentiment", "bert", "nlp"}
        # a few thousand words with a Zipf-like distribution: common English
        # and ML words first, then made-up ones that stand for the long tail
        self.words = list(_COMMON_WORDS) + _pseudo_words(rng, 3000, taken)
        self.word_cum = _zipf_cumulative(len(self.words), 1.05, 1.0)
        vendors = list(_REAL_VENDORS)
        vendors += [f"lab-{w}" for w in _pseudo_words(rng, 200 - len(vendors), taken)]
        # move one known vendor to a mid-popularity rank: the selective name query
        vendors.remove("salesforce")
        vendors.insert(_QUERY_VENDOR_RANK, "salesforce")
        self.vendors = vendors
        self.vendor_cum = _zipf_cumulative(len(vendors), 0.9, 2.0)
        self.families = _FAMILIES
        self.family_cum = _zipf_cumulative(len(_FAMILIES), 0.8, 1.5)
        head = ["en", "transformers", "pytorch", "safetensors", "conversational", "lora"]
        rest = [
            t
            for t in dict.fromkeys(_GENERAL_TAGS + _LANGUAGE_TAGS + _DOMAIN_TAGS + _TECHNIQUE_TAGS)
            if t not in head
        ]
        rng.shuffle(rest)
        datasets = [f"ds-{w}" for w in _pseudo_words(rng, 299 - len(head) - len(rest), taken)]
        self.tags = head + rest + datasets  # "nlp" comes with NLP families, apart
        self.tag_cum = _zipf_cumulative(len(self.tags), 1.0, 3.0)
        self.phrases = list(_PHRASES)
        self.phrases_by_task: dict[str, list[str]] = {}
        for phrase, tasks in _PHRASES.items():
            for task in tasks:
                self.phrases_by_task.setdefault(task, []).append(phrase)
        self.all_tasks = sorted({t for _, tasks, _ in _FAMILIES for t in tasks})

    def word_at(self, rank: int) -> str:
        """The word of Zipf rank ``rank`` (0 = most common)."""
        return self.words[rank]


VOCAB = Vocabulary()


def _base36(number: int) -> str:
    digits = "0123456789abcdefghijklmnopqrstuvwxyz"
    out = ""
    while True:
        number, rest = divmod(number, 36)
        out = digits[rest] + out
        if not number:
            return out


def _size_label(parameters: int) -> str:
    if parameters >= 10**9:
        billions = parameters / 10**9
        return f"{billions:.1f}b" if billions < 10 else f"{round(billions)}b"
    return f"{round(parameters / 10**6)}m"


def _weighted(rng: random.Random, options: Sequence[tuple[Any, ...]]) -> tuple[Any, ...]:
    return rng.choices(options, weights=[o[-1] for o in options])[0]


def generate_cards(seed: int, start: int, count: int) -> list[ModelCard]:
    """Cards ``start`` .. ``start + count - 1`` of the stream ``seed``.

    Each index gives the same card whatever chunk it is drawn in: the chunk's
    generator is seeded by ``(seed, start)`` and every card name ends with its
    index in base 36, so names are unique and chunks can be drawn apart
    (registration workers draw disjoint index ranges).
    """
    v = VOCAB
    rng = random.Random(f"{seed}:{start}")
    low, high = math.log(10**7), math.log(7 * 10**10)
    cards = []
    for index in range(start, start + count):
        family, family_tasks, nlp = rng.choices(v.families, cum_weights=v.family_cum)[0]
        vendor = rng.choices(v.vendors, cum_weights=v.vendor_cum)[0]
        parameters = int(math.exp(rng.uniform(low, high)))
        variant = rng.choice(_VARIANTS)
        name = f"{vendor}/{family}-{_size_label(parameters)}-{variant}-{_base36(index)}"
        tasks = rng.sample(family_tasks, k=min(len(family_tasks), rng.choice((1, 1, 2, 2, 3))))
        if rng.random() < 0.05:
            extra = rng.choice(v.all_tasks)
            if extra not in tasks:
                tasks.append(extra)
        phrases = []
        for _ in range(rng.choice((1, 1, 1, 2))):
            related = v.phrases_by_task.get(rng.choice(tasks), [])
            pool = related if related and rng.random() < 0.7 else v.phrases
            phrases.append(rng.choice(pool))
        words = rng.choices(v.words, cum_weights=v.word_cum, k=rng.randint(10, 36))
        for phrase in phrases:
            words.insert(rng.randrange(len(words) + 1), phrase)
        lead = f"{family} {variant} model" if rng.random() < 0.6 else "model"
        description = f"A {lead} for {phrases[0]}. " + " ".join(words) + "."
        tags = list(dict.fromkeys(rng.choices(v.tags, cum_weights=v.tag_cum, k=rng.randint(1, 6))))
        if rng.random() < (0.4 if nlp else 0.05):
            tags.append("nlp")
        license_ = _weighted(rng, _LICENSES)[0]
        fmt, providers, _ = _weighted(rng, _FORMATS)
        family_field = None if rng.random() < 0.03 else family
        cards.append(
            ModelCard(
                name=name,
                provider=rng.choice(providers),
                source=f"hf://{name}",
                tasks=tuple(tasks),
                family=family_field,
                parameters=parameters,
                format=fmt,
                license=license_,
                description=description,
                tags=tuple(tags),
            )
        )
    return cards


# ================================================================== queries

RARE_1 = VOCAB.word_at(1500)
RARE_2 = VOCAB.word_at(2900)

#: query class -> the concrete queries run for it (all with LIMIT 20)
QUERY_CLASSES: dict[str, list[str]] = {
    # a fairly rare description word, a rarer one, a mid-popularity vendor (names only)
    "keyword_selective": [RARE_1, RARE_2, "salesforce"],
    # common domain phrases and a common word
    "keyword_broad": ['"text classification"', '"question answering"', "multilingual"],
    "keyword_filter": [
        "sentiment task:text-classification",
        "llama family:llama params:<10B",
        '"question answering" license:apache-2.0',
        f"{RARE_1} format:safetensors",
    ],
    "filter_only": [
        "family:bert",
        "tag:medical license:apache-2.0",
        "task:embedding params:<1B",
    ],
    "or_query": [
        "(family:bert OR family:roberta) task:text-classification",
        "bert OR tag:nlp",
        "summarization (family:t5 OR family:bart)",
    ],
    # for information only (a word in most descriptions): the worst case of ranking
    "keyword_common": ["model"],
}
#: the classes the issue asks for; keyword_common is extra
MAIN_CLASSES = ("keyword_selective", "keyword_broad", "keyword_filter", "filter_only", "or_query")


# ================================================================= baseline
#
# A naive registry: one plain table with one row per card (no index but the
# rowid), every query a LIKE scan; the card JSON sits in a side table looked up
# by id for the page's hits, as the registry keeps its own apart.

_BASELINE_SCHEMA = (
    """CREATE TABLE cards (
        id INTEGER PRIMARY KEY,
        name TEXT NOT NULL,
        description TEXT NOT NULL,
        tags TEXT NOT NULL,        -- '|tag1|tag2|', lowercased
        tasks TEXT NOT NULL,       -- '|task1|task2|', lowercased
        provider TEXT NOT NULL,
        family TEXT,
        format TEXT NOT NULL,
        license TEXT,
        parameters INTEGER
    )""",
    "CREATE TABLE card_json (id INTEGER PRIMARY KEY, card TEXT NOT NULL)",
)
_BASELINE_COLUMNS = {
    "provider": "provider",
    "family": "family",
    "license": "license",
    "format": "format",
    "name": "name",
}


def _open_sqlite(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = NORMAL")
    conn.execute(f"PRAGMA mmap_size = {MMAP_SIZE:d}")  # as the registry's connections
    return conn


def _like_pattern(text: str) -> str:
    escaped = text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    return f"%{escaped}%"


def baseline_where(node: Node | None) -> tuple[str, tuple[Any, ...]]:
    """The naive SQL for a parsed query: free text is ``LIKE '%text%'`` on name,
    description, tags and tasks (a substring, where the registry matches
    tokens), filters compare columns or ``LIKE`` the ``|a|b|`` lists."""
    if node is None:
        return "1", ()
    if isinstance(node, Text):
        pattern = _like_pattern(node.text.lower())
        cols = ("name", "description", "tags", "tasks")
        return (
            "(" + " OR ".join(f"{c} LIKE ? ESCAPE '\\'" for c in cols) + ")",
            (pattern,) * len(cols),
        )
    if isinstance(node, Filter):
        if node.field in ("tag", "task"):
            column = "tags" if node.field == "tag" else "tasks"
            if "*" in node.value or "?" in node.value:
                return f"{column} GLOB ?", (f"*|{node.value}|*",)
            return f"{column} LIKE ? ESCAPE '\\'", (_like_pattern(f"|{node.value}|"),)
        if node.field == "status":
            return ("1" if node.value == "active" else "0"), ()
        op = "GLOB" if ("*" in node.value or "?" in node.value) else "="
        return f"{_BASELINE_COLUMNS[node.field]} {op} ?", (node.value,)
    if isinstance(node, Compare):
        return f"parameters {node.op} ?", (node.value,)
    if isinstance(node, Not):
        sql, params = baseline_where(node.item)
        return f"(({sql}) IS NOT 1)", params
    if isinstance(node, And | Or):
        parts = [baseline_where(item) for item in node.items]
        glue = " AND " if isinstance(node, And) else " OR "
        return "(" + glue.join(p[0] for p in parts) + ")", tuple(x for p in parts for x in p[1])
    raise TypeError(f"not a query node: {node!r}")


class Baseline:
    """The naive registry on its own SQLite file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.conn = _open_sqlite(path)
        if not self.conn.execute("SELECT 1 FROM sqlite_master WHERE name = 'cards'").fetchone():
            for statement in _BASELINE_SCHEMA:
                self.conn.execute(statement)

    def insert(self, cards: Sequence[ModelCard], first_id: int) -> None:
        rows, blobs = [], []
        for offset, card in enumerate(cards):
            row_id = first_id + offset
            rows.append(
                (
                    row_id,
                    card.name,
                    card.description,
                    "|" + "|".join(t.lower() for t in card.tags) + "|",
                    "|" + "|".join(t.lower() for t in card.tasks) + "|",
                    card.provider.lower(),
                    None if card.family is None else card.family.lower(),
                    str(card.format),
                    None if card.license is None else card.license.lower(),
                    card.parameters,
                )
            )
            blobs.append((row_id, json.dumps(card.to_dict(), ensure_ascii=False)))
        self.conn.execute("BEGIN")
        self.conn.executemany(f"INSERT INTO cards VALUES ({', '.join('?' * 10)})", rows)
        self.conn.executemany("INSERT INTO card_json VALUES (?, ?)", blobs)
        self.conn.execute("COMMIT")

    def search(self, query: str, limit: int = LIMIT) -> tuple[int, list[ModelCard]]:
        """``(total, cards of the first page)``, ordered by name."""
        where, params = baseline_where(parse_query(query))
        c = self.conn
        c.execute("BEGIN")
        try:
            total = c.execute(f"SELECT count(*) FROM cards WHERE {where}", params).fetchone()[0]
            ids = [
                row[0]
                for row in c.execute(
                    f"SELECT id FROM cards WHERE {where} ORDER BY name LIMIT ?", (*params, limit)
                )
            ]
            blobs = dict(
                c.execute(
                    f"SELECT id, card FROM card_json WHERE id IN ({', '.join('?' * len(ids))})",
                    ids,
                ).fetchall()
            )
        finally:
            c.execute("COMMIT")
        return total, [ModelCard.from_dict(json.loads(blobs[i])) for i in ids]

    def close(self) -> None:
        self.conn.close()


# ================================================================ measuring


def percentile(sorted_values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of already sorted values."""
    rank = max(1, math.ceil(fraction * len(sorted_values)))
    return sorted_values[rank - 1]


def summarise(seconds: Sequence[float]) -> dict[str, Any]:
    values = sorted(seconds)
    return {
        "p50_ms": round(percentile(values, 0.50) * 1000, 4),
        "p95_ms": round(percentile(values, 0.95) * 1000, 4),
        "mean_ms": round(sum(values) / len(values) * 1000, 4),
        "n": len(values),
    }


def summarise_pooled(groups: Sequence[Sequence[float]]) -> dict[str, Any]:
    """A class's figures: the samples of all its queries, each query weighing
    the same whatever its number of runs (the budget cuts slow queries short),
    so p50/p95 are those of "one query of this class, picked at random"."""
    weighted = sorted((x, 1.0 / len(g)) for g in groups for x in g)
    total = float(len(groups))

    def at(fraction: float) -> float:
        running = 0.0
        for value, weight in weighted:
            running += weight
            if running >= fraction * total - 1e-9:
                return value
        return weighted[-1][0]

    return {
        "p50_ms": round(at(0.50) * 1000, 4),
        "p95_ms": round(at(0.95) * 1000, 4),
        "mean_ms": round(sum(sum(g) / len(g) for g in groups) / total * 1000, 4),
        "n": sum(len(g) for g in groups),
    }


def measure(
    call: Callable[[], Any], *, reps: int, warmup: int, budget_s: float, min_reps: int
) -> tuple[list[float], Any]:
    """Time ``call``: ``warmup`` untimed runs, then up to ``reps`` timed ones,
    stopping early once ``budget_s`` is spent and ``min_reps`` are done."""
    result = None
    for _ in range(warmup):
        result = call()
    gc.collect()
    times: list[float] = []
    began = time.perf_counter()
    while len(times) < reps:
        t0 = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - t0)
        if len(times) >= min_reps and time.perf_counter() - began > budget_s:
            break
    return times, result


def ratio(baseline: float, ours: float) -> float | None:
    return round(baseline / ours, 2) if ours > 0 else None


def registry_plan(store: SQLiteStore, query: str) -> dict[str, list[str]] | None:
    """EXPLAIN QUERY PLAN of the registry's count and page statements for
    ``query``: ``page`` sorts what the filters find, ``walk`` (when the query
    has one) reads an index in order, the form a search takes once the count
    reaches its limit. A ranked query (free text, by relevance) has no page
    statement: ``rank`` says how many versions its impact-index search
    checked for a page of 20, from how many streams (best effort: it reads
    the store's private SQL builder and ranker)."""
    try:
        from llmos.registry import ranking
        from llmos.registry.query import plan_search
        from llmos.registry.store import _search_sql

        sql = _search_sql(plan_search(parse_query(query)), "relevance", None, False)
        conn = store._conn()
        out = {}
        pages = [(name, page) for name, page in (("page", sql.page), ("walk", sql.walk)) if page]
        for label, text, params in (
            ("count", sql.count, (*sql.count_params, store.count_limit + 1)),
            *((name, page.first, (*page.params, LIMIT + 1, 0)) for name, page in pages),
        ):
            rows = conn.execute(f"EXPLAIN QUERY PLAN {text}", params).fetchall()
            out[label] = [str(row[-1]) for row in rows]
        if sql.page is None:
            seen: list[ranking.Ranker] = []
            top = ranking.Ranker.top

            def spy(self: ranking.Ranker, *args: Any, **kwargs: Any) -> Any:
                seen.append(self)
                return top(self, *args, **kwargs)

            ranking.Ranker.top = spy
            try:
                store.search(query, limit=LIMIT)
            finally:
                ranking.Ranker.top = top
            ranker = seen[-1]
            out["rank"] = [
                f"impact index: {ranker.checked} versions checked for {LIMIT},"
                f" {ranker.opened} of {ranker.sources} streams opened;"
                f" {ranker.direct} scored from their text (not indexed yet, or a query"
                " of several phrases with few matches)"
            ]
        return out
    except Exception as exc:  # the private API moved: the plan is optional
        return {"error": [f"{type(exc).__name__}: {exc}"]}


# =================================================================== tiers


def _checkpoint(path: Path) -> None:
    conn = sqlite3.connect(path)
    try:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    finally:
        conn.close()


def _mb(path: Path) -> float:
    total = sum(p.stat().st_size for p in path.parent.glob(path.name + "*") if p.is_file())
    return round(total / 2**20, 1)


def build_tier(size: int, seed: int, chunk: int, reg_path: Path, base_path: Path) -> dict[str, Any]:
    """Register ``size`` cards with ``register_many`` in chunks (one
    transaction each) and load the same cards into the baseline."""
    for path in (reg_path, base_path):
        for leftover in path.parent.glob(path.name + "*"):
            leftover.unlink()
    store = SQLiteStore(reg_path)
    baseline = Baseline(base_path)
    generate_s = registry_s = baseline_s = 0.0
    began = last_report = time.perf_counter()
    try:
        for start in range(0, size, chunk):
            t0 = time.perf_counter()
            cards = generate_cards(seed, start, min(chunk, size - start))
            t1 = time.perf_counter()
            stored = store.register_many(cards)
            t2 = time.perf_counter()
            baseline.insert(stored, first_id=start + 1)
            t3 = time.perf_counter()
            generate_s += t1 - t0
            registry_s += t2 - t1
            baseline_s += t3 - t2
            done = start + len(cards)
            if time.perf_counter() - last_report > 15 or done == size:
                last_report = time.perf_counter()
                elapsed = last_report - began
                eta = elapsed / done * (size - done)
                say(
                    f"  build {size:>9,}: {done:>9,} cards, registry {done / registry_s:,.0f}"
                    f" cards/s, {elapsed:.0f} s elapsed, ~{eta:.0f} s left"
                )
    finally:
        store.close()
        baseline.close()
    _checkpoint(reg_path)
    _checkpoint(base_path)
    return {
        "cached": False,
        "chunk": chunk,
        "generate_s": round(generate_s, 2),
        "registry_s": round(registry_s, 2),
        "registry_cards_per_s": round(size / registry_s, 1),
        "baseline_s": round(baseline_s, 2),
        "baseline_cards_per_s": round(size / baseline_s, 1),
        "registry_db_mb": _mb(reg_path),
        "baseline_db_mb": _mb(base_path),
    }


def tier_files(args: argparse.Namespace, workdir: Path, size: int) -> tuple[Path, Path, Path]:
    if args.cache:
        key = f"n{size}-seed{args.seed}-gen{GENERATOR_VERSION}-schema{len(MIGRATIONS)}"
        root = Path(args.cache)
        return (
            root / f"registry-{key}.sqlite",
            root / f"baseline-{key}.sqlite",
            root / f"{key}.json",
        )
    return (
        workdir / f"registry-{size}.sqlite",
        workdir / f"baseline-{size}.sqlite",
        workdir / f"build-{size}.json",
    )


def prepare_tier(args: argparse.Namespace, workdir: Path, size: int) -> tuple[Path, Path, dict]:
    reg_path, base_path, meta_path = tier_files(args, workdir, size)
    if args.cache and meta_path.exists() and reg_path.exists() and base_path.exists():
        build = json.loads(meta_path.read_text())
        build["cached"] = True
        say(f"  build {size:>9,}: reusing {reg_path}")
        return reg_path, base_path, build
    reg_path.parent.mkdir(parents=True, exist_ok=True)
    # Build under temporary names: a run killed half-way leaves no cache entry.
    tmp_reg = reg_path.with_name(reg_path.name + ".building")
    tmp_base = base_path.with_name(base_path.name + ".building")
    build = build_tier(size, args.seed, args.chunk, tmp_reg, tmp_base)
    tmp_reg.replace(reg_path)
    tmp_base.replace(base_path)
    meta_path.write_text(json.dumps(build, indent=2))
    return reg_path, base_path, build


def _load() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


def bench_tier(args: argparse.Namespace, workdir: Path, size: int) -> dict[str, Any]:
    say(f"tier {size:,} cards")
    reg_path, base_path, build = prepare_tier(args, workdir, size)
    load_before = _load()
    store = SQLiteStore(reg_path)
    baseline = Baseline(base_path)
    classes: dict[str, Any] = {}
    try:
        for cls, queries in QUERY_CLASSES.items():
            pooled_ours: list[list[float]] = []
            pooled_base: list[list[float]] = []
            entries = []
            for query in queries:
                ours_s, page = measure(
                    lambda q=query: store.search(q, limit=LIMIT),
                    reps=args.reps,
                    warmup=args.warmup,
                    budget_s=args.budget,
                    min_reps=args.min_reps,
                )
                base_s, (base_total, _) = measure(
                    lambda q=query: baseline.search(q, limit=LIMIT),
                    reps=args.reps,
                    warmup=min(args.warmup, 1),
                    budget_s=args.budget,
                    min_reps=args.min_reps,
                )
                pooled_ours.append(ours_s)
                pooled_base.append(base_s)
                ours, base = summarise(ours_s), summarise(base_s)
                ours["total"], base["total"] = page.total, base_total
                ours["total_exact"] = page.total_exact
                entries.append(
                    {
                        "query": query,
                        "llmos": ours,
                        "baseline": base,
                        "ratio_p50": ratio(base["p50_ms"], ours["p50_ms"]),
                        "ratio_p95": ratio(base["p95_ms"], ours["p95_ms"]),
                        "plan": registry_plan(store, query),
                    }
                )
                more = "" if page.total_exact else "+"
                say(
                    f"  {cls:<18} {query:<58} llmos p50 {ours['p50_ms']:9.3f} ms"
                    f" p95 {ours['p95_ms']:9.3f} ms ({page.total:,}{more} hits) | LIKE p50"
                    f" {base['p50_ms']:9.3f} ms ({base_total:,}) x{entries[-1]['ratio_p50']}"
                )
            ours, base = summarise_pooled(pooled_ours), summarise_pooled(pooled_base)
            classes[cls] = {
                "llmos": ours,
                "baseline": base,
                "ratio_p50": ratio(base["p50_ms"], ours["p50_ms"]),
                "ratio_p95": ratio(base["p95_ms"], ours["p95_ms"]),
                "worst_query_p95_ms": max(e["llmos"]["p95_ms"] for e in entries),
                "queries": entries,
            }
    finally:
        store.close()
        baseline.close()
    if not args.cache and not args.keep:
        for path in (reg_path, base_path):
            for leftover in path.parent.glob(path.name + "*"):
                leftover.unlink()
    return {
        "cards": size,
        "build": build,
        # other work on the machine skews p95 first: check it when figures jump
        "load_average": {"before": load_before, "after": _load()},
        "classes": classes,
    }


# ============================================================ registration


def _register_worker(
    path: str, seed: int, start: int, count: int, ready: Any, go: Any, results: Any
) -> None:
    configure_logging("warning")
    try:
        store = SQLiteStore(path)
        cards = generate_cards(seed, start, count)
        ready.put(start)
        go.wait()
        latencies = []
        t0 = time.monotonic()  # CLOCK_MONOTONIC: comparable across processes
        for card in cards:
            a = time.perf_counter()
            store.register(card)
            latencies.append(time.perf_counter() - a)
        t1 = time.monotonic()
        store.close()
        results.put({"start": start, "t0": t0, "t1": t1, "latencies": latencies})
    except BaseException as exc:
        ready.put(start)
        results.put({"start": start, "error": f"{type(exc).__name__}: {exc}"})
        raise


def _run_writers(path: Path, seed: int, processes: int, total: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    ready, results, go = ctx.Queue(), ctx.Queue(), ctx.Event()
    per = total // processes
    workers = [
        ctx.Process(
            target=_register_worker,
            args=(str(path), seed, 10**9 + w * 10**7, per, ready, go, results),
        )
        for w in range(processes)
    ]
    for worker in workers:
        worker.start()
    for _ in workers:
        ready.get(timeout=300)
    go.set()
    outs = [results.get(timeout=1800) for _ in workers]
    for worker in workers:
        worker.join(timeout=60)
    errors = [o["error"] for o in outs if "error" in o]
    if errors:
        raise RuntimeError(f"registration worker failed: {errors[0]}")
    wall = max(o["t1"] for o in outs) - min(o["t0"] for o in outs)
    latencies = [x for o in outs for x in o["latencies"]]
    return {
        "processes": processes,
        "registrations": len(latencies),
        "wall_s": round(wall, 3),
        "per_s": round(len(latencies) / wall, 1),
        "latency": summarise(latencies),
        "per_process_s": [round(o["t1"] - o["t0"], 3) for o in outs],
    }


def bench_registration(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    say(f"registration: {args.reg_count:,} register() calls onto {args.reg_prefill:,} cards")
    seed = args.seed + 1
    prefill = workdir / "registration-prefill.sqlite"
    for leftover in workdir.glob(prefill.name + "*"):
        leftover.unlink()
    store = SQLiteStore(prefill)
    for start in range(0, args.reg_prefill, args.chunk):
        store.register_many(generate_cards(seed, start, min(args.chunk, args.reg_prefill - start)))
    store.close()
    _checkpoint(prefill)
    out: dict[str, Any] = {"prefill_cards": args.reg_prefill}
    for processes in (1, 4):
        path = workdir / f"registration-{processes}p.sqlite"
        shutil.copyfile(prefill, path)
        run = _run_writers(path, seed, processes, args.reg_count)
        out[f"register_{processes}p"] = run
        say(
            f"  register() x{run['registrations']:,} from {processes} process(es):"
            f" {run['per_s']:,.0f}/s, p50 {run['latency']['p50_ms']:.2f} ms,"
            f" p95 {run['latency']['p95_ms']:.2f} ms"
        )
        for leftover in workdir.glob(path.name + "*"):
            leftover.unlink()
    # bulk: the same number of cards in one register_many transaction
    path = workdir / "registration-bulk.sqlite"
    shutil.copyfile(prefill, path)
    cards = generate_cards(seed, 10**9, args.reg_count)
    store = SQLiteStore(path)
    t0 = time.perf_counter()
    store.register_many(cards)
    bulk_s = time.perf_counter() - t0
    store.close()
    out["register_many"] = {
        "registrations": len(cards),
        "wall_s": round(bulk_s, 3),
        "per_s": round(len(cards) / bulk_s, 1),
    }
    say(f"  register_many x{len(cards):,}: {len(cards) / bulk_s:,.0f}/s")
    for leftover in workdir.glob("registration-*"):
        leftover.unlink()
    one, four = out["register_1p"]["per_s"], out["register_4p"]["per_s"]
    out["ratio_4p_vs_1p"] = round(four / one, 2)
    out["ratio_bulk_vs_1p"] = round(out["register_many"]["per_s"] / one, 2)
    return out


# ================================================================== MLflow

#: (label, llmos query, MLflow filter_string): comparable, not identical;
#: MLflow filters names (LIKE/ILIKE) and tags (=), ANDed; it has no OR and
#: does not search descriptions
MLFLOW_QUERIES = (
    ("name substring", "name:*llama*", "name ILIKE '%llama%'"),
    (
        "keyword + filter",
        "llama family:llama",
        "name ILIKE '%llama%' AND tags.family = 'llama'",
    ),
    ("filter only", "family:bert", "tags.family = 'bert'"),
    (
        "two filters",
        "tag:medical license:apache-2.0",
        "tags.`tag.medical` = 'true' AND tags.license = 'apache-2.0'",
    ),
    (
        "task + family",
        "task:text-classification family:bert",
        "tags.`task.text-classification` = 'true' AND tags.family = 'bert'",
    ),
)


def _mlflow_tags(card: ModelCard) -> dict[str, str]:
    tags = {"provider": card.provider, "format": str(card.format)}
    for key in ("family", "license"):
        if getattr(card, key) is not None:
            tags[key] = str(getattr(card, key)).lower()
    if card.parameters is not None:
        tags["parameters"] = str(card.parameters)
    tags.update({f"task.{t.lower()}": "true" for t in card.tasks})
    tags.update({f"tag.{t.lower()}": "true" for t in card.tags})
    return tags


def bench_mlflow(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    os.environ.setdefault("DO_NOT_TRACK", "true")
    if args.mlflow_path:
        sys.path.append(str(Path(args.mlflow_path).resolve()))
    try:
        import mlflow
        from mlflow import MlflowClient
    except Exception as exc:
        reason = (
            f"mlflow is not importable ({type(exc).__name__}: {exc}); install mlflow-skinny,"
            " sqlalchemy and alembic (or pass --mlflow-path DIR) to compare"
        )
        say(f"mlflow: skipped: {reason}")
        return {"skipped": reason}
    import logging

    for name in ("mlflow", "alembic", "sqlalchemy"):
        logging.getLogger(name).setLevel(logging.WARNING)
    size = args.mlflow_size
    say(f"mlflow {mlflow.__version__}: {size:,} cards")
    cards = generate_cards(args.seed, 0, size)
    ml_path = workdir / "mlflow-registry.sqlite"
    ours_path = workdir / "mlflow-llmos.sqlite"
    for path in (ml_path, ours_path):
        for leftover in workdir.glob(path.name + "*"):
            leftover.unlink()
    uri = f"sqlite:///{ml_path}"
    client = MlflowClient(tracking_uri=uri, registry_uri=uri)
    client.search_registered_models(max_results=1)  # creates the tables
    t0 = time.perf_counter()
    for card in cards:
        client.create_registered_model(
            card.name.replace("/", "--"),  # MLflow refuses '/' in names
            tags=_mlflow_tags(card),
            description=card.description,
        )
    ml_reg_s = time.perf_counter() - t0
    store = SQLiteStore(ours_path)
    t0 = time.perf_counter()
    for card in cards:
        store.register(card)
    ours_reg_s = time.perf_counter() - t0
    out: dict[str, Any] = {
        "version": mlflow.__version__,
        "cards": size,
        "registration": {
            "mlflow_create_registered_model_per_s": round(size / ml_reg_s, 1),
            "llmos_register_per_s": round(size / ours_reg_s, 1),
            "ratio": round(ml_reg_s / ours_reg_s, 2),
        },
        "note": "comparable, not identical, queries: MLflow matches names and tags only"
        " (no description search, no OR, no total count); llmos free text also searches"
        " descriptions",
        "unsupported_by_mlflow": ["OR queries", "free text over descriptions", "params ranges"],
        "queries": [],
    }
    say(
        f"  registration: mlflow {size / ml_reg_s:,.0f}/s, llmos register()"
        f" {size / ours_reg_s:,.0f}/s"
    )
    try:
        for label, ours_query, ml_filter in MLFLOW_QUERIES:
            ours_s, page = measure(
                lambda q=ours_query: store.search(q, limit=LIMIT),
                reps=args.reps,
                warmup=args.warmup,
                budget_s=args.budget,
                min_reps=args.min_reps,
            )
            ml_s, ml_page = measure(
                lambda f=ml_filter: client.search_registered_models(
                    filter_string=f, max_results=LIMIT
                ),
                reps=args.reps,
                warmup=args.warmup,
                budget_s=args.budget,
                min_reps=args.min_reps,
            )
            ours, theirs = summarise(ours_s), summarise(ml_s)
            ours["total"], theirs["page_hits"] = page.total, len(ml_page)
            out["queries"].append(
                {
                    "label": label,
                    "llmos_query": ours_query,
                    "mlflow_filter": ml_filter,
                    "llmos": ours,
                    "mlflow": theirs,
                    "ratio_p50": ratio(theirs["p50_ms"], ours["p50_ms"]),
                    "ratio_p95": ratio(theirs["p95_ms"], ours["p95_ms"]),
                }
            )
            say(
                f"  {label:<18} llmos p50 {ours['p50_ms']:8.3f} ms | mlflow p50"
                f" {theirs['p50_ms']:8.3f} ms x{out['queries'][-1]['ratio_p50']}"
            )
    finally:
        store.close()
    if not args.keep:
        for path in (ml_path, ours_path):
            for leftover in workdir.glob(path.name + "*"):
                leftover.unlink()
    return out


# ==================================================================== main


def machine_info() -> dict[str, Any]:
    info: dict[str, Any] = {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "platform": platform.platform(),
        "python": platform.python_version(),
        "sqlite": sqlite3.sqlite_version,
        "llmos": metadata.version("llmos"),
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gib"] = round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    try:
        commit = subprocess.run(
            ["git", "-C", str(HERE), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(HERE), "status", "--porcelain", "--", "../core"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        info["git_commit"] = commit + ("+dirty-core" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        pass
    return info


def _sizes(text: str) -> list[int]:
    scale = {"k": 10**3, "m": 10**6}
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        out.append(int(float(part[:-1]) * scale[part[-1]]) if part[-1] in scale else int(part))
    if not out or min(out) < 1:
        raise argparse.ArgumentTypeError(f"bad --sizes {text!r}")
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Registry search latency and registration throughput, side by side with"
        " a naive LIKE scan (and MLflow when installed).",
    )
    p.add_argument(
        "--sizes",
        type=_sizes,
        default=None,
        help="card counts of the search tiers, e.g. 1000,100000,1000000 or 1k,100k,1M"
        " (default: all three)",
    )
    p.add_argument("--quick", action="store_true", help="smoke run: 1k cards, few repetitions")
    p.add_argument("--seed", type=int, default=1, help="card stream seed (default 1)")
    p.add_argument("--reps", type=int, default=100, help="timed runs per query (default 100)")
    p.add_argument("--warmup", type=int, default=5, help="untimed runs per query (default 5)")
    p.add_argument(
        "--budget",
        type=float,
        default=5.0,
        help="seconds per query and side after which timing stops early (default 5)",
    )
    p.add_argument(
        "--min-reps", type=int, default=10, help="timed runs per query at least (default 10)"
    )
    p.add_argument("--chunk", type=int, default=10_000, help="cards per register_many call")
    p.add_argument("--reg-count", type=int, default=2000, help="register() calls per setting")
    p.add_argument(
        "--reg-prefill", type=int, default=10_000, help="cards already registered (default 10k)"
    )
    p.add_argument("--mlflow-size", type=int, default=10_000, help="cards for the MLflow part")
    p.add_argument(
        "--mlflow-path", help="a folder with mlflow installed (pip --target), added to sys.path"
    )
    p.add_argument("--no-mlflow", action="store_true", help="skip the MLflow comparison")
    p.add_argument("--no-registration", action="store_true", help="skip registration runs")
    p.add_argument("--cache", help="keep built tier databases here and reuse them (by size+seed)")
    p.add_argument("--keep", help="work in this folder and keep the files (default: a temp dir)")
    p.add_argument("--out", type=Path, help=f"results JSON (default {DEFAULT_OUT})")
    args = p.parse_args(argv)
    if args.quick:
        args.sizes = [1_000]
        args.reps, args.warmup, args.min_reps, args.budget = 20, 2, 5, 1.0
        args.reg_count, args.reg_prefill = 200, 1000
        args.mlflow_size = min(args.mlflow_size, 300)
    args.sizes = args.sizes or list(DEFAULT_SIZES)
    args.out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    return args


def goal(results: dict[str, Any]) -> dict[str, Any]:
    tier = results["tiers"].get(str(1_000_000))
    if tier is None:
        return {GOAL_KEY: None, "note": "the 1M tier was not run"}
    cls = tier["classes"]["keyword_filter"]
    p95 = cls["llmos"]["p95_ms"]
    worst = max(cls["queries"], key=lambda e: e["llmos"]["p95_ms"])
    return {
        GOAL_KEY: p95 < GOAL_MS,
        "p95_ms": p95,
        "every_query_under_10_ms": worst["llmos"]["p95_ms"] < GOAL_MS,
        "worst_query": worst["query"],
        "worst_query_p95_ms": worst["llmos"]["p95_ms"],
    }


def write(results: dict[str, Any], out: Path) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(results, indent=2) + "\n")
    tmp.replace(out)


def summary(results: dict[str, Any]) -> Iterator[str]:
    yield ""
    yield "registry search, LIMIT 20 (ms; ratio = naive LIKE scan / llmos, at p50)"
    header = f"{'cards':>9}  {'class':<18} {'p50':>9} {'p95':>9} {'LIKE p50':>10} {'ratio':>8}"
    yield header
    yield "-" * len(header)
    for size, tier in results["tiers"].items():
        for cls, row in tier["classes"].items():
            yield (
                f"{int(size):>9,}  {cls:<18} {row['llmos']['p50_ms']:9.3f}"
                f" {row['llmos']['p95_ms']:9.3f} {row['baseline']['p50_ms']:10.2f}"
                f" {row['ratio_p50']!s:>8}"
            )
        build = tier["build"]
        cached = " (cached)" if build["cached"] else ""
        yield (
            f"{int(size):>9,}  build: {build['registry_cards_per_s']:,.0f} cards/s with"
            f" register_many, {build['registry_db_mb']} MB{cached}"
        )
    reg = results.get("registration")
    if reg:
        yield ""
        yield (
            f"registration: register() 1 process {reg['register_1p']['per_s']:,.0f}/s,"
            f" 4 processes {reg['register_4p']['per_s']:,.0f}/s (x{reg['ratio_4p_vs_1p']}),"
            f" register_many {reg['register_many']['per_s']:,.0f}/s"
        )
    ml = results.get("mlflow")
    if ml:
        yield ""
        if "skipped" in ml:
            yield f"mlflow: skipped ({ml['skipped']})"
        else:
            yield f"mlflow {ml['version']} on {ml['cards']:,} cards (ratio = mlflow / llmos, p50):"
            for q in ml["queries"]:
                yield (
                    f"  {q['label']:<18} llmos {q['llmos']['p50_ms']:8.3f} ms"
                    f"  mlflow {q['mlflow']['p50_ms']:8.3f} ms  x{q['ratio_p50']}"
                )
            r = ml["registration"]
            yield (
                f"  registration: mlflow {r['mlflow_create_registered_model_per_s']:,.0f}/s,"
                f" llmos {r['llmos_register_per_s']:,.0f}/s"
            )
    g = results["goal"]
    yield ""
    if g[GOAL_KEY] is None:
        yield f"goal ({GOAL_KEY}): not measured ({g['note']})"
    else:
        yield (
            f"goal ({GOAL_KEY}): {'MET' if g[GOAL_KEY] else 'MISSED'} - p95 {g['p95_ms']:.2f} ms;"
            f" worst query {g['worst_query']!r} p95 {g['worst_query_p95_ms']:.2f} ms"
        )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    configure_logging("warning")  # the store logs every registration at info
    began = time.perf_counter()
    if args.keep:
        workdir = Path(args.keep)
        workdir.mkdir(parents=True, exist_ok=True)
        cleanup = False
    else:
        workdir = Path(tempfile.mkdtemp(prefix="llmos-bench-"))
        cleanup = True
    results: dict[str, Any] = {
        "benchmark": "registry_search",
        "started_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "complete": False,
        "machine": machine_info(),
        "config": {
            "sizes": args.sizes,
            "seed": args.seed,
            "limit": LIMIT,
            "reps": args.reps,
            "warmup": args.warmup,
            "min_reps": args.min_reps,
            "budget_s": args.budget,
            "chunk": args.chunk,
            "quick": args.quick,
            "query_classes": QUERY_CLASSES,
            "main_classes": list(MAIN_CLASSES),
            "class_figures": "samples of the class's queries, each query weighing the same",
        },
        "tiers": {},
    }
    say(f"results -> {args.out}; work files in {workdir}")
    try:
        for size in args.sizes:
            results["tiers"][str(size)] = bench_tier(args, workdir, size)
            write(results, args.out)
        if not args.no_registration:
            results["registration"] = bench_registration(args, workdir)
            write(results, args.out)
        if not args.no_mlflow:
            results["mlflow"] = bench_mlflow(args, workdir)
        results["goal"] = goal(results)
        results["complete"] = True
        results["duration_s"] = round(time.perf_counter() - began, 1)
        write(results, args.out)
    finally:
        if cleanup:
            shutil.rmtree(workdir, ignore_errors=True)
    print("\n".join(summary(results)))
    print(f"\nresults: {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
