"""The replica: one Serve replica serves a placed model with llmos's own replica.

On a replica the model is built the way the kernel builds it in process:
:class:`llmos.replica.Replica` (llmos's public far side of an executor)
loads it with the provider the :class:`~llmos.types.PlacementRequest` names,
found through the entry points of the replica's process, and runs it behind
the kernel's own worker with the kernel's batching settings. Serve lets up to
``max_ongoing_requests`` calls into a replica at once; they queue in that
worker, and those that queue together share one model call — llmos's
batching, on the replica.

LoRA adapters are Serve multiplexed models: a call for an adapter carries its
placement and Serve's ``multiplexed_model_id``; the replica loads it (an
``adapter`` card on the base, through the provider) on first use and keeps
the most recently used ones (Serve evicts the rest, and their worker is
closed).

Each call's answer carries the worker's timing of it (queue wait, model
time, batch size) and the replica's id; the daemon that made the call makes
its ``request`` event from them, so daemons sharing a deployment each count
their own calls. The replica's own events (``ray.replica.loaded``, and what a
provider emits outside a call's ``request``) go to the event queue actor of
every daemon holding the deployment (:mod:`llmos_ray.events`,
:mod:`llmos_ray.placements`), marked with the replica's id.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import attrs
import ray
import structlog
from ray import serve

from llmos.replica import Replica
from llmos.types import Capability, MonitorEvent, PlacementRequest
from llmos_ray.placements import NAME as PLACEMENTS
from llmos_ray.wire import Answer

__all__ = ["ModelReplica"]

log = structlog.get_logger("llmos.ray")

#: how many adapters a replica keeps loaded (Serve's multiplexing cache)
MAX_ADAPTERS = 4
#: how often a replica sends the events it has to the kernel's event queue
FLUSH_S = 0.1


class ModelReplica:
    """A Serve deployment class: ``call``, ``stream``, ``describe``."""

    def __init__(self, request: PlacementRequest, home: str, app: str, namespace: str) -> None:
        self.key = request.key
        self.home = Path(home)
        self.app = app
        self.namespace = namespace
        self._placements = ray.get_actor(PLACEMENTS, namespace=namespace)
        self._queues: dict[str, Any] = {}
        # events leave in batches: an actor call per request event would cost each call
        self._outbox: list[MonitorEvent] = []
        self._outbox_lock = threading.Lock()
        threading.Thread(target=self._flush_every, name="llmos-ray-events", daemon=True).start()
        self.replica = serve.get_replica_context().replica_id.unique_id
        self.node = ray.get_runtime_context().get_node_id()
        started = time.perf_counter()
        self.model = Replica(request, home=self.home, emit=self.emit)
        self.emit(
            MonitorEvent(
                kind="ray.replica.loaded",
                model=request.key,
                fields={
                    "load_s": time.perf_counter() - started,
                    "provider": request.provider,
                    "node": self.node,
                },
            )
        )

    def emit(self, event: MonitorEvent) -> None:
        """To the sinks of every daemon holding the deployment, through their
        event queues (in batches, every ``FLUSH_S``), marked with this
        replica; never blocks, never raises. A call's ``request`` event is the
        calling daemon's to make (from the answer's timing), not sent here."""
        if event.kind == "request":
            return
        event = attrs.evolve(event, fields={**event.fields, "replica": self.replica})
        with self._outbox_lock:
            self._outbox.append(event)

    def _flush_every(self) -> None:
        while True:
            time.sleep(FLUSH_S)
            with self._outbox_lock:
                batch, self._outbox = self._outbox, []
            if batch:
                try:
                    self._send(batch)
                except Exception as exc:  # events are not worth a failed call
                    log.warning("ray.events_lost", events=len(batch), error=repr(exc))

    def _send(self, batch: list[MonitorEvent]) -> None:
        names = ray.get(self._placements.queues.remote(self.app), timeout=30)
        for name in names:
            queue = self._queues.get(name)
            if queue is None:
                try:
                    queue = self._queues[name] = ray.get_actor(name, namespace=self.namespace)
                except ValueError:  # that daemon just went
                    continue
            queue.put.remote(batch)
        for gone in set(self._queues) - set(names):
            del self._queues[gone]

    def describe(self) -> dict[str, Any]:
        """What the kernel side needs to know of the model it serves."""
        model = self.model.worker.model
        return {
            "capabilities": sorted(str(c) for c in self.model.capabilities),
            "supports_logprobs": bool(getattr(model, "supports_logprobs", False)),
            "chat_features": sorted(getattr(model, "chat_features", ())),
            "replica": self.replica,
            "node": self.node,
            "pid": os.getpid(),
        }

    # -- calls ---------------------------------------------------------------

    async def call(
        self, capability: str, requests: list[Any], adapter: PlacementRequest | None = None
    ) -> Answer:
        """One caller's requests, queued in the replica's worker with the
        other callers'; raises what the model raised for them. A caller that
        goes away (Serve cancels this call) cancels its future: the worker
        drops it, or stops the model call once all its callers are gone."""
        replica = self.model if adapter is None else await self._adapter(adapter)
        future = replica.submit(Capability(capability), requests)
        results = await asyncio.wrap_future(future)
        timing = dict(getattr(future, "timing", {}))
        return Answer(results=results, timing=timing, replica=self.replica)

    async def stream(
        self, request: Any, adapter: PlacementRequest | None = None
    ) -> AsyncIterator[Any]:
        """This replica's id, then the chunks of one streamed request as the
        model yields them; a caller that goes away (Serve cancels this
        generator) cancels the stream, so the provider stops at its next token."""
        replica = self.model if adapter is None else await self._adapter(adapter)
        chunks = replica.submit_stream(request)
        loop = asyncio.get_running_loop()
        try:
            yield self.replica
            while (chunk := await loop.run_in_executor(None, chunks.get)) is not None:
                yield chunk
        finally:
            chunks.cancel()

    # -- adapters (Serve model multiplexing) ---------------------------------

    async def _adapter(self, request: PlacementRequest) -> Replica:
        self._pending = getattr(self, "_pending", {})
        self._pending[request.key] = request
        return await self._multiplexed(request.key)

    @serve.multiplexed(max_num_models_per_replica=MAX_ADAPTERS)
    async def _multiplexed(self, key: str) -> Any:
        request = self._pending[key]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        replica = await loop.run_in_executor(
            None, lambda: Replica(request, home=self.home, emit=self.emit)
        )
        self.emit(
            MonitorEvent(
                kind="ray.replica.loaded",
                model=key,
                fields={
                    "load_s": time.perf_counter() - started,
                    "provider": request.provider,
                    "node": self.node,
                    "adapter_of": self.key,
                },
            )
        )
        return _Evicted(replica)


class _Evicted:
    """A multiplexed adapter's replica: Serve drops its reference when it
    evicts it, and its worker is closed then (its weights released)."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica

    def __getattr__(self, name: str) -> Any:
        return getattr(self.replica, name)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.replica.close()
