"""PEFT adapters served on their base model, and the base models tuning starts from.

An adapter card (format ``adapter``, written by llmos-peft) points at a folder
holding ``adapter_config.json`` and ``adapter_model.safetensors``; its first
parent is the base model, whose card and checked path arrive in the
:class:`~llmos.types.LoadRequest` (``base``, ``base_path``). Loading one:

1. the base is read the way the provider reads any model (a GGUF file is
   converted once into the provider's cache, shared with the base's own
   loads) and given the head the adapter was trained with — a sequence
   classifier over the card's ``labels``, or a causal LM;
2. the adapter is attached with ``PeftModel.from_pretrained`` — after
   checking that its weights are safetensors, since PEFT falls back to
   ``torch.load`` of ``adapter_model.bin``;
3. LoRA, AdaLoRA and IA3 are merged into the base weights (one plain model,
   as fast as the base); prefix and prompt tuning cannot be merged and are
   served through PEFT, with :class:`PromptLearnedLM` for causal LMs.

:func:`load_base` and :func:`prefix_tuning_ready` are also what llmos-peft
trains with, so a model is tuned and served on the same base.
"""

from __future__ import annotations

import inspect as pyinspect
import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

from llmos.errors import UnsafeSourceError, UsageError
from llmos.registry.weights import PICKLE_SUFFIXES
from llmos.types import Artifacts, LoadedModel, LoadRequest, ModelCard
from llmos_transformers.layout import Kind, Layout, inspect
from llmos_transformers.options import Settings, settings_for

__all__ = [
    "ADAPTER_CONFIG",
    "ADAPTER_WEIGHTS",
    "MERGEABLE",
    "TUNING_RECORD",
    "AdapterInfo",
    "PromptLearnedLM",
    "attach",
    "base_layout",
    "load",
    "load_base",
    "prefix_tuning_ready",
    "read_adapter",
]

log = structlog.get_logger("llmos.transformers")

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
#: what llmos-peft writes beside the adapter: method, task, labels, scores …
TUNING_RECORD = "llmos_tuning.json"
#: PEFT methods whose weights fold into the base model's
MERGEABLE = frozenset({"LORA", "ADALORA", "IA3"})
_KIND_OF_TASK_TYPE: dict[str, Kind] = {"SEQ_CLS": "classifier", "CAUSAL_LM": "causal"}
_MAX_JSON_BYTES = 16 << 20


@attrs.frozen(kw_only=True)
class AdapterInfo:
    """An adapter folder, read from its files (nothing imported)."""

    folder: Path
    #: PEFT's name of the method: ``LORA``, ``PREFIX_TUNING`` …
    peft_type: str
    kind: Kind
    #: classification: the head's label names, in order
    labels: tuple[str, ...] = ()


def _json_object(path: Path) -> dict[str, Any]:
    try:
        if path.stat().st_size > _MAX_JSON_BYTES:
            raise UsageError(f"{path}: over {_MAX_JSON_BYTES} bytes, not read")
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise UsageError(f"{path}: cannot read JSON: {exc}") from None
    if not isinstance(data, dict):
        raise UsageError(f"{path} is not a JSON object")
    return data


def read_adapter(folder: Path, card: ModelCard, settings: Settings) -> AdapterInfo:
    """What the adapter in ``folder`` is and which head it needs.

    The head comes from the card's ``task`` option, else from PEFT's
    ``task_type``; a classifier's labels from the card's ``labels`` option,
    else from the folder's ``llmos_tuning.json``. Pickle-only weights are
    refused here, before PEFT could ``torch.load`` them.
    """
    if not folder.is_dir() or not (folder / ADAPTER_CONFIG).is_file():
        raise UsageError(
            f"adapter {card.ref!r}: {folder} is not an adapter folder (no {ADAPTER_CONFIG})",
            param="source",
        )
    if not (folder / ADAPTER_WEIGHTS).is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix.lower() in PICKLE_SUFFIXES)
        if pickles:
            raise UnsafeSourceError(
                f"adapter {card.ref!r}: {folder} holds only pickle weights ({', '.join(pickles)});"
                " this provider loads safetensors only. Save the adapter with"
                " save_pretrained(..., safe_serialization=True)",
                param="source",
            )
        raise UsageError(f"adapter {card.ref!r}: {folder} has no {ADAPTER_WEIGHTS}")
    config = _json_object(folder / ADAPTER_CONFIG)
    peft_type = str(config.get("peft_type") or "")
    kind = settings.task or _KIND_OF_TASK_TYPE.get(str(config.get("task_type")))
    if kind not in ("classifier", "causal"):
        raise UsageError(
            f"adapter {card.ref!r}: its task_type {config.get('task_type')!r} is not one this"
            " provider serves (SEQ_CLS, CAUSAL_LM); set the card option task to classifier or"
            " causal",
            param="task",
        )
    labels = settings.labels
    record = folder / TUNING_RECORD
    if kind == "classifier" and not labels and record.is_file():
        labels = tuple(str(label) for label in _json_object(record).get("labels") or ())
    if kind == "classifier" and len(labels) < 2:
        raise UsageError(
            f"adapter {card.ref!r} is a classifier, but neither its card option labels nor its"
            f" {TUNING_RECORD} names its labels",
            param="labels",
        )
    return AdapterInfo(folder=folder, peft_type=peft_type, kind=kind, labels=labels)


def base_layout(
    path: Path,
    card: ModelCard,
    settings: Settings,
    cache_dir: Path | None,
    artifacts: Artifacts | None = None,
) -> Layout:
    """The base model at ``path`` as a folder transformers reads: a GGUF file
    is converted (once) into ``cache_dir`` under ``card``'s name, or taken
    from a shared ``artifacts`` store that holds its conversion."""
    from llmos_transformers.loader import converted

    # The base's own task option (``encoder``, say) is not the head it gets here.
    layout = inspect(path, attrs.evolve(settings, task=None))
    return converted(layout, card, cache_dir, artifacts)


def load_base(
    layout: Layout,
    kind: Kind,
    settings: Settings,
    labels: Sequence[str] = (),
    tokenizer_folder: Path | None = None,
) -> tuple[Any, Any]:
    """The base model with the head ``kind`` asks for, and its tokenizer
    (from ``tokenizer_folder`` when given, else the model's folder).

    ``classifier``: ``AutoModelForSequenceClassification`` over ``labels``
    (``id2label`` in their order); the head is new unless the folder already
    holds one of that size. ``causal``: the causal LM itself. A tokenizer
    without a pad token gets one (see :func:`runtime.ensure_padding`).
    """
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from llmos_transformers import runtime

    folder = str(layout.folder)
    kwargs = runtime.pretrained_kwargs(settings)
    if kind == "causal":
        if layout.kind != "causal":
            raise UsageError(
                f"{layout.folder} is a {layout.kind} model, not a causal language model;"
                " generation (sft) needs a causal LM such as Llama or a GGUF file",
                param="base",
            )
        model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    elif kind == "classifier":
        if len(labels) < 2:
            raise UsageError("a classification head needs two or more labels", param="labels")
        model = AutoModelForSequenceClassification.from_pretrained(
            folder,
            num_labels=len(labels),
            id2label=dict(enumerate(labels)),
            label2id={label: i for i, label in enumerate(labels)},
            # a classifier base with another label set gets a fresh head
            ignore_mismatched_sizes=True,
            **kwargs,
        )
    else:
        raise UsageError(f"no head for model kind {kind!r} (classifier or causal)")
    tokenizer = runtime.load_tokenizer(tokenizer_folder or layout.folder, settings)
    runtime.ensure_padding(model, tokenizer)
    return model, tokenizer


def prefix_tuning_ready(model: Any) -> Any:
    """Make a sequence classifier accept PEFT's prefix (``past_key_values``).

    transformers 5 renamed the argument ``cache``, and PEFT (0.21) looks for
    ``past_key_values`` in a classifier's signature to decide whether prefix
    tuning is possible; a causal-LM classifier (Llama's) takes a cache, so its
    forward is wrapped to take the old name. A BERT-style encoder takes no
    cache at all: prefix tuning cannot work there, and this says so.
    """
    parameters = pyinspect.signature(model.forward).parameters
    if "past_key_values" in parameters:
        return model
    if "cache" not in parameters:
        raise UsageError(
            f"prefix tuning needs a model that takes cached keys and values; "
            f"{type(model).__name__} does not (BERT-style encoders never do). Use prompt "
            "tuning or LoRA, or a causal LM (Llama …) as the base",
            param="method",
        )
    forward = model.forward

    def forward_with_past(
        *args: Any, past_key_values: Any = None, **kwargs: Any
    ) -> Any:  # PEFT's name → transformers' name; the flags PEFT adds are no longer taken
        for flag in ("output_attentions", "output_hidden_states", "return_dict"):
            kwargs.pop(flag, None)
        return forward(*args, cache=past_key_values, **kwargs)

    model.forward = forward_with_past
    return model


def attach(base: Any, info: AdapterInfo) -> Any:
    """The adapter in ``info.folder`` on ``base``, ready to serve: merged into
    the base weights where the method allows, else a PEFT model (wrapped in
    :class:`PromptLearnedLM` for a causal LM)."""
    try:
        from peft import PeftModel
    except ImportError:
        raise UsageError(
            f"{info.folder} is a PEFT adapter, and serving one needs peft, which is not"
            " installed: pip install llmos-peft (or peft)"
        ) from None

    if info.peft_type == "PREFIX_TUNING" and info.kind == "classifier":
        base = prefix_tuning_ready(base)
    model = PeftModel.from_pretrained(base, str(info.folder), is_trainable=False)
    if info.peft_type in MERGEABLE:
        return model.merge_and_unload()
    if info.kind == "causal":
        return PromptLearnedLM(model)
    return model


def load(request: LoadRequest) -> LoadedModel:
    """The provider's ``load`` for an adapter card (see the module docstring)."""
    card = request.card
    settings = settings_for(card, request.options)
    if request.path is None:
        raise UsageError(
            f"adapter {card.ref!r}: its source {card.source!r} must be a local folder",
            param="source",
        )
    info = read_adapter(request.path, card, settings)
    if request.base_path is None or request.base is None:
        raise UsageError(
            f"adapter {card.ref!r} needs its base model ({', '.join(card.parents) or 'none named'})"
            " as a local folder or file; register the base model with a local source",
            param="parents",
        )
    # The base's own options (which GGUF file, remote code) decide how it is read;
    # the adapter card's (dtype, device, batch size) how it is served.
    base_settings = settings_for(request.base, request.options)
    settings = attrs.evolve(
        settings,
        gguf_file=base_settings.gguf_file,
        trust_remote_code=base_settings.trust_remote_code,
    )
    started = time.perf_counter()

    from llmos_transformers import runtime

    runtime.apply_threads(settings)
    device = runtime.pick_device(settings.device)
    with runtime.quiet_progress():
        layout = base_layout(
            request.base_path, request.base, settings, request.cache_dir, request.artifacts
        )
        # tuning saves the tokenizer it trained with (padding side, pad token) beside the adapter
        own = info.folder if (info.folder / "tokenizer_config.json").is_file() else None
        base, tokenizer = load_base(layout, info.kind, settings, info.labels, own)
        model = attach(base, info).to(device).eval()
    if info.kind == "classifier":
        from llmos_transformers.encoder import Classifier

        served: LoadedModel = Classifier(card, model, tokenizer, settings, device)
    else:
        from llmos_transformers.causal import CausalLM

        served = CausalLM(card, model, tokenizer, settings, device)
    log.info(
        "transformers.adapter_loaded",
        model=card.ref,
        base=request.base.ref,
        method=info.peft_type,
        kind=info.kind,
        merged=info.peft_type in MERGEABLE,
        device=str(device),
        seconds=round(time.perf_counter() - started, 3),
    )
    return served


# --------------------------------------------------------------------------
# Prefix- and prompt-tuned causal LMs
# --------------------------------------------------------------------------


class PromptLearnedLM(torch.nn.Module):
    """A prefix- or prompt-tuned causal LM, served as the plain causal LM that
    :class:`~llmos_transformers.causal.CausalLM` drives.

    PEFT 0.21's own ``generate`` on transformers 5 ignores a prefix and
    misplaces a prompt's virtual tokens after the first new token, and its
    forward returns logits for the virtual tokens too. Both methods amount to
    keys and values that every sequence attends to first — a prefix *is*
    them, a prompt's are what the base computes over its virtual tokens (they
    attend only to each other) — so each call hands the base a cache filled
    with them: logits are the input's own, and ``generate`` continues exactly
    the way the training forward computes.
    """

    def __init__(self, peft_model: Any) -> None:
        super().__init__()
        self.peft_model = peft_model
        config = peft_model.active_peft_config
        self.virtual_tokens = int(config.num_virtual_tokens)
        self.is_prefix = getattr(config.peft_type, "value", config.peft_type) == "PREFIX_TUNING"

    @property
    def base(self) -> Any:
        return self.peft_model.get_base_model()

    @property
    def config(self) -> Any:
        return self.base.config

    @property
    def generation_config(self) -> Any:
        return self.base.generation_config

    @generation_config.setter
    def generation_config(self, value: Any) -> None:
        self.base.generation_config = value

    def _cache(self, batch: int) -> Any:
        prompt = self.peft_model.get_prompt(batch_size=batch)
        if self.is_prefix:
            return prompt
        return self.base(inputs_embeds=prompt, use_cache=True).past_key_values

    def _with_virtual(self, attention_mask: torch.Tensor) -> torch.Tensor:
        ones = attention_mask.new_ones((attention_mask.shape[0], self.virtual_tokens))
        return torch.cat([ones, attention_mask], dim=1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **kwargs: Any) -> Any:
        return self.base(
            input_ids=input_ids,
            attention_mask=self._with_virtual(attention_mask),
            cache=self._cache(input_ids.shape[0]),
            **kwargs,
        )

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        stopping_criteria: Sequence[Callable[..., Any]] | None = None,
        **kwargs: Any,
    ) -> torch.Tensor:
        # generate reads the cache's length off input_ids: stand-in ids for the
        # cached virtual tokens, which it never embeds, cut off again below
        n = self.virtual_tokens
        filler = input_ids.new_zeros((input_ids.shape[0], n))
        criteria = StoppingCriteriaList(
            _Shifted(criterion, n) for criterion in (stopping_criteria or [])
        )
        output = self.base.generate(
            input_ids=torch.cat([filler, input_ids], dim=1),
            attention_mask=self._with_virtual(attention_mask),
            cache=self._cache(input_ids.shape[0]),
            stopping_criteria=criteria,
            **kwargs,
        )
        return output[:, n:]


class _Shifted(StoppingCriteria):
    """A stopping criterion that sees the ids without the virtual stand-ins."""

    def __init__(self, criterion: Callable[..., Any], offset: int) -> None:
        super().__init__()
        self.criterion = criterion
        self.offset = offset

    def __call__(self, input_ids: torch.Tensor, scores: Any, **kwargs: Any) -> torch.Tensor:
        return self.criterion(input_ids[:, self.offset :], scores, **kwargs)
