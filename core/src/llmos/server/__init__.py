"""The llmos daemon: an ASGI app (FastAPI on uvicorn) around one kernel.

* :func:`create_app` — the app: probes, plugin routes, the error shape, API
  keys, the body cap;
* :func:`serve` — run it with a graceful drain on SIGTERM/SIGINT (what
  ``llmos serve`` calls);
* :func:`check_bind` — the rule that a non-loopback address needs API keys.
"""

from __future__ import annotations

from llmos.config import DEFAULT_PORT
from llmos.server.app import DaemonState, create_app
from llmos.server.run import DaemonServer, check_bind, is_loopback, serve

__all__ = [
    "DEFAULT_PORT",
    "DaemonServer",
    "DaemonState",
    "check_bind",
    "create_app",
    "is_loopback",
    "serve",
]
