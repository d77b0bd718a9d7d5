"""The registry as the kernel, the CLI and the daemon use it.

:class:`Registry` puts the safety rules in front of the store: every source is
checked (:func:`~llmos.registry.sources.check_source`) before anything is
written, scans and pushes go through the same door, and cards offered by
plugins (``llmos_discover_models``) are registered only when they changed.

Built by the kernel, it also knows the installed providers
(:class:`Providers`): every card is shown to its provider's ``check``
(:attr:`~llmos.types.ProviderSpec.check`) with the operator's
``[plugins.<plugin>]`` table before it is stored, and a card someone wrote
(:meth:`Registry.submit`: the HTTP API, the CLI, a push naming a provider,
a plugin's discovered cards) must name an installed provider and may not
pose as a fusion or a deployment group — a version that nothing can serve
would otherwise shadow a working one as the name's ``latest``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Collection, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from llmos.errors import LlmosError, PluginError, UsageError
from llmos.registry.artifacts import artifact_dir, store_upload
from llmos.registry.scan import ScanResult, scan
from llmos.registry.sources import SourcePolicy, check_source
from llmos.registry.store import RegistryStore
from llmos.types import CheckRequest, ModelCard, ModelFormat, ProviderSpec

if TYPE_CHECKING:
    from llmos.plugin.manager import Registered

log = structlog.get_logger("llmos.registry")

#: the registry database inside the data folder
DATABASE = "registry.db"
#: the provider of fusion cards (the kernel's own, :mod:`llmos.fusion.service`)
FUSION_PROVIDER = "fusion"
#: the provider of deployment groups (the kernel's own, :mod:`llmos.runtime.router`)
GROUP_PROVIDER = "group"
#: models the kernel makes itself, never registered from a card someone wrote:
#: provider -> (the format of their cards, how one is made)
KERNEL_MADE: Mapping[str, tuple[ModelFormat, str]] = {
    FUSION_PROVIDER: (
        ModelFormat.FUSION,
        "a fusion is made with `llmos fuse create` or POST /api/fusions, which check its"
        " members and strategy",
    ),
    GROUP_PROVIDER: (
        ModelFormat.GROUP,
        "a deployment group is declared in config, as a [groups.NAME] table",
    ),
}
#: providers of first-party plugins, and the distribution that brings each
FIRST_PARTY_PROVIDERS = {
    "transformers": "llmos-transformers",
    "vllm": "llmos-vllm",
    "openai-compatible": "llmos-openai",
    "llm": "llmos-llm-bridge",
    "example-keyword": "llmos-example",
}


def _no_executors() -> Collection[str]:
    return ()


@attrs.frozen
class Providers:
    """What the registry checks cards against: the installed providers by
    name, a plugin's ``[plugins.<plugin>]`` table, and the names of the
    installed executors (a card's ``options.<executor>`` table is theirs,
    not its provider's: :func:`executor_tables`). Functions, so that
    plugins loaded after the registry was opened count."""

    installed: Callable[[], Mapping[str, Registered[ProviderSpec]]]
    options: Callable[[str], Mapping[str, Any]]
    executors: Callable[[], Collection[str]] = _no_executors


def executor_tables(
    card: ModelCard, executors: Collection[str]
) -> tuple[ModelCard, dict[str, Any]]:
    """``card`` without the entries of its options named for an executor,
    and those entries: ``options = {"ray": {"num_replicas": 2}}`` is
    llmos-ray's, for the replicas it places the model on — how the model is
    placed, not how it is loaded — so no provider is shown it, and the
    executor that places the model gets it on ``PlacementRequest.card``."""
    tables = {key: value for key, value in card.options.items() if key in executors}
    if not tables:
        return card, {}
    kept = {key: value for key, value in card.options.items() if key not in tables}
    return attrs.evolve(card, options=kept), tables


def provider_checked(
    spec: ProviderSpec,
    plugin: str,
    card: ModelCard,
    options: Mapping[str, Any],
    executors: Collection[str] = (),
) -> ModelCard:
    """``card`` with the options its provider's ``check`` returns (``card``
    itself when the provider has no check). The check is shown the card
    without the tables named for one of ``executors``, which the returned
    card keeps as they were (:func:`executor_tables`).

    :raises LlmosError: what the check raised (a card it refuses).
    :raises PluginError: the check failed in another way, or returned no mapping.
    """
    check = spec.check
    if check is None:
        return card
    shown, tables = executor_tables(card, executors)
    where = f"provider {spec.name!r} (plugin {plugin})"
    try:
        checked = check(CheckRequest(card=shown, options=options))
    except LlmosError:
        raise
    except Exception as exc:
        raise PluginError(
            f"{where} failed checking model {card.ref!r}: {type(exc).__name__}: {exc}"
        ) from exc
    if not isinstance(checked, Mapping):
        raise PluginError(
            f"{where}: its check returned {type(checked).__name__}, not the card's options"
        )
    merged = {**checked, **tables}
    return card if merged == card.options else attrs.evolve(card, options=merged)


def _kernel_made(card: ModelCard) -> tuple[str, str] | None:
    """``(field, how it is made)`` for a card posing as a model the kernel makes."""
    for provider, (fmt, how) in KERNEL_MADE.items():
        if card.provider == provider or card.format == fmt:
            return ("provider" if card.provider == provider else "format"), how
    return None


def unknown_provider(
    provider: str, installed: Mapping[str, Registered[ProviderSpec]]
) -> UsageError:
    """The error for a card naming a provider that is not installed."""
    have = (
        ", ".join(
            f"{name} ({r.plugin})"
            for name, r in sorted(installed.items())
            if name not in KERNEL_MADE
        )
        or "none"
    )
    dist = FIRST_PARTY_PROVIDERS.get(provider)
    how = (
        f"install it with `pip install {dist}`"
        if dist is not None
        else "install the plugin that provides it, or pick one of those"
    )
    return UsageError(
        f"provider {provider!r} is not installed (installed providers: {have}); {how}"
        " — `llmos plugins` lists what is loaded",
        param="provider",
    )


@attrs.frozen
class DiscoverReport:
    """What registering the cards offered by model sources did."""

    registered: list[ModelCard] = attrs.Factory(list)
    unchanged: list[str] = attrs.Factory(list)
    #: ``(plugin, card name, reason)`` for cards that were refused
    refused: list[tuple[str, str, str]] = attrs.Factory(list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "registered": [card.ref for card in self.registered],
            "unchanged": list(self.unchanged),
            "refused": [
                {"plugin": plugin, "name": name, "reason": reason}
                for plugin, name, reason in self.refused
            ],
        }


class Registry:
    """Model cards with their versions, aliases and search, behind the safety checks."""

    def __init__(
        self,
        store: RegistryStore,
        policy: SourcePolicy,
        home: Path,
        providers: Providers | None = None,
    ) -> None:
        self.store = store
        self.policy = policy
        self.home = Path(home)
        #: the installed providers; ``None`` (a bare registry in a tool or a
        #: test) checks sources only
        self.providers = providers

    def close(self) -> None:
        self.store.close()

    def checked(self, card: ModelCard) -> ModelCard:
        """``card`` with its source checked and written in canonical form.

        :raises UnsafeSourceError: saying why the source is refused.
        """
        if not card.source:
            return card
        parsed = check_source(card.source, self.policy)
        return attrs.evolve(card, source=parsed.value)

    def admitted(self, card: ModelCard, *, named: bool = False) -> ModelCard:
        """``card`` as its provider's check returns it.

        ``named``: someone chose the provider (a card written by hand, a
        push's ``provider``, a plugin's card), so it must be installed, and a
        fusion or group card is refused — the kernel makes those (the fusion
        service, which checks members and strategy; config). Otherwise (a kernel service, or
        the provider llmos itself guessed for scanned weights) a provider
        that is not installed yet is let through: loading the model says
        what to install.
        """
        if (made := _kernel_made(card)) is not None:
            if named:
                field, how = made
                raise UsageError(
                    f"model {card.name!r}: {field} {str(getattr(card, field))!r} is not registered"
                    f" from a card; {how}",
                    param=field,
                )
            return card
        if self.providers is None:
            return card
        installed = self.providers.installed()
        registered = installed.get(card.provider)
        if registered is None:
            if named:
                raise unknown_provider(card.provider, installed)
            return card
        return provider_checked(
            registered.spec,
            registered.plugin,
            card,
            self.providers.options(registered.plugin),
            self.providers.executors(),
        )

    def require_provider(self, provider: str) -> None:
        """Refuse a provider someone names that no card could be served by:
        one that is not installed, or the fusion service's own (checked before
        a push's body is read)."""
        if provider in KERNEL_MADE:
            raise UsageError(
                f"provider {provider!r} is the kernel's own; {KERNEL_MADE[provider][1]}",
                param="provider",
            )
        if self.providers is not None:
            installed = self.providers.installed()
            if provider not in installed:
                raise unknown_provider(provider, installed)

    def register(
        self, card: ModelCard, created_by: str | None = None, *, if_changed: bool = False
    ) -> ModelCard:
        """Check the card's source and options (its provider's check, when the
        provider is installed), then register it as the name's next version.

        The door of the kernel's own services (fusions, tuning); a card
        someone wrote goes through :meth:`submit`.
        """
        card = self.admitted(self.checked(card))
        return self.store.register(card, created_by, if_changed=if_changed)

    def submit(
        self, card: ModelCard, created_by: str | None = None, *, if_changed: bool = False
    ) -> ModelCard:
        """:meth:`register` for a card someone wrote: its provider must be
        installed, and it may not be a fusion or a group."""
        card = self.admitted(self.checked(card), named=True)
        return self.store.register(card, created_by, if_changed=if_changed)

    def scan(self, path: Path, created_by: str | None = None) -> tuple[list[ModelCard], ScanResult]:
        """Register the Hugging Face folders and GGUF files under ``path``
        (unchanged ones are not registered again); a card its provider's
        check refuses is skipped with the reason."""
        result = scan(Path(path), self.policy)
        registered: list[ModelCard] = []
        refused: list[tuple[Path, str]] = []
        for card in result.cards:
            try:
                admitted = self.admitted(card)
            except LlmosError as exc:
                refused.append((Path(card.source), exc.message))
                continue
            registered.append(self.store.register(admitted, created_by, if_changed=True))
        if refused:
            result = attrs.evolve(result, skipped=[*result.skipped, *refused])
        return registered, result

    def discover(
        self, offered: Sequence[Registered[ModelCard]], created_by: str = "discovery"
    ) -> DiscoverReport:
        """Register what model-source plugins offer; a card that is refused
        (bad source, invalid field) is reported and skipped, not fatal."""
        report = DiscoverReport()
        for item in offered:
            card = item.spec
            try:
                before = self._latest_version(card.name)
                stored = self.submit(card, f"{created_by}:{item.plugin}", if_changed=True)
            except LlmosError as exc:
                report.refused.append((item.plugin, card.name, exc.message))
                log.warning(
                    "registry.discover_refused", plugin=item.plugin, model=card.name, error=str(exc)
                )
                continue
            if stored.version == before:
                report.unchanged.append(stored.ref)
            else:
                report.registered.append(stored)
        return report

    def push(
        self, name: str, upload: Path, created_by: str | None = None, **fields: Any
    ) -> ModelCard:
        """Store an uploaded folder, archive or weights file under the data
        folder and register it as the next version of ``name``.

        The card is what a scan of the stored files says (family, size, tasks,
        format), with ``name`` and any ``fields`` given (description, tags …)
        taking precedence. A ``provider`` given must be installed (see
        :meth:`admitted`). Nothing is stored when a check fails. With a shared
        artifact store (``[artifacts] root`` set) the checked files are put
        there and the card names their address, so that every daemon of a
        cluster can load what one was sent.
        """
        named = fields.get("provider") not in (None, "")
        if named:
            self.require_provider(fields["provider"])
        dest = artifact_dir(self.home, name)
        store_upload(Path(upload), dest, self.policy)
        try:
            found = scan(dest, self.policy).cards
            base: dict[str, Any] = (
                found[0].to_dict()
                if len(found) == 1
                else {"provider": "transformers", "format": str(ModelFormat.OTHER)}
            )
            base.pop("created_at", None)
            base.pop("version", None)
            base.update({k: v for k, v in fields.items() if v not in (None, (), [])})
            base.update(name=name, source=str(dest))
            card = self.admitted(ModelCard.from_dict(base), named=named)
            shared = self.policy.artifacts
            if shared is not None and shared.shared:
                card = attrs.evolve(card, source=shared.put(dest, name))
                shutil.rmtree(dest, ignore_errors=True)  # the store (and its cache) has it
            return self.store.register(card, created_by)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    def _latest_version(self, name: str) -> int | None:
        try:
            return self.store.get(name).version
        except LlmosError:
            return None
