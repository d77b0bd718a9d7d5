"""llmos-vllm: the vLLM engine as an llmos provider.

The hooks live in :mod:`llmos_vllm.plugin`. Nothing here imports vLLM or
torch: they are imported when a model is loaded, so that ``llmos plugins``
stays fast (and works where vLLM is not installed).
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmos-vllm")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
