"""llmos-llamacpp: GGUF models served by llama.cpp as an llmos provider.

The hooks live in :mod:`llmos_llamacpp.plugin`. Nothing here imports
llama_cpp: it is imported when a model is loaded, so that ``llmos plugins``
stays fast (and works where llama-cpp-python is not installed).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmos-llamacpp")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
