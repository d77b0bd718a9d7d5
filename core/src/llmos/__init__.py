"""llmos: an operating system for language models.

Importing ``llmos`` is cheap: it pulls in no model library (torch and
transformers live in plugins) and starts nothing.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmos")
except PackageNotFoundError:  # running from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
