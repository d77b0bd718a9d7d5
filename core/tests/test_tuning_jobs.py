"""The tuning job manager: real worker processes, real SQLite, a real plugin.

The tuning method is ``count`` from a plugin distribution written to a folder
on ``sys.path`` (found through entry points, in the kernel and again in each
worker process): it counts words per label, one training row a step, reports
a loss each step, writes a JSON checkpoint each step and resumes from the
latest, honours ``should_stop``, and writes a small safetensors artifact.
Hyper-parameters make it slow (``sleep``), crash (``crash_at``: ``os._exit(3)``),
raise (``raise_at``) or ignore a cancel (``ignore_stop``).
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from llmos.errors import ConfigError, NotFoundError, PayloadTooLarge, PluginError, UsageError
from llmos.plugin import hookimpl
from llmos.registry.fsstore import MANIFEST
from llmos.registry.service import Registry
from llmos.replica import start_job
from llmos.runtime.kernel import Kernel
from llmos.testing import EventRecorder, write_distribution, write_safetensors
from llmos.tuning.jobs import (
    DATABASE,
    BaseModelUnavailable,
    Job,
    JobConflict,
    JobQueueFull,
    JobState,
    JobStore,
)
from llmos.types import ExecutorSpec, JobHandle, ModelCard

COUNT = """
import json
import os
import time

from llmos.errors import UsageError
from llmos.plugin import hookimpl
from llmos.testing import write_safetensors
from llmos.types import ModelCard, TuningMethodSpec, TuningResult


def predict(counts, text):
    words = text.lower().split()
    return max(sorted(counts), key=lambda label: sum(counts[label].get(w, 0) for w in words))


def run(request):
    hp = request.hyperparameters
    steps = int(hp["steps"])
    folder = request.checkpoint_dir
    state = {"step": 0, "counts": {label: {} for label in request.labels}}
    saved = sorted(folder.glob("step-*.json"))
    if saved:
        state = json.loads(saved[-1].read_text())
    resumed_from = state["step"]
    rows = request.data["train"]
    while state["step"] < steps:
        if request.should_stop() and not hp.get("ignore_stop"):
            raise RuntimeError("stopped")
        step = state["step"] + 1
        if hp.get("crash_at") == step:
            os._exit(3)
        if hp.get("raise_at") == step:
            raise ValueError(f"boom at step {step}")
        row = rows[(step - 1) % len(rows)]
        for word in row["text"].lower().split():
            counts = state["counts"][row["label"]]
            counts[word] = counts.get(word, 0) + 1
        state["step"] = step
        part = folder / f".step-{step:06d}.part"
        part.write_text(json.dumps(state))
        part.rename(folder / f"step-{step:06d}.json")
        request.report(
            {"step": step, "total_steps": steps, "loss": 1.0 / step, "resumed_from": resumed_from}
        )
        time.sleep(float(hp.get("sleep", 0)))
    scores = {}
    for split in ("dev", "test"):
        held_out = request.data.get(split)
        if held_out:
            right = sum(predict(state["counts"], r["text"]) == r["label"] for r in held_out)
            scores[f"{split}/accuracy"] = right / len(held_out)
    out = request.output_dir
    write_safetensors(out / "model.safetensors", {"counts": [len(request.labels), 4]})
    (out / "meta.json").write_text(json.dumps({
        "seed": request.seed,
        "hyperparameters": dict(request.hyperparameters),
        "resumed_from": resumed_from,
        "base_path": str(request.base_path),
        "labels": list(request.labels),
        "pid": os.getpid(),
    }))
    card = ModelCard(
        name=request.base.name,
        provider="count",
        format="safetensors",
        source=str(out / "model.safetensors"),
        options={"labels": list(request.labels)},
    )
    return TuningResult(card=card, scores=scores)


KNOWN = {"steps", "sleep", "crash_at", "raise_at", "ignore_stop", "check_bug"}


def check(task, hp):
    if hp.get("check_bug"):
        return {}["a plugin bug"]
    unknown = sorted(set(hp) - KNOWN)
    if unknown:
        raise UsageError(f"count: unknown hyper-parameter {unknown[0]}", param=unknown[0])


@hookimpl
def llmos_register_tuning_methods(register):
    register(TuningMethodSpec(
        name="count",
        run=run,
        tasks=("text-classification",),
        defaults={"steps": 4, "sleep": 0.0},
        description="per-label word counts",
        check=check,
    ))
"""

DATA = {
    "train": [
        {"text": "good great fine", "label": "pos"},
        {"text": "bad awful poor", "label": "neg"},
        {"text": "great lovely", "label": "pos"},
        {"text": "awful dreadful", "label": "neg"},
    ],
    "dev": [{"text": "good lovely", "label": "pos"}, {"text": "poor bad", "label": "neg"}],
    "test": [{"text": "fine", "label": "pos"}, {"text": "dreadful", "label": "neg"}],
}


def add_count_plugin(site: Path) -> None:
    """The ``llmos-count`` distribution in ``site`` (a folder on the path)."""
    site.mkdir(parents=True, exist_ok=True)
    write_distribution(site, "llmos-count", COUNT)


def kernel_for(home: Path, *overrides: str) -> Kernel:
    return Kernel.from_config(
        env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "llmos-count"},
        overrides=list(overrides),
    )


def add_base(registry: Registry, home: Path) -> ModelCard:
    """A base model with local safetensors weights under ``home``."""
    write_safetensors(home / "models" / "base" / "model.safetensors", {"w": [2, 2]})
    return registry.register(
        ModelCard(
            name="base", provider="count", format="safetensors", source=str(home / "models/base")
        )
    )


def wait_for(check: Callable[[], object], timeout: float = 20.0, what: str = "it") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}")


def wait_done(kernel: Kernel, job_id: str, timeout: float = 20.0) -> Job:
    job = wait_for(lambda: (j := kernel.jobs.get(job_id)).done and j, timeout, f"job {job_id}")
    assert isinstance(job, Job)
    return job


def records(kernel: Kernel, job_id: str) -> list[dict]:
    return kernel.jobs.logs(job_id)


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "site"
    add_count_plugin(folder)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("llmos_count", None)


@pytest.fixture
def make_kernel(tmp_path: Path, site: Path) -> Iterator[Callable[..., Kernel]]:
    kernels: list[Kernel] = []

    def make(*overrides: str, recorder: EventRecorder | None = None, adopt: bool = False) -> Kernel:
        kernel = kernel_for(tmp_path / "home", *overrides)
        kernel.jobs.adopt = adopt
        kernel.load_plugins()
        if recorder is not None:
            kernel.plugins.register(recorder, "recorder")
        kernel.start()
        if not kernels:
            add_base(kernel.registry, kernel.home)
        kernels.append(kernel)
        return kernel

    yield make
    for kernel in kernels:
        kernel.stop()


def submit(kernel: Kernel, **params: object) -> Job:
    return kernel.jobs.submit(model="base", method="count", inline=DATA, params=params)


# --------------------------------------------------------------------------


def test_a_job_runs_in_a_worker_and_registers_the_tuned_model(make_kernel) -> None:
    recorder = EventRecorder()
    kernel = make_kernel(recorder=recorder)
    job = kernel.jobs.submit(
        model="base",
        task="Text classification",
        method="count",
        inline=DATA,
        name="acme/sentiment",
        params={"count.steps": 6, "sleep": 0.01},
        seed=7,
    )
    assert (job.state, job.base, job.task) == (JobState.QUEUED, "base@1", "text-classification")
    done = wait_done(kernel, job.id)
    assert done.state is JobState.SUCCEEDED, done.error
    assert done.attempts == 1 and done.started_at and done.finished_at
    assert done.progress["step"] == 6 and done.progress["loss"] == pytest.approx(1 / 6)

    card = kernel.registry.store.get("acme/sentiment")
    usage = dict(done.result).pop("usage")
    assert {k: v for k, v in done.result.items() if k != "usage"} == {
        "model": "acme/sentiment@1",
        "scores": {"dev/accuracy": 1.0, "test/accuracy": 1.0},
        "source": card.source,
    }
    # the worker's own peak memory (an interpreter: more than 5 MB) and CPU time
    assert 5e6 < usage["peak_rss_bytes"] < 5e9 and usage["cpu_seconds"] > 0
    assert card.parents == ("base@1",)
    assert card.scores == {"dev/accuracy": 1.0, "test/accuracy": 1.0}
    # stored in the artifact store (the data folder's by default), under the
    # sha256 of its manifest, which lists every file's hash
    artifact = Path(card.source).parent
    assert artifact.parent == kernel.home / "artifacts" / "acme" / "sentiment"
    assert card.source == str(artifact / "model.safetensors")
    manifest = (artifact / MANIFEST).read_bytes()
    assert artifact.name == hashlib.sha256(manifest).hexdigest()
    assert {f["name"] for f in json.loads(manifest)["files"]} == {"model.safetensors", "meta.json"}
    assert card.tasks == ("text-classification",) and "tuned" in card.tags
    tuning = card.options["tuning"]
    assert tuning["method"] == "count" and tuning["job"] == job.id and tuning["seed"] == 7
    assert tuning["hyperparameters"] == {"steps": 6, "sleep": 0.01}
    assert tuning["labels"] == ["neg", "pos"]
    assert tuning["data"]["sizes"] == {"train": 4, "dev": 2, "test": 2}
    assert set(tuning["data"]["hashes"]) == {"train", "dev", "test"}
    assert card.options["labels"] == ["neg", "pos"], "the method's own options are kept"

    meta = json.loads((artifact / "meta.json").read_text())
    assert meta["seed"] == 7 and meta["hyperparameters"]["steps"] == 6
    assert meta["base_path"] == str((kernel.home / "models" / "base").resolve())
    assert meta["pid"] != os.getpid(), "the method ran in a worker process"
    folder = kernel.jobs.folder(job.id)
    assert not (folder / "output").exists() and not (folder / "checkpoints").exists()

    steps = [r["step"] for r in records(kernel, job.id)]
    assert steps == [1, 2, 3, 4, 5, 6]
    kernel.bus.stop()  # deliver what is queued
    progress = [e for e in recorder.events if e.kind == "tuning.progress"]
    assert [e.fields["step"] for e in progress] == steps
    assert all(e.fields["job"] == job.id and e.model == "acme/sentiment" for e in progress)
    states = [e.fields["state"] for e in recorder.events if e.kind == "tuning.job"]
    assert states == ["queued", "running", "succeeded"]
    # the base rides along: `llmos report base` finds the jobs that tuned it
    assert {e.fields["base"] for e in recorder.events if e.kind == "tuning.job"} == {job.base}


def test_data_from_files_is_checked_and_hashed(make_kernel, tmp_path: Path) -> None:
    kernel = make_kernel()
    paths = {}
    for split, rows in DATA.items():
        paths[split] = tmp_path / f"{split}.jsonl"
        paths[split].write_text("".join(json.dumps(r) + "\n" for r in rows))
    job = kernel.jobs.submit(model="base", method="count", files=paths, params={"steps": 2})
    assert job.data["sources"]["train"] == str(paths["train"].resolve())
    assert "file" not in job.data, "rows from files are not copied into the job"
    done = wait_done(kernel, job.id)
    assert done.state is JobState.SUCCEEDED, done.error


def test_a_changed_data_file_fails_the_job_instead_of_training_on_other_data(
    make_kernel, tmp_path: Path
) -> None:
    kernel = make_kernel("tuning.max_concurrent_jobs=1")
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in DATA["train"]))
    first = submit(kernel, sleep=0.1, steps=3)
    second = kernel.jobs.submit(model="base", method="count", files={"train": train})
    train.write_text("".join(json.dumps(r) + "\n" for r in reversed(DATA["train"])))
    assert wait_done(kernel, first.id).state is JobState.SUCCEEDED
    failed = wait_done(kernel, second.id)
    assert failed.state is JobState.FAILED
    assert "train data" in failed.error and "changed since the job was submitted" in failed.error


def test_the_concurrency_limit_keeps_the_next_job_queued(make_kernel) -> None:
    kernel = make_kernel("tuning.max_concurrent_jobs=1")
    first = submit(kernel, steps=20, sleep=0.05)
    second = submit(kernel, steps=2)
    wait_for(lambda: kernel.jobs.get(first.id).state is JobState.RUNNING, what="first running")
    time.sleep(0.3)
    assert kernel.jobs.get(second.id).state is JobState.QUEUED
    one, two = wait_done(kernel, first.id), wait_done(kernel, second.id)
    assert one.state is two.state is JobState.SUCCEEDED
    assert two.started_at >= one.finished_at
    assert [j.id for j in kernel.jobs.list()] == [second.id, first.id], "newest first"
    assert kernel.jobs.list(["queued"]) == []
    with pytest.raises(UsageError, match="unknown job state"):
        kernel.jobs.list(["paused"])


def test_cancel_stops_the_worker_and_a_queued_job(make_kernel) -> None:
    kernel = make_kernel()
    running = submit(kernel, steps=500, sleep=0.02)
    queued = submit(kernel, steps=2)
    wait_for(lambda: len(records(kernel, running.id)) >= 2, what="progress")
    assert kernel.jobs.cancel(queued.id).state is JobState.CANCELLED
    worker = kernel.jobs._runs[running.id].handle.process
    flagged = kernel.jobs.cancel(running.id)
    assert flagged.cancel_requested and flagged.state is JobState.RUNNING
    done = wait_done(kernel, running.id, timeout=10)
    assert done.state is JobState.CANCELLED and done.error is None
    assert done.progress["step"] < 500
    assert worker.returncode == 1, "the worker stopped on its own (the method raised)"
    assert not (kernel.jobs.folder(running.id) / "checkpoints").exists()
    with pytest.raises(JobConflict, match="already cancelled"):
        kernel.jobs.cancel(running.id)
    with pytest.raises(NotFoundError, match="no tuning job"):
        kernel.jobs.cancel("nope")


def test_a_worker_that_ignores_the_cancel_is_terminated(make_kernel) -> None:
    kernel = make_kernel("tuning.cancel_grace_s=0.3")
    job = submit(kernel, steps=500, sleep=0.02, ignore_stop=True)
    wait_for(lambda: records(kernel, job.id), what="progress")
    worker = kernel.jobs._runs[job.id].handle.process
    started = time.monotonic()
    kernel.jobs.cancel(job.id)
    assert wait_done(kernel, job.id).state is JobState.CANCELLED
    assert worker.returncode == -signal.SIGTERM
    assert time.monotonic() - started < 5


def test_a_crashing_worker_fails_its_job_alone(make_kernel) -> None:
    kernel = make_kernel()
    crash = submit(kernel, steps=5, crash_at=3)
    failed = wait_done(kernel, crash.id)
    assert failed.state is JobState.FAILED
    assert "exit code 3" in failed.error and "worker.log" in failed.error
    assert [r["step"] for r in records(kernel, crash.id)] == [1, 2]
    raised = wait_done(kernel, submit(kernel, raise_at=2).id)
    assert raised.state is JobState.FAILED
    assert raised.error == "ValueError: boom at step 2"
    assert "Traceback" in (kernel.jobs.folder(raised.id) / "worker.log").read_text()
    after = wait_done(kernel, submit(kernel, steps=2).id)
    assert after.state is JobState.SUCCEEDED, "the kernel keeps working"


def test_a_submission_is_checked_before_it_is_queued(make_kernel) -> None:
    kernel = make_kernel()
    kernel.registry.register(
        ModelCard(name="bert-base-cased", provider="count", source="https://example.invalid/bert")
    )
    with pytest.raises(UsageError, match=r"'lora' is not installed.*count \(llmos-count\)"):
        kernel.jobs.submit(model="base", inline=DATA)
    with pytest.raises(NotFoundError, match="base model: no model named 'ghost'"):
        kernel.jobs.submit(model="ghost", method="count", inline=DATA)
    with pytest.raises(BaseModelUnavailable, match=r"'https://example.invalid/bert' is a https"):
        kernel.jobs.submit(model="bert-base-cased", method="count", inline=DATA)
    with pytest.raises(UsageError, match="inline dev: no rows"):
        kernel.jobs.submit(model="base", method="count", inline={**DATA, "dev": []})
    with pytest.raises(UsageError, match="does not do 'sft'"):
        kernel.jobs.submit(model="base", method="count", task="sft", inline=DATA)
    with pytest.raises(UsageError, match="model name"):
        kernel.jobs.submit(model="base", method="count", inline=DATA, name="Bad Name")
    with pytest.raises(UsageError, match="seed must be an integer"):
        kernel.jobs.submit(model="base", method="count", inline=DATA, params={"seed": "x"})
    # the method's own check runs at submission: a typo never reaches a worker
    with pytest.raises(UsageError, match="count: unknown hyper-parameter stepz"):
        kernel.jobs.submit(model="base", method="count", inline=DATA, params={"stepz": 2})
    with pytest.raises(PluginError, match=r"'count' \(plugin llmos-count\).*KeyError"):
        kernel.jobs.submit(model="base", method="count", inline=DATA, params={"check_bug": 1})
    assert kernel.jobs.list() == []
    assert not any(kernel.jobs.root.glob("*/data.json"))
    from_param = kernel.jobs.submit(
        model="base", method="count", inline=DATA, params={"seed": 3}, run=False
    )
    assert (from_param.seed, from_param.params) == (3, {"steps": 4, "sleep": 0.0})
    kernel.jobs.cancel(from_param.id)
    assert [j.state for j in kernel.jobs.list()] == [JobState.CANCELLED]


def test_a_seed_sqlite_cannot_hold_is_refused_not_a_crash(make_kernel) -> None:
    kernel = make_kernel()
    for seed in (2**63, -1):
        with pytest.raises(UsageError, match=r"seed must be an integer between 0 and") as caught:
            kernel.jobs.submit(model="base", method="count", inline=DATA, seed=seed, run=False)
        assert caught.value.param == "seed"
    big = kernel.jobs.submit(model="base", method="count", inline=DATA, seed=2**63 - 1, run=False)
    assert kernel.jobs.get(big.id).seed == 2**63 - 1


def test_a_bad_hyper_parameter_names_its_place_in_the_request(make_kernel) -> None:
    kernel = make_kernel()
    with pytest.raises(UsageError, match="count: unknown hyper-parameter stepz") as caught:
        kernel.jobs.submit(model="base", method="count", inline=DATA, params={"count.stepz": 2})
    assert caught.value.param == "params.stepz"
    assert kernel.jobs.list() == []


def test_the_queue_cap_refuses_a_job_until_one_ends(make_kernel) -> None:
    kernel = make_kernel("tuning.max_queued_jobs=2")

    def queue() -> Job:
        return kernel.jobs.submit(model="base", method="count", inline=DATA, run=False)

    first, second = queue(), queue()
    with pytest.raises(JobQueueFull, match=r"2 jobs are queued or running") as caught:
        queue()
    assert "[tuning] max_queued_jobs is 2" in caught.value.message
    assert (caught.value.status, caught.value.retry_after) == (429, 60)
    assert len(kernel.jobs.list()) == 2
    assert {p.name for p in kernel.jobs.root.iterdir()} == {first.id, second.id}
    kernel.jobs.cancel(first.id)  # a cancelled job frees its place
    third = queue()
    assert {j.id for j in kernel.jobs.list(["queued"])} == {second.id, third.id}


def test_submissions_racing_for_the_last_places_never_pass_the_cap(make_kernel) -> None:
    kernel = make_kernel("tuning.max_queued_jobs=3")
    start = threading.Barrier(8)
    outcomes: list[object] = []

    def race() -> None:
        start.wait()
        try:
            outcomes.append(
                kernel.jobs.submit(model="base", method="count", inline=DATA, run=False)
            )
        except JobQueueFull as exc:
            outcomes.append(exc)

    threads = [threading.Thread(target=race) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sum(isinstance(o, Job) for o in outcomes) == 3
    assert sum(isinstance(o, JobQueueFull) for o in outcomes) == 5
    assert len(kernel.jobs.list()) == 3
    assert len(list(kernel.jobs.root.iterdir())) == 3, "a refused job leaves no folder"


def test_the_store_counts_and_inserts_in_one_transaction(tmp_path: Path) -> None:
    """Two processes' stores on one file: the second sees the first's jobs."""
    one, two = JobStore(tmp_path / DATABASE), JobStore(tmp_path / DATABASE)
    try:

        def job(job_id: str) -> Job:
            return Job(
                id=job_id,
                state=JobState.QUEUED,
                method="m",
                task="t",
                base="b@1",
                name="n",
                created_at=time.time(),
            )

        one.insert(job("a"), max_unfinished=2)
        two.insert(job("b"), max_unfinished=2)
        with pytest.raises(JobQueueFull):
            one.insert(job("c"), max_unfinished=2)
        assert two.unfinished() == 2
        two.finish("a", JobState.SUCCEEDED)
        one.insert(job("c"), max_unfinished=2)
        assert [j.id for j in two.list(["queued"])] == ["c", "b"]
    finally:
        one.close()
        two.close()


def test_data_files_over_the_byte_cap_are_refused_before_they_are_read(
    make_kernel, tmp_path: Path
) -> None:
    kernel = make_kernel("tuning.max_data_bytes=300")
    small, big = tmp_path / "small.jsonl", tmp_path / "big.jsonl"
    small.write_text("".join(json.dumps(r) + "\n" for r in DATA["train"]))
    big.write_text("".join(json.dumps(r) + "\n" for r in DATA["train"] * 3))
    assert small.stat().st_size < 300 < big.stat().st_size
    with pytest.raises(PayloadTooLarge, match=r"more than 300 bytes.*\[tuning\] max_data_bytes"):
        kernel.jobs.submit(model="base", method="count", files={"train": big}, run=False)
    with pytest.raises(PayloadTooLarge):  # the files together
        kernel.jobs.submit(
            model="base", method="count", files={"train": small, "dev": small}, run=False
        )
    kernel.jobs.submit(model="base", method="count", files={"train": small}, run=False)
    with pytest.raises(UsageError, match="no such user"):
        kernel.jobs.submit(
            model="base", method="count", files={"train": "~no-such-user-x/t.jsonl"}, run=False
        )


def test_the_tuning_section_is_validated(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"tuning\.max_concurrent_jobs: expected an integer >= 1"):
        kernel_for(tmp_path, "tuning.max_concurrent_jobs=0")
    with pytest.raises(ConfigError, match=r"tuning\.max_queued_jobs: expected an integer >= 1"):
        kernel_for(tmp_path, "tuning.max_queued_jobs=0")


def test_a_stopped_kernel_requeues_its_job_and_the_next_one_resumes_it(make_kernel) -> None:
    first = make_kernel()
    job = submit(first, steps=40, sleep=0.02)
    wait_for(lambda: len(records(first, job.id)) >= 3, what="progress")
    stopped_at = max(r["step"] for r in records(first, job.id))
    first.stop()
    store = JobStore(first.home / DATABASE)
    assert store.get(job.id).state is JobState.QUEUED
    store.close()

    second = make_kernel(adopt=True)
    done = wait_done(second, job.id)
    assert done.state is JobState.SUCCEEDED and done.attempts == 2
    resumed = [r for r in records(second, job.id) if r["attempt"] == 2]
    assert resumed[0]["resumed_from"] >= stopped_at and resumed[0]["step"] > 1


KILLED_KERNEL = """
import json
import sys
import time

from llmos.logs import configure_logging
from llmos.runtime.kernel import Kernel

if __name__ == "__main__":
    configure_logging("warning")
    kernel = Kernel.from_config()
    kernel.start()
    job = kernel.jobs.submit(
        model="base", method="count", inline=json.loads(sys.argv[1]),
        params={"steps": 60, "sleep": 0.03},
    )
    print(job.id, flush=True)
    time.sleep(120)
"""


def test_a_job_survives_a_sigkilled_kernel_and_resumes_from_its_checkpoint(
    tmp_path: Path, site: Path
) -> None:
    home = tmp_path / "home"
    registry = kernel_for(home).registry
    add_base(registry, home)
    registry.close()
    script = tmp_path / "kernel.py"
    script.write_text(KILLED_KERNEL)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("LLMOS_")},
        "LLMOS_HOME": str(home),
        "LLMOS_LOAD_PLUGINS": "llmos-count",
        "PYTHONPATH": str(site),
    }
    process = subprocess.Popen(
        [sys.executable, str(script), json.dumps(DATA)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        job_id = process.stdout.readline().strip()
        progress = home / "jobs" / job_id / "progress.jsonl"
        wait_for(
            lambda: progress.exists() and len(progress.read_text().splitlines()) >= 5,
            what="progress from the first kernel",
        )
    finally:
        process.send_signal(signal.SIGKILL)
        process.wait(10)
    killed_at = max(json.loads(line)["step"] for line in progress.read_text().splitlines())

    store = JobStore(home / DATABASE)
    orphan = store.get(job_id)
    store.close()
    assert orphan.state is JobState.RUNNING and orphan.owner.endswith(f":{process.pid}")

    kernel = kernel_for(home)
    kernel.jobs.adopt = True
    kernel.start()
    try:
        done = wait_done(kernel, job_id, timeout=30)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 2
        lines = [json.loads(line) for line in progress.read_text().splitlines()]
        first = next(r for r in lines if r["attempt"] == 2)
        assert first["resumed_from"] >= killed_at, "it resumed from its last checkpoint"
        assert first["step"] == first["resumed_from"] + 1 > 1, "not from step 0"
        assert [r["step"] for r in lines if r["attempt"] == 2][-1] == 60
        assert kernel.registry.store.get("base-count").parents == ("base@1",)
    finally:
        kernel.stop()


# --------------------------------------------------------------------------
# [tuning] executor: a job's worker started by an executor plugin (a cluster
# node), through llmos.replica.start_job on "the node" (here: this machine)


class LostNode:
    """The job's handle while its node goes away mid-run: the worker is
    killed after its third step and the handle says it was lost."""

    where = "node test-2"

    def __init__(self, inner: JobHandle) -> None:
        self.inner = inner
        self.lost = False

    def receive(self, timeout: float) -> list | None:
        messages = self.inner.receive(timeout)
        for kind, body in messages or ():
            if kind == "progress" and body.get("step", 0) >= 3 and not self.lost:
                self.inner.kill()
                self.lost = True
        return messages

    def __getattr__(self, name: str):
        return getattr(self.inner, name)


class NodesPlugin:
    def __init__(self, lose_first: bool = False) -> None:
        self.payloads: list[dict] = []
        self.lose_first = lose_first

    @hookimpl
    def llmos_register_executors(self, register):
        plugin = self

        class Nodes:
            def place(self, request):
                raise UsageError("this test executor runs jobs only")

            def start_job(self, payload):
                plugin.payloads.append(dict(payload))
                handle = start_job(payload)
                if plugin.lose_first and len(plugin.payloads) == 1:
                    return LostNode(handle)
                return handle

            def close(self):
                pass

        class ModelsOnly:
            def place(self, request):
                raise UsageError("no")

            def close(self):
                pass

        register(ExecutorSpec(name="nodes", create=lambda context: Nodes()))
        register(ExecutorSpec(name="models-only", create=lambda context: ModelsOnly()))


def executor_kernel(home: Path, plugin: NodesPlugin, executor: str) -> Kernel:
    kernel = kernel_for(home, f'tuning.executor="{executor}"')
    kernel.load_plugins()
    kernel.plugins.register(plugin, "nodes-plugin")
    kernel.jobs.adopt = True
    kernel.start()
    add_base(kernel.registry, kernel.home)
    return kernel


def test_a_job_on_an_executor_whose_node_is_lost_resumes_from_its_checkpoint(
    tmp_path: Path, site: Path
) -> None:
    plugin = NodesPlugin(lose_first=True)
    kernel = executor_kernel(tmp_path / "home", plugin, "nodes")
    try:
        job = submit(kernel, steps=8, sleep=0.05)
        done = wait_done(kernel, job.id, timeout=60)
        assert done.state is JobState.SUCCEEDED, done.error
        assert done.attempts == 2, "queued again when its node was lost, not failed"
        assert len(plugin.payloads) == 2 and plugin.payloads[0]["job_id"] == job.id
        # the worker ran on "the node": its folders are the job's, on shared storage
        assert plugin.payloads[0]["checkpoint_dir"] == str(
            kernel.jobs.folder(job.id) / "checkpoints"
        )
        second = [r for r in records(kernel, job.id) if r["attempt"] == 2]
        assert second[0]["resumed_from"] >= 3, "the second node resumed from the checkpoint"
        assert kernel.registry.store.get(done.result["model"]).parents == ("base@1",)
    finally:
        kernel.stop()


def test_an_executor_that_runs_no_jobs_fails_the_job_saying_so(tmp_path: Path, site: Path) -> None:
    kernel = executor_kernel(tmp_path / "home", NodesPlugin(), "models-only")
    try:
        done = wait_done(kernel, submit(kernel, steps=2).id)
        assert done.state is JobState.FAILED
        assert "places models but runs no tuning jobs" in done.error
    finally:
        kernel.stop()
    with pytest.raises(ConfigError, match=r"executor 'nowhere'.*executors: local"):
        kernel_for(tmp_path / "other", 'tuning.executor="nowhere"').start()
