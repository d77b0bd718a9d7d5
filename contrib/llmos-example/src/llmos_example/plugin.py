"""The example plugin: one small, real implementation of every llmos hook.

Copy this module to start a plugin. Each hook is a top-level ``@hookimpl``
function of a few lines; the classes above them exist only where something
holds state (a loaded model, a sink). Sections follow the hook families in
:mod:`llmos.plugin.spec`.

What it adds:

* provider ``example-keyword``: a keyword classifier (capability ``classify``);
* model card ``example/sentiment-keywords`` served by that provider;
* fusion strategy ``example-first-confident``: a cascade over classifiers;
* tuning method ``example-keywords``: learns keyword lists from labelled rows;
* monitor sink ``example-counter``: counts events by kind;
* start-up and shut-down log lines;
* the command ``llmos example keywords TEXT``;
* the route ``GET /example/info``.
"""

from __future__ import annotations

import json
import re
import threading
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import click
import structlog

from llmos.config import Field, Section
from llmos.errors import UsageError
from llmos.plugin import hookimpl
from llmos.registry.store import SQLiteStore
from llmos.replica import Replica
from llmos.types import (
    Capability,
    ClassifyRequest,
    ClassifyResult,
    CommandSpec,
    ExecutorSpec,
    FusionCall,
    FusionStrategySpec,
    LoadedModel,
    LoadRequest,
    ModelBase,
    ModelCard,
    MonitorEvent,
    MonitorSinkSpec,
    PlacementRequest,
    PluginContext,
    ProviderSpec,
    RegistryStoreSpec,
    RouteSpec,
    TuningMethodSpec,
    TuningRequest,
    TuningResult,
    Usage,
)
from llmos_example import __version__

if TYPE_CHECKING:
    from llmos.runtime.kernel import Kernel

#: the plugin's name: its entry-point name in pyproject.toml
PLUGIN = "example"
PROVIDER = "example-keyword"
CARD_NAME = "example/sentiment-keywords"
TASK = "text-classification"

log = structlog.get_logger("llmos.example")

_WORD = re.compile(r"[a-z0-9']+")


def tokens(text: str) -> list[str]:
    """Lower-case words of ``text``: what keywords are matched against."""
    return _WORD.findall(text.lower())


# --------------------------------------------------------------------------
# Model provider: a keyword classifier
# --------------------------------------------------------------------------


class KeywordClassifier(ModelBase):
    """Scores each label by its keyword hits, with add-one smoothing:
    ``(hits[label] + 1) / (total hits + number of labels)``."""

    capabilities = frozenset({Capability.CLASSIFY})
    max_batch_size = 256  # pure Python and cheap: large batches cost nothing

    def __init__(self, card: ModelCard, keywords: Mapping[str, Sequence[str]]) -> None:
        super().__init__(card)
        if not isinstance(keywords, Mapping) or not keywords:
            raise UsageError(
                f"model {card.ref!r}: provider {PROVIDER!r} needs options "
                '{"keywords": {"label": ["word", ...], ...}}'
            )
        self.keywords = {
            str(label): frozenset(tokens(" ".join([words] if isinstance(words, str) else words)))
            for label, words in keywords.items()
        }

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]:
        return [self._classify_one(request) for request in requests]

    def _classify_one(self, request: ClassifyRequest) -> ClassifyResult:
        words = tokens(request.text)
        # Zero-shot labels this model has no keywords for simply get no hits.
        labels = request.labels or tuple(self.keywords)
        hits = {label: sum(w in self.keywords.get(label, ()) for w in words) for label in labels}
        total = sum(hits.values()) + len(labels)
        return ClassifyResult(
            scores={label: (hits[label] + 1) / total for label in labels},
            usage=Usage(prompt_tokens=len(words)),
        )


def load_keyword_classifier(request: LoadRequest) -> KeywordClassifier:
    """The provider's ``load``: keywords come from the card's options, else
    from the ``[plugins.example]`` config table (``request.options``)."""
    card = request.card
    return KeywordClassifier(
        card, card.options.get("keywords", request.options.get("keywords", {}))
    )


@hookimpl
def llmos_register_providers(register: Callable[[ProviderSpec], None]) -> None:
    register(
        ProviderSpec(
            name=PROVIDER,
            load=load_keyword_classifier,
            description="keyword-count text classifier (options: keywords per label)",
            capabilities={Capability.CLASSIFY},
            formats=("other",),
        )
    )


# --------------------------------------------------------------------------
# Model source: one packaged card
# --------------------------------------------------------------------------


def sentiment_card() -> ModelCard:
    """The card this plugin offers: a tiny English sentiment classifier."""
    return ModelCard(
        name=CARD_NAME,
        provider=PROVIDER,
        tasks=(TASK,),
        format="other",
        options={
            "keywords": {
                "positive": ["good", "great", "excellent", "love", "wonderful", "best"],
                "negative": ["bad", "awful", "terrible", "hate", "boring", "worst"],
            }
        },
        description="English sentiment by keyword counts; the llmos-example plugin's model",
        tags=("example",),
        license="Apache-2.0",
    )


@hookimpl
def llmos_discover_models(register: Callable[[ModelCard], None]) -> None:
    register(sentiment_card())


# --------------------------------------------------------------------------
# Fusion strategy: first confident member
# --------------------------------------------------------------------------


#: the options ``example-first-confident`` takes, with their defaults
FIRST_CONFIDENT_DEFAULTS = {"threshold": 0.6}


def check_first_confident(
    options: Mapping[str, Any], members: Sequence[ModelCard]
) -> dict[str, Any]:
    """The strategy's ``check``, run when a fusion is created: refuses what
    ``combine`` could not use and returns the options complete."""
    unknown = sorted(set(options) - set(FIRST_CONFIDENT_DEFAULTS))
    if unknown:
        raise UsageError(
            f"example-first-confident: unknown option(s) {', '.join(unknown)}; known: threshold",
            param=unknown[0],
        )
    if len(members) < 2:
        raise UsageError("example-first-confident: give two or more members, cheapest first")
    threshold = options.get("threshold", FIRST_CONFIDENT_DEFAULTS["threshold"])
    if isinstance(threshold, bool) or not isinstance(threshold, int | float):
        raise UsageError(
            f"example-first-confident: threshold must be a number, got {threshold!r}",
            param="threshold",
        )
    if not 0.0 <= threshold <= 1.0:
        raise UsageError(
            f"example-first-confident: threshold must be in [0, 1], got {threshold}",
            param="threshold",
        )
    return {"threshold": float(threshold)}


def combine_first_confident(call: FusionCall) -> list[ClassifyResult | None]:
    """The strategy's ``combine``: a cascade. Each row gets the first
    member's answer whose top score reaches ``threshold``, else the last
    member's; a member is asked only for the rows every earlier one was
    unsure of. The kernel calls the members (their own workers and batching),
    keeps the request's budget and records who was asked in ``meta``."""
    threshold = float(call.options.get("threshold", FIRST_CONFIDENT_DEFAULTS["threshold"]))
    last = len(call.members) - 1
    answers: dict[int, ClassifyResult] = {}
    by: dict[int, int] = {}
    pending = list(range(len(call.requests)))
    for member in range(last + 1):
        if not pending:
            break
        got = call.ask(member, pending)
        unsure = []
        for row in pending:
            if row not in got:
                # Failed, or the budget ruled this member out: an earlier
                # answer stands; a row with none yet tries the next member.
                if row not in answers:
                    unsure.append(row)
                continue
            answers[row], by[row] = got[row], member
            if member < last and max(got[row].scores.values()) < threshold:
                unsure.append(row)
        pending = unsure
    for row, member in by.items():
        call.note(row, answered_by=call.members[member].ref)
    # A row no member answered stays None: the kernel reports the members' errors.
    return [answers.get(row) for row in range(len(call.requests))]


@hookimpl
def llmos_register_fusion_strategies(register: Callable[[FusionStrategySpec], None]) -> None:
    register(
        FusionStrategySpec(
            name="example-first-confident",
            description="classify with the first member whose top score >= threshold (0.6)",
            capabilities={Capability.CLASSIFY},
            combine=combine_first_confident,
            check=check_first_confident,
        )
    )


# --------------------------------------------------------------------------
# Tuning method: learn keyword lists from labelled rows
# --------------------------------------------------------------------------


def learn_keywords(rows: Sequence[Mapping[str, Any]], top_k: int) -> dict[str, list[str]]:
    """Per label, the ``top_k`` words found in more of its rows than in any
    other label's rows (by that margin, then alphabetically)."""
    counts: dict[str, Counter[str]] = {}
    for row in rows:
        counts.setdefault(str(row["label"]), Counter()).update(set(tokens(str(row["text"]))))
    keywords: dict[str, list[str]] = {}
    for label, counter in sorted(counts.items()):
        margin = {
            word: n - max((c[word] for other, c in counts.items() if other != label), default=0)
            for word, n in counter.items()
        }
        distinctive = [w for w in sorted(margin, key=lambda w: (-margin[w], w)) if margin[w] > 0]
        keywords[label] = distinctive[:top_k]
    return keywords


def accuracy(model: LoadedModel, rows: Sequence[Mapping[str, Any]]) -> float:
    results = model.classify([ClassifyRequest(text=str(row["text"])) for row in rows])
    right = sum(r.label == str(row["label"]) for r, row in zip(results, rows, strict=True))
    return right / len(rows)


def tune_keywords(request: TuningRequest) -> TuningResult:
    """The tuning method's ``run``: rows are ``{"text": ..., "label": ...}``."""
    train = request.data.get("train") or []
    if not train:
        raise UsageError("tuning method 'example-keywords' needs a non-empty 'train' split")
    top_k = int(request.hyperparameters.get("top_k", 10))
    keywords = learn_keywords(train, top_k)
    card = ModelCard(
        name=f"{request.base.name}-tuned",
        provider=PROVIDER,
        tasks=(TASK,),
        format="other",
        options={"keywords": keywords},
        description=f"keywords learnt from {len(train)} rows by llmos-example",
        tags=("example", "tuned"),
        license=request.base.license,
        parents=(request.base.name,),
    )
    model = KeywordClassifier(card, keywords)
    scores = {
        f"{split}/accuracy": accuracy(model, rows)
        for split in ("dev", "test")
        if (rows := request.data.get(split))
    }
    request.report({"step": 1, "train_rows": len(train), **scores})
    return TuningResult(card=attrs.evolve(card, scores=scores), scores=scores)


@hookimpl
def llmos_register_tuning_methods(register: Callable[[TuningMethodSpec], None]) -> None:
    register(
        TuningMethodSpec(
            name="example-keywords",
            run=tune_keywords,
            description="learn the most distinctive words of each label",
            tasks=(TASK,),
            defaults={"top_k": 10},
        )
    )


# --------------------------------------------------------------------------
# Monitor sink: count events by kind
# --------------------------------------------------------------------------


class CounterSink:
    """Counts events by kind in memory; with option ``path`` (relative to the
    data folder), ``close()`` writes the counts there as JSON."""

    def __init__(self, context: PluginContext) -> None:
        path = context.options.get("path")
        self.path = context.home / Path(path).expanduser() if path else None
        self._counts: Counter[str] = Counter()
        # emit() runs on the bus's dispatcher thread, counts() on any other.
        self._lock = threading.Lock()

    def emit(self, event: MonitorEvent) -> None:
        with self._lock:
            self._counts[event.kind] += 1

    def counts(self) -> dict[str, int]:
        with self._lock:
            return dict(self._counts)

    def close(self) -> None:
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.write_text(json.dumps(self.counts(), indent=2, sort_keys=True) + "\n")


@hookimpl
def llmos_register_monitor_sinks(register: Callable[[MonitorSinkSpec], None]) -> None:
    register(
        MonitorSinkSpec(
            name="example-counter",
            create=CounterSink,
            description="counts events by kind (option path: write them as JSON on close)",
        )
    )


# --------------------------------------------------------------------------
# Registry store: the kernel's SQLite store, every write audited
# --------------------------------------------------------------------------

#: the RegistryStore methods that change the registry
_WRITES = frozenset(
    {
        "register",
        "register_many",
        "set_alias",
        "remove_alias",
        "tag",
        "untag",
        "set_description",
        "deprecate",
        "delete",
    }
)


class AuditedStore:
    """A registry store that is the kernel's SQLite store, but sends every
    write to the monitor as a ``registry.write`` event (which operation, on
    what): an audit trail in every sink. ``[registry] store =
    "example-audited"`` selects it."""

    def __init__(self, context: PluginContext) -> None:
        self._inner = SQLiteStore(context.home / "registry.db")
        self._emit = context.emit

    def __getattr__(self, name: str) -> Any:
        method = getattr(self._inner, name)
        if name not in _WRITES:
            return method

        def write(*args: Any, **kwargs: Any) -> Any:
            result = method(*args, **kwargs)
            what = args[0] if args and isinstance(args[0], str) else None
            self._emit(MonitorEvent(kind="registry.write", model=what, fields={"operation": name}))
            return result

        return write


@hookimpl
def llmos_register_registry_stores(register: Callable[[RegistryStoreSpec], None]) -> None:
    register(
        RegistryStoreSpec(
            name="example-audited",
            create=AuditedStore,
            description="the SQLite registry, every write sent to the monitor (registry.write)",
        )
    )


# --------------------------------------------------------------------------
# Executor: where models run ([runtime] executor = "example-replicas")
# --------------------------------------------------------------------------


class ExampleReplica(Replica):
    """A :class:`Replica` that reports its state (``DispatchingModel.health``,
    which ``llmos top`` shows): a cluster executor would ask its nodes."""

    def __init__(
        self, request: PlacementRequest, *, home: Path, emit: Callable[[MonitorEvent], None]
    ) -> None:
        super().__init__(request, home=home, emit=emit)
        self.closed = False

    def health(self) -> dict[str, Any]:
        state = "STOPPED" if self.closed else "RUNNING"
        return {
            "status": "STOPPED" if self.closed else "HEALTHY",
            "replicas": {state: 1},
            "queued": self.queued,
        }

    def close(self) -> None:
        self.closed = True
        super().close()


class ReplicaExecutor:
    """Each placed model gets a replica of its own in this process: the model
    loaded again by :class:`llmos.replica.Replica` through the provider the
    request names (found by entry points, as a cluster node would), behind
    its own worker with the kernel's batching. A cluster executor runs the
    same :class:`Replica` on its nodes and relays calls to it."""

    def __init__(self, context: PluginContext) -> None:
        self._home = context.home / "example-replicas"
        self._emit = context.emit
        self._replicas: list[Replica] = []

    def place(self, request: PlacementRequest) -> ExampleReplica:
        replica = ExampleReplica(request, home=self._home, emit=self._emit)
        self._replicas.append(replica)
        return replica

    def close(self) -> None:
        self._replicas.clear()  # each was closed when the kernel unloaded its model


@hookimpl
def llmos_register_executors(register: Callable[[ExecutorSpec], None]) -> None:
    register(
        ExecutorSpec(
            name="example-replicas",
            create=ReplicaExecutor,
            description="each placed model a replica of its own in this process",
        )
    )


# --------------------------------------------------------------------------
# Config: an [example] section, checked by the kernel like its own
# --------------------------------------------------------------------------

#: ``[example]`` in llmos.toml; read as ``kernel.config.section("example")``
CONFIG = Section(
    "example",
    {
        "motd": Field("str", "", "A line GET /example/info returns (who runs this daemon, say)."),
    },
    doc="The llmos-example plugin.",
)


@hookimpl
def llmos_register_config(register: Callable[[Section], None]) -> None:
    register(CONFIG)


# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


@hookimpl
def llmos_startup(kernel: Kernel) -> None:
    log.info("example.started", plugin=PLUGIN, home=str(kernel.home))


@hookimpl
def llmos_shutdown(kernel: Kernel) -> None:
    log.info("example.stopped", plugin=PLUGIN, home=str(kernel.home))


# --------------------------------------------------------------------------
# Extension: a CLI command and an HTTP route
# --------------------------------------------------------------------------


@click.group(name="example")
def example_group() -> None:
    """Commands of the llmos-example plugin."""


@example_group.command("keywords")
@click.argument("text")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def keywords_command(text: str, as_json: bool) -> None:
    """Score TEXT with the example/sentiment-keywords model."""
    card = sentiment_card()
    result = load_keyword_classifier(LoadRequest(card=card)).classify([ClassifyRequest(text=text)])[
        0
    ]
    if as_json:
        data = {"model": card.name, "label": result.label, "scores": dict(result.scores)}
        click.echo(json.dumps(data))
        return
    click.echo(f"{card.name}: {result.label}")
    for label, score in sorted(result.scores.items(), key=lambda item: -item[1]):
        click.echo(f"  {label:<10} {score:.3f}")


@hookimpl
def llmos_register_commands(register: Callable[[CommandSpec], None]) -> None:
    register(CommandSpec(command=example_group))


@hookimpl
def llmos_register_routes(register: Callable[[RouteSpec], None], kernel: Kernel) -> None:
    # FastAPI is imported here, not at the top, so that CLI commands (which
    # load every plugin) do not pay for it.
    from fastapi import APIRouter

    router = APIRouter(tags=["example"])
    motd = kernel.config.section(CONFIG.name)["motd"]

    @router.get("/info")
    def info() -> dict[str, Any]:
        return {"plugin": PLUGIN, "version": __version__, "providers": [PROVIDER], "motd": motd}

    register(RouteSpec(router=router, prefix="/example"))
