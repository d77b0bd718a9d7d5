"""structlog set-up shared by the daemon and the CLI.

Logs go to stderr, so that ``--json`` output on stdout stays machine-readable.
JSON lines when stderr is not a terminal (or ``LLMOS_LOG_FORMAT=json``), a
readable console format otherwise.
"""

from __future__ import annotations

import logging
import os
import sys

import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


class _CurrentStderr:
    """Writes to whatever ``sys.stderr`` is when a line is logged, not to the
    stream it was when logging was configured — which may be closed by then
    (a test's capture, a redirect undone by an embedding program)."""

    def write(self, text: str) -> int:
        return sys.stderr.write(text)

    def flush(self) -> None:
        sys.stderr.flush()


_STDERR = _CurrentStderr()


def configure_logging(level: str = "info", *, fmt: str | None = None) -> None:
    """Configure structlog (and the stdlib loggers uvicorn uses) once per process.

    ``fmt`` is ``json`` or ``console``; default: ``LLMOS_LOG_FORMAT``, else
    console on a terminal and JSON elsewhere.
    """
    fmt = (
        fmt or os.environ.get("LLMOS_LOG_FORMAT") or ("console" if sys.stderr.isatty() else "json")
    )
    numeric = _LEVELS.get(level.lower(), logging.INFO)
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer()
        if fmt == "json"
        else structlog.dev.ConsoleRenderer(colors=sys.stderr.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.StackInfoRenderer(),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.PrintLoggerFactory(file=_STDERR),  # type: ignore[arg-type]
        cache_logger_on_first_use=False,
    )
    logging.basicConfig(level=max(numeric, logging.WARNING), stream=_STDERR, force=True)  # type: ignore[arg-type]
