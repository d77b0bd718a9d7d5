"""The Kernel: config + plugins + monitor bus, with a start/stop lifecycle.

The daemon and the CLI both build one :class:`Kernel`. Later subsystems (the
registry, model loading and batching, fusion, tuning) hang off it, so that a
plugin handed the kernel in ``llmos_startup`` or ``llmos_register_routes``
reaches all of them through one object.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import enum
import os
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog

from llmos.config import Config, Section, load_config
from llmos.errors import ConfigError, LlmosError, PluginError, RequestTimeout
from llmos.fusion import service as fusion_service
from llmos.fusion.service import Fusions
from llmos.monitor import alerts
from llmos.monitor.bus import EventBus
from llmos.monitor.service import Monitor
from llmos.plugin.manager import KERNEL_OWNER, PluginManager
from llmos.registry import sources
from llmos.registry.service import DiscoverReport, Providers, Registry
from llmos.registry.sources import policy_from_config
from llmos.registry.store import RegistryStore
from llmos.runtime import limits, models, router
from llmos.runtime.models import ModelManager, Worker
from llmos.runtime.router import Router
from llmos.tuning import jobs
from llmos.tuning.jobs import JobManager
from llmos.tuning.worker import WorkerPayload
from llmos.types import (
    Capability,
    ChunkStream,
    DispatchingModel,
    Executor,
    JobHandle,
    MonitorEvent,
    MonitorSink,
    PlacementRequest,
    PluginContext,
)

log = structlog.get_logger("llmos.kernel")

#: the config sections the kernel's own subsystems read; plugins add theirs
#: (``llmos_register_config``), and [server] and [plugins] are always there
KERNEL_SECTIONS: tuple[Section, ...] = (
    models.RUNTIME_SECTION,
    models.MODELS_SECTION,
    limits.SECTION,
    router.SECTION,
    sources.SECTION,
    sources.ARTIFACTS_SECTION,
    jobs.SECTION,
    fusion_service.SECTION,
    alerts.MONITOR_SECTION,
    alerts.ALERTS_SECTION,
)


class KernelState(enum.StrEnum):
    CREATED = "created"
    STARTING = "starting"
    READY = "ready"
    DRAINING = "draining"
    STOPPED = "stopped"


class Kernel:
    """One llmos kernel: its config, its plugins, its monitor bus."""

    def __init__(self, config: Config, plugins: PluginManager | None = None) -> None:
        self._config = config
        self._config_lock = threading.RLock()
        self.plugins = plugins if plugins is not None else PluginManager(config.plugins)
        self.plugins.reserve("config_sections", KERNEL_SECTIONS)
        # Models made of models are served by providers of the kernel's own,
        # found like any plugin's: a fusion card, a [groups.NAME] table.
        self.plugins.reserve(
            "providers",
            (
                fusion_service.provider_spec(lambda: self.fusions),
                router.provider_spec(lambda: self.router),
            ),
        )
        #: the installed providers (the kernel's own among them), their options,
        #: and the executors whose tables a card's options may carry
        self._providers = Providers(
            lambda: self.load_plugins().providers,
            self.plugin_options,
            lambda: self.load_plugins().executors.keys(),
        )
        self.bus = EventBus()
        self._state = KernelState.CREATED
        self._lock = threading.Lock()
        self._registry: Registry | None = None
        self._models: ModelManager | None = None
        self._jobs: JobManager | None = None
        self._fusions: Fusions | None = None
        self._router: Router | None = None
        self._monitor: Monitor | None = None
        #: executors models were placed on, by name (created on first use)
        self._executors: dict[str, Executor] = {}
        self._executors_lock = threading.Lock()
        self._stopping = threading.Event()

    @classmethod
    def from_config(
        cls,
        paths: Sequence[str | os.PathLike[str]] = (),
        overrides: Sequence[str] = (),
        env: Mapping[str, str] | None = None,
    ) -> Kernel:
        """Compose the config (files, environment, ``--set``) and build a
        kernel; its plugins are loaded and the whole config checked here, so
        that a bad config fails at once, every error listed."""
        kernel = cls(load_config(paths, overrides, env, sections=KERNEL_SECTIONS))
        kernel.config  # noqa: B018 — loads plugins, checks their sections
        return kernel

    @property
    def config(self) -> Config:
        """The effective config, every section checked: the kernel's and
        those of its plugins, which are loaded for it on first use.

        :raises ConfigError: a value is wrong, or a table no section claims.
        """
        config = self._config
        if config.final:
            return config
        with self._config_lock:
            if not self._config.final:
                self.plugins.load()
                sections = [r.spec for r in self.plugins.config_sections.values()]
                self._config = self._config.complete([*KERNEL_SECTIONS, *sections])
            return self._config

    @property
    def state(self) -> KernelState:
        return self._state

    @property
    def ready(self) -> bool:
        return self._state is KernelState.READY

    @property
    def home(self) -> Path:
        """The data folder (``LLMOS_HOME``); created on start."""
        return self.config.home

    @property
    def registry(self) -> Registry:
        """The model registry in the data folder (opened on first use)."""
        with self._lock:
            if self._registry is None:
                # Cards are checked by their providers as they are registered.
                self._registry = Registry(
                    self._open_registry_store(),
                    policy_from_config(self.config),
                    self.home,
                    self._providers,
                )
            return self._registry

    @property
    def models(self) -> ModelManager:
        """Loaded models: resolution, lazy loading, batching workers."""
        with self._lock:
            if self._models is None:
                self._models = ModelManager(
                    self.config,
                    lambda: self.registry,
                    self._providers,
                    self,
                    self.emit,
                    self._place,
                )
            return self._models

    @property
    def jobs(self) -> JobManager:
        """Tuning jobs: the queue in the data folder and their worker processes."""
        with self._lock:
            if self._jobs is None:
                self._jobs = JobManager(
                    self.config,
                    lambda: self.registry,
                    self.load_plugins,
                    self.emit,
                    self._start_job,
                )
            return self._jobs

    @property
    def monitor(self) -> Monitor:
        """Metric windows, alert rules, accuracy checks (fed by the bus)."""
        with self._lock:
            if self._monitor is None:
                self._monitor = Monitor(
                    self.config,
                    self.bus,
                    self,
                    lambda: self.models.loaded(),
                    lambda ref: self.registry.store.get(ref),
                    lambda: self.load_plugins().providers,
                )
                self.bus.observers.append(self._monitor.windows.observe)
            return self._monitor

    @property
    def fusions(self) -> Fusions:
        """Fusions: created, fitted, registered, and loaded as models."""
        if self._fusions is None:
            registry, models = self.registry, self.models  # each takes the lock
            with self._lock:
                if self._fusions is None:
                    self._fusions = Fusions(
                        self.config,
                        registry,
                        models,
                        self,
                        lambda: self.load_plugins().fusion_strategies,
                    )
        return self._fusions

    @property
    def router(self) -> Router:
        """Deployment groups (``[groups.NAME]``): retries, fallbacks, cooldowns."""
        with self._lock:
            if self._router is None:
                self._router = Router(self.config.section("groups"), self.submit, self.emit)
            return self._router

    @property
    def request_timeout(self) -> float:
        return float(self.config.section("runtime").get("request_timeout_s", 300.0))

    def submit(
        self, model: str, capability: Capability, requests: Sequence[Any]
    ) -> concurrent.futures.Future[list[Any]]:
        """Queue one caller's requests for ``model`` (loading it on first use);
        a deployment group routes them to one of its deployments."""
        return self._worker(model).submit(Capability(capability), requests)

    def call(
        self,
        model: str,
        capability: Capability,
        requests: Sequence[Any],
        timeout: float | None = None,
    ) -> list[Any]:
        """Run ``requests`` on ``model`` and wait for the results (sync callers)."""
        future = self.submit(model, capability, requests)
        try:
            return future.result(timeout or self.request_timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise RequestTimeout(
                f"{capability} on {model!r} took longer than {timeout or self.request_timeout} s"
            ) from None

    async def acall(
        self,
        model: str,
        capability: Capability,
        requests: Sequence[Any],
        timeout: float | None = None,
        timing: dict[str, float] | None = None,
    ) -> list[Any]:
        """:meth:`call` for asyncio: a cancelled caller (a client that went
        away) takes its requests out of the queue. ``timing``, when given, is
        filled with the call's queue wait, model time and batch size, and the
        time spent loading the model (``load_s``) when this call waited for a
        load."""
        loading: dict[str, float] = {}
        worker = self.models.peek(model) or await asyncio.to_thread(
            self.models.get, model, timing=loading
        )
        future = worker.submit(Capability(capability), requests)
        limit = timeout or self.request_timeout
        try:
            results = await asyncio.wait_for(asyncio.wrap_future(future), limit)
        except TimeoutError:
            raise RequestTimeout(f"{capability} on {model!r} took longer than {limit} s") from None
        if timing is not None:
            timing.update(getattr(future, "timing", {}))
            timing.update(loading)
        return results

    def stream(self, model: str, request: Any) -> ChunkStream:
        """Start streaming one request; iterate the handle, cancel it to stop
        (a :class:`~llmos.runtime.worker.StreamHandle`)."""
        return self._worker(model).submit_stream(request)

    def capabilities(self, model: str) -> frozenset[Capability]:
        """What ``model`` serves (loading it on first use)."""
        return frozenset(self._worker(model).model.capabilities)

    def _worker(self, model: str) -> Worker:
        return self.models.peek(model) or self.models.get(model)

    def discover_models(self) -> DiscoverReport:
        """Register the cards model-source plugins offer (unchanged ones are skipped)."""
        report = self.registry.discover(self.load_plugins().discover_models())
        log.info("registry.discovered", **report.to_dict())
        return report

    def plugin_options(self, plugin: str) -> Mapping[str, Any]:
        """The ``[plugins.<plugin>]`` table of the config, or ``{}``."""
        return self.config.plugin_options(plugin)

    def load_plugins(self) -> PluginManager:
        """Load plugins (idempotent); enough for commands that need no start."""
        self.plugins.load()
        return self.plugins

    def start(self) -> None:
        """Load plugins, open sinks, run ``llmos_startup``; then ready."""
        with self._lock:
            if self._state is not KernelState.CREATED:
                return
            self._state = KernelState.STARTING
        try:
            self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
            self.load_plugins()
            self._check_executor()
            self.bus.sinks = self._create_sinks()
            self.monitor  # noqa: B018 — created before the first event
            self.bus.start()
            self.plugins.startup(self)
            self.discover_models()
            self.fusions.sync_config()
            self._check_groups()
            self._start_janitor()
            self._start_preload()
            self.monitor.start()
            if self._jobs is not None and self._jobs.adopt:
                # The daemon: queued jobs run, jobs a killed kernel left resume.
                self._jobs.start()
        except BaseException:
            # Strict mode, or an unwritable home: leave nothing running behind.
            self._state = KernelState.STOPPED
            self.bus.stop()
            raise
        with self._lock:
            # A drain that began while plugins were starting stands.
            if self._state is KernelState.STARTING:
                self._state = KernelState.READY
        failed = [p.name for p in self.plugins.failed()]
        if all(r.plugin == KERNEL_OWNER for r in self.plugins.providers.values()):
            # `pip install llmos` alone serves no model: say so once, with what to install.
            log.warning(
                "kernel.no_provider",
                hint="no model provider is installed, so no model can be served:"
                " `pip install llmos-transformers` (local Hugging Face models and GGUF files),"
                " llmos-vllm (vLLM) or llmos-openai (OpenAI-compatible servers);"
                " `llmos plugins` lists what is loaded",
            )
        log.info(
            "kernel.ready",
            home=str(self.home),
            plugins=[p.name for p in self.plugins.plugins() if p.status == "loaded"],
            failed=failed,
        )
        self.emit(MonitorEvent(kind="kernel.started", fields={"failed_plugins": failed}))

    def _check_groups(self) -> None:
        """A bad ``[groups.NAME]`` is logged at start; its own calls fail with the reason."""
        for name in self.config.section("groups"):
            try:
                self.router.group(name)
            except LlmosError as exc:
                log.error("router.config_refused", group=name, error=exc.message)

    def begin_drain(self) -> None:
        """Stop taking new work; what is in flight may finish."""
        with self._lock:
            if self._state in (KernelState.READY, KernelState.STARTING):
                self._state = KernelState.DRAINING
                log.info("kernel.draining")

    def stop(self) -> None:
        """Run ``llmos_shutdown`` and close the sinks."""
        with self._lock:
            previous, self._state = self._state, KernelState.STOPPED
        if previous in (KernelState.CREATED, KernelState.STOPPED):
            if previous is KernelState.CREATED and self._jobs is not None:
                self._jobs.stop()  # jobs submitted to a kernel never started still ran
            return
        self.emit(MonitorEvent(kind="kernel.stopped"))
        self._stopping.set()
        if self._models is not None:
            self._models.close()
        self._close_executors()
        if self._jobs is not None:
            self._jobs.stop()
        self.plugins.shutdown(self)
        if self._monitor is not None:
            self._monitor.stop()
        self.bus.stop()
        if self._registry is not None:
            self._registry.close()
        log.info("kernel.stopped")

    def _start_janitor(self) -> None:
        """Unload models idle past ``runtime.idle_unload_s`` (when set)."""
        idle = float(self.config.section("runtime").get("idle_unload_s", 0.0))
        if not idle:
            return

        def sweep() -> None:
            while not self._stopping.wait(min(max(idle / 2, 0.05), 30.0)):
                self.models.unload_idle()

        threading.Thread(target=sweep, name="llmos-janitor", daemon=True).start()

    def _start_preload(self) -> None:
        """Load ``runtime.preload`` models in a thread; a failure is logged."""
        names = list(self.config.section("runtime").get("preload", ()))
        if not names:
            return

        def preload() -> None:
            for name in names:
                if self._stopping.is_set():
                    return
                try:
                    self.models.get(name)
                except LlmosError as exc:
                    log.error("runtime.preload_failed", model=name, error=exc.message)

        threading.Thread(target=preload, name="llmos-preload", daemon=True).start()

    def emit(self, event: MonitorEvent) -> None:
        """Send a monitor event to every sink; never blocks, never raises."""
        self.bus.emit(event)

    def context(self, plugin: str) -> PluginContext:
        """What the factory of a service ``plugin`` registered is handed."""
        self.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return PluginContext(
            options=self.plugin_options(plugin),
            home=self.home,
            emit=self.emit,
            bus_health=self.bus.health,
        )

    def _open_registry_store(self) -> RegistryStore:
        """The store ``[registry] store`` names, opened by the plugin that registers it."""
        name = self.config.section("registry")["store"]
        registered = self.load_plugins().registry_stores.get(name)
        if registered is None:
            known = ", ".join(sorted(self.plugins.registry_stores)) or "none"
            raise ConfigError(
                f"[registry] store = {name!r}: no loaded plugin registers a registry store of"
                f" that name (registered: {known}); install or enable the plugin that"
                ' provides it, or set store = "sqlite"',
                param="registry.store",
            )
        try:
            return registered.spec.create(self.context(registered.plugin))
        except LlmosError:
            raise
        except Exception as exc:
            raise PluginError(
                f"registry store {name!r} of plugin {registered.plugin!r} failed to open:"
                f" {type(exc).__name__}: {exc}"
            ) from exc

    def _check_executor(self) -> None:
        """``[runtime] executor`` and ``[tuning] executor`` must name ``local``
        or an executor a loaded plugin registers: a daemon that would fail
        every call (or every job) does not start."""
        for section in ("runtime", "tuning"):
            name = self.config.section(section).get("executor", models.LOCAL)
            if name != models.LOCAL and name not in self.plugins.executors:
                raise self._unknown_executor(name, f"{section}.executor")

    def _unknown_executor(self, name: str, param: str) -> ConfigError:
        known = ", ".join([models.LOCAL, *sorted(self.plugins.executors)])
        return ConfigError(
            f"executor {name!r}: no loaded plugin registers an executor of that name"
            f" (executors: {known}); install or enable the plugin that provides it,"
            ' or set executor = "local"',
            param=param,
        )

    def executor(self, name: str) -> Executor:
        """The executor ``name`` (``[runtime] executor``, a deployment's
        ``executor``), created with its plugin's context the first time it is
        asked for — by this call or by a model placed on it — and closed at stop.

        :raises ConfigError: no loaded plugin registers an executor ``name``
            (the error lists those that do), or ``name`` is ``local``, the
            kernel's own worker threads, which no executor object stands for.
        :raises PluginError: the executor's ``create`` failed.
        """
        if name == models.LOCAL:
            raise ConfigError(
                f"executor {models.LOCAL!r} is the kernel's own worker threads, not an executor"
                " a plugin creates; name one a plugin registers"
                f" (executors: {', '.join(sorted(self.load_plugins().executors)) or 'none'})",
                param="executor",
            )
        with self._executors_lock:
            executor = self._executors.get(name)
            if executor is None:
                registered = self.load_plugins().executors.get(name)
                if registered is None:
                    raise self._unknown_executor(name, "executor")
                try:
                    executor = registered.spec.create(self.context(registered.plugin))
                except LlmosError:
                    raise
                except Exception as exc:
                    raise PluginError(
                        f"executor {name!r} of plugin {registered.plugin!r} failed to"
                        f" start: {type(exc).__name__}: {exc}"
                    ) from exc
                self._executors[name] = executor
            return executor

    def _place(self, executor: str, request: PlacementRequest) -> DispatchingModel:
        """Place one model on ``executor``."""
        placing = self.executor(executor)
        try:
            return placing.place(request)
        except LlmosError:
            raise
        except Exception as exc:
            raise LlmosError(
                f"executor {executor!r} failed to place {request.key!r}:"
                f" {type(exc).__name__}: {exc}"
            ) from exc

    def _start_job(self, executor: str, payload: WorkerPayload) -> JobHandle:
        """Start a tuning job's worker on ``executor`` (``[tuning] executor``)."""
        start = getattr(self.executor(executor), "start_job", None)
        if not callable(start):
            raise ConfigError(
                f"[tuning] executor = {executor!r}: that executor places models but runs no"
                ' tuning jobs; set [tuning] executor = "local"',
                param="tuning.executor",
            )
        try:
            return start(attrs.asdict(payload))
        except LlmosError:
            raise
        except Exception as exc:
            raise LlmosError(
                f"executor {executor!r} failed to start job {payload.job_id}:"
                f" {type(exc).__name__}: {exc}"
            ) from exc

    def _close_executors(self) -> None:
        with self._executors_lock:
            executors, self._executors = dict(self._executors), {}
        for name, executor in executors.items():
            try:
                executor.close()
            except Exception as exc:
                log.warning("kernel.executor_close_failed", executor=name, error=repr(exc))

    def _create_sinks(self) -> dict[str, MonitorSink]:
        sinks: dict[str, MonitorSink] = {}
        # a copy: rejecting a plugin takes its sinks out of the dict being walked
        for name, registered in list(self.plugins.monitor_sinks.items()):
            try:
                sinks[name] = registered.spec.create(self.context(registered.plugin))
            except Exception as exc:
                self.plugins.reject(
                    registered.plugin, f"monitor sink {name!r} failed to start: {exc!r}"
                )
        return sinks
