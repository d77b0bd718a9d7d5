"""The ``llmos`` command line.

Tables for people, ``--json`` for programs. A failure ends with one line on
stderr (``error: …``) and a non-zero exit code that says what kind of failure
it was (see :mod:`llmos.errors`); ``--debug`` (or ``LLMOS_DEBUG=1``) shows the
traceback instead. Plugins add sub-commands through ``llmos_register_commands``.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path

import click
from rich.console import Console
from rich.table import Table

from llmos import __version__
from llmos.cli_context import cli_state, current_kernel
from llmos.config import Config
from llmos.errors import LlmosError
from llmos.fusion.commands import fuse_group
from llmos.logs import configure_logging
from llmos.monitor.commands import monitor_commands
from llmos.monitor.report import report_command
from llmos.output import emit_json, json_option
from llmos.registry.artifact_commands import artifacts_group
from llmos.registry.commands import models_group
from llmos.registry.fsstore import ArtifactStore, store_of
from llmos.registry.sources import policy_from_config
from llmos.runtime.commands import inference_commands
from llmos.tuning.commands import tuning_commands
from llmos.tuning.evaluate import eval_command

#: exit codes, documented in the README; LlmosError subclasses carry their own
EXIT_OK = 0
EXIT_ERROR = 1


class LlmosGroup(click.Group):
    """A click group that adds the sub-commands plugins register."""

    def _plugin_commands(self, ctx: click.Context) -> dict[str, click.Command]:
        pm = cli_state(ctx).kernel().load_plugins()
        return {
            name: registered.spec.command
            for name, registered in pm.commands.items()
            if name not in self.commands
        }

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted({*self.commands, *self._plugin_commands(ctx)})

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name in self.commands:
            return self.commands[cmd_name]
        return self._plugin_commands(ctx).get(cmd_name)


@click.group(cls=LlmosGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_paths",
    multiple=True,
    is_eager=True,
    metavar="PATH",
    help="Config file (TOML); repeat to layer, later files win. Default: $LLMOS_CONFIG.",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    is_eager=True,
    metavar="KEY=VALUE",
    help="Override one config value, e.g. --set server.port=9000 (typed as TOML).",
)
# Eager, like --help: `llmos --strict --help` must see --strict before --help
# lists the commands, which loads the plugins.
@click.option(
    "--strict", is_flag=True, is_eager=True, help="Fail on the first plugin that fails to load."
)
@click.option("--debug", is_flag=True, is_eager=True, help="Debug logging, tracebacks on errors.")
@click.pass_context
def cli(
    ctx: click.Context,
    config_paths: tuple[str, ...],
    overrides: tuple[str, ...],
    strict: bool,
    debug: bool,
) -> None:
    """llmos: an operating system for language models."""
    cli_state(ctx)


@cli.command()
@json_option
def version(as_json: bool) -> None:
    """Show the versions of llmos, pluggy and Python."""
    import pluggy

    info = {
        "llmos": __version__,
        "pluggy": pluggy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if as_json:
        emit_json(info)
    else:
        click.echo(f"llmos {info['llmos']} (pluggy {info['pluggy']}, Python {info['python']})")


@cli.command()
@json_option
@click.option("--all", "show_all", is_flag=True, help="Include the kernel's default plugins.")
@click.pass_context
def plugins(ctx: click.Context, as_json: bool, show_all: bool) -> None:
    """List plugins with their version, hooks, and status (and load errors).

    Plugin routes are checked against each other and the daemon's own, as
    ``serve`` checks them, so a collision shows here as a failed plugin.
    """
    kernel = cli_state(ctx).kernel()
    pm = kernel.load_plugins()
    if pm.implements("llmos_register_routes"):
        from llmos.server.app import kernel_routes

        pm.check_routes(kernel, kernel_routes(kernel))
    rows = pm.plugins(include_defaults=show_all)
    if as_json:
        emit_json([info.to_dict() for info in rows])
        return
    if not rows:
        click.echo("No plugins installed. (--all shows the kernel's default plugins.)")
        return
    table = Table(title="llmos plugins")
    for column in ("name", "distribution", "version", "status", "hooks", "registered"):
        table.add_column(column)
    for info in rows:
        status = info.status if info.error is None else f"{info.status}: {info.error}"
        status += "".join(f"\nwarning: {warning}" for warning in info.warnings)
        style = "red" if info.status == "failed" else "yellow" if info.warnings else None
        registered = "; ".join(f"{k}: {', '.join(v)}" for k, v in info.registered.items())
        table.add_row(
            info.name,
            info.distribution or "-",
            info.version or "-",
            status,
            "\n".join(info.hooks),
            registered,
            style=style,
        )
    Console().print(table)


@cli.group()
def plugin() -> None:
    """Write a plugin of your own."""


@plugin.command("new")
@click.argument("name")
@click.option(
    "--dir",
    "directory",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("."),
    show_default=True,
    help="Where the distribution's folder llmos-NAME/ is written.",
)
@click.option("--force", is_flag=True, help="Overwrite the files of an existing llmos-NAME/.")
@json_option
def plugin_new(name: str, directory: Path, force: bool, as_json: bool) -> None:
    """Write llmos-NAME/: a plugin distribution with one provider, ready to install.

    NAME is the plugin's name (lowercase letters, digits, '.', '_', '-'). The
    folder holds a pyproject.toml with the llmos entry point, the plugin module
    (a provider NAME-reverse answering completions, chats and streams), a
    README and a test that loads it through its entry point:
    `pip install -e 'llmos-NAME[test]' && pytest llmos-NAME`.
    """
    from llmos.templates import new_plugin

    written = new_plugin(name, directory, force=force)
    if as_json:
        emit_json({"root": str(written.root), "files": [str(p) for p in written.files]})
        return
    click.echo(f"wrote {written.root}/")
    for path in written.files:
        click.echo(f"  {path.relative_to(written.root)}")
    click.echo(
        f"next: pip install -e '{written.root}[test]' && pytest {written.root} && llmos plugins"
    )


@cli.group()
def config() -> None:
    """Inspect the effective configuration."""


@config.command("show")
@json_option
@click.pass_context
def config_show(ctx: click.Context, as_json: bool) -> None:
    """Print every effective value and where it came from (file:line, env, --set)."""
    cfg = cli_state(ctx).kernel().config
    rows = cfg.explain()
    if as_json:
        emit_json(
            {
                "files": [str(p) for p in cfg.files],
                "config": cfg.to_dict(),
                "origins": {key: str(origin) for key, _, origin in rows},
            }
        )
        return
    # Like `git config --show-origin`: one line per value, never truncated,
    # easy to grep. Values are JSON so strings and lists read unambiguously.
    width = max((len(str(origin)) for _, _, origin in rows), default=0)
    for key, value, origin in rows:
        click.echo(f"{origin!s:<{width}}  {key} = {json.dumps(value, default=str)}")


@cli.command()
@click.option("--host", help="Address to bind (default: server.host, 127.0.0.1).")
@click.option("--port", type=click.IntRange(0, 65535), help="Port (default: server.port, 8470).")
@click.pass_context
def serve(ctx: click.Context, host: str | None, port: int | None) -> None:
    """Run the llmos daemon."""
    from llmos.server import serve as run_server

    state = cli_state(ctx)
    kernel = state.kernel()
    configure_logging("debug" if state.debug else kernel.config.server.log_level)
    ctx.exit(run_server(kernel, host=host, port=port))


def _artifact_store(config: Config) -> ArtifactStore:
    """The ``[artifacts]`` store, as the daemon on this config sees it."""
    return store_of(policy_from_config(config), config.home)


cli.add_command(models_group(lambda ctx: current_kernel(ctx).registry))
cli.add_command(artifacts_group(lambda ctx: _artifact_store(current_kernel(ctx).config)))
for _command in inference_commands(current_kernel):
    cli.add_command(_command)
cli.add_command(eval_command(current_kernel))
cli.add_command(report_command(current_kernel))
cli.add_command(fuse_group(current_kernel))
for _command in tuning_commands(current_kernel):
    cli.add_command(_command)
for _command in monitor_commands(current_kernel):
    cli.add_command(_command)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``llmos`` console script; returns the exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or os.environ.get("LLMOS_DEBUG", "") not in ("", "0")
    # Before click resolves a sub-command, which may load plugins and log.
    # Warnings and errors only (a plugin that failed to load, say), on stderr:
    # the CLI's own output is its result, on stdout.
    configure_logging("debug" if debug else os.environ.get("LLMOS_LOG_LEVEL", "warning"))
    try:
        # With standalone_mode off, click returns ctx.exit()'s code instead of
        # calling sys.exit, and leaves the error handling to us.
        result = cli.main(args=args, prog_name="llmos", standalone_mode=False)
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        return EXIT_ERROR
    except LlmosError as exc:
        if debug:
            traceback.print_exc()
        click.echo(f"error: {exc.message}", err=True)
        return exc.exit_code
    except Exception as exc:
        if debug:
            traceback.print_exc()
        else:
            click.echo(
                f"error: unexpected {type(exc).__name__}: {exc} "
                "(run again with --debug for the traceback)",
                err=True,
            )
        return EXIT_ERROR
    return result if isinstance(result, int) else EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
