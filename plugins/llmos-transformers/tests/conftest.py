"""Fixtures: tiny models built in seconds, and the plugin loaded for real.

Every model here is made from a config with a fixed seed and saved with
``save_pretrained`` (safetensors): a byte-level BPE tokenizer trained on a few
sentences, a 2-layer Llama, a tiny sentence-transformers BERT folder, a tiny
BERT classifier, and a GGUF file written from the Llama with the ``gguf``
package. Nothing touches the network.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Before torch or huggingface_hub is imported by anything: no hub, one thread
# (two threads were measured up to 50x slower on a loaded 2-core machine).
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest
import torch

from llmos.logs import configure_logging
from llmos.plugin.manager import PluginManager
from llmos.types import LoadedModel, LoadRequest, ModelCard
from llmos_transformers import plugin

torch.set_num_threads(1)

SENTENCES = [
    "the cat sat on the mat.",
    "a dog ran in the park!",
    "what is the capital of france? paris is.",
    "hello world, how are you today?",
    "stock markets fell sharply on monday.",
    "a kitten is on the rug.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant: {% endif %}"
)
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    configure_logging("warning", fmt="console")


@pytest.fixture(scope="session")
def bundled_home(request: pytest.FixtureRequest) -> Path:
    """A data folder kept in pytest's cache for the tests with the bundled
    models: SmolLM2's GGUF conversion (about half a minute) happens once, and
    both the provider tests (its ``cache/transformers``) and the daemon tests
    (the whole home) reuse it."""
    return Path(request.config.cache.mkdir("llmos-bundled-home"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer with <unk> <pad> <s> </s> and a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=160, special_tokens=["<unk>", "<pad>", "<s>", "</s>"], show_progress=False
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
    folder = tmp_path_factory.mktemp("tokenizer")
    tokenizer.save_pretrained(folder)
    return folder


def _copy_tokenizer(tokenizer_dir: Path, folder: Path) -> None:
    for file in tokenizer_dir.iterdir():
        shutil.copy(file, folder / file.name)


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A 2-layer LlamaForCausalLM, hidden 32, with the tokenizer beside it.

    Its output head is scaled up and never picks a special token, so greedy
    text is long, readable and far from ties (batching cannot flip a token).
    """
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
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
        initializer_range=0.2,
    )
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight[:4] = 0  # <unk> <pad> <s> </s>: logit 0, never the best
        model.lm_head.weight[4:] *= 3
    folder = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
    return folder


@pytest.fixture(scope="session")
def llama_nochat_dir(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    """The tiny Llama with a tokenizer that has no chat template."""
    folder = tmp_path_factory.mktemp("tiny-llama-nochat")
    for file in llama_dir.iterdir():
        if file.name != "chat_template.jinja":
            shutil.copy(file, folder / file.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _bert_config(vocab_size: int, **extra: Any) -> Any:
    from transformers import BertConfig

    return BertConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=1,
        **extra,
    )


@pytest.fixture(scope="session")
def encoder_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A sentence-transformers folder: BertModel + mean Pooling + Normalize,
    max_seq_length 16."""
    from transformers import AutoTokenizer, BertModel

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(1)
    model = BertModel(_bert_config(len(tokenizer))).eval()
    folder = tmp_path_factory.mktemp("tiny-encoder")
    model.save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
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
        json.dumps(
            {
                "word_embedding_dimension": 32,
                "pooling_mode_cls_token": False,
                "pooling_mode_mean_tokens": True,
                "pooling_mode_max_tokens": False,
            }
        )
    )
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 16}))
    return folder


@pytest.fixture(scope="session")
def classifier_dir(tmp_path_factory: pytest.TempPathFactory, tokenizer_dir: Path) -> Path:
    """A BertForSequenceClassification with three named labels."""
    from transformers import AutoTokenizer, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = _bert_config(
        len(tokenizer), id2label=LABELS, label2id={v: k for k, v in LABELS.items()}
    )
    torch.manual_seed(2)
    model = BertForSequenceClassification(config).eval()
    folder = tmp_path_factory.mktemp("tiny-classifier")
    model.save_pretrained(folder)
    _copy_tokenizer(tokenizer_dir, folder)
    return folder


def _permute(weights: Any, heads: int) -> Any:
    """llama.cpp's layout of q/k rows for rotary embeddings (convert_hf_to_gguf.py)."""
    rows = weights.shape[0]
    return (
        weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
        .swapaxes(1, 2)
        .reshape(weights.shape)
    )


def write_gguf(model_dir: Path, path: Path) -> None:
    """Write the Llama in ``model_dir`` (and its byte-level BPE tokenizer) as
    an F32 GGUF file the way llama.cpp's converter lays it out."""
    import gguf
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    spec = json.loads((model_dir / "tokenizer.json").read_text())
    tokens = [""] * len(tokenizer)
    for token, index in spec["model"]["vocab"].items():
        tokens[index] = token
    for added in spec["added_tokens"]:
        tokens[added["id"]] = added["content"]
    special = {added["id"] for added in spec["added_tokens"] if added["special"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_name("tiny llama")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if i in special else 1 for i in range(len(tokens))])
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_add_bos_token(False)
    writer.add_chat_template(tokenizer.chat_template)

    weights = {k: v.float().numpy() for k, v in model.state_dict().items()}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    writer.add_tensor("token_embd.weight", weights["model.embed_tokens.weight"])
    for i in range(config.num_hidden_layers):
        layer = f"model.layers.{i}."
        names = {
            "attn_norm": "input_layernorm",
            "attn_v": "self_attn.v_proj",
            "attn_output": "self_attn.o_proj",
            "ffn_norm": "post_attention_layernorm",
            "ffn_gate": "mlp.gate_proj",
            "ffn_up": "mlp.up_proj",
            "ffn_down": "mlp.down_proj",
        }
        for ours, theirs in names.items():
            writer.add_tensor(f"blk.{i}.{ours}.weight", weights[f"{layer}{theirs}.weight"])
        q = weights[f"{layer}self_attn.q_proj.weight"]
        k = weights[f"{layer}self_attn.k_proj.weight"]
        writer.add_tensor(f"blk.{i}.attn_q.weight", _permute(q, heads))
        writer.add_tensor(f"blk.{i}.attn_k.weight", _permute(k, kv_heads))
    writer.add_tensor("output_norm.weight", weights["model.norm.weight"])
    writer.add_tensor("output.weight", weights["lm_head.weight"])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.fixture(scope="session")
def gguf_file(tmp_path_factory: pytest.TempPathFactory, llama_dir: Path) -> Path:
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny-llama.F32.gguf"
    write_gguf(llama_dir, path)
    return path


# --------------------------------------------------------------------------
# The plugin, loaded the way the kernel loads it
# --------------------------------------------------------------------------


@pytest.fixture(scope="session")
def pm() -> Iterator[PluginManager]:
    """A plugin manager with the kernel's defaults and this plugin registered."""
    manager = PluginManager()
    manager.load(entry_points=[])
    info = manager.register(plugin, "transformers")
    try:
        assert info.status == "loaded", info.error
        yield manager
    finally:
        manager.unregister("transformers")


Loader = Callable[..., LoadedModel]


@pytest.fixture(scope="session")
def load_model(pm: PluginManager, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loader]:
    """``load_model(path, name="tiny", operator=None, cache_dir=None, **card_options)``
    loads through the registered provider's ``load``; models are closed at the end."""
    spec = pm.providers["transformers"].spec
    default_cache = tmp_path_factory.mktemp("cache")
    loaded: list[LoadedModel] = []

    def load(
        path: Path | None,
        name: str = "tiny",
        operator: dict[str, Any] | None = None,
        cache_dir: Path | None = None,
        source: str | None = None,
        **options: Any,
    ) -> LoadedModel:
        card = ModelCard(
            name=name,
            provider="transformers",
            source=source if source is not None else str(path),
            options=options,
        )
        request = LoadRequest(
            card=card,
            options=operator or {},
            path=path,
            cache_dir=cache_dir or default_cache,
        )
        model = spec.load(request)
        loaded.append(model)
        return model

    yield load
    for model in loaded:
        model.close()


@pytest.fixture(scope="session")
def llama(load_model: Loader, llama_dir: Path) -> LoadedModel:
    """The tiny Llama, loaded once for the causal-LM tests (max_batch_size 4)."""
    return load_model(llama_dir, max_batch_size=4, max_new_tokens=32)


@pytest.fixture(scope="session")
def hf_llama(llama_dir: Path) -> Any:
    """The same weights loaded directly with transformers, for reference."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(llama_dir).eval()


@pytest.fixture(scope="session")
def hf_tokenizer(llama_dir: Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(llama_dir)
