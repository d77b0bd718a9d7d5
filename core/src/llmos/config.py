"""Config composition: TOML layers, includes, interpolation, overrides, origins.

The effective config is built from layers, each later one winning:

1. the defaults the schema declares: the kernel's sections (``[server]`` and
   ``[plugins]`` here, the rest passed in as :class:`Section` values by the
   kernel) and the sections plugins declare (``llmos_register_config``);
2. config files in the order given (``--config A --config B``), or the file
   ``LLMOS_CONFIG`` names when none is given; the files a file pulls in with
   ``include = [...]`` are layers below that file's own keys;
3. environment variables (``LLMOS_HOME``, ``LLMOS_LOAD_PLUGINS`` ...);
4. ``--set section.key=value`` overrides.

Tables merge recursively; scalars and lists are replaced. Every leaf value
remembers its :class:`Origin`, which ``llmos config show`` prints, and every
error names the file, the line where it can, the key and what is wrong.

The schema is passed in, never registered globally: :func:`load_config`
validates the sections it is given (and ``[server]``/``[plugins]``, which
plugin loading needs first) and sets the tables it does not know yet aside;
:meth:`Config.complete` validates them once every section is known (the
kernel calls it when its plugins have loaded), and a table no section claims
is an error then. A section whose keys are names (``[models.NAME]``) declares
the fields of each entry (``Section.entries``), checked like any other field.
"""

from __future__ import annotations

import difflib
import json
import os
import re
import tomllib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from datetime import date, time
from pathlib import Path
from typing import Any

import attrs
import platformdirs

from llmos.errors import ConfigError

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "DEFAULT_PORT",
    "Config",
    "ConfigErrors",
    "Field",
    "Origin",
    "PluginSettings",
    "Section",
    "ServerSettings",
    "check_table",
    "load_config",
    "parse_override",
]

DEFAULT_PORT = 8470
DEFAULT_MAX_BODY_BYTES = 4 * 1024 * 1024

#: no value: a key that is absent, or a value that cannot be converted
_MISSING: Any = object()


def check_table(where: str, table: Any, known: Iterable[str]) -> Mapping[str, Any]:
    """A free-form section's entry (``[models.NAME]``, ``[fusions.NAME]`` …):
    it must be a table whose keys are all ``known``; ``where`` names it. An
    unknown key's error lists the known ones and the nearest of them."""
    if not isinstance(table, Mapping):
        raise ConfigError(f"{where} must be a table")
    allowed = set(known)
    unknown = sorted(set(table) - allowed)
    if unknown:
        near = difflib.get_close_matches(str(unknown[0]), sorted(allowed), n=1)
        hint = f" (did you mean {near[0]}?)" if near else ""
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(allowed))}"
            + hint
        )
    return table


# --------------------------------------------------------------------- origins


@attrs.frozen
class Origin:
    """Where a config value came from: a default, a file line, a variable or ``--set``."""

    kind: str = attrs.field(validator=attrs.validators.in_(("default", "file", "env", "set")))
    file: Path | None = None
    line: int | None = None
    #: the environment variable's name, or the raw ``--set`` text
    detail: str | None = None

    def __str__(self) -> str:
        if self.kind == "file":
            return str(self.file) if self.line is None else f"{self.file}:{self.line}"
        if self.kind == "env":
            return f"env {self.detail}"
        if self.kind == "set":
            return f"--set {self.detail}"
        return "default"


_DEFAULT = Origin("default")
#: the origin of the value at a key path, for a layer
_OriginAt = Callable[[tuple[str, ...]], Origin]


def _everywhere(origin: Origin) -> _OriginAt:
    """The origin function of a layer that came from one place (a default, a variable)."""
    return lambda _path: origin


# ---------------------------------------------------------------------- schema

#: each kind a field may have, with the words an error uses for it
_KINDS: dict[str, str] = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "a boolean (true/false, yes/no, on/off, 1/0)",
    "path": "a path",
    "list[str]": "a list of strings",
    # for the entries of a section such as [models.NAME]: kept as plain data,
    # checked further by what reads them
    "list": "a list",
    "table": "a table",
}
_TRUE = frozenset({"1", "true", "yes", "on"})
_FALSE = frozenset({"0", "false", "no", "off", ""})


def _number(value: float) -> str:
    """A bound as an error message shows it: ``1``, ``0.05``, ``3600``."""
    return str(int(value)) if float(value).is_integer() else str(value)


@attrs.frozen
class Field:
    """One key of a config section: its kind, default and rules.

    A number field's range is declared with ``min`` and ``max`` (inclusive)
    or ``above`` (exclusive lower bound), so that its error states the range
    ("expected an integer >= 1, got -3"). ``expect`` names what is expected
    (default: the kind's words, "an integer"); the range, if any, is added to
    it ("a number of seconds" -> "a number of seconds > 0"). A rule a range
    cannot say goes in ``check``, which receives the value already converted
    to ``kind`` and returns whether it is acceptable; such a field must say
    what it accepts in ``expect``, since an error that only says "expected a
    string" would not tell the user what to write. ``optional`` fields may
    be ``None``; ``secret`` values are masked by :meth:`Config.explain` and
    :meth:`Config.to_dict`; ``env`` names an environment variable that sets
    the field; ``factory`` computes a default at load time instead of
    ``default``.
    """

    kind: str = attrs.field(validator=attrs.validators.in_(_KINDS))
    default: Any = None
    doc: str = ""
    check: Callable[[Any], bool] | None = None
    expect: str | None = None
    optional: bool = False
    #: an entry of a keyed section (``[models.NAME]``) must have it
    required: bool = False
    secret: bool = False
    env: str | None = None
    factory: Callable[[], Any] | None = None
    min: float | None = attrs.field(default=None, kw_only=True)
    max: float | None = attrs.field(default=None, kw_only=True)
    above: float | None = attrs.field(default=None, kw_only=True)

    def __attrs_post_init__(self) -> None:
        bounded = (self.min, self.max, self.above) != (None, None, None)
        if bounded and self.kind not in ("int", "float"):
            raise ValueError(f"a {self.kind} field cannot have min, max or above")
        if self.min is not None and self.above is not None:
            raise ValueError("give a field min or above, not both")
        if self.check is not None and self.expect is None:
            raise ValueError(
                "a field with a check must say what it accepts (expect=...), or use min/max"
            )

    @property
    def expected(self) -> str:
        """The words an error uses for what this field accepts, range included."""
        words = self.expect or _KINDS[self.kind]
        low = self.min if self.min is not None else self.above
        if low is not None and self.max is not None and self.above is None:
            return f"{words} between {_number(low)} and {_number(self.max)}"
        parts = [words]
        if self.min is not None:
            parts.append(f">= {_number(self.min)}")
        if self.above is not None:
            parts.append(f"> {_number(self.above)}")
        if self.max is not None:
            parts.append(("and " if len(parts) > 1 else "") + f"<= {_number(self.max)}")
        return " ".join(parts)

    def accepts(self, value: Any) -> bool:
        """Whether ``value`` (already of ``kind``) is in range and passes ``check``."""
        if isinstance(value, int | float) and not isinstance(value, bool):
            if self.min is not None and value < self.min:
                return False
            if self.above is not None and value <= self.above:
                return False
            if self.max is not None and value > self.max:
                return False
        return self.check is None or bool(self.check(value))

    def default_value(self) -> Any:
        """The default, computed by ``factory`` when there is one."""
        return self.factory() if self.factory is not None else self.default


_SECTION_NAME = re.compile(r"[a-z][a-z0-9_]{0,31}")


@attrs.frozen
class Section:
    """A ``[name]`` table of the config: its fields and what it is for.

    ``entries``: the section is keyed by names (``[models.NAME]``,
    ``[groups.NAME]``): every ``[name.<entry>]`` table is checked against
    these fields (types, ranges, unknown keys, ``required`` ones), its values
    kept as plain data. With ``free_form`` a key whose value is a table is
    accepted as is, unvalidated (``[plugins.<name>]``: each plugin checks its
    own options).
    """

    name: str = attrs.field()
    fields: Mapping[str, Field] = attrs.field(converter=dict)
    doc: str = ""
    free_form: bool = False
    entries: Mapping[str, Field] | None = None

    @name.validator
    def _check_name(self, _attribute: Any, value: str) -> None:
        if not isinstance(value, str) or not _SECTION_NAME.fullmatch(value):
            raise ValueError(
                f"config section name must be 1-32 lowercase letters, digits and _,"
                f" starting with a letter; got {value!r}"
            )
        if value in _ROOT_FIELDS or value == "include":
            raise ValueError(f"{value!r} is a top-level config key, not a section name")


def _default_home() -> Path:
    return Path(platformdirs.user_data_dir("llmos"))


_ROOT_FIELDS: dict[str, Field] = {
    "home": Field(
        "path",
        doc="The data folder: registry, jobs, artifacts.",
        env="LLMOS_HOME",
        factory=_default_home,
    ),
}


@attrs.frozen
class _Schema:
    """The sections a config is checked against. ``final``: a table no
    section claims is an error (else it is set aside for :meth:`Config.complete`)."""

    sections: Mapping[str, Section]
    final: bool = False

    @classmethod
    def of(cls, sections: Iterable[Section], *, final: bool) -> _Schema:
        known: dict[str, Section] = {s.name: s for s in _BOOTSTRAP}
        for section in sections:
            if not isinstance(section, Section):
                raise TypeError(f"a config section is a Section, got {type(section).__name__}")
            if known.get(section.name, section) != section:
                raise ConfigError(f"config section [{section.name}] is declared twice, differently")
            known[section.name] = section
        return cls(known, final)

    def field_at(self, path: tuple[str, ...]) -> Field | None:
        """The declared field at ``path``, if any (an entry's too)."""
        if len(path) == 1:
            return _ROOT_FIELDS.get(path[0])
        section = self.sections.get(path[0])
        if section is None:
            return None
        if len(path) == 2:
            return section.fields.get(path[1])
        if len(path) == 3 and section.entries is not None:
            return section.entries.get(path[2])
        return None

    def fields(self) -> Iterator[tuple[tuple[str, ...], Field]]:
        """Every declared field of a section's own keys, with its key path."""
        for key, field in _ROOT_FIELDS.items():
            yield (key,), field
        for name, section in self.sections.items():
            for key, field in section.fields.items():
                yield (name, key), field


_LOG_LEVELS = ("debug", "info", "warning", "error")
#: a ``server.allowed_hosts`` entry: "*", or a host name with an optional "*." in front
_ALLOWED_HOST = re.compile(r"\*|(\*\.)?[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*\.?")

_SERVER = Section(
    "server",
    {
        "host": Field("str", "127.0.0.1", "Address the daemon listens on."),
        "port": Field(
            "int",
            DEFAULT_PORT,
            "TCP port the daemon listens on.",
            min=1,
            max=65535,
        ),
        "api_keys": Field(
            "list[str]",
            (),
            "Keys a client must present; none means no authentication.",
            secret=True,
            env="LLMOS_API_KEYS",
        ),
        "api_keys_file": Field(
            "path",
            None,
            "A file of API keys, one a line (blank lines and # comments ignored),"
            " added to api_keys.",
            optional=True,
        ),
        "max_body_bytes": Field(
            "int",
            DEFAULT_MAX_BODY_BYTES,
            "Largest request body accepted.",
            min=1,
        ),
        "drain_timeout": Field(
            "float",
            30.0,
            "Seconds a stopping daemon waits for requests in flight.",
            expect="a number of seconds",
            min=0,
        ),
        "log_level": Field(
            "str",
            "info",
            "Least severe log level written.",
            check=lambda level: level in _LOG_LEVELS,
            expect="one of " + ", ".join(f'"{level}"' for level in _LOG_LEVELS),
        ),
        "allowed_hosts": Field(
            "list[str]",
            (),
            "Host names (besides localhost, IP addresses and server.host) the daemon answers"
            ' to and takes browser writes from; "*.example.com" matches subdomains,'
            ' "*" turns the Host check off.',
            check=lambda hosts: all(_ALLOWED_HOST.fullmatch(h) for h in hosts),
            expect='a list of host names without scheme or port ("llm.example.com",'
            ' "*.example.com" or "*")',
            env="LLMOS_ALLOWED_HOSTS",
        ),
        "header_timeout_s": Field(
            "float",
            10.0,
            "Seconds a connection has to send a request's headers before it is closed.",
            expect="a number of seconds",
            above=0,
        ),
        "body_timeout_s": Field(
            "float",
            30.0,
            "Seconds a request body may stall between two chunks before the request gets 408.",
            expect="a number of seconds",
            above=0,
        ),
        "keep_alive_timeout_s": Field(
            "float",
            5.0,
            "Seconds an idle keep-alive connection is kept open.",
            expect="a number of seconds",
            above=0,
        ),
    },
    doc="The daemon.",
)
_PLUGINS = Section(
    "plugins",
    {
        "load": Field(
            "list[str]",
            None,
            "Entry-point plugins to load; unset loads all, empty loads none.",
            optional=True,
            env="LLMOS_LOAD_PLUGINS",
        ),
        "disable": Field("list[str]", (), "Plugins not to load.", env="LLMOS_DISABLE_PLUGINS"),
        "strict": Field(
            "bool", False, "A plugin that fails to load is fatal.", env="LLMOS_STRICT_PLUGINS"
        ),
        "trace": Field("bool", False, "Log every hook call.", env="LLMOS_TRACE_PLUGINS"),
    },
    doc="Plugin loading; [plugins.<name>] tables are that plugin's options.",
    free_form=True,
)
#: the sections every config has: plugin loading needs them before any other
_BOOTSTRAP = (_SERVER, _PLUGINS)


# ------------------------------------------------------------------ the result


@attrs.frozen
class ServerSettings:
    """The ``[server]`` section, typed, with the keys of ``api_keys_file`` added."""

    host: str
    port: int
    api_keys: tuple[str, ...]
    max_body_bytes: int
    drain_timeout: float
    log_level: str
    #: extra Host names the daemon answers to (``*.`` prefix, ``*`` for any)
    allowed_hosts: tuple[str, ...] = ()
    header_timeout_s: float = 10.0
    body_timeout_s: float = 30.0
    keep_alive_timeout_s: float = 5.0


@attrs.frozen
class PluginSettings:
    """The ``[plugins]`` switches. ``load`` is ``None`` for all, ``()`` for none."""

    load: tuple[str, ...] | None
    disable: tuple[str, ...]
    strict: bool
    trace: bool


@attrs.frozen
class Config:
    """The effective config and where each of its values came from."""

    #: nested tables, defaults filled in, ``include`` removed
    data: Mapping[str, Any]
    #: dotted key path -> origin, for every leaf (a list is a leaf)
    origins: Mapping[str, Origin]
    #: every file read, in load order, included files too
    files: tuple[Path, ...]
    home: Path
    server: ServerSettings
    plugins: PluginSettings
    #: what it was composed from, to compose it again with more sections
    inputs: _Inputs = attrs.field(repr=False)
    #: the sections it was checked against, [server] and [plugins] included
    schema: _Schema = attrs.field(repr=False)
    #: tables no section claimed yet (``final`` is false), left out of ``data``
    deferred: tuple[str, ...] = ()

    @property
    def final(self) -> bool:
        """Whether every table has been checked (no section may be added)."""
        return self.schema.final

    def complete(self, sections: Iterable[Section]) -> Config:
        """This config composed again from the same files, variables and
        ``--set`` texts, checked against ``sections`` as well as the ones it
        was loaded with; a table no section claims is an error now.

        :raises ConfigError: anything wrong (all of it, as for :func:`load_config`).
        """
        return _compose(
            self.inputs,
            _Schema.of([*self.schema.sections.values(), *sections], final=True),
        )

    def get(self, dotted: str, default: Any = _MISSING) -> Any:
        """The value at ``dotted`` (``"server.port"``); ``KeyError`` if absent and no default."""
        node: Any = self.data
        for key in _split_key(dotted):
            if not isinstance(node, Mapping) or key not in node:
                if default is _MISSING:
                    raise KeyError(dotted)
                return default
            node = node[key]
        return node

    def section(self, name: str) -> Mapping[str, Any]:
        """The ``[name]`` table, or ``{}``.

        :raises ConfigError: the table is in the config but no section has
            claimed it yet (see :meth:`complete`): its values are unchecked.
        """
        if name in self.deferred:
            raise ConfigError(
                f"config section [{name}] has not been checked yet: a kernel checks it once"
                " its plugins have loaded (Config.complete)"
            )
        table = self.data.get(name)
        return table if isinstance(table, Mapping) else {}

    def plugin_options(self, name: str) -> Mapping[str, Any]:
        """The ``[plugins.<name>]`` table, or ``{}``."""
        table = self.section("plugins").get(name)
        return table if isinstance(table, Mapping) else {}

    def explain(self, *, redact: bool = True) -> list[tuple[str, Any, Origin]]:
        """``(key, value, origin)`` for every leaf, sorted by key, values as in
        :meth:`to_dict`; with ``redact``, a ``--set`` origin's text is masked
        like the value it set (see :func:`_export` for what is masked)."""
        rows = []
        for key, origin in sorted(self.origins.items()):
            value = _export(self.schema, self.get(key), _split_key(key), redact)
            rows.append((key, value, _redact_origin(self.schema, origin) if redact else origin))
        return rows

    def to_dict(self, *, redact: bool = True) -> dict[str, Any]:
        """The effective config as JSON-serialisable data; secrets masked if
        ``redact`` (see :func:`_export` for what is masked)."""
        return _export(self.schema, self.data, (), redact)


@attrs.frozen
class _Inputs:
    """What a config is composed from."""

    paths: tuple[str | os.PathLike[str], ...]
    overrides: tuple[str, ...]
    env: Mapping[str, str]


def _export(schema: _Schema, value: Any, path: tuple[str, ...], redact: bool) -> Any:
    """``value`` made JSON-serialisable; with ``redact``, secrets masked.

    What is masked (README, "Configuration"):

    * a field declared ``secret=True``, and everything inside it;
    * a key no field declares (in a ``[plugins.NAME]`` table, in a declared
      ``table`` field such as a card's ``options``) whose name says it holds a
      credential (:func:`_credential_name`: ``api_key``, ``token``,
      ``password``, ``*_secret`` …), and everything inside it; booleans are
      left alone (``use_auth_token = true`` is a switch, not a secret);
    * in every other string, the password of a connection string: a URL's
      ``user:PASSWORD@`` (an ``http(s)://TOKEN@`` user too) and a libpq-style
      ``password=…`` pair; the rest (host, database, user) stays readable.
    """
    if isinstance(value, Mapping):
        return {key: _export(schema, item, (*path, key), redact) for key, item in value.items()}
    if redact and value is not None and _secret(schema, path):
        if isinstance(value, bool):
            return value
        return [_mask(item) for item in value] if isinstance(value, list | tuple) else _mask(value)
    if isinstance(value, list | tuple):
        return [_export(schema, item, path, redact) for item in value]
    if isinstance(value, date | time):  # TOML dates and times, datetime included
        return value.isoformat()
    if isinstance(value, Path):
        value = str(value)
    return _scrub(value) if redact and isinstance(value, str) else value


def _secret(schema: _Schema, path: tuple[str, ...]) -> bool:
    """Whether ``path`` is a secret field or lies inside one (a secret table's
    keys: ``[artifacts] storage_options``' credentials), or is, or lies
    inside, an undeclared key named for a credential. A section's name and
    the name of a section's entry (``[models.NAME]``, ``[plugins.NAME]``)
    are names, never credentials: they are not looked at."""
    for end in range(1, len(path) + 1):
        field = schema.field_at(path[:end])
        if field is not None and field.secret:
            return True
        if field is None and end > 2 and _credential_name(path[end - 1]):
            return True
    return False


#: key names that hold a credential, whole or as the last ``_`` word
_CREDENTIAL_WORDS = frozenset(
    {"key", "token", "password", "passwd", "secret", "credential", "credentials"}
)
#: whole key names that hold a credential though no word above ends them
_CREDENTIAL_NAMES = frozenset(
    {"apikey", "api_key", "pwd", "auth", "authorization", "bearer", "private_key"}
)


def _credential_name(key: str) -> bool:
    """Whether an undeclared key's name says it holds a credential:
    ``api_key``, ``key``, ``hf_token``, ``password``, ``client_secret``,
    ``credentials``, ``Authorization`` (a header) … — the name, case and
    ``-`` aside, is one of those words or ends in ``_`` and one of them."""
    name = key.lower().replace("-", "_")
    return name in _CREDENTIAL_NAMES or name.rsplit("_", 1)[-1] in _CREDENTIAL_WORDS


#: a URL's userinfo: ``scheme://user:password@`` or ``scheme://user@``; a
#: password runs to the last ``@`` before the path (an unescaped ``@`` in it too)
_USERINFO = re.compile(
    r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://(?P<user>[^/@:\s]*)(?P<password>:[^/\s]*)?@"
)
#: a ``password=`` pair in a connection string: libpq's ``password=x`` or
#: ``password='a b'`` (``sslpassword`` too), ODBC's ``PWD=x;…`` (masked to the
#: next space: more than the password rather than less of it)
_PASSWORD_PAIR = re.compile(
    r"(?P<lead>(?<![A-Za-z0-9?&])(?:[A-Za-z]*pass(?:word|wd)|pwd)\s*=\s*)"
    r"(?:'(?:[^'\\]|\\.)*'|[^\s'][^\s]*)",
    re.IGNORECASE,
)
#: the same in a URL's query (``?sslmode=require&password=x``), which ``&`` ends
_PASSWORD_PARAM = re.compile(
    r"(?P<lead>[?&](?:[A-Za-z]*pass(?:word|wd)|pwd)=)[^&#\s]*", re.IGNORECASE
)


def _scrub(text: str) -> str:
    """``text`` with the password of any connection string in it masked:
    ``postgresql://me:****@db/llmos``, ``host=db password=****``,
    ``…?password=****``; an ``http(s)://TOKEN@host`` URL's user, a token
    as Git hosts take it, is masked too (``https://****@host``)."""

    def userinfo(match: re.Match[str]) -> str:
        scheme, user = match["scheme"], match["user"]
        if match["password"] is not None:
            return f"{scheme}://{user}:****@"
        if scheme.lower() in ("http", "https") and user:
            return f"{scheme}://****@"
        return match[0]  # a database user and no password: nothing secret

    if "@" in text:
        text = _USERINFO.sub(userinfo, text)
    if "=" in text:
        text = _PASSWORD_PARAM.sub(lambda match: f"{match['lead']}****", text)
        text = _PASSWORD_PAIR.sub(lambda match: f"{match['lead']}****", text)
    return text


def _mask(secret: Any) -> str:
    # The last four characters tell keys apart; a short key shows none of itself.
    text = str(secret)
    return "****" + text[-4:] if len(text) >= 12 else "****"


def _redact_origin(schema: _Schema, origin: Origin) -> Origin:
    """A ``--set`` origin whose text carries a value masked when shown, with
    that text shown masked too (``--set plugins.openai.api_key="****"``)."""
    if origin.kind != "set" or origin.detail is None:
        return origin
    try:
        key, value = parse_override(origin.detail)
    except ConfigError:  # not from a --set that loaded; show nothing of it
        return attrs.evolve(origin, detail="****")
    path = _split_key(key)
    shown = _export(schema, value, path, True)
    if shown == _export(schema, value, path, False):
        return origin
    return attrs.evolve(origin, detail=f"{key}={_show(shown)}")


# ----------------------------------------------------------------- public API


def parse_override(text: str) -> tuple[str, Any]:
    """Split ``--set`` text ``"a.b=VALUE"`` into ``("a.b", value)``.

    VALUE is read as a TOML value when it is one (``9000``, ``1.5``, ``true``,
    ``[1, 2]``, ``"quoted"``), else taken as the plain string.
    """
    equals = _find_unquoted(text, "=")
    if equals < 0 or not text[:equals].strip():
        raise ConfigError(
            f"--set expects KEY=VALUE, e.g. --set server.port=9000; got {text!r}", param=text
        )
    key, raw = _join(_split_key(text[:equals].strip())), text[equals + 1 :].strip()
    try:
        parsed = tomllib.loads(f"v = {raw}")
    except tomllib.TOMLDecodeError:
        return key, raw
    # "1\nx = 2" parses too, with a second key: that is text, not one value.
    return key, parsed["v"] if parsed.keys() == {"v"} else raw


def load_config(
    paths: Sequence[str | os.PathLike[str]] = (),
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
    *,
    sections: Iterable[Section] = (),
    final: bool = False,
) -> Config:
    """Compose the effective config from defaults, files, environment and overrides.

    ``paths`` are the ``--config`` files in order (they replace ``LLMOS_CONFIG``);
    ``overrides`` the ``--set`` texts in order; ``env`` defaults to ``os.environ``.
    ``sections``: the schema besides ``[server]`` and ``[plugins]``; a table
    none of them claims is set aside (``Config.deferred``) for
    :meth:`Config.complete`, or with ``final`` an error.
    Raises :class:`~llmos.errors.ConfigError` for anything wrong.
    """
    inputs = _Inputs(tuple(paths), tuple(overrides), dict(os.environ if env is None else env))
    return _compose(inputs, _Schema.of(sections, final=final))


def _compose(inputs: _Inputs, schema: _Schema) -> Config:
    paths, overrides, env = inputs.paths, inputs.overrides, inputs.env
    # Every wrong value, unknown key and bad reference of every layer is
    # collected, and all are reported together: fixing a config one error per
    # run is slow. (A file that cannot be read or parsed still stops at once.)
    problems = _Problems(schema)
    tree = _check_layer(_default_tree(schema), _everywhere(_DEFAULT), problems)
    loader = _Loader(env, problems)
    for path, via in _config_files(paths, env):
        tree = _merge(tree, loader.load(path, via=via))
    for path, field in schema.fields():
        if field.env is not None and field.env in env:
            origin = Origin("env", detail=field.env)
            layer = _check_layer(_nest(path, env[field.env]), _everywhere(origin), problems)
            tree = _merge(tree, layer)
    for text in overrides:
        key, value = parse_override(text)
        origin = Origin("set", detail=text)
        layer = _check_layer(_nest(_split_key(key), value), _everywhere(origin), problems)
        tree = _merge(tree, layer)

    origins: dict[str, Origin] = {}
    data = _unwrap(tree, (), origins)
    _check_required(schema, data, origins, problems)
    try:
        _add_file_keys(data["server"], origins)
    except ConfigError as exc:
        problems.add(origins.get("server.api_keys_file"), exc)
    problems.raise_any()
    server, plugins = data["server"], data["plugins"]
    return Config(
        inputs=inputs,
        schema=schema,
        deferred=tuple(sorted(problems.deferred)),
        data=data,
        origins=origins,
        files=tuple(loader.files),
        home=data["home"],
        server=ServerSettings(
            host=server["host"],
            port=server["port"],
            api_keys=tuple(server["api_keys"]),
            max_body_bytes=server["max_body_bytes"],
            drain_timeout=server["drain_timeout"],
            log_level=server["log_level"],
            allowed_hosts=tuple(h.lower().rstrip(".") for h in server["allowed_hosts"]),
            header_timeout_s=server["header_timeout_s"],
            body_timeout_s=server["body_timeout_s"],
            keep_alive_timeout_s=server["keep_alive_timeout_s"],
        ),
        plugins=PluginSettings(
            load=None if plugins["load"] is None else tuple(plugins["load"]),
            disable=tuple(plugins["disable"]),
            strict=plugins["strict"],
            trace=plugins["trace"],
        ),
    )


def _config_files(
    paths: Sequence[str | os.PathLike[str]], env: Mapping[str, str]
) -> list[tuple[Path, Origin | None]]:
    """The top-level files to read, each with the variable that named it, if any."""
    if paths:
        return [(_absolute(os.fspath(path), Path.cwd()), None) for path in paths]
    if env.get("LLMOS_CONFIG"):
        return [(_absolute(env["LLMOS_CONFIG"], Path.cwd()), Origin("env", detail="LLMOS_CONFIG"))]
    return []


def _add_file_keys(server: dict[str, Any], origins: dict[str, Origin]) -> None:
    """Append the keys in ``server.api_keys_file`` to ``server.api_keys``."""
    path = server["api_keys_file"]
    if path is None:
        return
    where = origins["server.api_keys_file"]
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise ConfigError(
            f"{where}: server.api_keys_file: file not found: {path}", param="server.api_keys_file"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"{where}: server.api_keys_file: cannot read {path}: {exc}",
            param="server.api_keys_file",
        ) from None
    keys = [key for line in lines if (key := line.strip()) and not key.startswith("#")]
    # When every key comes from the file, the file is where they came from; when
    # api_keys has keys of its own, its origin stays (one origin per leaf).
    if keys and not server["api_keys"]:
        origins["server.api_keys"] = Origin("file", file=path)
    server["api_keys"] = [*server["api_keys"], *keys]


# ---------------------------------------------------------------- files


@attrs.define
class _Loader:
    """Reads config files and their includes into layers, recording each file."""

    env: Mapping[str, str]
    problems: _Problems
    files: list[Path] = attrs.Factory(list)

    def load(
        self, path: Path, chain: tuple[Path, ...] = (), via: Origin | None = None
    ) -> dict[str, Any]:
        """``path`` as a validated layer, its includes merged below its own keys.

        ``chain`` is the files that included this one; ``via`` what named it:
        the including file's ``include`` line, or ``LLMOS_CONFIG``.
        """
        if path in chain:
            raise ConfigError(f"include cycle: {_chain_text((*chain, path))}")
        text = self._read(path, chain, via)
        raw = _parse(text, path)
        lines = _key_lines(text)

        def origin_at(key_path: tuple[str, ...]) -> Origin:
            return Origin("file", file=path, line=_line_of(lines, key_path))

        raw = _interpolate(raw, (), origin_at, self.env, self.problems)
        includes = raw.pop("include", [])
        if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
            if not _broken(includes):
                self.problems.add(
                    origin_at(("include",)),
                    ConfigError(
                        f"{origin_at(('include',))}: include: expected a list of paths,"
                        f" got {_show(includes)}",
                        param="include",
                    ),
                )
            includes = []
        layer: dict[str, Any] = {}
        for include in includes:
            target = _absolute(include, path.parent)
            layer = _merge(layer, self.load(target, (*chain, path), origin_at(("include",))))
        return _merge(layer, _check_layer(raw, origin_at, self.problems))

    def _read(self, path: Path, chain: tuple[Path, ...], via: Origin | None) -> str:
        if path not in self.files:
            self.files.append(path)
        prefix = f"{via}: " if via is not None else ""
        try:
            return path.read_text(encoding="utf-8")
        except FileNotFoundError:
            if not chain:
                raise ConfigError(f"{prefix}config file not found: {path}") from None
            via_chain = f" (included via {_chain_text(chain)})" if len(chain) > 1 else ""
            raise ConfigError(
                f"{prefix}include: file not found: {path}{via_chain}", param="include"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{prefix}cannot read config file {path}: {exc}") from None


def _parse(text: str, path: Path) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        # The message says "(at line N, column M)", or "(at end of document)".
        found = re.search(r"at line (\d+)", str(exc))
        line = found.group(1) if found else max(len(text.splitlines()), 1)
        raise ConfigError(f"{path}:{line}: invalid TOML: {exc}") from None


def _chain_text(paths: Sequence[Path]) -> str:
    """``a.toml -> b.toml -> a.toml (in /dir)``: names relative to the first file's folder."""
    base = paths[0].parent
    names = [str(p.relative_to(base)) if p.is_relative_to(base) else str(p) for p in paths]
    return f"{' -> '.join(names)} (in {base})"


def _absolute(text: str, base: Path) -> Path:
    """``text`` as an absolute path, ``~`` expanded, relative to ``base``."""
    return Path(os.path.abspath(base / Path(text).expanduser()))


# ---------------------------------------------------------------- interpolation

# "$${" is an escaped "${"; a "${" that is not a whole ${NAME} or
# ${NAME:-default} matches with no name, so it is reported, not kept.
_REFERENCE = re.compile(r"\$\$\{|\$\{(?:([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\})?")


class _Substituted(str):
    """A string that ``${VAR}`` references made: environment text, which a
    number, boolean or list key may take like a variable's value, where a
    quoted ``"8"`` written in the file itself is refused."""

    __slots__ = ()


#: a value whose interpolation failed (already reported): skipped by validation
_BROKEN: Any = object()


def _broken(value: Any) -> bool:
    """Whether ``value`` is, or holds, a reference that failed to interpolate."""
    if isinstance(value, dict):
        return any(_broken(item) for item in value.values())
    if isinstance(value, list):
        return any(_broken(item) for item in value)
    return value is _BROKEN


def _interpolate(
    value: Any,
    path: tuple[str, ...],
    origin_at: _OriginAt,
    env: Mapping[str, str],
    problems: _Problems,
) -> Any:
    """``value`` with ``${VAR}`` references in every string replaced from
    ``env``; a bad reference is reported to ``problems`` and leaves ``_BROKEN``."""
    if isinstance(value, dict):
        return {
            key: _interpolate(item, (*path, key), origin_at, env, problems)
            for key, item in value.items()
        }
    if isinstance(value, list):
        return [_interpolate(item, path, origin_at, env, problems) for item in value]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name is None:
            raise ConfigError(
                f"{origin_at(path)}: {_join(path)}: bad reference in {_show(value)};"
                " write ${NAME} or ${NAME:-default}, and $${ for a literal ${",
                param=_join(path),
            )
        if default is not None:  # as in the shell, an empty variable takes the default
            return env.get(name) or default
        if name not in env:
            raise ConfigError(
                f"{origin_at(path)}: {_join(path)}: environment variable {name} is not set"
                f" (write ${{{name}:-default}} to give a default)",
                param=_join(path),
            )
        return env[name]

    try:
        return _Substituted(_REFERENCE.sub(replace, value))
    except ConfigError as exc:
        problems.add(origin_at(path), exc)
        return _BROKEN


# ---------------------------------------------------------------- layers


@attrs.frozen
class _Leaf:
    """A value in a layer tree, with its origin; tables are plain dicts."""

    value: Any
    origin: Origin


def _default_tree(schema: _Schema) -> dict[str, Any]:
    tree: dict[str, Any] = {name: {} for name in schema.sections}
    for path, field in schema.fields():
        tree = _merge(tree, _nest(path, field.default_value()))
    return tree


def _nest(path: tuple[str, ...], value: Any) -> dict[str, Any]:
    """``("a", "b"), 1`` -> ``{"a": {"b": 1}}``."""
    for key in reversed(path[1:]):
        value = {key: value}
    return {path[0]: value}


def _merge(base: Mapping[str, Any], over: Mapping[str, Any]) -> dict[str, Any]:
    """``over`` on top of ``base``: tables merge recursively, anything else is replaced."""
    merged = dict(base)
    for key, value in over.items():
        below = merged.get(key)
        both_tables = isinstance(value, dict) and isinstance(below, dict)
        merged[key] = _merge(below, value) if both_tables else value
    return merged


def _unwrap(
    tree: Mapping[str, Any], prefix: tuple[str, ...], origins: dict[str, Origin]
) -> dict[str, Any]:
    """Plain data from a layer tree, filling ``origins`` with each leaf's origin."""
    data: dict[str, Any] = {}
    for key, node in tree.items():
        path = (*prefix, key)
        if isinstance(node, _Leaf):
            data[key] = node.value
            origins[_join(path)] = node.origin
        else:
            data[key] = _unwrap(node, path, origins)
    return data


# ---------------------------------------------------------------- validation


@attrs.define
class _Problems:
    """The errors found while composing a config, reported together at the end,
    and the schema the layers are checked against (with the tables it set aside)."""

    schema: _Schema
    found: list[tuple[Origin | None, ConfigError]] = attrs.Factory(list)
    deferred: set[str] = attrs.Factory(set)

    def add(self, origin: Origin | None, error: ConfigError) -> None:
        self.found.append((origin, error))

    def raise_any(self) -> None:
        """Raise the one error, or a :class:`ConfigErrors` listing all of them:
        layer by layer as they were read, each file's errors in line order."""
        if len(self.found) == 1:
            raise self.found[0][1]
        if self.found:
            places: dict[Any, int] = {}
            for origin, _ in self.found:
                places.setdefault(_place(origin), len(places))

            def order(item: tuple[Origin | None, ConfigError]) -> tuple[int, int]:
                origin = item[0]
                line = origin.line if origin is not None and origin.line is not None else 0
                return places[_place(origin)], line

            raise ConfigErrors([error for _, error in sorted(self.found, key=order)])


def _place(origin: Origin | None) -> Any:
    """What errors are grouped by: one file, one variable, one ``--set``."""
    return None if origin is None else (origin.kind, origin.file, origin.detail)


class ConfigErrors(ConfigError):
    """Several config errors at once, one per line under a count; ``errors``
    holds each (with its own ``param``)."""

    def __init__(self, errors: Sequence[ConfigError]) -> None:
        self.errors = tuple(errors)
        lines = "".join(f"\n  {error.message}" for error in self.errors)
        super().__init__(
            f"{len(self.errors)} errors in the config:{lines}", param=self.errors[0].param
        )


def _check_layer(
    tree: Mapping[str, Any], origin_at: _OriginAt, problems: _Problems
) -> dict[str, Any]:
    """One layer validated against the schema and converted, as a tree of
    ``_Leaf``; what is wrong goes to ``problems`` and is left out."""
    layer: dict[str, Any] = {}
    for key, value in tree.items():
        path = (key,)
        if _broken(value) and not isinstance(value, dict):
            continue  # reported already; a table's other keys are still checked
        if key in _ROOT_FIELDS:
            leaf = _leaf(_ROOT_FIELDS[key], path, value, origin_at, problems)
            if leaf is not None:
                layer[key] = leaf
        elif key in problems.schema.sections:
            section = _check_section(problems.schema.sections[key], value, origin_at, problems)
            if section is not None:
                layer[key] = section
        elif isinstance(value, dict) and not problems.schema.final:
            problems.deferred.add(key)  # a plugin's section, checked once plugins load
        elif key == "include":
            problems.add(
                origin_at(path),
                ConfigError(
                    f"{origin_at(path)}: include: only a config file can include others",
                    param=key,
                ),
            )
        else:
            what = "section" if isinstance(value, dict) else "key"
            origin = origin_at(path)
            known = [*_ROOT_FIELDS, *problems.schema.sections, "include"]
            problems.add(origin, _unknown(path, origin, known, what))
    return layer


def _check_section(
    section: Section, value: Any, origin_at: _OriginAt, problems: _Problems
) -> dict[str, Any] | None:
    if not isinstance(value, dict):
        problems.add(
            origin_at((section.name,)),
            ConfigError(
                f"{origin_at((section.name,))}: {section.name}: expected a table"
                f" ([{section.name}]), got {_show(value)}",
                param=section.name,
            ),
        )
        return None
    layer: dict[str, Any] = {}
    for key, item in value.items():
        path = (section.name, key)
        field = section.fields.get(key)
        if _broken(item) and not isinstance(item, dict):
            continue
        if field is not None:
            leaf = _leaf(field, path, item, origin_at, problems)
            if leaf is not None:
                layer[key] = leaf
        elif section.entries is not None and isinstance(item, dict):
            layer[key] = _check_entry(section.entries, path, item, origin_at, problems)
        elif section.free_form and isinstance(item, dict):
            layer[key] = _free_form(item, path, origin_at)
        else:
            origin = origin_at(path)
            if section.entries is not None:
                problems.add(
                    origin,
                    ConfigError(
                        f"{origin}: {_join(path)}: expected a table ([{_join(path)}]),"
                        f" got {_show(item)}",
                        param=_join(path),
                    ),
                )
                continue
            problems.add(origin, _unknown(path, origin, list(section.fields), "key"))
    return layer


def _check_entry(
    fields: Mapping[str, Field],
    path: tuple[str, ...],
    table: dict[str, Any],
    origin_at: _OriginAt,
    problems: _Problems,
) -> dict[str, Any]:
    """One ``[section.NAME]`` table checked against the section's entry fields."""
    layer: dict[str, Any] = {}
    for key, item in table.items():
        at = (*path, key)
        field = fields.get(key)
        if _broken(item) and not isinstance(item, dict):
            continue
        if field is None:
            origin = origin_at(at)
            problems.add(origin, _unknown(at, origin, list(fields), "key"))
        elif field.kind == "table":
            if isinstance(item, dict):
                layer[key] = _free_form(item, at, origin_at)
            else:
                origin = origin_at(at)
                problems.add(
                    origin,
                    ConfigError(
                        f"{origin}: {_join(at)}: expected {field.expected}, got {_show(item)}",
                        param=_join(at),
                    ),
                )
        elif (leaf := _leaf(field, at, item, origin_at, problems)) is not None:
            layer[key] = leaf
    return layer


def _check_required(
    schema: _Schema, data: Mapping[str, Any], origins: Mapping[str, Origin], problems: _Problems
) -> None:
    """Every entry of a keyed section has its ``required`` keys, once all
    layers are merged (one file may give what another one's table lacks)."""
    for name, section in schema.sections.items():
        if section.entries is None:
            continue
        required = [key for key, field in section.entries.items() if field.required]
        reported = {error.param for _, error in problems.found}
        for entry, table in data.get(name, {}).items():
            if not isinstance(table, Mapping):
                continue
            for key in required:
                # a value given but wrong is reported as such, not as missing too
                if key not in table and _join((name, entry, key)) not in reported:
                    where = _join((name, entry))
                    origin = next(
                        (o for k, o in origins.items() if k.startswith(where + ".")), None
                    )
                    at = f"{origin}: " if origin is not None else ""
                    problems.add(
                        origin,
                        ConfigError(
                            f"{at}[{where}]: {key} is required"
                            f" ({section.entries[key].doc or section.entries[key].expected})",
                            param=f"{where}.{key}",
                        ),
                    )


def _free_form(value: Any, path: tuple[str, ...], origin_at: _OriginAt) -> Any:
    if isinstance(value, dict):
        return {
            key: _free_form(item, (*path, key), origin_at)
            for key, item in value.items()
            if isinstance(item, dict) or not _broken(item)
        }
    if isinstance(value, list):
        return _Leaf([_plain(item) for item in value], origin_at(path))
    return _Leaf(_plain(value), origin_at(path))


def _plain(value: Any) -> Any:
    """A substituted string as a plain ``str`` (it is data from here on), in
    lists and tables too."""
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    return str(value) if isinstance(value, _Substituted) else value


def _leaf(
    field: Field, path: tuple[str, ...], value: Any, origin_at: _OriginAt, problems: _Problems
) -> _Leaf | None:
    origin = origin_at(path)
    key = _join(path)
    if _quoted(field.kind, value, origin):
        # In a file, "8" is a string the author quoted: TOML has numbers,
        # booleans and arrays, and a string there is a mistake to point out.
        shown = "a secret value" if field.secret else f"the string {_show(value)}"
        unquote = _convert(field.kind, value, origin)
        hint = (
            f" (write {str(value).strip()} without quotes)"
            if unquote is not _MISSING and field.kind in ("int", "float", "bool")
            else ""
        )
        problems.add(
            origin,
            ConfigError(
                f"{origin}: {key}: expected {field.expected}, got {shown}{hint}", param=key
            ),
        )
        return None
    converted = None if value is None and field.optional else _convert(field.kind, value, origin)
    if converted is _MISSING or (converted is not None and not field.accepts(converted)):
        shown = "a secret value" if field.secret else _show(value)
        problems.add(
            origin,
            ConfigError(f"{origin}: {key}: expected {field.expected}, got {shown}", param=key),
        )
        return None
    return _Leaf(converted, origin)


def _quoted(kind: str, value: Any, origin: Origin) -> bool:
    """Whether ``value`` is a string written in a file for a key that is not
    one: a number, boolean or list key. Strings from the environment,
    ``--set`` and ``${VAR}`` references are text by nature and converted."""
    return (
        origin.kind == "file"
        and kind in ("int", "float", "bool", "list[str]")
        and isinstance(value, str)
        and not isinstance(value, _Substituted)
    )


def _convert(kind: str, value: Any, origin: Origin) -> Any:
    """``value`` as ``kind``, or ``_MISSING`` when it cannot be one.

    Strings convert to numbers, booleans and lists because environment
    variables, ``--set`` text and ``${VAR}`` references are all strings; a
    TOML boolean is never taken for a number.
    """
    text = value.strip() if isinstance(value, str) else None
    match kind:
        case "str":
            return str(value) if isinstance(value, str) else _MISSING
        case "bool":
            if isinstance(value, bool):
                return value
            if text is not None and text.lower() in _TRUE | _FALSE:
                return text.lower() in _TRUE
        case "int" | "float":
            number = int if kind == "int" else float
            exact = (int,) if kind == "int" else (int, float)
            if isinstance(value, exact) and not isinstance(value, bool):
                return number(value)
            if text is not None:
                try:
                    return number(text)
                except ValueError:
                    return _MISSING
        case "path":
            if isinstance(value, Path):
                return value
            if text:
                base = origin.file.parent if origin.file is not None else Path.cwd()
                return _absolute(text, base)
        case "list":
            if isinstance(value, list):
                return _plain(value)
        case "table":
            if isinstance(value, dict):
                return _plain(value)
        case "list[str]":
            if text is not None:  # "a, b" from the environment or --set
                return [item.strip() for item in text.split(",") if item.strip()]
            if isinstance(value, list | tuple) and all(isinstance(i, str) for i in value):
                return [str(item) for item in value]
    return _MISSING


def _unknown(path: tuple[str, ...], origin: Origin, known: Sequence[str], what: str) -> ConfigError:
    """The error for a key the schema does not know, with the nearest known key."""
    near = difflib.get_close_matches(path[-1], known, n=1)
    if near:
        hint = f"did you mean {_join((*path[:-1], near[0]))}?"
    elif known:
        hint = "known: " + ", ".join(sorted(known))
    else:
        hint = f"only [{_join((*path[:-1], 'name'))}] tables belong here"
    return ConfigError(f"{origin}: {_join(path)}: unknown {what} ({hint})", param=_join(path))


def _show(value: Any) -> str:
    """A value as an error message shows it: TOML-like, strings in double quotes."""
    return json.dumps(value, ensure_ascii=False, default=str)


# ---------------------------------------------------------------- keys and lines

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(path: Sequence[str]) -> str:
    """A key path as a TOML dotted key: ``plugins."my.plugin".level``."""
    return ".".join(
        k if _BARE_KEY.fullmatch(k) else json.dumps(k, ensure_ascii=False) for k in path
    )


def _split_key(text: str) -> tuple[str, ...]:
    """A TOML dotted key (bare, quoted or both) as its parts."""
    # tomllib already knows every quoting and escaping rule for keys.
    try:
        node: Any = tomllib.loads(f"{text} = 0")
        path: list[str] = []
        while isinstance(node, dict):
            ((key, node),) = node.items()
            path.append(key)
    except (tomllib.TOMLDecodeError, ValueError):
        raise ConfigError(f"not a valid key: {text!r}", param=text) from None
    return tuple(path)


def _skip_string(text: str, start: int) -> int:
    """The index after the one-line string that opens at ``start``."""
    quote, i = text[start], start + 1
    while i < len(text):
        if text[i] == "\\" and quote == '"':
            i += 2
        elif text[i] == quote:
            return i + 1
        else:
            i += 1
    return len(text)


def _find_unquoted(text: str, char: str, start: int = 0) -> int:
    """The index of ``char`` outside quotes, or -1."""
    i = start
    while i < len(text):
        if text[i] in "\"'":
            i = _skip_string(text, i)
        elif text[i] == char:
            return i
        else:
            i += 1
    return -1


@attrs.define
class _ValueScan:
    """Follows a TOML value across lines: an open multi-line string, bracket depth."""

    string: str | None = None
    depth: int = 0

    @property
    def open(self) -> bool:
        return self.string is not None or self.depth > 0

    def feed(self, line: str, i: int = 0) -> None:
        while i < len(line):
            char = line[i]
            if self.string is not None:
                if line.startswith(self.string, i):
                    i += 3
                    while i < len(line) and line[i] == self.string[0]:  # '""""' ends with content
                        i += 1
                    self.string = None
                else:
                    i += 2 if char == "\\" and self.string == '"""' else 1
            elif char == "#":
                return
            elif char in "\"'":
                if line.startswith(char * 3, i):
                    self.string, i = char * 3, i + 3
                else:
                    i = _skip_string(line, i)
            else:
                self.depth += (char in "[{") - (char in "]}")
                i += 1


def _key_lines(text: str) -> dict[tuple[str, ...], int]:
    """The line each key path and table header of valid TOML ``text`` starts on.

    tomllib reports no positions, so this follows ``[table]`` and
    ``[[array]]`` headers and ``key =`` assignments, skipping the inside of
    multi-line arrays and strings. A path's prefixes get the line where they
    first appear.
    """
    lines: dict[tuple[str, ...], int] = {}
    table: tuple[str, ...] = ()
    value = _ValueScan()
    for number, line in enumerate(text.splitlines(), start=1):
        if value.open:
            value.feed(line)
            continue
        stripped = line.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if stripped.startswith("["):
            start = 2 if stripped.startswith("[[") else 1
            table = path = _split_key(stripped[start : _find_unquoted(stripped, "]", start)])
        else:
            equals = _find_unquoted(stripped, "=")
            path = table + _split_key(stripped[:equals])
            value.feed(stripped, equals + 1)
        for size in range(1, len(path) + 1):
            lines.setdefault(path[:size], number)
    return lines


def _line_of(lines: Mapping[tuple[str, ...], int], path: tuple[str, ...]) -> int | None:
    """The line of ``path``, else of its nearest ancestor found (an inline table)."""
    for size in range(len(path), 0, -1):
        if path[:size] in lines:
            return lines[path[:size]]
    return None
