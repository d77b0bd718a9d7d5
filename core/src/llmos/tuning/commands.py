"""``llmos tune`` and ``llmos jobs``: tuning from the command line.

Without ``--url`` (or ``$LLMOS_URL``) both work on the local data folder:
``llmos tune`` submits the job to this process's kernel and runs it here —
this process is the worker's parent, so it waits, showing a progress bar —
and ``llmos jobs`` reads and cancels jobs in the shared job database, whichever
process runs them. With ``--url`` they go through a daemon's HTTP API, and
``llmos tune`` sends the data inline and follows the job's event stream.

Ctrl-C while ``llmos tune`` waits cancels the job; ``--no-wait`` leaves it
queued instead (without ``--url``, a daemon on the same data folder runs it).
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
from collections.abc import Callable, Iterator, Sequence
from datetime import datetime
from typing import Any, Protocol, TypeVar

import click
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from llmos.errors import LlmosError, UsageError
from llmos.output import emit_json, json_option
from llmos.registry.commands import _options
from llmos.runtime.commands import HttpBackend, _raise_for
from llmos.runtime.commands import connection as shared_connection
from llmos.runtime.kernel import Kernel
from llmos.tuning.data import load_splits
from llmos.tuning.jobs import JobConflict, JobState, TuningFailed, normalise_task

__all__ = ["tuning_commands"]

KernelGetter = Callable[[click.Context], Kernel]
T = TypeVar("T")

_ENDED = ("succeeded", "failed", "cancelled")


def parse_params(pairs: Sequence[str]) -> dict[str, Any]:
    """``--param KEY=VALUE`` pairs; values typed as JSON where they parse."""
    for pair in pairs:
        key, eq, _ = pair.partition("=")
        if not eq or not key:
            raise UsageError(
                f"--param {pair!r}: expected KEY=VALUE, e.g. --param learning_rate=1e-4"
            )
    return _options(pairs)


# --------------------------------------------------------------------------
# Where the jobs are: this data folder, or a daemon
# --------------------------------------------------------------------------


class Jobs(Protocol):
    def submit(
        self, request: dict[str, Any], files: dict[str, str], *, wait: bool
    ) -> dict[str, Any]: ...

    def get(self, job_id: str) -> dict[str, Any]: ...

    def list(self, states: Sequence[str], limit: int) -> list[dict[str, Any]]: ...

    def cancel(self, job_id: str) -> dict[str, Any]: ...

    def logs(self, job_id: str) -> list[dict[str, Any]]: ...

    def follow(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]: ...

    def close(self) -> None: ...


class LocalJobs:
    """The job database of this data folder. A job submitted here runs in
    this process's kernel, which runs no other (it does not adopt)."""

    def __init__(self, kernel: Kernel) -> None:
        self.kernel = kernel
        self.started = False

    def submit(
        self, request: dict[str, Any], files: dict[str, str], *, wait: bool
    ) -> dict[str, Any]:
        if wait:
            self.kernel.start()
            self.started = True
        return self.kernel.jobs.submit(**request, files=files, run=wait).to_dict()

    def get(self, job_id: str) -> dict[str, Any]:
        return self.kernel.jobs.get(job_id).to_dict()

    def list(self, states: Sequence[str], limit: int) -> list[dict[str, Any]]:
        return [job.to_dict() for job in self.kernel.jobs.list(states, limit)]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self.kernel.jobs.cancel(job_id).to_dict()

    def logs(self, job_id: str) -> list[dict[str, Any]]:
        return self.kernel.jobs.logs(job_id)

    def follow(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        return self.kernel.jobs.follow(job_id)

    def close(self) -> None:
        self.kernel.stop()


class HttpJobs(HttpBackend):
    """A daemon's ``/api/tuning`` routes."""

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        import httpx

        try:
            response = self.client.request(method, path, **kwargs)
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        _raise_for(response)
        return response.json()

    def submit(
        self, request: dict[str, Any], files: dict[str, str], *, wait: bool
    ) -> dict[str, Any]:
        # The files are read here and sent inline: the daemon may be on
        # another machine, and its file access is limited to allowed roots.
        dataset = load_splits(**files, task=normalise_task(request["task"]))
        body = {**request, "data": dataset.splits}
        return self._call("POST", "/api/tuning/jobs", json=body)["job"]

    def get(self, job_id: str) -> dict[str, Any]:
        return self._call("GET", f"/api/tuning/jobs/{job_id}")["job"]

    def list(self, states: Sequence[str], limit: int) -> list[dict[str, Any]]:
        params = {"state": list(states), "limit": limit}
        return self._call("GET", "/api/tuning/jobs", params=params)["jobs"]

    def cancel(self, job_id: str) -> dict[str, Any]:
        return self._call("DELETE", f"/api/tuning/jobs/{job_id}")["job"]

    def logs(self, job_id: str) -> list[dict[str, Any]]:
        return self._call("GET", f"/api/tuning/jobs/{job_id}/logs")["records"]

    def follow(self, job_id: str) -> Iterator[tuple[str, dict[str, Any]]]:
        import httpx

        path = f"/api/tuning/jobs/{job_id}/events"
        try:
            with self.client.stream("GET", path, timeout=httpx.Timeout(30, read=None)) as response:
                if response.status_code >= 400:
                    response.read()
                    _raise_for(response)
                kind = "message"
                for line in response.iter_lines():
                    if line.startswith("event: "):
                        kind = line[7:]
                    elif line.startswith("data: "):
                        yield kind, json.loads(line[6:])
                    elif not line:
                        kind = "message"
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc


# --------------------------------------------------------------------------
# Showing jobs
# --------------------------------------------------------------------------


def _when(text: str | None) -> str:
    if not text:
        return "-"
    return datetime.fromisoformat(text).astimezone().strftime("%Y-%m-%d %H:%M:%S")


def _figures(record: dict[str, Any]) -> str:
    """``step 3/10  loss 0.5120  dev/accuracy 0.8000``."""
    parts = []
    if "step" in record:
        total = record.get("total_steps")
        parts.append(f"step {record['step']}" + (f"/{total}" if total else ""))
    for key, value in record.items():
        if key in ("step", "total_steps", "time", "attempt"):
            continue
        shown = f"{value:.4f}" if isinstance(value, float) else str(value)
        parts.append(f"{key} {shown}")
    return "  ".join(parts)


def _outcome(job: dict[str, Any]) -> str:
    if job["state"] == JobState.SUCCEEDED and job.get("result"):
        return str(job["result"]["model"])
    if job.get("error"):
        return str(job["error"])
    return _figures(job.get("progress") or {})


def _jobs_table(jobs: Sequence[dict[str, Any]]) -> None:
    table = Table(title="tuning jobs")
    for column in ("job", "state", "method", "base", "created", "result / progress"):
        table.add_column(column, overflow="fold")
    for job in jobs:
        style = {"failed": "red", "succeeded": "green"}.get(job["state"])
        table.add_row(
            job["id"],
            job["state"],
            job["method"],
            job["base"],
            _when(job["created_at"]),
            _outcome(job),
            style=style,
        )
    Console().print(table)


def _show_job(job: dict[str, Any]) -> None:
    rows = [
        ("job", job["id"]),
        ("state", job["state"]),
        ("method", job["method"]),
        ("task", job["task"]),
        ("base", job["base"]),
        ("name", job["name"]),
        ("seed", job["seed"]),
        ("params", json.dumps(job["params"])),
        ("data", json.dumps((job.get("data") or {}).get("sizes", {}))),
        ("created", _when(job["created_at"])),
        ("started", _when(job["started_at"])),
        ("finished", _when(job["finished_at"])),
        ("attempts", job["attempts"]),
        ("progress", _figures(job.get("progress") or {}) or "-"),
    ]
    if job.get("error"):
        rows.append(("error", job["error"]))
    if job.get("result"):
        rows.append(("model", job["result"]["model"]))
        rows.extend((f"score {k}", f"{v:.4f}") for k, v in job["result"]["scores"].items())
    width = max(len(key) for key, _ in rows)
    for key, value in rows:
        click.echo(f"{key:<{width}}  {value}")


def _scores_table(job: dict[str, Any]) -> None:
    result = job["result"]
    table = Table(title=result["model"], caption=f"job {job['id']}")
    table.add_column("score")
    table.add_column("value", justify="right")
    for key, value in sorted(result["scores"].items()):
        table.add_row(key, f"{value:.4f}")
    Console().print(table)


class _Bar:
    """The progress bar ``llmos tune`` shows while it waits (on stderr)."""

    def __init__(self, job_id: str) -> None:
        self.progress = Progress(
            TextColumn("[bold]{task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=Console(stderr=True),
        )
        self.task: TaskID = self.progress.add_task(f"job {job_id} queued", total=None, loss="-")
        self.job_id = job_id

    def __enter__(self) -> _Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.progress.stop()

    def update(self, kind: str, body: dict[str, Any]) -> None:
        if kind == "state":
            self.progress.update(self.task, description=f"job {self.job_id} {body['state']}")
        elif kind == "progress":
            loss = body.get("loss")
            self.progress.update(
                self.task,
                total=body.get("total_steps"),
                completed=body.get("step", 0),
                loss=f"{loss:.4f}" if isinstance(loss, int | float) else "-",
            )


# --------------------------------------------------------------------------
# The commands
# --------------------------------------------------------------------------


def tuning_commands(get_kernel: KernelGetter) -> list[click.Command]:
    """``tune`` and the ``jobs`` group, over the kernel the CLI's root options describe."""

    def jobs_at(ctx: click.Context, url: str | None, api_key_env: str) -> Jobs:
        if url:
            return HttpJobs(url, os.environ.get(api_key_env))
        return LocalJobs(get_kernel(ctx))

    def using(
        ctx: click.Context, url: str | None, api_key_env: str, action: Callable[[Jobs], T]
    ) -> T:
        """``action`` on the jobs the options name, closed after."""
        jobs = jobs_at(ctx, url, api_key_env)
        try:
            return action(jobs)
        finally:
            jobs.close()

    connection = functools.partial(shared_connection, local="this data folder")

    @click.command("tune")
    @click.option("--model", required=True, help="The base model: name, name@version, name@alias.")
    @click.option("--method", help="Tuning method (default: [tuning] default_method, lora).")
    @click.option("--task", default="text-classification", show_default=True)
    @click.option("--train", required=True, help="Train split: .jsonl, .csv or .tsv.")
    @click.option("--dev", help="Dev split (early stopping, dev scores).")
    @click.option("--test", help="Test split (test scores).")
    @click.option("--name", help="The tuned model's name (default: <base>-<method>).")
    @click.option(
        "--param",
        "params",
        multiple=True,
        metavar="KEY=VALUE",
        help="A hyper-parameter (repeat), typed as JSON where it parses: --param r=16 "
        "--param learning_rate=1e-4 (lora.r=16 means r for lora). Not --set, which "
        "sets config values.",
    )
    @click.option("--seed", type=int, help="Random seed (default: the seed param, else 0).")
    @click.option("--no-wait", is_flag=True, help="Queue the job and return its id.")
    @connection
    @json_option
    @click.pass_context
    def tune(
        ctx: click.Context,
        model: str,
        method: str | None,
        task: str,
        train: str,
        dev: str | None,
        test: str | None,
        name: str | None,
        params: tuple[str, ...],
        seed: int | None,
        no_wait: bool,
        url: str | None,
        api_key_env: str,
        as_json: bool,
    ) -> None:
        """Tune MODEL on train/dev/test data; register the result as a new model."""
        request: dict[str, Any] = {
            "model": model,
            "method": method,
            "task": task,
            "name": name,
            "params": parse_params(params),
            "seed": seed,
        }
        splits = {"train": train, "dev": dev, "test": test}
        files = {split: path for split, path in splits.items() if path is not None}
        jobs = jobs_at(ctx, url, api_key_env)
        try:
            job = jobs.submit(request, files, wait=not no_wait)
            if no_wait:
                if as_json:
                    emit_json(job)
                else:
                    where = "the daemon" if url else "a daemon on this data folder (`llmos serve`)"
                    click.echo(f"queued tuning job {job['id']}; {where} runs it")
                    click.echo(f"follow it with `llmos jobs logs {job['id']} --follow`")
                return
            job = _wait(jobs, job["id"], show_bar=not as_json)
        finally:
            jobs.close()
        if as_json:
            emit_json(job)
        if job["state"] == JobState.CANCELLED:
            raise JobConflict(f"tuning job {job['id']} was cancelled")
        if job["state"] != JobState.SUCCEEDED:
            raise TuningFailed(f"tuning job {job['id']} failed: {job['error']}")
        if not as_json:
            _scores_table(job)

    @click.group("jobs")
    def jobs_group() -> None:
        """List, follow and cancel tuning jobs."""

    @jobs_group.command("list")
    @click.option("--state", "states", multiple=True, type=click.Choice(list(JobState)))
    @click.option("--limit", type=click.IntRange(1, 1000), default=50, show_default=True)
    @connection
    @json_option
    @click.pass_context
    def list_jobs(
        ctx: click.Context,
        states: tuple[str, ...],
        limit: int,
        url: str | None,
        api_key_env: str,
        as_json: bool,
    ) -> None:
        """List tuning jobs, newest first."""
        rows = using(ctx, url, api_key_env, lambda jobs: jobs.list(states, limit))
        if as_json:
            emit_json(rows)
        elif not rows:
            click.echo("No tuning jobs.")
        else:
            _jobs_table(rows)

    @jobs_group.command("show")
    @click.argument("job_id")
    @connection
    @json_option
    @click.pass_context
    def show(
        ctx: click.Context, job_id: str, url: str | None, api_key_env: str, as_json: bool
    ) -> None:
        """Show one tuning job."""
        job = using(ctx, url, api_key_env, lambda jobs: jobs.get(job_id))
        if as_json:
            emit_json(job)
        else:
            _show_job(job)

    @jobs_group.command("logs")
    @click.argument("job_id")
    @click.option("--follow", "-f", is_flag=True, help="Keep printing until the job ends.")
    @connection
    @click.option("--json", "as_json", is_flag=True, help="One JSON record a line.")
    @click.pass_context
    def logs(
        ctx: click.Context,
        job_id: str,
        follow: bool,
        url: str | None,
        api_key_env: str,
        as_json: bool,
    ) -> None:
        """Print a job's progress records (step, loss, scores …)."""

        def show(record: dict[str, Any]) -> None:
            if as_json:
                click.echo(json.dumps(record))
            else:
                stamp = datetime.fromtimestamp(record.get("time", 0)).strftime("%H:%M:%S")
                click.echo(f"{stamp}  {_figures(record)}")

        def print_logs(jobs: Jobs) -> None:
            if not follow:
                for record in jobs.logs(job_id):
                    show(record)
                return
            for kind, body in jobs.follow(job_id):
                if kind == "progress":
                    show(body)
                elif kind == "state" and body["state"] in _ENDED and not as_json:
                    click.echo(f"job {job_id} {body['state']}: {_outcome(body)}")

        using(ctx, url, api_key_env, print_logs)

    @jobs_group.command("cancel")
    @click.argument("job_id")
    @connection
    @json_option
    @click.pass_context
    def cancel(
        ctx: click.Context, job_id: str, url: str | None, api_key_env: str, as_json: bool
    ) -> None:
        """Cancel a tuning job (a running one stops within [tuning] cancel_grace_s)."""
        job = using(ctx, url, api_key_env, lambda jobs: jobs.cancel(job_id))
        if as_json:
            emit_json(job)
        elif job["state"] == JobState.CANCELLED:
            click.echo(f"cancelled job {job_id}")
        else:
            click.echo(f"asked job {job_id} to stop; `llmos jobs show {job_id}` shows when it has")

    return [tune, jobs_group]


def _wait(jobs: Jobs, job_id: str, *, show_bar: bool) -> dict[str, Any]:
    """Follow the job to its end; Ctrl-C cancels it (a second one stops waiting)."""
    bar = _Bar(job_id) if show_bar else None
    with contextlib.ExitStack() as stack:
        if bar is not None:
            stack.enter_context(bar)
        try:
            job = _follow_to_end(jobs, job_id, bar)
        except KeyboardInterrupt:
            click.echo(f"cancelling tuning job {job_id} …", err=True)
            jobs.cancel(job_id)
            job = _follow_to_end(jobs, job_id, bar)
    if job is None or job["state"] not in _ENDED:
        raise LlmosError(
            f"the daemon stopped before tuning job {job_id} ended; it resumes when the daemon"
            f" restarts: follow it with `llmos jobs logs {job_id} --follow`"
        )
    return job


def _follow_to_end(jobs: Jobs, job_id: str, bar: _Bar | None) -> dict[str, Any] | None:
    """The job's last state once it has ended (or once the stream stops)."""
    last = None
    for kind, body in jobs.follow(job_id):
        if bar is not None:
            bar.update(kind, body)
        if kind == "state":
            last = body
            if body["state"] in _ENDED:
                break
    return last
