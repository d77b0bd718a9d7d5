"""Fusions as models: created, fitted, registered, loaded.

A fusion is a registry card of format ``fusion`` and provider ``fusion``:
its members (pinned to versions), its strategy and the strategy's options
(with what ``fit`` learned on dev data) live in ``options["fusion"]``, its
members are its ``parents``. It is created three ways, all through
:meth:`Fusions.create`: ``[fusions.NAME]`` tables in config (registered when
the kernel starts, fitted when first loaded), ``llmos fuse create`` and
``POST /api/fusions``. The model manager loads it like any other model,
through the kernel's own ``fusion`` provider (:func:`provider_spec`), whose
:class:`~llmos.types.LoadRequest` carries the kernel's models
(``request.models``) for the fused model to ask its members; a fusion (or a
deployment group) can be a member of another.

A member is a model name (``a``, ``b@2``, ``b@prod``) or a table::

    {model = "smollm2", labels = ["negative", "positive"],
     map = {negative = "0", positive = "1"}}

``labels`` asks the member zero-shot over those labels (a causal LM scoring
label words); ``map`` renames the labels it answers with to the fusion's.

A ``merge`` strategy (weight space) makes no fusion card: it writes a new
model from its members' weights, which is registered with the merge as its
lineage.

Never worse than its best member on dev data: a fusion fitted on dev rows
(``--dev``, ``dev`` in config or the API) that does not beat its best member
there by :data:`GUARD_MARGIN_SD` standard errors of their paired difference
(from the rows only one of them got right; a fusion that wins by a hair on
dev loses about half the time on new rows, asking more members) serves that
member alone (``options["fallback"]``, recorded in the fit with ``guard``;
every answer's ``meta["fusion"]`` carries ``fallback`` and ``reason``).
A strategy that learned something from the dev rows (weights, a stack, a
cascade's thresholds, a router's centroids) is judged on rows it was not
fitted on: :data:`CHECK_FOLDS` folds of the dev rows (stratified by label, of
at least :data:`MIN_FOLD_ROWS` rows; fewer rows than two folds are judged in
sample, and the fit says so), each answered by the strategy fitted on the
other folds — over the members' dev answers in hand, no member asked again,
a router's embedder asked each row once (:class:`HelperMemo`). Scored on the
rows it learned, a fit flatters itself (a router's centroids remember their
rows). The fit records both figures (``fused``: ``dev/accuracy`` in sample,
``out_of_fold/accuracy``; ``out_of_fold``: folds, rows, seconds, or why not);
what is served is the fit on every dev row.
A strategy that trades accuracy for cost on purpose (a cascade's
``target_ratio``/``target_accuracy``, recorded by its fit as
``calibration.target_accuracy``) is held to the accuracy it was asked to
keep instead, without the margin (its calibration aims ``margin_sd`` above
the target already). A classification fusion created without dev data is
checked against nothing: :meth:`Fusions.risk` says so, with the command that
adds dev data (``llmos fuse create`` prints it, ``POST /api/fusions`` returns it).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from llmos.config import Config, Field, Section, check_table
from llmos.errors import ConfigError, LlmosError, PluginError, UsageError
from llmos.fusion import combine
from llmos.fusion.call import Asked, Call, Member
from llmos.fusion.model import FusedModel
from llmos.registry.fsstore import store_of
from llmos.registry.sources import check_source
from llmos.tuning.data import load_file
from llmos.tuning.jobs import check_artifact
from llmos.types import (
    Capability,
    ClassifyRequest,
    FitData,
    FusionStrategySpec,
    LoadRequest,
    MergeRequest,
    ModelCaller,
    ModelCard,
    ModelFormat,
    ProviderSpec,
    validate_model_name,
)

if TYPE_CHECKING:
    from llmos.plugin.manager import PluginManager, Registered
    from llmos.registry.service import Registry
    from llmos.runtime.models import ModelManager

__all__ = [
    "PROVIDER",
    "Fusions",
    "HelperMemo",
    "OfflineCall",
    "offline_results",
    "provider_spec",
    "served_strategy",
    "strategy_rows",
]

log = structlog.get_logger("llmos.fusion")

#: the [fusions] config section (the kernel passes it to load_config)
SECTION = Section(
    "fusions",
    {},
    entries={
        "strategy": Field(
            "str", None, "How members are combined (`llmos fuse strategies`).", required=True
        ),
        "members": Field(
            "list",
            None,
            'Models: names ("a", "b@2") or tables {model, labels, map}.',
            required=True,
        ),
        "options": Field("table", None, "The strategy's options."),
        "dev": Field("str", None, "Labelled rows (JSONL/CSV) it is fitted and checked on."),
        "description": Field("str", None, "What it is, for search."),
        "tags": Field("list[str]", None, "Search tags."),
    },
    doc="Fusions: [fusions.NAME] with strategy, members, options, dev, description, tags.",
)

#: the provider name of fusion cards
PROVIDER = "fusion"
_TABLE_KEYS = {"strategy", "members", "options", "dev", "description", "tags"}
_MEMBER_KEYS = {"model", "labels", "map"}
#: what a capability serves, as a card task
_TASKS = {
    Capability.CLASSIFY: "text-classification",
    Capability.COMPLETE: "text-generation",
    Capability.CHAT: "chat",
    Capability.EMBED: "embedding",
}
#: rows of dev data a fusion is fitted on, at most
MAX_FIT_ROWS = 20_000
FIT_BATCH = 32
#: what a config fusion's cached fit was made by (2: weights chosen on dev and
#: the fallback to the best member; 3: a fitted strategy judged out of fold)
FIT_VERSION = 3
#: the out-of-fold check of a fitted strategy: at most this many folds ...
CHECK_FOLDS = 5
#: ... of at least this many dev rows each (fewer rows than two folds: the
#: strategy is judged on the rows it was fitted on, and the fit says so)
MIN_FOLD_ROWS = 10
#: a fusion judged against its best member is kept only this many standard
#: errors of their paired difference above it: one that wins by a hair on dev
#: rows loses about half the time on new ones, at more calls
GUARD_MARGIN_SD = 1.0
#: how a strategy calls a model that is not a member (``FitData.helper``)
Helper = Callable[[str, Capability, Sequence[Any]], list[Any]]


def provider_spec(fusions: Callable[[], Fusions]) -> ProviderSpec:
    """The kernel's ``fusion`` provider: a fusion card loads through
    :meth:`Fusions.load` of ``fusions()`` (the kernel's, made on first use)."""
    return ProviderSpec(
        name=PROVIDER,
        load=lambda request: fusions().load(request),
        description="models combined by a fusion strategy (built in)",
        formats=(ModelFormat.FUSION,),
    )


def strategy_rows(plugins: PluginManager) -> list[dict[str, Any]]:
    """The installed strategies, for listings (``llmos fuse strategies``, the API)."""
    return [
        {
            "name": name,
            "plugin": r.plugin,
            "kind": "merge" if r.spec.merge is not None else "served",
            "capabilities": sorted(r.spec.capabilities),
            "description": r.spec.description,
        }
        for name, r in sorted(plugins.fusion_strategies.items())
    ]


# --------------------------------------------------------------------------
# members
# --------------------------------------------------------------------------


def _member_table(item: Any, where: str) -> dict[str, Any]:
    """A member as given (a name or a table) → ``{"model", "labels", "map"}``."""
    if isinstance(item, str):
        return {"model": item, "labels": [], "map": {}}
    if not isinstance(item, Mapping):
        raise UsageError(f"{where}: a member is a model name or a table, got {item!r}")
    unknown = sorted(set(item) - _MEMBER_KEYS)
    if unknown:
        raise UsageError(
            f"{where}: unknown member key(s) {', '.join(unknown)}; known: model, labels, map"
        )
    model = item.get("model")
    if not isinstance(model, str) or not model:
        raise UsageError(f"{where}: a member table needs model = NAME")
    labels = item.get("labels") or []
    if isinstance(labels, str) or not all(isinstance(x, str) and x for x in labels):
        raise UsageError(f"{where}: member {model!r}: labels must be a list of strings")
    mapping = item.get("map") or {}
    if not isinstance(mapping, Mapping) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in mapping.items()
    ):
        raise UsageError(f"{where}: member {model!r}: map must be a table of label = label")
    return {"model": model, "labels": list(labels), "map": dict(mapping)}


def _strategy_options(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise UsageError(f"{where}: options must be a table, got {value!r}")
    return dict(value)


def _rows_hash(rows: Sequence[Mapping[str, Any]]) -> str:
    digest = hashlib.sha256()
    for row in rows:
        digest.update(json.dumps([row["text"], row["label"]], ensure_ascii=False).encode())
    return digest.hexdigest()


# --------------------------------------------------------------------------
# offline calls: a strategy run over member answers already in hand
# --------------------------------------------------------------------------


class OfflineCall(Call):
    """A :class:`Call` answered from member results computed beforehand
    (``outputs[m][row]``; ``seconds[m]``: what each answer took): a fit's
    scores, ``llmos eval`` on a fusion and its ablations run the strategy
    over them without calling any member again."""

    def __init__(
        self,
        models: ModelCaller,
        members: Sequence[Member],
        requests: Sequence[Any],
        options: Mapping[str, Any],
        outputs: Sequence[Sequence[Any]],
        seconds: Sequence[float],
        helper: Helper | None = None,
    ) -> None:
        super().__init__(models, members, Capability.CLASSIFY, requests, options, None)
        self._outputs = outputs
        self._seconds = seconds
        self._helper = helper

    def helper(self, model: str, capability: Capability, requests: Sequence[Any]) -> list[Any]:
        if self._helper is not None:
            return self._helper(model, capability, requests)
        return super().helper(model, capability, requests)

    def _ask_many(
        self,
        members: Sequence[int],
        rows: Sequence[int] | None,
        requests: Sequence[Any] | None,
    ) -> list[dict[int, Any]]:
        every = list(range(len(self.requests))) if rows is None else [int(r) for r in rows]
        answers: list[dict[int, Any]] = []
        for member in members:
            self._check_member(member)
            got: dict[int, Any] = {}
            for row in every:
                result = self._outputs[member][row]
                entry = self.asked[row].setdefault(member, Asked(member))
                entry.latency_s, entry.result, entry.answered = self._seconds[member], result, True
                got[row] = result
            answers.append(got)
        return answers


def offline_results(
    models: ModelCaller,
    strategy: FusionStrategySpec,
    members: Sequence[Member],
    options: Mapping[str, Any],
    texts: Sequence[str],
    outputs: Sequence[Sequence[Any]],
    seconds: Sequence[float],
    helper: Helper | None = None,
) -> tuple[list[Any], list[list[int]]]:
    """The strategy's answers over member answers in hand, and which members
    each row asked (``helper``: how it calls models that are not members, a
    :class:`HelperMemo` to reuse their answers)."""
    strategy = served_strategy(strategy, options)
    assert strategy.combine is not None
    requests = [ClassifyRequest(text=t) for t in texts]
    call = OfflineCall(models, members, requests, options, outputs, seconds, helper)
    results = strategy.combine(call)
    return list(results), [sorted(call.asked[row]) for row in range(len(texts))]


class HelperMemo:
    """A strategy's calls to models that are not members (a router's
    embedder), each request answered once: a fit, its out-of-fold check and
    an analysis ask the same rows again and again. Only what is the same
    every time is kept (embeddings, classifications); generation is asked
    anew."""

    KEPT = frozenset({Capability.EMBED, Capability.CLASSIFY})

    def __init__(self, models: ModelCaller) -> None:
        self.models = models
        self.answers: dict[tuple[str, str, Any], Any] = {}
        self.asked = 0  # requests the kernel answered
        self.reused = 0  # requests answered from the memo

    def __call__(self, model: str, capability: Capability, requests: Sequence[Any]) -> list[Any]:
        if Capability(capability) not in self.KEPT:
            return self.models.call(model, capability, requests)
        keys = [(model, str(capability), _request_key(r)) for r in requests]
        missing: dict[Any, Any] = {}
        for key, request in zip(keys, requests, strict=True):
            if key not in self.answers and key not in missing:
                missing[key] = request
        if missing:
            got = self.models.call(model, capability, list(missing.values()))
            self.answers.update(zip(missing, got, strict=True))
            self.asked += len(missing)
        self.reused += len(keys) - len(missing)
        return [self.answers[key] for key in keys]


def _request_key(request: Any) -> Any:
    try:
        hash(request)
    except TypeError:
        return repr(request)
    return request


def served_strategy(spec: FusionStrategySpec, options: Mapping[str, Any]) -> FusionStrategySpec:
    """``spec`` as a fusion with these (fitted) options serves it: the
    strategy itself, or — when its fit fell back (``options["fallback"]``) —
    its best member alone, every answer saying so in its meta."""
    fallback = options.get("fallback")
    if not isinstance(fallback, Mapping) or spec.combine is None:
        return spec
    index, model = int(fallback["member"]), str(fallback["model"])
    reason = str(fallback.get("reason", ""))

    def combine(call: Any) -> list[Any]:
        rows = list(range(len(call.requests)))
        answers = call.ask(index, rows)
        for row in rows:
            call.note(row, fallback=model, reason=reason)
        return [answers.get(row) for row in rows]

    return attrs.evolve(spec, combine=combine)


def _best_member(accuracy: Sequence[float], seconds: Sequence[float]) -> int:
    """The most accurate member (the cheaper one of equals)."""
    return max(range(len(accuracy)), key=lambda i: (accuracy[i], -seconds[i]))


# --------------------------------------------------------------------------
# the service
# --------------------------------------------------------------------------


class Fusions:
    """Fusions of one kernel (see the module docstring).

    ``config`` gives the ``[fusions]`` tables and the data folder (where fits
    and merges are written); ``registry`` stores fusion cards; ``models``
    resolves and loads members; ``caller`` asks them (the kernel, through
    their workers); ``strategies`` are the installed fusion strategies.
    """

    def __init__(
        self,
        config: Config,
        registry: Registry,
        models: ModelManager,
        caller: ModelCaller,
        strategies: Callable[[], Mapping[str, Registered[FusionStrategySpec]]],
    ) -> None:
        self._config = config
        self._registry = registry
        self._models = models
        self._caller = caller
        self._strategies = strategies
        self._fit_lock = threading.Lock()

    # -- lookups ---------------------------------------------------------------

    def strategy(self, name: str) -> Registered[FusionStrategySpec]:
        strategies = self._strategies()
        registered = strategies.get(name) if isinstance(name, str) else None
        if registered is None:
            have = ", ".join(f"{n} ({r.plugin})" for n, r in sorted(strategies.items())) or "none"
            raise UsageError(
                f"fusion strategy {name!r} is not installed; installed strategies: {have}",
                param="strategy",
            )
        return registered

    def list(self) -> list[ModelCard]:
        """The latest version of every registered fusion."""
        cards = []
        store = self._registry.store
        cursor = None
        while True:
            page = store.search(
                f"format:{ModelFormat.FUSION.value}", sort="name", limit=200, cursor=cursor
            )
            cards.extend(hit.card for hit in page.items)
            cursor = page.next_cursor
            if not cursor:
                return cards

    def _member(self, table: Mapping[str, Any], where: str) -> Member:
        deployment = self._models.resolve(table["model"])
        return Member(
            ref=deployment.key,
            card=deployment.card,
            labels=tuple(table["labels"]),
            label_map=table["map"],
        )

    def members_of(self, card: ModelCard) -> list[Member]:
        conf = self._conf(card)
        return [self._member(t, card.ref) for t in conf["members"]]

    def _conf(self, card: ModelCard) -> dict[str, Any]:
        conf = card.options.get("fusion")
        if not isinstance(conf, Mapping) or not isinstance(conf.get("members"), list):
            raise ConfigError(
                f"{card.ref!r} is a fusion card without options.fusion (strategy, members)"
            )
        return dict(conf)

    def _check_cycle(self, name: str, members: Sequence[Member]) -> None:
        """A fusion may contain fusions, but never itself."""
        seen: set[str] = set()
        stack = [(m.card, [name, m.ref]) for m in members]
        while stack:
            card, path = stack.pop()
            if card.name == name:
                raise UsageError(f"fusion {name!r} would contain itself: {' -> '.join(path)}")
            if card.format != ModelFormat.FUSION or card.ref in seen:
                continue
            seen.add(card.ref)
            for table in self._conf(card)["members"]:
                member = self._member(table, card.ref)
                stack.append((member.card, [*path, member.ref]))

    # -- creating --------------------------------------------------------------

    def create(
        self,
        name: str,
        *,
        strategy: str,
        members: Sequence[Any],
        options: Mapping[str, Any] | None = None,
        dev: Sequence[Mapping[str, Any]] | None = None,
        description: str = "",
        tags: Sequence[str] = (),
        created_by: str | None = None,
        if_changed: bool = False,
        dev_file: str | None = None,
    ) -> ModelCard:
        """Check, fit (with ``dev`` rows: ``{"text", "label"}``) and register a
        fusion; a ``merge`` strategy registers the merged model instead.
        ``dev_file`` (config fusions) defers the fit to the first load."""
        where = f"fusion {name!r}"
        validate_model_name(name)
        registered = self.strategy(strategy)
        spec = registered.spec
        if not isinstance(members, Sequence) or isinstance(members, str) or not members:
            raise UsageError(f"{where}: give its members (one or more models)", param="members")
        tables = [_member_table(item, where) for item in members]
        resolved = [self._member(t, where) for t in tables]
        self._check_cycle(name, resolved)
        given = _strategy_options(options, where)
        options = self._check_options(registered, given, resolved)
        if spec.merge is not None:
            return self._merge(name, registered, resolved, options, description, tags, created_by)
        if spec.fit_required(options) and not dev and dev_file is None:
            raise UsageError(
                f"strategy {strategy!r} learns from dev data: give labelled dev rows"
                ' (--dev FILE, or "dev" in the request)',
                param="dev",
            )
        fit: dict[str, Any] | None = None
        scores: dict[str, float] = {}
        if dev:
            rows = _dev_rows(dev)
            options, fit, scores = self.fit(spec, resolved, options, rows)
            fit["data"] = str(self._keep_rows(name, rows))
        pinned = [{**t, "model": m.ref} for t, m in zip(tables, resolved, strict=True)]
        card = ModelCard(
            name=name,
            provider=PROVIDER,
            format=ModelFormat.FUSION,
            tasks=self._tasks(spec, resolved),
            parents=tuple(m.ref for m in resolved),
            description=description or f"{strategy} fusion of {', '.join(m.ref for m in resolved)}",
            tags=tuple(dict.fromkeys(("fusion", strategy, *tags))),
            scores=scores,
            options={
                "fusion": {
                    "strategy": strategy,
                    "members": pinned,
                    "options": options,
                    # as given, before the check and the fit: what an ablation re-checks
                    "given": given,
                    **({"fit": fit} if fit else {}),
                    **({"dev_file": dev_file} if dev_file else {}),
                }
            },
        )
        stored = self._registry.register(card, created_by, if_changed=if_changed)
        log.info("fusion.created", model=stored.ref, strategy=strategy, members=card.parents)
        risk = self.risk(stored)
        if risk is not None:
            # the CLI and the API hand it to their caller; a config fusion has only the log
            (log.warning if created_by == "config" else log.info)(
                "fusion.unchecked", model=stored.ref, warning=risk
            )
        return stored

    def risk(self, card: ModelCard) -> str | None:
        """What can go wrong with ``card``, a fusion never checked against its
        members (no dev data, no dev file), and the command that checks it;
        ``None`` when it was (or cannot be: one member, no classification)."""
        conf = card.options.get("fusion")
        if not isinstance(conf, Mapping) or "fit" in conf or conf.get("dev_file"):
            return None
        members = conf.get("members") or []
        strategies = self._strategies()
        registered = strategies.get(str(conf.get("strategy")))
        if len(members) < 2 or registered is None:
            return None
        if Capability.CLASSIFY not in registered.spec.capabilities:
            return None
        if card.tasks and _TASKS[Capability.CLASSIFY] not in card.tasks:
            return None  # members that do not classify: dev rows could not score them
        command = ["llmos", "fuse", "create", card.name, "--strategy", str(conf["strategy"])]
        for table in members:
            plain = isinstance(table, Mapping) and not table.get("labels") and not table.get("map")
            member = table["model"] if plain else json.dumps(dict(table), ensure_ascii=False)
            command += ["--member", member]
        for key, value in (conf.get("given") or {}).items():
            command += ["--option", f"{key}={json.dumps(value)}"]
        return (
            f"{card.ref} was created without dev data: nothing checks that it does better"
            " than its best member (a mean of a strong and a weaker member can lose to the"
            " strong one). With labelled dev rows the members are weighed on them and the"
            " fusion serves its best member alone when it loses there: "
            + shlex.join([*command, "--dev", "DEV_FILE"])
        )

    def _check_options(
        self,
        registered: Registered[FusionStrategySpec],
        options: dict[str, Any],
        members: Sequence[Member],
    ) -> dict[str, Any]:
        check = registered.spec.check
        if check is None:
            return options
        try:
            return dict(check(options, [m.card for m in members]))
        except LlmosError:
            raise
        except Exception as exc:
            raise PluginError(
                f"fusion strategy {registered.spec.name!r} (plugin {registered.plugin}) failed"
                f" checking its options: {type(exc).__name__}: {exc}"
            ) from exc

    @staticmethod
    def _tasks(spec: FusionStrategySpec, members: Sequence[Member]) -> tuple[str, ...]:
        served = [_TASKS[c] for c in sorted(spec.capabilities) if c in _TASKS]
        common = [t for t in served if all(t in m.card.tasks for m in members if m.card.tasks)]
        return tuple(common or served)

    # -- fitting ---------------------------------------------------------------

    def member_outputs(
        self, members: Sequence[Member], texts: Sequence[str]
    ) -> tuple[list[list[Any]], list[float]]:
        """Every member's classification of every text, and each one's mean
        seconds per text (its cost)."""
        outputs: list[list[Any]] = []
        seconds: list[float] = []
        for member in members:
            self._models.get(member.ref)  # loaded before timing: a load is no cost per row
            started = time.perf_counter()
            answers: list[Any] = []
            for at in range(0, len(texts), FIT_BATCH):
                batch = [
                    member.request(ClassifyRequest(text=t)) for t in texts[at : at + FIT_BATCH]
                ]
                results = self._caller.call(member.ref, Capability.CLASSIFY, batch)
                answers.extend(member.result(r) for r in results)
            outputs.append(answers)
            seconds.append((time.perf_counter() - started) / max(len(texts), 1))
        return outputs, seconds

    def fit(
        self,
        spec: FusionStrategySpec,
        members: Sequence[Member],
        options: Mapping[str, Any],
        dev: Sequence[Mapping[str, Any]],
    ) -> tuple[dict[str, Any], dict[str, Any], dict[str, float]]:
        """Learn the strategy's options on ``dev``; the options, a record of
        the fit (rows, hash, each member's dev accuracy and cost, the fused
        accuracy in sample and out of fold, the fallback) and the fusion's
        dev scores.

        The guard (the module docstring) judges a strategy that learned
        something from the dev rows on rows it was not fitted on: the dev
        rows are split into folds (:meth:`_out_of_fold`), each fold answered
        by the strategy fitted on the others — on the members' answers in
        hand, no member asked again. A fit on the very rows it is scored on
        flatters it (a router's centroids remember their rows). What is
        served is still the fit on every dev row.
        """
        rows = _dev_rows(dev)
        texts = [r["text"] for r in rows]
        gold = [r["label"] for r in rows]
        outputs, seconds = self.member_outputs(members, texts)
        # the embedder of a router is asked each row once, for the fit and every fold
        helper = HelperMemo(self._caller)
        fitted = dict(options)
        learned: dict[str, Any] = {}
        if spec.fit is not None:
            learned = self._fit_on(spec, members, options, texts, gold, outputs, seconds, helper)
            fitted.update(learned)
        results, asked = offline_results(
            self._caller, spec, members, fitted, texts, outputs, seconds, helper
        )
        fused = combine.accuracy([r.label for r in results], gold)
        accuracy = [
            combine.accuracy([o.label for o in outputs[i]], gold) for i in range(len(members))
        ]
        calls = sum(len(a) for a in asked) / len(rows)
        best = _best_member(accuracy, seconds)
        if len(members) < 2:
            check: dict[str, Any] = {"folds": 0, "why": "one member: nothing to fall back to"}
        elif not learned:
            check = {"folds": 0, "why": "nothing was learned from the dev rows"}
        else:
            check = self._out_of_fold(spec, members, options, texts, gold, outputs, seconds, helper)
        out_of_fold_right = check.pop("right", None)
        out_of_fold = check.get("accuracy")
        judged = fused if out_of_fold is None else out_of_fold
        # each row: the fusion right (out of fold when judged so), the best member right
        fused_right = out_of_fold_right or [
            r.label == g for r, g in zip(results, gold, strict=True)
        ]
        member_right = [o.label == g for o, g in zip(outputs[best], gold, strict=True)]
        # the accuracy the fusion must keep on dev: its best member's, or the
        # target a strategy that trades accuracy for cost was given (cascade)
        bar, against = accuracy[best], f"{members[best].ref} {accuracy[best]:.4f}"
        margin = 0.0
        target = (fitted.get("calibration") or {}).get("target_accuracy")
        if isinstance(target, int | float) and target < bar:
            # the cascade's calibration aimed margin_sd standard errors above it
            bar, against = float(target), f"its target {target:.4f} (best member {against})"
        else:
            margin = GUARD_MARGIN_SD * _paired_se(fused_right, member_right)
        only_fused = sum(f and not m for f, m in zip(fused_right, member_right, strict=True))
        only_member = sum(m and not f for f, m in zip(fused_right, member_right, strict=True))
        fallback = None
        if len(members) > 1 and judged < bar + margin - 1e-12:
            scored = (
                f"{fused:.4f}"
                if out_of_fold is None
                else f"{out_of_fold:.4f} out of fold ({check['folds']} folds; {fused:.4f} on"
                " the rows it was fitted on)"
            )
            short = (
                f"< {against}"
                if judged < bar - 1e-12
                else f"within one standard error ({margin:.4f}) of {against} (it alone"
                f" was right on {only_fused} rows, {members[best].ref} alone on {only_member})"
            )
            fallback = {
                "member": best,
                "model": members[best].ref,
                "reason": f"on dev data ({len(rows)} rows) the fusion scored {scored}"
                f" {short}: {members[best].ref} answers alone",
            }
            fitted["fallback"] = fallback
            calls = 1.0
        record = {
            "rows": len(rows),
            "hash": _rows_hash(rows),
            "members": {
                m.ref: {"dev/accuracy": accuracy[i], "seconds_per_row": seconds[i]}
                for i, m in enumerate(members)
            },
            "member_calls_per_row": calls,
            "fused": {"dev/accuracy": fused, "out_of_fold/accuracy": out_of_fold},
            "out_of_fold": check,
            "best_member": {"model": members[best].ref, "dev/accuracy": accuracy[best]},
            # what decided: the fused accuracy judged, the bar, the margin over it
            "guard": {
                "judged": "out_of_fold" if out_of_fold is not None else "dev",
                "accuracy": judged,
                "bar": bar,
                "margin": margin,
                "only_fusion_right": only_fused,
                "only_member_right": only_member,
            },
            "fallback": fallback,
        }
        scores = {"dev/accuracy": accuracy[best] if fallback else fused}
        if out_of_fold is not None:
            scores["dev/accuracy_out_of_fold"] = accuracy[best] if fallback else out_of_fold
        if fallback:
            log.warning("fusion.fallback", strategy=spec.name, **fallback)
        log.info(
            "fusion.fitted",
            strategy=spec.name,
            rows=len(rows),
            fused=fused,
            out_of_fold=out_of_fold,
            folds=check["folds"],
            **scores,
        )
        return fitted, record, scores

    def _fit_on(
        self,
        spec: FusionStrategySpec,
        members: Sequence[Member],
        options: Mapping[str, Any],
        texts: Sequence[str],
        gold: Sequence[str],
        outputs: Sequence[Sequence[Any]],
        seconds: Sequence[float],
        helper: Helper,
    ) -> dict[str, Any]:
        """What ``spec.fit`` learns from these rows and the members' answers on them."""
        assert spec.fit is not None
        data = FitData(
            texts=texts,
            gold=gold,
            outputs=[[dict(r.scores) for r in answers] for answers in outputs],
            seconds=seconds,
            members=[m.card for m in members],
            options=options,
            helper=helper,
        )
        try:
            return dict(spec.fit(data))
        except LlmosError:
            raise
        except Exception as exc:
            raise PluginError(
                f"fusion strategy {spec.name!r} failed fitting: {type(exc).__name__}: {exc}"
            ) from exc

    def _out_of_fold(
        self,
        spec: FusionStrategySpec,
        members: Sequence[Member],
        options: Mapping[str, Any],
        texts: Sequence[str],
        gold: Sequence[str],
        outputs: Sequence[Sequence[Any]],
        seconds: Sequence[float],
        helper: Helper,
    ) -> dict[str, Any]:
        """The strategy's accuracy on rows it was not fitted on: ``folds``
        (at most :data:`CHECK_FOLDS`, of :data:`MIN_FOLD_ROWS` rows or more;
        stratified by label, the same split every time), each answered by
        the strategy fitted on the others. Too few rows, or a fold it cannot
        be fitted on: ``folds`` 0 and why (it is judged in sample)."""
        n = len(gold)
        count = min(CHECK_FOLDS, n // MIN_FOLD_ROWS)
        if count < 2:
            return {
                "folds": 0,
                "why": f"{n} dev rows, fewer than two folds of {MIN_FOLD_ROWS}: judged on the"
                " rows it was fitted on",
            }
        started = time.perf_counter()
        fold = _folds(gold, count)
        right = [False] * n

        def pick(rows: Sequence[int]) -> list[list[Any]]:
            return [[answers[i] for i in rows] for answers in outputs]

        for k in range(count):
            train = [i for i in range(n) if fold[i] != k]
            held = [i for i in range(n) if fold[i] == k]
            try:
                learned = self._fit_on(
                    spec, members, options,
                    [texts[i] for i in train], [gold[i] for i in train], pick(train),
                    seconds, helper,
                )  # fmt: skip
            except LlmosError as exc:
                log.warning("fusion.fold_unfitted", strategy=spec.name, fold=k, error=exc.message)
                return {
                    "folds": 0,
                    "why": f"fold {k + 1} of {count} could not be fitted ({exc.message}):"
                    " judged on the rows it was fitted on",
                }
            results, _ = offline_results(
                self._caller, spec, members, {**options, **learned},
                [texts[i] for i in held], pick(held), seconds, helper,
            )  # fmt: skip
            for result, i in zip(results, held, strict=True):
                right[i] = result.label == gold[i]
        return {
            "folds": count,
            "rows": n,
            "accuracy": sum(right) / n,
            "right": right,  # each row's, for the guard's paired comparison (not recorded)
            "stratified": "by label",
            "seconds": round(time.perf_counter() - started, 3),
        }

    def _keep_rows(self, name: str, rows: Sequence[Mapping[str, Any]]) -> Path:
        """Dev rows a fusion was fitted on, kept for ablations (``llmos eval``)."""
        folder = self._scratch() / name.replace("/", "--")
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"dev-{_rows_hash(rows)[:16]}.jsonl"
        if not path.exists():
            part = path.with_suffix(".part")
            part.write_text(
                "".join(json.dumps(dict(row), ensure_ascii=False) + "\n" for row in rows),
                encoding="utf-8",
            )
            part.replace(path)
        return path

    def _fit_rows(self, conf: Mapping[str, Any]) -> list[dict[str, str]] | None:
        """The rows a fusion was fitted on, when they are still there."""
        where = (conf.get("fit") or {}).get("data") or conf.get("dev_file")
        if not where or not isinstance(where, str):
            return None
        try:
            path = _config_path(where)
        except UsageError:
            return None
        if not path.is_file():
            return None
        return _dev_rows(load_file(path))

    # -- analysis ----------------------------------------------------------------

    def analyse(self, name: str, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        """A fusion on labelled rows, member by member (``llmos eval`` on a fusion).

        Every member answers every row once; the strategy then runs over those
        answers (the same decisions it makes when served), so the fusion's
        accuracy, the members it asked per row and the time that took are
        measured together with each member's own accuracy. A member's
        marginal contribution is the fusion's accuracy less that of the same
        fusion without it: re-checked, and re-fitted on its dev rows when it
        was fitted (a fusion of the one member left is that member).
        """
        card = self._registry.store.get(name)
        if card.format != ModelFormat.FUSION:
            raise UsageError(f"{card.ref!r} is not a fusion (its format is {card.format})")
        conf = self._conf(card)
        registered = self.strategy(conf.get("strategy", ""))
        spec = registered.spec
        members = self.members_of(card)
        options = self._served_options(card, spec, members)
        checked = _dev_rows(rows)
        texts = [r["text"] for r in checked]
        gold = [r["label"] for r in checked]
        outputs, seconds = self.member_outputs(members, texts)
        # a router's embedder answers each row once for the fusion and every ablation
        helper = HelperMemo(self._caller)
        fused, asked = offline_results(
            self._caller, spec, members, options, texts, outputs, seconds, helper
        )

        def accuracy(results: Sequence[Any]) -> float:
            return combine.accuracy([r.label for r in results], gold)

        fusion_accuracy = accuracy(fused)
        member_accuracy = [accuracy(o) for o in outputs]
        refit_rows = self._fit_rows(conf) if "fit" in conf or conf.get("dev_file") else None
        refit_outputs = None
        if refit_rows is not None:
            refit_outputs, _ = self.member_outputs(members, [r["text"] for r in refit_rows])
        contributions: dict[str, Any] = {}
        for index, member in enumerate(members):
            rest = [j for j in range(len(members)) if j != index]
            if len(rest) == 1:
                without, how = member_accuracy[rest[0]], "the other member alone"
            else:
                try:
                    without, how = self._ablated(
                        registered, conf, members, rest, texts, outputs, seconds,
                        refit_rows, refit_outputs, accuracy, helper,
                    )  # fmt: skip
                except LlmosError as exc:
                    contributions[member.ref] = {"marginal": None, "why": exc.message}
                    continue
            contributions[member.ref] = {
                "accuracy_without": without,
                "marginal": fusion_accuracy - without,
                "how": how,
            }
        rows_n = len(gold)
        calls = sum(len(a) for a in asked)
        seconds_used = sum(seconds[m] for a in asked for m in a)
        best = max(range(len(members)), key=lambda i: (member_accuracy[i], -seconds[i]))
        return {
            "fusion": card.ref,
            "strategy": spec.name,
            "rows": rows_n,
            "accuracy": fusion_accuracy,
            "members": [
                {
                    "model": m.ref,
                    "accuracy": member_accuracy[i],
                    "seconds_per_row": seconds[i],
                    "asked_share": sum(i in a for a in asked) / rows_n,
                    **contributions[m.ref],
                }
                for i, m in enumerate(members)
            ],
            "member_calls": calls,
            "member_calls_if_all": rows_n * len(members),
            "calls_saved_share": 1 - calls / (rows_n * len(members)),
            "seconds": seconds_used,
            "seconds_if_all": sum(seconds) * rows_n,
            "time_saved_share": 1 - seconds_used / (sum(seconds) * rows_n) if sum(seconds) else 0.0,
            "member_calls_per_row": calls / rows_n,
            "best_member": {
                "model": members[best].ref,
                "accuracy": member_accuracy[best],
                "seconds": seconds[best] * rows_n,
                "accuracy_kept": fusion_accuracy / member_accuracy[best]
                if member_accuracy[best]
                else None,
                # the rows the fusion still sent to it, and its time against it alone
                "asked_share": sum(best in a for a in asked) / rows_n,
                "time_ratio": seconds_used / (seconds[best] * rows_n) if seconds[best] else None,
            },
        }

    def _ablated(
        self,
        registered: Registered[FusionStrategySpec],
        conf: Mapping[str, Any],
        members: Sequence[Member],
        rest: Sequence[int],
        texts: Sequence[str],
        outputs: Sequence[Sequence[Any]],
        seconds: Sequence[float],
        refit_rows: Sequence[Mapping[str, Any]] | None,
        refit_outputs: Sequence[Sequence[Any]] | None,
        accuracy: Any,
        helper: Helper,
    ) -> tuple[float, str]:
        """The fusion's accuracy without the members not in ``rest``."""
        spec = registered.spec
        kept = [members[j] for j in rest]
        given = dict(conf.get("given") or {})
        n = len(members)
        for key, value in list(given.items()):
            # per-member lists (weights) lose the member's entry
            if isinstance(value, list) and len(value) == n:
                given[key] = [value[j] for j in rest]
        options = self._check_options(registered, given, kept)
        how = "re-checked without it"
        if spec.fit is not None and refit_rows is not None and refit_outputs is not None:
            gold = [r["label"] for r in refit_rows]
            data = FitData(
                texts=[r["text"] for r in refit_rows],
                gold=gold,
                outputs=[[dict(r.scores) for r in refit_outputs[j]] for j in rest],
                seconds=[seconds[j] for j in rest],
                members=[m.card for m in kept],
                options=options,
                helper=helper,
            )
            options = {**options, **spec.fit(data)}
            how = "re-fitted on its dev rows without it"
        elif spec.fit_required(options):
            raise UsageError("its dev rows are gone: it cannot be re-fitted without the member")
        results, _ = offline_results(
            self._caller,
            spec,
            kept,
            options,
            texts,
            [outputs[j] for j in rest],
            [seconds[j] for j in rest],
            helper,
        )
        return accuracy(results), how

    def _served_options(
        self, card: ModelCard, spec: FusionStrategySpec, members: Sequence[Member]
    ) -> dict[str, Any]:
        """The options a loaded fusion runs with (a config fusion's fit included)."""
        conf = self._conf(card)
        options = dict(conf.get("options") or {})
        dev_file = conf.get("dev_file")
        if dev_file is not None and "fit" not in conf:
            options = self._fit_from_file(card, spec, members, options, dev_file)
        elif spec.fit_required(options) and "fit" not in conf:
            raise ConfigError(
                f"{card.ref!r}: strategy {spec.name!r} learns from dev data, and this fusion"
                " was never fitted; recreate it with dev data"
            )
        return options

    # -- merging ---------------------------------------------------------------

    def _merge(
        self,
        name: str,
        registered: Registered[FusionStrategySpec],
        members: Sequence[Member],
        options: Mapping[str, Any],
        description: str,
        tags: Sequence[str],
        created_by: str | None,
    ) -> ModelCard:
        spec = registered.spec
        assert spec.merge is not None
        policy = self._registry.policy
        paths = []
        for member in members:
            if not member.card.source:
                raise UsageError(f"member {member.ref!r} has no weights on disk to merge")
            paths.append(Path(check_source(member.card.source, policy).path))
        base = base_path = None
        if members[0].card.format == ModelFormat.ADAPTER and members[0].card.parents:
            base = self._registry.store.get(members[0].card.parents[0])
            if base.source:
                base_path = Path(check_source(base.source, policy).path)
        scratch = Path(tempfile.mkdtemp(prefix="merge-", dir=self._scratch()))
        try:
            output = scratch / "output"
            output.mkdir()
            request = MergeRequest(
                name=name,
                members=[m.card for m in members],
                member_paths=paths,
                options=options,
                output_dir=output,
                base=base,
                base_path=base_path,
            )
            try:
                made = spec.merge(request)
            except LlmosError:
                raise
            except Exception as exc:
                raise PluginError(
                    f"fusion strategy {spec.name!r} (plugin {registered.plugin}) failed"
                    f" merging: {type(exc).__name__}: {exc}"
                ) from exc
            check_artifact(output, policy.allow_pickle)
            inner = ""
            if made.source:
                made_at = Path(made.source).resolve()
                if made_at.is_relative_to(output.resolve()):
                    inner = made_at.relative_to(output.resolve()).as_posix()
                    inner = "" if inner == "." else inner
            # the artifact store: the data folder's artifacts/, or a cluster's shared root
            address = store_of(policy, self._config.home).put(output, name)
            source = f"{address}/{inner}" if inner else address
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        card = attrs.evolve(
            made,
            name=name,
            version=None,
            source=str(source),
            parents=made.parents or ((base.ref,) if base is not None else ()),
            description=description
            or f"{spec.name} of {', '.join(m.ref for m in members)} in weight space",
            tags=tuple(dict.fromkeys((*made.tags, "fusion", spec.name, *tags))),
            options={
                **made.options,
                "merge": {
                    "strategy": spec.name,
                    "members": [m.ref for m in members],
                    "options": dict(options),
                },
            },
        )
        stored = self._registry.register(card, created_by)
        log.info("fusion.merged", model=stored.ref, members=[m.ref for m in members])
        return stored

    def _scratch(self) -> Path:
        folder = self._config.home / "fusions"
        folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        return folder

    # -- config ----------------------------------------------------------------

    def sync_config(self) -> list[str]:
        """Register the ``[fusions.NAME]`` tables (unchanged ones are not
        registered again); fitting waits for the first load. A bad table is
        logged and skipped: it fails its own requests, not the daemon."""
        done = []
        for name, table in self._config.section("fusions").items():
            try:
                done.append(self._from_table(name, table).ref)
            except LlmosError as exc:
                log.error("fusion.config_refused", fusion=name, error=exc.message)
        return done

    def _from_table(self, name: str, table: Any) -> ModelCard:
        where = f"[fusions.{name}]"
        table = check_table(where, table, _TABLE_KEYS)
        if "strategy" not in table or "members" not in table:
            raise ConfigError(f"{where}: strategy and members are required")
        dev = table.get("dev")
        if dev is not None and not isinstance(dev, str):
            raise ConfigError(f"{where}: dev is the path of a labelled data file")
        try:
            card = self.create(
                name,
                strategy=table["strategy"],
                members=table["members"],
                options=_strategy_options(table.get("options"), where),
                description=str(table.get("description", "")),
                tags=tuple(table.get("tags", ())),
                created_by="config",
                if_changed=True,
                dev_file=dev,
            )
        except UsageError as exc:
            raise ConfigError(f"{where}: {exc.message}") from exc
        return card

    # -- loading ---------------------------------------------------------------

    def load(self, request: LoadRequest) -> FusedModel:
        """The provider's ``load``: a fusion card becomes a model whose calls
        ask its members through ``request.models``."""
        card = request.card
        models = request.models
        if models is None:
            raise ConfigError(f"fusion {card.ref!r}: the kernel gave no way to call its members")
        conf = self._conf(card)
        registered = self.strategy(conf.get("strategy", ""))
        spec = registered.spec
        if spec.combine is None:
            raise ConfigError(f"{card.ref!r}: strategy {spec.name!r} makes models, it serves none")
        members = self.members_of(card)
        options = self._served_options(card, spec, members)
        capabilities = set(spec.capabilities) - {Capability.STREAM}
        for member in members:
            capabilities &= set(models.capabilities(member.ref))
        if capabilities & {Capability.COMPLETE, Capability.CHAT}:
            capabilities.add(Capability.STREAM)  # the whole answer as one chunk
        if not capabilities:
            raise LlmosError(
                f"fusion {card.ref!r}: its members share none of what strategy {spec.name!r}"
                f" serves ({', '.join(sorted(spec.capabilities))})"
            )
        return FusedModel(
            models,
            card,
            served_strategy(spec, options),
            members,
            options,
            frozenset(capabilities),
            max_batch_size=self._models.defaults.max_batch_size,
        )

    def _fit_from_file(
        self,
        card: ModelCard,
        spec: FusionStrategySpec,
        members: Sequence[Member],
        options: dict[str, Any],
        dev_file: str,
    ) -> dict[str, Any]:
        """A config fusion's fit, cached by data and options under LLMOS_HOME."""
        rows = load_file(_config_path(dev_file))
        key = hashlib.sha256(
            json.dumps(
                # FIT_VERSION: a fit cached before the dev guard is made again
                [
                    card.ref,
                    spec.name,
                    options,
                    [m.ref for m in members],
                    _rows_hash(rows),
                    FIT_VERSION,
                ],
                sort_keys=True,
                default=str,
            ).encode()
        ).hexdigest()[:16]
        cache = (
            self._scratch() / f"fit-{validate_model_name(card.name).replace('/', '--')}-{key}.json"
        )
        with self._fit_lock:
            if cache.is_file():
                return dict(json.loads(cache.read_text())["options"])
            fitted, record, scores = self.fit(spec, members, options, rows)
            cache.write_text(json.dumps({"options": fitted, "fit": record, "scores": scores}))
        return fitted


def _paired_se(a_right: Sequence[bool], b_right: Sequence[bool]) -> float:
    """The standard error of accuracy(a) - accuracy(b) on the same rows: from
    the rows only one of them got right (0 when they agree everywhere)."""
    n = len(a_right)
    diff = [int(a) - int(b) for a, b in zip(a_right, b_right, strict=True)]
    mean = sum(diff) / n
    variance = max(0.0, sum(d * d for d in diff) / n - mean * mean)
    return math.sqrt(variance / n)


def _folds(gold: Sequence[str], count: int) -> list[int]:
    """Each row's fold of ``count``: every label's rows shuffled (a fixed
    seed: the same split for the same rows) and dealt round the folds in
    turn, so that each fold holds every label in its share and the folds
    differ in size by a row at most."""
    by_label: dict[str, list[int]] = {}
    for row, label in enumerate(gold):
        by_label.setdefault(label, []).append(row)
    shuffle = random.Random(0).shuffle
    fold = [0] * len(gold)
    dealt = 0
    for label in sorted(by_label):
        rows = by_label[label]
        shuffle(rows)
        for row in rows:
            fold[row] = dealt % count
            dealt += 1
    return fold


def _config_path(text: str) -> Path:
    """A dev file named in ``[fusions.NAME] dev``: the operator's own config, so
    ``~`` is the daemon's home as they mean it; an unknown ``~user`` or a NUL
    is a :class:`UsageError` saying so, not a RuntimeError from pathlib."""
    if not isinstance(text, str) or not text or "\x00" in text:
        raise UsageError(f"dev file {text!r} is not a path", param="dev")
    try:
        return Path(text).expanduser()
    except RuntimeError:  # "Could not determine home directory."
        raise UsageError(
            f"dev file {text!r}: cannot expand {text.split('/')[0]!r} (no such user);"
            " give the full path",
            param="dev",
        ) from None


def _dev_rows(dev: Sequence[Mapping[str, Any]]) -> list[dict[str, str]]:
    if isinstance(dev, str | bytes) or not isinstance(dev, Sequence):
        raise UsageError("dev must be a list of {text, label} rows", param="dev")
    if len(dev) > MAX_FIT_ROWS:
        raise UsageError(
            f"dev has {len(dev)} rows; a fusion is fitted on at most {MAX_FIT_ROWS}", param="dev"
        )
    rows = []
    for number, row in enumerate(dev, 1):
        if not isinstance(row, Mapping) or not isinstance(row.get("text"), str):
            raise UsageError(f"dev row {number}: needs a text", param="dev")
        if row.get("label") is None or isinstance(row.get("label"), bool):
            raise UsageError(f"dev row {number}: needs a label", param="dev")
        rows.append({"text": row["text"], "label": str(row["label"])})
    if not rows:
        raise UsageError("dev has no rows", param="dev")
    return rows
