"""The registry as the kernel, the CLI and the daemon use it.

:class:`Registry` puts the safety rules in front of the store: every source is
checked (:func:`~llmos.registry.sources.check_source`) before anything is
written, scans and pushes go through the same door, and cards offered by
plugins (``llmos_discover_models``) are registered only when they changed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import attrs
import structlog

from llmos.errors import LlmosError
from llmos.registry.artifacts import artifact_dir, store_upload
from llmos.registry.scan import ScanResult, scan
from llmos.registry.sources import SourcePolicy, check_source, policy_from_config
from llmos.registry.store import RegistryStore, SQLiteStore
from llmos.types import ModelCard, ModelFormat

if TYPE_CHECKING:
    from llmos.config import Config
    from llmos.plugin.manager import Registered

log = structlog.get_logger("llmos.registry")

#: the registry database inside the data folder
DATABASE = "registry.db"


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

    def __init__(self, store: RegistryStore, policy: SourcePolicy, home: Path) -> None:
        self.store = store
        self.policy = policy
        self.home = Path(home)

    @classmethod
    def from_config(cls, config: Config) -> Registry:
        """The SQLite registry in the data folder, with the ``[registry]`` policy."""
        config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
        return cls(SQLiteStore(config.home / DATABASE), policy_from_config(config), config.home)

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

    def register(
        self, card: ModelCard, created_by: str | None = None, *, if_changed: bool = False
    ) -> ModelCard:
        """Check the card's source, then register it as the name's next version."""
        return self.store.register(self.checked(card), created_by, if_changed=if_changed)

    def scan(self, path: Path, created_by: str | None = None) -> tuple[list[ModelCard], ScanResult]:
        """Register the Hugging Face folders and GGUF files under ``path``
        (unchanged ones are not registered again)."""
        result = scan(Path(path), self.policy)
        registered = [
            self.store.register(card, created_by, if_changed=True) for card in result.cards
        ]
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
                stored = self.register(card, f"{created_by}:{item.plugin}", if_changed=True)
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
        taking precedence. Nothing is stored when a check fails.
        """
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
            return self.store.register(ModelCard.from_dict(base), created_by)
        except BaseException:
            shutil.rmtree(dest, ignore_errors=True)
            raise

    def _latest_version(self, name: str) -> int | None:
        try:
            return self.store.get(name).version
        except LlmosError:
            return None
