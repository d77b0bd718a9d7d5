"""llmos-example: the template llmos plugin.

The hooks live in :mod:`llmos_example.plugin`; this package only carries the
version, read from the installed distribution's metadata.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmos-example")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
