"""``llmos top``, ``llmos advise`` and ``llmos alerts``: the daemon's live
figures, advice and alert states in a terminal.

They read a running daemon — ``--url``, else ``$LLMOS_URL``, else the
``[server]`` address of the config — because the figures live in the
daemon's memory; a kernel started by the command itself would have none.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Mapping
from typing import Any

import click
from rich.console import Console, Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from llmos.errors import UsageError
from llmos.monitor.metrics import parse_duration
from llmos.output import json_option
from llmos.runtime.commands import HttpBackend, KernelGetter

__all__ = ["monitor_commands"]


def _daemon(
    ctx: click.Context, get_kernel: KernelGetter, url: str | None, key_env: str
) -> HttpBackend:
    import os

    if not url:
        server = get_kernel(ctx).config.server
        host = "127.0.0.1" if server.host in ("0.0.0.0", "::", "") else server.host
        url = f"http://{host}:{server.port}"
    return HttpBackend(url, os.environ.get(key_env))


def _options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--api-key-env",
        default="LLMOS_API_KEY",
        show_default=True,
        help="Environment variable with the daemon's API key.",
    )(f)
    return click.option(
        "--url",
        envvar="LLMOS_URL",
        help="The daemon (default: $LLMOS_URL, else the config's [server] address).",
    )(f)


def _window(value: str) -> str:
    try:
        parse_duration(value, "--window")
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return value


def _ms(value: float | None) -> str:
    if value is None:
        return "-"
    return f"{value:.0f}" if value >= 100 else f"{value:.1f}" if value >= 1 else f"{value:.2f}"


def _rate(value: float | None) -> str:
    return "-" if not value else f"{value:.1f}" if value < 100 else f"{value:.0f}"


def _placed(model: Mapping[str, Any]) -> Text:
    """Where a loaded model runs and what its executor says of it:
    ``ray HEALTHY 2 RUNNING``, ``-`` for this process."""
    placed, health = model.get("placed"), model.get("health")
    if health is None:
        return Text(placed or ("-" if model.get("loaded") else ""))
    where = f"{placed} " if placed else ""
    if "error" in health:
        error = str(health["error"])
        error = error if len(error) <= 60 else error[:57] + "..."
        return Text(f"{where}error: {error}", style="red")
    status = str(health.get("status", "?"))
    replicas = health.get("replicas")
    counts = (
        " ".join(f"{n} {state}" for state, n in replicas.items())
        if isinstance(replicas, Mapping)
        else ""
    )
    style = "green" if status == "HEALTHY" else "yellow"
    return Text(f"{where}{status}{' ' + counts if counts else ''}", style=style)


def top_frame(summary: Mapping[str, Any], url: str) -> Group:
    """One screen of ``llmos top`` from a ``/api/monitor/summary`` answer."""
    process = summary.get("process") or {}
    firing = summary.get("alerts_firing") or []
    head = Text.assemble(
        ("llmos top", "bold"),
        f"  {url}  window {summary['window_s']:.0f}s  ",
        f"memory {process.get('rss_mb', 0):.0f} MiB  cpu {process.get('cpu_percent', 0):.0f}%  ",
        (
            f"{len(firing)} alert(s) firing" if firing else "no alerts",
            "bold red" if firing else "green",
        ),
    )
    table = Table(expand=True, pad_edge=False)
    for column, justify in (
        ("model", "left"),
        ("rps", "right"),
        ("p50 ms", "right"),
        ("p95 ms", "right"),
        ("p99 ms", "right"),
        ("err %", "right"),
        ("queue", "right"),
        ("busy", "right"),
        ("tok/s out", "right"),
        ("batch", "right"),
        ("wait p95", "right"),
        ("placed", "left"),
    ):
        table.add_column(column, justify=justify, no_wrap=True)  # type: ignore[arg-type]
    models = sorted(
        summary["models"].items(), key=lambda item: (-(item[1].get("rps") or 0), item[0])
    )
    for name, m in models:
        rate = m.get("error_rate") or 0.0
        table.add_row(
            escape(name) + ("" if m.get("loaded") else " [dim](not loaded)[/]"),
            _rate(m.get("rps")),
            _ms(m.get("latency_p50_ms")),
            _ms(m.get("latency_p95_ms")),
            _ms(m.get("latency_p99_ms")),
            Text(f"{rate:.1%}" if m.get("requests") else "-", style="red" if rate else ""),
            f"{m.get('queued', 0)}/{m.get('in_flight', 0)}",
            f"{(m.get('busy') or 0):.0%}",
            _rate(m.get("tokens_out_per_s")),
            "-" if m.get("batch_size_mean") is None else f"{m['batch_size_mean']:.1f}",
            _ms(m.get("queue_wait_p95_ms")),
            _placed(m),
        )
    if not models:
        table.add_row("[dim]no traffic yet[/]", *[""] * 11)
    parts: list[Any] = [head, table]
    for alert in firing:
        parts.append(
            Text(
                f"FIRING {alert['alert']} on {alert['model'] or 'the daemon'}: {alert['metric']} "
                f"{alert['value']:.4g} {alert['op']} {alert['threshold']:.4g}",
                style="bold red",
            )
        )
    return Group(*parts)


def monitor_commands(get_kernel: KernelGetter) -> list[click.Command]:
    def _fetch(
        ctx: click.Context,
        url: str | None,
        key_env: str,
        path: str,
        params: dict[str, Any] | None = None,
    ) -> Any:
        client = _daemon(ctx, get_kernel, url, key_env)
        try:
            return client.get(path, params)
        finally:
            client.close()

    @click.command("top")
    @click.option("--window", default="60", show_default=True, help="Figures over this window.")
    @click.option("--interval", default=2.0, show_default=True, help="Seconds between updates.")
    @click.option("--once", is_flag=True, help="Print one screen and exit.")
    @_options
    @json_option
    @click.pass_context
    def top(
        ctx: click.Context,
        window: str,
        interval: float,
        once: bool,
        url: str | None,
        api_key_env: str,
        as_json: bool,
    ) -> None:
        """Live figures of every model the daemon serves: requests/s, latency
        percentiles, errors, queue, tokens/s, batch sizes, and where each
        loaded model is placed with its executor's health (Ctrl-C to quit)."""
        client = _daemon(ctx, get_kernel, url, api_key_env)
        params = {"window": _window(window)}
        base = str(client.client.base_url)
        try:
            if as_json:
                click.echo(json.dumps(client.get("/api/monitor/summary", params), indent=2))
                return
            console = Console()
            if not console.is_terminal:
                console = Console(width=160)  # a pipe or a file: no columns cut
            if once or not console.is_terminal:
                console.print(top_frame(client.get("/api/monitor/summary", params), base))
                return
            with Live(console=console, screen=False, auto_refresh=False) as live:
                while True:
                    live.update(top_frame(client.get("/api/monitor/summary", params), base))
                    live.refresh()
                    time.sleep(max(interval, 0.2))
        except KeyboardInterrupt:
            pass
        finally:
            client.close()

    @click.command("advise")
    @click.option("--window", default="10m", show_default=True, help="Judge this window.")
    @_options
    @json_option
    @click.pass_context
    def advise(
        ctx: click.Context, window: str, url: str | None, api_key_env: str, as_json: bool
    ) -> None:
        """Concrete advice from the daemon's measured figures, with the
        evidence: batching, another provider, failing requests, accuracy
        drift."""
        answer = _fetch(ctx, url, api_key_env, "/api/advice", {"window": _window(window)})
        if as_json:
            click.echo(json.dumps(answer, indent=2))
            return
        console = Console()
        if not answer["data"]:
            console.print(
                f"No advice: nothing measured in the last {answer['window_s']:.0f} s calls for "
                "a change (models need some traffic before they are judged)."
            )
            return
        colours = {"critical": "bold red", "warning": "yellow", "info": "cyan"}
        for item in answer["data"]:
            console.print(
                f"[{colours.get(item['severity'], '')}]{item['severity'].upper()}[/] "
                f"[bold]{escape(item['title'])}[/]"
            )
            console.print(f"  {escape(item['action'])}", highlight=False)
            evidence = ", ".join(f"{k}={v}" for k, v in item["evidence"].items())
            console.print(f"  [dim]evidence: {escape(evidence)}[/]", highlight=False)
            if item.get("config"):
                console.print("  [dim]config:[/]")
                for line in item["config"].splitlines():
                    console.print(f"    {escape(line)}", highlight=False)

    @click.command("alerts")
    @_options
    @json_option
    @click.pass_context
    def alerts(ctx: click.Context, url: str | None, api_key_env: str, as_json: bool) -> None:
        """Alert rules and their states (firing, pending, inactive) per model,
        recent firings, and rules the config got wrong."""
        answer = _fetch(ctx, url, api_key_env, "/api/alerts")
        if as_json:
            click.echo(json.dumps(answer, indent=2))
            return
        console = Console()
        for name, why in answer["refused"].items():
            console.print(f"[red]refused[/] {escape(name)}: {escape(why)}")
        if not answer["rules"]:
            console.print("No alert rules; add [alerts.NAME] tables to the config.")
            return
        table = Table(title="alerts")
        for column in ("alert", "model", "status", "metric", "value", "threshold", "severity"):
            table.add_column(column)
        styles = {"firing": "bold red", "pending": "yellow"}
        for state in answer["data"]:
            value = state["value"]
            table.add_row(
                escape(state["alert"]),
                escape(state["model"] or "-"),
                Text(state["status"], style=styles.get(state["status"], "")),
                state["metric"],
                "-" if value is None else f"{value:.4g}",
                f"{state['op']} {state['threshold']}" if state["threshold"] is not None else "-",
                state["severity"],
            )
        console.print(table)

    return [top, advise, alerts]
