"""The ``llmos`` command line: exit codes, one-line errors, ``--json`` shapes.

Most tests run the installed console script in a subprocess, the way a user
and a shell script meet it; plugins come from distributions written to a
folder on ``PYTHONPATH`` and are found through entry points.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from llmos import __version__
from llmos.plugin.manager import DEFAULT_PLUGINS
from llmos.testing import write_distribution

from .conftest import LLMOS, llmos


def add_plugin(env: dict[str, str], dist: str, source: str, **kwargs: str) -> None:
    write_distribution(Path(env["PYTHONPATH"]), dist, source, **kwargs)


BROKEN = "raise ImportError('needs libfoo')\n"

COMMAND = """
import click
from llmos.plugin import hookimpl
from llmos.types import CommandSpec

@click.command(name="{name}")
@click.argument("who")
def hello(who):
    click.echo(f"hello {{who}}")

@hookimpl
def llmos_register_commands(register):
    register(CommandSpec(command=hello))
"""


def test_version_json(env: dict[str, str]) -> None:
    run = llmos("version", "--json", env=env)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["llmos"] == __version__
    assert set(data) == {"llmos", "pluggy", "python", "platform"}


def test_plugins_json_lists_defaults_only_with_all(env: dict[str, str]) -> None:
    run = llmos("plugins", "--json", env=env)
    assert run.returncode == 0, run.stderr
    assert [p for p in json.loads(run.stdout) if p["default"]] == []
    run = llmos("plugins", "--json", "--all", env=env)
    rows = json.loads(run.stdout)
    default = next(p for p in rows if p["name"] == DEFAULT_PLUGINS[0])
    assert default == {
        "name": DEFAULT_PLUGINS[0],
        "module": DEFAULT_PLUGINS[0],
        "distribution": "llmos",
        "version": __version__,
        "default": True,
        "status": "loaded",
        "error": None,
        "hooks": ["llmos_register_monitor_sinks"],
        "registered": {"monitor_sinks": ["log"]},
        "warnings": [],
    }


def test_broken_plugin_is_listed_as_failed_and_the_command_still_succeeds(
    env: dict[str, str],
) -> None:
    add_plugin(env, "llmos-broken", BROKEN, version="0.3")
    run = llmos("plugins", "--json", env=env)
    assert run.returncode == 0, run.stderr
    # other plugins installed in this environment may be listed too
    broken = next(p for p in json.loads(run.stdout) if p["name"] == "llmos-broken")
    assert broken["status"] == "failed"
    assert (broken["distribution"], broken["version"]) == ("llmos-broken", "0.3")
    assert "needs libfoo" in broken["error"]
    # people get a table with the error in it
    table = llmos("plugins", env=env)
    assert table.returncode == 0 and "needs libfoo" in table.stdout


def test_strict_turns_a_broken_plugin_into_exit_3_with_one_line(env: dict[str, str]) -> None:
    add_plugin(env, "llmos-broken", BROKEN)
    for args, extra in (
        (("--strict", "plugins"), {}),
        (("plugins",), {"LLMOS_STRICT_PLUGINS": "1"}),
    ):
        run = llmos(*args, env={**env, **extra})
        assert run.returncode == 3, run.stderr
        errors = [line for line in run.stderr.splitlines() if line.startswith("error:")]
        assert errors == [
            "error: plugin 'llmos-broken' (llmos-broken 1.0) failed: "
            "import failed: ImportError: needs libfoo"
        ]
        assert "Traceback" not in run.stderr


def test_debug_shows_the_traceback(env: dict[str, str]) -> None:
    add_plugin(env, "llmos-broken", BROKEN)
    run = llmos("--debug", "--strict", "plugins", env=env)
    assert run.returncode == 3
    assert "Traceback (most recent call last)" in run.stderr


def test_allow_and_deny_lists_from_the_environment(env: dict[str, str]) -> None:
    add_plugin(env, "llmos-one", COMMAND.format(name="one"), entry="one")
    add_plugin(env, "llmos-two", COMMAND.format(name="two"), entry="two")

    def statuses(extra: dict[str, str]) -> dict[str, str]:
        run = llmos("plugins", "--json", env={**env, **extra})
        assert run.returncode == 0, run.stderr
        rows = json.loads(run.stdout)
        return {p["name"]: p["status"] for p in rows if p["name"] in ("one", "two")}

    assert statuses({}) == {"one": "loaded", "two": "loaded"}
    assert statuses({"LLMOS_LOAD_PLUGINS": "two"}) == {"one": "not-allowed", "two": "loaded"}
    assert statuses({"LLMOS_LOAD_PLUGINS": ""}) == {"one": "not-allowed", "two": "not-allowed"}
    assert statuses({"LLMOS_DISABLE_PLUGINS": "one"}) == {"one": "disabled", "two": "loaded"}


def test_plugin_commands_are_added_and_a_clash_with_a_builtin_fails_the_plugin(
    env: dict[str, str],
) -> None:
    add_plugin(env, "llmos-hello", COMMAND.format(name="hello"))
    add_plugin(env, "llmos-clash", COMMAND.format(name="serve"))
    run = llmos("hello", "world", env=env)
    assert (run.returncode, run.stdout) == (0, "hello world\n"), run.stderr
    assert "hello" in llmos("--help", env=env).stdout
    rows = {p["name"]: p for p in json.loads(llmos("plugins", "--json", env=env).stdout)}
    assert rows["llmos-hello"]["registered"] == {"commands": ["hello"]}
    assert rows["llmos-clash"]["status"] == "failed"
    assert "'llmos' and 'llmos-clash'" in rows["llmos-clash"]["error"]
    # the built-in command still answers
    assert "Run the llmos daemon" in llmos("serve", "--help", env=env).stdout
    strict = llmos("--strict", "--help", env=env)
    assert strict.returncode == 3 and "'llmos' and 'llmos-clash'" in strict.stderr


def test_config_show_json_gives_values_and_origins(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "llmos.toml"
    config.write_text('[server]\nport = 9001\nhost = "${BIND:-127.0.0.1}"\n')
    run = llmos(
        "--config",
        str(config),
        "--set",
        "server.drain_timeout=5",
        "config",
        "show",
        "--json",
        env={**env, "LLMOS_API_KEYS": "sk-secret-1234"},
    )
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["files"] == [str(config)]
    assert data["config"]["server"]["port"] == 9001
    assert data["config"]["server"]["drain_timeout"] == 5
    assert data["origins"]["server.port"] == f"{config}:2"
    assert data["origins"]["server.host"] == f"{config}:3"
    assert data["origins"]["server.drain_timeout"] == "--set server.drain_timeout=5"
    assert data["origins"]["server.api_keys"] == "env LLMOS_API_KEYS"
    assert data["origins"]["server.max_body_bytes"] == "default"
    assert "sk-secret-1234" not in run.stdout
    table = llmos("--config", str(config), "config", "show", env=env)
    assert table.returncode == 0 and f"{config}:2" in table.stdout


SECRETS = (
    'plugins.postgres.dsn="host=db password=hunter2"',
    'plugins.openai.api_key="sk-123"',
    'plugins.openai.base_url="https://me:s3cret@llm.example.com/v1"',
)


def test_config_show_masks_credentials_in_plugin_tables(env: dict[str, str]) -> None:
    overrides = [arg for text in SECRETS for arg in ("--set", text)]
    table = llmos(*overrides, "config", "show", env=env)
    assert table.returncode == 0, table.stderr
    lines = {line.split("  ")[-1].strip() for line in table.stdout.splitlines()}
    assert 'plugins.postgres.dsn = "host=db password=****"' in lines
    assert 'plugins.openai.api_key = "****"' in lines
    assert 'plugins.openai.base_url = "https://me:****@llm.example.com/v1"' in lines
    assert '--set plugins.openai.api_key="****"' in table.stdout  # the origin column
    run = llmos(*overrides, "config", "show", "--json", env=env)
    assert run.returncode == 0, run.stderr
    data = json.loads(run.stdout)
    assert data["config"]["plugins"]["openai"]["api_key"] == "****"
    assert data["config"]["plugins"]["postgres"]["dsn"] == "host=db password=****"
    assert data["origins"]["plugins.postgres.dsn"] == (
        '--set plugins.postgres.dsn="host=db password=****"'
    )
    for secret in ("hunter2", "sk-123", "s3cret"):
        assert secret not in table.stdout + table.stderr
        assert secret not in run.stdout + run.stderr


def test_daemon_start_up_log_shows_no_credential(env: dict[str, str]) -> None:
    """``llmos --debug serve``, every hook call traced, from start to a
    SIGTERM's drain: no line of its log carries a credential of the config."""
    assert LLMOS
    overrides = [arg for text in SECRETS for arg in ("--set", text)]
    proc = subprocess.Popen(
        [LLMOS, "--debug", *overrides, "--set", "plugins.trace=true", "serve", "--port", "0"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        assert proc.stdout is not None
        log: list[str] = []
        for line in proc.stdout:
            log.append(line)
            if "llmos listening on" in line:
                break
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = "".join(log) + out
    assert proc.returncode == 0, text
    assert "kernel.ready" in text and "llmos listening on" in text
    for secret in ("hunter2", "sk-123", "s3cret"):
        assert secret not in text


def test_bad_config_is_exit_2_with_file_and_line(env: dict[str, str], tmp_path: Path) -> None:
    config = tmp_path / "bad.toml"
    config.write_text("[server]\nport = 9001\nhost = \n")
    run = llmos("--config", str(config), "config", "show", env=env)
    assert run.returncode == 2
    (line,) = run.stderr.strip().splitlines()
    assert line.startswith("error: ") and str(config) in line and "line 3" in line


def test_unknown_command_and_bad_option_are_usage_errors(env: dict[str, str]) -> None:
    run = llmos("frobnicate", env=env)
    assert run.returncode == 2 and "No such command 'frobnicate'" in run.stderr
    run = llmos("serve", "--port", "99999", env=env)
    assert run.returncode == 2 and "--port" in run.stderr


def test_logs_go_to_the_stderr_of_the_moment_not_the_one_at_configure_time(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import io

    import structlog

    from llmos.logs import configure_logging

    first, second = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    configure_logging("info", fmt="json")
    first.close()  # a capture that has ended: writing to it would raise
    monkeypatch.setattr(sys, "stderr", second)
    structlog.get_logger("llmos.test").info("after.swap", n=1)
    assert '"event": "after.swap"' in second.getvalue()
    configure_logging("warning")


ROUTE = """
from llmos.plugin import hookimpl
from llmos.types import RouteSpec

@hookimpl
def llmos_register_routes(register):
    from fastapi import APIRouter

    router = APIRouter()
    router.add_api_route({path!r}, lambda: {{}}, methods=["GET"])
    register(RouteSpec(router=router))
"""

TWICE = """
from llmos.plugin import hookimpl

@hookimpl
def llmos_startup(kernel):
    pass

@hookimpl
def llmos_startup(kernel):
    pass
"""


def test_plugins_shows_route_collisions_and_hooks_defined_twice(env: dict[str, str]) -> None:
    # Found at load, without `serve`: the routes are checked as the daemon checks them.
    add_plugin(env, "llmos-metrics", ROUTE.format(path="/acme/metrics"))
    add_plugin(env, "llmos-other", ROUTE.format(path="/acme/metrics"))
    add_plugin(env, "llmos-health", ROUTE.format(path="/healthz"))
    add_plugin(env, "llmos-twice", TWICE)
    env = {**env, "LLMOS_LOAD_PLUGINS": "llmos-metrics,llmos-other,llmos-health,llmos-twice"}
    run = llmos("plugins", "--json", env=env)
    assert run.returncode == 0, run.stderr
    rows = {p["name"]: p for p in json.loads(run.stdout) if p["status"] != "not-allowed"}
    assert rows["llmos-metrics"]["status"] == "loaded"
    assert rows["llmos-metrics"]["registered"] == {"routes": ["/"]}
    assert rows["llmos-other"]["status"] == "failed"
    # plugins load by distribution name: llmos-metrics came first and keeps the route
    assert rows["llmos-other"]["error"] == (
        "route GET /acme/metrics is registered by both 'llmos-metrics' and 'llmos-other';"
        " disable one of them (LLMOS_DISABLE_PLUGINS or [plugins] disable)"
    )
    assert rows["llmos-health"]["status"] == "failed"
    assert (
        "route GET /healthz is registered by both 'llmos' (the kernel)"
        in (rows["llmos-health"]["error"])
    )
    source = Path(env["PYTHONPATH"]) / "llmos_twice.py"
    assert rows["llmos-twice"]["status"] == "loaded"
    assert rows["llmos-twice"]["warnings"] == [
        f"llmos_startup is defined 2 times in {source} (lines 4 and 8); Python keeps only"
        " the last, so the one at line 4 never runs: merge them into one function"
    ]
    # The warning is logged too, on stderr, and the table shows both.
    assert "plugins.warning" in run.stderr
    table = llmos("plugins", env=env)
    assert table.returncode == 0, table.stderr
    assert "failed: route GET /healthz" in table.stdout
    assert "warning: llmos_startup is defined 2 times" in table.stdout
    # Strict mode makes the collision fatal, as at serve.
    strict = llmos("--strict", "plugins", env=env)
    assert strict.returncode == 3
    assert strict.stderr.splitlines()[-1].startswith(
        "error: plugin 'llmos-health' (llmos-health 1.0) failed: route GET /healthz is"
        " registered by both 'llmos' (the kernel) and 'llmos-health'"
    )


# --------------------------------------------------------------------------
# llmos plugin new
# --------------------------------------------------------------------------


def test_plugin_new_writes_a_distribution(env: dict[str, str], tmp_path: Path) -> None:
    import tomllib

    from llmos.templates import llmos_requirement

    run = llmos("plugin", "new", "acme.tools", "--dir", str(tmp_path / "out"), "--json", env=env)
    assert run.returncode == 0, run.stderr
    root = tmp_path / "out" / "llmos-acme.tools"
    written = json.loads(run.stdout)
    assert written["root"] == str(root)
    assert sorted(Path(p).relative_to(root).as_posix() for p in written["files"]) == [
        "README.md",
        "pyproject.toml",
        "src/llmos_acme_tools/__init__.py",
        "src/llmos_acme_tools/plugin.py",
        "src/llmos_acme_tools/py.typed",
        "tests/test_plugin.py",
    ]
    for path in written["files"]:
        text = Path(path).read_text()
        assert "{{" not in text, path  # every placeholder filled
        if path.endswith(".py"):
            compile(text, path, "exec")
    project = tomllib.loads((root / "pyproject.toml").read_text())
    assert project["project"]["name"] == "llmos-acme.tools"
    assert project["project"]["dependencies"] == [llmos_requirement()]
    assert project["project"]["entry-points"]["llmos"] == {"acme.tools": "llmos_acme_tools.plugin"}
    plugin = (root / "src" / "llmos_acme_tools" / "plugin.py").read_text()
    assert 'PROVIDER = "acme.tools-reverse"' in plugin
    readme = (root / "README.md").read_text()
    assert "pip install -e '.[test]'" in readme
    assert '`[plugins."acme.tools"]`' in readme  # a dotted name is a quoted TOML key


def test_llmos_requirement_is_the_release_line() -> None:
    from llmos.templates import llmos_requirement

    assert llmos_requirement("0.1.0") == "llmos>=0.1,<0.2"
    assert llmos_requirement("0.12.3") == "llmos>=0.12,<0.13"
    assert llmos_requirement("1.4.0") == "llmos>=1.4,<2"


def test_plugin_new_refuses_bad_names_and_overwriting(env: dict[str, str], tmp_path: Path) -> None:
    out = tmp_path / "out"  # tmp_path also holds the env's site and home
    for bad in ("Acme", "-acme", "acme/x", "ac me", "a" * 60, ""):
        run = llmos("plugin", "new", "--dir", str(out), "--", bad, env=env)
        assert run.returncode == 2, bad
        assert run.stderr.startswith(f"error: invalid plugin name {bad!r}"), run.stderr
    assert not out.exists()

    assert llmos("plugin", "new", "acme", "--dir", str(out), env=env).returncode == 0
    plugin = out / "llmos-acme" / "src" / "llmos_acme" / "plugin.py"
    plugin.write_text("# my work\n")
    (out / "llmos-acme" / "NOTES.md").write_text("mine\n")
    again = llmos("plugin", "new", "acme", "--dir", str(out), env=env)
    assert again.returncode == 2
    assert again.stderr == (
        f"error: {out / 'llmos-acme'} already exists; choose another --dir, or pass"
        " --force to overwrite its template files\n"
    )
    assert plugin.read_text() == "# my work\n"
    forced = llmos("plugin", "new", "acme", "--dir", str(out), "--force", env=env)
    assert forced.returncode == 0, forced.stderr
    assert "def llmos_register_providers" in plugin.read_text()
    assert (out / "llmos-acme" / "NOTES.md").read_text() == "mine\n"
