"""llmos-transformers: local Hugging Face models as an llmos provider.

The hooks live in :mod:`llmos_transformers.plugin`. Nothing here imports torch
or transformers: they are imported when a model is loaded, so that
``llmos plugins`` stays fast.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmos-transformers")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
