"""llmos-transformers: local Hugging Face models as an llmos provider.

The hooks live in :mod:`llmos_transformers.plugin`. Nothing here imports torch
or transformers: they are imported when a model is loaded, so that
``llmos plugins`` stays fast.
"""

from __future__ import annotations

import os
from importlib.metadata import PackageNotFoundError, version

# OpenMP's worker threads spin after each parallel region unless told to
# sleep. Each loaded model computes on its own worker thread, so a daemon with
# several models has several OpenMP thread teams, and on a small machine the
# idle teams spinning starve the busy one: in bench/fusion_sst2.py (three
# models and an embedder on 2 cores) members ran 5-10x slower. Sleeping costs
# a single busy model about 10% (SmolLM2 zero-shot, 2 threads: 139-149 ms a
# row spinning, 154-167 sleeping), so set OMP_WAIT_POLICY=ACTIVE to trade
# back. Set before torch is imported (this package imports it only when a
# model loads); an operator's own value wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

try:
    __version__ = version("llmos-transformers")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
