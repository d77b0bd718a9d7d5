"""The ``llmos`` command line: exit codes, one-line errors, ``--json`` shapes.

Most tests run the installed console script in a subprocess, the way a user
and a shell script meet it; plugins come from distributions written to a
folder on ``PYTHONPATH`` and are found through entry points.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmos import __version__
from llmos.plugin.manager import DEFAULT_PLUGINS
from llmos.testing import write_distribution

from .conftest import llmos


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
