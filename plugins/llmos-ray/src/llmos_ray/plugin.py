"""The ray plugin: served models on a Ray cluster, through Ray Serve.

Today it offers :func:`create_executor` — what the kernel's executor hook
(``[runtime] executor = "ray"``, being added to the kernel) will call with
the ``[plugins.ray]`` table and the kernel's ``emit`` — and closes the
executors it made when the kernel shuts down. The interface it expects from
the kernel is written down in the repository's notes (``ray-executor.md``).

This module imports Ray only when an executor is created, so ``llmos
plugins`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

from llmos.errors import ConfigError
from llmos.plugin import hookimpl
from llmos.types import MonitorEvent

if TYPE_CHECKING:
    from llmos_ray.executor import RayExecutor

__all__ = ["PLUGIN", "create_executor"]

#: the plugin's name: its entry-point name in pyproject.toml
PLUGIN = "ray"

_executors: list[RayExecutor] = []


def create_executor(
    options: Mapping[str, Any], emit: Callable[[MonitorEvent], None]
) -> RayExecutor:
    """Connect to the cluster ``[plugins.ray] address`` names (``auto``, ``HOST:PORT``
    or ``ray://HOST:PORT``) and start Serve there."""
    from llmos_ray.executor import RayExecutor

    address = options.get("address")
    if not isinstance(address, str) or not address:
        raise ConfigError(
            '[plugins.ray] address is required with [runtime] executor = "ray": "auto" (the'
            ' cluster this machine belongs to), "HOST:PORT" or "ray://HOST:PORT"',
            param="address",
        )
    interval = options.get("event_interval_s", 0.5)
    if isinstance(interval, bool) or not isinstance(interval, int | float) or interval <= 0:
        raise ConfigError(
            f"[plugins.ray] event_interval_s = {interval!r}; it takes a number of seconds > 0",
            param="event_interval_s",
        )
    executor = RayExecutor(
        address,
        emit=emit,
        namespace=str(options.get("namespace", "llmos")),
        event_interval_s=float(interval),
    )
    _executors.append(executor)
    return executor


@hookimpl
def llmos_shutdown(kernel: Any) -> None:
    """Delete the applications this process deployed, drain the last events."""
    while _executors:
        _executors.pop().close()
