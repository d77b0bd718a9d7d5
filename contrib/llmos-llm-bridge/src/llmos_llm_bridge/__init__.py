"""llmos-llm-bridge: simonw/llm's models served by llmos.

The hooks live in :mod:`llmos_llm_bridge.plugin`; what llm knows is read in
:mod:`llmos_llm_bridge.catalogue`; llm's models are wrapped as llmos models in
:mod:`llmos_llm_bridge.model`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmos-llm-bridge")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
