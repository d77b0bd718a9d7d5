"""The kernel's side: served models as Ray Serve applications, called through handles.

:class:`RayExecutor` connects the kernel's process to a Ray cluster (as a
driver), starts Serve with no HTTP proxy (the llmos daemon is the front end)
and the event queue actor. :meth:`RayExecutor.serve` deploys one model as one
Serve application (its replicas each load the model, see
:mod:`llmos_ray.replica`) and returns a :class:`RayModel`, which is what the
kernel calls instead of its in-process worker: ``submit`` (a
:class:`concurrent.futures.Future`, like the worker's), ``stream`` (a
:class:`RayStream`, like the worker's ``StreamHandle``), ``health``,
``close``. Every call is one Serve request: the replica batches it with
others; its answer carries the replica's timing, from which the request
event is made here and emitted to the kernel's sinks (with ``replica`` and
``ray_s``, the time spent in Ray rather than in the model or its queue).

Calls run on one asyncio loop of the executor's own (a thread), so a sync
caller waits on a future and an awaiting daemon wraps it, as with the
in-process worker; cancelling the future cancels the Serve request.

Failures a caller sees, never silence: a replica that dies under a call
fails that call with :class:`~llmos.errors.Unavailable` (503, retry) —
Serve does not replay a request that reached a replica, since it may have
run — and new calls go to the replicas still alive while Serve starts a
replacement; a full replica queue is :class:`~llmos.errors.Overloaded` (429).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import re
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import attrs
import ray
import structlog
from ray import exceptions as rex
from ray import serve
from ray.serve import exceptions as sex
from ray.serve.handle import DeploymentHandle

from llmos.errors import ConfigError, LlmosError, Overloaded, Unavailable
from llmos.types import (
    Capability,
    ModelCard,
    ModelFormat,
    MonitorEvent,
    PlacementRequest,
    PluginContext,
    StreamChunk,
)
from llmos_ray.events import Drainer, EventQueue
from llmos_ray.jobs import RayJobHandle
from llmos_ray.options import serve_settings
from llmos_ray.replica import ModelReplica
from llmos_ray.wire import Answer

__all__ = ["RayExecutor", "RayModel", "RayStream", "app_name"]

log = structlog.get_logger("llmos.ray")

#: the deployment's name inside each model's application
DEPLOYMENT = "model"


def app_name(key: str) -> str:
    """The Serve application of a model key (``name@3`` -> ``llmos-name-3``)."""
    return "llmos-" + re.sub(r"[^a-z0-9._-]+", "-", key.lower())


def _mapped(exc: BaseException, what: str) -> BaseException:
    """What a caller of the kernel sees for a failure on the Ray path."""
    if isinstance(exc, LlmosError):  # the model's own (a RayTaskError is also one)
        cause = getattr(exc, "cause", None)
        return cause if isinstance(cause, LlmosError) else exc
    if isinstance(exc, rex.RayTaskError) and isinstance(exc.cause, LlmosError):
        return exc.cause
    if isinstance(exc, sex.BackPressureError):
        return Overloaded(f"{what}: every replica's queue is full; retry shortly")
    if isinstance(exc, rex.RayActorError | rex.ActorUnavailableError | rex.NodeDiedError):
        return Unavailable(f"{what}: the replica serving it died ({type(exc).__name__}); retry")
    if isinstance(exc, rex.RayTaskError):
        return LlmosError(f"{what} failed on its replica: {exc.cause!r}")
    return Unavailable(f"{what} failed on the Ray path: {type(exc).__name__}: {exc}")


_END = object()


class RayStream:
    """Chunks of one streamed request from a replica: what the kernel's
    ``StreamHandle`` offers (``get``, iteration, ``cancel``)."""

    def __init__(self) -> None:
        self._chunks: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()
        self.first_chunk_at: float | None = None
        self._on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        self.cancelled.set()
        if self._on_cancel is not None:
            self._on_cancel()

    def put(self, chunk: StreamChunk) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        self._chunks.put(chunk)

    def finish(self, error: BaseException | None = None) -> None:
        self._chunks.put(error if error is not None else _END)

    def get(self, timeout: float | None = None) -> StreamChunk | None:
        """The next chunk; ``None`` at the end. Raises what failed, or
        :class:`queue.Empty` after ``timeout``."""
        item = self._chunks.get(timeout=timeout)
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[StreamChunk]:
        while (chunk := self.get()) is not None:
            yield chunk


class RayModel:
    """One served model (or an adapter multiplexed on one) behind a Serve handle."""

    def __init__(
        self,
        executor: RayExecutor,
        key: str,
        app: str,
        handle: DeploymentHandle,
        info: Mapping[str, Any],
        card: ModelCard,
        adapter: PlacementRequest | None = None,
    ) -> None:
        self.key = key
        self.card = card
        self.app = app
        self.info = dict(info)
        self.capabilities = frozenset(Capability(c) for c in info["capabilities"])
        self.supports_logprobs = bool(info.get("supports_logprobs"))
        self.chat_features = frozenset(info.get("chat_features", ()))
        self._executor = executor
        self._adapter = adapter
        self._handle = handle if adapter is None else handle.options(multiplexed_model_id=key)
        self._stream_handle = self._handle.options(stream=True)

    # -- calls ---------------------------------------------------------------

    def submit(
        self, capability: Capability, requests: Sequence[Any]
    ) -> concurrent.futures.Future[list[Any]]:
        """Send one caller's requests; the future gets their results (its
        ``timing`` attribute: queue wait, model time, batch size, replica)."""
        timing: dict[str, Any] = {}
        future = self._executor.run(self._call(Capability(capability), list(requests), timing))
        future.timing = timing  # type: ignore[attr-defined]
        return future

    def call(
        self, capability: Capability, requests: Sequence[Any], timeout: float = 300
    ) -> list[Any]:
        future = self.submit(capability, requests)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    def submit_stream(self, request: Any) -> RayStream:
        """Start streaming one request; iterate the handle, cancel it to stop."""
        out = RayStream()
        future = self._executor.run(self._stream(request, out))
        out._on_cancel = lambda: future.cancel()
        return out

    async def _call(
        self, capability: Capability, requests: list[Any], timing: dict[str, Any]
    ) -> list[Any]:
        enqueued = time.perf_counter()
        response = self._handle.call.remote(str(capability), requests, self._adapter)
        try:
            answer: Answer = await response
        except asyncio.CancelledError:
            response.cancel()
            self._event(capability, len(requests), "cancelled", enqueued, {})
            raise
        except BaseException as exc:
            error = _mapped(exc, f"{capability} on {self.key!r}")
            self._event(
                capability,
                len(requests),
                "error",
                enqueued,
                {
                    "error": getattr(error, "type", type(error).__name__),
                    "message": str(error)[:500],
                },
            )
            raise error from exc
        latency = time.perf_counter() - enqueued
        # the replica's own latency (its queue and the model) vs the whole call: the rest is Ray's
        timing.update(answer.timing, replica=answer.replica, call_s=latency)
        timing["ray_s"] = latency - float(answer.timing.get("latency_s", 0.0))
        self._event(capability, len(requests), "ok", enqueued, timing)
        return answer.results

    async def _stream(self, request: Any, out: RayStream) -> None:
        enqueued = time.perf_counter()
        generator = self._stream_handle.stream.remote(request, self._adapter)
        status, fields, chunks = "ok", {}, 0
        try:
            async for chunk in generator:
                if out.cancelled.is_set():
                    status = "cancelled"
                    break
                out.put(chunk)
                chunks += 1
                if chunk.usage is not None:
                    fields.update(
                        tokens_in=chunk.usage.prompt_tokens,
                        tokens_out=chunk.usage.completion_tokens,
                    )
        except asyncio.CancelledError:
            generator.cancel()
            status = "cancelled"
            out.finish()
        except BaseException as exc:
            error = _mapped(exc, f"stream on {self.key!r}")
            status = "error"
            fields = {"error": getattr(error, "type", type(error).__name__)}
            out.finish(error)
        else:
            if status == "cancelled":
                generator.cancel()
            out.finish()
        if out.first_chunk_at is not None:
            fields["ttft_s"] = out.first_chunk_at - enqueued
        fields["chunks"] = chunks
        self._event(Capability.STREAM, 1, status, enqueued, fields)

    def _event(
        self,
        capability: Capability,
        size: int,
        status: str,
        enqueued: float,
        fields: Mapping[str, Any],
    ) -> None:
        # the kernel's view of a call on the Ray path; the replica's worker
        # emits the call's ``request`` event itself (relayed by the event queue)
        self._executor.emit(
            MonitorEvent(
                kind="ray.call",
                model=self.key,
                capability=str(capability),
                fields={
                    "status": status,
                    "requests": size,
                    "call_s": time.perf_counter() - enqueued,
                    **fields,
                },
            )
        )

    # -- state ---------------------------------------------------------------

    def health(self) -> dict[str, Any]:
        """Serve's view of the deployment: its status and replicas by state."""
        return self._executor.health(self.app)

    def adapter(self, request: PlacementRequest) -> RayModel:
        """An adapter on this model's replicas (Serve multiplexing), called like a model."""
        request = attrs.evolve(request, emit=None)
        return RayModel(
            self._executor, request.key, self.app, self._handle, self.info, request.card, request
        )

    def close(self) -> None:
        """Delete the application (an adapter's close does nothing: its base holds the replicas)."""
        if self._adapter is None:
            self._executor.delete(self.app)


class RayExecutor:
    """The kernel's connection to a Ray cluster and the models it places there
    (an :class:`~llmos.types.Executor`)."""

    def __init__(
        self,
        address: str,
        *,
        emit: Callable[[MonitorEvent], None],
        options: Mapping[str, Any] | None = None,
        home: str = "",
        namespace: str = "llmos",
        event_interval_s: float = 0.5,
        node_ip_address: str | None = None,
    ) -> None:
        self.namespace = namespace
        self.emit = emit
        #: the [plugins.ray] table: deployment defaults and per-model tables
        self.options = dict(options or {})
        #: the replicas' folder for the provider's cache (converted weights)
        self.home = str(self.options.get("replica_home") or home)
        if not ray.is_initialized():
            ray.init(
                address=address,
                namespace=namespace,
                log_to_driver=False,
                configure_logging=False,
                _node_ip_address=node_ip_address,
            )
        serve.start(proxy_location="Disabled")
        self.events_name = f"llmos-events-{uuid.uuid4().hex[:8]}"
        self._queue = (
            ray.remote(EventQueue)
            .options(name=self.events_name, namespace=namespace, num_cpus=0, max_restarts=-1)
            .remote()
        )
        self._drainer = Drainer(self._queue, emit, event_interval_s)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="llmos-ray", daemon=True
        )
        self._thread.start()
        self._apps: set[str] = set()
        self._models: dict[str, RayModel] = {}
        self._lock = threading.Lock()

    @classmethod
    def from_context(cls, context: PluginContext) -> RayExecutor:
        """What the ``ray`` executor spec's ``create`` does: ``[plugins.ray]``
        ``address`` (``auto``, ``HOST:PORT``, ``ray://HOST:PORT``), checked."""
        options = context.options
        address = options.get("address")
        if not isinstance(address, str) or not address:
            raise ConfigError(
                '[plugins.ray] address is required with executor = "ray": "auto" (the cluster'
                ' this machine belongs to), "HOST:PORT" or "ray://HOST:PORT"',
                param="address",
            )
        interval = options.get("event_interval_s", 0.5)
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
            raise ConfigError(
                f"[plugins.ray] event_interval_s = {interval!r}; it takes a number of seconds > 0",
                param="event_interval_s",
            )
        serve_settings("(defaults)", options)  # a bad default fails at once, not at first use
        return cls(
            address,
            emit=context.emit,
            options=options,
            home=str(context.home),
            namespace=str(options.get("namespace", "llmos")),
            event_interval_s=float(interval),
            node_ip_address=options.get("node_ip_address"),
        )

    def run(self, coroutine: Any) -> concurrent.futures.Future[Any]:
        """Run ``coroutine`` on the executor's loop; cancelling the future cancels it."""
        # its future's cancel() cancels the task on the loop (and so the Serve request)
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop)

    def place(self, request: PlacementRequest, *, timeout_s: float = 300) -> RayModel:
        """Serve ``request`` on the cluster: a model as a Serve application
        whose replicas load it; an adapter multiplexed on its base's
        application (deployed for it if the base is not placed yet)."""
        if request.card.format == ModelFormat.ADAPTER and request.base is not None:
            base = self._base_of(request)
            return base.adapter(request)
        with self._lock:
            placed = self._models.get(request.key)
        if placed is not None:
            return placed
        settings = serve_settings(
            request.key, self.options, request.card.options, max_batch_size=request.max_batch_size
        )
        app = app_name(request.key)
        # the kernel's emit stays here; the card's ray options are not the provider's
        shipped = attrs.evolve(request, emit=None, card=_without_ray(request.card))
        deployment = serve.deployment(ModelReplica).options(
            name=DEPLOYMENT, max_constructor_retry_count=1, **settings.deployment_options()
        )
        started = time.perf_counter()
        try:
            handle = serve.run(
                deployment.bind(shipped, self.home, self.events_name, self.namespace),
                name=app,
                route_prefix=None,
            )
        except Exception as exc:
            self.delete(app)
            raise LlmosError(
                f"model {request.key!r} could not be deployed on Ray Serve:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        self._apps.add(app)
        info = handle.describe.remote().result(timeout_s=timeout_s)
        self.emit(
            MonitorEvent(
                kind="ray.deployed",
                model=request.key,
                fields={"app": app, "seconds": time.perf_counter() - started, **self.health(app)},
            )
        )
        model = RayModel(self, request.key, app, handle, info, request.card)
        with self._lock:
            self._models[request.key] = model
        return model

    def _base_of(self, adapter: PlacementRequest) -> RayModel:
        base = adapter.base
        assert base is not None
        return self.place(
            attrs.evolve(
                adapter,
                key=base.ref,
                card=base,
                path=adapter.base_path,
                base=None,
                base_path=None,
            )
        )

    def start_job(self, payload: Mapping[str, Any]) -> RayJobHandle:
        """A tuning job's worker on the cluster (``[tuning] executor = "ray"``),
        in an actor placed by ``[plugins.ray] tuning``'s resources."""
        return RayJobHandle(payload, self.options)

    def health(self, app: str) -> dict[str, Any]:
        """``status`` (Serve's: HEALTHY, UPDATING, UNHEALTHY …) and ``replicas``
        (state -> count) of an application's deployment."""
        status = serve.status().applications.get(app)
        if status is None:
            return {"status": "NOT_FOUND", "replicas": {}}
        deployment = status.deployments.get(DEPLOYMENT)
        if deployment is None:
            return {"status": str(getattr(status.status, "value", status.status)), "replicas": {}}
        states = deployment.replica_states.items()
        return {
            "status": str(getattr(deployment.status, "value", deployment.status)),
            "replicas": {str(getattr(k, "value", k)): v for k, v in states},
        }

    def delete(self, app: str) -> None:
        with self._lock:
            for key in [k for k, m in self._models.items() if m.app == app]:
                del self._models[key]
        try:
            serve.delete(app)
        except Exception as exc:
            log.warning("ray.delete_failed", app=app, error=repr(exc))
        self._apps.discard(app)

    def close(self) -> None:
        """Delete the applications it deployed, drain the last events, stop its loop."""
        for app in list(self._apps):
            self.delete(app)
        self._drainer.close()
        with contextlib.suppress(Exception):
            ray.kill(self._queue)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)


def _without_ray(card: ModelCard) -> ModelCard:
    if "ray" not in card.options:
        return card
    return attrs.evolve(card, options={k: v for k, v in card.options.items() if k != "ray"})
