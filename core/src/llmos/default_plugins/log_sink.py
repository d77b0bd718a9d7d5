"""The ``log`` monitor sink: monitor events as structlog lines.

With the daemon's JSON logging this gives one JSON object per line on
stderr, which any log shipper can pick up. Every event kind is logged as
it comes (``monitor.<kind>``) but two:

* ``request`` (one per model call): by default summed into one
  ``monitor.requests`` line per model every ``summary_every`` (10 s) — rows,
  errors by kind, rows/s, latency p50/p95/p99, queue wait, tokens/s, batch
  size — the way vLLM logs its throughput. The sums are the kernel's own
  (``request.bucket`` events: its metric windows' finished buckets), so a
  call costs this sink nothing. ``requests = "each"`` logs every call
  instead (a line per call costs the daemon more than the call itself on a
  small model), ``"off"`` neither;
* ``process.sample`` (every few seconds): not logged unless taken out of
  ``exclude``.

Options (``[plugins."llmos.default_plugins.log_sink"]``): ``level``,
``exclude``, ``requests``, ``summary_every``.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog

from llmos.config import check_table
from llmos.monitor.metrics import RequestStats, parse_duration
from llmos.plugin import hookimpl
from llmos.types import MonitorEvent, MonitorSinkSpec

#: kinds not logged unless asked for: the process's own sample every few seconds
DEFAULT_EXCLUDE = ("process.sample",)
_LEVELS = ("debug", "info", "warning", "error")
_REQUESTS = ("summary", "each", "off")
#: the figures of a ``monitor.requests`` line
_SUMMARY = (
    "requests",
    "errors",
    "errors_by_kind",
    "rps",
    "latency_p50_ms",
    "latency_p95_ms",
    "latency_p99_ms",
    "queue_wait_p95_ms",
    "tokens_in_per_s",
    "tokens_out_per_s",
    "batch_size_mean",
)


class LogSink:
    """Writes events through structlog (see the module)."""

    def __init__(
        self,
        options: Mapping[str, Any],
        *,
        clock: Callable[[], float] = time.monotonic,
        logger: Any = None,
    ) -> None:
        where = '[plugins."llmos.default_plugins.log_sink"]'
        options = check_table(where, options, {"level", "exclude", "requests", "summary_every"})
        level = options.get("level", "info")
        if level not in _LEVELS:
            raise ValueError(f"{where} level must be one of {', '.join(_LEVELS)}, got {level!r}")
        exclude = options.get("exclude", DEFAULT_EXCLUDE)
        if not isinstance(exclude, list | tuple) or not all(isinstance(k, str) for k in exclude):
            raise ValueError(f"{where} exclude must be a list of event kinds, got {exclude!r}")
        self.requests = options.get("requests", "summary")
        if self.requests not in _REQUESTS:
            raise ValueError(
                f"{where} requests must be one of {', '.join(_REQUESTS)}, got {self.requests!r}"
            )
        self.summary_every = parse_duration(
            options.get("summary_every", 10), f"{where} summary_every"
        )
        log = logger if logger is not None else structlog.get_logger("llmos.monitor")
        self._write = getattr(log, level)
        self._exclude = frozenset(exclude)
        self._clock = clock
        self._lock = threading.Lock()
        self._pending: dict[str, RequestStats] = {}
        self._since = clock()

    def emit(self, event: MonitorEvent) -> None:
        kind = event.kind
        if kind == "request.bucket":
            # The kernel's metric windows fold every call once and hand each
            # finished bucket on: a summary is the merge of those.
            if self.requests == "summary" and event.model:
                bucket = RequestStats.from_dict(event.fields.get("stats") or {})
                with self._lock:
                    stats = self._pending.get(event.model)
                    if stats is None:
                        self._pending[event.model] = bucket
                    else:
                        stats.merge(bucket)
        elif kind == "request":
            if self.requests == "each":
                self._log(event)
        elif kind not in self._exclude:
            self._log(event)
        # Any event is a tick of the clock (the process sample comes every
        # few seconds even when nothing else happens).
        if self._clock() - self._since >= self.summary_every:
            self.flush()

    def _log(self, event: MonitorEvent) -> None:
        data = event.to_dict()
        self._write(
            "monitor." + data.pop("kind"),
            **{k: v for k, v in data.items() if v is not None},
        )

    def flush(self) -> None:
        """Log a ``monitor.requests`` line per model with calls since the last."""
        now = self._clock()
        with self._lock:
            pending, self._pending = self._pending, {}
            seconds, self._since = max(now - self._since, 1e-9), now
        for model, stats in sorted(pending.items()):
            figures = stats.figures(seconds)
            self._write(
                "monitor.requests",
                model=model,
                window_s=round(seconds, 3),
                **{k: _round(figures[k]) for k in _SUMMARY if figures[k] not in (None, {})},
            )

    def close(self) -> None:
        self.flush()


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


@hookimpl
def llmos_register_monitor_sinks(register: Callable[[MonitorSinkSpec], None]) -> None:
    register(
        MonitorSinkSpec(
            name="log",
            create=lambda context: LogSink(context.options),
            description="monitor events as structured log lines (requests summed per model)",
        )
    )
