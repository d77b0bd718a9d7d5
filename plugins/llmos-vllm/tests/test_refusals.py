"""What the vllm provider refuses, and the message that says why — all of
it before an engine is started (or, for a request, by the running one)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest

from llmos.errors import UnsafeSourceError, UsageError
from llmos.runtime.kernel import Kernel
from llmos.types import Capability, CompletionRequest, LoadRequest, ModelCard, ModelFormat
from llmos_vllm.options import engine_settings

peft = pytest.importorskip("peft")


def load(kernel: Kernel, card: ModelCard, path: Path | None, **more: Any) -> Any:
    spec = kernel.plugins.providers["vllm"].spec
    more.setdefault("options", kernel.plugin_options("vllm"))
    return spec.load(
        LoadRequest(card=card, path=path, cache_dir=more.pop("cache_dir", None), **more)
    )


def base_card(tiny_dir: Path, **options: Any) -> ModelCard:
    return ModelCard(
        name="tiny-base", version=1, provider="vllm", source=str(tiny_dir), options=options
    )


def adapter_card(folder: Path, **options: Any) -> ModelCard:
    return ModelCard(
        name="an-adapter",
        provider="vllm",
        source=str(folder),
        format=ModelFormat.ADAPTER,
        parents=("tiny-base@1",),
        options=options,
    )


def load_adapter(kernel: Kernel, tiny_dir: Path, folder: Path, **options: Any) -> Any:
    return load(
        kernel,
        adapter_card(folder, **options),
        folder,
        base=base_card(tiny_dir),
        base_path=tiny_dir,
    )


def write_adapter(model_dir: Path, out: Path, config: Any) -> Path:
    from transformers import AutoModelForCausalLM

    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(model_dir), config)
    model.save_pretrained(out, safe_serialization=True)
    return out


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            {"device": "cuda"},
            "device is not an option of the vllm provider: vLLM runs on the platform",
        ),
        ({"threads": 2}, "threads is not an option.*VLLM_CPU_OMP_THREADS_BIND"),
        ({"labels": ["a", "b"]}, "labels is not an option.*transformers provider"),
        ({"task": "classifier"}, "serves causal language models"),
        ({"dtype": "float64"}, "dtype must be one of auto, float32, bfloat16, float16"),
        ({"max_lora_rank": 12}, "max_lora_rank must be one of 8, 16, 32"),
        ({"max_loras": 4, "max_cpu_loras": 2}, r"max_cpu_loras \(2\) must be at least max_loras"),
        ({"allow_remote_code": True}, r"allow_remote_code .* are the operator's"),
    ],
)
def test_options_vllm_cannot_honour_are_refused(
    kernel: Kernel, tiny_dir: Path, options: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        load(kernel, base_card(tiny_dir, **options), tiny_dir)


def test_remote_code_needs_the_operators_word(tiny_dir: Path) -> None:
    card = base_card(tiny_dir, trust_remote_code=True)
    with pytest.raises(UnsafeSourceError, match="allow_remote_code = true"):
        engine_settings(card, {})
    assert engine_settings(card, {"allow_remote_code": True}).trust_remote_code is True
    assert engine_settings(base_card(tiny_dir), {}).trust_remote_code is False  # off by default


def test_what_a_model_folder_must_be(kernel: Kernel, tiny_dir: Path, tmp_path: Path) -> None:
    pickled = tmp_path / "pickled"
    shutil.copytree(tiny_dir, pickled)
    (pickled / "model.safetensors").unlink()
    (pickled / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeSourceError, match="only pickle weights"):
        load(kernel, base_card(pickled), pickled)
    with pytest.raises(UsageError, match="loads local models only"):
        load(kernel, ModelCard(name="hub", provider="vllm", source="hf://org/model"), None)

    from transformers import BertConfig, BertModel

    encoder = tmp_path / "encoder"
    BertModel(
        BertConfig(
            vocab_size=64,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
        )
    ).save_pretrained(encoder)
    with pytest.raises(UsageError, match="is not a causal language model but encoder"):
        load(kernel, base_card(encoder), encoder)


def test_adapters_vllm_cannot_serve_are_refused(
    kernel: Kernel, tiny_dir: Path, tmp_path: Path
) -> None:
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    ia3 = write_adapter(tiny_dir, tmp_path / "ia3", peft.IA3Config(task_type="CAUSAL_LM"))
    with pytest.raises(UsageError, match="is IA3 on a causal model; the vllm provider serves LoRA"):
        load_adapter(kernel, tiny_dir, ia3)
    saved = peft.LoraConfig(
        task_type="CAUSAL_LM", r=4, target_modules=["q_proj"], modules_to_save=["lm_head"]
    )
    with pytest.raises(UsageError, match="extra trained modules"):
        load_adapter(kernel, tiny_dir, write_adapter(tiny_dir, tmp_path / "saved", saved))
    wide = peft.LoraConfig(task_type="CAUSAL_LM", r=16, target_modules=["q_proj"])
    with pytest.raises(
        UsageError, match=r"rank 16, more than max_lora_rank \(8\).*set max_lora_rank to 16"
    ):
        load_adapter(kernel, tiny_dir, write_adapter(tiny_dir, tmp_path / "wide", wide))
    folder = write_adapter(tiny_dir, tmp_path / "lora", lora)
    with pytest.raises(UsageError, match="an adapter runs in its base model's engine"):
        load_adapter(kernel, tiny_dir, folder, dtype="float32")
    with pytest.raises(UsageError, match="needs its base model"):
        load(kernel, adapter_card(folder), folder)
    with pytest.raises(UsageError, match="not an adapter folder"):
        load_adapter(kernel, tiny_dir, tiny_dir)
    pickled = tmp_path / "pickled-lora"
    pickled.mkdir()
    shutil.copy(folder / "adapter_config.json", pickled)
    (pickled / "adapter_model.bin").write_bytes(b"not loaded")
    with pytest.raises(UnsafeSourceError, match="only pickle weights"):
        load_adapter(kernel, tiny_dir, pickled)


def test_an_adapter_tuned_on_another_base_is_refused(
    kernel: Kernel, tiny_dir: Path, tmp_path: Path
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = tmp_path / "other-llama"
    config = LlamaConfig(
        vocab_size=320,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=1,
        num_key_value_heads=1,
    )
    LlamaForCausalLM(config).save_pretrained(other)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    folder = write_adapter(other, tmp_path / "misfit", lora)
    with pytest.raises(
        UsageError,
        match=r"does not fit base model 'tiny-base@1'.*q_proj of layer 0"
        r" with 32 inputs; the base's has 64",
    ):
        load_adapter(kernel, tiny_dir, folder)
    lora = peft.LoraConfig(task_type="CAUSAL_LM", r=4, target_modules=["q_proj", "v_proj"])
    fitting = write_adapter(tiny_dir, tmp_path / "fitting", lora)
    (fitting / "llmos_tuning.json").write_text(json.dumps({"base": "acme/other@3"}))
    with pytest.raises(UsageError, match="was tuned on 'acme/other@3', not on 'tiny-base@1'"):
        load_adapter(kernel, tiny_dir, fitting)


def test_a_prompt_longer_than_the_context_is_refused(kernel: Kernel) -> None:
    request = CompletionRequest(prompt="the cat sat on the mat. " * 60)
    with pytest.raises(UsageError, match="takes at most 256 tokens in all"):
        kernel.call("tiny", Capability.COMPLETE, [request])


def test_a_gguf_file_is_served_from_its_converted_folder(tiny_dir: Path, tmp_path: Path) -> None:
    """A GGUF source is de-quantized once by llmos-transformers' conversion;
    vLLM is given that safetensors folder (the transformers provider's weights)."""
    import importlib.util

    from safetensors.numpy import load_file

    from llmos_vllm.folders import model_folder

    fixtures = Path(__file__).parents[2] / "llmos-transformers" / "tests" / "conftest.py"
    spec = importlib.util.spec_from_file_location("_llmos_transformers_fixtures", fixtures)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    gguf = tmp_path / "tiny.F32.gguf"
    module.write_gguf(tiny_dir, gguf)
    card = ModelCard(name="tiny-gguf", provider="vllm", source=str(gguf))
    folder = model_folder(gguf, card, engine_settings(card, {}), tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "tiny-gguf"
    assert json.loads((folder / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    converted, original = (
        load_file(folder / "model.safetensors"),
        load_file(tiny_dir / "model.safetensors"),
    )
    name = "model.layers.0.self_attn.q_proj.weight"
    assert (converted[name] == original[name]).all()
    assert model_folder(gguf, card, engine_settings(card, {}), tmp_path / "cache") == folder  # once
