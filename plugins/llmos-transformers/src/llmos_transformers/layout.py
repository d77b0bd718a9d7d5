"""What a model folder (or file) holds, and which kind of model it is.

Read from the files alone, before torch is imported: ``config.json``'s
``architectures``, a sentence-transformers ``modules.json`` with its pooling
and normalisation, or a GGUF file. Pickle-only weights are refused here, so
no code path can reach ``torch.load``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

import attrs

from llmos.errors import UnsafeSourceError, UsageError
from llmos.registry.weights import PICKLE_SUFFIXES
from llmos_transformers.options import Settings

__all__ = ["POOLING_MODES", "Kind", "Layout", "inspect"]

Kind = Literal["causal", "encoder", "classifier"]

#: sentence-transformers pooling modes this provider computes
POOLING_MODES = ("mean", "cls", "max", "mean_sqrt_len", "lasttoken")
_POOLING_KEYS = {
    "pooling_mode_mean_tokens": "mean",
    "pooling_mode_cls_token": "cls",
    "pooling_mode_max_tokens": "max",
    "pooling_mode_mean_sqrt_len_tokens": "mean_sqrt_len",
    "pooling_mode_lasttoken": "lasttoken",
    "pooling_mode_weightedmean_tokens": "weightedmean",
}
_MAX_JSON_BYTES = 64 << 20
_CAUSAL_HEADS = ("ForCausalLM", "LMHeadModel")


@attrs.frozen(kw_only=True)
class Layout:
    """A model on disk, understood.

    ``folder`` holds ``config.json`` and the weights (for a sentence-transformers
    model, the Transformer module's folder); for a GGUF model it is the file's
    folder and ``gguf`` the file.
    """

    kind: Kind
    folder: Path
    gguf: Path | None = None
    architecture: str | None = None
    #: encoders: how token vectors become one vector, and whether it is unit length
    pooling: str = "mean"
    normalize: bool = False
    #: encoders: the sentence-transformers ``max_seq_length``, if given
    max_seq_length: int | None = None


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise UsageError(f"{path}: over {_MAX_JSON_BYTES} bytes, not read", param="source")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: cannot read JSON: {exc}", param="source") from None


def _inside(folder: Path, relative: str, what: str) -> Path:
    target = (folder / relative).resolve()
    if ".." in Path(relative).parts or not target.is_relative_to(folder.resolve()):
        raise UnsafeSourceError(f"{folder}: {what} path {relative!r} leaves the model folder")
    return folder / relative if relative else folder


def inspect(path: Path, settings: Settings) -> Layout:
    """The :class:`Layout` of the checked local ``path`` a card's source names.

    Raises :class:`~llmos.errors.UnsafeSourceError` for pickle weights and
    :class:`~llmos.errors.UsageError` for anything this provider cannot load,
    saying what would work.
    """
    if path.is_file():
        return _file(path, settings)
    if not path.is_dir():
        raise UsageError(f"{path} is neither a file nor a folder", param="source")
    if settings.gguf_file is not None:
        return _gguf(_inside(path, settings.gguf_file, "gguf_file"), settings)
    if (path / "modules.json").is_file():
        return _sentence_transformers(path, settings)
    if (path / "config.json").is_file():
        return _hf_folder(path, settings)
    ggufs = sorted(p for p in path.glob("*.gguf") if p.is_file())
    if len(ggufs) == 1:
        return _gguf(ggufs[0], settings)
    if ggufs:
        names = ", ".join(p.name for p in ggufs)
        raise UsageError(
            f"{path} holds several GGUF files ({names}); name one with the card option gguf_file",
            param="source",
        )
    raise UsageError(
        f"{path} is not a model folder: no config.json, modules.json or .gguf file",
        param="source",
    )


def _file(path: Path, settings: Settings) -> Layout:
    suffix = path.suffix.lower()
    if suffix == ".gguf":
        return _gguf(path, settings)
    if suffix in PICKLE_SUFFIXES:
        raise UnsafeSourceError(_pickle_message(path, [path.name]), param="source")
    raise UsageError(
        f"{path}: a single {suffix or 'extensionless'} file is not a model this provider loads;"
        " give a Hugging Face folder (config.json + *.safetensors) or a .gguf file",
        param="source",
    )


def _gguf(path: Path, settings: Settings) -> Layout:
    if not path.is_file():
        raise UsageError(f"{path}: no such GGUF file", param="source")
    if settings.task not in (None, "causal"):
        raise UsageError(f"{path}: GGUF models load as causal LMs, not as task {settings.task!r}")
    return Layout(kind="causal", folder=path.parent, gguf=path)


def _pickle_message(folder: Path, pickles: list[str]) -> str:
    return (
        f"{folder}: only pickle weights ({', '.join(pickles)}); loading them runs the code they"
        " carry, so this provider loads safetensors only. Convert them to safetensors"
        " (model.save_pretrained(..., safe_serialization=True) where you trust them)"
    )


def _architecture(folder: Path) -> str | None:
    config = _read_json(folder / "config.json")
    if not isinstance(config, dict):
        raise UsageError(f"{folder / 'config.json'} is not a JSON object", param="source")
    architectures = config.get("architectures")
    if isinstance(architectures, list) and architectures and isinstance(architectures[0], str):
        return architectures[0]
    return None


def _check_weights(folder: Path) -> None:
    if any(p.is_file() for p in folder.glob("*.safetensors")):
        return
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
    if pickles:
        raise UnsafeSourceError(_pickle_message(folder, pickles), param="source")
    raise UsageError(f"{folder}: no weights (no *.safetensors file)", param="source")


def _hf_folder(folder: Path, settings: Settings) -> Layout:
    architecture = _architecture(folder)
    _check_weights(folder)
    kind = settings.task or _kind_of(architecture, folder)
    return Layout(kind=kind, folder=folder, architecture=architecture)


def _kind_of(architecture: str | None, folder: Path) -> Kind:
    if architecture is not None:
        if architecture.endswith(_CAUSAL_HEADS):
            return "causal"
        if architecture.endswith("ForSequenceClassification"):
            return "classifier"
        if architecture.endswith("Model"):  # BertModel: a bare encoder
            return "encoder"
    raise UsageError(
        f"{folder}: architecture {architecture!r} is none this provider serves (…ForCausalLM,"
        " …ForSequenceClassification, or a bare encoder such as BertModel); set the card option"
        " task to causal, encoder or classifier if it is one of them",
        param="source",
    )


def _sentence_transformers(root: Path, settings: Settings) -> Layout:
    modules = _read_json(root / "modules.json")
    if not isinstance(modules, list):
        raise UsageError(f"{root / 'modules.json'} is not a list of modules", param="source")
    folder, pooling, normalize = root, "mean", False
    for module in modules:
        kind = str(module.get("type", "")) if isinstance(module, dict) else ""
        inner = module.get("path", "") if isinstance(module, dict) else ""
        if not isinstance(inner, str):
            raise UsageError(f"{root / 'modules.json'}: a module path is not a string")
        short = kind.rsplit(".", 1)[-1]
        if short == "Transformer":
            folder = _inside(root, inner, "Transformer module")
        elif short == "Pooling":
            pooling = _pooling(_inside(root, inner, "Pooling module") / "config.json")
        elif short == "Normalize":
            normalize = True
        else:
            # A Dense layer, say: leaving it out would give wrong vectors.
            raise UsageError(
                f"{root}: sentence-transformers module {kind!r} is not supported"
                " (Transformer, Pooling and Normalize are)",
                param="source",
            )
    if not (folder / "config.json").is_file():
        raise UsageError(f"{folder}: no config.json", param="source")
    architecture = _architecture(folder)
    _check_weights(folder)
    max_seq_length = None
    for config_name in ("sentence_bert_config.json",):
        config_path = folder / config_name
        if config_path.is_file():
            config = _read_json(config_path)
            value = config.get("max_seq_length") if isinstance(config, dict) else None
            if isinstance(value, int) and not isinstance(value, bool) and value > 0:
                max_seq_length = value
    return Layout(
        kind=settings.task or "encoder",
        folder=folder,
        architecture=architecture,
        pooling=pooling,
        normalize=normalize,
        max_seq_length=max_seq_length,
    )


def _pooling(config_path: Path) -> str:
    if not config_path.is_file():
        return "mean"  # sentence-transformers' own default
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise UsageError(f"{config_path} is not a JSON object", param="source")
    if isinstance(config.get("pooling_mode"), str):  # newer files name the mode
        modes = [config["pooling_mode"].removesuffix("_tokens").removesuffix("_token")]
    else:
        modes = [mode for key, mode in _POOLING_KEYS.items() if config.get(key) is True]
    if not modes:
        return "mean"
    if len(modes) > 1 or modes[0] not in POOLING_MODES:
        raise UsageError(
            f"{config_path}: pooling {'+'.join(modes)} is not supported; one of"
            f" {', '.join(POOLING_MODES)} is",
            param="source",
        )
    return modes[0]
