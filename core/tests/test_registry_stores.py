"""Registry stores by hook: ``[registry] store`` picks one a plugin registers.

Real kernels, real SQLite files, plugins registered through the real manager.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from llmos.config import load_config
from llmos.errors import ConfigError, PluginError
from llmos.plugin import hookimpl
from llmos.registry.store import SQLiteStore
from llmos.runtime.kernel import Kernel
from llmos.types import ModelCard, PluginContext, RegistryStoreSpec


def kernel(home: Path, *overrides: str) -> Kernel:
    return Kernel(
        load_config(
            overrides=list(overrides), env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": ""}
        )
    )


def card(name: str) -> ModelCard:
    return ModelCard(name=name, provider="none", description=f"the {name} model")


def test_the_default_store_is_the_sqlite_file_of_the_data_folder(tmp_path: Path) -> None:
    k = kernel(tmp_path)
    assert k.config.section("registry")["store"] == "sqlite"
    registered = k.load_plugins().registry_stores["sqlite"]
    assert registered.plugin == "llmos.default_plugins.sqlite_registry"
    store = k.registry.store
    assert isinstance(store, SQLiteStore) and store.path == tmp_path / "registry.db"
    store.register(card("a"))
    k.registry.close()
    # another kernel on the same data folder sees it
    assert kernel(tmp_path).registry.store.get("a").version == 1


def test_a_plugins_store_is_used_when_the_config_names_it(tmp_path: Path) -> None:
    opened: list[PluginContext] = []

    class Shared:
        @hookimpl
        def llmos_register_registry_stores(self, register):
            def create(context: PluginContext) -> SQLiteStore:
                opened.append(context)
                return SQLiteStore(Path(context.options["path"]))

            register(RegistryStoreSpec(name="shared", create=create))

    shared = tmp_path / "shared" / "cards.db"
    k = kernel(
        tmp_path / "home", 'registry.store="shared"', f'plugins.shared-store.path="{shared}"'
    )
    k.load_plugins()
    k.plugins.register(Shared(), "shared-store")
    k.registry.store.register(card("b"))
    assert [c.options["path"] for c in opened] == [str(shared)]
    assert opened[0].home == tmp_path / "home"
    assert SQLiteStore(shared).get("b").description == "the b model"
    assert not (tmp_path / "home" / "registry.db").exists()


def test_an_unknown_store_is_a_config_error_listing_the_known_ones(tmp_path: Path) -> None:
    k = kernel(tmp_path, 'registry.store="postgres"')
    with pytest.raises(ConfigError) as caught:
        _ = k.registry
    assert str(caught.value) == (
        "[registry] store = 'postgres': no loaded plugin registers a registry store of that"
        " name (registered: sqlite); install or enable the plugin that provides it, or set"
        ' store = "sqlite"'
    )
    assert not (tmp_path / "registry.db").exists()


def test_a_store_that_fails_to_open_names_its_plugin(tmp_path: Path) -> None:
    class Broken:
        @hookimpl
        def llmos_register_registry_stores(self, register):
            def create(context: PluginContext) -> None:
                raise ConnectionRefusedError("db.example:5432")

            register(RegistryStoreSpec(name="broken", create=create))

    k = kernel(tmp_path, 'registry.store="broken"')
    k.load_plugins()
    k.plugins.register(Broken(), "broken-store")
    with pytest.raises(PluginError) as caught:
        _ = k.registry
    assert str(caught.value) == (
        "registry store 'broken' of plugin 'broken-store' failed to open:"
        " ConnectionRefusedError: db.example:5432"
    )


def test_the_sqlite_stores_options_are_checked(tmp_path: Path) -> None:
    bad = kernel(tmp_path, 'plugins."llmos.default_plugins.sqlite_registry".busy_timeout=0')
    with pytest.raises(ConfigError, match="busy_timeout: expected a number of seconds > 0, got 0"):
        _ = bad.registry
    good = kernel(tmp_path, 'plugins."llmos.default_plugins.sqlite_registry".busy_timeout=2.5')
    assert good.registry.store.busy_timeout == 2.5
