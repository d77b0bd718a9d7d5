"""llmos-prometheus: the kernel's monitor events as Prometheus metrics,
served by the daemon at ``GET /metrics``.

The hooks live in :mod:`llmos_prometheus.plugin`; the metrics and the sink
that keeps them in :mod:`llmos_prometheus.sink`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmos-prometheus")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

#: the monitor sink's name; the ``/metrics`` route finds the sink by it
SINK = "prometheus"

__all__ = ["SINK", "__version__"]
