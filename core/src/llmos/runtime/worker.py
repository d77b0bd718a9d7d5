"""One loaded model and the thread that runs every call to it.

Models are not thread-safe in general (a torch module, a tokenizer), and on a
small machine one call at a time is also the fastest. So each loaded model
gets one worker thread and a bounded queue in front of it. Requests for the
same capability that are queued when the worker takes its next batch share
one call — up to ``max_batch_size`` requests — which is where a batching
backend earns its throughput. By default the worker never waits for company
(``max_wait_ms = 0``): an idle model answers at once, and under load the
requests that queue while it is busy make the next batch. A positive
``max_wait_ms`` trades that much latency for fuller batches. A full queue refuses
new work at once (:class:`~llmos.errors.Overloaded`, HTTP 429) instead of
letting latency grow without bound.

A backend that batches on its own (``batching=False``: vLLM's continuous
batching) is handed each job as it comes, on a thread of its own, so that it
sees concurrent requests together; there ``max_queue`` bounds the requests
queued and in flight alike.

Callers get a :class:`concurrent.futures.Future` (sync code waits on it, the
daemon wraps it for asyncio) or, for streaming, a :class:`StreamHandle` that
can be cancelled when the client goes away. Cancelling a future whose call is
already running cannot take it back, but once every caller of that call has
cancelled, the worker sets the call's cancel event
(:func:`llmos.types.cancel_event`): a provider that checks it between steps
stops, and the model is free for the next request.
"""

from __future__ import annotations

import concurrent.futures
import queue
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import attrs
import structlog

from llmos.errors import CapabilityNotSupported, LlmosError, Overloaded, UsageError
from llmos.types import (
    CallAbandoned,
    Capability,
    ChatRequest,
    ChunkStream,
    DispatchingModel,
    LoadedModel,
    ModelCard,
    MonitorEvent,
    StreamChunk,
    Usage,
    cancel_scope,
    check_chat_features,
    check_logprobs,
)

log = structlog.get_logger("llmos.runtime")

#: capabilities whose requests can be grouped into one call
BATCHED = (Capability.COMPLETE, Capability.CHAT, Capability.EMBED, Capability.CLASSIFY)


@attrs.frozen(kw_only=True)
class BatchSettings:
    """How requests to one model are queued and grouped."""

    max_batch_size: int = 8
    max_wait_ms: float = 0.0
    max_queue: int = 64
    #: ``False``: the backend batches on its own; the worker sends one request a call
    batching: bool = True


class _CallFuture(concurrent.futures.Future[list[Any]]):
    """A caller's future that remembers a cancel which came too late.

    ``cancel()`` on a running future does nothing and answers ``False``
    (asyncio's ``wrap_future`` calls it when the awaiting task is cancelled,
    ``Kernel.call`` on a timeout); here it also marks the future abandoned and
    tells the worker, which stops the call once all its callers are gone.
    """

    def __init__(self) -> None:
        super().__init__()
        self.abandoned = False
        self.on_abandon: Callable[[], None] | None = None

    def cancel(self) -> bool:
        if super().cancel():
            return True
        if self.running():
            self.abandoned = True
            if (hook := self.on_abandon) is not None:
                hook()
        return False


@attrs.define(eq=False)
class _Job:
    capability: Capability
    requests: Sequence[Any]
    future: _CallFuture
    enqueued: float
    stream: StreamHandle | None = None


_END = object()


class StreamHandle:
    """Chunks of one streamed request, as they come.

    Iterate it (blocking) or call :meth:`get` with a timeout; :meth:`cancel`
    stops the generation at the next token — what the daemon does when a
    client disconnects.
    """

    def __init__(self) -> None:
        self._chunks: queue.Queue[Any] = queue.Queue()
        self.cancelled = threading.Event()
        self.first_chunk_at: float | None = None

    def cancel(self) -> None:
        self.cancelled.set()

    def put(self, chunk: StreamChunk) -> None:
        if self.first_chunk_at is None:
            self.first_chunk_at = time.perf_counter()
        self._chunks.put(chunk)

    def finish(self, error: BaseException | None = None) -> None:
        self._chunks.put(error if error is not None else _END)

    def get(self, timeout: float | None = None) -> StreamChunk | None:
        """The next chunk; ``None`` at the end. Raises what the model raised,
        or :class:`queue.Empty` after ``timeout``."""
        item = self._chunks.get(timeout=timeout)
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        return item

    def __iter__(self) -> Iterator[StreamChunk]:
        while (chunk := self.get()) is not None:
            yield chunk


class ModelWorker:
    """Runs one loaded model: a bounded queue, a thread, batching, events."""

    #: a model computed here was placed on no executor
    placed_on: str | None = None

    def __init__(
        self,
        name: str,
        model: LoadedModel,
        settings: BatchSettings,
        emit: Callable[[MonitorEvent], None],
    ) -> None:
        self.name = name
        self.model = model
        self.settings = settings
        self._emit = emit
        self._jobs: deque[_Job] = deque()
        self._queued_requests = 0
        self._cond = threading.Condition()
        self._closed = False
        self.in_flight = 0
        self.last_used = time.monotonic()
        #: batching off: every job runs on a thread of this pool, at once
        self._pool = (
            None
            if settings.batching
            else concurrent.futures.ThreadPoolExecutor(
                settings.max_queue, thread_name_prefix=f"llmos-model-{name}"
            )
        )
        self._thread = threading.Thread(target=self._run, name=f"llmos-model-{name}", daemon=True)
        self._thread.start()

    @property
    def card(self) -> ModelCard:
        return self.model.card

    @property
    def queued(self) -> int:
        """Requests waiting for the model (not yet in a call)."""
        with self._cond:
            return self._queued_requests

    @property
    def busy(self) -> bool:
        with self._cond:
            return bool(self._jobs) or self.in_flight > 0

    def check(self, capability: Capability) -> None:
        _check_capability(self.name, self.model, capability)

    def submit(
        self, capability: Capability, requests: Sequence[Any]
    ) -> concurrent.futures.Future[list[Any]]:
        """Queue ``requests`` (one caller's batch); the future gets their results."""
        self.check(capability)
        check_logprobs(self.model, self.name, requests)
        check_chat_features(self.model, self.name, requests)
        job = _Job(capability, list(requests), _CallFuture(), time.perf_counter())
        self._enqueue(job, len(job.requests))
        return job.future

    def submit_stream(self, request: Any) -> StreamHandle:
        """Queue one streamed request; read its chunks from the handle."""
        self.check(Capability.STREAM)
        check_logprobs(self.model, self.name, [request])
        check_chat_features(self.model, self.name, [request])
        handle = StreamHandle()
        job = _Job(Capability.STREAM, [request], _CallFuture(), time.perf_counter(), handle)
        self._enqueue(job, 1)
        return handle

    def close(self, timeout: float = 30.0) -> None:
        """Finish what is queued, stop the thread, release the model."""
        deadline = time.monotonic() + timeout
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            with self._cond:
                while self.in_flight and (left := deadline - time.monotonic()) > 0:
                    self._cond.wait(left)
        try:
            self.model.close()
        except Exception as exc:
            log.warning("runtime.close_failed", model=self.name, error=repr(exc))

    # -- internals ----------------------------------------------------------

    def _enqueue(self, job: _Job, size: int) -> None:
        if size > self.settings.max_queue:
            # No amount of waiting admits it: say so rather than "retry".
            raise UsageError(
                f"{size} requests in one call to {self.name!r}; the model queues at most "
                f"{self.settings.max_queue} (max_queue): send them in smaller batches"
            )
        with self._cond:
            if self._closed:
                raise Overloaded(f"model {self.name!r} is being unloaded; retry")
            queued = self._queued_requests + (self.in_flight if self._pool is not None else 0)
            if queued + size > self.settings.max_queue:
                self._emit(self._event(job, "rejected", {"error": "queue full"}))
                raise Overloaded(
                    f"model {self.name!r} has {queued} requests queued "
                    f"(limit {self.settings.max_queue}); retry shortly"
                )
            self._jobs.append(job)
            self._queued_requests += size
            self.last_used = time.monotonic()
            self._cond.notify()

    def _take(self) -> list[_Job] | None:
        """The next batch: the first job plus, for a batched capability, the
        jobs of the same capability that arrive within ``max_wait_ms``."""
        with self._cond:
            while not self._jobs:
                if self._closed:
                    return None
                self._cond.wait()
            first = self._jobs.popleft()
            batch, size = [first], len(first.requests)
            limit = self.settings.max_batch_size
            if first.capability in BATCHED and self.settings.batching:
                deadline = first.enqueued + self.settings.max_wait_ms / 1000
                while size < limit:
                    match = next(
                        (
                            j
                            for j in self._jobs
                            if j.capability is first.capability and size + len(j.requests) <= limit
                        ),
                        None,
                    )
                    if match is not None:
                        self._jobs.remove(match)
                        batch.append(match)
                        size += len(match.requests)
                        continue
                    remaining = deadline - time.perf_counter()
                    if remaining <= 0 or self._closed:
                        break
                    self._cond.wait(remaining)
            self._queued_requests -= size
            self.in_flight += size
            return batch

    def _run(self) -> None:
        while (batch := self._take()) is not None:
            if self._pool is None:
                self._serve(batch)
            else:
                self._pool.submit(self._serve, batch)

    def _serve(self, batch: list[_Job]) -> None:
        # A caller that gave up (timeout, disconnect) before its turn
        # costs nothing.
        live = [job for job in batch if job.future.set_running_or_notify_cancel()]
        try:
            if live and live[0].stream is not None:
                self._run_stream(live[0])
            elif live:
                self._run_batch(live)
        except BaseException as exc:  # never let the thread die silently
            log.exception("runtime.worker_crashed", model=self.name, error=repr(exc))
        finally:
            with self._cond:
                self.in_flight -= sum(len(job.requests) for job in batch)
                self.last_used = time.monotonic()
                self._cond.notify_all()

    def _call(self, capability: Capability, requests: Sequence[Any]) -> list[Any]:
        results = list(getattr(self.model, str(capability))(requests))
        if len(results) != len(requests):
            raise LlmosError(
                f"model {self.name!r} returned {len(results)} results for {len(requests)} "
                f"{capability} requests"
            )
        return results

    def _run_batch(self, jobs: list[_Job]) -> None:
        capability = jobs[0].capability
        started = time.perf_counter()
        requests = [r for job in jobs for r in job.requests]
        cancel = threading.Event()

        def abandoned() -> None:  # on a canceller's thread
            if all(job.future.abandoned for job in jobs):
                cancel.set()

        for job in jobs:
            job.future.on_abandon = abandoned
        abandoned()  # a caller may have cancelled before the hook was there
        try:
            with cancel_scope(cancel):
                results = self._call(capability, requests)
        except Exception as exc:
            if cancel.is_set():  # stopped for no one: nothing to retry
                for job in jobs:
                    self._fail(
                        job,
                        CallAbandoned(f"{capability} on {self.name!r}: every caller went away"),
                        started,
                        len(requests),
                        "cancelled",
                    )
                return
            if len(jobs) == 1:
                self._fail(jobs[0], exc, started, len(requests))
                return
            # One bad request must not fail its neighbours: run each alone
            # (but not those whose caller has gone meanwhile).
            for job in jobs:
                if job.future.abandoned:
                    self._fail(
                        job,
                        CallAbandoned(f"{capability} on {self.name!r}: the caller went away"),
                        started,
                        len(job.requests),
                        "cancelled",
                    )
                else:
                    self._run_batch([job])
            return
        finally:
            for job in jobs:
                job.future.on_abandon = None
        finished = time.perf_counter()
        offset = 0
        for job in jobs:
            mine = results[offset : offset + len(job.requests)]
            offset += len(job.requests)
            timing = {
                "queue_wait_s": started - job.enqueued,
                "latency_s": finished - job.enqueued,
                "model_s": finished - started,
                "batch_size": len(requests),
            }
            # Read by the daemon for its x-llmos-overhead-ms header.
            job.future.timing = timing  # type: ignore[attr-defined]
            job.future.set_result(mine)
            self._emit(self._event(job, "ok", {**timing, **_tokens(mine)}))

    def _run_stream(self, job: _Job) -> None:
        handle = job.stream
        assert handle is not None
        started = time.perf_counter()
        usage: Usage | None = None
        chunks = 0
        status = "ok"
        stream: Any = None
        try:
            # inside the try: a provider whose stream() raises at once (not a
            # generator) must end the caller's stream, not leave it waiting
            [request] = job.requests
            if isinstance(request, ChatRequest) and request.may_call_tools:
                stream = self._whole_answer(request)
            else:
                stream = self.model.stream(job.requests)
            with cancel_scope(handle.cancelled):  # the provider's cancel_event()
                for chunk in stream:
                    if handle.cancelled.is_set():
                        status = "cancelled"
                        break
                    handle.put(chunk)
                    chunks += 1
                    usage = chunk.usage or usage
        except Exception as exc:
            handle.finish(exc)
            job.future.set_result([])
            status = "cancelled" if handle.cancelled.is_set() else "error"
            self._emit(self._event(job, status, _error_fields(exc, started, job)))
            return
        finally:
            close = getattr(stream, "close", None) if stream is not None else None
            if close is not None:
                close()  # stops a generator mid-generation
        handle.finish()
        job.future.set_result([])
        finished = time.perf_counter()
        fields: dict[str, Any] = {
            "queue_wait_s": started - job.enqueued,
            "latency_s": finished - job.enqueued,
            "model_s": finished - started,
            "batch_size": 1,
            "chunks": chunks,
        }
        if handle.first_chunk_at is not None:
            fields["ttft_s"] = handle.first_chunk_at - job.enqueued
        if usage is not None:
            fields.update(tokens_in=usage.prompt_tokens, tokens_out=usage.completion_tokens)
        self._emit(self._event(job, status, fields))

    def _whole_answer(self, request: ChatRequest) -> Iterator[StreamChunk]:
        """A streamed chat that may call tools, answered by the model's
        ``chat``: whether an answer is a tool call is known only once it is
        whole (the provider parses it out of the text, or constrained decoding
        wrote it), so it is one chunk with the text, the ``tool_calls``, the
        ``finish_reason`` and the usage. Runs under the stream's cancel scope:
        a consumer that goes away stops the generation."""
        [result] = self._call(Capability.CHAT, [request])
        yield StreamChunk(
            index=0,
            text=result.message.content,
            finish_reason=result.finish_reason,
            usage=result.usage,
            tool_calls=result.message.tool_calls,
        )

    def _fail(
        self, job: _Job, exc: Exception, started: float, size: int, status: str = "error"
    ) -> None:
        job.future.set_exception(exc)
        fields = _error_fields(exc, started, job)
        fields["batch_size"] = size
        self._emit(self._event(job, status, fields))

    def _event(self, job: _Job, status: str, fields: dict[str, Any]) -> MonitorEvent:
        return MonitorEvent(
            kind="request",
            model=self.name,
            capability=str(job.capability),
            fields={"status": status, "requests": len(job.requests), **fields},
        )


class DirectWorker:
    """A model that sends its calls elsewhere (:class:`~llmos.types.DispatchingModel`:
    a deployment group, a remote executor's replicas), behind the worker's
    interface: no queue and no thread of its own — each call goes on at once
    and the model that answers it queues, batches and reports it. It counts
    what is in flight, so the model manager does not unload it mid-call.
    ``placed_on`` names the executor that placed the model (``None``: a
    group, or another model that runs here)."""

    def __init__(
        self,
        name: str,
        model: DispatchingModel,
        settings: BatchSettings,
        *,
        placed_on: str | None = None,
    ) -> None:
        self.name = name
        self.model = model
        self.placed_on = placed_on
        self.settings = attrs.evolve(settings, batching=False)
        self.in_flight = 0
        self.last_used = time.monotonic()
        self._lock = threading.Condition()
        self._closed = False

    @property
    def card(self) -> ModelCard:
        return self.model.card

    @property
    def queued(self) -> int:
        return 0

    @property
    def busy(self) -> bool:
        with self._lock:
            return self.in_flight > 0

    def check(self, capability: Capability) -> None:
        _check_capability(self.name, self.model, capability)

    def submit(
        self, capability: Capability, requests: Sequence[Any]
    ) -> concurrent.futures.Future[list[Any]]:
        self.check(capability)
        self._begin(len(requests))
        try:
            future = self.model.submit(capability, requests)
        except BaseException:
            self._end(len(requests))
            raise
        future.add_done_callback(lambda _: self._end(len(requests)))
        return future

    def submit_stream(self, request: Any) -> ChunkStream:
        self.check(Capability.STREAM)
        with self._lock:
            if self._closed:
                raise Overloaded(f"model {self.name!r} is being unloaded; retry")
            self.last_used = time.monotonic()
        return self.model.submit_stream(request)

    def close(self, timeout: float = 30.0) -> None:
        """Take no new calls, let those in flight finish (up to ``timeout``),
        then close the model (a placed model's replicas)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            self._closed = True
            while self.in_flight and (left := deadline - time.monotonic()) > 0:
                self._lock.wait(left)
        try:
            self.model.close()
        except Exception as exc:
            log.warning("runtime.close_failed", model=self.name, error=repr(exc))

    def _begin(self, size: int) -> None:
        with self._lock:
            if self._closed:
                raise Overloaded(f"model {self.name!r} is being unloaded; retry")
            self.in_flight += size
            self.last_used = time.monotonic()

    def _end(self, size: int) -> None:
        with self._lock:
            self.in_flight -= size
            self.last_used = time.monotonic()
            self._lock.notify_all()


def _check_capability(name: str, model: Any, capability: Capability) -> None:
    if capability not in model.capabilities:
        have = ", ".join(sorted(model.capabilities)) or "nothing"
        raise CapabilityNotSupported(
            f"model {name!r} does not support {capability}; it supports: {have}"
        )


def _tokens(results: Sequence[Any]) -> dict[str, int]:
    usages = [r.usage for r in results if getattr(r, "usage", None) is not None]
    return {
        "tokens_in": sum(u.prompt_tokens for u in usages),
        "tokens_out": sum(u.completion_tokens for u in usages),
    }


def _error_fields(exc: BaseException, started: float, job: _Job) -> dict[str, Any]:
    return {
        "queue_wait_s": started - job.enqueued,
        "latency_s": time.perf_counter() - job.enqueued,
        "error": getattr(exc, "type", type(exc).__name__),
        "message": str(exc)[:500],
    }
