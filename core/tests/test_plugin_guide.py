"""Meta-tests that keep PLUGIN_GUIDE.md and the template plugin honest.

Every hookspec must have a heading in the guide with its exact signature and a
runnable example, every spec type and plugin switch must be documented, and
contrib/llmos-example must implement every hook. The list of hooks is derived
from :mod:`llmos.plugin.spec`, so a new hook fails these tests until it is
documented and the template implements it.
"""

from __future__ import annotations

import ast
import inspect
import re
import types
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmos.plugin import spec
from llmos.plugin.manager import PluginManager

ROOT = Path(__file__).resolve().parents[2]
GUIDE_PATH = ROOT / "PLUGIN_GUIDE.md"
EXAMPLE_PLUGIN = ROOT / "contrib" / "llmos-example" / "src" / "llmos_example" / "plugin.py"

_HEADING = re.compile(r"^### `(llmos_\w+)\(([^)]*)\)`$", re.MULTILINE)
_PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)


def hookspecs() -> dict[str, Callable[..., object]]:
    """Every function of the spec module that carries the hookspec marker."""
    marker = f"{spec.NAME}_spec"
    return {
        name: fn
        for name, fn in inspect.getmembers(spec, inspect.isfunction)
        if name.startswith("llmos_") and hasattr(fn, marker)
    }


def heading(name: str, fn: Callable[..., object]) -> str:
    params = ", ".join(inspect.signature(fn).parameters)
    return f"### `{name}({params})`"


@pytest.fixture(scope="module")
def guide() -> str:
    return GUIDE_PATH.read_text(encoding="utf-8")


def hook_sections(guide: str) -> Iterator[tuple[str, str]]:
    """``(hook name, section text)`` for each hook heading of the guide."""
    matches = list(_HEADING.finditer(guide))
    for match, following in zip(matches, [*matches[1:], None], strict=True):
        end = following.start() if following else guide.index("\n## ", match.end())
        yield match.group(1), guide[match.end() : end]


def test_the_spec_module_has_hooks() -> None:
    # Guards the derivation below: an empty list would make every test pass.
    assert "llmos_register_providers" in hookspecs()
    assert len(hookspecs()) >= 9


@pytest.mark.parametrize("name", sorted(hookspecs()))
def test_every_hook_has_a_heading_with_its_signature(guide: str, name: str) -> None:
    expected = heading(name, hookspecs()[name])
    assert expected in guide.splitlines(), f"PLUGIN_GUIDE.md lacks the heading {expected}"


def test_no_heading_names_a_hook_that_does_not_exist(guide: str) -> None:
    documented = {m.group(0) for m in _HEADING.finditer(guide)}
    expected = {heading(name, fn) for name, fn in hookspecs().items()}
    assert documented == expected


@pytest.mark.parametrize("name", sorted(hookspecs()))
def test_every_hook_example_is_a_working_plugin(guide: str, name: str) -> None:
    """The first python block under a hook's heading is a complete plugin
    module implementing that hook; it must load through the real manager."""
    sections = dict(hook_sections(guide))
    blocks = _PYTHON_BLOCK.findall(sections[name])
    assert blocks, f"the section of {name} has no python example"
    module = types.ModuleType(f"guide_example_{name}")
    exec(compile(blocks[0], f"<PLUGIN_GUIDE.md {name}>", "exec"), module.__dict__)
    pm = PluginManager()
    pm.load(entry_points=[])
    info = pm.register(module, "guide-example")
    try:
        assert info.status == "loaded", info.error
        assert info.hooks == [name]
        if name.startswith("llmos_register_") and name != "llmos_register_routes":
            assert info.registered, f"the {name} example registered nothing"
        if name == "llmos_discover_models":
            assert [r.plugin for r in pm.discover_models()] == ["guide-example"]
    finally:
        pm.unregister("guide-example")


def test_every_python_block_parses(guide: str) -> None:
    for block in _PYTHON_BLOCK.findall(guide):
        ast.parse(block)


@pytest.mark.parametrize(
    "spec_class",
    [
        "ProviderSpec",
        "FusionStrategySpec",
        "TuningMethodSpec",
        "MonitorSinkSpec",
        "RegistryStoreSpec",
        "PluginContext",
        "BusHealth",
        "Section",
        "CommandSpec",
        "RouteSpec",
        "ModelCard",
    ],
)
def test_every_registered_type_is_documented(guide: str, spec_class: str) -> None:
    assert f"`{spec_class}" in guide


@pytest.mark.parametrize(
    "variable",
    ["LLMOS_LOAD_PLUGINS", "LLMOS_DISABLE_PLUGINS", "LLMOS_STRICT_PLUGINS", "LLMOS_TRACE_PLUGINS"],
)
def test_every_plugin_switch_is_documented(guide: str, variable: str) -> None:
    assert f"`{variable}" in guide


def test_the_template_plugin_implements_every_hook() -> None:
    # Parsed, not imported: llmos-example need not be installed here.
    tree = ast.parse(EXAMPLE_PLUGIN.read_text(encoding="utf-8"))
    implemented = {
        node.name
        for node in tree.body
        if isinstance(node, ast.FunctionDef)
        and any(isinstance(d, ast.Name) and d.id == "hookimpl" for d in node.decorator_list)
    }
    assert implemented == set(hookspecs())
