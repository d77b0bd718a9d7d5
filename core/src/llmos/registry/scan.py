"""Find models on disk: Hugging Face folders and GGUF files, as model cards.

``llmos models scan PATH`` walks PATH (to a bounded depth, never following a
symlink out of it) and returns a :class:`ScanResult`: a card for each model it
recognised and, for everything it passed over, the path and the reason.

* A **Hugging Face folder** is a directory with a ``config.json`` (or a
  sentence-transformers ``modules.json``). Its family, likely tasks and
  parameter count come from the config and the safetensors headers (exact:
  the sum of the tensors' elements), else from an estimate from the config.
  A folder whose only weights are pickles (``pytorch_model.bin`` ...) is
  skipped unless ``allow_pickle``.
* A **GGUF file** is read up to its tensor infos: architecture, name,
  licence, parameter count, context length, chat template.

Nothing here imports torch or the formats' own libraries
(:mod:`llmos.registry.weights` reads the headers).
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog

from llmos.errors import LlmosError, UsageError
from llmos.registry.sources import SourcePolicy, check_source
from llmos.registry.store import MAX_FIELD_CHARS, MAX_INT
from llmos.registry.weights import (
    PICKLE_SUFFIXES,
    read_gguf_header,
    read_safetensors_header,
)
from llmos.types import NAME_MAX_LENGTH, ModelCard, ModelFormat, validate_model_name

__all__ = ["DEFAULT_MAX_DEPTH", "ScanResult", "estimate_parameters", "scan"]

log = structlog.get_logger("llmos.registry")

DEFAULT_MAX_DEPTH = 8
#: config.json, tokenizer_config.json and modules.json larger than this are not read
_MAX_JSON_BYTES = 64 << 20
_PROVIDER = "transformers"


@attrs.frozen
class ScanResult:
    """What a scan found: cards, and ``(path, reason)`` for what it passed over."""

    cards: list[ModelCard] = attrs.Factory(list)
    skipped: list[tuple[Path, str]] = attrs.Factory(list)


def scan(path: Path, policy: SourcePolicy, *, max_depth: int = DEFAULT_MAX_DEPTH) -> ScanResult:
    """Model cards for the Hugging Face folders and GGUF files under ``path``.

    ``path`` must pass :func:`~llmos.registry.sources.check_source` (it lies
    under an allowed root); it may itself be a model folder or a ``.gguf``
    file. Folders are entered ``max_depth`` levels deep at most; hidden
    folders (``.git``) are not entered, symlinked folders are not followed,
    and a symlinked file is read only when it resolves inside ``path``. Card
    names come from the folder or file name (``models--org--name`` Hub cache
    folders give ``org/name``), made unique within the scan with ``-2``,
    ``-3`` ...
    """
    parsed = check_source(str(path), policy)
    assert parsed.path is not None
    root = parsed.path
    if not root.exists():
        raise UsageError(f"nothing to scan: {path} does not exist", param="path")
    scanner = _Scanner(root, policy, max_depth)
    if root.is_dir():
        scanner.folder(root, 0)
    elif root.suffix.lower() == ".gguf":
        scanner.gguf(root)
    else:
        raise UsageError(f"{path} is neither a folder nor a .gguf file", param="path")
    return scanner.result


@attrs.define
class _Scanner:
    root: Path
    policy: SourcePolicy
    max_depth: int
    result: ScanResult = attrs.Factory(ScanResult)
    names: set[str] = attrs.Factory(set)

    def skip(self, path: Path, reason: str) -> None:
        log.info("scan.skipped", path=str(path), reason=reason)
        self.result.skipped.append((path, reason))

    def add(self, card: ModelCard) -> None:
        self.result.cards.append(_tidy(card))

    def unique(self, stem: str) -> str:
        name = _model_name(stem)
        candidate, number = name, 1
        while candidate in self.names:
            number += 1
            suffix = f"-{number}"
            candidate = name[: NAME_MAX_LENGTH - len(suffix)] + suffix
        self.names.add(candidate)
        return candidate

    def inside(self, path: Path) -> bool:
        try:
            return path.resolve().is_relative_to(self.root)
        except (OSError, RuntimeError):
            return False

    def folder(self, folder: Path, depth: int) -> None:
        try:
            entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        except OSError as exc:
            self.skip(folder, f"cannot list the folder: {exc.strerror or exc}")
            return
        names = {entry.name for entry in entries}
        model_folder = "config.json" in names or "modules.json" in names
        if model_folder:
            self.hf_folder(folder)
            # A model's sub-folders (1_Pooling/config.json) are parts of it, not
            # models; GGUF files beside it are models of their own.
            entries = [e for e in entries if e.name.lower().endswith(".gguf")]
        for entry in entries:
            path = Path(entry.path)
            if entry.is_symlink():
                if not self.inside(path):
                    self.skip(
                        path, f"symlink to {os.path.realpath(path)}, outside the scanned folder"
                    )
                elif path.is_dir():
                    self.skip(path, "symlinked folder, not followed")
                elif path.suffix.lower() == ".gguf":
                    self.gguf(path)
            elif entry.is_dir(follow_symlinks=False):
                if entry.name.startswith("."):
                    continue
                if depth >= self.max_depth:
                    self.skip(path, f"deeper than {self.max_depth} levels, not entered")
                else:
                    self.folder(path, depth + 1)
            elif entry.is_file(follow_symlinks=False) and entry.name.lower().endswith(".gguf"):
                self.gguf(path)

    # ---------------------------------------------------------------- GGUF

    def gguf(self, path: Path) -> None:
        try:
            source = check_source(str(path), self.policy).value
            header = read_gguf_header(path, tensors=True)
        except LlmosError as exc:
            self.skip(path, str(exc))
            return
        meta = header.metadata
        arch = _text(meta.get("general.architecture"))
        parameters = meta.get("general.parameter_count")
        if not isinstance(parameters, int) or isinstance(parameters, bool) or parameters <= 0:
            parameters = header.tensor_parameters or None
        context = meta.get(f"{arch}.context_length") if arch else None
        if f"{arch}.pooling_type" in meta:  # llama.cpp marks embedding models so
            tasks: tuple[str, ...] = ("embedding",)
        elif "tokenizer.chat_template" in meta:
            tasks = ("text-generation", "chat")
        else:
            tasks = ("text-generation",)
        details = ", ".join(
            part
            for part in (
                "GGUF",
                arch,
                f"context {context} tokens" if isinstance(context, int) else None,
            )
            if part
        )
        title = _text(meta.get("general.name"))
        self.add(
            ModelCard(
                name=self.unique(path.stem),
                provider=_PROVIDER,
                source=source,
                tasks=tasks,
                family=_family_name(arch) if arch else None,
                parameters=parameters,
                format=ModelFormat.GGUF,
                license=_text(meta.get("general.license")),
                description=f"{title} ({details})" if title else details,
            )
        )

    # ------------------------------------------------------- Hugging Face

    def hf_folder(self, folder: Path) -> None:
        try:
            card = self.hf_card(folder)
        except LlmosError as exc:
            self.skip(folder, str(exc))
            return
        except OSError as exc:
            self.skip(folder, f"cannot read: {exc}")
            return
        if isinstance(card, str):
            self.skip(folder, card)
        else:
            self.add(card)

    def hf_card(self, folder: Path) -> ModelCard | str:
        """The card of a Hugging Face folder, or why it is not one."""
        source = check_source(str(folder), self.policy).value

        sentence = (folder / "modules.json").is_file() or (
            folder / "config_sentence_transformers.json"
        ).is_file()
        model_dir = _transformer_dir(folder) if sentence else folder
        outside = sorted(
            p.relative_to(folder).as_posix()
            for p in {*folder.iterdir(), *model_dir.iterdir()}
            if p.is_symlink() and not self.inside(p)
        )
        if outside:
            return f"{', '.join(outside)} link outside the scanned folder"
        if not (model_dir / "config.json").is_file():
            return f"no config.json in {model_dir}"
        config = _read_json(model_dir / "config.json")
        if not isinstance(config, dict):
            return "config.json is not a JSON object"
        architectures = config.get("architectures")
        architecture = (
            architectures[0]
            if isinstance(architectures, list)
            and architectures
            and isinstance(architectures[0], str)
            else None
        )
        model_type = _text(config.get("model_type"))
        if architecture is None and model_type is None:
            return "config.json names no architectures or model_type; not a model folder"

        weights = _weight_files(model_dir)
        if weights:
            parameters: int | None = sum(
                read_safetensors_header(w).parameter_count for w in weights
            )
            weight_format = ModelFormat.SAFETENSORS
        else:
            pickles = sorted(
                p.name for p in model_dir.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES
            )
            if not pickles:
                return "no weights: no *.safetensors file"
            if not self.policy.allow_pickle:
                return (
                    f"only pickle weights ({', '.join(pickles)}): loading them runs the code"
                    " they carry; convert them to safetensors, or set [registry]"
                    " allow_pickle = true"
                )
            parameters, weight_format = estimate_parameters(config), ModelFormat.OTHER

        if sentence:
            tasks: tuple[str, ...] = ("embedding",)
        else:
            tasks = _tasks(architecture, config)
            if "text-generation" in tasks and _has_chat_template(model_dir):
                tasks = (*tasks, "chat")
        kind = f"sentence-transformers, {architecture}" if sentence else architecture
        return ModelCard(
            name=self.unique(_folder_stem(folder)),
            provider=_PROVIDER,
            source=source,
            tasks=tasks,
            family=_family_name(model_type or _strip_head(architecture or "")),
            parameters=parameters or None,
            format=weight_format,
            license=_readme_license(folder),
            description=f"Hugging Face folder ({kind or model_type})",
        )


# --------------------------------------------------------------------------
# Hugging Face folder details
# --------------------------------------------------------------------------


def _read_json(path: Path) -> Any:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise UsageError(f"{path}: over {_MAX_JSON_BYTES} bytes, not read")
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise UsageError(f"{path}: cannot read JSON: {exc}") from None


def _transformer_dir(folder: Path) -> Path:
    """The sub-folder of a sentence-transformers model that holds the encoder."""
    if not (folder / "modules.json").is_file():
        return folder
    modules = _read_json(folder / "modules.json")
    for module in modules if isinstance(modules, list) else ():
        if (
            isinstance(module, dict)
            and str(module.get("type", "")).endswith("Transformer")
            and isinstance(module.get("path"), str)
        ):
            inner = module["path"]
            target = (folder / inner).resolve()
            inside = target.is_relative_to(folder.resolve())
            if inner and ".." not in inner and inside and target.is_dir():
                return folder / inner
    return folder


def _weight_files(folder: Path) -> list[Path]:
    """The safetensors files holding the model: the index's shards, else all of them."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        data = _read_json(index)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if isinstance(weight_map, dict):
            shards = sorted({str(v) for v in weight_map.values()})
            bad = [s for s in shards if "/" in s or "\\" in s or s.startswith(".")]
            if bad:
                raise UsageError(f"{index}: shard names must be plain file names, got {bad[0]!r}")
            missing = [s for s in shards if not (folder / s).is_file()]
            if missing:
                raise UsageError(f"{index}: shard {missing[0]} is missing")
            return [folder / s for s in shards]
    return sorted(p for p in folder.glob("*.safetensors") if p.is_file())


_HEADS = (
    ("ForCausalLM", "text-generation"),
    ("LMHeadModel", "text-generation"),
    ("ForSeq2SeqLM", "text2text-generation"),
    ("ForSequenceClassification", "text-classification"),
    ("ForMaskedLM", "fill-mask"),
    ("ForTokenClassification", "token-classification"),
    ("ForQuestionAnswering", "question-answering"),
)


def _tasks(architecture: str | None, config: Mapping[str, Any]) -> tuple[str, ...]:
    if architecture is None:
        return ()
    for suffix, task in _HEADS:
        if architecture.endswith(suffix):
            return (task,)
    if architecture.endswith("ForConditionalGeneration"):
        encoder_decoder = bool(config.get("is_encoder_decoder"))
        return ("text2text-generation",) if encoder_decoder else ("text-generation",)
    if architecture.endswith("Model"):  # BertModel: a bare encoder gives embeddings
        return ("embedding",)
    return ()


def _strip_head(architecture: str) -> str:
    for suffix in (*(s for s, _ in _HEADS), "ForConditionalGeneration", "Model"):
        if architecture.endswith(suffix) and len(architecture) > len(suffix):
            return architecture[: -len(suffix)]
    return architecture


def _family_name(text: str) -> str | None:
    family = re.sub(r"[^a-z0-9._-]+", "-", text.lower()).strip("-")
    return family or None


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    path = folder / "tokenizer_config.json"
    if not path.is_file():
        return False
    try:
        config = _read_json(path)
    except UsageError:
        return False
    template = config.get("chat_template") if isinstance(config, dict) else None
    return bool(template) and isinstance(template, str | list)


def _readme_license(folder: Path) -> str | None:
    """``license:`` from the YAML front matter of the model card (README.md)."""
    try:
        with (folder / "README.md").open(encoding="utf-8", errors="replace") as file:
            text = file.read(256 * 1024)
    except OSError:
        return None
    lines = text.splitlines()
    if not lines or lines[0].strip() != "---":
        return None
    for number, line in enumerate(lines[1:], start=1):
        if line.strip() == "---":
            return None
        found = re.match(r"^license\s*:\s*(.*?)\s*$", line)
        if found:
            value = found.group(1).strip("'\"")
            if not value and number + 1 < len(lines):  # "license:\n- mit"
                item = re.match(r"^\s*-\s*(.+?)\s*$", lines[number + 1])
                value = item.group(1).strip("'\"") if item else ""
            return value or None
    return None


def _folder_stem(folder: Path) -> str:
    """``org/name`` for a Hub cache snapshot (``models--org--name/snapshots/<hash>``)."""
    parent = folder.parent
    if parent.name == "snapshots" and parent.parent.name.startswith("models--"):
        parts = parent.parent.name[len("models--") :].split("--")
        return "/".join(parts[:2]) if len(parts) >= 2 else parts[0]
    return folder.name


def _model_name(stem: str) -> str:
    """A valid model name made from a file or folder name (``vendor/model`` kept)."""
    parts = []
    for part in stem.split("/")[:2]:
        name = re.sub(r"[^a-z0-9._-]+", "-", part.lower())
        name = re.sub(r"\.{2,}", ".", name)
        name = re.sub(r"-{2,}", "-", name).strip("-._")
        parts.append(name)
    parts = [p for p in parts if p] or ["model"]
    name = "/".join(parts)[:NAME_MAX_LENGTH].rstrip("-._")
    return validate_model_name(name)


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


#: what a scanned card's one-line texts lose: control characters and lone surrogates
_UNPRINTABLE = re.compile(r"[\x00-\x1f\x7f\ud800-\udfff]+")
#: longest description a scan writes
_MAX_DESCRIPTION = 1000


def _line(text: str | None, limit: int) -> str | None:
    """``text`` on one printable line of at most ``limit`` characters."""
    if text is None:
        return None
    text = _UNPRINTABLE.sub(" ", text).strip()
    return (text if len(text) <= limit else text[: limit - 3] + "...") or None


def _tidy(card: ModelCard) -> ModelCard:
    """``card`` as the store accepts it. What a scan reads (GGUF metadata,
    config.json, a README) comes from whoever made the files: an ESC or a
    megabyte in a licence, or a parameter count past SQLite's integers, must
    not fail the scan or reach a terminal, so it is cleaned, cut or dropped."""
    parameters = card.parameters
    if parameters is not None and not 0 < parameters <= MAX_INT:
        parameters = None
    return attrs.evolve(
        card,
        family=_line(card.family, MAX_FIELD_CHARS),
        license=_line(card.license, MAX_FIELD_CHARS),
        description=_line(card.description, _MAX_DESCRIPTION) or "",
        parameters=parameters,
    )


# --------------------------------------------------------------------------
# Parameter estimate
# --------------------------------------------------------------------------

#: model types whose MLP is gated (three matrices) and whose norms have no bias
_GATED = frozenset(
    {
        "llama",
        "mistral",
        "mixtral",
        "qwen2",
        "qwen2_moe",
        "qwen3",
        "qwen3_moe",
        "gemma",
        "gemma2",
        "gemma3_text",
        "phi3",
        "olmo",
        "olmo2",
        "granite",
        "cohere",
        "internlm2",
        "smollm3",
    }
)
_T5 = frozenset({"t5", "mt5", "umt5", "longt5"})


def _first(config: Mapping[str, Any], *keys: str) -> int | None:
    for key in keys:
        value = config.get(key)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def estimate_parameters(config: Mapping[str, Any]) -> int | None:
    """The parameter count a transformer with this ``config.json`` has, estimated.

    Exact for the common shapes (Llama-style decoders, GPT-2, BERT, T5),
    close for the rest; ``None`` when the config lacks the sizes. A
    safetensors header gives the exact count and is preferred.
    """
    if _first(config, "hidden_size", "d_model", "n_embd", "dim") is None and isinstance(
        config.get("text_config"), Mapping
    ):
        return estimate_parameters(config["text_config"])
    h = _first(config, "hidden_size", "d_model", "n_embd", "dim")
    layers = _first(
        config, "num_hidden_layers", "num_layers", "n_layer", "n_layers", "encoder_layers"
    )
    vocab = _first(config, "vocab_size")
    if h is None or layers is None or vocab is None:
        return None
    model_type = str(config.get("model_type", "")).lower()
    act = str(config.get("hidden_act") or config.get("hidden_activation") or "").lower()
    gated = (
        model_type in _GATED
        or act in ("silu", "swish")
        or str(config.get("feed_forward_proj", "")).startswith("gated")
    )
    t5 = model_type in _T5
    biased = not gated and not t5
    inter = _first(config, "intermediate_size", "d_ff", "ffn_dim", "encoder_ffn_dim", "n_inner")
    inter = inter or _first(config, "hidden_dim") or 4 * h
    heads = _first(config, "num_attention_heads", "num_heads", "n_head", "n_heads") or 1
    kv_heads = _first(config, "num_key_value_heads", "num_kv_heads", "n_kv_heads") or heads
    head_dim = _first(config, "head_dim", "d_kv") or h // heads
    q_dim, kv_dim = heads * head_dim, kv_heads * head_dim

    attention = 2 * h * q_dim + 2 * h * kv_dim
    if biased or config.get("attention_bias"):
        attention += q_dim + 2 * kv_dim + h
    elif model_type.startswith("qwen2"):  # biases on q, k and v only
        attention += q_dim + 2 * kv_dim
    experts = _first(config, "num_local_experts", "num_experts", "n_routed_experts") or 1
    if experts > 1:
        inter = _first(config, "moe_intermediate_size") or inter
    mlp = ((3 if gated else 2) * h * inter + (inter + h if biased else 0)) * experts
    if experts > 1:
        mlp += h * experts  # the router
    norm = 2 * h if biased else h  # LayerNorm has a bias, RMSNorm not

    total = vocab * h
    if not config.get("tie_word_embeddings", True):
        total += vocab * h
    if config.get("is_encoder_decoder"):
        decoder_layers = _first(config, "num_decoder_layers", "decoder_layers") or layers
        total += layers * (attention + mlp + 2 * norm) + norm
        total += decoder_layers * (2 * attention + mlp + 3 * norm) + norm
        buckets = _first(config, "relative_attention_num_buckets")
        if buckets:
            total += 2 * buckets * heads
        return total
    total += layers * (attention + mlp + 2 * norm)
    rotary = any(
        key in config for key in ("rope_theta", "rope_scaling", "rotary_dim", "rotary_pct")
    )
    if not gated and not rotary:
        positions = _first(config, "max_position_embeddings", "n_positions")
        if positions and config.get("position_embedding_type", "absolute") == "absolute":
            total += positions * h
    types = _first(config, "type_vocab_size")
    if types:  # BERT-style: token types, a LayerNorm on the embeddings, a pooler
        total += types * h + norm + h * h + h
    else:
        total += norm  # the final norm
    return total
