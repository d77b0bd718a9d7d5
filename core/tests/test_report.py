"""``llmos report``: the sqlite sink's history drawn as a PNG or a
self-contained HTML page, its figures as JSON, and the errors a user can
make; on events with hand-set times (exact figures) and on a real kernel's
traffic."""

from __future__ import annotations

import base64
import json
import struct
import sys
import time
from datetime import UTC, datetime
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner, Result

from llmos.cli import cli, main
from llmos.default_plugins.sqlite_sink import SqliteSink
from llmos.monitor.metrics import Sketch
from llmos.monitor.report import auto_step
from llmos.monitor.store import db_path
from llmos.types import Capability, ClassifyRequest, MonitorEvent

from .tables import add, install, table_kernel

PNG = b"\x89PNG\r\n\x1a\n"
#: two hours ago, on a whole five minutes (a coarse bucket)
T0 = (time.time() // 300) * 300 - 7200


def at(seconds: float) -> datetime:
    return datetime.fromtimestamp(seconds, UTC)


def local(seconds: float) -> str:
    """An ISO time as ``--since`` takes it (local, no zone)."""
    return datetime.fromtimestamp(seconds).isoformat()


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == PNG
    assert data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


#: the latencies of m@1's requests, by minute
LATENCIES = [0.01 * (1 + (i % 17)) for i in range(600)]


def alert(t: float, status: str, value: float) -> MonitorEvent:
    """The ``slow`` rule on ``m@1`` (p95 latency above 150 ms)."""
    fields = {"alert": "slow", "metric": "latency_p95_ms", "op": ">", "threshold": 150.0}
    return MonitorEvent(
        kind=f"alert.{status}",
        time=at(t),
        model="m@1",
        fields={**fields, "value": value, "severity": "warning"},
    )


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An hour of traffic for ``m@1`` (600 rows: 30 failed, 2 of them timeouts),
    a little for ``other``; an alert that fires and resolves; a tuning job
    whose base is ``m@1`` and one of another model."""
    folder = tmp_path_factory.mktemp("report") / "home"
    events = []
    for i, latency in enumerate(LATENCIES):
        fields: dict[str, Any] = {
            "latency_s": latency,
            "queue_wait_s": latency / 4,
            "batch_size": 1 + i % 4,
            "tokens_in": 10,
            "tokens_out": 20,
        }
        if i % 20 == 0:
            fields.update(status="error", error="timeout" if i % 300 == 0 else "overloaded")
        events.append(
            MonitorEvent(
                kind="request",
                time=at(T0 + i * 6),
                model="m@1",
                capability="classify",
                fields={"status": "ok", "requests": 1, **fields},
            )
        )
    events += [
        MonitorEvent(kind="request", time=at(T0 + 5), model="other", fields={"status": "ok"}),
        alert(T0 + 1200, "firing", value=170.0),
        alert(T0 + 1800, "resolved", value=90.0),
        MonitorEvent(
            kind="alert.firing", time=at(T0 + 1500), model="other", fields={"alert": "theirs"}
        ),
        MonitorEvent(
            kind="tuning.job",
            time=at(T0 + 60),
            model="acme/m-lora",
            fields={"job": "job-mine", "state": "running", "method": "lora", "base": "m@1"},
        ),
        MonitorEvent(
            kind="tuning.job",
            time=at(T0 + 60),
            model="acme/x-lora",
            fields={"job": "job-theirs", "state": "running", "method": "lora", "base": "other"},
        ),
    ]
    for step in range(1, 41):
        for job, model in (("job-mine", "acme/m-lora"), ("job-theirs", "acme/x-lora")):
            events.append(
                MonitorEvent(
                    kind="tuning.progress",
                    time=at(T0 + 60 + step * 30),
                    model=model,
                    fields={"job": job, "step": step, "loss": 2.0 / step, "epoch": step / 40},
                )
            )
    sink = SqliteSink({})
    sink.open(db_path(folder))
    for e in events:
        sink.emit(e)
    sink.close()
    assert sink.written == len(events)
    return folder


def report(*args: str) -> Result:
    return CliRunner().invoke(cli, ["report", *args], catch_exceptions=False)


def failing(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    """The exit code and stderr of ``llmos report ARGS`` (through ``main``,
    which turns errors into exit codes)."""
    code = main(["report", *args])
    return code, capsys.readouterr().err


def window(home: Path, *more: str) -> list[str]:
    return ["--home", str(home), "--since", local(T0 - 300), "--until", local(T0 + 3900), *more]


def test_json_has_the_exact_figures(home: Path) -> None:
    result = report("m", *window(home, "--json"))
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["models"] == ["m@1"] and data["out"] is None
    summary = data["summary"]
    assert (summary["requests"], summary["ok"], summary["errors"]) == (600, 570, 30)
    assert summary["errors_by_kind"] == {"overloaded": 28, "timeout": 2}
    assert (summary["tokens_in"], summary["tokens_out"]) == (6000, 12000)
    assert summary["seconds"] == 3600.0 and summary["rps"] == pytest.approx(600 / 3600)
    sketch = Sketch()
    for latency in LATENCIES:
        sketch.add(latency)
    for label, q in (("p50", 0.5), ("p95", 0.95), ("p99", 0.99)):
        assert summary[f"latency_{label}_ms"] == sketch.quantile(q) * 1000
    assert summary["batch_size_mean"] == 2.5 and summary["batch_size_max"] == 4
    # points every automatic step; every row is in one of them
    assert data["step_s"] == auto_step(4200) == 60
    assert sum(p["requests"] for p in data["points"]) == 600
    assert [(a["status"], a["alert"]) for a in data["alerts"]] == [
        ("firing", "slow"),
        ("resolved", "slow"),
    ]
    (job,) = data["jobs"]
    assert (job["job"], job["base"], len(job["points"])) == ("job-mine", "m@1", 40)
    assert job["points"][-1]["loss"] == 2.0 / 40


def test_png_is_one_figure_of_every_chart(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.png"
    result = report("m", *window(home, "--out", str(out)))
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"wrote {out}: m, 600 requests")
    data = out.read_bytes()
    width, height = png_size(data)
    # five charts (the tuning one too) and the summary, one under the other
    assert (width, height) == (1100, round(100 * (2.9 * 5 + 3.2)))
    assert len(data) > 100_000


class _Page(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.images: list[str] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self.cells: list[tuple[str, str]] = []
        self._row: list[str] = []
        self._text = ""

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.add(tag)
        for name, value in attrs:
            if name in ("src", "href") and value:
                (self.images if tag == "img" else self.urls).append(value)
        if tag == "tr":
            self._row = []
        self._text = ""

    def handle_data(self, data: str) -> None:
        self._text += data

    def handle_endtag(self, tag: str) -> None:
        if tag in ("th", "td"):
            self._row.append(self._text.strip())
        if tag == "tr" and len(self._row) == 2:
            self.cells.append((self._row[0], self._row[1]))


def test_html_page_holds_everything_itself(home: Path, tmp_path: Path) -> None:
    out = tmp_path / "report.html"
    result = report("m", *window(home, "--out", str(out)))
    assert result.exit_code == 0, result.output
    text = out.read_text(encoding="utf-8")
    page = _Page()
    page.feed(text)
    assert "<title>llmos report: m</title>" in text
    assert len(page.images) == 5
    for src in page.images:
        assert src.startswith("data:image/png;base64,")
        png_size(base64.b64decode(src.partition(",")[2]))
    assert page.urls == [] and not {"script", "link", "iframe"} & page.tags
    assert "http:" not in text and "https:" not in text
    summary = dict(page.cells)
    assert summary["requests"] == "600"
    assert summary["errors"] == "30" and summary["error rate"] == "5.00%"
    assert summary["errors by kind"] == "overloaded 28, timeout 2"
    assert summary["tokens in / out"] == "6000 / 12000"
    assert "slow" in text and "theirs" not in text  # the alert list: this model's only
    assert "job-mine" in text and "job-theirs" not in text


def test_a_version_is_a_model_of_its_own(home: Path) -> None:
    result = report("other", *window(home, "--json"))
    data = json.loads(result.output)
    assert data["summary"]["requests"] == 1
    assert [a["alert"] for a in data["alerts"]] == ["theirs"]
    assert [j["job"] for j in data["jobs"]] == ["job-theirs"]
    assert json.loads(report("m@1", *window(home, "--json")).output)["summary"]["requests"] == 600


def test_an_unknown_model_names_those_with_history(home: Path, capsys) -> None:
    code, err = failing(capsys, "nope", *window(home, "--json"))
    assert code == 4
    assert err.startswith("error: no monitor history for 'nope'")
    assert err.rstrip().endswith("models with history: m@1, other")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--out", "report.pdf"], "a report is written as .html or .png"),
        ([], "give --out report.html or --out report.png (or --json)"),
        (["--json", "--step", "soon"], "--step: 'soon' is not a duration"),
        (["--json", "--since", "yesterday"], "--since: 'yesterday' is neither a duration ago"),
        (["--json", "--since", "1h", "--until", "2h"], "--since must come before --until"),
        (["--json", "--step", "0.1s"], "give a larger --step"),
    ],
)
def test_usage_errors_say_what_to_do(home: Path, args: list[str], message: str, capsys) -> None:
    code, err = failing(capsys, "m", "--home", str(home), *args)
    assert code == 2
    assert message in err


def test_no_history_at_all(tmp_path: Path, capsys) -> None:
    code, err = failing(capsys, "m", "--home", str(tmp_path), "--json")
    assert code == 4
    assert f"error: no monitor history at {tmp_path / 'monitor' / 'metrics.db'}" in err


def test_without_matplotlib_the_error_says_what_to_install(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    for name in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, name, None)  # as if not installed
    code, err = failing(capsys, "m", *window(home, "--out", str(tmp_path / "r.png")))
    assert code == 2
    assert "pip install 'llmos[report]'" in err
    assert not (tmp_path / "r.png").exists()
    # the figures alone need no matplotlib
    assert report("m", *window(home, "--json")).exit_code == 0


def test_coarse_history_raises_the_step(tmp_path: Path) -> None:
    home = tmp_path / "home"
    old = T0 - 3 * 86400
    sink = SqliteSink({}, clock=lambda: time.time())
    sink.open(db_path(home))
    for i in range(60):
        sink.emit(
            MonitorEvent(kind="request", time=at(old + i * 10), model="m", fields={"status": "ok"})
        )
    sink.close()
    # reopened: three days old, the fine buckets were merged into 5-minute ones
    reopened = SqliteSink({})
    reopened.open(db_path(home))
    reopened.close()
    args = ["--home", str(home), "--since", local(old - 600), "--until", local(old + 1200)]
    data = json.loads(report("m", *args, "--step", "10s", "--json").output)
    assert data["step_s"] == 300 and "step raised to 300s" in data["note"]
    assert sum(p["requests"] for p in data["points"]) == 60


def test_a_kernels_traffic_makes_a_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A real kernel serves a table model; its sink writes; the report,
    with the kernel stopped, reads it."""
    for _ in install(tmp_path / "site", monkeypatch):
        home = tmp_path / "home"
        kernel = table_kernel(home, [])
        add(kernel, "t", default={"pos": 1.0})
        add(kernel, "broken", fail=True)
        kernel.start()
        try:
            for _ in range(12):
                kernel.call("t", Capability.CLASSIFY, [ClassifyRequest(text="x")] * 3)
            with pytest.raises(RuntimeError):
                kernel.call("broken", Capability.CLASSIFY, [ClassifyRequest(text="x")])
        finally:
            kernel.stop()
        out = tmp_path / "t.html"
        monkeypatch.setenv("LLMOS_HOME", str(home))  # the config's home: no --home
        result = report("t", "--since", "10m", "--out", str(out))
        assert result.exit_code == 0, result.output
        page = _Page()
        page.feed(out.read_text(encoding="utf-8"))
        summary = dict(page.cells)
        assert (summary["requests"], summary["errors"], summary["model calls"]) == ("36", "0", "12")
        assert summary["by capability"] == "classify 36"
        data = json.loads(report("broken", "--since", "10m", "--json").output)
        assert data["models"] == ["broken@1"]
        assert data["summary"]["errors"] == 1
        assert data["summary"]["errors_by_kind"] == {"RuntimeError": 1}
