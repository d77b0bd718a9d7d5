"""Plugin loading: default plugins, then the ``llmos`` entry points, each isolated.

The kernel never calls ``pm.hook.*`` directly; it talks to :class:`PluginManager`,
a typed façade with one method per hook family. Loading follows one rule: a
plugin that breaks — on import, on registration with pluggy, with a misspelled
hook, by raising inside a hook, by taking a name another plugin holds — is
recorded with its distribution, version and error, logged, rolled back and
skipped, and every other plugin keeps working. Strict mode
(``LLMOS_STRICT_PLUGINS=1``, ``--strict``) turns the first such failure into a
:class:`~llmos.errors.PluginError`.

What loads but is probably a mistake — a hook implemented twice in one plugin,
or a ``def llmos_*`` that a second ``def`` of the same name silently replaced —
is kept as a warning on the plugin (``llmos plugins`` shows it) and logged.
Routes are checked for collisions by :meth:`PluginManager.check_routes`, which
``llmos plugins`` runs as the daemon does, so a collision shows before ``serve``.
"""

from __future__ import annotations

import ast
import difflib
import importlib
import inspect
import re
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import attrs
import importlib_metadata
import pluggy
import structlog

from llmos import __version__
from llmos.config import Section
from llmos.errors import DuplicateNameError, PluginError
from llmos.plugin import spec
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
    from starlette.routing import BaseRoute

    from llmos.config import PluginSettings
    from llmos.runtime.kernel import Kernel

log = structlog.get_logger("llmos.plugins")

ENTRY_POINT_GROUP = spec.NAME

#: plugins that ship inside the kernel, loaded first; each can be disabled by name
#: the owner of the specs the kernel provides itself (:meth:`PluginManager.reserve`:
#: its config sections, the ``fusion`` and ``group`` providers)
KERNEL_OWNER = "llmos"

DEFAULT_PLUGINS: tuple[str, ...] = (
    "llmos.default_plugins.log_sink",
    "llmos.default_plugins.sqlite_sink",
    "llmos.default_plugins.fusion",
    "llmos.default_plugins.sqlite_registry",
)

HOOK_NAMES: frozenset[str] = frozenset(
    name for name in dir(spec) if name.startswith("llmos_") and callable(getattr(spec, name))
)

S = TypeVar("S")


@attrs.define
class PluginInfo:
    """What ``llmos plugins`` shows about one plugin."""

    name: str
    module: str
    distribution: str | None
    version: str | None
    default: bool
    #: ``loaded`` | ``failed`` | ``disabled`` (deny-list) | ``not-allowed`` (allow-list)
    status: str = "loaded"
    error: str | None = None
    hooks: list[str] = attrs.field(factory=list)
    #: family -> names this plugin registered (``providers``: ``["transformers"]``)
    registered: dict[str, list[str]] = attrs.field(factory=dict)
    #: what loaded but looks like a mistake (a hook defined twice), with file and lines
    warnings: list[str] = attrs.field(factory=list)

    def to_dict(self) -> dict[str, Any]:
        return attrs.asdict(self)


@attrs.frozen
class Registered(Generic[S]):
    """A spec and the plugin that registered it."""

    spec: S
    plugin: str


@attrs.frozen
class _Family:
    """A registration hook, the spec type its ``register`` takes, and how a
    spec is named (for duplicate detection)."""

    key: str
    hook: str
    spec_type: type
    name_of: Callable[[Any], str]


_FAMILIES: tuple[_Family, ...] = (
    _Family("providers", "llmos_register_providers", ProviderSpec, lambda s: s.name),
    _Family(
        "fusion_strategies",
        "llmos_register_fusion_strategies",
        FusionStrategySpec,
        lambda s: s.name,
    ),
    _Family("tuning_methods", "llmos_register_tuning_methods", TuningMethodSpec, lambda s: s.name),
    _Family("monitor_sinks", "llmos_register_monitor_sinks", MonitorSinkSpec, lambda s: s.name),
    _Family(
        "registry_stores", "llmos_register_registry_stores", RegistryStoreSpec, lambda s: s.name
    ),
    _Family("executors", "llmos_register_executors", ExecutorSpec, lambda s: s.name),
    _Family("commands", "llmos_register_commands", CommandSpec, lambda s: s.command.name),
    _Family("config_sections", "llmos_register_config", Section, lambda s: s.name),
)


def _normalise(name: str) -> str:
    return name.strip().lower().replace("_", "-")


class _HookFailed(Exception):
    """Internal: a plugin's hook raised; carries the plugin-facing message."""


class PluginManager:
    """The kernel's typed façade over pluggy.

    Create it with the plugin settings, call :meth:`load` once, then use the
    registries (:attr:`providers` …) and the per-hook methods.
    """

    def __init__(self, settings: PluginSettings | None = None) -> None:
        self._load = None if settings is None else settings.load
        self._disable = frozenset(_normalise(n) for n in (settings.disable if settings else ()))
        self.strict = bool(settings and settings.strict)
        self.trace = bool(settings and settings.trace)
        self.pm = pluggy.PluginManager(spec.NAME)
        self.pm.add_hookspecs(spec)
        self._infos: dict[str, PluginInfo] = {}
        self._objects: dict[str, object] = {}
        self._registries: dict[str, dict[str, Registered[Any]]] = {f.key: {} for f in _FAMILIES}
        self._routes: list[Registered[RouteSpec]] = []
        #: plugins whose ``llmos_register_routes`` has been called
        self._routes_asked: set[str] = set()
        self.loaded = False

    # -- registries -------------------------------------------------------

    @property
    def providers(self) -> Mapping[str, Registered[ProviderSpec]]:
        return self._registries["providers"]

    @property
    def fusion_strategies(self) -> Mapping[str, Registered[FusionStrategySpec]]:
        return self._registries["fusion_strategies"]

    @property
    def tuning_methods(self) -> Mapping[str, Registered[TuningMethodSpec]]:
        return self._registries["tuning_methods"]

    @property
    def monitor_sinks(self) -> Mapping[str, Registered[MonitorSinkSpec]]:
        return self._registries["monitor_sinks"]

    @property
    def registry_stores(self) -> Mapping[str, Registered[RegistryStoreSpec]]:
        return self._registries["registry_stores"]

    @property
    def executors(self) -> Mapping[str, Registered[ExecutorSpec]]:
        return self._registries["executors"]

    @property
    def commands(self) -> Mapping[str, Registered[CommandSpec]]:
        return self._registries["commands"]

    @property
    def config_sections(self) -> Mapping[str, Registered[Section]]:
        """Config sections plugins declared (``llmos_register_config``), and
        the kernel's own, reserved under the owner ``llmos``."""
        return self._registries["config_sections"]

    def plugins(self, *, include_defaults: bool = True) -> list[PluginInfo]:
        """Every plugin seen, in load order, with its status and error."""
        return [i for i in self._infos.values() if include_defaults or not i.default]

    def failed(self) -> list[PluginInfo]:
        return [i for i in self._infos.values() if i.status == "failed"]

    def implements(self, hook: str) -> bool:
        """Whether some loaded plugin implements ``hook``."""
        return bool(self._impls_of(hook))

    # -- loading ----------------------------------------------------------

    def load(self, entry_points: Iterable[importlib_metadata.EntryPoint] | None = None) -> None:
        """Load default plugins, then entry-point plugins, one by one.

        ``entry_points`` defaults to the installed ``llmos`` group.
        """
        if self.loaded:
            return
        for module_name in DEFAULT_PLUGINS:
            info = PluginInfo(
                name=module_name,
                module=module_name,
                distribution="llmos",
                version=__version__,
                default=True,
            )
            if self._admit(info, allow_list_applies=False):
                self._load_one(info, lambda m=module_name: importlib.import_module(m))
        if entry_points is None:
            entry_points = importlib_metadata.entry_points(group=ENTRY_POINT_GROUP)
        for ep in sorted(entry_points, key=lambda e: (e.dist.name if e.dist else "", e.name)):
            info = PluginInfo(
                name=ep.name,
                module=ep.value,
                distribution=ep.dist.name if ep.dist else None,
                version=ep.dist.version if ep.dist else None,
                default=False,
            )
            if self._admit(info, allow_list_applies=True):
                self._load_one(info, ep.load)
                if info.status == "loaded":
                    self._warn(info, redefined_hooks(self._objects[info.name]))
        # Every implementation left has a spec (misspelled ones were rejected
        # per plugin above); this is the belt to those braces.
        self.pm.check_pending()
        self.loaded = True
        log.debug(
            "plugins.loaded", plugins=[i.name for i in self._infos.values() if i.status == "loaded"]
        )

    def register(self, plugin: object, name: str) -> PluginInfo:
        """Register an in-process plugin object (tests, embedding applications).

        Goes through the same validation and registration as an entry point;
        undo it with :meth:`unregister`.
        """
        info = PluginInfo(
            name=name,
            module=getattr(plugin, "__name__", type(plugin).__name__),
            distribution=None,
            version=None,
            default=False,
        )
        if not self._name_taken(info):
            self._infos[name] = info
            self._load_one(info, lambda: plugin)
        return info

    def unregister(self, name: str) -> None:
        """Remove a plugin and everything it registered."""
        self._rollback(name)
        if (obj := self._objects.pop(name, None)) is not None and self.pm.is_registered(obj):
            self.pm.unregister(obj)
        self._infos.pop(name, None)

    def reserve(self, family: str, specs: Iterable[Any], owner: str = KERNEL_OWNER) -> None:
        """Record specs the kernel provides itself (the CLI's built-in commands)
        before loading, so a plugin taking one of their names is a duplicate
        like any other."""
        kind = family[:-1].replace("_", " ")
        for item in specs:
            name = next(f for f in _FAMILIES if f.key == family).name_of(item)
            holder = self._registries[family].get(name)
            if holder is not None and holder.plugin != owner and holder.plugin in self._infos:
                # loaded before the reservation (a manager handed to a kernel)
                self.reject(
                    holder.plugin,
                    f"{kind} {name!r} is registered by both {owner!r} and {holder.plugin!r};"
                    " disable one of them (LLMOS_DISABLE_PLUGINS or [plugins] disable)",
                    DuplicateNameError,
                )
            self._registries[family][name] = Registered(item, owner)

    def _name_taken(self, info: PluginInfo) -> bool:
        """A second plugin under a name already in use fails on its own,
        recorded under a key of its own, and leaves the first one alone."""
        holder = self._infos.get(info.name)
        # A plugin that was not loaded (disabled, not allowed) holds nothing.
        if holder is None or holder.status in ("disabled", "not-allowed"):
            return False
        self._infos[f"{info.name} ({info.distribution or info.module})#{len(self._infos)}"] = info
        self._record_failure(
            info,
            f"plugin name {info.name!r} is already taken by "
            f"{holder.distribution or holder.module!r}; rename one entry point",
            None,
            DuplicateNameError,
        )
        return True

    def _admit(self, info: PluginInfo, *, allow_list_applies: bool) -> bool:
        if self._name_taken(info):
            return False
        names = {_normalise(info.name)}
        if info.distribution:
            names.add(_normalise(info.distribution))
        if names & self._disable:
            info.status = "disabled"
        elif (
            allow_list_applies
            and self._load is not None
            and not (names & {_normalise(n) for n in self._load})
        ):
            info.status = "not-allowed"
        self._infos[info.name] = info
        return info.status == "loaded"

    def _load_one(self, info: PluginInfo, load: Callable[[], object]) -> None:
        try:
            obj = load()
        except Exception as exc:  # an import error of any kind is the plugin's
            self._fail(info, f"import failed: {type(exc).__name__}: {exc}", exc)
            return
        try:
            self.pm.register(obj, name=info.name)
        except (pluggy.PluginValidationError, ValueError) as exc:
            self._fail(info, f"invalid plugin: {exc}", exc)
            return
        self._objects[info.name] = obj
        impls = self._impl_by_name(obj)
        info.hooks = sorted(set(impls.values()))
        unknown = sorted(
            {hook for attr, hook in impls.items() if hook not in HOOK_NAMES}
            - {hook for attr, hook in impls.items() if self._optional(obj, attr)}
        )
        if unknown:
            hints = []
            for name in unknown:
                close = difflib.get_close_matches(name, sorted(HOOK_NAMES), n=1)
                hints.append(f"{name!r}" + (f" (did you mean {close[0]!r}?)" if close else ""))
            self._fail(info, f"unknown hook {', '.join(hints)}", None)
            return
        wrappers = self._wrappers(obj)
        if wrappers:
            self._fail(info, wrappers, None)
            return
        self._warn(info, self._aliased_hooks(obj))
        self._register_specs(info, obj)

    def _wrappers(self, obj: object) -> str | None:
        """Why ``obj`` cannot load when it declares hook wrappers, else None.

        llmos calls each plugin's implementation on its own (so that one
        plugin's failure is its alone), never as one pluggy hook call, so a
        wrapper would have nothing to wrap: pluggy would call it as a plain
        function and its code after ``yield`` would never run. Refused rather
        than run wrongly.
        """
        found = [
            f"{name} ({'wrapper=True' if opts.get('wrapper') else 'hookwrapper=True'})"
            for name in sorted(dir(obj))
            if (opts := self.pm.parse_hookimpl_opts(obj, name)) is not None
            and (opts.get("wrapper") or opts.get("hookwrapper"))
        ]
        if not found:
            return None
        return (
            f"hook wrappers are not supported: {', '.join(found)}; llmos calls every plugin's"
            " implementation on its own, so there is no call to wrap. Implement the hook"
            " plainly, and order it with @hookimpl(tryfirst=True) or @hookimpl(trylast=True)"
        )

    def _impl_by_name(self, obj: object) -> dict[str, str]:
        """Attribute name -> the hook it implements, for each hookimpl of ``obj``."""
        found = {}
        for name in dir(obj):
            opts = self.pm.parse_hookimpl_opts(obj, name)
            if opts is not None:
                found[name] = opts.get("specname") or name
        return found

    def _aliased_hooks(self, obj: object) -> list[str]:
        """Warnings for hooks ``obj`` implements more than once through
        ``@hookimpl(specname=...)``: pluggy calls every one of them, which is
        rarely what was meant (two registrations, a provider registered twice)."""
        by_hook: dict[str, list[str]] = {}
        for name, hook in sorted(self._impl_by_name(obj).items()):
            by_hook.setdefault(hook, []).append(name)
        warnings = []
        for hook, names in sorted(by_hook.items()):
            if len(names) > 1:
                where = ", ".join(f"{name} ({_where(getattr(obj, name))})" for name in names)
                warnings.append(
                    f"hook {hook} is implemented {len(names)} times: by {where}; each of them "
                    "runs: merge them into one function if that is not what you meant"
                )
        return warnings

    def _warn(self, info: PluginInfo, warnings: Iterable[str]) -> None:
        for warning in warnings:
            info.warnings.append(warning)
            log.warning(
                "plugins.warning",
                plugin=info.name,
                distribution=info.distribution,
                warning=warning,
            )

    def _optional(self, obj: object, name: str) -> bool:
        opts = self.pm.parse_hookimpl_opts(obj, name)
        return bool(opts and opts.get("optionalhook"))

    def _register_specs(self, info: PluginInfo, obj: object) -> None:
        """Run the plugin's registration hooks into a staging area, then commit
        all of it or none of it."""
        staged: list[tuple[_Family, Any]] = []
        for family in _FAMILIES:
            for impl in self._impls_of(family.hook, obj):
                try:
                    items = self._gather(impl, info.name, family.hook, family.spec_type)
                except _HookFailed as exc:
                    self._fail(info, str(exc), exc.__cause__)
                    return
                staged.extend((family, item) for item in items)
        seen: dict[tuple[str, str], bool] = {}
        for family, item in staged:
            name = family.name_of(item)
            holder = self._registries[family.key].get(name)
            if holder is not None or (family.key, name) in seen:
                other = holder.plugin if holder else info.name
                message = (
                    f"{family.key[:-1].replace('_', ' ')} {name!r} is registered by both "
                    f"{other!r} and {info.name!r}; disable one of them "
                    "(LLMOS_DISABLE_PLUGINS or [plugins] disable)"
                )
                self._fail(info, message, None, error_type=DuplicateNameError)
                return
            seen[(family.key, name)] = True
        for family, item in staged:
            self._registries[family.key][family.name_of(item)] = Registered(item, info.name)
            info.registered.setdefault(family.key, []).append(family.name_of(item))

    def _impls_of(self, hook_name: str, obj: object | None = None) -> list[pluggy.HookImpl]:
        """``hook_name``'s implementations in the order pluggy calls them:
        ``tryfirst`` ones first, ``trylast`` ones last, and otherwise the
        plugin registered last first (``reversed(get_hookimpls())``)."""
        impls = reversed(getattr(self.pm.hook, hook_name).get_hookimpls())
        return [i for i in impls if obj is None or i.plugin is obj]

    def _call(
        self, impl: pluggy.HookImpl, plugin: str, hook: str, kwargs: Mapping[str, Any]
    ) -> Any:
        """Call one implementation with the arguments it asks for."""
        args = [kwargs[name] for name in impl.argnames]
        start = time.perf_counter()
        try:
            return impl.function(*args)
        except Exception as exc:
            raise _HookFailed(f"{hook} raised {type(exc).__name__}: {exc}") from exc
        finally:
            if self.trace:
                log.info(
                    "plugins.trace",
                    plugin=plugin,
                    hook=hook,
                    duration_ms=round((time.perf_counter() - start) * 1000, 3),
                )

    def _fail(
        self,
        info: PluginInfo,
        message: str,
        exc: BaseException | None,
        error_type: type[PluginError] = PluginError,
    ) -> None:
        self._rollback(info.name)
        obj = self._objects.pop(info.name, None)
        if obj is not None and self.pm.is_registered(obj):
            self.pm.unregister(obj)
        self._record_failure(info, message, exc, error_type)

    def _record_failure(
        self,
        info: PluginInfo,
        message: str,
        exc: BaseException | None,
        error_type: type[PluginError] = PluginError,
    ) -> None:
        """Mark ``info`` failed, log it, and raise in strict mode; undoes nothing."""
        info.status = "failed"
        info.error = message
        log.error(
            "plugins.failed",
            plugin=info.name,
            distribution=info.distribution,
            version=info.version,
            error=message,
        )
        if self.strict:
            raise error_type(
                f"plugin {info.name!r} ({info.distribution or 'not installed'} "
                f"{info.version or ''}) failed: {message}".replace(" )", ")")
            ) from exc

    def _rollback(self, plugin: str) -> None:
        for registry in self._registries.values():
            for name in [n for n, r in registry.items() if r.plugin == plugin]:
                del registry[name]
        self._routes = [r for r in self._routes if r.plugin != plugin]
        self._routes_asked.discard(plugin)
        if plugin in self._infos:
            self._infos[plugin].registered.clear()

    def _name_of(self, impl: pluggy.HookImpl) -> str:
        return impl.plugin_name

    def _gather(
        self,
        impl: pluggy.HookImpl,
        plugin: str,
        hook: str,
        spec_type: type,
        kwargs: Mapping[str, Any] | None = None,
    ) -> list[Any]:
        """Call a registration hook of one plugin with a ``register`` callback
        that checks each item's type; return what it registered."""
        staged: list[Any] = []

        def register(item: Any) -> None:
            if not isinstance(item, spec_type):
                raise TypeError(
                    f"register() in {hook} takes a {spec_type.__name__}, got {type(item).__name__}"
                )
            staged.append(item)

        self._call(impl, plugin, hook, {"register": register, **(kwargs or {})})
        return staged

    def _gather_all(
        self, hook: str, spec_type: type, kwargs: Mapping[str, Any] | None = None
    ) -> list[tuple[str, list[Any]]]:
        """:meth:`_gather` over every loaded plugin; one that raises is failed,
        rolled back and skipped."""
        out: list[tuple[str, list[Any]]] = []
        for impl in list(self._impls_of(hook)):
            plugin = self._name_of(impl)
            try:
                out.append((plugin, self._gather(impl, plugin, hook, spec_type, kwargs)))
            except _HookFailed as exc:
                self._fail(self._infos[plugin], str(exc), exc.__cause__)
        return out

    def _each(self, hook: str, kwargs: Mapping[str, Any]) -> Iterable[tuple[str, Any]]:
        """Call every loaded plugin's implementation of ``hook`` on its own; a
        plugin that raises is failed and skipped."""
        for impl in list(self._impls_of(hook)):
            plugin = self._name_of(impl)
            try:
                yield plugin, self._call(impl, plugin, hook, kwargs)
            except _HookFailed as exc:
                self._fail(self._infos[plugin], str(exc), exc.__cause__)

    # -- hooks called after loading ---------------------------------------

    def discover_models(self) -> list[Registered[ModelCard]]:
        """Ask every model source for its cards."""
        return [
            Registered(card, plugin)
            for plugin, cards in self._gather_all("llmos_discover_models", ModelCard)
            for card in cards
        ]

    def routes(self, kernel: Kernel) -> Sequence[Registered[RouteSpec]]:
        """Collect every plugin's routes; each plugin's hook is called once,
        later calls return what was collected (and what a plugin registered
        since)."""
        for impl in list(self._impls_of("llmos_register_routes")):
            plugin = self._name_of(impl)
            if plugin in self._routes_asked:
                continue
            self._routes_asked.add(plugin)
            try:
                specs = self._gather(
                    impl, plugin, "llmos_register_routes", RouteSpec, {"kernel": kernel}
                )
            except _HookFailed as exc:
                self._fail(self._infos[plugin], str(exc), exc.__cause__)
                continue
            self._routes.extend(Registered(r, plugin) for r in specs)
            if specs:
                self._infos[plugin].registered["routes"] = [r.prefix or "/" for r in specs]
        return list(self._routes)

    def check_routes(
        self, kernel: Kernel, reserved: Iterable[tuple[str, str]] = ()
    ) -> dict[str, list[RouteSpec]]:
        """Collect every plugin's routes and fail each plugin that has a bad
        prefix, or a route (method and path, parameter names aside) that
        ``reserved`` — the kernel's own routes — or an earlier plugin holds;
        return the routes of the plugins that pass, by plugin, in load order.
        (Load order, not hook order: which plugin keeps a contested route
        does not depend on a ``tryfirst`` marker.)

        The daemon mounts what this returns; ``llmos plugins`` calls it with
        the kernel's routes so that a collision shows without a ``serve``.
        Calling it again gives the same answer: failed plugins stay failed.
        """
        owners: dict[tuple[str, str], str] = dict.fromkeys(reserved, KERNEL_OWNER)
        by_plugin: dict[str, list[RouteSpec]] = {}
        for registered in self.routes(kernel):
            by_plugin.setdefault(registered.plugin, []).append(registered.spec)
        passed: dict[str, list[RouteSpec]] = {}
        for plugin, specs in sorted(by_plugin.items(), key=lambda item: self._order(item[0])):
            problem, mine = _route_problem(plugin, specs, owners)
            if problem is not None:
                self.reject(plugin, problem[0], problem[1])
                continue
            owners.update(mine)
            passed[plugin] = specs
        return passed

    def _order(self, plugin: str) -> int:
        """``plugin``'s place in load order."""
        return list(self._infos).index(plugin)

    def reject(
        self, plugin: str, message: str, error_type: type[PluginError] = PluginError
    ) -> None:
        """Fail a plugin for a reason found outside the manager (a route that
        collides with the kernel's own, a sink that cannot start)."""
        self._fail(self._infos[plugin], message, None, error_type=error_type)

    def startup(self, kernel: Kernel) -> None:
        for _ in self._each("llmos_startup", {"kernel": kernel}):
            pass

    def shutdown(self, kernel: Kernel) -> None:
        # A plugin failing at shutdown is logged but not rolled back from the
        # record: it did run; it only failed to clean up.
        for impl in list(self._impls_of("llmos_shutdown")):
            plugin = self._name_of(impl)
            try:
                self._call(impl, plugin, "llmos_shutdown", {"kernel": kernel})
            except _HookFailed as exc:
                log.error("plugins.shutdown_failed", plugin=plugin, error=str(exc))


# --------------------------------------------------------------------------
# Routes: collisions found without building the daemon
# --------------------------------------------------------------------------

#: how the kernel is named when a plugin's route collides with one of its own
KERNEL_OWNER = "llmos"

_PATH_PARAM = re.compile(r"\{[^}:]*(:[^}]*)?\}")


def flatten_routes(
    routes: Iterable[BaseRoute], prefix: str = ""
) -> Iterator[tuple[str, BaseRoute]]:
    """Every route with the full path prefix it is served under.

    FastAPI copies an included router's routes in some versions and keeps the
    router as one nested entry (``original_router`` plus an include prefix)
    in others; this walks either.
    """
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            context = getattr(route, "include_context", None)
            yield from flatten_routes(inner.routes, prefix + getattr(context, "prefix", ""))
        else:
            yield prefix, route


def route_keys(routes: Iterable[BaseRoute], prefix: str = "") -> list[tuple[str, str]]:
    """``(method, path)`` pairs the routes answer, with parameter names erased
    (``/m/{a}`` and ``/m/{b}`` are the same route to a client)."""
    from starlette.routing import WebSocketRoute  # the CLI pays for it only when routes exist

    keys = []
    for full_prefix, route in flatten_routes(routes, prefix):
        path = _PATH_PARAM.sub(
            lambda m: "{" + (m.group(1) or "") + "}", full_prefix + getattr(route, "path", "")
        )
        methods: Iterable[str] | None = getattr(route, "methods", None)
        if methods is None:  # FastAPI's websocket routes derive from Starlette's
            methods = ("WEBSOCKET",) if isinstance(route, WebSocketRoute) else ("*",)
        keys.extend((method, path) for method in sorted(methods))
    return keys


def _route_problem(
    plugin: str, specs: Sequence[RouteSpec], owners: Mapping[tuple[str, str], str]
) -> tuple[tuple[str, type[PluginError]] | None, dict[tuple[str, str], str]]:
    """``((message, error type), {})`` for the first thing wrong with one
    plugin's routes, else ``(None, the routes it takes)``."""
    mine: dict[tuple[str, str], str] = {}
    for route_spec in specs:
        prefix = route_spec.prefix
        if prefix and (not prefix.startswith("/") or prefix.endswith("/")):
            message = f"route prefix {prefix!r} must start with '/' and not end with '/'"
            return (message, PluginError), {}
        for method, path in route_keys(route_spec.router.routes, prefix):
            other = owners.get((method, path), mine.get((method, path)))
            if other is None:
                mine[(method, path)] = plugin
                continue
            if other == KERNEL_OWNER:
                message = (
                    f"route {method} {path} is registered by both {KERNEL_OWNER!r} (the kernel) "
                    f"and {plugin!r}; change the plugin's route or disable it "
                    "(LLMOS_DISABLE_PLUGINS or [plugins] disable)"
                )
            elif other == plugin:
                continue  # one plugin's two routers may share a path; FastAPI takes the first
            else:
                message = (
                    f"route {method} {path} is registered by both {other!r} and {plugin!r}; "
                    "disable one of them (LLMOS_DISABLE_PLUGINS or [plugins] disable)"
                )
            return (message, DuplicateNameError), {}
    return None, mine


# --------------------------------------------------------------------------
# Hooks defined twice
# --------------------------------------------------------------------------


def _where(function: object) -> str:
    """``file:line`` of a function, or its name when the source is unknown."""
    code = getattr(inspect.unwrap(function), "__code__", None)  # type: ignore[arg-type]
    if code is None:
        return getattr(function, "__qualname__", repr(function))
    return f"{code.co_filename}:{code.co_firstlineno}"


def redefined_hooks(obj: object) -> list[str]:
    """Warnings for ``def llmos_*`` names defined twice at the top of the
    plugin's module (or of its class body, for a class or an instance).

    Python keeps only the last of two ``def``s of one name, so the first
    implementation silently never runs, and nothing at runtime can tell; the
    source can, with one parse of one file. Definitions under ``if``/``try``
    (version switches) are not counted.
    """
    cls = None if isinstance(obj, types.ModuleType) else obj if isinstance(obj, type) else type(obj)
    try:
        path = inspect.getsourcefile(obj if cls is None else cls)
        if path is None or not path.endswith(".py"):
            return []
        with open(path, encoding="utf-8") as file:
            tree = ast.parse(file.read(), filename=path)
    except (OSError, TypeError, SyntaxError, ValueError):
        return []
    body: list[ast.stmt] = tree.body
    if cls is not None:
        found = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls.__name__]
        if not found:
            return []
        body = found[0].body
    lines: dict[str, list[int]] = {}
    for node in body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and node.name.startswith(
            "llmos_"
        ):
            # where the definition starts, decorators included, as co_firstlineno
            start = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            lines.setdefault(node.name, []).append(start)
    warnings = []
    for name, numbers in sorted(lines.items()):
        if len(numbers) > 1:
            first = ", ".join(map(str, numbers[:-1]))
            lost = (
                f"the one at line {first} never runs"
                if len(numbers) == 2
                else (f"the ones at lines {first} never run")
            )
            warnings.append(
                f"{name} is defined {len(numbers)} times in {path} (lines {first} and "
                f"{numbers[-1]}); Python keeps only the last, so {lost}: merge them into one"
                " function"
            )
    return warnings
