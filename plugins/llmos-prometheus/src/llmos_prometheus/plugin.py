"""The hooks: the ``prometheus`` monitor sink, ``GET /metrics`` on the daemon,
and, at start-up, the event bus's own counters added to the sink's metrics.

No ``from __future__ import annotations`` here: FastAPI reads the route
handler's annotations (``Request``), which are imported inside the hook (so
that CLI commands do not import FastAPI) and so cannot be resolved later
from strings.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING

from llmos.errors import Unavailable
from llmos.plugin import hookimpl
from llmos.types import MonitorSinkSpec, PluginContext, RouteSpec
from llmos_prometheus import SINK

if TYPE_CHECKING:
    from llmos.runtime.kernel import Kernel
    from llmos_prometheus.sink import PrometheusSink

# prometheus_client (~50 ms to import) is imported when a kernel starts the
# sink, not by every CLI command that only loads the plugins.

__all__ = ["create", "running_sink"]


def create(context: PluginContext) -> "PrometheusSink":
    """The sink, its options checked (``MonitorSinkSpec.create``); it exports
    the bus's own drop and sink-error counters too."""
    from llmos_prometheus.sink import PrometheusSink

    return PrometheusSink(context.options, bus_health=context.bus_health)


def running_sink(kernel: "Kernel") -> "PrometheusSink":
    """The kernel's ``prometheus`` sink, or :class:`Unavailable` (503) saying why not."""
    from llmos_prometheus.sink import PrometheusSink

    sink = kernel.bus.sinks.get(SINK)
    if isinstance(sink, PrometheusSink):
        return sink
    raise Unavailable(
        f"the {SINK!r} monitor sink is not running (the kernel is starting, or the sink"
        " failed to start: `llmos plugins` says why)"
    )


@hookimpl
def llmos_register_monitor_sinks(register: Callable[[MonitorSinkSpec], None]) -> None:
    register(
        MonitorSinkSpec(
            name=SINK,
            create=create,
            description="monitor events as Prometheus metrics, served at GET /metrics",
        )
    )


@hookimpl
def llmos_register_routes(register: Callable[[RouteSpec], None], kernel: "Kernel") -> None:
    from fastapi import APIRouter, Request, Response

    router = APIRouter()

    @router.get(
        "/metrics",
        summary="Prometheus metrics (text format; OpenMetrics when the Accept header asks)",
        response_class=Response,
    )
    def metrics(request: Request) -> Response:
        body, content_type = running_sink(kernel).exposition(request.headers.get("accept"))
        return Response(body, headers={"Content-Type": content_type})

    register(RouteSpec(router=router))
