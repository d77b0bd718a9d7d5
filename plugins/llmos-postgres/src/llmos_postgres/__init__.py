"""llmos-postgres: the model registry on a PostgreSQL server.

``[registry] store = "postgres"`` makes a kernel keep its model cards in
PostgreSQL instead of ``LLMOS_HOME/registry.db``, so that several daemons, on
one machine or many, share one registry (same refs, query language, ranking
and gapless versions as the SQLite store). See the README for the options.
"""

from llmos_postgres.store import PostgresStore

__all__ = ["DSN_ENV", "STORE", "PostgresStore"]

#: the registry store's name: ``[registry] store = "postgres"``
STORE = "postgres"
#: the environment variable a DSN may come from (keeps passwords out of config files)
DSN_ENV = "LLMOS_POSTGRES_DSN"
