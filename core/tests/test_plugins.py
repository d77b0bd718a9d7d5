"""Plugin loading: real distributions on disk, discovered through entry points.

Each test writes one or more small distributions (a module plus a
``.dist-info`` folder with ``entry_points.txt``) into a temporary folder, puts
it on ``sys.path`` and lets the real :class:`PluginManager` find them through
importlib-metadata — the same path an installed plugin takes.
"""

from __future__ import annotations

from pathlib import Path

import importlib_metadata
import pytest
import structlog

from llmos.config import PluginSettings
from llmos.errors import ConfigError, DuplicateNameError, PluginError
from llmos.logs import configure_logging
from llmos.plugin import hookimpl
from llmos.plugin.manager import DEFAULT_PLUGINS, HOOK_NAMES, PluginManager
from llmos.testing import registered
from llmos.types import ProviderSpec

GOOD = """
from llmos.plugin import hookimpl
from llmos.types import ProviderSpec

@hookimpl
def llmos_register_providers(register):
    register(ProviderSpec(name="{provider}", load=lambda card, options: None))
"""


def entry_points(tmp_path: Path) -> list[importlib_metadata.EntryPoint]:
    """The ``llmos`` entry points of the distributions written under tmp_path only
    (the test environment may have other plugins installed)."""
    return [
        ep
        for dist in importlib_metadata.distributions(path=[str(tmp_path)])
        for ep in dist.entry_points.select(group="llmos")
    ]


def load(tmp_path: Path, **settings: object) -> PluginManager:
    values: dict[str, object] = {"load": None, "disable": (), "strict": False, "trace": False}
    values.update(settings)
    pm = PluginManager(PluginSettings(**values))
    pm.load(entry_points(tmp_path))
    return pm


def info(pm: PluginManager, name: str):
    return next(i for i in pm.plugins() if i.name == name)


def test_default_plugins_load_and_every_hook_is_specified(tmp_path: Path) -> None:
    pm = load(tmp_path)
    assert [i.name for i in pm.plugins()] == list(DEFAULT_PLUGINS)
    assert all(i.status == "loaded" and i.default for i in pm.plugins())
    assert "log" in pm.monitor_sinks
    assert pm.plugins(include_defaults=False) == []
    assert "llmos_register_providers" in HOOK_NAMES and "llmos_startup" in HOOK_NAMES


def test_good_plugin_is_discovered_with_distribution_and_version(site, tmp_path: Path) -> None:
    site("llmos-good", GOOD.format(provider="good"), version="2.5")
    pm = load(tmp_path)
    good = info(pm, "llmos-good")
    assert (good.status, good.distribution, good.version) == ("loaded", "llmos-good", "2.5")
    assert good.hooks == ["llmos_register_providers"]
    assert good.registered == {"providers": ["good"]}
    assert pm.providers["good"].plugin == "llmos-good"


def test_plugin_that_raises_on_import_is_recorded_and_skipped(site, tmp_path: Path) -> None:
    site("llmos-broken", "raise ImportError('needs libfoo')\n", version="0.3")
    site("llmos-good", GOOD.format(provider="good"))
    pm = load(tmp_path)
    broken = info(pm, "llmos-broken")
    assert broken.status == "failed"
    assert (broken.distribution, broken.version) == ("llmos-broken", "0.3")
    assert "import failed: ImportError: needs libfoo" in broken.error
    assert info(pm, "llmos-good").status == "loaded"
    assert "good" in pm.providers


def test_hook_raising_during_registration_rolls_back_what_it_registered(
    site, tmp_path: Path
) -> None:
    site(
        "llmos-half",
        """
        from llmos.plugin import hookimpl
        from llmos.types import ProviderSpec

        @hookimpl
        def llmos_register_providers(register):
            register(ProviderSpec(name="half", load=lambda card, options: None))
            raise RuntimeError("second provider is broken")
        """,
    )
    site("llmos-good", GOOD.format(provider="good"))
    pm = load(tmp_path)
    half = info(pm, "llmos-half")
    assert half.status == "failed"
    assert "llmos_register_providers raised RuntimeError: second provider is broken" in half.error
    assert "half" not in pm.providers, "what the failed plugin registered must be rolled back"
    assert half.registered == {}
    assert "good" in pm.providers


def test_register_with_the_wrong_type_fails_the_plugin(site, tmp_path: Path) -> None:
    site(
        "llmos-wrongtype",
        """
        from llmos.plugin import hookimpl

        @hookimpl
        def llmos_register_providers(register):
            register(("name", object()))
        """,
    )
    pm = load(tmp_path)
    assert "takes a ProviderSpec, got tuple" in info(pm, "llmos-wrongtype").error


def test_misspelled_hook_is_reported_with_a_suggestion(site, tmp_path: Path) -> None:
    site(
        "llmos-typo",
        """
        from llmos.plugin import hookimpl

        @hookimpl
        def llmos_register_provider(register):
            pass
        """,
    )
    pm = load(tmp_path)
    typo = info(pm, "llmos-typo")
    assert typo.status == "failed"
    assert "unknown hook 'llmos_register_provider'" in typo.error
    assert "did you mean 'llmos_register_providers'" in typo.error
    pm.pm.check_pending()  # the failed plugin left nothing unverified behind


def test_optional_unknown_hook_is_allowed(site, tmp_path: Path) -> None:
    site(
        "llmos-future",
        """
        from llmos.plugin import hookimpl

        @hookimpl(optionalhook=True)
        def llmos_hook_of_a_later_kernel(register):
            pass
        """,
    )
    assert info(load(tmp_path), "llmos-future").status == "loaded"


def test_hookimpl_with_an_unknown_argument_is_invalid(site, tmp_path: Path) -> None:
    site(
        "llmos-badargs",
        """
        from llmos.plugin import hookimpl

        @hookimpl
        def llmos_register_providers(register, colour):
            pass
        """,
    )
    badargs = info(load(tmp_path), "llmos-badargs")
    assert badargs.status == "failed"
    assert "invalid plugin" in badargs.error and "colour" in badargs.error


def test_allow_list_by_entry_point_or_distribution_name(site, tmp_path: Path) -> None:
    site("llmos-one", GOOD.format(provider="one"), entry="one")
    site("llmos-two", GOOD.format(provider="two"), entry="two")
    pm = load(tmp_path, load=("one",))
    assert (info(pm, "one").status, info(pm, "two").status) == ("loaded", "not-allowed")
    assert set(pm.providers) == {"one"}
    pm = load(tmp_path, load=("llmos_two",))  # distribution name, any separator
    assert (info(pm, "one").status, info(pm, "two").status) == ("not-allowed", "loaded")


def test_empty_allow_list_loads_no_entry_point_plugin_but_keeps_defaults(
    site, tmp_path: Path
) -> None:
    site("llmos-one", GOOD.format(provider="one"))
    pm = load(tmp_path, load=())
    assert info(pm, "llmos-one").status == "not-allowed"
    assert pm.providers == {}
    assert "log" in pm.monitor_sinks


def test_deny_list_applies_to_entry_points_and_default_plugins(site, tmp_path: Path) -> None:
    site("llmos-one", GOOD.format(provider="one"))
    pm = load(tmp_path, disable=("llmos-one", DEFAULT_PLUGINS[0]))
    assert info(pm, "llmos-one").status == "disabled"
    assert info(pm, DEFAULT_PLUGINS[0]).status == "disabled"
    assert pm.providers == {} and "log" not in pm.monitor_sinks


def test_two_plugins_registering_one_name_is_an_error_naming_both(site, tmp_path: Path) -> None:
    site("llmos-first", GOOD.format(provider="same"))
    site("llmos-second", GOOD.format(provider="same"))
    pm = load(tmp_path)
    second = info(pm, "llmos-second")
    assert second.status == "failed"
    assert "'llmos-first'" in second.error and "'llmos-second'" in second.error
    assert pm.providers["same"].plugin == "llmos-first"


def test_strict_mode_makes_the_first_failure_fatal(site, tmp_path: Path) -> None:
    site("llmos-broken", "raise ImportError('needs libfoo')\n", version="0.3")
    with pytest.raises(PluginError, match=r"'llmos-broken' \(llmos-broken 0.3\).*needs libfoo"):
        load(tmp_path, strict=True)


def test_strict_mode_raises_the_duplicate_error_type(site, tmp_path: Path) -> None:
    site("llmos-first", GOOD.format(provider="same"))
    site("llmos-second", GOOD.format(provider="same"))
    with pytest.raises(DuplicateNameError):
        load(tmp_path, strict=True)


def test_in_process_register_and_unregister(tmp_path: Path) -> None:
    pm = load(tmp_path)

    class Plugin:
        @hookimpl
        def llmos_register_providers(self, register):
            register(ProviderSpec(name="inproc", load=lambda card, options: None))

    with registered(pm, Plugin(), "inproc-plugin") as plugin:
        assert plugin.status == "loaded"
        assert pm.providers["inproc"].plugin == "inproc-plugin"
    assert "inproc" not in pm.providers
    assert all(i.name != "inproc-plugin" for i in pm.plugins())


def test_trace_logs_every_hook_call(site, tmp_path: Path) -> None:
    site("llmos-good", GOOD.format(provider="good"))
    configure_logging("debug")  # trace lines are info; the suite logs warnings only
    try:
        with structlog.testing.capture_logs() as logs:
            load(tmp_path, trace=True)
    finally:
        configure_logging("warning", fmt="console")
    traced = [e for e in logs if e["event"] == "plugins.trace"]
    assert {(e["plugin"], e["hook"]) for e in traced} >= {
        ("llmos-good", "llmos_register_providers"),
        (DEFAULT_PLUGINS[0], "llmos_register_monitor_sinks"),
    }
    assert all(e["duration_ms"] >= 0 for e in traced)


def test_discover_models_isolates_a_failing_source(tmp_path: Path) -> None:
    from llmos.types import ModelCard

    pm = load(tmp_path)

    class Source:
        @hookimpl
        def llmos_discover_models(self, register):
            register(ModelCard(name="acme/tiny", provider="transformers"))

    class BrokenSource:
        @hookimpl
        def llmos_discover_models(self, register):
            raise OSError("catalogue unreachable")

    pm.register(Source(), "source")
    pm.register(BrokenSource(), "broken-source")
    found = pm.discover_models()
    assert [(r.plugin, r.spec.name) for r in found] == [("source", "acme/tiny")]
    assert "catalogue unreachable" in info(pm, "broken-source").error


def test_a_second_plugin_under_a_taken_name_fails_alone(site, tmp_path: Path) -> None:
    site("llmos-a", GOOD.format(provider="from-a"), entry="same")
    site("llmos-b", GOOD.format(provider="from-b"), entry="same")
    pm = load(tmp_path)
    first, second = [i for i in pm.plugins() if i.name == "same"]
    assert (first.distribution, first.status) == ("llmos-a", "loaded")
    assert (second.distribution, second.status) == ("llmos-b", "failed")
    assert "already taken by 'llmos-a'" in second.error
    assert pm.providers["from-a"].plugin == "same"
    assert "from-b" not in pm.providers


# --------------------------------------------------------------------------
# Hooks defined twice
# --------------------------------------------------------------------------


def line_of(path: Path, text: str, nth: int = 1) -> int:
    """Where the ``nth`` function of ``path`` whose line starts with ``text``
    begins: the line of its decorator, like ``co_firstlineno``."""
    numbers = [
        n for n, line in enumerate(path.read_text().splitlines(), 1) if line.startswith(text)
    ]
    return numbers[nth - 1] - 1


def test_a_hook_defined_twice_in_a_module_is_a_warning_with_file_and_lines(
    site, tmp_path: Path
) -> None:
    site(
        "llmos-twice",
        """
        from llmos.plugin import hookimpl
        from llmos.types import ProviderSpec

        @hookimpl
        def llmos_register_providers(register):
            register(ProviderSpec(name="lost", load=lambda request: None))

        @hookimpl
        def llmos_register_providers(register):
            register(ProviderSpec(name="kept", load=lambda request: None))
        """,
    )
    with structlog.testing.capture_logs() as logs:
        pm = load(tmp_path)
    twice = info(pm, "llmos-twice")
    source = tmp_path / "llmos_twice.py"
    first, second = (line_of(source, "def llmos_register_providers", n) for n in (1, 2))
    assert twice.status == "loaded"
    assert twice.warnings == [
        f"llmos_register_providers is defined 2 times in {source} (lines {first} and {second});"
        f" Python keeps only the last, so the one at line {first} never runs: merge them into"
        " one function"
    ]
    assert "kept" in pm.providers and "lost" not in pm.providers
    logged = [e for e in logs if e["event"] == "plugins.warning"]
    assert [(e["plugin"], e["warning"]) for e in logged] == [("llmos-twice", twice.warnings[0])]
    assert twice.error is None


def test_a_version_switch_and_a_plain_plugin_are_not_warned_about(site, tmp_path: Path) -> None:
    site(
        "llmos-switch",
        """
        import sys
        from llmos.plugin import hookimpl
        from llmos.types import ProviderSpec

        if sys.version_info >= (3, 11):
            @hookimpl
            def llmos_register_providers(register):
                register(ProviderSpec(name="new", load=lambda request: None))
        else:
            @hookimpl
            def llmos_register_providers(register):
                register(ProviderSpec(name="old", load=lambda request: None))
        """,
    )
    site("llmos-good", GOOD.format(provider="good"))
    pm = load(tmp_path)
    assert info(pm, "llmos-switch").warnings == []
    assert info(pm, "llmos-good").warnings == []


def test_a_hook_defined_twice_in_a_plugin_class_is_a_warning(site, tmp_path: Path) -> None:
    site(
        "llmos-klass",
        """
        from llmos.plugin import hookimpl
        from llmos.types import ProviderSpec

        class Plugin:
            @hookimpl
            def llmos_startup(self, kernel):
                pass

            @hookimpl
            def llmos_startup(self, kernel):
                pass

        plugin = Plugin()
        """,
        entry="llmos-klass = llmos_klass:plugin\nignored",
    )
    pm = load(tmp_path)
    klass = info(pm, "llmos-klass")
    source = tmp_path / "llmos_klass.py"
    first = line_of(source, "    def llmos_startup")
    assert klass.status == "loaded"
    assert len(klass.warnings) == 1
    assert f"llmos_startup is defined 2 times in {source} (lines {first} and" in klass.warnings[0]


def test_a_hook_implemented_twice_through_specname_is_a_warning(site, tmp_path: Path) -> None:
    site(
        "llmos-alias",
        """
        from llmos.plugin import hookimpl
        from llmos.types import ProviderSpec

        @hookimpl
        def llmos_register_providers(register):
            register(ProviderSpec(name="alias-one", load=lambda request: None))

        @hookimpl(specname="llmos_register_providers")
        def more_providers(register):
            register(ProviderSpec(name="alias-two", load=lambda request: None))
        """,
    )
    pm = load(tmp_path)
    alias = info(pm, "llmos-alias")
    source = tmp_path / "llmos_alias.py"
    first = line_of(source, "def llmos_register_providers")
    second = line_of(source, "def more_providers")
    assert alias.status == "loaded", alias.error
    assert alias.hooks == ["llmos_register_providers"]
    # Both run: pluggy calls every implementation (in its order: the one it
    # registered last, more_providers, first).
    assert alias.registered == {"providers": ["alias-two", "alias-one"]}
    assert alias.warnings == [
        f"hook llmos_register_providers is implemented 2 times: by llmos_register_providers"
        f" ({source}:{first}), more_providers ({source}:{second}); each of them runs: merge"
        " them into one function if that is not what you meant"
    ]


def test_a_specname_alias_alone_is_a_plain_hook(tmp_path: Path) -> None:
    pm = load(tmp_path)

    class Plugin:
        @hookimpl(specname="llmos_register_providers")
        def providers(self, register):
            register(ProviderSpec(name="aliased", load=lambda request: None))

    with registered(pm, Plugin(), "aliased") as plugin:
        assert plugin.status == "loaded", plugin.error
        assert plugin.hooks == ["llmos_register_providers"]
        assert plugin.warnings == []
        assert pm.providers["aliased"].plugin == "aliased"


# --------------------------------------------------------------------------
# Route collisions, found without the daemon
# --------------------------------------------------------------------------

ROUTES = """
from llmos.plugin import hookimpl
from llmos.types import RouteSpec

@hookimpl
def llmos_register_routes(register):
    from fastapi import APIRouter

    router = APIRouter()
    for method, path in {routes!r}:
        router.add_api_route(path, lambda: {{"ok": True}}, methods=[method])
    register(RouteSpec(router=router, prefix={prefix!r}))
"""


def test_route_collisions_fail_the_plugin_at_load(site, tmp_path: Path) -> None:
    from llmos.config import load_config
    from llmos.runtime.kernel import Kernel
    from llmos.server.app import create_app, kernel_routes

    site("llmos-first", ROUTES.format(routes=[("GET", "/items/{a}")], prefix="/acme"))
    site("llmos-second", ROUTES.format(routes=[("GET", "/items/{b}")], prefix="/acme"))
    site("llmos-shadow", ROUTES.format(routes=[("GET", "/healthz"), ("GET", "/x")], prefix=""))
    site("llmos-slash", ROUTES.format(routes=[("GET", "/y")], prefix="acme/"))
    site("llmos-apart", ROUTES.format(routes=[("GET", "/items/{a}")], prefix="/apart"))
    pm = load(tmp_path)
    kernel = Kernel(load_config(env={"LLMOS_HOME": str(tmp_path / "home")}), plugins=pm)

    reserved = kernel_routes(kernel)
    assert {("GET", "/healthz"), ("GET", "/openapi.json"), ("POST", "/v1/chat/completions")} <= (
        set(reserved)
    )
    assert kernel.jobs.adopt is False, "only the daemon's kernel adopts the job queue"
    passed = pm.check_routes(kernel, reserved)

    assert sorted(passed) == ["llmos-apart", "llmos-first"]
    assert info(pm, "llmos-first").registered == {"routes": ["/acme"]}
    second = info(pm, "llmos-second")
    assert second.status == "failed"
    assert second.error == (
        "route GET /acme/items/{} is registered by both 'llmos-first' and 'llmos-second';"
        " disable one of them (LLMOS_DISABLE_PLUGINS or [plugins] disable)"
    )
    shadow = info(pm, "llmos-shadow")
    assert shadow.status == "failed"
    assert shadow.error.startswith(
        "route GET /healthz is registered by both 'llmos' (the kernel) and 'llmos-shadow'"
    )
    assert shadow.registered == {}
    slash = info(pm, "llmos-slash")
    assert slash.error == "route prefix 'acme/' must start with '/' and not end with '/'"

    # Asking again answers the same, and the daemon mounts exactly that.
    assert sorted(pm.check_routes(kernel, reserved)) == ["llmos-apart", "llmos-first"]
    app = create_app(kernel)
    paths = {getattr(r, "path", "") for r in app.routes}
    assert "/x" not in paths and "/y" not in paths
    assert info(pm, "llmos-first").status == "loaded"
    assert [i.name for i in pm.failed()] == ["llmos-second", "llmos-shadow", "llmos-slash"]


def test_strict_mode_makes_a_route_collision_fatal_at_load(site, tmp_path: Path) -> None:
    from llmos.config import load_config
    from llmos.runtime.kernel import Kernel
    from llmos.server.app import kernel_routes

    site("llmos-shadow", ROUTES.format(routes=[("GET", "/readyz")], prefix=""))
    pm = load(tmp_path, strict=True)
    kernel = Kernel(load_config(env={"LLMOS_HOME": str(tmp_path / "home")}), plugins=pm)
    with pytest.raises(DuplicateNameError, match="route GET /readyz is registered by both"):
        pm.check_routes(kernel, kernel_routes(kernel))


# --------------------------------------------------------------------------
# Dispatch: pluggy's order, no wrappers
# --------------------------------------------------------------------------


def test_hooks_run_in_pluggys_order_one_plugin_at_a_time(tmp_path: Path) -> None:
    pm = load(tmp_path, disable=DEFAULT_PLUGINS)
    calls: list[str] = []

    def plugin(name: str, **marks: bool) -> object:
        class Plugin:
            @hookimpl(**marks)
            def llmos_startup(self, kernel: object) -> None:
                calls.append(name)

        return Plugin()

    for name, marks in [
        ("last", {"trylast": True}),
        ("plain-1", {}),
        ("first", {"tryfirst": True}),
        ("plain-2", {}),
    ]:
        pm.register(plugin(name, **marks), name)

    class Broken:
        @hookimpl
        def llmos_startup(self, kernel: object) -> None:
            calls.append("broken")
            raise RuntimeError("boom")

    pm.register(Broken(), "broken")
    # the order pluggy itself calls them in
    expected = [i.plugin_name for i in reversed(pm.pm.hook.llmos_startup.get_hookimpls())]
    assert expected == ["first", "broken", "plain-2", "plain-1", "last"]

    pm.startup(kernel=object())  # type: ignore[arg-type]
    # tryfirst first, trylast last, otherwise the last registered first; the
    # broken plugin fails alone and the ones after it still run
    assert calls == expected
    assert info(pm, "broken").status == "failed" and "boom" in info(pm, "broken").error
    calls.clear()
    pm.shutdown(kernel=object())  # type: ignore[arg-type]
    assert calls == []  # nobody implements shutdown; the failed plugin is unregistered
    calls.clear()
    pm.startup(kernel=object())  # type: ignore[arg-type]
    assert calls == ["first", "plain-2", "plain-1", "last"]


WRAPPER = """
from llmos.plugin import hookimpl
from llmos.types import ProviderSpec

@hookimpl
def llmos_register_providers(register):
    register(ProviderSpec(name="wrapped", load=lambda card, options: None))

@hookimpl({marks})
def llmos_startup(kernel):
    yield
"""


@pytest.mark.parametrize("marks", ["wrapper=True", "hookwrapper=True"])
def test_a_hook_wrapper_is_refused_with_what_to_do_instead(
    site, tmp_path: Path, marks: str
) -> None:
    site("llmos-wrapper", WRAPPER.format(marks=marks))
    pm = load(tmp_path)
    wrapper = info(pm, "llmos-wrapper")
    assert wrapper.status == "failed"
    assert wrapper.error == (
        f"hook wrappers are not supported: llmos_startup ({marks}); llmos calls every"
        " plugin's implementation on its own, so there is no call to wrap. Implement the hook"
        " plainly, and order it with @hookimpl(tryfirst=True) or @hookimpl(trylast=True)"
    )
    # nothing of it stays: not its provider, not its hooks
    assert "wrapped" not in pm.providers
    assert not any(
        i.plugin_name == "llmos-wrapper" for i in pm.pm.hook.llmos_startup.get_hookimpls()
    )
    with pytest.raises(PluginError, match="hook wrappers are not supported"):
        load(tmp_path, strict=True)


# --------------------------------------------------------------------------
# Config sections by hook
# --------------------------------------------------------------------------

CONFIG_PLUGIN = """
from llmos.config import Field, Section
from llmos.plugin import hookimpl

@hookimpl
def llmos_register_config(register):
    register(Section(
        "{name}",
        {{
            "address": Field("str", "auto", "Where the cluster is."),
            "replicas": Field("int", 1, "Copies of each model.", min=1, max=64),
            "token": Field("str", "", "Cluster token.", secret=True, env="ACME_TOKEN"),
        }},
        doc="The acme cluster.",
    ))
"""


def test_a_plugin_declares_a_config_section_checked_like_the_kernels(site, tmp_path: Path) -> None:
    from llmos.config import ConfigErrors, load_config
    from llmos.runtime.kernel import Kernel

    site("llmos-acme", CONFIG_PLUGIN.format(name="acme"))
    good = tmp_path / "good.toml"
    good.write_text('[acme]\nreplicas = 3\ntoken = "secret-token-1234"\n')
    env = {"LLMOS_HOME": str(tmp_path / "home")}
    pm = load(tmp_path)
    assert info(pm, "llmos-acme").registered == {"config_sections": ["acme"]}
    config = Kernel(load_config([good], env=env), plugins=pm).config
    assert config.section("acme") == {
        "address": "auto",
        "replicas": 3,
        "token": "secret-token-1234",
    }
    assert config.to_dict()["acme"]["token"] == "****1234"
    assert config.origins["acme.replicas"].line == 2

    bad = tmp_path / "bad.toml"
    bad.write_text("[acme]\nreplicas = 0\nadress = 'x'\n[acmee]\nx = 1\n")
    with pytest.raises(ConfigErrors) as caught:
        _ = Kernel(load_config([bad], env=env), plugins=load(tmp_path)).config
    assert [e.message for e in caught.value.errors] == [
        f"{bad}:2: acme.replicas: expected an integer between 1 and 64, got 0",
        f"{bad}:3: acme.adress: unknown key (did you mean acme.address?)",
        f"{bad}:4: acmee: unknown section (did you mean acme?)",
    ]


def test_a_plugin_cannot_take_a_kernel_section_and_a_disabled_ones_section_is_unknown(
    site, tmp_path: Path
) -> None:
    from llmos.config import load_config
    from llmos.runtime.kernel import Kernel

    site("llmos-acme", CONFIG_PLUGIN.format(name="runtime"))
    pm = load(tmp_path)
    kernel = Kernel(load_config(env={"LLMOS_HOME": str(tmp_path / "home")}), plugins=pm)
    assert kernel.config.section("runtime")["max_queue"] == 64  # the kernel's section stands
    acme = info(pm, "llmos-acme")
    assert acme.status == "failed"
    assert acme.error == (
        "config section 'runtime' is registered by both 'llmos' and 'llmos-acme';"
        " disable one of them (LLMOS_DISABLE_PLUGINS or [plugins] disable)"
    )

    path = tmp_path / "llmos.toml"
    path.write_text("[acme]\nreplicas = 2\n")
    site("llmos-acme2", CONFIG_PLUGIN.format(name="acme"), entry="acme2")
    off = load(tmp_path, disable=("acme2",))
    with pytest.raises(ConfigError, match=rf"{path}:1: acme: unknown section"):
        _ = Kernel(load_config([path], env={"LLMOS_HOME": str(tmp_path)}), plugins=off).config
