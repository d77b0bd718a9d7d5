"""Tuning over HTTP: ``/api/tuning``, and the seed document's ``POST /microtune``.

* ``POST /api/tuning/jobs`` — submit a job (202 with the job);
* ``GET /api/tuning/jobs`` — list jobs, newest first (``?state=`` filters);
* ``GET /api/tuning/jobs/{id}`` — one job;
* ``GET /api/tuning/jobs/{id}/logs`` — every progress record so far;
* ``GET /api/tuning/jobs/{id}/events`` — server-sent events: ``state`` (the
  job, on each change), ``progress`` (each figure the method reports, from
  the first on), ending with the ``state`` event of the final state;
* ``DELETE /api/tuning/jobs/{id}`` — cancel;
* ``GET /api/tuning/methods`` — the installed tuning methods;
* ``POST /microtune`` — submit and, by default, wait: ``{"message": "Model
  microtuned successfully", "model": "name@version", "scores": {...},
  "job": id}``; a job that fails is an error response carrying the job's
  error, never a success.

Data comes inline (``{"train": [{"text": ..., "label": ...}], "dev": ...}``)
or as absolute paths of files on the daemon's machine, which must lie under
the data folder or a folder of ``[registry] allowed_roots``, like model
sources. Hyper-parameters are checked by the method when the job is
submitted: a bad one is a 400 whose ``param`` is ``params.<name>``; a full
queue (``[tuning] max_queued_jobs``) is a 429 with ``Retry-After``.
Handlers that touch SQLite or files run in the thread pool; the waiting ones
(``/microtune``, the event stream) poll the job store, so they follow a job
whichever process runs it.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from llmos.errors import LlmosError, Unavailable, UsageError
from llmos.registry.sources import check_client_path, check_source, is_path
from llmos.runtime.kernel import Kernel
from llmos.tuning.data import SPLITS
from llmos.tuning.jobs import (
    TICK_S,
    Job,
    JobConflict,
    JobFollower,
    JobState,
    TuningFailed,
)
from llmos.tuning.worker import plain

__all__ = ["tuning_router"]

PREFIX = "/api/tuning"
#: ``created_by`` of the jobs the HTTP API submits
CREATED_BY = "api"
#: a comment line on an idle event stream this often keeps proxies from closing it
KEEP_ALIVE_S = 15.0

_TAGS = ["tuning"]
_SEED_TAGS = ["tuning (seed API)"]

#: a split: its rows, or the path of a file on the daemon's machine
Split = list[dict[str, Any]] | str


class _Body(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class DataIn(_Body):
    train: Split = Field(
        description="Rows ({text, label} …) or an absolute file path under an allowed root"
    )
    dev: Split | None = None
    test: Split | None = None


class JobIn(_Body):
    """A tuning job."""

    model: str = Field(description="The base model: name, name@version or name@alias")
    method: str | None = Field(None, description="Default: [tuning] default_method (lora)")
    task: str = "text-classification"
    data: DataIn
    name: str | None = Field(None, description="The tuned model's name; default <base>-<method>")
    params: dict[str, Any] = Field(default_factory=dict, description="Hyper-parameters")
    seed: int | None = None


class MicrotuneIn(_Body):
    """The seed document's tuning call."""

    model_config = ConfigDict(protected_namespaces=())

    model_name: str
    task: str = "text classification"
    data: DataIn
    method: str | None = None
    wait: bool = Field(True, description="Answer when the job ends (else 202 at once)")
    name: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)
    seed: int | None = None


def tuning_router(kernel: Kernel) -> APIRouter:
    """The tuning routes over ``kernel.jobs`` (the daemon's app makes its
    kernel adopt the data folder's job queue: see ``create_app``)."""
    router = APIRouter()

    def split_data(data: DataIn) -> tuple[dict[str, Any], dict[str, Any]]:
        """``(files, inline)``: paths checked against the source policy."""
        files: dict[str, Any] = {}
        inline: dict[str, Any] = {}
        for split in SPLITS:
            value = getattr(data, split)
            if isinstance(value, str):
                # No "~" (whose home? a "~user" made a 500), no path relative to
                # wherever the daemon runs, no URL (looked up in DNS for nothing).
                check_client_path(value, kernel.registry.policy, param=f"data.{split}")
                if not (value.startswith("pkg://") or is_path(value)):
                    raise UsageError(
                        f"data.{split}: {value[:200]!r} is a URL, which is not read here;"
                        " give rows, or the absolute path of a file under the data folder or"
                        " [registry] allowed_roots",
                        param=f"data.{split}",
                    )
                try:
                    parsed = check_source(value, kernel.registry.policy)
                except LlmosError as exc:
                    raise UsageError(
                        f"data.{split}: {exc.message}", param=f"data.{split}"
                    ) from None
                if parsed.path is None:
                    raise UsageError(
                        f"data.{split}: give rows, or the path of a file under the data folder"
                        " or [registry] allowed_roots",
                        param=f"data.{split}",
                    )
                files[split] = parsed.path
            elif value is not None:
                inline[split] = value
        return files, inline

    def submit(body: JobIn | MicrotuneIn, model: str) -> Job:
        files, inline = split_data(body.data)
        return kernel.jobs.submit(
            model=model,
            task=body.task,
            method=body.method,
            files=files,
            inline=inline or None,
            name=body.name,
            params=body.params,
            seed=body.seed,
            created_by=CREATED_BY,
        )

    # ------------------------------------------------------------------ jobs

    @router.post(PREFIX + "/jobs", status_code=202, tags=_TAGS, summary="Submit a tuning job")
    def create(body: JobIn) -> JSONResponse:
        job = submit(body, body.model)
        return JSONResponse(
            {"job": job.to_dict()},
            status_code=202,
            headers={"Location": f"{PREFIX}/jobs/{job.id}"},
        )

    @router.get(PREFIX + "/jobs", tags=_TAGS, summary="List tuning jobs, newest first")
    def list_jobs(
        state: Annotated[list[str] | None, Query(description="Only jobs in these states")] = None,
        limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    ) -> dict[str, Any]:
        return {"jobs": [job.to_dict() for job in kernel.jobs.list(state or (), limit)]}

    @router.get(PREFIX + "/methods", tags=_TAGS, summary="List the installed tuning methods")
    def methods() -> dict[str, Any]:
        return {
            "methods": [
                {
                    "name": name,
                    "plugin": registered.plugin,
                    "description": registered.spec.description,
                    "tasks": list(registered.spec.tasks),
                    "defaults": plain(dict(registered.spec.defaults)),
                }
                for name, registered in sorted(kernel.load_plugins().tuning_methods.items())
            ]
        }

    @router.get(PREFIX + "/jobs/{job_id}", tags=_TAGS, summary="Show a tuning job")
    def show(job_id: str) -> dict[str, Any]:
        return {"job": kernel.jobs.get(job_id).to_dict()}

    @router.get(PREFIX + "/jobs/{job_id}/logs", tags=_TAGS, summary="A job's progress records")
    def logs(job_id: str) -> dict[str, Any]:
        return {"job": job_id, "records": kernel.jobs.logs(job_id)}

    @router.delete(PREFIX + "/jobs/{job_id}", tags=_TAGS, summary="Cancel a tuning job")
    def cancel(job_id: str) -> dict[str, Any]:
        return {"job": kernel.jobs.cancel(job_id).to_dict()}

    @router.get(
        PREFIX + "/jobs/{job_id}/events",
        tags=_TAGS,
        summary="Follow a job: server-sent progress and state events",
        response_class=StreamingResponse,
    )
    async def events(job_id: str, request: Request) -> StreamingResponse:
        follower = await run_in_threadpool(JobFollower, kernel.jobs, job_id)
        daemon = request.app.state.daemon

        async def stream() -> AsyncIterator[str]:
            quiet_since = time.monotonic()
            while True:
                records, job = await run_in_threadpool(follower.poll)
                out = [_event("progress", record) for record in records]
                if job is not None:
                    out.append(_event("state", job.to_dict()))
                for item in out:
                    yield item
                if job is not None and job.done:
                    return
                reason = daemon.unavailable_reason()
                if reason is not None:
                    yield _event("end", {"reason": reason})
                    return
                if out:
                    quiet_since = time.monotonic()
                elif time.monotonic() - quiet_since > KEEP_ALIVE_S:
                    quiet_since = time.monotonic()
                    yield ": keep-alive\n\n"
                await asyncio.sleep(TICK_S)

        return StreamingResponse(
            stream(),
            media_type="text/event-stream",
            headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
        )

    # ------------------------------------------------------------- the seed

    @router.post("/microtune", tags=_SEED_TAGS, summary="Tune a model on inline data")
    async def microtune(body: MicrotuneIn, request: Request) -> JSONResponse:
        job = await run_in_threadpool(submit, body, body.model_name)
        if not body.wait:
            return JSONResponse(
                {"message": "Microtuning started", "job": job.id},
                status_code=202,
                headers={"Location": f"{PREFIX}/jobs/{job.id}"},
            )
        daemon = request.app.state.daemon
        while not job.done:
            if daemon.unavailable_reason() is not None:
                raise Unavailable(
                    f"llmos is shutting down; tuning job {job.id} resumes when it restarts"
                    f" (GET {PREFIX}/jobs/{job.id})"
                )
            await asyncio.sleep(TICK_S)
            job = await run_in_threadpool(kernel.jobs.get, job.id)
        if job.state is JobState.SUCCEEDED and job.result is not None:
            return JSONResponse(
                {
                    "message": "Model microtuned successfully",
                    "model": job.result["model"],
                    "scores": job.result["scores"],
                    "job": job.id,
                }
            )
        if job.state is JobState.CANCELLED:
            raise JobConflict(f"microtuning job {job.id} was cancelled")
        raise TuningFailed(f"microtuning job {job.id} failed: {job.error}")

    return router


def _event(kind: str, data: Any) -> str:
    return f"event: {kind}\ndata: {json.dumps(data, ensure_ascii=False, default=str)}\n\n"
