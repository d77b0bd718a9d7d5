"""The plugin system: hook markers, hook specifications, and loading.

A plugin imports only the markers::

    from llmos.plugin import hookimpl

    @hookimpl
    def llmos_register_providers(register): ...
"""

from __future__ import annotations

from llmos.plugin.spec import NAME, hookimpl, hookspec

__all__ = ["NAME", "hookimpl", "hookspec"]
