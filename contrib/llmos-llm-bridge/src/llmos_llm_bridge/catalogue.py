"""What llm knows: its plugins, loaded one at a time, and the models they register.

llm loads its plugins with one ``pluggy`` call that stops at the first plugin
that fails to import, and asks every plugin for its models with one hook call
that stops at the first plugin that raises; either way nothing is left.
llmos must never fail because one of llm's plugins is broken (a plugin
installed without its dependencies, say), so this module does the same work
plugin by plugin: a broken llm plugin is logged once as a warning
(``llm_bridge.llm_plugin_failed``) and skipped, and the models of the others
are still offered and served.

Only llm's public surface is used: its ``pm`` (a ``pluggy.PluginManager``),
``load_plugins()``, and the ``register_models`` / ``register_embedding_models``
hooks. ``LLM_LOAD_PLUGINS`` is respected: when it is set, llm loads exactly
the plugins it names, as it always does.
"""

from __future__ import annotations

import hashlib
import importlib
import re
import sys
import threading
from collections.abc import Callable, Iterable
from importlib import metadata
from typing import Any

import attrs
import structlog

from llmos.errors import NotFoundError
from llmos.types import NAME_MAX_LENGTH

log = structlog.get_logger("llmos_llm_bridge")

__all__ = [
    "PREFIX",
    "Catalogue",
    "Entry",
    "card_names",
    "catalogue",
    "find",
    "sanitize",
]

#: every card this plugin offers is named ``llm/<sanitized llm model id>``
PREFIX = "llm/"

CHAT = "chat"
EMBEDDING = "embedding"

_lock = threading.RLock()
#: llm plugin -> why it is unusable; each is logged once per process
_broken: dict[str, str] = {}


@attrs.frozen
class Entry:
    """One model an llm plugin registers."""

    model_id: str
    #: ``chat`` (an ``llm.Model``: prompts, conversations) or ``embedding``
    kind: str
    #: the llm model object; a fresh instance every time the catalogue is read
    model: Any
    aliases: tuple[str, ...]
    #: the distribution that registered it (``llm`` for llm's built-in models)
    distribution: str
    version: str


@attrs.frozen
class Catalogue:
    entries: tuple[Entry, ...]
    #: ``(llm plugin, error)`` for each llm plugin that could not be used
    failures: tuple[tuple[str, str], ...]

    def of_kind(self, kind: str) -> list[Entry]:
        return [e for e in self.entries if e.kind == kind]


def _describe(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _report(plugin: str, error: str, failures: list[tuple[str, str]]) -> None:
    failures.append((plugin, error))
    if plugin not in _broken:
        _broken[plugin] = error
        log.warning(
            "llm_bridge.llm_plugin_failed",
            llm_plugin=plugin,
            error=error,
            hint="its models are skipped; the other llm plugins' models are served",
        )


def _load_plugins(failures: list[tuple[str, str]]) -> Any:
    """Import llm and load its plugins, skipping (and blocking) the broken ones."""
    import llm
    from llm import plugins as llm_plugins

    pm = llm.pm
    # As llm.load_plugins() decides: every installed plugin, unless
    # LLM_LOAD_PLUGINS names some (or llm's own test suite is running).
    everything = getattr(llm_plugins, "LLM_LOAD_PLUGINS", None) is None and not hasattr(
        sys, "_called_from_test"
    )
    if everything:
        for ep in metadata.entry_points(group="llm"):
            who = ep.dist.name if ep.dist is not None else ep.name
            if pm.is_blocked(ep.name):
                _report(who, _broken.get(who, "blocked"), failures)
                continue
            if pm.get_plugin(ep.name) is not None:
                continue
            try:
                ep.load()
            except Exception as exc:
                # Blocked, llm's own loader skips it instead of stopping there.
                pm.set_blocked(ep.name)
                _report(who, f"import failed: {_describe(exc)}", failures)
    try:
        llm.load_plugins()  # once per process: llm's own loading, its built-in plugins
        if everything:
            # Plugins installed since (pip install llm-foo under a running
            # daemon): what is registered or blocked already is skipped.
            pm.load_setuptools_entrypoints("llm")
    except Exception as exc:
        # A plugin imported but could not register (an invalid hook), or
        # LLM_LOAD_PLUGINS names a broken one. llm's loader stopped there;
        # its built-in plugins (the OpenAI models) still belong in the list.
        _report("llm", f"loading llm plugins failed: {_describe(exc)}", failures)
        for name in getattr(llm_plugins, "DEFAULT_PLUGINS", ()):
            if pm.get_plugin(name) is None and not pm.is_blocked(name):
                try:
                    pm.register(importlib.import_module(name), name)
                except Exception as inner:
                    _report(name, _describe(inner), failures)
    return llm


def _distributions(pm: Any, llm_version: str) -> dict[int, tuple[str, str]]:
    """``id(plugin module) -> (distribution, version)``."""
    out: dict[int, tuple[str, str]] = {}
    for plugin, dist in pm.list_plugin_distinfo():
        name = getattr(dist, "project_name", None) or dist.metadata["Name"]
        out[id(plugin)] = (name, dist.version)
    for plugin in pm.get_plugins():
        name = pm.get_name(plugin) or getattr(plugin, "__name__", "?")
        # llm's built-in plugins (llm.default_plugins.*) have no entry point;
        # a plugin registered in-process by its own code has no distribution.
        origin = ("llm", llm_version) if name.startswith("llm.") else (name, "")
        out.setdefault(id(plugin), origin)
    return out


def _gather(
    hook: Any,
    make_register: Callable[[str, str], Callable[..., None]],
    extra: dict[str, Any],
    dists: dict[int, tuple[str, str]],
    failures: list[tuple[str, str]],
) -> None:
    # pluggy calls the most recently registered implementation first; so do we,
    # so that a model id two plugins register resolves as llm resolves it.
    for impl in reversed(hook.get_hookimpls()):
        if getattr(impl, "hookwrapper", False) or getattr(impl, "wrapper", False):
            continue
        distribution, version = dists.get(id(impl.plugin), (impl.plugin_name, ""))
        register = make_register(distribution, version)
        available = {"register": register, **extra}
        try:
            impl.function(**{name: available[name] for name in impl.argnames})
        except Exception as exc:
            _report(distribution, f"{hook.name} raised {_describe(exc)}", failures)


def catalogue() -> Catalogue:
    """Every model llm's loaded plugins register, each plugin on its own.

    Each call asks the plugins again, so each entry's ``model`` is a fresh
    instance (llm's plugins build new model objects on every
    ``register_models`` call): a loaded llmos model never shares its llm
    model object with another.
    """
    failures: list[tuple[str, str]] = []
    with _lock:
        llm = _load_plugins(failures)
        try:
            llm_version = metadata.version("llm")
        except metadata.PackageNotFoundError:
            llm_version = "?"
        dists = _distributions(llm.pm, llm_version)
        entries: list[Entry] = []

        def chat_register(distribution: str, version: str) -> Callable[..., None]:
            def register(model: Any, async_model: Any = None, aliases: Iterable[str] = ()) -> None:
                if model is None:  # an async-only model: the bridge serves sync models
                    return
                entries.append(
                    Entry(model.model_id, CHAT, model, tuple(aliases or ()), distribution, version)
                )

            return register

        def embedding_register(distribution: str, version: str) -> Callable[..., None]:
            def register(model: Any, aliases: Iterable[str] = ()) -> None:
                entries.append(
                    Entry(
                        model.model_id,
                        EMBEDDING,
                        model,
                        tuple(aliases or ()),
                        distribution,
                        version,
                    )
                )

            return register

        _gather(
            llm.pm.hook.register_models,
            chat_register,
            {"model_aliases": []},
            dists,
            failures,
        )
        _gather(llm.pm.hook.register_embedding_models, embedding_register, {}, dists, failures)
    return Catalogue(tuple(entries), tuple(failures))


def find(cat: Catalogue, kind: str, name: str) -> Entry:
    """The ``kind`` entry whose model id (or, failing that, an alias) is ``name``.

    As in llm, a later registration of the same id wins. Unknown: a
    :class:`~llmos.errors.NotFoundError` that lists the installed ids and the
    llm plugins that could not be loaded.
    """
    entries = cat.of_kind(kind)
    by_id = {e.model_id: e for e in entries}
    if name in by_id:
        return by_id[name]
    by_alias = {alias: e for e in entries for alias in e.aliases}
    if name in by_alias:
        return by_alias[name]
    ids = sorted(by_id)
    shown = ", ".join(ids[:40]) + (f" … and {len(ids) - 40} more" if len(ids) > 40 else "")
    what = "model" if kind == CHAT else "embedding model"
    message = (
        f"llm has no {what} {name!r}; installed: {shown or 'none'}."
        " Install the llm plugin that provides it (`llm install llm-<vendor>`"
        " or `pip install llm-<vendor>`); `llm models` lists llm's models"
    )
    if cat.failures:
        broken = "; ".join(f"{plugin} ({error})" for plugin, error in cat.failures)
        message += f". llm plugins that could not be loaded: {broken}"
    raise NotFoundError(message)


_INVALID = re.compile(r"[^a-z0-9._-]+")


def sanitize(model_id: str) -> str:
    """An llm model id as the part of an llmos model name after ``llm/``.

    Lowercased; each run of characters outside ``a-z 0-9 . _ -`` (``/``,
    ``:``, spaces …) becomes one ``-``; ``..`` becomes ``.``; leading
    punctuation is dropped. ``anthropic/claude-3-opus`` →
    ``anthropic-claude-3-opus``, ``llama3:8b`` → ``llama3-8b``.
    """
    out = _INVALID.sub("-", model_id.lower())
    while ".." in out:
        out = out.replace("..", ".")
    out = out.lstrip("._-")
    return out or "model"


def _digest(model_id: str) -> str:
    return hashlib.sha1(model_id.encode()).hexdigest()[:8]


def card_names(entries: Iterable[Entry]) -> dict[tuple[str, str], str]:
    """``(kind, model id) -> llmos model name``, unique and valid.

    ``llm/`` + :func:`sanitize`\\ (id). Where two ids sanitize to one name (or
    a chat and an embedding model share an id), the first in order — chat
    models before embedding models, each sorted by id — keeps it and the
    others get ``-<8 hex digits of the id's SHA-1>``; an id too long for the
    128-character limit is cut and gets the same suffix. The names do not
    depend on the order plugins register in.
    """
    names: dict[tuple[str, str], str] = {}
    taken: set[str] = set()
    limit = NAME_MAX_LENGTH - len(PREFIX)
    keys = sorted({(e.kind, e.model_id) for e in entries}, key=lambda k: (k[0] != CHAT, k))
    for kind, model_id in keys:
        stem = sanitize(model_id)
        if len(stem) > limit:
            stem = stem[: limit - 9].rstrip("._-") + "-" + _digest(model_id)
        if stem in taken:
            stem = stem[: limit - 9].rstrip("._-") + "-" + _digest(f"{kind}:{model_id}")
        taken.add(stem)
        names[(kind, model_id)] = PREFIX + stem
    return names
