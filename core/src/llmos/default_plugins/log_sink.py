"""The ``log`` monitor sink: every monitor event as one structlog line.

With the daemon's JSON logging this gives one JSON object per event on
stderr, which any log shipper can pick up.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import structlog

from llmos.plugin import hookimpl
from llmos.types import MonitorEvent, MonitorSinkSpec

#: kinds not logged unless asked for: the process's own sample every few seconds
DEFAULT_EXCLUDE = ("process.sample",)


class LogSink:
    """Writes events through structlog at the level given in options
    (``level``), but for the kinds in ``exclude``."""

    def __init__(self, options: Mapping[str, Any]) -> None:
        self._log = structlog.get_logger("llmos.monitor")
        level = str(options.get("level", "info")).lower()
        self._write = getattr(self._log, level, self._log.info)
        exclude = options.get("exclude", DEFAULT_EXCLUDE)
        if not isinstance(exclude, list | tuple) or not all(isinstance(k, str) for k in exclude):
            raise ValueError(f"exclude must be a list of event kinds, got {exclude!r}")
        self._exclude = frozenset(exclude)

    def emit(self, event: MonitorEvent) -> None:
        if event.kind in self._exclude:
            return
        data = event.to_dict()
        self._write(
            "monitor." + data.pop("kind"),
            **{k: v for k, v in data.items() if v is not None},
        )

    def close(self) -> None:
        pass


@hookimpl
def llmos_register_monitor_sinks(register: Callable[[MonitorSinkSpec], None]) -> None:
    register(
        MonitorSinkSpec(
            name="log",
            create=LogSink,
            description="every monitor event as a structured log line",
        )
    )
