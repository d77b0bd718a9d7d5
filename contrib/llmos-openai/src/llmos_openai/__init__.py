"""llmos-openai: models served by any server that speaks the OpenAI API.

The hook lives in :mod:`llmos_openai.plugin`; the model in
:mod:`llmos_openai.model`, its options in :mod:`llmos_openai.settings` and
the HTTP side (connection guard, error mapping) in :mod:`llmos_openai.transport`.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("llmos-openai")
except PackageNotFoundError:  # imported from a source tree that is not installed
    __version__ = "0.0.0+unknown"

__all__ = ["__version__"]
