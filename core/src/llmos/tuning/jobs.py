"""Tuning jobs: a queue in SQLite, each job run in a worker process.

:class:`JobManager` (``kernel.jobs``) takes a job — a base model, a tuning
method, a task, train/dev/test data, hyper-parameters, a seed — checks it,
stores it in ``home/jobs.db`` and runs it when a slot is free
(``[tuning] max_concurrent_jobs``). A job's life::

    queued → running → succeeded | failed | cancelled

and back from ``running`` to ``queued`` when the kernel that ran it stops or
dies: a kernel that adopts jobs (the daemon's) runs it again, and the method
resumes from the checkpoints it left in the job's folder. When a job ends,
the folders the method worked in are removed; its records stay.

Each job has a folder, ``home/jobs/<id>/``:

* ``data.json`` — the splits, when they came inline (files are read again
  by the worker, and their hashes checked);
* ``output/`` — where the method writes its artifact, stored on success in
  the artifact store (``[artifacts] root``: ``home/artifacts/<new name>/<sha256>/``
  by default, :mod:`llmos.registry.fsstore`) and registered as a new model
  whose parent is the base;
* ``checkpoints/`` — the method's own, for resuming (and any other scratch
  folder the method makes there);
* ``progress.jsonl`` — every figure the method reported, a line each;
* ``worker.log`` — the worker process's output;
* ``owner.lock`` and ``worker.lock`` — held by the kernel running the job
  and by its worker process. The operating system drops a lock when its
  holder dies (SIGKILL included), so a job that is ``running`` with both
  locks free has lost its kernel, and is queued again.

Several processes may share one data folder (a daemon, ``llmos tune``,
``llmos jobs``): claiming a job is one conditional update, so a job runs
once; a cancel written by one process reaches the worker of another within
a tick of its scheduler.
"""

from __future__ import annotations

import enum
import json
import os
import shutil
import socket
import sqlite3
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import attrs
import structlog

from llmos import db
from llmos.config import Config, Field, Section
from llmos.errors import (
    ConfigError,
    LlmosError,
    NotFoundError,
    Overloaded,
    PluginError,
    Unavailable,
    UsageError,
)
from llmos.registry.fsstore import store_of
from llmos.registry.sources import check_source
from llmos.registry.weights import pickle_reason, read_safetensors_header
from llmos.tuning.data import DEFAULT_MAX_DATA_BYTES, SPLITS, load_splits
from llmos.tuning.worker import (
    WorkerPayload,
    describe_exit,
    methods_hint,
    start_worker,
    try_lock,
)
from llmos.types import (
    JobHandle,
    ModelCard,
    MonitorEvent,
    TuningMethodSpec,
    validate_model_name,
)

if TYPE_CHECKING:
    from llmos.plugin.manager import PluginManager, Registered
    from llmos.registry.service import Registry

__all__ = [
    "DATABASE",
    "MIGRATIONS",
    "BaseModelUnavailable",
    "Job",
    "JobConflict",
    "JobFollower",
    "JobManager",
    "JobQueueFull",
    "JobState",
    "JobStore",
    "TuningFailed",
    "check_artifact",
    "normalise_task",
]

log = structlog.get_logger("llmos.tuning")

#: the executor that is this machine's own worker processes
LOCAL = "local"
#: how the manager starts a job's worker on a named executor (``[tuning] executor``)
StartJob = Callable[[str, WorkerPayload], JobHandle]

#: the [tuning] config section (the kernel passes it to load_config)
SECTION = Section(
    "tuning",
    {
        "max_concurrent_jobs": Field(
            "int",
            1,
            "Tuning jobs one kernel runs at once; the others wait, queued.",
            min=1,
        ),
        "cancel_grace_s": Field(
            "float",
            10.0,
            "How long a cancelled (or interrupted) job's worker may take to stop"
            " before it is terminated.",
            expect="a number of seconds",
            min=0,
        ),
        "default_method": Field(
            "str", "lora", "The method `llmos tune` and POST /microtune use when none is named."
        ),
        "max_queued_jobs": Field(
            "int",
            16,
            "Tuning jobs that may be unfinished (queued or running) at once, every process"
            " on the data folder together; a submission beyond it is refused (HTTP 429) until"
            " one ends or is cancelled.",
            min=1,
        ),
        "max_data_bytes": Field(
            "int",
            DEFAULT_MAX_DATA_BYTES,
            "The most bytes a job's data files may hold together (they are read when the job"
            " is submitted, and again by its worker).",
            min=1,
        ),
        "executor": Field(
            "str",
            LOCAL,
            "Where job workers run: local (a process of this machine) or an executor a"
            " plugin registers that runs jobs (a cluster's node, chosen by its resources;"
            " the data folder's jobs/ must then be on storage every node shares).",
        ),
    },
    doc="Tuning jobs: how many run at once and may wait, how big their data may be, how they stop.",
)

#: ``Retry-After`` when the queue is full: a tuning job takes minutes, not seconds
QUEUE_FULL_RETRY_S = 60

#: the job database inside the data folder
DATABASE = "jobs.db"
#: the largest seed: SQLite's largest integer
MAX_SEED = 2**63 - 1
#: the scheduler's tick: how soon a free slot, a cancel from another
#: process or a new job from another process is noticed
TICK_S = 0.25
#: how often a kernel looks for jobs whose kernel died
SWEEP_S = 2.0
#: after the grace period, SIGTERM; this much later, SIGKILL
KILL_AFTER_S = 5.0
#: progress is written to the database at most this often (every figure
#: still goes to progress.jsonl and to the monitor sinks)
PROGRESS_WRITE_S = 0.5


class JobState(enum.StrEnum):
    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELLED = "cancelled"


TERMINAL = frozenset({JobState.SUCCEEDED, JobState.FAILED, JobState.CANCELLED})


class TuningFailed(LlmosError):
    """A tuning job ended failed; the message carries the job's error."""

    type = "tuning_failed"
    status = 500
    exit_code = 1


class JobConflict(LlmosError):
    """The job is not in a state that allows the request (cancelling a job
    that has finished, waiting on one that was cancelled)."""

    type = "conflict"
    status = 409
    exit_code = 1


class JobQueueFull(Overloaded):
    """``[tuning] max_queued_jobs`` jobs are unfinished already; retry when
    one has ended (or cancel one)."""

    type = "tuning_queue_full"


class BaseModelUnavailable(UsageError):
    """The base model's weights cannot be read on this machine (a remote
    source, a missing folder); the message names the source and why."""

    type = "model_unavailable"
    status = 422


def _iso(seconds: float | None) -> str | None:
    return None if seconds is None else datetime.fromtimestamp(seconds, UTC).isoformat()


@attrs.frozen(kw_only=True)
class Job:
    """One tuning job as stored. Times are seconds since the epoch."""

    id: str
    state: JobState = attrs.field(converter=JobState)
    method: str
    task: str
    #: the base model, ``name@version`` (fixed when the job is submitted)
    base: str
    #: the name the tuned model is registered under
    name: str
    #: the effective hyper-parameters: the method's defaults and the job's own
    params: Mapping[str, Any] = attrs.field(factory=dict)
    #: what the data was: labels, sizes, hashes and sources per split, and
    #: ``file`` (``data.json``) when the rows are stored with the job
    data: Mapping[str, Any] = attrs.field(factory=dict)
    seed: int = 0
    created_at: float
    started_at: float | None = None
    finished_at: float | None = None
    #: the latest figures reported (merged: a dev score stays beside later losses)
    progress: Mapping[str, Any] = attrs.field(factory=dict)
    error: str | None = None
    #: on success: ``model`` (the new ``name@version``), ``scores``, ``source``
    #: and ``usage`` (the worker's ``peak_rss_bytes`` and ``cpu_seconds``)
    result: Mapping[str, Any] | None = None
    #: how many times a worker was started for it (more than one: resumed)
    attempts: int = 0
    cancel_requested: bool = False
    #: ``host:pid`` of the kernel running it
    owner: str | None = None
    created_by: str | None = None

    @property
    def done(self) -> bool:
        return self.state in TERMINAL

    def to_dict(self) -> dict[str, Any]:
        out = attrs.asdict(self, recurse=False)
        out["state"] = str(self.state)
        for key in ("created_at", "started_at", "finished_at"):
            out[key] = _iso(out[key])
        out["params"] = dict(self.params)
        out["data"] = dict(self.data)
        out["progress"] = dict(self.progress)
        out["result"] = None if self.result is None else dict(self.result)
        return out


# --------------------------------------------------------------------------
# The store
# --------------------------------------------------------------------------


def _migration_1(conn: sqlite3.Connection) -> None:
    conn.execute(
        """CREATE TABLE jobs (
            id TEXT PRIMARY KEY,
            state TEXT NOT NULL
                CHECK (state IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
            method TEXT NOT NULL,
            task TEXT NOT NULL,
            base TEXT NOT NULL,
            name TEXT NOT NULL,
            params TEXT NOT NULL,
            data TEXT NOT NULL,
            seed INTEGER NOT NULL,
            created_at REAL NOT NULL,
            started_at REAL,
            finished_at REAL,
            progress TEXT NOT NULL DEFAULT '{}',
            error TEXT,
            result TEXT,
            attempts INTEGER NOT NULL DEFAULT 0,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            created_by TEXT
        ) WITHOUT ROWID"""
    )
    conn.execute("CREATE INDEX jobs_by_state ON jobs (state, created_at)")
    conn.execute("CREATE INDEX jobs_by_created ON jobs (created_at)")


#: schema migrations, applied in order; append, never edit or reorder
MIGRATIONS = [_migration_1]

_COLUMNS = tuple(a.name for a in attrs.fields(Job))
_JSON_COLUMNS = frozenset({"params", "data", "progress", "result"})


def _json(value: Any) -> str | None:
    return None if value is None else json.dumps(value, ensure_ascii=False, default=str)


def _job(row: Sequence[Any]) -> Job:
    values = dict(zip(_COLUMNS, row, strict=True))
    for key in _JSON_COLUMNS:
        if values[key] is not None:
            values[key] = json.loads(values[key])
    values["cancel_requested"] = bool(values["cancel_requested"])
    return Job(**values)


class JobStore:
    """The jobs table in one SQLite file (WAL), shared by every process that
    uses the data folder. One connection, guarded by a lock: job traffic is
    a few statements a second."""

    def __init__(self, path: str | os.PathLike[str], *, busy_timeout: float = 30.0) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.busy_timeout = busy_timeout
        self._what = f"job database {self.path}"
        self._lock = threading.Lock()
        self._conn = db.connect(self.path, what=self._what, busy_timeout=busy_timeout)
        try:
            with self._lock:
                db.migrate(self._conn, MIGRATIONS, what=self._what, timeout=busy_timeout)
        except BaseException:
            self._conn.close()
            raise

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        with self._lock, db.write(self._conn, what=self._what, timeout=self.busy_timeout) as c:
            yield c

    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[Job]:
        with self._lock:
            rows = self._conn.execute(sql, params).fetchall()
        return [_job(row) for row in rows]

    # -- reading ------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        rows = self._rows(f"SELECT {', '.join(_COLUMNS)} FROM jobs WHERE id = ?", (job_id,))
        if not rows:
            raise NotFoundError(f"no tuning job {job_id!r}; `llmos jobs list` lists them")
        return rows[0]

    def list(self, states: Sequence[str] = (), limit: int = 100) -> list[Job]:
        """Jobs, newest first; only those in ``states`` when given."""
        where = f"WHERE state IN ({', '.join('?' * len(states))})" if states else ""
        return self._rows(
            f"SELECT {', '.join(_COLUMNS)} FROM jobs {where} ORDER BY created_at DESC, id LIMIT ?",
            (*states, limit),
        )

    def queued(self) -> list[str]:
        """Ids of queued jobs, oldest first."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT id FROM jobs WHERE state = 'queued' ORDER BY created_at, id"
            ).fetchall()
        return [row[0] for row in rows]

    def running(self) -> list[Job]:
        return self.list([JobState.RUNNING], limit=10_000)

    # -- writing ------------------------------------------------------------

    def unfinished(self) -> int:
        """How many jobs are queued or running."""
        with self._lock:
            row = self._conn.execute(
                "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
            ).fetchone()
        return int(row[0])

    def insert(self, job: Job, *, max_unfinished: int | None = None) -> None:
        """Store a new job; with ``max_unfinished``, only while fewer jobs than
        that are queued or running (counted and inserted in one transaction,
        so submissions racing from several processes cannot pass it).

        :raises JobQueueFull: the cap is reached.
        """
        values = [
            _json(getattr(job, key)) if key in _JSON_COLUMNS else getattr(job, key)
            for key in _COLUMNS
        ]
        values[_COLUMNS.index("state")] = str(job.state)
        marks = ", ".join("?" * len(_COLUMNS))
        with self._write() as c:
            if max_unfinished is not None:
                count = c.execute(
                    "SELECT count(*) FROM jobs WHERE state IN ('queued', 'running')"
                ).fetchone()[0]
                if count >= max_unfinished:
                    raise _queue_full(count, max_unfinished)
            c.execute(f"INSERT INTO jobs ({', '.join(_COLUMNS)}) VALUES ({marks})", values)

    def claim(self, job_id: str, owner: str) -> Job | None:
        """Mark a queued job running for ``owner``; ``None`` if it is not queued
        (another kernel took it, or it was cancelled)."""
        with self._write() as c:
            changed = c.execute(
                "UPDATE jobs SET state = 'running', owner = ?, started_at = ?,"
                " attempts = attempts + 1 WHERE id = ? AND state = 'queued'",
                (owner, time.time(), job_id),
            ).rowcount
        return self.get(job_id) if changed else None

    def set_progress(self, job_id: str, progress: Mapping[str, Any]) -> None:
        with self._write() as c:
            c.execute("UPDATE jobs SET progress = ? WHERE id = ?", (_json(progress), job_id))

    def finish(
        self,
        job_id: str,
        state: JobState,
        *,
        error: str | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> bool:
        """End a job that has not ended; ``False`` if it already had."""
        with self._write() as c:
            changed = c.execute(
                "UPDATE jobs SET state = ?, error = ?, result = ?, finished_at = ?"
                " WHERE id = ? AND state IN ('queued', 'running')",
                (str(state), error, _json(result), time.time(), job_id),
            ).rowcount
        return bool(changed)

    def requeue(self, job_id: str) -> bool:
        """Put a running job back in the queue (its kernel stopped or died)."""
        with self._write() as c:
            changed = c.execute(
                "UPDATE jobs SET state = 'queued', owner = NULL WHERE id = ? AND state = 'running'",
                (job_id,),
            ).rowcount
        return bool(changed)

    def request_cancel(self, job_id: str) -> Job:
        """Cancel a queued job now; flag a running one for its kernel to stop.

        :raises JobConflict: the job has already ended.
        """
        with self._write() as c:
            row = c.execute("SELECT state FROM jobs WHERE id = ?", (job_id,)).fetchone()
            if row is None:
                raise NotFoundError(f"no tuning job {job_id!r}; `llmos jobs list` lists them")
            if row[0] == JobState.QUEUED:
                c.execute(
                    "UPDATE jobs SET state = 'cancelled', cancel_requested = 1, finished_at = ?"
                    " WHERE id = ?",
                    (time.time(), job_id),
                )
            elif row[0] == JobState.RUNNING:
                c.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                raise JobConflict(f"tuning job {job_id} has already {row[0]}; nothing to cancel")
        return self.get(job_id)

    def cancel_flags(self, job_ids: Sequence[str]) -> set[str]:
        """Which of ``job_ids`` have a cancel requested."""
        if not job_ids:
            return set()
        with self._lock:
            rows = self._conn.execute(
                f"SELECT id FROM jobs WHERE cancel_requested = 1 AND id IN"
                f" ({', '.join('?' * len(job_ids))})",
                tuple(job_ids),
            ).fetchall()
        return {row[0] for row in rows}


# --------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------


def normalise_task(task: str) -> str:
    """``"text classification"``, ``"Text_Classification"`` → ``"text-classification"``."""
    if not isinstance(task, str) or not task.strip():
        raise UsageError("no task given; e.g. text-classification", param="task")
    return "-".join(task.strip().lower().replace("_", " ").replace("-", " ").split())


def _params(params: Mapping[str, Any] | None, method: str) -> dict[str, Any]:
    """The job's hyper-parameters; ``<method>.r`` is taken as ``r``."""
    if params is None:
        return {}
    if not isinstance(params, Mapping):
        raise UsageError("params must be an object of hyper-parameters", param="params")
    prefix = method + "."
    return {(k[len(prefix) :] if k.startswith(prefix) else k): v for k, v in params.items()}


def _check_params(
    registered: Registered[TuningMethodSpec], task: str, hyper: Mapping[str, Any]
) -> None:
    """The method's own check of the hyper-parameters, at submission.

    A :class:`UsageError` (a typo, a value out of range) refuses the job; any
    other exception is the plugin's bug and says which plugin to report it to.
    """
    check = registered.spec.check
    if check is None:
        return
    try:
        check(task, dict(hyper))
    except LlmosError as exc:
        if exc.param is not None and exc.param.partition("[")[0] in hyper:
            # where it is in the request body: {"params": {"r": -1}}
            exc.param = f"params.{exc.param}"
        raise
    except Exception as exc:  # a plugin's bug must not pass for a bad request
        raise PluginError(
            f"tuning method {registered.spec.name!r} (plugin {registered.plugin}) failed"
            f" while checking the hyper-parameters: {type(exc).__name__}: {exc}"
        ) from exc


def _queue_full(count: int, cap: int) -> JobQueueFull:
    return JobQueueFull(
        f"the tuning queue is full: {count} jobs are queued or running and"
        f" [tuning] max_queued_jobs is {cap}; retry when one has ended, cancel one"
        " (`llmos jobs cancel JOB`, DELETE /api/tuning/jobs/{id}), or raise the setting",
        retry_after=QUEUE_FULL_RETRY_S,
    )


def check_seed(seed: Any) -> int:
    """A job's seed: an integer SQLite can store and every generator takes."""
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed <= MAX_SEED:
        raise UsageError(
            f"seed must be an integer between 0 and {MAX_SEED} (2^63 - 1), got {seed!r}",
            param="seed",
        )
    return seed


def check_artifact(folder: Path, allow_pickle: bool) -> None:
    """The method's output must be weights llmos can load safely: at least
    one valid safetensors file, no pickles, no links."""
    if not folder.is_dir():
        raise LlmosError(f"the tuning method wrote no artifact ({folder} does not exist)")
    found = False
    for path in sorted(folder.rglob("*")):
        shown = path.relative_to(folder)
        if path.is_symlink():
            raise LlmosError(f"the artifact holds a link, {shown}; links are not kept")
        if not path.is_file():
            continue
        if path.suffix == ".safetensors":
            read_safetensors_header(path, label=str(shown))
            found = True
        elif not allow_pickle and (why := pickle_reason(path)) is not None:
            raise LlmosError(
                f"the artifact holds {shown}, a pickle ({why}); tuning methods must write"
                " safetensors"
            )
    if not found:
        raise LlmosError(f"the tuning method wrote no .safetensors file into {folder}")


# --------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------


@attrs.define(eq=False)
class _Run:
    """A job this kernel runs: its worker and what the worker sent."""

    job: Job
    handle: JobHandle
    lock: IO[bytes]
    log: IO[str]
    thread: threading.Thread | None = None
    #: when the worker was asked to stop (cancel or kernel stop)
    stop_at: float | None = None
    #: asked to stop because the kernel stops: queue the job again
    interrupted: bool = False
    latest: dict[str, Any] = attrs.Factory(dict)
    written_at: float = 0.0
    result: Mapping[str, Any] | None = None
    error: str | None = None


class JobManager:
    """Tuning jobs of one kernel: submit, list, cancel, follow; runs them in
    worker processes, at most ``[tuning] max_concurrent_jobs`` at once.

    A kernel runs the jobs submitted to it. With ``adopt`` set — the daemon
    sets it (:mod:`llmos.server.tuning_api`), an embedding application may —
    it also runs the jobs other processes queued in the data folder, and
    takes over jobs whose kernel died, resuming them from their checkpoints;
    :meth:`Kernel.start <llmos.runtime.kernel.Kernel.start>` then starts the
    scheduler at once. A short-lived kernel (``llmos chat``, ``llmos tune``)
    must not adopt: it would start other jobs only to interrupt them when it
    exits.
    """

    def __init__(
        self,
        config: Config,
        registry: Callable[[], Registry],
        plugins: Callable[[], PluginManager],
        emit: Callable[[MonitorEvent], None],
        start_job: StartJob | None = None,
    ) -> None:
        """``config`` gives ``[tuning]``, the data folder (the job queue and
        its folders) and the plugin settings a worker process loads with;
        ``registry`` stores tuned models (opened on first use); ``plugins``
        has the tuning methods (loaded on first use); ``emit`` reports jobs;
        ``start_job`` starts a worker on a named executor (without it, only
        ``local``: a process here)."""
        self._config = config
        self._registry = registry
        self._plugins = plugins
        self._emit = emit
        self._start_job = start_job
        section = config.section("tuning")
        #: where job workers run
        self.executor = str(section.get("executor", LOCAL))
        self.max_concurrent = int(section.get("max_concurrent_jobs", 1))
        self.grace = float(section.get("cancel_grace_s", 10.0))
        self.default_method = str(section.get("default_method", "lora"))
        self.max_queued = int(section.get("max_queued_jobs", 16))
        self.max_data_bytes = int(section.get("max_data_bytes", DEFAULT_MAX_DATA_BYTES))
        self.root = config.home / "jobs"
        self._store: JobStore | None = None
        self._store_lock = threading.Lock()
        self.adopt = False
        self.owner = f"{socket.gethostname()}:{os.getpid()}"
        self._own: set[str] = set()
        self._runs: dict[str, _Run] = {}
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._last_sweep = -SWEEP_S

    @property
    def store(self) -> JobStore:
        """The job database (opened on first use)."""
        with self._store_lock:
            if self._store is None:
                self._config.home.mkdir(parents=True, exist_ok=True, mode=0o700)
                self._store = JobStore(self._config.home / DATABASE)
            return self._store

    def folder(self, job_id: str) -> Path:
        return self.root / job_id

    # -- asking -------------------------------------------------------------

    def get(self, job_id: str) -> Job:
        return self.store.get(job_id)

    def list(self, states: Sequence[str] = (), limit: int = 100) -> list[Job]:
        bad = sorted(set(states) - set(JobState))
        if bad:
            raise UsageError(
                f"unknown job state(s) {', '.join(bad)}; use {', '.join(JobState)}", param="state"
            )
        return self.store.list(states, limit)

    def logs(self, job_id: str) -> list[dict[str, Any]]:
        """Every progress record of the job so far."""
        follower = JobFollower(self, job_id)
        return follower.read()

    def follow(self, job_id: str, interval: float = TICK_S) -> Iterator[tuple[str, dict[str, Any]]]:
        """``("state", job dict)`` and ``("progress", record)`` as they come,
        from the first record on, until the job ends (its state is last)."""
        follower = JobFollower(self, job_id)
        while True:
            records, job = follower.poll()
            for record in records:
                yield "progress", record
            if job is not None:
                yield "state", job.to_dict()
                if job.done:
                    return
            time.sleep(interval)

    # -- submitting ---------------------------------------------------------

    def submit(
        self,
        *,
        model: str,
        task: str = "text-classification",
        method: str | None = None,
        files: Mapping[str, str | os.PathLike[str]] | None = None,
        inline: Mapping[str, Any] | None = None,
        name: str | None = None,
        params: Mapping[str, Any] | None = None,
        seed: int | None = None,
        created_by: str | None = None,
        run: bool = True,
    ) -> Job:
        """Check a job and queue it; return it (state ``queued``).

        The data is read and checked now (a bad row fails the submission,
        not the job). ``files`` maps splits to files; ``inline`` maps splits
        to rows; ``train`` is required. ``run=False`` only queues it: a
        kernel that adopts jobs (a daemon) runs it.
        """
        if run and self._stopping.is_set():
            raise Unavailable("llmos is stopping and takes no new tuning jobs")
        plugins = self._plugins()
        method = method or self.default_method
        registered = plugins.tuning_methods.get(method)
        if registered is None:
            raise UsageError(
                f"tuning method {method!r} is not installed; {methods_hint(plugins)}",
                param="method",
            )
        spec = registered.spec
        task = normalise_task(task)
        if spec.tasks and task not in spec.tasks:
            raise UsageError(
                f"tuning method {method!r} does not do {task!r}; it does {', '.join(spec.tasks)}",
                param="task",
            )
        # The cheap checks first, so a bad value is refused before any data is read.
        hyper = {**spec.defaults, **_params(params, method)}
        # The seed travels as TuningRequest.seed, not as a hyper-parameter
        # (methods check their hyper-parameters' names); a "seed" param is
        # taken for it when no seed is given.
        param_seed = hyper.pop("seed", 0)
        seed = check_seed(param_seed if seed is None else seed)
        _check_params(registered, task, hyper)
        if (count := self.store.unfinished()) >= self.max_queued:
            raise _queue_full(count, self.max_queued)
        base, _ = self._base(model)
        new_name = validate_model_name(name or f"{base.name}-{method}")
        files = dict(files or {})
        unknown = sorted(set(files) - set(SPLITS))
        if unknown:
            raise UsageError(f"unknown split(s) {', '.join(unknown)}; use {', '.join(SPLITS)}")
        dataset = load_splits(**files, inline=inline, task=task, max_file_bytes=self.max_data_bytes)

        job_id = uuid.uuid4().hex[:12]
        folder = self.folder(job_id)
        folder.mkdir(parents=True, mode=0o700)
        data = dataset.summary()
        if inline:
            (folder / "data.json").write_text(json.dumps(dataset.to_dict(), ensure_ascii=False))
            data["file"] = "data.json"
        job = Job(
            id=job_id,
            state=JobState.QUEUED,
            method=method,
            task=task,
            base=base.ref,
            name=new_name,
            params=hyper,
            data=data,
            seed=seed,
            created_at=time.time(),
            created_by=created_by,
        )
        try:
            # counted again with the insert: the check above let the data be read
            self.store.insert(job, max_unfinished=self.max_queued)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        log.info("tuning.submitted", job=job_id, method=method, base=base.ref, name=new_name)
        self._emit_state(job)
        if run:
            with self._lock:
                self._own.add(job_id)
            self.start()
            self._wake.set()
        return job

    def _base(self, ref: str) -> tuple[ModelCard, Path]:
        """The base model's card and its checked local weights."""
        try:
            card = self._registry().store.get(ref)
        except NotFoundError as exc:
            raise NotFoundError(f"base model: {exc.message}", param="model") from None
        if not card.source:
            raise BaseModelUnavailable(
                f"base model {card.ref!r} has no source: there are no weights to tune",
                param="model",
            )
        try:
            parsed = check_source(card.source, self._registry().policy)
        except LlmosError as exc:
            raise BaseModelUnavailable(
                f"base model {card.ref!r} cannot be loaded: {exc.message}", param="model"
            ) from None
        if parsed.path is None:
            raise BaseModelUnavailable(
                f"base model {card.ref!r} cannot be loaded for tuning: its source"
                f" {card.source!r} is a {parsed.kind} source, not weights on this machine, and"
                " tuning reads the base weights locally; download them and register the folder"
                " (`llmos models scan PATH`)",
                param="model",
            )
        if not parsed.path.exists():
            raise BaseModelUnavailable(
                f"base model {card.ref!r} cannot be loaded: its source {parsed.path}"
                " does not exist",
                param="model",
            )
        return card, parsed.path

    # -- cancelling ---------------------------------------------------------

    def cancel(self, job_id: str) -> Job:
        """Cancel a job: a queued one at once; a running one's worker is asked
        to stop and terminated if it has not within ``cancel_grace_s``.
        Returns the job as it is now (``cancel_requested`` set)."""
        job = self.store.request_cancel(job_id)
        with self._lock:
            run = self._runs.get(job_id)
        if run is not None:
            self._stop_run(run)
        if job.done:
            self._emit_state(job)
        self._wake.set()
        return job

    def _stop_run(self, run: _Run, *, interrupted: bool = False) -> None:
        run.interrupted = run.interrupted or interrupted
        if run.stop_at is None:
            run.stop_at = time.monotonic()
            run.handle.stop()

    # -- the scheduler ------------------------------------------------------

    def start(self) -> None:
        """Start the scheduler (idempotent): it takes back jobs whose kernel
        died (when adopting) and runs queued jobs as slots free up."""
        with self._lock:
            if self._thread is not None or self._stopping.is_set():
                return
            self._thread = threading.Thread(target=self._loop, name="llmos-jobs", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        """Stop the scheduler and interrupt running jobs: each goes back to
        the queue and resumes from its checkpoints when a kernel runs it again."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(10)
        with self._lock:  # after the scheduler is done launching
            runs = list(self._runs.values())
        for run in runs:
            self._stop_run(run, interrupted=True)
        for run in runs:
            if run.thread is not None:
                run.thread.join(self.grace + KILL_AFTER_S + 5)
        with self._store_lock:
            if self._store is not None:
                self._store.close()
                self._store = None

    def _loop(self) -> None:
        while not self._stopping.is_set():
            try:
                self._tick()
            except Exception:
                log.exception("tuning.scheduler_error")
            if self._wake.wait(TICK_S):
                self._wake.clear()

    def _tick(self) -> None:
        now = time.monotonic()
        if self.adopt and now - self._last_sweep >= SWEEP_S:
            self._last_sweep = now
            self._sweep()
        with self._lock:
            runs = dict(self._runs)
        for job_id in self.store.cancel_flags(list(runs)):
            self._stop_run(runs[job_id])
        while not self._stopping.is_set():
            with self._lock:
                if len(self._runs) >= self.max_concurrent:
                    return
            claimed = self._claim_next()
            if claimed is None:
                return
            self._launch(*claimed)

    def _sweep(self) -> None:
        """Queue again the running jobs whose kernel and worker are both gone."""
        for job in self.store.running():
            with self._lock:
                if job.id in self._runs:
                    continue
            owner_lock = try_lock(self.folder(job.id) / "owner.lock")
            if owner_lock is None:
                continue  # its kernel is alive
            try:
                worker_lock = try_lock(self.folder(job.id) / "worker.lock")
                if worker_lock is None:
                    continue  # its orphaned worker is still on its way out
                worker_lock.close()
                if job.cancel_requested:
                    self._end(job, JobState.CANCELLED)
                elif self.store.requeue(job.id):
                    log.warning("tuning.job_requeued", job=job.id, owner=job.owner)
                    self._emit_state(self.store.get(job.id))
            finally:
                owner_lock.close()

    def _claim_next(self) -> tuple[Job, IO[bytes]] | None:
        with self._lock:
            own, running = set(self._own), set(self._runs)
        for job_id in self.store.queued():
            if job_id in running or not (self.adopt or job_id in own):
                continue
            # The lock first: a running job always has its owner's lock held.
            lock = try_lock(self.folder(job_id) / "owner.lock")
            if lock is None:
                continue
            job = self.store.claim(job_id, self.owner)
            if job is not None:
                return job, lock
            lock.close()
        return None

    def _launch(self, job: Job, lock: IO[bytes]) -> None:
        folder = self.folder(job.id)
        try:
            base, base_path = self._base(job.base)
            payload = WorkerPayload(
                job_id=job.id,
                method=job.method,
                task=job.task,
                base=base.to_dict(),
                base_path=str(base_path),
                inline_file=str(folder / job.data["file"]) if job.data.get("file") else None,
                files={
                    split: source
                    for split, source in job.data.get("sources", {}).items()
                    if source != "inline"
                },
                hashes=dict(job.data.get("hashes", {})),
                labels=tuple(job.data.get("labels", ())),
                hyperparameters=dict(job.params),
                seed=job.seed,
                output_dir=str(folder / "output"),
                checkpoint_dir=str(folder / "checkpoints"),
                log_file=str(folder / "worker.log"),
                lock_file=str(folder / "worker.lock"),
                plugins=attrs.asdict(self._config.plugins),
                sys_path=tuple(sys.path),
            )
            # A fresh output folder: a resumed job writes its artifact again.
            shutil.rmtree(folder / "output", ignore_errors=True)
            handle = self._start(payload)
        except Exception as exc:
            message = exc.message if isinstance(exc, LlmosError) else f"{type(exc).__name__}: {exc}"
            self._end(job, JobState.FAILED, error=f"the job could not start: {message}")
            lock.close()
            return
        run = _Run(
            job=job,
            handle=handle,
            lock=lock,
            log=(folder / "progress.jsonl").open("a", encoding="utf-8"),
        )
        run.thread = threading.Thread(
            target=self._watch, args=(run,), name=f"llmos-job-{job.id}", daemon=True
        )
        with self._lock:
            self._runs[job.id] = run
        log.info("tuning.started", job=job.id, attempt=job.attempts, where=handle.where)
        self._emit_state(job)
        run.thread.start()

    def _start(self, payload: WorkerPayload) -> JobHandle:
        """The job's worker, started where ``[tuning] executor`` says."""
        if self.executor == LOCAL:
            return start_worker(payload)
        if self._start_job is None:
            raise ConfigError(f"[tuning] executor = {self.executor!r}: this kernel runs jobs here")
        return self._start_job(self.executor, payload)

    # -- one running job ----------------------------------------------------

    def _watch(self, run: _Run) -> None:
        try:
            while (messages := run.handle.receive(TICK_S)) is not None:
                for message in messages:
                    self._on_message(run, message)
                self._enforce_stop(run)
            self._conclude(run, run.handle.join())
        except Exception as exc:
            log.exception("tuning.watch_failed", job=run.job.id)
            run.handle.kill()
            self._end(run.job, JobState.FAILED, error=f"llmos lost the job: {exc!r}")
        finally:
            run.handle.close()
            run.log.close()
            with self._lock:
                self._runs.pop(run.job.id, None)
            run.lock.close()
            self._wake.set()

    def _on_message(self, run: _Run, message: tuple[Any, ...]) -> None:
        kind, body = message[0], message[1]
        if kind == "progress" and isinstance(body, Mapping):
            record = {"time": time.time(), "attempt": run.job.attempts, **body}
            run.log.write(json.dumps(record, ensure_ascii=False) + "\n")
            run.log.flush()
            run.latest.update(body)
            if time.monotonic() - run.written_at >= PROGRESS_WRITE_S:
                self._write_progress(run)
            self._emit(
                MonitorEvent(
                    kind="tuning.progress", model=run.job.name, fields={"job": run.job.id, **body}
                )
            )
        elif kind == "result":
            run.result = body
        elif kind == "error":
            run.error = str(body)

    def _write_progress(self, run: _Run) -> None:
        run.written_at = time.monotonic()
        if run.latest:
            self.store.set_progress(run.job.id, {**run.job.progress, **run.latest})

    def _enforce_stop(self, run: _Run) -> None:
        if run.stop_at is None:
            return
        waited = time.monotonic() - run.stop_at
        if waited > self.grace + KILL_AFTER_S:
            run.handle.kill()
        elif waited > self.grace:
            run.handle.terminate()

    def _conclude(self, run: _Run, code: int | None) -> None:
        self._write_progress(run)
        job = self.store.get(run.job.id)
        folder = self.folder(job.id)
        if job.cancel_requested:
            self._end(job, JobState.CANCELLED)
        elif run.handle.lost and run.result is None:
            # The node it ran on went away: run it again, from its checkpoints.
            if self.store.requeue(job.id):
                log.warning("tuning.worker_lost", job=job.id, where=run.handle.where)
                self._emit_state(self.store.get(job.id))
        elif run.stop_at is not None and run.interrupted:
            # Whatever a stopped method returned is partial: run it again later.
            if self.store.requeue(job.id):
                log.info("tuning.interrupted", job=job.id)
                self._emit_state(self.store.get(job.id))
        elif run.result is not None:
            try:
                result = self._register(job, run.result)
            except LlmosError as exc:
                self._end(job, JobState.FAILED, error=exc.message)
            except Exception as exc:
                log.exception("tuning.register_failed", job=job.id)
                self._end(job, JobState.FAILED, error=f"registering the result failed: {exc!r}")
            else:
                self._end(job, JobState.SUCCEEDED, result=result)
        elif run.error is not None:
            self._end(job, JobState.FAILED, error=run.error)
        else:
            self._end(
                job,
                JobState.FAILED,
                error=f"the worker process ended with {describe_exit(code)} before the method"
                f" returned (its output: {folder / 'worker.log'})",
            )

    def _register(self, job: Job, result: Mapping[str, Any]) -> dict[str, Any]:
        """Store the artifact in the artifact store and register the new model
        with its address as the source."""
        folder = self.folder(job.id)
        output = folder / "output"
        check_artifact(output, self._registry().policy.allow_pickle)
        fields = {
            k: v
            for k, v in dict(result["card"]).items()
            if k not in ("version", "created_at", "created_by")
        }
        card = ModelCard.from_dict({**fields, "name": job.name})
        inner = ""
        if card.source:
            path = Path(card.source).resolve()
            if path.is_relative_to(output.resolve()):
                inner = path.relative_to(output.resolve()).as_posix()
                inner = "" if inner == "." else inner
        # the artifact store: the data folder's artifacts/, or a cluster's shared root
        address = store_of(self._registry().policy, self._config.home).put(output, job.name)
        source = f"{address}/{inner}" if inner else address
        scores = {
            key: float(value)
            for key, value in {**card.scores, **dict(result.get("scores") or {})}.items()
            if isinstance(value, int | float) and not isinstance(value, bool)
        }
        provenance = {
            "job": job.id,
            "method": job.method,
            "task": job.task,
            "hyperparameters": dict(job.params),
            "seed": job.seed,
            "labels": list(job.data.get("labels", ())),
            "data": {k: job.data.get(k) for k in ("sizes", "hashes", "sources")},
        }
        card = attrs.evolve(
            card,
            version=None,
            source=str(source),
            parents=(job.base,),
            scores=scores,
            tasks=card.tasks or (job.task,),
            tags=tuple(dict.fromkeys((*card.tags, "tuned"))),
            description=card.description
            or f"{job.method} tuning of {job.base} for {job.task} (job {job.id})",
            options={**card.options, "tuning": provenance},
        )
        stored = self._registry().register(card, f"tuning:{job.id}", if_changed=True)
        log.info("tuning.registered", job=job.id, model=stored.ref, scores=scores)
        out = {"model": stored.ref, "scores": scores, "source": str(source)}
        if isinstance(result.get("usage"), Mapping):
            out["usage"] = dict(result["usage"])  # the worker's peak memory and CPU time
        return out

    def _end(
        self,
        job: Job,
        state: JobState,
        *,
        error: str | None = None,
        result: Mapping[str, Any] | None = None,
    ) -> None:
        """Clear the job's scratch folders (checkpoints, output, whatever the
        method made: a job that has ended does not run again), then record
        its end. The job's records stay: data.json, progress, worker.log."""
        folder = self.folder(job.id)
        for path in folder.iterdir() if folder.is_dir() else ():
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
        if self.store.finish(job.id, state, error=error, result=result):
            # info, not warning: the job's state and error are what reports a
            # failure, and `llmos tune` prints that already.
            log.info("tuning.finished", job=job.id, state=str(state), error=error)
        self._emit_state(self.store.get(job.id))

    def _emit_state(self, job: Job) -> None:
        fields: dict[str, Any] = {
            "job": job.id,
            "state": str(job.state),
            "method": job.method,
            "base": job.base,
        }
        if job.error:
            fields["error"] = job.error
        if job.result:
            fields.update(result_model=job.result.get("model"), scores=job.result.get("scores"))
        self._emit(MonitorEvent(kind="tuning.job", model=job.name, fields=fields))


# --------------------------------------------------------------------------
# Following a job from any process
# --------------------------------------------------------------------------


class JobFollower:
    """Reads a job's progress records and state as they change, from the
    job's ``progress.jsonl`` and the database, so that it works whichever
    process runs the job. :meth:`poll` never blocks."""

    def __init__(self, manager: JobManager, job_id: str) -> None:
        self.store = manager.store
        self.job_id = manager.get(job_id).id
        self.path = manager.folder(job_id) / "progress.jsonl"
        self._offset = 0
        self._state: JobState | None = None

    def read(self) -> list[dict[str, Any]]:
        """Complete records written since the last read."""
        try:
            with self.path.open("rb") as file:
                file.seek(self._offset)
                chunk = file.read()
        except FileNotFoundError:
            return []
        end = chunk.rfind(b"\n") + 1  # a line being written waits for its end
        self._offset += end
        records = []
        for line in chunk[:end].splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
        return records

    def poll(self) -> tuple[list[dict[str, Any]], Job | None]:
        """New records, and the job when its state changed since the last poll."""
        # The state first: once a job has ended, every record is in the file.
        job = self.store.get(self.job_id)
        records = self.read()
        changed = job.state != self._state
        self._state = job.state
        return records, job if changed else None
