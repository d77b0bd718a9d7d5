"""What crosses between the kernel's process and a replica: plain picklable values.

A :class:`~llmos.types.LoadRequest` holds the kernel's ``emit`` (a bound
method of the kernel: it cannot travel), so the kernel side sends a
:class:`ModelSpec` — the same facts, checked already (source policy, the
provider's ``check``) — and the replica builds its own ``LoadRequest`` with
an ``emit`` that reaches the kernel through the event queue actor.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from llmos.types import LoadRequest, ModelCard

__all__ = ["Answer", "ModelSpec"]


@attrs.frozen(kw_only=True)
class ModelSpec:
    """A model to load on a replica, as the kernel resolved and checked it."""

    #: the deployment's key (``name`` or ``name@version``): events carry it
    key: str
    card: ModelCard
    #: the plugin that registers the provider: the only plugin a replica loads
    plugin: str
    #: the provider plugin's ``[plugins.<plugin>]`` table
    options: Mapping[str, Any] = attrs.field(factory=dict)
    path: Path | None = None
    cache_dir: Path | None = None
    base: ModelCard | None = None
    base_path: Path | None = None
    #: the kernel's batching of this model, kept on the replica
    max_batch_size: int = 8
    max_wait_ms: float = 0.0

    @classmethod
    def from_load_request(
        cls,
        key: str,
        plugin: str,
        request: LoadRequest,
        *,
        max_batch_size: int = 8,
        max_wait_ms: float = 0.0,
    ) -> ModelSpec:
        """The spec of what the kernel would have loaded in process."""
        return cls(
            key=key,
            card=request.card,
            plugin=plugin,
            options=dict(request.options),
            path=request.path,
            cache_dir=request.cache_dir,
            base=request.base,
            base_path=request.base_path,
            max_batch_size=max_batch_size,
            max_wait_ms=max_wait_ms,
        )

    def load_request(self, emit: Any) -> LoadRequest:
        """The provider's ``LoadRequest`` on the replica; the card without its ``ray`` options."""
        card = self.card
        if "ray" in card.options:
            card = attrs.evolve(card, options={k: v for k, v in card.options.items() if k != "ray"})
        return LoadRequest(
            card=card,
            options=self.options,
            path=self.path,
            cache_dir=self.cache_dir,
            base=self.base,
            base_path=self.base_path,
            emit=emit,
        )


@attrs.frozen(kw_only=True)
class Answer:
    """One caller's results from a replica, with what the kernel's request event needs."""

    results: list[Any]
    #: queue_wait_s, model_s, batch_size (the replica's clock)
    timing: Mapping[str, float]
    #: the replica that answered (Serve's replica id)
    replica: str
