"""Tuning through the daemon's HTTP API and the ``llmos tune`` / ``llmos jobs`` commands.

Everything is real: the daemon on loopback, the job manager and its worker
processes, SQLite, and the console script in a subprocess; the tuning method
is the ``count`` plugin of :mod:`test_tuning_jobs`, found through entry
points by the daemon, the CLI and every worker.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread

from .conftest import LLMOS
from .test_tuning_jobs import DATA, add_base, add_count_plugin, kernel_for, wait_done


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "plugins"  # the console script's is "site" (conftest's env)
    add_count_plugin(folder)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("llmos_count", None)


@pytest.fixture
def kernel(tmp_path: Path, site: Path) -> Kernel:
    kernel = kernel_for(tmp_path / "daemon-home")
    add_base(kernel.registry, kernel.home)
    return kernel


@pytest.fixture
def url(kernel: Kernel) -> Iterator[str]:
    with serve_in_thread(kernel) as base_url:
        yield base_url


def job_body(**params: Any) -> dict[str, Any]:
    return {"model": "base", "method": "count", "data": DATA, "params": params}


def events(url: str, job_id: str) -> list[tuple[str, dict[str, Any]]]:
    """Every server-sent event of a job's stream, until it ends."""
    out: list[tuple[str, dict[str, Any]]] = []
    with httpx.stream("GET", f"{url}/api/tuning/jobs/{job_id}/events", timeout=30) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        kind = None
        for line in response.iter_lines():
            if line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: "):
                out.append((kind, json.loads(line[6:])))
    return out


def error_of(response: httpx.Response) -> dict[str, Any]:
    return response.json()["error"]


# --------------------------------------------------------------------- HTTP


def test_submit_follow_and_inspect_a_job(url: str) -> None:
    response = httpx.post(f"{url}/api/tuning/jobs", json=job_body(steps=3, sleep=0.02))
    assert response.status_code == 202, response.text
    job = response.json()["job"]
    assert response.headers["location"] == f"/api/tuning/jobs/{job['id']}"
    assert (job["state"], job["base"], job["name"]) == ("queued", "base@1", "base-count")

    stream = events(url, job["id"])
    assert [body["step"] for kind, body in stream if kind == "progress"] == [1, 2, 3]
    assert stream[0][0] == "state"
    kind, last = stream[-1]
    assert (kind, last["state"]) == ("state", "succeeded")
    assert last["result"]["model"] == "base-count@1"

    shown = httpx.get(f"{url}/api/tuning/jobs/{job['id']}").json()["job"]
    assert shown["result"]["scores"] == {"dev/accuracy": 1.0, "test/accuracy": 1.0}
    listed = httpx.get(f"{url}/api/tuning/jobs", params={"state": "succeeded"}).json()["jobs"]
    assert [j["id"] for j in listed] == [job["id"]]
    logs = httpx.get(f"{url}/api/tuning/jobs/{job['id']}/logs").json()["records"]
    assert [r["step"] for r in logs] == [1, 2, 3]
    card = httpx.get(f"{url}/api/models/base-count").json()["card"]
    assert card["parents"] == ["base@1"] and card["scores"]["test/accuracy"] == 1.0
    methods = httpx.get(f"{url}/api/tuning/methods").json()["methods"]
    assert [(m["name"], m["plugin"], m["tasks"]) for m in methods] == [
        ("count", "llmos-count", ["text-classification"])
    ]
    assert httpx.get(f"{url}/api/tuning/jobs/nope").status_code == 404
    assert httpx.get(f"{url}/api/tuning/jobs/nope/events").status_code == 404


def test_delete_cancels_a_running_job(url: str) -> None:
    job = httpx.post(f"{url}/api/tuning/jobs", json=job_body(steps=500, sleep=0.02)).json()["job"]
    logs = f"{url}/api/tuning/jobs/{job['id']}/logs"
    deadline = time.monotonic() + 20
    while not httpx.get(logs).json()["records"]:
        assert time.monotonic() < deadline, "no progress"
        time.sleep(0.05)
    response = httpx.delete(f"{url}/api/tuning/jobs/{job['id']}")
    assert response.status_code == 200 and response.json()["job"]["cancel_requested"]
    stream = events(url, job["id"])
    assert stream[-1][1]["state"] == "cancelled"
    again = httpx.delete(f"{url}/api/tuning/jobs/{job['id']}")
    assert again.status_code == 409 and "already cancelled" in error_of(again)["message"]
    assert httpx.delete(f"{url}/api/tuning/jobs/nope").status_code == 404


def test_microtune_waits_for_the_job_and_answers_with_the_model(url: str) -> None:
    body = {
        "model_name": "base",
        "task": "text classification",
        "data": DATA,
        "method": "count",
        "params": {"steps": 3},
    }
    response = httpx.post(f"{url}/microtune", json=body, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["message"] == "Model microtuned successfully"
    assert answer["model"] == "base-count@1"
    assert answer["scores"] == {"dev/accuracy": 1.0, "test/accuracy": 1.0}

    started = httpx.post(f"{url}/microtune", json={**body, "wait": False})
    assert started.status_code == 202
    assert started.json()["message"] == "Microtuning started"
    job_url = f"{url}/api/tuning/jobs/{started.json()['job']}"
    deadline = time.monotonic() + 20
    while (job := httpx.get(job_url).json()["job"])["state"] != "succeeded":
        assert job["state"] in ("queued", "running") and time.monotonic() < deadline, job
        time.sleep(0.05)
    assert job["result"]["model"] == "base-count@2"


def test_microtune_never_reports_a_failed_job_as_a_success(url: str) -> None:
    body = {"model_name": "base", "data": DATA, "method": "count", "params": {"crash_at": 1}}
    response = httpx.post(f"{url}/microtune", json=body, timeout=60)
    assert response.status_code == 500
    error = error_of(response)
    assert error["code"] == "tuning_failed" and "exit code 3" in error["message"]


def test_bad_requests_say_what_is_wrong(url: str, kernel: Kernel, tmp_path: Path) -> None:
    def post(path: str, body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{url}{path}", json=body)

    seed = {"model_name": "base", "data": DATA}
    no_lora = post("/microtune", seed)
    assert no_lora.status_code == 400
    assert (
        "'lora' is not installed; installed tuning methods: count (llmos-count)"
        in (error_of(no_lora)["message"])
    )
    unknown = post("/api/tuning/jobs", {**job_body(), "method": "nope"})
    assert unknown.status_code == 400 and "count (llmos-count)" in error_of(unknown)["message"]

    ghost = post("/api/tuning/jobs", {**job_body(), "model": "ghost"})
    assert ghost.status_code == 404 and "ghost" in error_of(ghost)["message"]

    # The seed document's base model: registered from a URL, never downloaded.
    registered = post(
        "/register",
        {"model_name": "bert-base-cased", "model_url": "https://example.invalid/bert-base-cased"},
    )
    assert registered.status_code == 201
    remote = post("/microtune", {**seed, "model_name": "bert-base-cased", "method": "count"})
    assert remote.status_code == 422
    assert error_of(remote)["code"] == "model_unavailable"
    assert "'https://example.invalid/bert-base-cased'" in error_of(remote)["message"]

    empty = post("/api/tuning/jobs", {**job_body(), "data": {**DATA, "test": []}})
    assert empty.status_code == 400 and "inline test: no rows" in error_of(empty)["message"]
    outside = tmp_path / "train.jsonl"
    outside.write_text("".join(json.dumps(r) + "\n" for r in DATA["train"]))
    refused = post("/api/tuning/jobs", {**job_body(), "data": {"train": str(outside)}})
    assert refused.status_code == 400
    assert "data.train" in error_of(refused)["message"]
    assert "outside the allowed roots" in error_of(refused)["message"]
    missing = post("/api/tuning/jobs", {"model": "base", "method": "count"})
    assert missing.status_code == 400 and error_of(missing)["param"] == "data"
    assert httpx.get(f"{url}/api/tuning/jobs").json()["jobs"] == []

    inside = kernel.home / "data" / "train.jsonl"
    inside.parent.mkdir()
    inside.write_text(outside.read_text())
    accepted = post("/api/tuning/jobs", {**job_body(steps=1), "data": {"train": str(inside)}})
    assert accepted.status_code == 202, accepted.text
    assert accepted.json()["job"]["data"]["sources"]["train"] == str(inside.resolve())


def test_bad_values_are_400s_that_name_their_place(url: str) -> None:
    def post(body: dict[str, Any]) -> httpx.Response:
        return httpx.post(f"{url}/api/tuning/jobs", json=body)

    typo = post(job_body(stepz=2))
    assert typo.status_code == 400 and error_of(typo)["param"] == "params.stepz"
    seed = post({**job_body(), "seed": 2**63})  # was a 500: SQLite holds 64-bit integers
    assert seed.status_code == 400 and error_of(seed)["param"] == "seed"
    assert "between 0 and 9223372036854775807" in error_of(seed)["message"]
    for path, why in (
        ("~no-such-user-x/train.jsonl", "'~no-such-user-x' is not expanded"),
        ("~/train.jsonl", "'~' is not expanded"),
        ("train.jsonl", "it is a relative path"),
        ("https://x/t.jsonl", "is a URL, which is not read here"),
    ):
        refused = post({**job_body(), "data": {"train": path}})
        assert refused.status_code == 400, (path, refused.text)
        assert error_of(refused)["param"] == "data.train"
        assert why in error_of(refused)["message"]
    seed_route = httpx.post(
        f"{url}/microtune",
        json={"model_name": "base", "method": "count", "data": DATA, "params": {"stepz": 1}},
    )
    assert seed_route.status_code == 400 and error_of(seed_route)["param"] == "params.stepz"
    assert httpx.get(f"{url}/api/tuning/jobs").json()["jobs"] == []


def test_relative_data_paths_are_400s_naming_the_split(
    url: str, kernel: Kernel, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = kernel.home / "data"
    data.mkdir()
    for split, rows in DATA.items():
        (data / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    files = {split: str(data / f"{split}.jsonl") for split in DATA}
    # In the daemon's data folder, "data/train.jsonl" would resolve to the file
    # above: the client meant its own folder, which the daemon cannot see.
    monkeypatch.chdir(kernel.home)
    for route, body in (
        ("/api/tuning/jobs", job_body(steps=1)),
        ("/microtune", {"model_name": "base", "method": "count", "params": {"steps": 1}}),
    ):
        for split in DATA:
            relative = f"data/{split}.jsonl"
            refused = httpx.post(f"{url}{route}", json={**body, "data": {**files, split: relative}})
            assert refused.status_code == 400, (route, split, refused.text)
            error = error_of(refused)
            assert error["param"] == f"data.{split}"
            assert error["message"].startswith(
                f"data.{split} {relative!r} refused: it is a relative path, and the daemon's"
                " working directory is not yours; give the absolute path"
            )
    assert httpx.get(f"{url}/api/tuning/jobs").json()["jobs"] == []
    accepted = httpx.post(f"{url}/api/tuning/jobs", json={**job_body(steps=1), "data": files})
    assert accepted.status_code == 202, accepted.text
    sources = accepted.json()["job"]["data"]["sources"]
    assert sources == {split: str((data / f"{split}.jsonl").resolve()) for split in DATA}
    wait_done(kernel, accepted.json()["job"]["id"])


def test_a_full_queue_answers_429_until_a_job_ends(tmp_path: Path, site: Path) -> None:
    kernel = kernel_for(tmp_path / "capped", "tuning.max_queued_jobs=2")
    add_base(kernel.registry, kernel.home)
    with serve_in_thread(kernel) as url:
        jobs = f"{url}/api/tuning/jobs"
        accepted = [httpx.post(jobs, json=job_body(steps=500, sleep=0.02)) for _ in range(2)]
        assert [r.status_code for r in accepted] == [202, 202]
        refused = httpx.post(jobs, json=job_body(steps=1))
        assert refused.status_code == 429
        assert refused.headers["retry-after"] == "60"
        error = error_of(refused)
        assert error["code"] == "tuning_queue_full" and error["type"] == "rate_limit_error"
        assert "[tuning] max_queued_jobs is 2" in error["message"]
        seed = {"model_name": "base", "method": "count", "data": DATA, "wait": False}
        assert httpx.post(f"{url}/microtune", json=seed).status_code == 429
        assert len(httpx.get(jobs).json()["jobs"]) == 2

        first = accepted[0].json()["job"]["id"]
        assert httpx.delete(f"{jobs}/{first}").status_code == 200
        assert events(url, first)[-1][1]["state"] == "cancelled"
        again = httpx.post(jobs, json=job_body(steps=1))
        assert again.status_code == 202, again.text
        assert len(httpx.get(jobs).json()["jobs"]) == 3


# ---------------------------------------------------------------------- CLI


@pytest.fixture
def cli_env(env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    """The console script's environment: its own home with a base model, the
    count plugin on PYTHONPATH, and the data as JSON Lines files."""
    add_count_plugin(Path(env["PYTHONPATH"]))
    env["LLMOS_LOAD_PLUGINS"] = "llmos-count"
    home = Path(env["LLMOS_HOME"])
    registry = kernel_for(home).registry
    add_base(registry, home)
    registry.close()
    for split, rows in DATA.items():
        (tmp_path / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return env


def run(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    assert LLMOS, "the llmos console script is not installed"
    return subprocess.run(
        [LLMOS, *args], env=env, capture_output=True, text=True, timeout=60, check=False
    )


def splits(folder: Path) -> list[str]:
    return [f"--{s}={folder / f'{s}.jsonl'}" for s in ("train", "dev", "test")]


def test_tune_and_jobs_commands_on_the_local_data_folder(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    tuned = run(
        cli_env,
        *("tune", "--model", "base", "--method", "count", *splits(tmp_path)),
        *("--param", "steps=3", "--param", "count.sleep=0.01", "--seed", "5"),
        *("--name", "tuned", "--json"),
    )
    assert tuned.returncode == 0, tuned.stderr
    job = json.loads(tuned.stdout)
    assert job["state"] == "succeeded" and job["result"]["model"] == "tuned@1"
    assert job["params"] == {"steps": 3, "sleep": 0.01} and job["seed"] == 5

    table = run(cli_env, "tune", "--model", "base", "--method", "count", *splits(tmp_path))
    assert table.returncode == 0, table.stderr
    assert "base-count@1" in table.stdout and "test/accuracy" in table.stdout

    listed = run(cli_env, "jobs", "list", "--json")
    assert [j["state"] for j in json.loads(listed.stdout)] == ["succeeded", "succeeded"]
    shown = json.loads(run(cli_env, "jobs", "show", job["id"], "--json").stdout)
    assert shown["result"] == job["result"]
    logs = run(cli_env, "jobs", "logs", job["id"], "--json").stdout.splitlines()
    assert [json.loads(line)["step"] for line in logs] == [1, 2, 3]
    human = run(cli_env, "jobs", "logs", job["id"]).stdout
    assert "step 3/3" in human and "loss 0.3333" in human
    cancel = run(cli_env, "jobs", "cancel", job["id"])
    assert cancel.returncode == 1 and "already succeeded" in cancel.stderr

    crashed = run(
        cli_env, "tune", "--model", "base", "--method", "count", *splits(tmp_path),
        "--param", "crash_at=2",
    )  # fmt: skip
    assert crashed.returncode == 1
    error = crashed.stderr.splitlines()[-1]  # after the progress bar
    assert error.startswith("error: tuning job ") and "exit code 3" in error
    bad = run(cli_env, "tune", "--model", "base", "--train", str(tmp_path / "train.jsonl"))
    assert bad.returncode == 2 and "installed tuning methods: count" in bad.stderr
    bad_param = run(cli_env, "tune", "--model", "base", "--train", "x", "--param", "r")
    assert bad_param.returncode == 2 and "--param 'r': expected KEY=VALUE" in bad_param.stderr


def test_tune_no_wait_queues_the_job_for_a_daemon_on_the_same_home(
    cli_env: dict[str, str], tmp_path: Path, site: Path
) -> None:
    queued = run(
        cli_env,
        *("tune", "--model", "base", "--method", "count", *splits(tmp_path), "--no-wait", "--json"),
    )
    assert queued.returncode == 0, queued.stderr
    job = json.loads(queued.stdout)
    assert job["state"] == "queued"
    home = Path(cli_env["LLMOS_HOME"])
    bystander = kernel_for(home)  # `llmos chat` and the like: they adopt nothing
    bystander.start()
    time.sleep(0.6)
    assert bystander.jobs.get(job["id"]).state == "queued"
    bystander.stop()
    daemon = kernel_for(home)
    with serve_in_thread(daemon):
        assert wait_done(daemon, job["id"]).state == "succeeded"


def test_tune_and_jobs_against_a_daemon(cli_env: dict[str, str], url: str, tmp_path: Path) -> None:
    tuned = run(
        cli_env,
        *("tune", "--url", url, "--model", "base", "--method", "count", *splits(tmp_path)),
        *("--param", "steps=2", "--json"),
    )
    assert tuned.returncode == 0, tuned.stderr
    job = json.loads(tuned.stdout)
    assert job["state"] == "succeeded" and job["result"]["model"] == "base-count@1"
    assert job["data"]["sources"] == {"train": "inline", "dev": "inline", "test": "inline"}

    listed = run(cli_env, "jobs", "list", "--url", url, "--json")
    assert [j["id"] for j in json.loads(listed.stdout)] == [job["id"]]
    local = run(cli_env, "jobs", "list", "--json")
    assert json.loads(local.stdout) == [], "the CLI's own data folder has no jobs"
    followed = run(cli_env, "jobs", "logs", job["id"], "--follow", "--url", url)
    assert followed.returncode == 0, followed.stderr
    assert "step 2/2" in followed.stdout and f"job {job['id']} succeeded" in followed.stdout
    missing = run(cli_env, "jobs", "show", "nope", "--url", url)
    assert missing.returncode == 4 and "no tuning job 'nope'" in missing.stderr
