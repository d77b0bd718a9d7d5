"""The worker process a tuning job runs in, and the parent's handle on it.

Each job runs in a fresh interpreter, ``python -m llmos.tuning.worker``,
that shares nothing with the kernel but what :class:`WorkerPayload` carries.
Whatever the method imports (torch, CUDA) lives and dies there; a method
that crashes the interpreter — an ``os._exit``, a segfault, the
out-of-memory killer — ends that process alone, and the parent reads its
exit code.

Why a plain subprocess rather than ``multiprocessing``'s ``spawn``: spawn
re-imports the parent's ``__main__`` in the child, so a script that embeds a
kernel without an ``if __name__ == "__main__"`` guard would run again, kernel
and all, in every job's worker. Here the child imports this module and
nothing of the parent's.

The two talk over the child's standard streams, one JSON document a line:

* parent → child, on stdin: the payload, then ``"stop"`` to cancel (the
  method's ``should_stop`` turns true). End of file means the parent is gone
  — it died, even by SIGKILL — and the child exits at once, so that a
  restarted kernel can resume the job from its checkpoints without a second
  writer in the folder;
* child → parent, on the stdout it was started with: ``["progress",
  figures]`` for each ``report(figures)``, then ``["result", {"card": ...,
  "scores": ..., "usage": ...}]`` (usage: the worker's peak memory and CPU
  time) or ``["error", message]``. The child points its own
  stdout and stderr (the method's prints, its libraries' warnings) at the
  job's ``worker.log``.

While it runs, the child holds a lock on the job's ``worker.lock``; a
restarted kernel waits for that lock to be free before it runs the job again.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import traceback
from collections.abc import Mapping
from pathlib import Path
from typing import IO, Any

import attrs

from llmos.config import PluginSettings
from llmos.errors import LlmosError
from llmos.logs import configure_logging
from llmos.plugin.manager import PluginManager
from llmos.tuning.data import Dataset, load_splits
from llmos.types import ModelCard, TuningRequest, TuningResult

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None  # type: ignore[assignment]
    import msvcrt

__all__ = [
    "WorkerHandle",
    "WorkerPayload",
    "describe_exit",
    "main",
    "plain",
    "start_worker",
    "try_lock",
    "usage",
]

#: the child's exit codes that are its own verdict, not a crash
EXIT_METHOD_FAILED = 1
EXIT_PARENT_GONE = 70
#: how long after the child exits its pipe may stay open (held by a grandchild)
PIPE_GRACE_S = 2.0
_EOF = object()


@attrs.frozen(kw_only=True)
class WorkerPayload:
    """Everything the child needs, as JSON-serialisable values."""

    job_id: str
    method: str
    task: str
    #: the base model's card, :meth:`~llmos.types.ModelCard.to_dict` form
    base: Mapping[str, Any]
    base_path: str | None
    #: the job's data.json (every split, normalised), when the data came inline
    inline_file: str | None
    #: split -> file otherwise: read again here, and their hashes checked
    files: Mapping[str, str]
    hashes: Mapping[str, str]
    labels: tuple[str, ...]
    hyperparameters: Mapping[str, Any]
    seed: int
    output_dir: str
    checkpoint_dir: str
    log_file: str
    lock_file: str
    #: :class:`~llmos.config.PluginSettings` as a dict (load, disable, strict, trace)
    plugins: Mapping[str, Any]
    #: the parent's ``sys.path``, so plugins it can import, the child can too
    sys_path: tuple[str, ...] = ()


# --------------------------------------------------------------------------
# The parent's side
# --------------------------------------------------------------------------


@attrs.define(eq=False)
class WorkerHandle:
    """A started worker: its process and the messages it sent."""

    process: subprocess.Popen[bytes]
    _messages: queue.Queue[Any] = attrs.Factory(queue.Queue)
    _ended: bool = False
    _exited_at: float | None = None
    #: a local process is never lost: it ends, and its exit code says how
    lost: bool = False

    @property
    def where(self) -> str:
        return f"pid {self.process.pid}"

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not ours: a library that wrote to fd 1 before the redirect
            if isinstance(message, list) and len(message) == 2:
                self._messages.put(tuple(message))
        self._messages.put(_EOF)

    def receive(self, timeout: float) -> list[tuple[Any, ...]] | None:
        """Messages that arrived within ``timeout``; ``None`` once the child
        has exited and everything it sent has been read."""
        if self._ended:
            return None
        messages: list[tuple[Any, ...]] = []
        try:
            item = self._messages.get(timeout=timeout)
            while True:
                if item is _EOF:
                    self._ended = True
                    break
                messages.append(item)
                item = self._messages.get_nowait()
        except queue.Empty:
            pass
        if not self._ended and self.process.poll() is not None:
            # Exited: the end of the pipe follows what it wrote, unless a
            # grandchild (a data loader the method forked) holds the pipe
            # open; then what the child sent has long been read.
            if self._exited_at is None:
                self._exited_at = time.monotonic()
            elif time.monotonic() - self._exited_at > PIPE_GRACE_S:
                self._ended = True
        return None if self._ended and not messages else messages

    def stop(self) -> None:
        """Ask the method to stop (its ``should_stop`` turns true)."""
        self._send("stop")

    def _send(self, message: Any) -> None:
        try:
            assert self.process.stdin is not None
            self.process.stdin.write(json.dumps(message).encode() + b"\n")
            self.process.stdin.flush()
        except (BrokenPipeError, OSError, ValueError):
            pass  # it has exited already

    def terminate(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()

    def join(self, timeout: float | None = None) -> int | None:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def close(self) -> None:
        for stream in (self.process.stdin, self.process.stdout):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


def start_worker(payload: WorkerPayload) -> WorkerHandle:
    """Start the child for ``payload``; return at once."""
    Path(payload.log_file).parent.mkdir(parents=True, exist_ok=True)
    with open(payload.log_file, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "llmos.tuning.worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log_file,
        )
    handle = WorkerHandle(process=process)
    handle._send(attrs.asdict(payload))
    threading.Thread(
        target=handle._read, name=f"llmos-job-{payload.job_id}-reader", daemon=True
    ).start()
    return handle


def describe_exit(code: int | None) -> str:
    """``exit code 3`` or ``killed by SIGSEGV (signal 11)``."""
    if code is None:
        return "no exit code (still running?)"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        return f"killed by {name} (signal {-code})"
    return f"exit code {code}"


def try_lock(path: Path) -> IO[bytes] | None:
    """Take an exclusive lock on ``path`` without waiting; the open file
    holds it (close the file to release it). ``None`` when another process
    — or another open file in this one — holds it. The operating system
    releases the lock when its holder dies, however it dies, which is what
    tells a kernel that a job's owner is gone."""
    path.parent.mkdir(parents=True, exist_ok=True)
    file = path.open("ab")
    try:
        if fcntl is not None:
            fcntl.flock(file.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:  # pragma: no cover - Windows: a byte range of the (empty) file
            msvcrt.locking(file.fileno(), msvcrt.LK_NBLCK, 1)
    except OSError:
        file.close()
        return None
    return file


# --------------------------------------------------------------------------
# The child's side
# --------------------------------------------------------------------------


def plain(value: Any) -> Any:
    """``value`` as JSON-safe data: numpy and torch scalars become numbers,
    NaN and infinities ``None``, anything else unknown its ``str``."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    if value is None or isinstance(value, bool | str | int):
        return value
    if not isinstance(value, float):
        try:
            value = value.item() if hasattr(value, "item") else float(value)
        except (TypeError, ValueError):
            return str(value)
        if not isinstance(value, float):
            return plain(value)
    return value if math.isfinite(value) else None


class _Channel:
    """The child's end: messages out on the original stdout, commands in on stdin."""

    def __init__(self) -> None:
        # Keep the pipe to the parent, then point fd 1 where fd 2 goes (the
        # log), so that nothing the method prints can garble the messages.
        self._out = os.fdopen(os.dup(1), "w", encoding="utf-8", buffering=1)
        sys.stdout.flush()
        os.dup2(2, 1)
        self._lock = threading.Lock()
        self.stop = threading.Event()

    def send(self, kind: str, body: Any) -> None:
        line = json.dumps([kind, plain(body)], ensure_ascii=False, allow_nan=False)
        with self._lock:
            self._out.write(line + "\n")
            self._out.flush()

    def read_payload(self) -> dict[str, Any]:
        line = sys.stdin.readline()
        if not line:
            os._exit(EXIT_PARENT_GONE)
        return json.loads(line)

    def listen(self) -> None:
        """Turn ``stop`` on a "stop" line; exit at once when the parent is gone."""

        def listen() -> None:
            for line in sys.stdin:
                if line.strip() == '"stop"':
                    self.stop.set()
            os._exit(EXIT_PARENT_GONE)

        threading.Thread(target=listen, name="llmos-parent-watch", daemon=True).start()


def main() -> None:
    """The child's entry point: run the method, report, send the result."""
    # The kernel decides when its job stops ("stop", then SIGTERM): a Ctrl-C
    # meant for the daemon or `llmos tune` in a terminal reaches the whole
    # process group, and must not fail the job from under them.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    channel = _Channel()
    payload = WorkerPayload(**channel.read_payload())
    channel.listen()
    sys.path[:0] = [p for p in payload.sys_path if p not in sys.path]
    lock = try_lock(Path(payload.lock_file))
    if lock is None:
        channel.send("error", f"another worker still runs job {payload.job_id}")
        sys.exit(EXIT_METHOD_FAILED)
    try:
        result = _run(payload, channel)
    except BaseException as exc:
        traceback.print_exc()
        channel.send("error", _message(exc))
        sys.exit(EXIT_METHOD_FAILED)
    channel.send("result", result)


def methods_hint(plugins: PluginManager) -> str:
    """The installed tuning methods, for an error message."""
    methods = plugins.tuning_methods
    if not methods:
        return (
            "no tuning method is installed; install one (pip install llmos-peft for LoRA and"
            " the other PEFT methods) and see `llmos plugins`"
        )
    listed = ", ".join(f"{name} ({r.plugin})" for name, r in sorted(methods.items()))
    return f"installed tuning methods: {listed}"


def _message(exc: BaseException) -> str:
    if isinstance(exc, LlmosError):
        return exc.message
    if isinstance(exc, SystemExit):
        return f"the method called sys.exit({exc.code!r})"
    return f"{type(exc).__name__}: {exc}"


def _run(payload: WorkerPayload, channel: _Channel) -> dict[str, Any]:
    configure_logging(os.environ.get("LLMOS_LOG_LEVEL", "info"), fmt="json")
    settings = dict(payload.plugins)
    if settings.get("load") is not None:
        settings["load"] = tuple(settings["load"])
    settings["disable"] = tuple(settings.get("disable", ()))
    plugins = PluginManager(PluginSettings(**settings))
    plugins.load()
    registered = plugins.tuning_methods.get(payload.method)
    if registered is None:
        raise LlmosError(
            f"tuning method {payload.method!r} is not installed in the worker; "
            + methods_hint(plugins)
        )
    if payload.inline_file is not None:
        # A snapshot of every split, written when the job was submitted.
        text = Path(payload.inline_file).read_text(encoding="utf-8")
        dataset = Dataset.from_dict(json.loads(text))
    else:
        # Their size was checked at submission, and their hashes are below.
        dataset = load_splits(**payload.files, task=payload.task, max_file_bytes=2**63)
        for split, digest in dataset.hashes.items():
            if payload.hashes.get(split, digest) != digest:
                raise LlmosError(
                    f"the {split} data ({payload.files.get(split)}) changed since the job was"
                    " submitted; submit a new job to tune on the new data"
                )

    def report(figures: Mapping[str, Any]) -> None:
        channel.send("progress", dict(figures))

    for folder in (payload.output_dir, payload.checkpoint_dir):
        Path(folder).mkdir(parents=True, exist_ok=True)
    request = TuningRequest(
        base=ModelCard.from_dict(payload.base),
        task=payload.task,
        data=dataset.splits,
        labels=tuple(payload.labels),
        hyperparameters=payload.hyperparameters,
        base_path=Path(payload.base_path) if payload.base_path else None,
        output_dir=Path(payload.output_dir),
        checkpoint_dir=Path(payload.checkpoint_dir),
        seed=payload.seed,
        report=report,
        should_stop=channel.stop.is_set,
    )
    result = registered.spec.run(request)
    if not isinstance(result, TuningResult):
        raise LlmosError(
            f"tuning method {payload.method!r} returned {type(result).__name__}, not a TuningResult"
        )
    return {"card": result.card.to_dict(), "scores": dict(result.scores), "usage": usage()}


def usage() -> dict[str, float]:
    """What this process has used: its peak resident memory and CPU time."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF)
    # ru_maxrss is in KiB on Linux, in bytes on macOS
    peak = own.ru_maxrss if sys.platform == "darwin" else own.ru_maxrss * 1024
    return {"peak_rss_bytes": float(peak), "cpu_seconds": round(own.ru_utime + own.ru_stime, 3)}


if __name__ == "__main__":
    main()
