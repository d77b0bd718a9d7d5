"""Loading: the plugin's registration, what it refuses, its options, GGUF
conversion and its cache, and the cards of the bundled models."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from llmos.errors import UnsafeSourceError, UsageError
from llmos.plugin.manager import HOOK_NAMES, PluginManager
from llmos.registry.sources import SourcePolicy, check_source
from llmos.registry.weights import read_gguf_header, read_safetensors_header
from llmos.types import Capability, CompletionRequest, ModelFormat, Sampling
from llmos_transformers import gguf as gguf_module
from llmos_transformers.sources import BUNDLED, installed

GREEDY = Sampling(temperature=0, max_tokens=10)

# --------------------------------------------------------------------------
# registration
# --------------------------------------------------------------------------


def test_entry_point_loads_the_plugin() -> None:
    manager = PluginManager()
    manager.load()
    info = {i.name: i for i in manager.plugins()}["transformers"]
    assert info.status == "loaded", info.error
    assert info.distribution == "llmos-transformers"
    assert set(info.hooks) <= HOOK_NAMES
    spec = manager.providers["transformers"].spec
    assert spec.formats == ("safetensors", "gguf")
    assert spec.batching is True
    assert Capability.EMBED in spec.capabilities


def test_importing_the_plugin_does_not_import_torch() -> None:
    code = (
        "import sys, llmos, llmos_transformers.plugin;"
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


# --------------------------------------------------------------------------
# refusals
# --------------------------------------------------------------------------


def test_no_local_path_is_a_usage_error(load_model: Any) -> None:
    with pytest.raises(UsageError, match="download it and `llmos models scan` the folder"):
        load_model(None, source="hf://org/model")


def test_pickle_only_folder_refused(load_model: Any, llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "pickled"
    folder.mkdir()
    shutil.copy(llama_dir / "config.json", folder / "config.json")
    (folder / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(UnsafeSourceError, match=r"only pickle weights \(pytorch_model.bin\)"):
        load_model(folder)
    for name in ("model.pt", "weights.ckpt", "model.pth"):
        (tmp_path / name).write_bytes(b"\x80\x04")
        with pytest.raises(UnsafeSourceError, match="pickle"):
            load_model(tmp_path / name)


def test_folder_with_both_loads_the_safetensors(
    load_model: Any, llama_dir: Path, tmp_path: Path
) -> None:
    folder = tmp_path / "both"
    shutil.copytree(llama_dir, folder)
    # loading this would raise (it is no pickle at all): it must never be read
    (folder / "pytorch_model.bin").write_bytes(b"garbage")
    model = load_model(folder)
    [result] = model.complete([CompletionRequest(prompt="the cat", sampling=GREEDY)])
    assert result.text


def test_remote_code_needs_the_operator(load_model: Any, llama_dir: Path) -> None:
    with pytest.raises(UnsafeSourceError, match="allow_remote_code = true"):
        load_model(llama_dir, trust_remote_code=True)
    # a card cannot allow itself
    with pytest.raises(UnsafeSourceError, match="allow_remote_code"):
        load_model(llama_dir, trust_remote_code=True, allow_remote_code=True)
    # an operator default asking for it is held to the same rule
    with pytest.raises(UnsafeSourceError):
        load_model(llama_dir, operator={"trust_remote_code": True})
    model = load_model(llama_dir, trust_remote_code=True, operator={"allow_remote_code": True})
    assert model.settings.trust_remote_code is True


@pytest.mark.parametrize(
    ("options", "match"),
    [
        ({"dtype": "float64"}, "dtype must be one of"),
        ({"max_batch_size": 0}, "max_batch_size must be a positive integer"),
        ({"device": "tpu"}, "device must be"),
        ({"task": "vision"}, "task must be one of"),
        ({"threads": "two"}, "threads must be a positive integer"),
        ({"zero_shot_template": "no placeholder"}, "zero_shot_template"),
        ({"gguf_file": "../x.gguf"}, "plain file name"),
    ],
)
def test_bad_options(load_model: Any, llama_dir: Path, options: dict[str, Any], match: str) -> None:
    with pytest.raises(UsageError, match=match):
        load_model(llama_dir, **options)


def test_card_options_override_operator_defaults(load_model: Any, llama_dir: Path) -> None:
    model = load_model(llama_dir, max_batch_size=3, operator={"max_batch_size": 5, "threads": 1})
    assert model.max_batch_size == 3
    assert model.settings.threads == 1
    assert load_model(llama_dir, operator={"max_batch_size": 5}).max_batch_size == 5


def test_cuda_refused_without_a_gpu(load_model: Any, llama_dir: Path) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UsageError, match="no CUDA device"):
        load_model(llama_dir, device="cuda")
    assert load_model(llama_dir, device="auto").device.type == "cpu"


def test_task_forces_the_kind(load_model: Any, llama_dir: Path, tmp_path: Path) -> None:
    folder = tmp_path / "odd"
    shutil.copytree(llama_dir, folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["LlamaSomethingNew"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UsageError, match="set the card option"):
        load_model(folder)
    model = load_model(folder, task="causal")
    assert Capability.COMPLETE in model.capabilities


# --------------------------------------------------------------------------
# GGUF
# --------------------------------------------------------------------------


def test_gguf_converts_once_into_the_cache(
    load_model: Any,
    llama: Any,
    gguf_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    cache = tmp_path / "cache"
    model = load_model(gguf_file, name="vendor/tiny-gguf", cache_dir=cache)
    digest = gguf_module.sha256_of(gguf_file)
    folder = cache / "vendor--tiny-gguf" / digest
    assert (folder / gguf_module.MARKER).is_file()
    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin"))
    assert [p.name for p in folder.parent.iterdir()] == [digest]  # no scratch left behind
    # the converted model is the Llama the file was written from
    prompts = [CompletionRequest(prompt=p, sampling=GREEDY) for p in ("the cat", "hello world")]
    assert [r.text for r in model.complete(prompts)] == [r.text for r in llama.complete(prompts)]
    assert Capability.CHAT in model.capabilities  # the template came through the GGUF

    # a second load (any process) reads the cached folder and converts nothing
    stamp = (folder / gguf_module.MARKER).stat().st_mtime_ns

    def refuse(gguf: Path, out: Path) -> None:
        raise AssertionError("converted again")

    monkeypatch.setattr(gguf_module, "convert", refuse)
    again = load_model(gguf_file, name="vendor/tiny-gguf", cache_dir=cache)
    assert (folder / gguf_module.MARKER).stat().st_mtime_ns == stamp
    assert [r.text for r in again.complete(prompts)] == [r.text for r in llama.complete(prompts)]


def test_gguf_in_a_folder_and_a_changed_file(
    load_model: Any, gguf_file: Path, tmp_path: Path
) -> None:
    source = tmp_path / "model"
    source.mkdir()
    shutil.copy(gguf_file, source / "tiny.gguf")
    cache = tmp_path / "cache"
    load_model(source, name="folder-gguf", cache_dir=cache)
    with (source / "tiny.gguf").open("ab") as file:  # same tensors, different bytes
        file.write(b"\0" * 32)
    load_model(source, name="folder-gguf", cache_dir=cache)
    assert len(list((cache / "folder-gguf").iterdir())) == 2
    shutil.copy(gguf_file, source / "second.gguf")
    with pytest.raises(UsageError, match="several GGUF files"):
        load_model(source, name="folder-gguf", cache_dir=cache)
    model = load_model(source, name="folder-gguf", cache_dir=cache, gguf_file="second.gguf")
    assert Capability.COMPLETE in model.capabilities


def test_concurrent_conversion_keeps_one_copy(gguf_file: Path, tmp_path: Path) -> None:
    """A conversion that finds the folder already renamed into place keeps that copy."""
    from llmos.types import ModelCard

    card = ModelCard(name="race", provider="transformers")
    cache = tmp_path / "cache"
    first = gguf_module.converted_folder(gguf_file, cache, card)
    marker = (first / gguf_module.MARKER).read_text()
    (first / gguf_module.MARKER).rename(first / "hidden")  # looks unconverted ...
    real_convert = gguf_module.convert

    def convert_and_lose(gguf: Path, out: Path) -> None:
        real_convert(gguf, out)
        (first / "hidden").rename(first / gguf_module.MARKER)  # ... until another wins

    try:
        gguf_module.convert = convert_and_lose  # type: ignore[assignment]
        second = gguf_module.converted_folder(gguf_file, cache, card)
    finally:
        gguf_module.convert = real_convert  # type: ignore[assignment]
    assert second == first
    assert (first / gguf_module.MARKER).read_text() == marker
    assert [p.name for p in first.parent.iterdir()] == [first.name]


# --------------------------------------------------------------------------
# bundled model cards
# --------------------------------------------------------------------------


def test_discovered_cards_are_the_installed_bundles(pm: PluginManager) -> None:
    cards = {r.spec.name: r.spec for r in pm.discover_models() if r.plugin == "transformers"}
    expected = {card.name for dist, card in BUNDLED.items() if installed(dist)}
    assert set(cards) == expected
    for card in cards.values():
        assert card.provider == "transformers"
        assert "bundled" in card.tags


@pytest.mark.parametrize("dist", sorted(BUNDLED))
def test_bundled_sources_resolve_and_counts_match(dist: str) -> None:
    if not installed(dist):
        pytest.skip(f"{dist} is not installed (pip install --no-deps {dist})")
    card = BUNDLED[dist]
    parsed = check_source(card.source, SourcePolicy(allowed_roots=()))
    assert parsed.kind == "pkg"
    assert parsed.path is not None and parsed.path.exists()
    if card.format == ModelFormat.SAFETENSORS:
        header = read_safetensors_header(parsed.path / "model.safetensors")
        floats = sum(t.elements for t in header.tensors if t.dtype.startswith(("F", "BF")))
        assert card.parameters == floats
        assert (parsed.path / "modules.json").is_file()
    else:
        header = read_gguf_header(parsed.path, tensors=True)
        assert card.parameters == header.tensor_parameters
        assert header.metadata["general.architecture"] == card.family


def test_threads_option_sets_torch_threads(load_model: Any, llama_dir: Path) -> None:
    import torch

    try:
        load_model(llama_dir, threads=2)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)
