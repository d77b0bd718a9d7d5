"""The ``merge`` fusion strategy: LoRA adapters of one base, merged in weight space.

Members are LoRA adapters written by this plugin (a tuning job's artifact, or
an earlier merge) on the same base model, for the same task (and, for
classifiers, the same labels in the same order), tuned with the same
tokenizer. PEFT's ``LoraModel.add_weighted_adapter`` makes one LoRA adapter
of them, which is written in the layout of a tuning job's artifact —
``adapter_config.json`` and ``adapter_model.safetensors``, the tokenizer, and
``llmos_tuning.json`` — so the transformers provider serves it as it serves a
tuned adapter.

Options (:func:`check` fills in the defaults):

``combination_type`` (default ``cat``)
    any of PEFT 0.21's: ``cat`` (the members' low-rank factors side by side:
    exactly the weighted sum of their weight updates, at the sum of their
    ranks), ``linear`` (the weighted sum of the factors themselves: rank
    kept, cross terms between members, a rough approximation), ``ties``,
    ``dare_linear``, ``dare_ties``, ``magnitude_prune`` (pruning and sign
    election applied to the factors), and ``svd``, ``ties_svd``,
    ``dare_linear_svd``, ``dare_ties_svd``, ``magnitude_prune_svd`` (applied
    to the full weight updates, then cut back to ``svd_rank`` by SVD).
    ``linear``, ``ties``, ``dare_*`` and ``magnitude_prune`` need members of
    one rank; ``cat`` and the ``*_svd`` types take any ranks.
``weights``
    one number per member (default 1.0 each); negative subtracts a member.
``density`` (default 0.5)
    the share of values kept, 0 < density <= 1: ``ties``, ``dare_*``,
    ``magnitude_prune`` and their ``_svd`` forms.
``majority_sign_method`` (default ``total``)
    ``total`` or ``frequency``: the ``ties`` and ``dare_ties`` types.
``seed`` (default 0)
    DARE drops values at random: the ``dare_*`` types are seeded with it.
``svd_rank`` (default the members' largest rank)
    the merged adapter's rank for the ``*_svd`` types.

Modules a member trains in full (``modules_to_save``: a classifier's head)
cannot be merged by PEFT; here they are averaged, each tensor
``sum(w_i * t_i) / sum(w_i)`` over the members of positive weight — so
weights ``[1, 0]`` keep the first member's head, and equal weights give the
mean head. At least one weight must be positive.

The checks need no torch; :func:`merge` imports torch and peft when it runs.
"""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import shutil
import tempfile
import time
from collections.abc import Mapping, Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from llmos.errors import LlmosError, UsageError
from llmos.types import MergeRequest, ModelCard, ModelFormat
from llmos_peft.options import CLASSIFICATION, METHODS

__all__ = ["COMBINATION_TYPES", "DEFAULTS", "STRATEGY", "check", "merge"]

#: the strategy's name
STRATEGY = "merge"
#: the merged adapter's name inside PEFT while it is built
MERGED = "merged"

#: combination types needing members of one rank (PEFT merges the A and B factors)
SAME_RANK = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
#: combination types merging full weight updates, cut back to a rank by SVD
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
#: every combination type PEFT 0.21's ``add_weighted_adapter`` has
COMBINATION_TYPES = ("cat", *SAME_RANK, *SVD)
#: types that prune: they take ``density``
PRUNING = frozenset(
    {"ties", "dare_linear", "dare_ties", "magnitude_prune"}
    | {"ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd"}
)
#: types that elect a sign per value: they take ``majority_sign_method``
SIGNED = frozenset({"ties", "dare_ties", "ties_svd", "dare_ties_svd"})
#: types that drop values at random (DARE): they take ``seed``
RANDOM = frozenset({"dare_linear", "dare_ties", "dare_linear_svd", "dare_ties_svd"})
SIGN_METHODS = ("total", "frequency")
#: how the modules the members train in full (a classifier's head) are combined
HEAD_RULE = "weighted mean over the members of positive weight: sum(w_i * t_i) / sum(w_i)"

DEFAULTS: dict[str, Any] = {
    "combination_type": "cat",
    "density": 0.5,
    "majority_sign_method": "total",
    "seed": 0,
    "svd_rank": None,
}
OPTIONS = ("combination_type", "weights", "density", "majority_sign_method", "seed", "svd_rank")
#: the LoRA method: what add_weighted_adapter merges (AdaLoRA's model refuses it)
MERGEABLE_METHODS = ("lora",)
#: what a served strategy is for, in refusals
SERVED_HINT = "fuse them with a served strategy such as mean instead"
#: files that say which token an id is; compared between members
VOCAB_FILES = (
    "tokenizer.json",
    "vocab.txt",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "spiece.model",
    "sentencepiece.bpe.model",
    "added_tokens.json",
)
_MAX_JSON_BYTES = 16 << 20
_ADAPTER_CONFIG = "adapter_config.json"


# --------------------------------------------------------------------------
# Options and members, checked before any work
# --------------------------------------------------------------------------


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _refuse(message: str, param: str | None = None) -> UsageError:
    return UsageError(f"merge: {message}", param=param)


def _options(given: Mapping[str, Any], count: int) -> dict[str, Any]:
    """The options, checked, with the defaults that apply filled in."""
    if not isinstance(given, Mapping):
        raise _refuse(f"options must be a table, got {type(given).__name__}")
    unknown = sorted(set(given) - set(OPTIONS))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(str(key), OPTIONS, n=1)
            hints.append(f"{key} (did you mean {close[0]}?)" if close else str(key))
        raise _refuse(
            f"unknown option(s) {', '.join(hints)}; the options are {', '.join(OPTIONS)}",
            param=str(unknown[0]),
        )
    kind = given.get("combination_type", DEFAULTS["combination_type"])
    if kind not in COMBINATION_TYPES:
        raise _refuse(
            f"combination_type {kind!r} is not one of {', '.join(COMBINATION_TYPES)}",
            param="combination_type",
        )
    out: dict[str, Any] = {"combination_type": kind}

    weights = given.get("weights")
    if weights is None:
        weights = [1.0] * count
    if not isinstance(weights, list | tuple) or not all(_is_number(w) for w in weights):
        raise _refuse(f"weights must be a list of numbers, got {weights!r}", param="weights")
    if len(weights) != count:
        raise _refuse(
            f"weights has {len(weights)} number(s) for {count} members; give one per member,"
            " in the members' order",
            param="weights",
        )
    if not any(w > 0 for w in weights):
        raise _refuse(
            f"weights {list(weights)} has no positive weight; at least one member must be"
            " added (a classifier's head is the mean of the positively weighted members')",
            param="weights",
        )
    out["weights"] = [float(w) for w in weights]

    # an option that the combination type would ignore is refused, not ignored
    applies = {
        "density": kind in PRUNING,
        "majority_sign_method": kind in SIGNED,
        "seed": kind in RANDOM,
        "svd_rank": kind in SVD,
    }
    for key, used in applies.items():
        if key in given and not used:
            raise _refuse(f"option {key} has no effect with combination_type {kind}", param=key)
        if used:
            out[key] = given.get(key, DEFAULTS[key])
    density = out.get("density")
    if density is not None and not (_is_number(density) and 0 < density <= 1):
        raise _refuse(f"density must be a number in (0, 1], got {density!r}", param="density")
    if "density" in out:
        out["density"] = float(out["density"])
    sign = out.get("majority_sign_method")
    if "majority_sign_method" in out and sign not in SIGN_METHODS:
        raise _refuse(
            f"majority_sign_method must be total or frequency, got {sign!r}",
            param="majority_sign_method",
        )
    if "seed" in out and not (_is_int(out["seed"]) and out["seed"] >= 0):
        raise _refuse(f"seed must be an integer >= 0, got {out['seed']!r}", param="seed")
    rank = out.get("svd_rank")
    if rank is not None and not (_is_int(rank) and rank >= 1):
        raise _refuse(f"svd_rank must be an integer >= 1 or null, got {rank!r}", param="svd_rank")
    return out


def _json_object(path: Path) -> dict[str, Any] | None:
    """A small JSON object file, or None when it cannot be read."""
    try:
        if not path.is_file() or path.stat().st_size > _MAX_JSON_BYTES:
            return None
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _local_folder(card: ModelCard) -> Path | None:
    """The card's source when it is a plain local folder (else None)."""
    source = card.source
    if not source or "://" in source:
        return None
    path = Path(source)
    return path if path.is_absolute() and path.is_dir() else None


def _rank(config: Mapping[str, Any]) -> int | None:
    """The largest rank of a LoRA config, as PEFT reckons it for merging."""
    r = config.get("r")
    if not _is_int(r):
        return None
    pattern = config.get("rank_pattern") or {}
    ranks = [v for v in pattern.values() if _is_int(v)] if isinstance(pattern, dict) else []
    return max([r, *ranks])


def _check_ranks(kind: str, refs: Sequence[str], ranks: Sequence[int | None]) -> None:
    known = {ref: r for ref, r in zip(refs, ranks, strict=True) if r is not None}
    if kind in SAME_RANK and len(set(known.values())) > 1:
        listed = ", ".join(f"{ref} r={r}" for ref, r in known.items())
        raise _refuse(
            f"combination_type {kind} needs members of one LoRA rank, and they differ ({listed});"
            ' use combination_type "cat" (exact, ranks add up) or an SVD type such as "svd"'
            ' or "ties_svd" (cut back to svd_rank)',
            param="combination_type",
        )


def _method(card: ModelCard) -> Any:
    return card.options.get("method")


def _check_member(card: ModelCard) -> None:
    method = _method(card)
    if method == "full" or (method in METHODS and card.format != ModelFormat.ADAPTER):
        raise _refuse(
            f"member {card.ref!r} was fully tuned (format {card.format}): a standalone model,"
            f" not an adapter; merge combines LoRA adapters of one base — {SERVED_HINT}",
            param="members",
        )
    if card.format != ModelFormat.ADAPTER or card.provider != "transformers":
        raise _refuse(
            f"member {card.ref!r} is not an adapter (format {card.format}, provider"
            f" {card.provider}); merge combines LoRA adapters tuned by llmos-peft on one base"
            f" model — {SERVED_HINT}",
            param="members",
        )
    if method not in METHODS:
        raise _refuse(
            f"member {card.ref!r} is an adapter that llmos-peft did not write (its card has no"
            f" method option among {', '.join(METHODS)}); merge combines LoRA adapters tuned by"
            " llmos-peft",
            param="members",
        )
    if method not in MERGEABLE_METHODS:
        why = (
            "PEFT's add_weighted_adapter refuses AdaLoRA adapters"
            if method == "adalora"
            else f"a {method} adapter has no low-rank update to add up"
        )
        raise _refuse(
            f"member {card.ref!r} is a {method} adapter; merge combines LoRA adapters only"
            f" ({why}) — {SERVED_HINT}",
            param="members",
        )


def check(options: Mapping[str, Any], members: Sequence[ModelCard]) -> dict[str, Any]:
    """Check the members (their cards only) and the options when a fusion is
    created; returns the options with the defaults that apply filled in.

    Raises :class:`~llmos.errors.UsageError` naming the member at fault and
    what to do. The members' ranks are read from their ``adapter_config.json``
    when their source is a local folder; :func:`merge` checks them again.
    """
    members = list(members)
    if len(members) < 2:
        raise _refuse(
            f"needs two or more members to merge, got {len(members)}"
            + (f" ({members[0].ref!r})" if members else ""),
            param="members",
        )
    for card in members:
        _check_member(card)
    first = members[0]
    for card in members:
        if not card.parents:
            raise _refuse(
                f"member {card.ref!r} names no base model (its card has no parents); an adapter's"
                " first parent is the base it was tuned on",
                param="members",
            )
    for card in members[1:]:
        if card.parents[0] != first.parents[0]:
            raise _refuse(
                f"members are adapters of different bases: {first.ref!r} of"
                f" {first.parents[0]!r}, {card.ref!r} of {card.parents[0]!r}; weight-space merging"
                f" needs one base — merge the adapters of each base apart, or {SERVED_HINT}",
                param="members",
            )
    for card in members[1:]:
        if tuple(card.tasks) != tuple(first.tasks) or card.options.get("task") != (
            first.options.get("task")
        ):
            raise _refuse(
                f"members are tuned for different tasks: {first.ref!r} for"
                f" {'/'.join(first.tasks) or first.options.get('task')},"
                f" {card.ref!r} for {'/'.join(card.tasks) or card.options.get('task')};"
                f" merge adapters of one task, or {SERVED_HINT}",
                param="members",
            )
        if first.options.get("task") == "classifier":
            ours, theirs = (
                list(first.options.get("labels") or ()),
                list(card.options.get("labels") or ()),
            )
            if ours != theirs:
                raise _refuse(
                    f"members classify into different labels: {first.ref!r} into {ours},"
                    f" {card.ref!r} into {theirs}; their heads' rows must mean the same labels"
                    f" in the same order — {SERVED_HINT}",
                    param="members",
                )
    out = _options(options, len(members))
    ranks = []
    for card in members:
        folder = _local_folder(card)
        config = _json_object(folder / _ADAPTER_CONFIG) if folder is not None else None
        ranks.append(_rank(config) if config is not None else None)
    _check_ranks(out["combination_type"], [c.ref for c in members], ranks)
    return out


# --------------------------------------------------------------------------
# The members' files, checked before loading anything
# --------------------------------------------------------------------------


def _check_configs(refs: Sequence[str], configs: Sequence[Mapping[str, Any]], kind: str) -> None:
    """What PEFT would refuse halfway, or merge wrongly without a word."""
    for ref, config in zip(refs, configs, strict=True):
        if config.get("peft_type") != "LORA":
            raise _refuse(
                f"member {ref!r} holds a {config.get('peft_type')} adapter, not a LoRA one;"
                f" merge combines LoRA adapters only — {SERVED_HINT}",
                param="members",
            )
        unmergeable = {
            "use_dora": "DoRA's magnitudes",
            "lora_bias": "a bias on LoRA's B",
            "target_parameters": "LoRA on bare parameters",
            "trainable_token_indices": "trainable tokens",
        }
        for key, what in unmergeable.items():
            if config.get(key):
                raise _refuse(
                    f"member {ref!r} has {key} set: {what} cannot be merged by PEFT's"
                    f" add_weighted_adapter — {SERVED_HINT}",
                    param="members",
                )
    _check_ranks(kind, refs, [_rank(c) for c in configs])
    saved = [sorted(set(c.get("modules_to_save") or ())) for c in configs]
    for ref, modules in zip(refs[1:], saved[1:], strict=True):
        if modules != saved[0]:
            raise _refuse(
                f"members train different modules in full (modules_to_save): {refs[0]!r}"
                f" {saved[0]}, {ref!r} {modules}; their heads cannot be averaged",
                param="members",
            )
    kinds = {isinstance(c.get("target_modules"), str) for c in configs}
    if len(kinds) > 1:
        raise _refuse(
            "members name their target modules differently (a pattern and a list); PEFT cannot"
            " merge those",
            param="members",
        )


def _tokenizer_folder(member: Path, base_folder: Path) -> Path:
    """Where a member's tokenizer is: beside the adapter (tuning saves it), else the base's."""
    return member if (member / "tokenizer_config.json").is_file() else base_folder


def _fingerprint(folder: Path) -> dict[str, str]:
    """A digest of each file that maps text to ids; ``tokenizer.json`` without
    its truncation and padding (which the last call that used it left there)."""
    out = {}
    for name in VOCAB_FILES:
        path = folder / name
        if not path.is_file():
            continue
        data = path.read_bytes()
        if name == "tokenizer.json":
            try:
                parsed = json.loads(data)
            except ValueError:
                parsed = None
            if isinstance(parsed, dict):
                parsed.pop("truncation", None)
                parsed.pop("padding", None)
                data = json.dumps(parsed, sort_keys=True).encode()
        out[name] = hashlib.sha256(data).hexdigest()
    return out


def _check_tokenizers(refs: Sequence[str], folders: Sequence[Path]) -> None:
    prints = [_fingerprint(folder) for folder in folders]
    for ref, folder, found in zip(refs[1:], folders[1:], prints[1:], strict=True):
        if found != prints[0]:
            differ = sorted(
                name
                for name in set(found) | set(prints[0])
                if found.get(name) != prints[0].get(name)
            )
            raise _refuse(
                f"members were tuned with different tokenizers: {refs[0]!r} ({folders[0]}) and"
                f" {ref!r} ({folder}) differ in {', '.join(differ)}; the same id would be"
                " another token in each — merge adapters tuned with one tokenizer",
                param="members",
            )


# --------------------------------------------------------------------------
# The merge
# --------------------------------------------------------------------------


def _mean_heads(peft_model: Any, names: Sequence[str], weights: Sequence[float]) -> list[Any]:
    """The mean of the members' fully trained modules (a classifier's head),
    weighted by their positive weights, as ``(wrapper, state)`` pairs.

    All but the first member's copy are taken out of PEFT's wrappers:
    ``add_weighted_adapter`` refuses members that share one.
    """
    import torch
    from peft.utils.other import ModulesToSaveWrapper

    positive = [(name, w) for name, w in zip(names, weights, strict=True) if w > 0]
    total = sum(w for _, w in positive)
    heads = []
    for wrapper in peft_model.modules():
        if not isinstance(wrapper, ModulesToSaveWrapper):
            continue
        held = [name for name in names if name in wrapper.modules_to_save]
        if not held:
            continue
        if len(held) != len(names):  # the configs were compared: should not happen
            raise LlmosError(f"merge: only {held} of the members train {wrapper} in full")
        states = {name: wrapper.modules_to_save[name].state_dict() for name in names}
        mean = {}
        with torch.no_grad():
            for key, tensor in states[names[0]].items():
                if torch.is_floating_point(tensor):
                    mean[key] = sum(states[name][key] * (w / total) for name, w in positive)
                else:
                    mean[key] = tensor.clone()
        # the first member's stays: it is the active adapter, which PEFT's wrapper needs
        for name in names[1:]:
            wrapper.modules_to_save.pop(name)
        heads.append((wrapper, mean))
    return heads


def _version(distribution: str) -> str | None:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def merge(request: MergeRequest) -> ModelCard:
    """Merge the members' LoRA adapters into one and write it to
    ``request.output_dir`` (see the module docstring); returns its card."""
    started = time.perf_counter()
    members = list(request.members)
    options = check(request.options, members)
    kind = options["combination_type"]
    refs = [card.ref for card in members]
    paths = [Path(p) for p in request.member_paths]
    if len(paths) != len(members):
        raise _refuse(f"{len(members)} members but {len(paths)} member folders")
    base, base_path = request.base, request.base_path
    if base is None or base_path is None:
        raise _refuse(
            f"the members' base {members[0].parents[0]!r} has no local path; merging needs its"
            " weights on disk",
            param="base",
        )
    out_dir = Path(request.output_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise _refuse(f"{out_dir} exists and is not an empty folder", param="output_dir")

    import attrs

    from llmos_transformers import runtime
    from llmos_transformers.adapters import (
        ADAPTER_WEIGHTS,
        TUNING_RECORD,
        base_layout,
        load_base,
        read_adapter,
    )
    from llmos_transformers.options import settings_for

    infos = [
        read_adapter(path, card, settings_for(card, {}))
        for path, card in zip(paths, members, strict=True)
    ]
    configs = []
    for ref, path in zip(refs, paths, strict=True):
        config = _json_object(path / _ADAPTER_CONFIG)
        if config is None:
            raise _refuse(f"member {ref!r}: cannot read {path / _ADAPTER_CONFIG}")
        configs.append(config)
    _check_configs(refs, configs, kind)
    if len({info.kind for info in infos}) > 1 or len({info.labels for info in infos}) > 1:
        raise _refuse(
            "members' folders disagree on the head: "
            + ", ".join(f"{r} {i.kind} {list(i.labels)}" for r, i in zip(refs, infos, strict=True))
        )

    base_settings = attrs.evolve(settings_for(base, {}), dtype="float32", task=None, labels=())
    info = infos[0]
    task = CLASSIFICATION if info.kind == "classifier" else "sft"
    scratch = Path(tempfile.mkdtemp(prefix="llmos-peft-fusion-"))
    staged = scratch / "out"
    try:
        with runtime.quiet_progress():
            layout = base_layout(Path(base_path), base, base_settings, scratch / "base-cache")
            folders = [_tokenizer_folder(path, layout.folder) for path in paths]
            _check_tokenizers(refs, folders)
            parameters, merged_config = _merge_and_write(
                infos, paths, options, layout, base_settings, load_base, scratch, staged
            )
        first_record = _json_object(paths[0] / TUNING_RECORD) or {}
        record = {
            "method": "lora",
            "task": task,
            "labels": list(info.labels),
            "base": base.ref,
            "base_family": base.family,
            "fusion": {
                "strategy": STRATEGY,
                "members": refs,
                "options": options,
                "heads": HEAD_RULE if merged_config.get("modules_to_save") else None,
            },
            "hyperparameters": {
                key: merged_config.get(key)
                for key in ("r", "lora_alpha", "target_modules", "modules_to_save")
            },
            "max_length": first_record.get("max_length"),
            "padding_side": first_record.get("padding_side"),
            "chat_template": first_record.get("chat_template"),
            "trainable_parameters": parameters,
            "adapter_bytes": (staged / ADAPTER_WEIGHTS).stat().st_size,
            "seconds": round(time.perf_counter() - started, 3),
            "versions": {d: _version(d) for d in ("llmos-peft", "peft", "transformers", "torch")},
        }
        (staged / TUNING_RECORD).write_text(
            json.dumps(record, indent=2, default=str), encoding="utf-8"
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        for path in staged.iterdir():
            shutil.move(str(path), out_dir / path.name)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

    card_options: dict[str, Any] = {"method": "lora", "task": info.kind}
    if info.kind == "classifier":
        card_options["labels"] = list(info.labels)
    return ModelCard(
        name=request.name,
        provider="transformers",
        source=str(out_dir),
        format=ModelFormat.ADAPTER,
        tasks=(task,),
        family=base.family,
        parameters=parameters,
        license=base.license,
        description=f"LoRA merge ({kind}) of {', '.join(refs)} on {base.ref} for {task}",
        tags=("merged", STRATEGY, kind),
        parents=(base.ref,),
        options=card_options,
    )


def _merge_and_write(
    infos: Sequence[Any],
    paths: Sequence[Path],
    options: Mapping[str, Any],
    layout: Any,
    base_settings: Any,
    load_base: Any,
    scratch: Path,
    out_dir: Path,
) -> tuple[int, dict[str, Any]]:
    """Load the base and the members, merge, and write the merged adapter with
    the first member's tokenizer; returns its parameter count and config."""
    import torch
    from peft import PeftModel
    from peft.utils import get_peft_model_state_dict

    from llmos.registry.weights import PICKLE_SUFFIXES
    from llmos_transformers import runtime

    info = infos[0]
    own = info.folder if (info.folder / "tokenizer_config.json").is_file() else None
    model, tokenizer = load_base(layout, info.kind, base_settings, info.labels, own)
    names = [f"member{i}" for i in range(len(paths))]
    peft_model = PeftModel.from_pretrained(
        model, str(paths[0]), adapter_name=names[0], is_trainable=False
    )
    for name, path in zip(names[1:], paths[1:], strict=True):
        peft_model.load_adapter(str(path), adapter_name=name, is_trainable=False)
    peft_model.eval()
    weights = list(options["weights"])
    heads = _mean_heads(peft_model, names, weights)
    kind = options["combination_type"]
    try:
        with runtime.seeded(options.get("seed", 0), torch.device("cpu")), torch.no_grad():
            peft_model.add_weighted_adapter(
                names,
                weights,
                adapter_name=MERGED,
                combination_type=kind,
                density=options.get("density"),
                majority_sign_method=options.get("majority_sign_method", "total"),
                svd_rank=options.get("svd_rank"),
            )
    except (TypeError, ValueError) as exc:
        raise _refuse(f"PEFT cannot merge the members with {kind}: {exc}") from None
    with torch.no_grad():
        for wrapper, state in heads:
            wrapper.modules_to_save[MERGED].load_state_dict(state)
    config = peft_model.peft_config[MERGED]
    # the members' scalings are in the merged factors already: the merged
    # adapter's own is 1 (PEFT sets lora_alpha = r; rsLoRA would make it sqrt(r))
    config.lora_alpha = config.r
    config.use_rslora = False
    config.inference_mode = True
    if config.modules_to_save:  # PEFT extends the list with each adapter it loads
        config.modules_to_save = list(dict.fromkeys(config.modules_to_save))
    staging = scratch / "saved"
    peft_model.save_pretrained(staging, selected_adapters=[MERGED], safe_serialization=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    for path in (staging / MERGED).iterdir():
        shutil.move(str(path), out_dir / path.name)
    tokenizer.save_pretrained(out_dir)
    pickles = sorted(
        str(p.relative_to(out_dir))
        for p in out_dir.rglob("*")
        if p.suffix.lower() in PICKLE_SUFFIXES
    )
    if pickles:
        raise LlmosError(f"merge: saving wrote pickle files ({', '.join(pickles)})")
    state = get_peft_model_state_dict(peft_model, adapter_name=MERGED)
    parameters = sum(t.numel() for t in state.values())
    return parameters, _json_object(out_dir / _ADAPTER_CONFIG) or {}
