"""The ``llmos`` command line's context: what a command needs from it.

Every sub-command — the kernel's own (``llmos models``, ``llmos tune`` …) and
the ones plugins add through ``llmos_register_commands`` — reaches the kernel
the top-level options describe (``--config``, ``--set``, ``--strict``)
through :func:`current_kernel`: built once per command line, on first use,
its plugins loaded and its whole config checked. This is the public API for
commands; ``llmos.cli`` itself (the group, ``main``) is not.

    import click
    from llmos.cli_context import current_kernel

    @click.command("acme-status")
    @click.pass_context
    def status(ctx):
        kernel = current_kernel(ctx)
        click.echo(f"{len(kernel.registry.store.search('').cards)} models")
"""

from __future__ import annotations

import attrs
import click

from llmos.runtime.kernel import Kernel
from llmos.types import CommandSpec

__all__ = ["CliState", "cli_state", "current_kernel"]


@attrs.define
class CliState:
    """What the top-level options set, and the kernel built from them lazily.

    ``builtin``: the root group's own commands, reserved in the kernel's
    plugin manager so that a plugin cannot take one of their names.
    """

    config_paths: tuple[str, ...] = ()
    overrides: tuple[str, ...] = ()
    debug: bool = False
    builtin: tuple[click.Command, ...] = ()
    _kernel: Kernel | None = None

    def kernel(self) -> Kernel:
        if self._kernel is None:
            self._kernel = Kernel.from_config(self.config_paths, self.overrides)
            self._kernel.plugins.reserve("commands", (CommandSpec(command=c) for c in self.builtin))
        return self._kernel


def cli_state(ctx: click.Context) -> CliState:
    """The state of the command line ``ctx`` belongs to (made on first use)."""
    root = ctx.find_root()
    if not isinstance(root.obj, CliState):
        params = root.params
        overrides = tuple(params.get("overrides") or ())
        if params.get("strict"):
            overrides += ("plugins.strict=true",)
        group = root.command
        builtin = tuple(group.commands.values()) if isinstance(group, click.Group) else ()
        root.obj = CliState(
            config_paths=tuple(params.get("config_paths") or ()),
            overrides=overrides,
            debug=bool(params.get("debug")),
            builtin=builtin,
        )
    return root.obj


def current_kernel(ctx: click.Context) -> Kernel:
    """The kernel the top-level options describe (built once per command line)."""
    return cli_state(ctx).kernel()
