"""The model a job trains: its base with the task's head, and the method on top.

The base is read by llmos-transformers' own functions, the ones its provider
serves with (:mod:`llmos_transformers.adapters`): the same folder inspection
(safetensors only), the same GGUF conversion, the same heads and padding —
so what is tuned here is what the provider will load.
"""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from llmos.errors import UsageError
from llmos.types import TuningRequest
from llmos_peft.options import CLASSIFICATION, Resolved
from llmos_transformers.adapters import base_layout, load_base, prefix_tuning_ready
from llmos_transformers.layout import Layout
from llmos_transformers.options import settings_for

__all__ = ["PROMPT_LEARNING", "Built", "build", "max_tokens"]

#: methods whose virtual tokens take positions ahead of the input
PROMPT_LEARNING = frozenset({"prefix", "prompt"})


@attrs.frozen(kw_only=True)
class Built:
    """A model ready to train, and what was decided building it."""

    model: Any
    tokenizer: Any
    layout: Layout
    #: the PEFT options the method trains with, as written to the record
    peft_options: dict[str, Any]
    #: ``left`` for prompt tuning a causal LM's classifier (see :func:`build`)
    padding_side: str


def _cache_dir(request: TuningRequest) -> Path:
    # A GGUF base is converted once per job folder, so a resumed job reuses it.
    if request.output_dir is not None:
        return request.output_dir.parent / "base-cache"
    return Path(tempfile.mkdtemp(prefix="llmos-peft-base-"))


def max_tokens(model: Any, method: str, options: dict[str, Any], wanted: int) -> int:
    """Tokens a row may have: ``wanted``, within the model's positions less the
    virtual tokens of prefix and prompt tuning (which take positions first)."""
    positions = getattr(model.config, "max_position_embeddings", None)
    virtual = int(options.get("num_virtual_tokens", 0)) if method in PROMPT_LEARNING else 0
    if not isinstance(positions, int):
        return wanted
    room = positions - virtual
    if room < 8:
        raise UsageError(
            f"{method}: {virtual} virtual tokens leave {room} of the model's {positions}"
            " positions for the input; lower num_virtual_tokens",
            param="num_virtual_tokens",
        )
    return min(wanted, room)


def build(
    method: str,
    request: TuningRequest,
    hp: Resolved,
    labels: Sequence[str],
    total_steps: int,
) -> Built:
    """Load the base with the task's head and put the method on it.

    PEFT methods freeze the base and train the adapter (and a classifier's
    head); ``full`` trains every weight. Prompt tuning a causal LM's
    classifier pads on the left: the head reads the last position, and
    behind virtual tokens transformers cannot find the last real token.
    """
    if request.base_path is None:
        raise UsageError(
            f"base model {request.base.ref!r} has no local path; tuning needs its weights on disk",
            param="base",
        )
    classification = request.task == CLASSIFICATION
    kind = "classifier" if classification else "causal"
    # Trained in float32 whatever the base is served in; the base card's own
    # options still say which GGUF file to read and whether remote code may run.
    settings = attrs.evolve(settings_for(request.base, {}), dtype="float32", task=None)
    layout = base_layout(request.base_path, request.base, settings, _cache_dir(request))
    model, tokenizer = load_base(layout, kind, settings, labels if classification else ())
    padding_side = "right"
    peft_options: dict[str, Any] = {}
    if method != "full":
        from peft import get_peft_model

        from llmos_peft.peft_config import make_config

        config = make_config(method, request.task, model, hp.peft, total_steps, layout.folder)
        if method == "prefix" and classification:
            model = prefix_tuning_ready(model)
        if method == "prompt" and classification and layout.kind == "causal":
            padding_side = "left"
        peft_options = _on_record(config, hp.peft)  # before peft adds its own head names
        model = get_peft_model(model, config)
    if classification:  # saved with the artifact: the provider pads its requests the same way
        tokenizer.padding_side = padding_side
    return Built(
        model=model,
        tokenizer=tokenizer,
        layout=layout,
        peft_options=peft_options,
        padding_side=padding_side,
    )


def _on_record(config: Any, given: dict[str, Any]) -> dict[str, Any]:
    """The options given, and what the plugin decided (targets, head, schedule)."""
    decided = ("target_modules", "feedforward_modules", "modules_to_save", "total_step")
    decided += ("tinit", "tfinal")
    out = dict(given)
    for key in decided:
        value = getattr(config, key, None)
        if value is not None:
            # copies: peft goes on to extend the config's own lists
            out[key] = sorted(value) if isinstance(value, set | frozenset | list) else value
    return out
