"""The installed plugin, found through its entry point by real kernels:
``[registry] store = "postgres"``, its options, and two daemons on separate
data folders sharing one registry over HTTP."""

from __future__ import annotations

import threading
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from llmos.config import load_config
from llmos.errors import ConfigError
from llmos.runtime.kernel import Kernel
from llmos.store_contract import card
from llmos.testing import serve_in_thread
from llmos_postgres import STORE
from llmos_postgres.store import PostgresStore
from llmos_postgres.testing import Server


def kernel(home: Path, *overrides: str) -> Kernel:
    return Kernel(
        load_config(
            overrides=['registry.store="postgres"', *overrides],
            env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "postgres"},
        )
    )


def test_the_entry_point_registers_the_store(tmp_path: Path) -> None:
    registered = kernel(tmp_path).load_plugins().registry_stores[STORE]
    assert registered.plugin == "postgres"


def test_the_config_names_the_server(
    tmp_path: Path, server: Server, new_schema: Callable[[], str]
) -> None:
    schema = new_schema()
    k = kernel(
        tmp_path, f'plugins.postgres.dsn="{server.dsn}"', f'plugins.postgres.schema="{schema}"'
    )
    store = k.registry.store
    assert isinstance(store, PostgresStore) and store.schema == schema
    store.register(card("a"))
    k.registry.close()
    assert not (tmp_path / "registry.db").exists()
    # A second kernel, another data folder: the same registry.
    other = kernel(
        tmp_path / "other",
        f'plugins.postgres.dsn="{server.dsn}"',
        f'plugins.postgres.schema="{schema}"',
    )
    assert other.registry.store.get("a").version == 1
    other.registry.close()


def test_the_dsn_may_come_from_the_environment(
    tmp_path: Path, server: Server, new_schema: Callable[[], str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LLMOS_POSTGRES_DSN", server.dsn)
    k = kernel(tmp_path, f'plugins.postgres.schema="{new_schema()}"')
    assert k.registry.store.search("").total == 0
    k.registry.close()
    monkeypatch.delenv("LLMOS_POSTGRES_DSN")
    monkeypatch.setenv("REGISTRY_DB", server.dsn)
    k = kernel(
        tmp_path,
        'plugins.postgres.dsn_env="REGISTRY_DB"',
        f'plugins.postgres.schema="{new_schema()}"',
    )
    assert isinstance(k.registry.store, PostgresStore)
    k.registry.close()


def test_without_a_dsn_the_error_says_where_to_put_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LLMOS_POSTGRES_DSN", raising=False)
    with pytest.raises(ConfigError) as caught:
        _ = kernel(tmp_path).registry
    assert str(caught.value) == (
        '[registry] store = "postgres" needs a PostgreSQL server: set [plugins.postgres] dsn'
        ' (e.g. "host=db.internal dbname=llmos user=llmos") or the LLMOS_POSTGRES_DSN'
        " environment variable (better for a password)"
    )


@pytest.mark.parametrize(
    ("override", "words"),
    [
        ('plugins.postgres.dns="x"', "unknown key(s) dns"),
        ("plugins.postgres.lock_timeout=0", "lock_timeout: expected a number of seconds > 0"),
        ("plugins.postgres.schema=3", "schema: expected a string"),
    ],
)
def test_the_options_are_checked(tmp_path: Path, override: str, words: str) -> None:
    with pytest.raises(ConfigError, match=words.replace("(", r"\(").replace(")", r"\)")):
        _ = kernel(tmp_path, 'plugins.postgres.dsn="host=127.0.0.1"', override).registry


def test_two_daemons_share_the_registry(
    tmp_path: Path, server: Server, new_schema: Callable[[], str]
) -> None:
    """Two daemons (own data folders, own kernels) on one schema: versions
    their kernels register at once number without gaps, and each daemon's
    HTTP API serves what the other registered. (Registration goes through
    the kernels' stores: the HTTP route wants an installed provider, and
    this environment has none.)"""
    schema = new_schema()
    options = (f'plugins.postgres.dsn="{server.dsn}"', f'plugins.postgres.schema="{schema}"')
    one, two = kernel(tmp_path / "one", *options), kernel(tmp_path / "two", *options)
    with serve_in_thread(one) as url_one, serve_in_thread(two) as url_two:
        got: list[int] = []

        def register(k: Kernel, n: int) -> None:
            for _ in range(n):
                got.append(k.registry.store.register(card("team/shared")).version or 0)

        threads = [threading.Thread(target=register, args=(k, 10)) for k in (one, two) * 2]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(got) == list(range(1, 41))
        one.registry.store.register(card("team/only-one", description="registered on one"))
        found = httpx.get(f"{url_two}/api/models", params={"q": "registered one"}, timeout=30)
        assert [item["card"]["name"] for item in found.json()["items"]] == ["team/only-one"]
        versions = httpx.get(f"{url_one}/api/models/team/shared/versions", timeout=30).json()
        assert [v["card"]["version"] for v in versions["versions"]] == list(range(1, 41))
        latest = httpx.get(f"{url_two}/api/models/team/shared", timeout=30).json()
        assert latest["card"]["version"] == 40
