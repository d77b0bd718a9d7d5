"""llmos-peft: tuning methods for llmos — PEFT's LoRA, AdaLoRA, IA3, prefix and
prompt tuning, and full fine-tuning — for text classification and SFT.

The hooks live in :mod:`llmos_peft.plugin`. Nothing here imports torch or
peft: a method imports them when it runs, in the job manager's worker.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmos-peft")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
