"""``llmos report MODEL --out report.html|report.png``: a model's history as
plots.

The figures are read from the ``sqlite`` sink's database
(:class:`~llmos.monitor.history.History`), so a report works with the daemon
stopped: latency p50/p95/p99, throughput (rows and tokens per second), errors
by kind, queue wait and batch size over time, with the model's alerts marked
on the time axis; the loss curves of the tuning jobs that tuned the model or
produced it; and a summary of the whole range. ``.png`` is one figure of
subplots; ``.html`` a page that holds everything itself (the charts as inline
PNG, the summary and alert tables), with no external URL. Drawing needs
matplotlib (``pip install 'llmos[report]'``), imported only when drawing.
"""

from __future__ import annotations

import base64
import html
import io
import math
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from llmos.errors import UsageError
from llmos.monitor.history import History, model_matches
from llmos.monitor.metrics import parse_duration
from llmos.output import emit_json, json_option

if TYPE_CHECKING:
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

    from llmos.runtime.commands import KernelGetter

__all__ = ["FORMATS", "build_report", "render", "report_command"]

#: what ``--out`` may end in
FORMATS = (".html", ".png")
#: about this many points per chart when no ``--step`` is given
TARGET_POINTS = 120
#: past this many points per chart, ask for a larger step
MAX_POINTS = 5_000
#: steps an automatic step is rounded up to
_NICE_STEPS = (10, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 10800, 21600, 43200, 86400)


# --------------------------------------------------------------------------
# The figures
# --------------------------------------------------------------------------


def auto_step(seconds: float) -> float:
    """A round step that gives about :data:`TARGET_POINTS` points over ``seconds``."""
    wanted = seconds / TARGET_POINTS
    return float(next((s for s in _NICE_STEPS if s >= wanted), math.ceil(wanted / 86400) * 86400))


def build_report(
    history: History, model: str, since: float, until: float, step: float | None = None
) -> dict[str, Any]:
    """Everything a report shows, as JSON-able data: ``summary`` (figures over
    the whole range), ``points`` (figures per step), ``alerts``, ``jobs``."""
    if until <= since:
        raise UsageError("--since must come before --until")
    models = history.resolve(model)
    asked = auto_step(until - since) if step is None else step
    widest = history.widest(models, since, until) or 0.0
    # A bucket counts whole in the step its start falls in: no narrower steps.
    step = max(asked, widest)
    if (until - since) / step > MAX_POINTS:
        raise UsageError(
            f"--step {asked:g}s gives over {MAX_POINTS} points from --since to --until;"
            " give a larger --step"
        )
    total, capabilities, seconds = history.total(models, since, until)
    summary = total.figures(seconds or step)
    summary.update(
        ok=total.ok,
        rejected=total.rejected,
        capabilities=capabilities,
        seconds=seconds,
    )
    note = None
    if step > asked:
        note = f"step raised to {step:g}s: buckets older than a day are {widest:g}s wide"
    return {
        "model": model,
        "models": models,
        "since": since,
        "until": until,
        "step_s": step,
        "note": note,
        "summary": summary,
        "points": history.series(models, since, until, step),
        "alerts": [
            {"time": e["time"], "status": e["kind"].partition(".")[2], **e["fields"]}
            | {"model": e["model"]}
            for e in history.events(("alert.firing", "alert.resolved"), since, until, model)
        ],
        "jobs": tuning_jobs(history, model, since, until),
    }


def tuning_jobs(history: History, model: str, since: float, until: float) -> list[dict[str, Any]]:
    """The tuning jobs that tuned ``model`` (their base) or produced it, with
    their progress points in the range, oldest job first."""
    jobs: dict[str, dict[str, Any]] = {}
    for event in history.events("tuning.job"):
        fields = event["fields"]
        job_id = str(fields.get("job"))
        if any(
            model_matches(name, model)
            for name in (event["model"], fields.get("base"), fields.get("result_model"))
        ):
            job = jobs.setdefault(job_id, {"job": job_id, "points": []})
            job.update(
                model=event["model"],
                base=fields.get("base"),
                method=fields.get("method"),
                state=fields.get("state"),
                result_model=fields.get("result_model") or job.get("result_model"),
            )
    for event in history.events("tuning.progress", since, until):
        fields = event["fields"]
        job_id = str(fields.get("job"))
        if job_id not in jobs and not model_matches(event["model"], model):
            continue
        job = jobs.setdefault(job_id, {"job": job_id, "model": event["model"], "points": []})
        point = {"time": event["time"]}
        point.update(
            (k, v)
            for k, v in fields.items()
            if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)
        )
        job["points"].append(point)
    return [job for job in jobs.values() if job["points"]]


# --------------------------------------------------------------------------
# Drawing
# --------------------------------------------------------------------------


def _figure_class() -> type[Figure]:
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
        from matplotlib.figure import Figure
    except ImportError:
        raise UsageError(
            "llmos report draws with matplotlib, which is not installed:"
            " pip install 'llmos[report]'"
        ) from None
    return Figure


def _times(data: Mapping[str, Any], offset: float = 0.0) -> list[datetime]:
    return [datetime.fromtimestamp(p["time"] + offset) for p in data["points"]]


def _values(data: Mapping[str, Any], key: str) -> list[float]:
    return [math.nan if p.get(key) is None else float(p[key]) for p in data["points"]]


def _time_axis(ax: Axes, data: Mapping[str, Any]) -> None:
    from matplotlib import dates

    locator = dates.AutoDateLocator()
    ax.xaxis.set_major_locator(locator)
    ax.xaxis.set_major_formatter(dates.ConciseDateFormatter(locator))
    ax.set_xlim(datetime.fromtimestamp(data["since"]), datetime.fromtimestamp(data["until"]))
    ax.grid(True, alpha=0.3)
    seen: set[str] = set()
    for alert in data["alerts"]:
        firing = alert["status"] == "firing"
        label = "alert firing" if firing else "alert resolved"
        ax.axvline(
            datetime.fromtimestamp(alert["time"]),
            color="#d62728" if firing else "#2ca02c",
            linestyle="--" if firing else ":",
            linewidth=1.2,
            label=None if label in seen else label,
        )
        seen.add(label)


def _legend(*axes: Axes) -> None:
    handles, labels = [], []
    for ax in axes:
        h, lab = ax.get_legend_handles_labels()
        handles += h
        labels += lab
    if handles:
        axes[0].legend(handles, labels, loc="upper left", fontsize=8, framealpha=0.8)


def _finish(ax: Axes, data: Mapping[str, Any], title: str, unit: str, *twins: Axes) -> None:
    """Title, unit, the time axis with the alerts on it, one legend for all."""
    ax.set_title(title)
    ax.set_ylabel(unit)
    _time_axis(ax, data)
    _legend(ax, *twins)


def _percentiles(
    ax: Axes, data: Mapping[str, Any], name: str, what: str, labels: Sequence[str], **style: Any
) -> None:
    """One line per percentile of ``name`` (``latency``: ``latency_p95_ms`` …)."""
    middles = _times(data, data["step_s"] / 2)
    for label, line in zip(labels, ("-", "--", ":"), strict=False):
        values = _values(data, f"{name}_{label}_ms")
        ax.plot(middles, values, line, marker=".", label=f"{what} {label}", **style)


def draw_latency(ax: Axes, data: Mapping[str, Any]) -> None:
    _percentiles(ax, data, "latency", "latency", ("p50", "p95", "p99"))
    _finish(ax, data, "Latency (queue included)", "ms")


def draw_throughput(ax: Axes, data: Mapping[str, Any]) -> None:
    middles = _times(data, data["step_s"] / 2)
    ax.plot(middles, _values(data, "rps"), marker=".", color="#1f77b4", label="rows/s")
    tokens = ax.twinx()
    for key, color, label in (
        ("tokens_in_per_s", "#9467bd", "tokens in/s"),
        ("tokens_out_per_s", "#ff7f0e", "tokens out/s"),
    ):
        tokens.plot(middles, _values(data, key), "--", color=color, label=label)
    tokens.set_ylabel("tokens / s")
    _finish(ax, data, "Throughput", "rows / s", tokens)


def draw_errors(ax: Axes, data: Mapping[str, Any]) -> None:
    kinds = sorted({k for p in data["points"] for k in p["errors_by_kind"]})
    starts = _times(data)
    width = data["step_s"] / 86400 * 0.9  # matplotlib dates are days
    bottom = [0.0] * len(starts)
    for kind in kinds:
        counts = [float(p["errors_by_kind"].get(kind, 0)) for p in data["points"]]
        ax.bar(starts, counts, width=width, bottom=bottom, align="edge", label=kind)
        bottom = [b + c for b, c in zip(bottom, counts, strict=True)]
    if not kinds:
        ax.text(0.5, 0.5, "no errors", transform=ax.transAxes, ha="center", va="center")
    _finish(ax, data, "Errors by kind (rows per step)", "rows")


def draw_queue(ax: Axes, data: Mapping[str, Any]) -> None:
    _percentiles(ax, data, "queue_wait", "queue wait", ("p50", "p95"), color="#8c564b")
    batch = ax.twinx()
    batch.plot(
        _times(data, data["step_s"] / 2),
        _values(data, "batch_size_mean"),
        marker="s",
        markersize=3,
        color="#17becf",
        label="batch size (mean)",
    )
    batch.set_ylabel("rows / call")
    batch.set_ylim(bottom=0)
    _finish(ax, data, "Queue wait and batch size", "ms", batch)


def draw_tuning(ax: Axes, data: Mapping[str, Any]) -> None:
    for job in data["jobs"]:
        points = job["points"]
        keys = sorted({k for p in points for k in p if "loss" in k})
        for key in keys:
            rows = [p for p in points if key in p]
            steps = [p.get("step", i) for i, p in enumerate(rows)]
            ax.plot(steps, [p[key] for p in rows], marker=".", label=f"{job['job'][:12]} {key}")
    if not any(ax.get_lines()):
        ax.text(0.5, 0.5, "no loss reported", transform=ax.transAxes, ha="center", va="center")
    ax.set_title("Tuning loss")
    ax.set_xlabel("step")
    ax.grid(True, alpha=0.3)
    _legend(ax)


#: the charts, in order: (title for the page, drawer)
CHARTS: tuple[tuple[str, Callable[[Axes, Mapping[str, Any]], None]], ...] = (
    ("Latency", draw_latency),
    ("Throughput", draw_throughput),
    ("Errors", draw_errors),
    ("Queue wait and batch size", draw_queue),
)


def _charts(data: Mapping[str, Any]) -> list[tuple[str, Callable[[Axes, Mapping[str, Any]], None]]]:
    charts = list(CHARTS)
    if data["jobs"]:
        charts.append(("Tuning", draw_tuning))
    return charts


def _title(data: Mapping[str, Any]) -> str:
    return (
        f"llmos report: {data['model']} — {_when(data['since'])} to {_when(data['until'])},"
        f" step {_duration(data['step_s'])}"
    )


def _png(figure: Figure) -> bytes:
    out = io.BytesIO()
    # No "Software" text chunk: the page carries no URL, even inside an image.
    figure.savefig(out, format="png", dpi=100, metadata={"Software": None})
    return out.getvalue()


def render_png(data: Mapping[str, Any]) -> bytes:
    """One figure: every chart, then the summary as a table."""
    figure_class = _figure_class()
    charts = _charts(data)
    figure = figure_class(figsize=(11, 2.9 * len(charts) + 3.2), layout="constrained")
    grid = figure.add_gridspec(len(charts) + 1, 1, height_ratios=[1] * len(charts) + [1.1])
    for row, (_, draw) in enumerate(charts):
        draw(figure.add_subplot(grid[row]), data)
    table_ax = figure.add_subplot(grid[len(charts)])
    table_ax.axis("off")
    rows = summary_rows(data)
    half = math.ceil(len(rows) / 2)
    cells = [
        [*rows[i], *(rows[i + half] if i + half < len(rows) else ("", ""))] for i in range(half)
    ]
    table = table_ax.table(cellText=cells, loc="upper center", cellLoc="left", edges="horizontal")
    table.auto_set_font_size(False)
    table.set_fontsize(9)
    table.scale(1, 1.25)
    for (_, column), cell in table.get_celld().items():
        if column % 2 == 0:
            cell.get_text().set_fontweight("bold")
    table_ax.set_title("Summary of the range", loc="left")
    figure.suptitle(_title(data), fontsize=12, fontweight="bold")
    return _png(figure)


def render_html(data: Mapping[str, Any]) -> str:
    """A page that holds everything itself: charts as inline PNG, tables."""
    figure_class = _figure_class()
    sections = []
    for title, draw in _charts(data):
        figure = figure_class(figsize=(10, 3.2), layout="constrained")
        draw(figure.add_subplot(), data)
        encoded = base64.b64encode(_png(figure)).decode("ascii")
        sections.append(f'<img alt="{_e(title)}" src="data:image/png;base64,{encoded}">')
    summary = "\n".join(
        f"<tr><th>{_e(label)}</th><td>{_e(value)}</td></tr>" for label, value in summary_rows(data)
    )
    alerts = _html_table(
        ("time", "status", "alert", "model", "metric", "value", "threshold", "severity"),
        (
            (
                _when(a["time"]),
                a["status"],
                a.get("alert"),
                a.get("model"),
                a.get("metric"),
                _number(a.get("value")),
                f"{a.get('op') or ''} {_number(a.get('threshold'))}".strip(),
                a.get("severity"),
            )
            for a in data["alerts"]
        ),
        empty="no alerts in this range",
    )
    jobs = _html_table(
        ("job", "model", "base", "method", "state", "points", "last loss"),
        (
            (
                j["job"],
                j.get("model"),
                j.get("base"),
                j.get("method"),
                j.get("state"),
                len(j["points"]),
                _number(next((p["loss"] for p in reversed(j["points"]) if "loss" in p), None)),
            )
            for j in data["jobs"]
        ),
        empty="no tuning jobs of this model in this range",
    )
    note = f"<p class=note>{_e(data['note'])}</p>" if data.get("note") else ""
    charts = "\n".join(sections)
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>llmos report: {_e(data["model"])}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1050px; color: #222; }}
table {{ border-collapse: collapse; margin: 0.5em 0 1.5em; }}
th, td {{ text-align: left; padding: 0.2em 0.8em; border-bottom: 1px solid #ddd; }}
img {{ max-width: 100%; }}
.note {{ color: #a60; }}
</style>
</head>
<body>
<h1>{_e(_title(data))}</h1>
<p>Models: {_e(", ".join(data["models"]))}. Times are local.</p>
{note}
<h2>Summary</h2>
<table class=summary>
{summary}
</table>
<h2>Charts</h2>
{charts}
<h2>Alerts</h2>
{alerts}
<h2>Tuning jobs</h2>
{jobs}
</body>
</html>
"""


def render(data: Mapping[str, Any], out: Path) -> None:
    """Write the report to ``out``: ``.png`` or ``.html``."""
    png = out.suffix.lower() == ".png"
    content = render_png(data) if png else render_html(data).encode("utf-8")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_bytes(content)


def _html_table(header: Sequence[str], rows: Iterator[Sequence[Any]], *, empty: str) -> str:
    body = [
        "<tr>" + "".join(f"<td>{_e('' if v is None else v)}</td>" for v in row) + "</tr>"
        for row in rows
    ]
    if not body:
        return f"<p>{_e(empty)}</p>"
    head = "<tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"
    return "<table>\n" + "\n".join([head, *body]) + "\n</table>"


def _e(value: Any) -> str:
    return html.escape(str(value))


# --------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------


def summary_rows(data: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(label, value)`` of the summary table, values formatted."""
    s = data["summary"]
    kinds = ", ".join(f"{k} {v}" for k, v in s["errors_by_kind"].items()) or "-"
    capabilities = ", ".join(f"{k} {v}" for k, v in sorted(s["capabilities"].items())) or "-"

    def percentiles(name: str) -> str:
        values = [s[f"{name}_{p}_ms"] for p in ("p50", "p95", "p99")]
        if all(v is None for v in values):
            return "-"
        return " / ".join(_number(v) for v in values)

    return [
        ("requests", str(s["requests"])),
        ("answered", str(s["ok"])),
        ("errors", str(s["errors"])),
        ("error rate", f"{s['error_rate']:.2%}"),
        ("errors by kind", kinds),
        ("cancelled", str(s["cancelled"])),
        ("model calls", str(s["calls"])),
        ("by capability", capabilities),
        ("time with data", _duration(s["seconds"])),
        ("rows/s (mean)", _number(s["rps"])),
        ("tokens in / out", f"{s['tokens_in']} / {s['tokens_out']}"),
        (
            "tokens/s in / out",
            f"{_number(s['tokens_in_per_s'])} / {_number(s['tokens_out_per_s'])}",
        ),
        ("latency p50/p95/p99 ms", percentiles("latency")),
        ("queue wait p50/p95/p99 ms", percentiles("queue_wait")),
        ("first token p50/p95/p99 ms", percentiles("ttft")),
        ("model time p50/p95/p99 ms", percentiles("model")),
        (
            "batch size mean / max",
            f"{_number(s['batch_size_mean'])} / {_number(s['batch_size_max'])}",
        ),
        ("busy", f"{s['busy']:.1%}"),
    ]


def _number(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    value = float(value)
    if value == 0 or abs(value) >= 100:
        return f"{value:.0f}"
    return f"{value:.3g}"


def _when(seconds: float) -> str:
    return datetime.fromtimestamp(seconds).strftime("%Y-%m-%d %H:%M:%S")


def _duration(seconds: float) -> str:
    """``10s``, ``2m``, ``2h 59m 10s``."""
    if seconds < 60:
        return f"{seconds:.3g}s"
    parts, rest = [], round(seconds)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, rest = divmod(rest, size)
        if count:
            parts.append(f"{count}{unit}")
    return " ".join(parts)


# --------------------------------------------------------------------------
# The command
# --------------------------------------------------------------------------


def parse_when(text: str, now: float, what: str) -> float:
    """``24h`` (that long before ``now``), ``now``, or an ISO 8601 time (local
    when it names no zone) as seconds since the epoch."""
    text = text.strip()
    if text.lower() == "now":
        return now
    try:
        return now - parse_duration(text, what)
    except ValueError:
        pass
    try:
        return datetime.fromisoformat(text).timestamp()
    except ValueError:
        raise UsageError(
            f"{what}: {text!r} is neither a duration ago (30m, 24h, 7d) nor an ISO time"
            " (2025-01-31T12:00)"
        ) from None


def report_command(get_kernel: KernelGetter) -> click.Command:
    @click.command("report")
    @click.argument("model")
    @click.option(
        "--since",
        default="24h",
        show_default=True,
        help="Start: a duration ago (30m, 24h, 7d) or an ISO time.",
    )
    @click.option("--until", default="now", show_default=True, help="End: the same forms.")
    @click.option(
        "--step",
        help="Chart step, a duration (default: about 120 points; never narrower than the"
        " stored buckets).",
    )
    @click.option(
        "--out",
        type=click.Path(dir_okay=False, path_type=Path),
        help="The file to write: report.html (a self-contained page) or report.png.",
    )
    @click.option(
        "--home",
        type=click.Path(file_okay=False, path_type=Path),
        help="The data folder whose history to read (default: the config's, $LLMOS_HOME).",
    )
    @json_option
    @click.pass_context
    def report(
        ctx: click.Context,
        model: str,
        since: str,
        until: str,
        step: str | None,
        out: Path | None,
        home: Path | None,
        as_json: bool,
    ) -> None:
        """Plot MODEL's history — latency, throughput, errors, queue wait and
        batch size, alerts, tuning loss — to an HTML page or a PNG image.

        MODEL is a name (every version) or name@version. The figures come
        from the sqlite sink's database in the data folder, so the daemon
        need not run. --json prints the figures instead of (or beside) --out.
        """
        from rich.console import Console

        if out is None and not as_json:
            raise UsageError("give --out report.html or --out report.png (or --json)")
        if out is not None and out.suffix.lower() not in FORMATS:
            raise UsageError(
                f"--out {str(out)!r}: a report is written as {' or '.join(FORMATS)};"
                f" name the file report.html or report.png"
            )
        now = time.time()
        start, end = parse_when(since, now, "--since"), parse_when(until, now, "--until")
        every = None
        if step is not None:
            try:
                every = parse_duration(step, "--step")
            except ValueError as exc:
                raise UsageError(str(exc)) from None
            if every <= 0:
                raise UsageError("--step must be more than 0")
        folder = home if home is not None else get_kernel(ctx).config.home
        console = Console(stderr=True)
        # a spinner only for a person watching; logs and pipes get none
        status = console.status(f"reading the history of {model} …")
        if console.is_terminal:
            status.start()
        try:
            with History.of_home(folder.expanduser()) as history:
                data = build_report(history, model, start, end, every)
            if out is not None:
                status.update(f"drawing {out.name} …")
                render(data, out)
        finally:
            status.stop()
        if as_json:
            emit_json({**data, "out": None if out is None else str(out)})
            return
        click.echo(
            f"wrote {out}: {model}, {data['summary']['requests']} requests"
            f" from {_when(start)} to {_when(end)}"
        )

    return report
