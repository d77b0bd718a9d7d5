"""Hook specifications: the reference for everything a plugin can do.

A plugin is a module (or an object) of functions marked ``@hookimpl`` whose
names match the specs below; the kernel finds it through the ``llmos``
entry-point group. An implementation may accept any subset of a spec's
parameters, by name — that is what lets specs grow new parameters without
breaking old plugins.

Registration hooks receive a ``register`` callback that takes one frozen
attrs spec from :mod:`llmos.types` per call. The kernel calls each plugin's
registration hook on its own: a plugin that raises there is recorded as
failed, everything it registered is rolled back, and the other plugins go on.

Families, in the order the kernel uses them:

* model providers — :func:`llmos_register_providers`
* model sources — :func:`llmos_discover_models`
* fusion strategies — :func:`llmos_register_fusion_strategies`
* tuning methods — :func:`llmos_register_tuning_methods`
* monitor sinks — :func:`llmos_register_monitor_sinks`
* registry stores — :func:`llmos_register_registry_stores`
* config sections — :func:`llmos_register_config`
* lifecycle — :func:`llmos_startup`, :func:`llmos_shutdown`
* extension — :func:`llmos_register_commands`, :func:`llmos_register_routes`
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import pluggy

from llmos.config import Section
from llmos.types import (
    CommandSpec,
    ExecutorSpec,
    FusionStrategySpec,
    ModelCard,
    MonitorSinkSpec,
    ProviderSpec,
    RegistryStoreSpec,
    RouteSpec,
    TuningMethodSpec,
)

if TYPE_CHECKING:
    from llmos.runtime.kernel import Kernel

NAME = "llmos"

hookspec = pluggy.HookspecMarker(NAME)
hookimpl = pluggy.HookimplMarker(NAME)


# --------------------------------------------------------------------------
# Model providers
# --------------------------------------------------------------------------


@hookspec
def llmos_register_providers(register: Callable[[ProviderSpec], None]) -> None:
    """Register model providers: backends that load a model card into a
    :class:`~llmos.types.LoadedModel`.

    Called once when plugins are loaded.

    :param register: call ``register(ProviderSpec(name=..., load=...))`` once
        per provider. ``name`` is what model cards put in ``provider``; two
        plugins registering one name is an error naming both.
    """


# --------------------------------------------------------------------------
# Model sources
# --------------------------------------------------------------------------


@hookspec
def llmos_discover_models(register: Callable[[ModelCard], None]) -> None:
    """Offer model cards this plugin knows of: weights an installed package
    carries, a vendor's catalogue, a folder of local models.

    Called when the registry scans sources (at daemon start-up and by
    ``llmos models discover``), not on every start of the CLI, so it may do
    some I/O; it must not download weights.

    :param register: call ``register(ModelCard(...))`` once per model. The
        card's ``version`` is ignored: the registry assigns versions, and a
        card identical to the latest version of its name is not registered
        again.
    """


# --------------------------------------------------------------------------
# Fusion strategies
# --------------------------------------------------------------------------


@hookspec
def llmos_register_fusion_strategies(register: Callable[[FusionStrategySpec], None]) -> None:
    """Register ways to fuse several models into one.

    Called once when plugins are loaded.

    :param register: call ``register(FusionStrategySpec(name=..., combine=...))``
        once per strategy (``vote``, ``cascade``, ``router`` …). ``combine``
        gets each batch a fusion serves as a :class:`~llmos.types.FusionCall`
        (ask members, within the request's budget) and returns the results,
        so a fusion is served like any other model and can itself be a
        member of a fusion; a weight-space strategy gives ``merge`` instead,
        which writes a new model.
    """


# --------------------------------------------------------------------------
# Tuning methods
# --------------------------------------------------------------------------


@hookspec
def llmos_register_tuning_methods(register: Callable[[TuningMethodSpec], None]) -> None:
    """Register ways to tune a model (``lora``, ``ia3``, ``full`` …).

    Called once when plugins are loaded; ``TuningMethodSpec.run`` itself runs
    later, in a worker process of the job manager.

    :param register: call ``register(TuningMethodSpec(name=..., run=...))``
        once per method.
    """


# --------------------------------------------------------------------------
# Monitor sinks
# --------------------------------------------------------------------------


@hookspec
def llmos_register_monitor_sinks(register: Callable[[MonitorSinkSpec], None]) -> None:
    """Register places monitor events go (a log, a time-series store,
    Prometheus …).

    Called once when plugins are loaded. The kernel creates each sink when it
    starts and hands it every :class:`~llmos.types.MonitorEvent`; a sink that
    raises or is slow never fails or slows the call that produced the event.

    :param register: call ``register(MonitorSinkSpec(name=..., create=...))``
        once per sink; ``create(context)`` gets a
        :class:`~llmos.types.PluginContext` (the plugin's options, the data
        folder, the bus's health).
    """


@hookspec
def llmos_register_registry_stores(register: Callable[[RegistryStoreSpec], None]) -> None:
    """Register places the model registry can keep its cards (a server
    database shared by several daemons, say).

    Called once when plugins are loaded. ``[registry] store`` names the store
    a kernel opens, when it first needs the registry; ``sqlite`` (a file in
    the data folder, registered by the kernel's default plugin) is the
    default. A store keeps the :class:`~llmos.registry.store.RegistryStore`
    contract: gapless versions per name under concurrent writers, aliases,
    ``latest``, the search language and its ranking.

    :param register: call ``register(RegistryStoreSpec(name=..., create=...))``
        once per store; ``create(context)`` gets a
        :class:`~llmos.types.PluginContext` and returns the open store.
    """


@hookspec
def llmos_register_executors(register: Callable[[ExecutorSpec], None]) -> None:
    """Register places served models can run other than the kernel's process
    (a cluster's replicas, say).

    Called once when plugins are loaded. ``[runtime] executor`` names the
    executor every model is placed on (``local``, the default, is the
    kernel's own worker threads); a ``[models.NAME]`` deployment's
    ``executor`` overrides it for that model. Models made of models (fusions,
    deployment groups) always run in the kernel: their members are placed.
    The kernel creates the executor when it first places a model on it and
    closes it at stop.

    :param register: call ``register(ExecutorSpec(name=..., create=...))``
        once per executor; ``create(context)`` gets a
        :class:`~llmos.types.PluginContext` and returns an
        :class:`~llmos.types.Executor`, whose ``place(request)`` gets a
        :class:`~llmos.types.PlacementRequest` and returns a
        :class:`~llmos.types.DispatchingModel`.
    """


# --------------------------------------------------------------------------
# Config
# --------------------------------------------------------------------------


@hookspec
def llmos_register_config(register: Callable[[Section], None]) -> None:
    """Declare config sections: ``[name]`` tables of llmos's config files.

    Called once when plugins are loaded, before the kernel reads its config:
    a declared section is checked like the kernel's own (types, ranges,
    unknown keys with a suggestion, every error with its file and line, all
    of them at once), its defaults filled in, its ``secret`` fields masked by
    ``llmos config show``, its ``env`` variables read. Read the values with
    ``kernel.config.section(name)``. A table that no section (the kernel's or
    a plugin's) claims is an error once plugins have loaded.

    :param register: call ``register(Section(name, {key: Field(...)}, doc=...))``
        (``llmos.config``) once per section; ``entries={...}`` instead
        declares a section of named tables (``[name.ENTRY]``). A name the
        kernel or another plugin holds is an error naming both.
    """


# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


@hookspec
def llmos_startup(kernel: Kernel) -> None:
    """The kernel has loaded its plugins and config and is about to take work.

    Called once per kernel start, in the daemon before ``/readyz`` turns
    ready, and in CLI commands that start a kernel. Use it to open
    connections or warm caches. An exception here marks the plugin failed
    (fatal in strict mode); the kernel still starts.

    :param kernel: the running :class:`~llmos.runtime.kernel.Kernel`.
    """


@hookspec
def llmos_shutdown(kernel: Kernel) -> None:
    """The kernel is stopping; release what ``llmos_startup`` acquired.

    Called once, after in-flight requests have drained. Every plugin's
    implementation is called even when an earlier one raises.

    :param kernel: the stopping :class:`~llmos.runtime.kernel.Kernel`.
    """


# --------------------------------------------------------------------------
# Extension: CLI commands and HTTP routes
# --------------------------------------------------------------------------


@hookspec
def llmos_register_commands(register: Callable[[CommandSpec], None]) -> None:
    """Add sub-commands to the ``llmos`` command line.

    Called when the CLI is built, before arguments are dispatched.

    :param register: call ``register(CommandSpec(command=...))`` with a click
        command or group. A name that is already taken is an error naming
        both plugins.
    """


@hookspec
def llmos_register_routes(register: Callable[[RouteSpec], None], kernel: Kernel) -> None:
    """Add HTTP routes to the daemon.

    Called once when the daemon's app is built.

    :param register: call ``register(RouteSpec(router=..., prefix=...))`` with
        a FastAPI ``APIRouter``. Routes get the daemon's auth, body cap and
        error shape like the kernel's own.
    :param kernel: the :class:`~llmos.runtime.kernel.Kernel` the handlers can
        call into.
    """
