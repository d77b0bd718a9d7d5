"""Files ``llmos`` writes for its users: ``llmos plugin new``'s plugin distribution.

The templates are package data (``templates/plugin/…``, shipped in the wheel),
filled by plain string substitution of ``{{placeholders}}``, so that they stay
readable as the files they become and need no template engine. A path part
``__module__`` becomes the plugin's module name, and a ``.tmpl`` suffix is
dropped (it keeps tools from taking the templates for the project's own
Python, TOML or tests).
"""

from __future__ import annotations

import re
from importlib import resources
from importlib.resources.abc import Traversable
from pathlib import Path

import attrs

from llmos import __version__
from llmos.errors import UsageError

__all__ = ["WrittenPlugin", "new_plugin", "plugin_values"]

#: a plugin name: what names every registered thing may be (ProviderSpec.name …)
_NAME = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
#: the provider the template registers is named NAME + this
_PROVIDER_SUFFIX = "-reverse"


@attrs.frozen
class WrittenPlugin:
    """What :func:`new_plugin` wrote: the distribution's folder and its files."""

    root: Path
    files: tuple[Path, ...]


def llmos_requirement(version: str = __version__) -> str:
    """The range of llmos a new plugin may run on: this minor release line
    (``llmos>=0.1,<0.2``), or this major one from 1.0 on."""
    major, minor = (int(part) for part in version.split(".")[:2])
    if major == 0:
        return f"llmos>=0.{minor},<0.{minor + 1}"
    return f"llmos>={major}.{minor},<{major + 1}"


def plugin_values(name: str) -> dict[str, str]:
    """The placeholder values for plugin ``name``, or :class:`UsageError` for
    a name that would not make a valid plugin, provider and module name."""
    provider = name + _PROVIDER_SUFFIX
    if not _NAME.fullmatch(name) or not _NAME.fullmatch(provider):
        raise UsageError(
            f"invalid plugin name {name!r}: use 1-{64 - len(_PROVIDER_SUFFIX)} lowercase "
            "letters, digits, '.', '_' or '-', starting with a letter or digit "
            "(it names the plugin, its provider and its package)",
            param="name",
        )
    return {
        "name": name,
        "dist": f"llmos-{name}",
        "module": "llmos_" + re.sub(r"[.-]", "_", name),
        "provider": provider,
        "model": f"{name}/reverse",
        # the plugin's options table in the llmos config; a dotted name is quoted
        "options_table": f"plugins.{name}" if "." not in name else f'plugins."{name}"',
        "llmos_requirement": llmos_requirement(),
    }


def _fill(text: str, values: dict[str, str]) -> str:
    for key, value in values.items():
        text = text.replace("{{" + key + "}}", value)
    return text


def _walk(folder: Traversable, parts: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], str]]:
    """``(relative path parts, text)`` of every template file under ``folder``."""
    found = []
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name == "__pycache__":
            continue
        if entry.is_dir():
            found.extend(_walk(entry, (*parts, entry.name)))
        else:
            found.append(((*parts, entry.name), entry.read_text(encoding="utf-8")))
    return found


def new_plugin(name: str, directory: Path, *, force: bool = False) -> WrittenPlugin:
    """Write the distribution ``llmos-NAME/`` under ``directory``: a pyproject
    with the ``llmos`` entry point, the plugin module with one provider, a
    README and a test. An existing folder is refused unless ``force``, which
    overwrites the template's files and leaves any other file alone."""
    values = plugin_values(name)
    root = Path(directory).expanduser().absolute() / values["dist"]
    if root.exists() and not force:
        raise UsageError(
            f"{root} already exists; choose another --dir, or pass --force to overwrite"
            " its template files",
            param="name",
        )
    written = []
    for parts, text in _walk(resources.files(__package__) / "plugin"):
        relative = [values["module"] if part == "__module__" else part for part in parts]
        relative[-1] = relative[-1].removesuffix(".tmpl")
        target = root.joinpath(*relative)
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(_fill(text, values), encoding="utf-8")
        written.append(target)
    return WrittenPlugin(root=root, files=tuple(written))
