"""The ``sqlite`` registry store: model cards in ``LLMOS_HOME/registry.db``.

The kernel's own store, and ``[registry] store``'s default: one SQLite file
(WAL, FTS5 search) that every process using the data folder shares — the
daemon, CLI commands, tuning workers. Options, in
``[plugins."llmos.default_plugins.sqlite_registry"]``: ``busy_timeout``
(seconds a writer waits for another one's lock, default 30).
"""

from __future__ import annotations

from collections.abc import Callable

from llmos.config import check_table
from llmos.errors import ConfigError
from llmos.plugin import hookimpl
from llmos.registry.store import SQLiteStore
from llmos.types import PluginContext, RegistryStoreSpec

__all__ = ["DATABASE", "PLUGIN", "create"]

#: the plugin's name: its options are the ``[plugins."<PLUGIN>"]`` table
PLUGIN = "llmos.default_plugins.sqlite_registry"
#: the registry's file inside the data folder
DATABASE = "registry.db"


def create(context: PluginContext) -> SQLiteStore:
    """The registry file of ``context.home``, created and migrated if need be."""
    options = check_table(f'[plugins."{PLUGIN}"]', context.options, {"busy_timeout"})
    timeout = options.get("busy_timeout", 30.0)
    if isinstance(timeout, bool) or not isinstance(timeout, int | float) or timeout <= 0:
        raise ConfigError(
            f'[plugins."{PLUGIN}"] busy_timeout: expected a number of seconds > 0, got {timeout!r}'
        )
    return SQLiteStore(context.home / DATABASE, busy_timeout=float(timeout))


@hookimpl
def llmos_register_registry_stores(register: Callable[[RegistryStoreSpec], None]) -> None:
    register(
        RegistryStoreSpec(
            name="sqlite",
            create=create,
            description="one SQLite file in the data folder (registry.db), shared by every"
            " process that uses it",
        )
    )
