"""``llmos eval``: a classifier scored on labelled data, from the command line.

:func:`eval_command` predicts with a model in this process or through a
daemon (``--url``), like ``llmos classify``, and reports with
:mod:`llmos.tuning.evaluation` (the metrics, which the monitor's scheduled
accuracy checks use too, without this command).
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import click

from llmos.errors import NotFoundError, UsageError
from llmos.output import json_option
from llmos.runtime.commands import KernelGetter, backend, connection
from llmos.tuning.data import load_file, rows_hash
from llmos.tuning.evaluation import DEFAULT_BATCH_SIZE, evaluate
from llmos.types import ModelFormat

__all__ = ["eval_command", "parse_mapping"]


def parse_mapping(items: Iterable[str]) -> dict[str, str]:
    """``["0=negative", "1=positive"]`` → ``{"0": "negative", "1": "positive"}``."""
    mapping: dict[str, str] = {}
    for item in items:
        data_label, sep, model_label = item.partition("=")
        data_label, model_label = data_label.strip(), model_label.strip()
        if not sep or not data_label or not model_label:
            raise UsageError(f"--map {item!r}: write DATA_LABEL=MODEL_LABEL, e.g. 0=negative")
        if data_label in mapping:
            raise UsageError(f"--map: data label {data_label!r} is mapped twice")
        mapping[data_label] = model_label
    return mapping


# --------------------------------------------------------------------------
# llmos eval
# --------------------------------------------------------------------------


def eval_command(get_kernel: KernelGetter) -> click.Command:
    """``llmos eval``, over the kernel the CLI's root options describe."""

    @click.command("eval")
    @click.argument("model")
    @click.option(
        "--data",
        "data_path",
        required=True,
        metavar="FILE",
        help="Labelled rows: .jsonl, .csv or .tsv with a text and a label column.",
    )
    @click.option("--text-column", help="The text column (default: text, sentence, …).")
    @click.option("--label-column", help="The label column (default: label, class, …).")
    @click.option(
        "--labels",
        "zero_shot",
        multiple=True,
        metavar="L[,L…]",
        help="Zero-shot: the labels the model chooses among (repeat, or comma-separated); "
        "none: the model's own labels.",
    )
    @click.option(
        "--map",
        "maps",
        multiple=True,
        metavar="DATA=MODEL",
        help="Name a data label as the model does, e.g. --map 0=negative (repeat).",
    )
    @click.option(
        "--batch-size",
        type=click.IntRange(min=1),
        default=DEFAULT_BATCH_SIZE,
        show_default=True,
        help="Texts per request.",
    )
    @connection
    @json_option
    @click.pass_context
    def eval_(
        ctx: click.Context,
        model: str,
        data_path: str,
        text_column: str | None,
        label_column: str | None,
        zero_shot: tuple[str, ...],
        maps: tuple[str, ...],
        batch_size: int,
        url: str | None,
        api_key_env: str,
        as_json: bool,
    ) -> None:
        """Score MODEL on the labelled rows of a file: accuracy, macro-F1,
        per-label precision/recall/F1 and the confusion matrix.

        Labels match ignoring case. When the data names its labels unlike the
        model (0/1 against negative/positive), map them: --map 0=negative
        --map 1=positive; add --labels negative,positive to ask a zero-shot
        model to choose among them.
        """
        from rich.console import Console
        from rich.markup import escape
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        rows = load_file(data_path, text_column=text_column, label_column=label_column)
        labels = tuple(
            label.strip() for item in zero_shot for label in item.split(",") if label.strip()
        )
        mapping = parse_mapping(maps)

        client = backend(ctx, get_kernel, url, api_key_env)

        def predict(texts: Sequence[str]) -> list[str]:
            return [result["label"] for result in client.classify(model, texts, labels)]

        errors = Console(stderr=True)
        progress = Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=errors,
            transient=True,
            # a bar only for a person watching; logs and pipes get none
            disable=not errors.is_terminal,
        )
        started = time.perf_counter()
        try:
            with progress:
                task = progress.add_task(f"eval {model}", total=len(rows))
                report = evaluate(
                    predict,
                    rows,
                    mapping=mapping,
                    zero_shot_labels=labels,
                    batch_size=batch_size,
                    on_batch=lambda done: progress.advance(task, done),
                )
            fusion = None
            if url is None and not labels:
                fusion = _fusion_report(get_kernel(ctx), model, rows, mapping, errors)
        finally:
            client.close()
        seconds = time.perf_counter() - started
        if report["unknown_predictions"]:
            errors.print(
                escape(
                    "note: the model answered labels the data does not have "
                    f"({', '.join(report['unknown_predictions'])}); "
                    "name the data's labels as the model does with --map DATA=MODEL"
                ),
                highlight=False,
            )

        result = {
            "model": model,
            "data": {"path": data_path, "rows": len(rows), "sha256": rows_hash(rows)},
            "mapping": mapping,
            "zero_shot_labels": list(labels),
            **report,
            "seconds": round(seconds, 3),
        }
        if fusion is not None:
            result["fusion"] = fusion
        if as_json:
            click.echo(json.dumps(result, indent=2))
        else:
            _print_report(result)
            if fusion is not None:
                _print_fusion(fusion)

    return eval_


def _fusion_report(
    kernel: Any,
    model: str,
    rows: Sequence[Mapping[str, str]],
    mapping: Mapping[str, str],
    console: Any,
) -> dict[str, Any] | None:
    """Member by member figures when ``model`` is a registered fusion."""
    try:
        card = kernel.registry.store.get(model)
    except NotFoundError:
        return None  # a [models] deployment: no fusion
    if card.format != ModelFormat.FUSION:
        return None
    console.print(f"{model} is a fusion: asking each member every row …", highlight=False)
    mapped = [{"text": r["text"], "label": mapping.get(r["label"], r["label"])} for r in rows]
    return kernel.fusions.analyse(model, mapped)


def _print_fusion(fusion: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    table = Table(title=f"{fusion['strategy']} fusion {fusion['fusion']}: members")
    for column in ("member", "accuracy", "marginal", "asked", "s / row"):
        table.add_column(column, justify="left" if column == "member" else "right")
    for member in fusion["members"]:
        marginal = member.get("marginal")
        table.add_row(
            escape(member["model"]),
            f"{member['accuracy']:.4f}",
            "n/a" if marginal is None else f"{marginal:+.4f}",
            f"{member['asked_share']:.0%}",
            f"{member['seconds_per_row']:.4f}",
        )
    console.print(table)
    best = fusion["best_member"]
    console.print(
        escape(
            f"fusion accuracy {fusion['accuracy']:.4f} vs best member {best['model']}"
            f" {best['accuracy']:.4f}; member calls {fusion['member_calls']} of"
            f" {fusion['member_calls_if_all']} ({fusion['calls_saved_share']:.0%} saved),"
            f" member time {fusion['time_saved_share']:.0%} saved"
        ),
        highlight=False,
    )


def _print_report(result: Mapping[str, Any]) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = Console()
    rate = result["rows"] / result["seconds"] if result["seconds"] else 0.0
    console.print(
        escape(
            f"{result['model']} on {result['data']['path']}: {result['rows']} rows "
            f"in {result['seconds']:.1f} s ({rate:.1f} rows/s)"
        ),
        highlight=False,
    )
    if result["mapping"]:
        pairs = ", ".join(f"{k} → {v}" for k, v in result["mapping"].items())
        console.print(escape(f"data labels mapped: {pairs}"), highlight=False)
    console.print(
        f"accuracy [bold]{result['accuracy']:.4f}[/bold]   "
        f"macro-F1 [bold]{result['macro_f1']:.4f}[/bold]",
        highlight=False,
    )

    table = Table(title="per label")
    for column in ("label", "precision", "recall", "F1", "support", "predicted"):
        table.add_column(column, justify="left" if column == "label" else "right")
    for label, figures in result["per_label"].items():
        table.add_row(
            escape(label),
            f"{figures['precision']:.4f}",
            f"{figures['recall']:.4f}",
            f"{figures['f1']:.4f}",
            str(figures["support"]),
            str(figures["predicted"]),
        )
    console.print(table)

    matrix = Table(title="confusion (rows: gold, columns: predicted)")
    matrix.add_column("gold \\ predicted")
    for label in result["labels"]:
        matrix.add_column(escape(label), justify="right")
    for label, counts in zip(result["labels"], result["confusion"], strict=True):
        matrix.add_row(escape(label), *map(str, counts))
    console.print(matrix)
