"""The model registry: cards, versions, aliases and search.

:class:`RegistryStore` is the interface; :class:`SQLiteStore` keeps it in one
SQLite file (WAL, FTS5) that several processes may share. The search language
is in :mod:`llmos.registry.query`, card files in :mod:`llmos.registry.cardfile`.
"""

from llmos.registry.cardfile import (
    card_from_markdown,
    card_to_markdown,
    read_card_file,
    write_card_file,
)
from llmos.registry.query import QueryError, parse_query
from llmos.registry.store import (
    LATEST,
    RegistryStore,
    SearchHit,
    SearchPage,
    SQLiteStore,
    VersionInfo,
    VersionStatus,
    parse_ref,
    validate_alias,
)

__all__ = [
    "LATEST",
    "QueryError",
    "RegistryStore",
    "SQLiteStore",
    "SearchHit",
    "SearchPage",
    "VersionInfo",
    "VersionStatus",
    "card_from_markdown",
    "card_to_markdown",
    "parse_query",
    "parse_ref",
    "read_card_file",
    "validate_alias",
    "write_card_file",
]
