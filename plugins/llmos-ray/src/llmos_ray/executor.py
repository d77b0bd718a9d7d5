"""The kernel's side: served models as Ray Serve applications, called through handles.

:class:`RayExecutor` connects the kernel's process to a Ray cluster (as a
driver), starts Serve with no HTTP proxy (the llmos daemon is the front end)
and the event queue actor. :meth:`RayExecutor.place` serves one model as one
Serve application (its replicas each load the model, see
:mod:`llmos_ray.replica`) and returns a :class:`RayModel`, which is what the
kernel calls instead of its in-process worker: ``submit`` (a
:class:`concurrent.futures.Future`, like the worker's), ``submit_stream`` (a
:class:`RayStream`, the worker's ``StreamHandle``), ``health``, ``close``.
Every call is one Serve request: the replica batches it with others; its
answer carries the replica's timing, from which this side makes the call's
``request`` event (with ``replica`` and ``ray_s``, the time spent in Ray
rather than in the model or its queue) and emits it to the kernel's sinks.

Several daemons share a cluster: an application is named by the model and a
digest of how it is placed (:func:`fingerprint`), so daemons placing a model
the same way share one application — the first deploys it, the others
attach — and it is deleted when the last of them lets go
(:mod:`llmos_ray.placements`). Each daemon makes the events of its own calls.

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
import hashlib
import json
import os
import re
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import ray
import structlog
from ray import exceptions as rex
from ray import serve
from ray._private import ray_constants
from ray.serve import exceptions as sex
from ray.serve.handle import DeploymentHandle

from llmos.errors import ConfigError, LlmosError, Overloaded, Unavailable
from llmos.replica import StreamHandle
from llmos.types import (
    Capability,
    ModelCard,
    ModelFormat,
    MonitorEvent,
    PlacementRequest,
    PluginContext,
)
from llmos_ray.events import Drainer, EventQueue
from llmos_ray.jobs import RayJobHandle
from llmos_ray.options import serve_settings
from llmos_ray.placements import placements
from llmos_ray.replica import ModelReplica
from llmos_ray.wire import Answer

__all__ = [
    "RayExecutor",
    "RayModel",
    "RayStream",
    "app_name",
    "check_reachable",
    "fingerprint",
]

log = structlog.get_logger("llmos.ray")

#: the deployment's name inside each model's application
DEPLOYMENT = "model"
#: how often a daemon tells the placements actor again what it holds
HOLD_EVERY_S = 5.0


def app_name(key: str, fingerprint: str = "") -> str:
    """The Serve application of a model key and what it serves
    (``name@3`` -> ``llmos-name-3-1a2b3c4d``): daemons placing the same model
    the same way share it; a daemon placing it otherwise (other weights,
    options, replicas) gets its own."""
    name = "llmos-" + re.sub(r"[^a-z0-9._-]+", "-", key.lower())
    return f"{name}-{fingerprint[:8]}" if fingerprint else name


#: a card's fields that describe it but do not change what serves it
_DESCRIPTIVE = frozenset({"created_at", "created_by", "description", "license", "scores", "tags"})


def fingerprint(
    request: PlacementRequest, deployment: Mapping[str, Any], namespace: str = "llmos"
) -> str:
    """A digest of what a model's replicas serve (the shipped placement: card,
    provider, options, paths, batching), how they are deployed, and the llmos
    namespace placing them (Serve's application names are the cluster's, so
    two installations on one cluster keep apart)."""

    def serving(field: attrs.Attribute, _value: Any) -> bool:  # type: ignore[type-arg]
        # not the kernel's emit, nor its artifact store (credentials; an artifact's
        # source already names its bytes)
        return field.name not in ("emit", "artifacts") and not (
            field.name in _DESCRIPTIVE and field in attrs.fields(ModelCard)
        )

    shipped = attrs.asdict(request, recurse=True, filter=serving)
    text = json.dumps([shipped, dict(deployment), namespace], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def check_reachable(address: str, timeout_s: float) -> None:
    """Refuse, at once, a cluster address nothing answers on: ``ray.init``
    would retry it for minutes, holding up the request that placed the first
    model. ``auto`` is Ray's to find (it fails fast when there is none).

    :raises Unavailable: naming the address and what to do (503: the cluster
        may come up, and the next request tries again)."""
    target = address.removeprefix("ray://")
    if target == "auto":
        return
    host, sep, port = target.rpartition(":")
    if not sep or not port.isdigit():
        raise ConfigError(
            f'[plugins.ray] address = {address!r}; give "auto", "HOST:PORT" or "ray://HOST:PORT"',
            param="address",
        )
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise Unavailable(
            f"the Ray cluster at {address} ([plugins.ray] address) does not answer"
            f" ({type(exc).__name__}: {exc}); start it (`ray start --head --port {port}`)"
            " or fix the address"
        ) from None


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


def _error_fields(error: BaseException) -> dict[str, Any]:
    return {"error": getattr(error, "type", type(error).__name__), "message": str(error)[:500]}


def _tokens(results: Sequence[Any]) -> dict[str, int]:
    usages = [r.usage for r in results if getattr(r, "usage", None) is not None]
    if not usages:
        return {}
    return {
        "tokens_in": sum(u.prompt_tokens for u in usages),
        "tokens_out": sum(u.completion_tokens for u in usages),
    }


class RayStream(StreamHandle):
    """Chunks of one streamed request from a replica: the kernel's
    :class:`~llmos.replica.StreamHandle`, whose ``cancel`` also cancels the
    Serve request."""

    def __init__(self) -> None:
        super().__init__()
        self._on_cancel: Callable[[], None] | None = None

    def cancel(self) -> None:
        super().cancel()
        if self._on_cancel is not None:
            self._on_cancel()


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
            self._event(capability, len(requests), "error", enqueued, _error_fields(error))
            raise error from exc
        call_s = time.perf_counter() - enqueued
        # the replica's worker timed its queue and the model; the rest of the call is Ray's
        replica_s = float(answer.timing.get("latency_s", 0.0))
        timing.update(answer.timing, replica=answer.replica, call_s=call_s)
        timing["ray_s"] = call_s - replica_s
        self._event(
            capability,
            len(requests),
            "ok",
            enqueued,
            {**timing, "replica_latency_s": replica_s, **_tokens(answer.results)},
        )
        return answer.results

    async def _stream(self, request: Any, out: RayStream) -> None:
        enqueued = time.perf_counter()
        generator = self._stream_handle.stream.remote(request, self._adapter)
        status, chunks = "ok", 0
        fields: dict[str, Any] = {}
        try:
            async for chunk in generator:
                if isinstance(chunk, str):  # the replica's id comes first
                    fields["replica"] = chunk
                    continue
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
            fields = {**fields, **_error_fields(error)}
            out.finish(error)
        else:
            if status == "cancelled":
                generator.cancel()
            out.finish()
        if out.first_chunk_at is not None:
            fields["ttft_s"] = out.first_chunk_at - enqueued
        fields.update(chunks=chunks, batch_size=1)
        self._event(Capability.STREAM, 1, status, enqueued, fields)

    def _event(
        self,
        capability: Capability,
        size: int,
        status: str,
        enqueued: float,
        fields: Mapping[str, Any],
    ) -> None:
        """The call's ``request`` event, made here — in the daemon that made
        the call, so each daemon sharing the deployment counts its own calls —
        from the replica's timing (queue wait, model time, batch size, which
        replica) and this side's: ``latency_s`` is what the caller waited,
        ``ray_s`` the part of it spent in Ray."""
        self._executor.emit(
            MonitorEvent(
                kind="request",
                model=self.key,
                capability=str(capability),
                fields={
                    "status": status,
                    "requests": size,
                    **fields,
                    "latency_s": time.perf_counter() - enqueued,
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
        connect_timeout_s: float = 10.0,
    ) -> None:
        self.namespace = namespace
        self.emit = emit
        #: the [plugins.ray] table: deployment defaults and per-model tables
        self.options = dict(options or {})
        #: the replicas' folder for the provider's cache (converted weights)
        self.home = str(self.options.get("replica_home") or home)
        #: this executor connected the process to Ray, so it disconnects it at close
        self._owns_ray = not ray.is_initialized()
        if self._owns_ray:
            check_reachable(address, connect_timeout_s)
            if "RAY_DISABLE_FAILURE_SIGNAL_HANDLER" not in os.environ:
                # a Ray driver's SIGTERM handler (abseil's) aborts the process 3 s
                # later, cutting a daemon's drain short (ray-project/ray#64830):
                # the daemon handles SIGTERM itself
                ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True
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
        self._placements = placements(namespace)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="llmos-ray", daemon=True
        )
        self._thread.start()
        self._apps: set[str] = set()
        #: the applications it holds that are deployed (said again every HOLD_EVERY_S)
        self._held: set[str] = set()
        self._held_lock = threading.Lock()
        self._models: dict[str, RayModel] = {}
        self._lock = threading.Lock()
        self._closing = threading.Event()
        threading.Thread(target=self._hold_every, name="llmos-ray-holds", daemon=True).start()

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
        seconds = {}
        for key, default in (("event_interval_s", 0.5), ("connect_timeout_s", 10.0)):
            value = options.get(key, default)
            if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
                raise ConfigError(
                    f"[plugins.ray] {key} = {value!r}; it takes a number of seconds > 0",
                    param=key,
                )
            seconds[key] = float(value)
        serve_settings("(defaults)", options)  # a bad default fails at once, not at first use
        return cls(
            address,
            emit=context.emit,
            options=options,
            home=str(context.home),
            namespace=str(options.get("namespace", "llmos")),
            event_interval_s=seconds["event_interval_s"],
            node_ip_address=options.get("node_ip_address"),
            connect_timeout_s=seconds["connect_timeout_s"],
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
        # the kernel's emit stays here; the card's ray options are not the provider's
        shipped = attrs.evolve(request, emit=None, card=_without_ray(request.card))
        options = settings.deployment_options()
        app = app_name(request.key, fingerprint(shipped, options, self.namespace))
        started = time.perf_counter()
        handle = self._deploy_or_attach(request.key, app, shipped, options, timeout_s)
        with self._held_lock:
            self._held.add(app)
        try:
            info = handle.describe.remote().result(timeout_s=timeout_s)
        except Exception as exc:
            self.delete(app)
            raise LlmosError(
                f"model {request.key!r} was deployed on Ray Serve but does not answer:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        self.emit(
            MonitorEvent(
                kind="ray.deployed",
                model=request.key,
                fields={
                    "app": app,
                    "seconds": time.perf_counter() - started,
                    "holders": len(self.holders(app)),
                    **self.health(app),
                },
            )
        )
        model = RayModel(self, request.key, app, handle, info, request.card)
        with self._lock:
            self._models[request.key] = model
        return model

    def _deploy_or_attach(
        self,
        key: str,
        app: str,
        shipped: PlacementRequest,
        options: Mapping[str, Any],
        timeout_s: float,
    ) -> DeploymentHandle:
        """Deploy ``app``, or attach to it where another daemon deployed (or is
        deploying) it: the cluster's :class:`~llmos_ray.placements.Placements`
        says which. Either way this daemon holds it until :meth:`delete`."""
        deadline = time.monotonic() + timeout_s
        while True:
            step = ray.get(self._placements.acquire.remote(app, self.events_name), timeout=30)
            self._apps.add(app)
            if step == "attach":
                if app in serve.status().applications:
                    return serve.get_app_handle(app)
                # deleted behind llmos's back (serve shutdown, say): deploy it again
                ray.get(self._placements.forget.remote(app), timeout=30)
                continue
            if step == "deploy":
                return self._deploy(key, app, shipped, options)
            if time.monotonic() > deadline:
                self.delete(app)
                raise Unavailable(
                    f"model {key!r}: another llmos daemon has been deploying it on Ray Serve"
                    f" for over {timeout_s:.0f} s; retry, or see `serve status` on the cluster"
                )
            time.sleep(0.5)

    def _deploy(
        self, key: str, app: str, shipped: PlacementRequest, options: Mapping[str, Any]
    ) -> DeploymentHandle:
        status = serve.status().applications.get(app)
        if status is not None and _name(status.status) == "RUNNING":
            # left by a daemon that died holding it: the same placement (its name says so)
            ray.get(self._placements.deployed.remote(app, self.events_name, True), timeout=30)
            return serve.get_app_handle(app)
        deployment = serve.deployment(ModelReplica).options(
            name=DEPLOYMENT, max_constructor_retry_count=1, **options
        )
        try:
            handle = serve.run(
                deployment.bind(shipped, self.home, app, self.namespace),
                name=app,
                route_prefix=None,
            )
        except Exception as exc:
            ray.get(self._placements.deployed.remote(app, self.events_name, False), timeout=30)
            self.delete(app, force=True)
            raise LlmosError(
                f"model {key!r} could not be deployed on Ray Serve: {type(exc).__name__}: {exc}"
            ) from exc
        ray.get(self._placements.deployed.remote(app, self.events_name, True), timeout=30)
        return handle

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
            return {"status": _name(status.status), "replicas": {}}
        states = deployment.replica_states.items()
        return {
            "status": _name(deployment.status),
            "replicas": {_name(k): v for k, v in states},
        }

    def delete(self, app: str, *, force: bool = False) -> None:
        """Let go of ``app``: Serve deletes it when no other daemon holds it
        (``force``: whoever holds it, as after a failed deploy)."""
        with self._lock:
            for key in [k for k, m in self._models.items() if m.app == app]:
                del self._models[key]
        self._apps.discard(app)
        with self._held_lock:  # no hold of it is sent after this release (one caller: in order)
            self._held.discard(app)
            released = self._placements.release.remote(app, self.events_name)
        try:
            left = ray.get(released, timeout=30)
        except Exception as exc:
            # who else holds it is unknown: an application left running is the lesser harm
            log.warning("ray.release_failed", app=app, error=repr(exc), deleted=force)
            left = 1
        if left and not force:
            log.info("ray.app_kept", app=app, holders=left)
            return
        try:
            serve.delete(app)
        except Exception as exc:
            log.warning("ray.delete_failed", app=app, error=repr(exc))

    def _hold_every(self) -> None:
        while not self._closing.wait(HOLD_EVERY_S):
            with self._held_lock:
                if not self._held:
                    continue
                try:
                    self._placements.hold.remote(sorted(self._held), self.events_name)
                except Exception as exc:  # the next tick tries again
                    log.warning("ray.hold_failed", error=repr(exc))

    def holders(self, app: str) -> list[str]:
        """The daemons (their event queues' names) holding ``app`` now."""
        return list(ray.get(self._placements.queues.remote(app), timeout=30))

    def close(self) -> None:
        """Let go of the applications it holds (each deleted where no other
        daemon holds it), drain the last events, stop its loop."""
        self._closing.set()
        for app in list(self._apps):
            self.delete(app)
        self._drainer.close()
        with contextlib.suppress(Exception):
            ray.kill(self._queue)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)
        if self._owns_ray:
            # a driver left connected at interpreter exit can abort the process
            ray.shutdown()


def _name(state: Any) -> str:
    """A Serve status or replica state (an enum, or its string) as its name."""
    return str(getattr(state, "value", state))


def _without_ray(card: ModelCard) -> ModelCard:
    if "ray" not in card.options:
        return card
    return attrs.evolve(card, options={k: v for k, v in card.options.items() if k != "ray"})
