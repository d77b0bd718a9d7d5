"""Tests of config composition: layers, includes, interpolation, overrides, origins."""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path

import platformdirs
import pytest

from llmos.config import (
    DEFAULT_PORT,
    Config,
    ConfigErrors,
    Field,
    Origin,
    Section,
    load_config,
    parse_override,
)
from llmos.errors import ConfigError
from llmos.runtime.kernel import KERNEL_SECTIONS

WriteToml = Callable[[str, str], Path]


@pytest.fixture
def write(tmp_path: Path) -> WriteToml:
    """Write dedented TOML text to ``tmp_path / name`` and return the path."""

    def write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text).lstrip("\n"), encoding="utf-8")
        return path

    return write


def load(
    *paths: Path, overrides: tuple[str, ...] = (), sections: tuple[Section, ...] = (), **env: str
) -> Config:
    """Load as a kernel checks its config (its sections and ``sections``), with
    an explicit environment, so the test's own shell never leaks in."""
    return load_config(
        paths, overrides, env=env, sections=(*KERNEL_SECTIONS, *sections), final=True
    )


def error(
    *paths: Path, overrides: tuple[str, ...] = (), sections: tuple[Section, ...] = (), **env: str
) -> str:
    with pytest.raises(ConfigError) as caught:
        load(*paths, overrides=overrides, sections=sections, **env)
    return str(caught.value)


# ------------------------------------------------------------------ layering


def test_later_file_wins_and_tables_merge(write: WriteToml) -> None:
    a = write(
        "a.toml",
        """
        [server]
        host = "0.0.0.0"
        port = 1000

        [plugins]
        disable = ["x", "y"]
        """,
    )
    b = write(
        "b.toml",
        """
        [server]
        port = 2000

        [plugins]
        disable = ["z"]
        """,
    )
    config = load(a, b)
    assert config.server.host == "0.0.0.0"  # from a: b's [server] merged, not replaced
    assert config.server.port == 2000
    assert config.plugins.disable == ("z",)  # lists are replaced, not concatenated
    assert str(config.origins["server.host"]) == f"{a}:2"
    assert str(config.origins["server.port"]) == f"{b}:2"
    assert config.files == (a, b)
    assert load(b, a).server.port == 1000


def test_defaults_fill_what_no_layer_sets() -> None:
    config = load()
    assert config.server.port == DEFAULT_PORT == 8470
    assert config.server.host == "127.0.0.1"
    assert config.server.max_body_bytes == 4 * 1024 * 1024
    assert config.server.drain_timeout == 30.0
    assert config.server.log_level == "info"
    assert config.server.api_keys == ()
    assert config.plugins.load is None
    assert config.plugins.disable == ()
    assert (config.plugins.strict, config.plugins.trace) == (False, False)
    assert config.files == ()
    assert str(config.origins["server.port"]) == "default"
    assert "include" not in config.data


def test_set_beats_env_beats_file_beats_default(write: WriteToml) -> None:
    path = write("llmos.toml", '[plugins]\ndisable = ["from-file"]\n')
    assert load().plugins.disable == ()
    assert load(path).plugins.disable == ("from-file",)
    with_env = load(path, LLMOS_DISABLE_PLUGINS="e1, e2")
    assert with_env.plugins.disable == ("e1", "e2")
    assert str(with_env.origins["plugins.disable"]) == "env LLMOS_DISABLE_PLUGINS"
    with_set = load(path, overrides=('plugins.disable=["s"]',), LLMOS_DISABLE_PLUGINS="e1, e2")
    assert with_set.plugins.disable == ("s",)
    assert str(with_set.origins["plugins.disable"]) == '--set plugins.disable=["s"]'


def test_later_set_wins_over_earlier_set() -> None:
    config = load(overrides=("server.port=1", "server.port=2"))
    assert config.server.port == 2
    assert str(config.origins["server.port"]) == "--set server.port=2"


# ------------------------------------------------------------------ includes


def test_include_resolves_relative_to_the_including_file(write: WriteToml) -> None:
    main = write(
        "main.toml",
        """
        include = ["conf/base.toml"]

        [server]
        port = 3000
        """,
    )
    base = write(
        "conf/base.toml",
        """
        include = ["more.toml"]

        [server]
        port = 1111
        host = "base-host"
        """,
    )
    more = write("conf/more.toml", '[server]\nhost = "more-host"\nlog_level = "debug"\n')
    config = load(main)
    assert config.server.port == 3000  # the including file wins over what it includes
    assert config.server.host == "base-host"
    assert config.server.log_level == "debug"  # from conf/more.toml, found next to base.toml
    assert str(config.origins["server.host"]) == f"{base}:5"
    assert str(config.origins["server.log_level"]) == f"{more}:3"
    assert config.files == (main, base, more)


def test_include_cycle_shows_the_chain(write: WriteToml) -> None:
    a = write("a.toml", 'include = ["b.toml"]\n')
    write("b.toml", 'include = ["a.toml"]\n')
    message = error(a)
    assert "include cycle: a.toml -> b.toml -> a.toml" in message
    assert str(a.parent) in message


def test_missing_include_names_the_including_file_and_the_missing_path(
    write: WriteToml, tmp_path: Path
) -> None:
    a = write("a.toml", '# the base\n\n\ninclude = ["nope/missing.toml"]\n')
    message = error(a)
    assert message.startswith(f"{a}:4: include: file not found")
    assert str(tmp_path / "nope" / "missing.toml") in message


def test_missing_config_file_is_an_error(tmp_path: Path) -> None:
    assert f"config file not found: {tmp_path / 'absent.toml'}" in error(tmp_path / "absent.toml")


def test_bad_toml_names_the_file_and_line(write: WriteToml) -> None:
    path = write("bad.toml", '[server]\nhost = "x"\nport = = 3\n')
    message = error(path)
    assert str(path) in message
    assert "line 3" in message
    assert message.startswith(f"{path}:3:")


# ------------------------------------------------------------------ interpolation


def test_variables_are_interpolated_in_strings(write: WriteToml) -> None:
    path = write(
        "llmos.toml",
        """
        [server]
        host = "${HOST}"
        log_level = "${LEVEL:-warning}"
        api_keys = ["${KEY}", "literal-$${KEY}"]

        [plugins.foo]
        url = "http://${HOST}:${PORT:-80}/x"
        empty = "${EMPTY:-fallback}"
        """,
    )
    config = load(path, HOST="example.org", KEY="k", EMPTY="")
    assert config.server.host == "example.org"
    assert config.server.log_level == "warning"
    assert config.server.api_keys == ("k", "literal-${KEY}")
    assert config.plugin_options("foo") == {
        "url": "http://example.org:80/x",
        "empty": "fallback",
    }


def test_numbers_can_come_from_variables(write: WriteToml) -> None:
    path = write("llmos.toml", '[server]\nport = "${PORT:-8000}"\n')
    assert load(path).server.port == 8000
    assert load(path, PORT="9000").server.port == 9000


def test_unset_variable_names_file_line_and_key(write: WriteToml) -> None:
    path = write("llmos.toml", '[server]\n\nhost = "${NOPE}"\n')
    message = error(path)
    assert message.startswith(f"{path}:3: server.host: environment variable NOPE is not set")


def test_malformed_reference_is_an_error(write: WriteToml) -> None:
    path = write("llmos.toml", '[server]\nhost = "${1x}"\n')
    assert error(path).startswith(f"{path}:2: server.host: bad reference")


# ------------------------------------------------------------------ --set


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("server.port=9000", ("server.port", 9000)),
        ("server.drain_timeout=1.5", ("server.drain_timeout", 1.5)),
        ("plugins.strict=true", ("plugins.strict", True)),
        ("plugins.disable=[1,2]", ("plugins.disable", [1, 2])),
        ('server.host="8000"', ("server.host", "8000")),
        ("server.host=my host", ("server.host", "my host")),
        ("server.host=a=b", ("server.host", "a=b")),
        ("server.host=", ("server.host", "")),
        (" server.port = 1 ", ("server.port", 1)),
        ('plugins."my.plugin".x=1', ('plugins."my.plugin".x', 1)),
    ],
)
def test_parse_override_types_the_value(text: str, expected: tuple[str, object]) -> None:
    assert parse_override(text) == expected


@pytest.mark.parametrize("text", ["server.port", "=1", " =1"])
def test_parse_override_rejects_text_without_key(text: str) -> None:
    with pytest.raises(ConfigError, match="--set expects KEY=VALUE"):
        parse_override(text)


def test_set_values_are_typed_and_validated() -> None:
    config = load(
        overrides=(
            "server.port=9000",
            "server.drain_timeout=2",
            "plugins.trace=yes",
            "plugins.load=a,b",
            'plugins."my.plugin".level=3',
        )
    )
    assert config.server.port == 9000
    assert config.server.drain_timeout == 2.0
    assert config.plugins.trace is True
    assert config.plugins.load == ("a", "b")
    assert config.plugin_options("my.plugin") == {"level": 3}
    assert str(config.origins['plugins."my.plugin".level']) == '--set plugins."my.plugin".level=3'
    assert error(overrides=("server.port=abc",)) == (
        '--set server.port=abc: server.port: expected an integer between 1 and 65535, got "abc"'
    )


# ------------------------------------------------------------------ origins


def test_origins_carry_the_line_of_each_key(write: WriteToml) -> None:
    path = write(
        "llmos.toml",
        '''
        # a comment
        home = "data"

        [server]
        api_keys = [
          "one-key-0000000",  # a comment with = and [brackets]
          "two-key-0000000",
        ]
        host = """
        [plugins]
        trace = true
        """
        port = 9000

        [plugins]
        foo.level = 2
        "quoted key".x = 1
        ''',
    )
    config = load(path)
    lines = {key: origin.line for key, origin in config.origins.items() if origin.file == path}
    assert lines == {
        "home": 2,
        "server.api_keys": 5,
        "server.host": 9,
        "server.port": 13,
        "plugins.foo.level": 16,
        'plugins."quoted key".x': 17,
    }
    assert config.plugins.trace is False  # the [plugins] inside the string is text


def test_origin_of_a_key_in_an_inline_table_is_its_line(write: WriteToml) -> None:
    path = write("llmos.toml", "[plugins]\n\nfoo = { a = 1, b = { c = 2 } }\n")
    config = load(path)
    assert str(config.origins["plugins.foo.b.c"]) == f"{path}:3"


def test_origin_text_for_each_kind(tmp_path: Path) -> None:
    assert str(Origin("default")) == "default"
    assert str(Origin("file", file=tmp_path / "x.toml", line=12)) == f"{tmp_path}/x.toml:12"
    assert str(Origin("file", file=tmp_path / "x.toml")) == f"{tmp_path}/x.toml"
    assert str(Origin("env", detail="LLMOS_HOME")) == "env LLMOS_HOME"
    assert str(Origin("set", detail="server.port=9000")) == "--set server.port=9000"


def test_explain_lists_every_leaf_sorted_with_its_origin(write: WriteToml) -> None:
    path = write("llmos.toml", "[server]\nport = 9000\n")
    rows = load(path, LLMOS_TRACE_PLUGINS="1").explain()
    keys = [key for key, _value, _origin in rows]
    assert keys == sorted(keys)
    assert set(keys) >= {"home", "server.port", "server.host", "plugins.load", "plugins.trace"}
    by_key = {key: (value, str(origin)) for key, value, origin in rows}
    assert by_key["server.port"] == (9000, f"{path}:2")
    assert by_key["plugins.trace"] == (True, "env LLMOS_TRACE_PLUGINS")
    assert by_key["server.host"] == ("127.0.0.1", "default")


# ------------------------------------------------------------------ validation


def test_wrong_type_names_file_line_key_and_problem(write: WriteToml) -> None:
    path = write("llmos.toml", '# x\n\n[server]\nhost = "h"\n\n\nport = "abc"\n')
    assert error(path) == (
        f'{path}:7: server.port: expected an integer between 1 and 65535, got the string "abc"'
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("port = 70000", "server.port: expected an integer between 1 and 65535, got 70000"),
        ("port = true", "server.port: expected an integer between 1 and 65535, got true"),
        ("port = 80.5", "server.port: expected an integer between 1 and 65535, got 80.5"),
        ("max_body_bytes = 0", "server.max_body_bytes: expected an integer >= 1, got 0"),
        ("drain_timeout = -1", "server.drain_timeout: expected a number of seconds >= 0, got -1"),
        ('log_level = "loud"', 'server.log_level: expected one of "debug", "info"'),
        ("host = 1", "server.host: expected a string, got 1"),
        ("api_keys = [1]", "server.api_keys: expected a list of strings, got a secret value"),
    ],
)
def test_out_of_range_values_are_errors(write: WriteToml, line: str, problem: str) -> None:
    path = write("llmos.toml", f"[server]\n{line}\n")
    assert error(path).startswith(f"{path}:2: {problem}")


def test_unknown_key_in_a_section_suggests_the_nearest(write: WriteToml) -> None:
    path = write("llmos.toml", "[server]\nprot = 1\n")
    assert error(path) == f"{path}:2: server.prot: unknown key (did you mean server.port?)"


def test_unknown_top_level_section_suggests_the_nearest(write: WriteToml) -> None:
    path = write("llmos.toml", "# typo\n[servr]\nport = 1\n")
    assert error(path) == f"{path}:2: servr: unknown section (did you mean server?)"


def test_unknown_key_without_a_near_one_lists_the_known(write: WriteToml) -> None:
    path = write("llmos.toml", "[plugins]\nzzz = 1\n")
    message = error(path)
    assert message.startswith(f"{path}:2: plugins.zzz: unknown key (known: ")
    assert "disable" in message


def test_unknown_top_level_key_and_include_outside_a_file(write: WriteToml) -> None:
    path = write("llmos.toml", 'hom = "x"\n')
    assert error(path) == f"{path}:1: hom: unknown key (did you mean home?)"
    assert error(overrides=("include=x",)) == (
        "--set include=x: include: only a config file can include others"
    )


def test_a_section_must_be_a_table(write: WriteToml) -> None:
    path = write("llmos.toml", "server = 1\n")
    assert error(path).startswith(f"{path}:1: server: expected a table")


# ------------------------------------------------------------------ plugins


def test_plugin_tables_are_free_form(write: WriteToml) -> None:
    path = write(
        "llmos.toml",
        """
        [plugins]
        strict = true

        [plugins.foo]
        anything = "goes"
        nested = { deep = [1, 2] }

        [plugins.foo.more]
        x = 1.5
        """,
    )
    config = load(path)
    assert config.plugins.strict is True
    assert config.plugin_options("foo") == {
        "anything": "goes",
        "nested": {"deep": [1, 2]},
        "more": {"x": 1.5},
    }
    assert config.plugin_options("absent") == {}
    assert config.plugin_options("strict") == {}  # a field, not a plugin's table
    assert str(config.origins["plugins.foo.more.x"]) == f"{path}:9"


def test_load_plugins_empty_means_none_and_unset_means_all() -> None:
    assert load().plugins.load is None
    assert load(LLMOS_LOAD_PLUGINS="").plugins.load == ()
    assert load(LLMOS_LOAD_PLUGINS="a, b,").plugins.load == ("a", "b")


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        *[("1", True), ("TRUE", True), ("yes", True), ("on", True)],
        *[("0", False), ("false", False), ("no", False), ("off", False), ("", False)],
    ],
)
def test_plugin_switches_parse_booleans(value: str, expected: bool) -> None:
    assert load(LLMOS_STRICT_PLUGINS=value).plugins.strict is expected
    assert load(LLMOS_TRACE_PLUGINS=value).plugins.trace is expected


def test_bad_boolean_in_the_environment_is_an_error() -> None:
    message = error(LLMOS_STRICT_PLUGINS="maybe")
    assert message.startswith("env LLMOS_STRICT_PLUGINS: plugins.strict: expected a boolean")
    assert message.endswith('got "maybe"')


# ------------------------------------------------------------------ API keys


def test_api_keys_file_is_read_and_keys_are_redacted(write: WriteToml) -> None:
    write(
        "secrets/keys.txt",
        "# the daemon's keys\n\nsk-file-key-11112222\n  sk-file-key-33334444  \n",
    )
    path = write(
        "llmos.toml",
        '[server]\napi_keys = ["sk-inline-key-55556666"]\napi_keys_file = "secrets/keys.txt"\n',
    )
    config = load(path)
    keys = ("sk-inline-key-55556666", "sk-file-key-11112222", "sk-file-key-33334444")
    assert config.server.api_keys == keys
    shown = json.dumps(config.to_dict()) + repr(config.explain())
    for key in keys:
        assert key not in shown
    assert config.to_dict()["server"]["api_keys"] == ["****6666", "****2222", "****4444"]
    assert dict((k, v) for k, v, _o in config.explain())["server.api_keys"] == [
        "****6666",
        "****2222",
        "****4444",
    ]
    assert config.to_dict(redact=False)["server"]["api_keys"] == list(keys)


def test_credentials_in_free_form_tables_are_masked_wherever_shown(write: WriteToml) -> None:
    path = write(
        "llmos.toml",
        textwrap.dedent(
            """\
            [plugins.postgres]
            dsn = "host=db.internal dbname=llmos user=me password=hunter2"
            dsn_env = "PG_DSN"
            [plugins.openai]
            api_key = "sk-123"
            hf_token = "hf_abcdefghijklmnop"
            Client-Secret = "cs-42"
            use_auth_token = true
            max_tokens = 77
            base_url = "https://user:s3cret@llm.example.com/v1"
            mirror = "https://ghp_tok3n@git.example.com/x.git"
            credentials = { user = "u", key = "k-secret-value" }
            [plugins.token]
            level = "debug"
            [models.chat]
            provider = "openai"
            source = "postgresql://me:pa@ss@db:5432/llmos?sslmode=require&password=p2"
            options = { api_key = "sk-opt-1234567890", dtype = "float32" }
            """
        ),
    )
    config = load(path)
    shown = config.to_dict()
    plugins = shown["plugins"]
    assert plugins["postgres"] == {
        "dsn": "host=db.internal dbname=llmos user=me password=****",
        "dsn_env": "PG_DSN",
    }
    assert plugins["openai"] == {
        "api_key": "****",  # short: none of it shown
        "hf_token": "****mnop",
        "Client-Secret": "****",
        "use_auth_token": True,  # a switch, not a secret
        "max_tokens": 77,
        "base_url": "https://user:****@llm.example.com/v1",
        "mirror": "https://****@git.example.com/x.git",
        "credentials": {"user": "****", "key": "****alue"},
    }
    # A plugin named like a credential is a name, not a secret.
    assert plugins["token"] == {"level": "debug"}
    assert shown["models"]["chat"]["source"] == (
        "postgresql://me:****@db:5432/llmos?sslmode=require&password=****"
    )
    assert shown["models"]["chat"]["options"] == {"api_key": "****7890", "dtype": "float32"}
    rows = {key: value for key, value, _origin in config.explain()}
    assert rows["plugins.openai.api_key"] == "****"
    assert rows["plugins.postgres.dsn"].endswith("password=****")
    everything = json.dumps(shown) + repr(config.explain())
    for secret in ("hunter2", "sk-123", "hf_abcdefghijklmnop", "cs-42", "s3cret", "ghp_tok3n"):
        assert secret not in everything
    for secret in ("k-secret-value", "pa@ss", "p2", "sk-opt-1234567890"):
        assert secret not in everything
    # The values themselves are untouched: only what is shown is masked.
    assert config.plugin_options("openai")["api_key"] == "sk-123"
    assert config.to_dict(redact=False)["plugins"]["postgres"]["dsn"].endswith("hunter2")


def test_a_set_origin_is_masked_like_the_value_it_set() -> None:
    config = load(
        overrides=(
            'plugins.openai.api_key="sk-123"',
            'plugins.postgres={dsn = "host=x password=hunter2", schema = "llmos"}',
            'server.api_keys=["sk-abcdefgh5678"]',
            "server.port=9001",
        )
    )
    origins = {key: str(origin) for key, _value, origin in config.explain()}
    assert origins["plugins.openai.api_key"] == '--set plugins.openai.api_key="****"'
    # One --set gave two keys: each shows the whole text, masked.
    masked = '--set plugins.postgres={"dsn": "host=x password=****", "schema": "llmos"}'
    assert origins["plugins.postgres.dsn"] == masked
    assert origins["plugins.postgres.schema"] == masked
    assert origins["server.api_keys"] == '--set server.api_keys=["****5678"]'
    assert origins["server.port"] == "--set server.port=9001"
    assert str(config.origins["plugins.openai.api_key"]) == '--set plugins.openai.api_key="sk-123"'
    unmasked = {key: str(origin) for key, _value, origin in config.explain(redact=False)}
    assert "hunter2" in unmasked["plugins.postgres.dsn"]


@pytest.mark.parametrize(
    ("text", "shown"),
    [
        ("host=db password=hunter2 user=me", "host=db password=**** user=me"),
        ("host=db password = 'two words' user=me", "host=db password = **** user=me"),
        ("host=db sslpassword=kp", "host=db sslpassword=****"),
        ("Server=db;PWD=x;Database=d", "Server=db;PWD=****"),
        ("postgresql://me:pw@db/llmos", "postgresql://me:****@db/llmos"),
        ("postgresql://me@db/llmos", "postgresql://me@db/llmos"),
        (
            "postgres://db/llmos?password=pw&sslmode=require",
            "postgres://db/llmos?password=****&sslmode=require",
        ),
        ("https://tok@example.com/repo", "https://****@example.com/repo"),
        ("https://example.com/?q=compass=1", "https://example.com/?q=compass=1"),
        ("no password here", "no password here"),
    ],
)
def test_connection_string_passwords_are_masked(text: str, shown: str) -> None:
    config = load(overrides=(f"plugins.x.where={json.dumps(text)}",))
    assert config.to_dict()["plugins"]["x"]["where"] == shown


def test_api_keys_from_the_environment(write: WriteToml) -> None:
    config = load(LLMOS_API_KEYS="sk-env-aaaaaaaa1, sk-env-bbbbbbbb2")
    assert config.server.api_keys == ("sk-env-aaaaaaaa1", "sk-env-bbbbbbbb2")
    assert str(config.origins["server.api_keys"]) == "env LLMOS_API_KEYS"


def test_missing_api_keys_file_is_an_error(write: WriteToml, tmp_path: Path) -> None:
    path = write("llmos.toml", '[server]\napi_keys_file = "keys.txt"\n')
    assert error(path) == (
        f"{path}:2: server.api_keys_file: file not found: {tmp_path / 'keys.txt'}"
    )


# ------------------------------------------------------------------ environment


def test_environment_defaults_to_the_process_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in [name for name in os.environ if name.startswith("LLMOS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("LLMOS_TRACE_PLUGINS", "1")
    assert load_config().plugins.trace is True
    monkeypatch.delenv("LLMOS_TRACE_PLUGINS")
    assert load_config().plugins.trace is False


def test_llmos_config_is_used_only_without_explicit_paths(write: WriteToml) -> None:
    from_env = write("env.toml", "[server]\nport = 1111\n")
    explicit = write("explicit.toml", '[server]\nhost = "h"\n')
    assert load(LLMOS_CONFIG=str(from_env)).server.port == 1111
    config = load(explicit, LLMOS_CONFIG=str(from_env))
    assert config.server.port == DEFAULT_PORT
    assert config.files == (explicit,)
    assert error(LLMOS_CONFIG=str(from_env.parent / "gone.toml")).startswith(
        "env LLMOS_CONFIG: config file not found"
    )


def test_home_defaults_to_the_user_data_folder(
    write: WriteToml, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    default = load()
    assert default.home == Path(platformdirs.user_data_dir("llmos"))
    assert str(default.origins["home"]) == "default"
    assert load(LLMOS_HOME=str(tmp_path / "h")).home == tmp_path / "h"
    # A relative path in a file resolves against that file's folder, not the cwd.
    path = write("conf/llmos.toml", 'home = "../data"\n')
    monkeypatch.chdir("/")
    assert load(path).home == tmp_path / "data"
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert load(LLMOS_HOME="~/llmos").home == tmp_path / "user" / "llmos"
    assert load(LLMOS_HOME="rel").home == Path("/rel")  # from the environment: the cwd
    assert error(LLMOS_HOME="") == 'env LLMOS_HOME: home: expected a path, got ""'


# ------------------------------------------------------------------ API


def test_get_section_and_to_dict(write: WriteToml) -> None:
    path = write("llmos.toml", 'home = "data"\n[server]\nport = 9000\n')
    config = load(path)
    assert config.get("server.port") == 9000
    assert config.get("server")["port"] == 9000
    assert config.get("server.nope", "fallback") == "fallback"
    with pytest.raises(KeyError):
        config.get("server.nope")
    assert config.section("server")["port"] == 9000
    assert config.section("absent") == {}
    exported = json.loads(json.dumps(config.to_dict()))  # JSON-serialisable
    assert exported["home"] == str(path.parent / "data")
    assert exported["plugins"]["load"] is None


# ------------------------------------------------------------------ extending


ACME = Section(
    "acme",
    {
        "interval": Field("float", 10.0, "Seconds between checks.", env="LLMOS_ALERT_EVERY"),
        "token": Field("str", "", "Webhook token.", secret=True),
    },
    doc="Alert rules.",
    free_form=True,
)


def test_unregistered_section_is_unknown(write: WriteToml) -> None:
    path = write("llmos.toml", "[acme]\ninterval = 5\n")
    assert error(path).startswith(f"{path}:1: acme: unknown section")


def test_registered_section_is_valid_with_defaults_env_and_secrets(write: WriteToml) -> None:
    path = write(
        "llmos.toml",
        '[acme]\ntoken = "tok-abcdefgh1234"\n[acme.high_latency]\nabove_ms = 500\n',
    )
    config = load(path, sections=(ACME,))
    assert config.section("acme") == {
        "interval": 10.0,
        "token": "tok-abcdefgh1234",
        "high_latency": {"above_ms": 500},
    }
    assert config.to_dict()["acme"]["token"] == "****1234"
    assert load(path, sections=(ACME,), LLMOS_ALERT_EVERY="2.5").get("acme.interval") == 2.5
    bad = write("bad.toml", "[acme]\nintervl = 1\n")
    assert error(bad, sections=(ACME,)).endswith(
        "acme.intervl: unknown key (did you mean acme.interval?)"
    )


def test_a_section_name_is_checked_and_cannot_be_declared_twice_differently() -> None:
    with pytest.raises(ValueError, match="top-level"):
        Section("home", {})
    with pytest.raises(ValueError, match="1-32 lowercase letters"):
        Section("Acme-Corp", {})
    with pytest.raises(ConfigError, match=r"config section \[server\] is declared twice"):
        load_config(env={}, sections=[Section("server", {})])
    # the same section twice is one section
    assert load_config(env={}, sections=[ACME, ACME]).get("acme.interval") == 10.0


# ------------------------------------------------------------------ every error at once


def errors(*paths: Path, overrides: tuple[str, ...] = (), **env: str) -> list[str]:
    """The message of each error a load reports, in order."""
    with pytest.raises(ConfigError) as caught:
        load(*paths, overrides=overrides, **env)
    if isinstance(caught.value, ConfigErrors):
        lines = str(caught.value).splitlines()
        assert lines[0] == f"{len(caught.value.errors)} errors in the config:"
        assert [line.strip() for line in lines[1:]] == [e.message for e in caught.value.errors]
        return [e.message for e in caught.value.errors]
    return [str(caught.value)]


def test_every_error_of_a_file_is_reported_at_once(write: WriteToml) -> None:
    import llmos.runtime.models  # noqa: F401 — registers [runtime]

    path = write(
        "llmos.toml",
        """
        hom = "data"

        [server]
        prot = 8000
        port = 70000
        host = "${NOPE}"

        [runtime]
        max_batch_size = -3
        max_queue = "8"

        [servr]
        x = 1
        """,
    )
    assert errors(path, overrides=("plugins.trace=maybe",), LLMOS_STRICT_PLUGINS="nah") == [
        f"{path}:1: hom: unknown key (did you mean home?)",
        f"{path}:4: server.prot: unknown key (did you mean server.port?)",
        f"{path}:5: server.port: expected an integer between 1 and 65535, got 70000",
        f"{path}:6: server.host: environment variable NOPE is not set"
        " (write ${NOPE:-default} to give a default)",
        f"{path}:9: runtime.max_batch_size: expected an integer >= 1, got -3",
        f'{path}:10: runtime.max_queue: expected an integer >= 1, got the string "8"'
        " (write 8 without quotes)",
        f"{path}:12: servr: unknown section (did you mean server?)",
        "env LLMOS_STRICT_PLUGINS: plugins.strict: expected a boolean (true/false, yes/no,"
        ' on/off, 1/0), got "nah"',
        "--set plugins.trace=maybe: plugins.trace: expected a boolean (true/false, yes/no,"
        ' on/off, 1/0), got "maybe"',
    ]


def test_errors_of_included_files_come_with_their_own_file(write: WriteToml) -> None:
    base = write("base.toml", "[server]\nport = 0\n")
    top = write("top.toml", 'include = ["base.toml"]\n[server]\ndrain_timeout = -1\n')
    assert errors(top) == [
        f"{base}:2: server.port: expected an integer between 1 and 65535, got 0",
        f"{top}:3: server.drain_timeout: expected a number of seconds >= 0, got -1",
    ]


def test_one_error_is_raised_alone_with_its_param(write: WriteToml) -> None:
    import llmos.runtime.models  # noqa: F401 — registers [runtime]

    path = write("llmos.toml", "[runtime]\nmax_batch_size = -3\n")
    with pytest.raises(ConfigError) as caught:
        load(path)
    assert not isinstance(caught.value, ConfigErrors)
    assert caught.value.param == "runtime.max_batch_size"
    assert str(caught.value) == (
        f"{path}:2: runtime.max_batch_size: expected an integer >= 1, got -3"
    )


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        (
            'port = "8080"',
            "server.port: expected an integer between 1 and 65535, got the string"
            ' "8080" (write 8080 without quotes)',
        ),
        (
            'drain_timeout = "2.5"',
            "server.drain_timeout: expected a number of seconds >= 0, got"
            ' the string "2.5" (write 2.5 without quotes)',
        ),
        (
            'api_keys = "one, two"',
            "server.api_keys: expected a list of strings, got a secret value",
        ),
    ],
)
def test_a_quoted_value_for_a_number_key_is_refused(
    write: WriteToml, line: str, problem: str
) -> None:
    path = write("llmos.toml", f"[server]\n{line}\n")
    assert error(path) == f"{path}:2: {problem}"


def test_a_quoted_boolean_or_list_is_refused_too(write: WriteToml) -> None:
    path = write("llmos.toml", '[plugins]\nstrict = "true"\ndisable = "a, b"\n')
    assert errors(path) == [
        f"{path}:2: plugins.strict: expected a boolean (true/false, yes/no, on/off, 1/0), got"
        ' the string "true" (write true without quotes)',
        f'{path}:3: plugins.disable: expected a list of strings, got the string "a, b"',
    ]


def test_text_from_variables_and_set_is_still_converted(write: WriteToml) -> None:
    # Environment variables, ${VAR} references and --set text are strings by
    # nature: they convert to numbers, booleans and lists as before.
    path = write("llmos.toml", '[server]\nport = "${PORT}"\n[plugins]\nstrict = "${STRICT}"\n')
    config = load(
        path,
        overrides=('server.drain_timeout="2.5"', "plugins.disable=a,b"),
        PORT="9000",
        STRICT="yes",
        LLMOS_LOAD_PLUGINS="x, y",
        LLMOS_TRACE_PLUGINS="on",
    )
    assert config.server.port == 9000
    assert config.plugins.strict is True
    assert config.server.drain_timeout == 2.5
    assert config.plugins.disable == ("a", "b")
    assert config.plugins.load == ("x", "y")
    assert config.plugins.trace is True
    assert type(config.server.host) is str


# ------------------------------------------------------------------ ranges


@pytest.mark.parametrize(
    ("field", "expected"),
    [
        (Field("int", 8, min=1), "an integer >= 1"),
        (Field("int", 8, min=1, max=65535), "an integer between 1 and 65535"),
        (Field("float", 1.0, expect="a number of seconds", above=0), "a number of seconds > 0"),
        (Field("float", 1.0, above=0, max=10), "a number > 0 and <= 10"),
        (Field("float", 1.0, max=0.5), "a number <= 0.5"),
        (Field("float", 1.0, min=0.05, max=3600), "a number between 0.05 and 3600"),
        (Field("str", "a", check=lambda s: s in "ab", expect='"a" or "b"'), '"a" or "b"'),
    ],
)
def test_a_field_describes_its_range(field: Field, expected: str) -> None:
    assert field.expected == expected


def test_a_field_with_a_check_must_say_what_it_accepts() -> None:
    with pytest.raises(ValueError, match="expect="):
        Field("int", 8, check=lambda n: n >= 1)
    with pytest.raises(ValueError, match="min, max or above"):
        Field("str", "x", min=1)
    with pytest.raises(ValueError, match="not both"):
        Field("int", 1, min=1, above=0)


def test_a_custom_check_and_a_range_both_apply(write: WriteToml) -> None:
    even = Section(
        "acme",
        {
            "even": Field(
                "int", 2, check=lambda n: n % 2 == 0, expect="an even integer", min=0, max=10
            )
        },
    )
    assert load(write("ok.toml", "[acme]\neven = 4\n"), sections=(even,)).get("acme.even") == 4
    for value in ("3", "12", "-2"):
        path = write(f"{value}.toml", f"[acme]\neven = {value}\n")
        assert error(path, sections=(even,)) == (
            f"{path}:2: acme.even: expected an even integer between 0 and 10, got {value}"
        )


# ------------------------------------------------------------------ sections known later


def test_a_section_no_one_declared_yet_is_set_aside_then_checked(write: WriteToml) -> None:
    path = write("llmos.toml", "[server]\nport = 9000\n\n[acme]\ninterval = -1\ntokn = 2\n")
    config = load_config([path], env={})  # the kernel's and plugins' sections unknown yet
    assert config.deferred == ("acme",) and not config.final
    assert config.server.port == 9000  # what plugin loading needs is checked at once
    with pytest.raises(ConfigError, match=r"\[acme\] has not been checked yet"):
        config.section("acme")
    assert "acme" not in config.to_dict()
    # once the sections are known, every error of the table, with file and line
    strict = Section("acme", {**ACME.fields, "interval": Field("float", 10.0, min=0)})
    with pytest.raises(ConfigErrors) as caught:
        config.complete([strict])
    assert [e.message for e in caught.value.errors] == [
        f"{path}:5: acme.interval: expected a number >= 0, got -1",
        f"{path}:6: acme.tokn: unknown key (did you mean acme.token?)",
    ]
    # no one claims it: unknown, with the known sections to choose from
    with pytest.raises(ConfigError) as unknown:
        config.complete([])
    assert str(unknown.value).startswith(f"{path}:4: acme: unknown section (known: ")
    ok = write("ok.toml", "[acme]\ninterval = 2\n")
    done = load_config([ok], env={}).complete([ACME])
    assert done.final and done.section("acme")["interval"] == 2.0
    assert done.origins["acme.interval"] == Origin("file", file=ok, line=2)


def test_load_config_alone_accepts_the_kernels_sections_whatever_was_imported(
    write: WriteToml,
) -> None:
    """A [tuning] table failed with "unknown section" unless the kernel had
    been imported first (sections registered as an import side effect)."""
    import subprocess
    import sys

    path = write("llmos.toml", "[tuning]\nmax_concurrent_jobs = 2\n[runtime]\nmax_queue = 0\n")
    code = (
        "import sys; from llmos.config import load_config; "
        "c = load_config([sys.argv[1]], env={}); print(','.join(c.deferred)); "
        "assert 'llmos.runtime.kernel' not in sys.modules"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=True
    )
    assert out.stdout.strip() == "runtime,tuning"
    # the kernel checks them: max_queue = 0 is out of range
    assert error(path) == f"{path}:4: runtime.max_queue: expected an integer >= 1, got 0"


def test_keyed_sections_check_each_entry_like_any_field(write: WriteToml) -> None:
    path = write(
        "llmos.toml",
        """
        [models.chat]
        provider = "transformers"
        max_queue = 0
        sorce = "/models/chat"

        [models.nameless]
        source = "/models/x"

        [groups.g]
        deployments = "chat"
        strategy = "fastest"

        [fusions.f]
        strategy = "mean"
        options = 3
        """,
    )
    with pytest.raises(ConfigErrors) as caught:
        load(path)
    assert [e.message for e in caught.value.errors] == [
        f"{path}:3: models.chat.max_queue: expected an integer >= 1, got 0",
        f"{path}:4: models.chat.sorce: unknown key (did you mean models.chat.source?)",
        f"{path}:7: [models.nameless]: provider is required (The provider that serves it"
        " (`llmos plugins` lists them).)",
        f'{path}:10: groups.g.deployments: expected a list of strings, got the string "chat"',
        f'{path}:11: groups.g.strategy: expected one of "round-robin", "least-busy",'
        ' "latency-based", got "fastest"',
        f"{path}:14: [fusions.f]: members is required"
        ' (Models: names ("a", "b@2") or tables {model, labels, map}.)',
        f"{path}:15: fusions.f.options: expected a table, got 3",
    ]
    # the required key may come from another layer
    fixed = write("fixed.toml", '[models.nameless]\nsource = "/m"\n')
    config = load(fixed, overrides=("models.nameless.provider=transformers",))
    assert config.section("models")["nameless"] == {"source": "/m", "provider": "transformers"}
