"""Plugins that ship inside the kernel.

They are loaded before any entry-point plugin, appear in ``llmos plugins
--all``, and can be disabled by their module name like any other plugin
(``LLMOS_DISABLE_PLUGINS=llmos.default_plugins.log_sink``).
"""
