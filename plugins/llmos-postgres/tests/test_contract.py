"""The registry store contract (:mod:`llmos.store_contract`, the suite the
kernel's SQLite store passes) against :class:`PostgresStore` on a real server."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from llmos.store_contract import RegistryStoreContract, StoreOpener
from llmos_postgres.store import PostgresStore


class TestPostgresStoreContract(RegistryStoreContract):
    @pytest.fixture
    def open_store(self, open_pg: Callable[..., PostgresStore]) -> StoreOpener:
        return open_pg
