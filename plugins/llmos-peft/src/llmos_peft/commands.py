"""The ``llmos peft`` commands."""

from __future__ import annotations

from pathlib import Path

import click

from llmos.cli_context import current_kernel
from llmos.errors import UsageError
from llmos.registry.sources import check_source

__all__ = ["peft_group"]


@click.group(name="peft")
def peft_group() -> None:
    """PEFT adapters made by the peft tuning methods."""


@peft_group.command("merge")
@click.argument("adapter")
@click.option(
    "--out",
    "out",
    required=True,
    type=click.Path(path_type=Path, file_okay=False),
    help="Folder to write the merged model into (new or empty).",
)
@click.option(
    "--base",
    "base_path",
    type=click.Path(exists=True, path_type=Path),
    help="The base model's folder or GGUF file, when ADAPTER is a folder.",
)
@click.pass_context
def merge_command(ctx: click.Context, adapter: str, out: Path, base_path: Path | None) -> None:
    """Fold ADAPTER (a registered model, name[@version], or an adapter folder
    with --base) into its base model and save a standalone safetensors model."""
    from llmos_peft.merge import export_merged  # torch: only when merging

    if Path(adapter).is_dir():
        if base_path is None:
            raise UsageError("an adapter folder needs --base, its base model's folder or file")
        export_merged(Path(adapter), base_path, out)
        click.echo(f"merged {adapter} into {out}")
        return
    kernel = current_kernel(ctx)
    registry = kernel.registry
    card = registry.store.get(adapter)
    if not card.parents:
        raise UsageError(f"{card.ref!r} names no base model; is it an adapter?")
    base = registry.store.get(card.parents[0])
    export_merged(
        check_source(card.source, registry.policy).path,
        base_path or check_source(base.source, registry.policy).path,
        out,
        card=card,
        base=base,
        cache_dir=kernel.home / "cache" / "transformers",
    )
    click.echo(f"merged {card.ref} (on {base.ref}) into {out}")
