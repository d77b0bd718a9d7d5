"""llmos-transformers: local Hugging Face models as an llmos provider.

The hooks live in :mod:`llmos_transformers.plugin`. Nothing here imports torch
or transformers: they are imported when a model is loaded, so that
``llmos plugins`` stays fast.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

# OpenMP's worker threads spin after each parallel region unless told to
# sleep. The kernel loads a model in one thread and serves it from another, so
# a process ends up with two thread teams, and on a small machine the idle one
# spinning starved the busy one: the first model a process loaded ran 5-10x
# slower on 2 cores (bench/fusion_sst2.py, SmolLM2). Set before torch is
# imported (this package imports it only when a model loads); an operator's
# own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("llmos-transformers")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
