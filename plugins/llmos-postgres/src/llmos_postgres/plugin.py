"""The hook: the ``postgres`` registry store, its options checked.

Options, in ``[plugins.postgres]``:

* ``dsn``: a libpq connection string (``host=db.internal dbname=llmos
  user=llmos``) or URL (``postgresql://llmos@db.internal/llmos``); when
  absent, the environment variable named by ``dsn_env`` (default
  ``LLMOS_POSTGRES_DSN``) gives it. A password is better left to that
  variable, to ``PGPASSWORD`` or to ``~/.pgpass`` (libpq reads both) than
  written in a config file: plugin option tables are shown unmasked by
  ``llmos config show``;
* ``schema``: the PostgreSQL schema the registry's tables live in (default
  ``llmos``; created if missing), so several registries can share a database;
* ``connect_timeout`` (seconds, default 10) and ``lock_timeout`` (seconds a
  write waits for another's lock, default 30).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from typing import Any

from llmos.config import check_table
from llmos.errors import ConfigError
from llmos.plugin import hookimpl
from llmos.types import PluginContext, RegistryStoreSpec
from llmos_postgres import DSN_ENV, STORE
from llmos_postgres.store import PostgresStore

__all__ = ["create", "dsn_from"]

_WHERE = f"[plugins.{STORE}]"
_OPTIONS = {"dsn", "dsn_env", "schema", "connect_timeout", "lock_timeout"}


def _seconds(options: Mapping[str, Any], key: str, default: float) -> float:
    value = options.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int | float) or value <= 0:
        raise ConfigError(f"{_WHERE} {key}: expected a number of seconds > 0, got {value!r}")
    return float(value)


def dsn_from(options: Mapping[str, Any], environ: Mapping[str, str] = os.environ) -> str:
    """The DSN the options give, or the one in their environment variable."""
    variable = options.get("dsn_env", DSN_ENV)
    if not isinstance(variable, str) or not variable:
        raise ConfigError(f"{_WHERE} dsn_env: expected an environment variable's name")
    dsn = options.get("dsn")
    if dsn is None:
        dsn = environ.get(variable)
    if dsn is None:
        raise ConfigError(
            f'[registry] store = "{STORE}" needs a PostgreSQL server: set {_WHERE} dsn'
            f' (e.g. "host=db.internal dbname=llmos user=llmos") or the {variable}'
            " environment variable (better for a password)"
        )
    if not isinstance(dsn, str) or not dsn.strip():
        raise ConfigError(f"{_WHERE} dsn: expected a PostgreSQL connection string")
    return dsn


def create(context: PluginContext) -> PostgresStore:
    """The store the options describe, its schema created or migrated."""
    options = check_table(_WHERE, context.options, _OPTIONS)
    schema = options.get("schema", "llmos")
    if not isinstance(schema, str):
        raise ConfigError(f"{_WHERE} schema: expected a string, got {schema!r}")
    return PostgresStore(
        dsn_from(options),
        schema=schema,
        connect_timeout=_seconds(options, "connect_timeout", 10.0),
        lock_timeout=_seconds(options, "lock_timeout", 30.0),
    )


@hookimpl
def llmos_register_registry_stores(register: Callable[[RegistryStoreSpec], None]) -> None:
    register(
        RegistryStoreSpec(
            name=STORE,
            create=create,
            description="a PostgreSQL server ([plugins.postgres] dsn or LLMOS_POSTGRES_DSN),"
            " shared by daemons on several machines",
        )
    )
