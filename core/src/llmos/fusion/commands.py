"""``llmos fuse``: create, list and show fusions; list strategies.

Fusions are registry cards, so a fusion created here is seen at once by a
daemon on the same data folder (and served by it); ``create`` runs in this
process because fitting on dev data calls the members.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from llmos.errors import UsageError
from llmos.fusion.service import strategy_rows
from llmos.output import emit_json, json_option
from llmos.registry.commands import _options
from llmos.runtime.kernel import Kernel
from llmos.tuning.data import load_file
from llmos.types import ModelCard, ModelFormat

__all__ = ["fuse_group"]

KernelGetter = Callable[[click.Context], Kernel]


def _member(text: str) -> Any:
    """``--member`` value: a model name, or a JSON table ``{"model": …, "labels": […]}``."""
    if text.lstrip().startswith("{"):
        try:
            return json.loads(text)
        except json.JSONDecodeError as exc:
            raise UsageError(f"--member {text!r}: not valid JSON ({exc.msg})") from None
    return text


def _summary(card: ModelCard) -> dict[str, Any]:
    conf = card.options.get("fusion") or card.options.get("merge") or {}
    return {
        "model": card.ref,
        "strategy": conf.get("strategy"),
        "members": [m["model"] if isinstance(m, Mapping) else m for m in conf.get("members", [])],
        "options": conf.get("options", {}),
        "fit": conf.get("fit"),
        "scores": dict(card.scores),
        "tasks": list(card.tasks),
        "format": str(card.format),
    }


def _show(card: ModelCard) -> None:
    info = _summary(card)
    console = Console()
    console.print(f"[bold]{info['model']}[/]  {info['strategy']} fusion ({info['format']})")
    table = Table("member", "dev accuracy", "s / row")
    fitted = (info["fit"] or {}).get("members", {})
    for member in info["members"]:
        figures = fitted.get(member, {})
        accuracy = figures.get("dev/accuracy")
        seconds = figures.get("seconds_per_row")
        table.add_row(
            member,
            "" if accuracy is None else f"{accuracy:.4f}",
            "" if seconds is None else f"{seconds:.4f}",
        )
    console.print(table)
    fit = info["fit"] or {}
    fused = (fit.get("fused") or {}).get("dev/accuracy")
    if fused is not None:
        check = fit.get("out_of_fold") or {}
        judged = (
            f" (out of fold: {check['accuracy']:.4f}, {check['folds']} folds)"
            if check.get("accuracy") is not None
            else ""
        )
        console.print(f"fused on dev: {fused:.4f}{judged}", markup=False)
    weighting = info["options"].get("weighting")
    if isinstance(weighting, dict) and weighting.get("chosen"):
        tried = weighting.get("dev/accuracy") or {}
        console.print(
            f"weights: {weighting['chosen']} (dev accuracy "
            + ", ".join(f"{k} {v:.4f}" for k, v in tried.items())
            + ")",
            markup=False,
        )
    if fit.get("fallback"):
        console.print(f"fallback: {fit['fallback']['reason']}", markup=False)
    if info["scores"]:
        console.print(
            "scores: " + ", ".join(f"{k} {v:.4f}" for k, v in sorted(info["scores"].items()))
        )
    hidden = ("centroids", "model", "weighting", "fallback")
    shown = {k: v for k, v in info["options"].items() if k not in hidden}
    if shown:
        console.print("options: " + json.dumps(shown, default=str))


def fuse_group(get_kernel: KernelGetter) -> click.Group:
    @click.group("fuse")
    def fuse() -> None:
        """Combine models into one that is served like any other."""

    @fuse.command("create")
    @click.argument("name")
    @click.option("--strategy", required=True, help="vote, mean, stack, cascade, router, rank …")
    @click.option(
        "--member",
        "members",
        multiple=True,
        required=True,
        metavar="MODEL",
        help="A member (repeat, in order): name, name@version, or a JSON table such as"
        ' \'{"model": "smollm2", "labels": ["negative", "positive"]}\'.',
    )
    @click.option(
        "--option",
        "options",
        multiple=True,
        metavar="KEY=VALUE",
        help="A strategy option (repeat), typed as JSON where it parses: --option"
        " weights=[1,2] --option target_ratio=0.99",
    )
    @click.option("--dev", "dev_path", metavar="FILE", help="Labelled dev data to fit on.")
    @click.option("--text-column", help="The dev file's text column (default: text, sentence …).")
    @click.option("--label-column", help="The dev file's label column (default: label …).")
    @click.option("--description", default="", help="The fusion card's description.")
    @click.option("--tag", "tags", multiple=True, help="A tag for the card (repeat).")
    @json_option
    @click.pass_context
    def create(
        ctx: click.Context,
        name: str,
        strategy: str,
        members: Sequence[str],
        options: Sequence[str],
        dev_path: str | None,
        text_column: str | None,
        label_column: str | None,
        description: str,
        tags: Sequence[str],
        as_json: bool,
    ) -> None:
        """Create (and, with --dev, fit) a fusion NAME, registered as a model."""

        kernel = get_kernel(ctx)
        kernel.start()
        try:
            dev = None
            if dev_path is not None:
                dev = load_file(dev_path, text_column=text_column, label_column=label_column)
                if not as_json:
                    click.echo(f"fitting on {len(dev)} dev rows (every member answers each) …")
            card = kernel.fusions.create(
                name,
                strategy=strategy,
                members=[_member(m) for m in members],
                options=_options(options),
                dev=dev,
                description=description,
                tags=tags,
                created_by="cli",
            )
            risk = kernel.fusions.risk(card)
        finally:
            kernel.stop()
        if risk is not None:
            click.echo(f"warning: {risk}", err=True)  # stderr: --json output stays JSON
        if as_json:
            emit_json(card.to_dict())
            return
        click.echo(f"created {card.ref}")
        _show(card)

    @fuse.command("list")
    @json_option
    @click.pass_context
    def list_fusions(ctx: click.Context, as_json: bool) -> None:
        """The registered fusions (latest versions)."""
        cards = get_kernel(ctx).fusions.list()
        if as_json:
            emit_json([_summary(c) for c in cards])
            return
        if not cards:
            click.echo("no fusions; create one with `llmos fuse create`")
            return
        table = Table("fusion", "strategy", "members", "dev accuracy")
        for card in cards:
            info = _summary(card)
            accuracy = info["scores"].get("dev/accuracy")
            table.add_row(
                info["model"],
                str(info["strategy"]),
                ", ".join(info["members"]),
                "" if accuracy is None else f"{accuracy:.4f}",
            )
        Console().print(table)

    @fuse.command("show")
    @click.argument("name")
    @json_option
    @click.pass_context
    def show(ctx: click.Context, name: str, as_json: bool) -> None:
        """A fusion: strategy, members, options, fit."""
        card = get_kernel(ctx).registry.store.get(name)
        if card.format != ModelFormat.FUSION and "merge" not in card.options:
            raise UsageError(f"{card.ref!r} is not a fusion (its format is {card.format})")
        if as_json:
            emit_json({**_summary(card), "card": card.to_dict()})
            return
        _show(card)

    @fuse.command("strategies")
    @json_option
    @click.pass_context
    def strategies(ctx: click.Context, as_json: bool) -> None:
        """The installed fusion strategies."""
        rows = strategy_rows(get_kernel(ctx).load_plugins())
        if as_json:
            emit_json(rows)
            return
        table = Table("strategy", "plugin", "kind", "serves", "description")
        for row in rows:
            table.add_row(
                row["name"],
                row["plugin"],
                row["kind"],
                ", ".join(row["capabilities"]),
                row["description"],
            )
        Console().print(table)

    return fuse
