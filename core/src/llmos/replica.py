"""The far side of an executor: what runs where it places models and jobs.

An executor plugin (``llmos_register_executors``) puts a served model on
another process or node with a :class:`~llmos.types.PlacementRequest`, and a
tuning job with its worker payload. There, its code builds what the kernel
would build here — from the same plugins, installed on that node — with:

* :class:`Replica` — the model loaded by the provider the request names
  (found through the ``llmos`` entry points of *that* process and checked by
  the provider's ``check`` again), behind a worker with the kernel's batching
  settings: ``submit`` and ``submit_stream`` answer as the kernel's own
  workers do (a future, a chunk stream), so requests that reach one replica
  together share its model calls;
* :func:`start_job` — a tuning job's worker process, started on that node,
  which reads its data, writes its checkpoints and output in the job's
  folders (on storage the kernel's node shares) and reports through the
  returned :class:`~llmos.types.JobHandle`;
* :class:`StreamHandle` — the kernel's chunk stream (``put``, ``finish``,
  ``get``, ``cancel``, iteration), for the kernel side of an executor to hand
  back chunks that arrive from a replica as ``submit_stream``'s result.

This is public API for plugins, like :mod:`llmos.types`: an executor plugin
imports this module, not the kernel's runtime.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import attrs
import structlog

from llmos.errors import NotFoundError
from llmos.plugin.manager import PluginManager
from llmos.registry.fsstore import ArtifactStore
from llmos.registry.service import executor_tables, provider_checked
from llmos.registry.sources import check_source
from llmos.runtime.models import PROVIDER_PACKAGES, Worker, load_model, worker_for
from llmos.runtime.worker import BatchSettings, StreamHandle
from llmos.tuning.worker import WorkerPayload, start_worker
from llmos.types import (
    Capability,
    ChunkStream,
    JobHandle,
    LoadRequest,
    ModelCard,
    MonitorEvent,
    PlacementRequest,
)

__all__ = ["Replica", "StreamHandle", "start_job"]

log = structlog.get_logger("llmos.replica")


def _drop(event: MonitorEvent) -> None:
    """A replica's events when its executor relays none."""


class Replica:
    """One placed model, loaded in this process (see the module docstring).

    ``home`` is this node's folder for the provider's cache (converted
    weights); ``emit`` gets every call's ``request`` event and what the
    provider measures (an executor relays them to the kernel's sinks);
    ``plugins`` is the plugin manager to find the provider in (default: one
    loaded from this process's entry points).
    """

    def __init__(
        self,
        request: PlacementRequest,
        *,
        home: Path,
        emit: Callable[[MonitorEvent], None] | None = None,
        plugins: PluginManager | None = None,
    ) -> None:
        if plugins is None:
            plugins = PluginManager()
        plugins.load()
        registered = plugins.providers.get(request.provider)
        if registered is None:
            package = PROVIDER_PACKAGES.get(request.provider, "the plugin that provides it")
            raise NotFoundError(
                f"model {request.key!r} needs provider {request.provider!r}, which no plugin"
                f" of this replica's process offers; install {package} on every node the"
                " executor places models on"
            )
        events = emit or _drop
        # the card's tables for executors (its own among them) are not the provider's
        shown, _ = executor_tables(request.card, plugins.executors.keys())
        card = provider_checked(registered.spec, registered.plugin, shown, request.options)
        cache_dir = Path(home) / "cache" / registered.spec.name
        cache_dir.mkdir(parents=True, exist_ok=True)
        path, base_path = request.path, request.base_path
        if isinstance(request.artifacts, ArtifactStore):
            # artifacts at a URL root come from there into this node's own cache
            node = attrs.evolve(request.artifacts, cache=Path(home) / "cache" / "artifacts")
            path = _fetched(node, request.card.source) or path
            if request.base is not None:
                base_path = _fetched(node, request.base.source) or base_path
        load = LoadRequest(
            card=card,
            options=request.options,
            path=None if path is None else Path(path),
            cache_dir=cache_dir,
            base=request.base,
            base_path=None if base_path is None else Path(base_path),
            emit=events,
            artifacts=request.artifacts,
        )
        log.info("replica.loading", model=request.key, provider=request.provider)
        model = load_model(registered.spec, load, request.key)
        settings = BatchSettings(
            max_batch_size=request.max_batch_size,
            max_wait_ms=request.max_wait_ms,
            max_queue=request.max_queue,
            batching=request.batching and registered.spec.batching,
        )
        self.key = request.key
        self.worker: Worker = worker_for(request.key, model, settings, events)

    @property
    def card(self) -> ModelCard:
        return self.worker.card

    @property
    def capabilities(self) -> frozenset[Capability]:
        return frozenset(self.worker.model.capabilities)

    @property
    def queued(self) -> int:
        """Requests waiting for the model here (not yet in a call)."""
        return self.worker.queued

    def submit(self, capability: Capability, requests: Any) -> Any:
        """Queue one caller's requests; a :class:`concurrent.futures.Future`
        gets their results (``await asyncio.wrap_future(...)`` in async code)."""
        return self.worker.submit(Capability(capability), requests)

    def submit_stream(self, request: Any) -> ChunkStream:
        """Queue one streamed request; read its chunks from the handle."""
        return self.worker.submit_stream(request)

    def close(self) -> None:
        """Finish what is queued, then release the model."""
        self.worker.close()


def _fetched(store: ArtifactStore, source: str | None) -> str | None:
    """The local copy of ``source`` where it is an artifact at the store's URL
    root (fetched and verified into ``store``'s cache), else ``None``."""
    if not source or not store.owns(source):
        return None
    parsed = check_source(source, attrs.evolve(store.limits, artifacts=store))
    return None if parsed.path is None else str(parsed.path)


def start_job(payload: Mapping[str, Any]) -> JobHandle:
    """Start a tuning job's worker process here for ``payload`` (what
    ``Executor.start_job`` was given), with this process's ``sys.path``: the
    plugins installed on this node serve it. Returns at once."""
    fields = dict(payload)
    fields["sys_path"] = tuple(sys.path)
    fields["labels"] = tuple(fields.get("labels") or ())
    return start_worker(WorkerPayload(**fields))
