"""The replica: one Serve replica loads a model through llmos's own providers.

On a replica the model is built the way the kernel builds it in process: the
provider's plugin is loaded through its entry point (only that plugin) and
its ``ProviderSpec.load`` gets a :class:`~llmos.types.LoadRequest` made from
the :class:`~llmos_ray.wire.ModelSpec` the kernel checked. So the same
provider plugins serve a model in process and on a cluster.

Batching stays on the replica: Serve's ``@serve.batch`` groups the calls a
replica is sent, per capability, up to the model's ``max_batch_size``
(counted in calls), waiting at most its ``max_wait_ms``. Models are not
thread-safe, so every model call runs on one thread of the replica. A batch
that fails is run again one caller at a time, so one bad request does not
fail its neighbours (what the kernel's in-process worker does).

LoRA adapters are Serve multiplexed models: a call for an adapter carries its
spec and Serve's ``multiplexed_model_id``; the replica loads it (through the
provider, as an ``adapter`` card on the base) on first use and keeps the
``max_adapters`` most recently used. Adapter calls are not batched with the
base model's.

Events a provider emits (an engine's own figures) and ``model.loaded`` go to
the kernel through the event queue actor (:mod:`llmos_ray.events`); each
call's request event is made on the kernel side from the timing an
:class:`~llmos_ray.wire.Answer` carries.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import attrs
import ray
import structlog
from ray import serve

from llmos.config import PluginSettings
from llmos.errors import LlmosError, PluginError
from llmos.plugin.manager import PluginManager
from llmos.types import (
    Capability,
    LoadedModel,
    MonitorEvent,
    cancel_scope,
)
from llmos_ray.wire import Answer, ModelSpec

__all__ = ["ModelReplica"]

log = structlog.get_logger("llmos.ray")


@attrs.frozen
class _Failed:
    error: BaseException


def _load(spec: ModelSpec, emit: Any) -> LoadedModel:
    """Load ``spec`` with its provider plugin, found through its entry point."""
    plugins = PluginManager(
        PluginSettings(load=(spec.plugin,), disable=(), strict=False, trace=False)
    )
    plugins.load()
    registered = plugins.providers.get(spec.card.provider)
    if registered is None:
        have = ", ".join(sorted(plugins.providers)) or "none"
        raise PluginError(
            f"replica of {spec.key!r}: plugin {spec.plugin!r} registers no provider"
            f" {spec.card.provider!r} here (providers: {have}); install it in the replicas'"
            " environment"
        )
    return registered.spec.load(spec.load_request(emit))


class ModelReplica:
    """A Serve deployment class: ``call``, ``stream``, ``describe``."""

    def __init__(self, spec: ModelSpec, events: str | None, namespace: str) -> None:
        self.spec = spec
        self._events = ray.get_actor(events, namespace=namespace) if events else None
        self._thread = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="llmos-model")
        self._adapters: dict[str, ModelSpec] = {}
        self.replica = serve.get_replica_context().replica_id.unique_id
        started = time.perf_counter()
        self.model = _load(spec, self.emit)
        seconds = time.perf_counter() - started
        for method in (self._complete, self._chat, self._embed, self._classify):
            method.set_max_batch_size(max(1, spec.max_batch_size))
            method.set_batch_wait_timeout_s(spec.max_wait_ms / 1000)
        self.emit(
            MonitorEvent(
                kind="model.loaded",
                model=spec.key,
                fields={
                    "load_s": seconds,
                    "provider": spec.card.provider,
                    "replica": self.replica,
                    "node": ray.get_runtime_context().get_node_id(),
                },
            )
        )

    def emit(self, event: MonitorEvent) -> None:
        """To the kernel's sinks through the event queue; never blocks, never raises."""
        if self._events is None:
            return
        try:
            self._events.put.remote([event])
        except Exception as exc:  # the queue gone: events are not worth a failed call
            log.warning("ray.event_lost", kind=event.kind, error=repr(exc))

    def describe(self) -> dict[str, Any]:
        """What the kernel side needs to know of the model it serves."""
        model = self.model
        return {
            "capabilities": sorted(str(c) for c in model.capabilities),
            "supports_logprobs": bool(getattr(model, "supports_logprobs", False)),
            "chat_features": sorted(getattr(model, "chat_features", ())),
            "max_batch_size": getattr(model, "max_batch_size", None),
            "replica": self.replica,
            "node": ray.get_runtime_context().get_node_id(),
            "pid": os.getpid(),
        }

    # -- calls ---------------------------------------------------------------

    async def call(
        self, capability: str, requests: list[Any], adapter: ModelSpec | None = None
    ) -> Answer:
        """One caller's requests; raises what the model raised for them."""
        enqueued = time.perf_counter()
        cap = Capability(capability)
        if adapter is not None:
            model = await self._adapter(adapter)
            started = time.perf_counter()
            results = await self._run(model, cap, requests)
            timing = {"queue_wait_s": started - enqueued, "batch_size": len(requests)}
            timing["model_s"] = time.perf_counter() - started
            return Answer(results=results, timing=timing, replica=self.replica)
        batched = {
            Capability.COMPLETE: self._complete,
            Capability.CHAT: self._chat,
            Capability.EMBED: self._embed,
            Capability.CLASSIFY: self._classify,
        }.get(cap)
        if batched is None:
            raise LlmosError(f"{capability} is not a batched capability; use stream")
        outcome = await batched((list(requests), enqueued))
        if isinstance(outcome, _Failed):
            raise outcome.error
        return outcome

    async def stream(self, request: Any, adapter: ModelSpec | None = None) -> AsyncIterator[Any]:
        """The chunks of one streamed request, as the model yields them; a
        caller that goes away (Serve cancels this generator) sets the call's
        cancel event, so the provider stops at its next step."""
        model = self.model if adapter is None else await self._adapter(adapter)
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[Any] = asyncio.Queue()
        cancelled = threading.Event()
        done = object()

        def produce() -> None:
            stream: Any = None
            try:
                with cancel_scope(cancelled):
                    stream = model.stream([request])
                    for chunk in stream:
                        if cancelled.is_set():
                            break
                        loop.call_soon_threadsafe(chunks.put_nowait, chunk)
            except BaseException as exc:
                loop.call_soon_threadsafe(chunks.put_nowait, _Failed(exc))
            finally:
                close = getattr(stream, "close", None)
                if close is not None:
                    close()
                loop.call_soon_threadsafe(chunks.put_nowait, done)

        work = loop.run_in_executor(self._thread, produce)
        try:
            while (item := await chunks.get()) is not done:
                if isinstance(item, _Failed):
                    raise item.error
                yield item
        finally:
            cancelled.set()
            await asyncio.shield(work)

    # -- batching --------------------------------------------------------------

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _complete(self, jobs: list[tuple[list[Any], float]]) -> list[Any]:
        return await self._batch(Capability.COMPLETE, jobs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _chat(self, jobs: list[tuple[list[Any], float]]) -> list[Any]:
        return await self._batch(Capability.CHAT, jobs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _embed(self, jobs: list[tuple[list[Any], float]]) -> list[Any]:
        return await self._batch(Capability.EMBED, jobs)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def _classify(self, jobs: list[tuple[list[Any], float]]) -> list[Any]:
        return await self._batch(Capability.CLASSIFY, jobs)

    async def _batch(
        self, capability: Capability, jobs: list[tuple[list[Any], float]]
    ) -> list[Answer | _Failed]:
        """Every caller's requests in one model call; on failure each caller alone."""
        started = time.perf_counter()
        flat = [r for requests, _ in jobs for r in requests]
        try:
            results = await self._run(self.model, capability, flat)
        except Exception as exc:
            if len(jobs) == 1:
                return [_Failed(exc)]
            out: list[Answer | _Failed] = []
            for job in jobs:
                out.extend(await self._batch(capability, [job]))
            return out
        finished = time.perf_counter()
        answers: list[Answer | _Failed] = []
        offset = 0
        for requests, enqueued in jobs:
            mine = results[offset : offset + len(requests)]
            offset += len(requests)
            timing = {
                "queue_wait_s": started - enqueued,
                "model_s": finished - started,
                "batch_size": len(flat),
            }
            answers.append(Answer(results=mine, timing=timing, replica=self.replica))
        return answers

    async def _run(
        self, model: LoadedModel, capability: Capability, requests: Sequence[Any]
    ) -> list[Any]:
        def run() -> list[Any]:
            results = list(getattr(model, str(capability))(requests))
            if len(results) != len(requests):
                raise LlmosError(
                    f"model {self.spec.key!r} returned {len(results)} results for"
                    f" {len(requests)} {capability} requests"
                )
            return results

        return await asyncio.get_running_loop().run_in_executor(self._thread, run)

    # -- adapters (Serve model multiplexing) ---------------------------------

    async def _adapter(self, spec: ModelSpec) -> LoadedModel:
        self._adapters[spec.key] = spec
        return await self._multiplexed(spec.key)

    @serve.multiplexed(max_num_models_per_replica=4)
    async def _multiplexed(self, key: str) -> Any:
        spec = self._adapters[key]
        loop = asyncio.get_running_loop()
        started = time.perf_counter()
        model = await loop.run_in_executor(self._thread, _load, spec, self.emit)
        self.emit(
            MonitorEvent(
                kind="model.loaded",
                model=spec.key,
                fields={
                    "load_s": time.perf_counter() - started,
                    "provider": spec.card.provider,
                    "replica": self.replica,
                    "adapter_of": self.spec.key,
                },
            )
        )
        return _Closing(model)


class _Closing:
    """A multiplexed adapter: Serve calls ``__del__`` when it evicts one; the
    model's ``close`` releases its weights then."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model

    def __getattr__(self, name: str) -> Any:
        return getattr(self.model, name)

    def __del__(self) -> None:
        with contextlib.suppress(Exception):
            self.model.close()
