"""The dashboard at ``/``: its page and assets as served (types, the
Content-Security-Policy, no address of another host, open without a key while
the data is not), the wheel that ships them, and the page itself in Debian's
headless Chromium driven by Playwright against a real daemon on loopback
while traffic runs: ``table`` models (:mod:`tables`), one slow, one failing a
quarter of its requests, an alert rule that fires, and a real tuning job (a
method in a plugin of its own, run in the job manager's worker process) whose
loss and dev accuracy the page charts.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import sys
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.server import create_app
from llmos.server.dashboard import ASSETS, CONTENT_SECURITY_POLICY
from llmos.testing import (
    RunningDaemon,
    serve_app,
    system_tool,
    write_distribution,
    write_safetensors,
)
from llmos.types import ModelCard

from .tables import add, install, table_kernel
from .test_server import BlockingStartup

KEY = "dashboard-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
CORE = Path(__file__).resolve().parents[1]

# A tuning method whose loss falls by itself, with a dev accuracy every fourth step.
ANNEAL = """
import math
import time

from llmos.plugin import hookimpl
from llmos.testing import write_safetensors
from llmos.types import ModelCard, TuningMethodSpec, TuningResult


def run(request):
    steps = int(request.hyperparameters["steps"])
    accuracy = 0.5
    for step in range(1, steps + 1):
        figures = {"step": step, "total_steps": steps, "loss": 0.1 + 2 * math.exp(-step / 6)}
        if step % 4 == 0:
            accuracy = round(1 - 0.5 * math.exp(-step / 8), 4)
            figures["dev/accuracy"] = accuracy
        request.report(figures)
        time.sleep(float(request.hyperparameters["sleep"]))
    weights = request.output_dir / "model.safetensors"
    write_safetensors(weights, {"w": [1, 1]})
    card = ModelCard(name=request.base.name, provider="table", source=str(weights))
    return TuningResult(card=card, scores={"dev/accuracy": accuracy})


@hookimpl
def llmos_register_tuning_methods(register):
    register(TuningMethodSpec(
        name="anneal", run=run, tasks=("text-classification",),
        defaults={"steps": 24, "sleep": 0.05}, description="a loss that falls by itself",
    ))
"""

ROWS = [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}]

#: what the machine notes ask of Debian's chromium here (root, no GPU, a closed network)
CHROMIUM_FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """``llmos-table`` and ``llmos-anneal`` in a folder on the path."""
    folder = tmp_path / "site"
    table = install(folder, monkeypatch)
    next(table)
    write_distribution(folder, "llmos-anneal", ANNEAL)
    yield folder
    next(table, None)
    sys.modules.pop("llmos_anneal", None)


@pytest.fixture
def start_daemon(tmp_path: Path, site: Path) -> Iterator[Callable[..., RunningDaemon]]:
    """``start_daemon(*overrides, models=True, plugin=None, wait_ready=True)``:
    a daemon on loopback with 0.5 s buckets (and ``plugin`` registered); with
    ``models``, ``slow`` (30 ms a call, with weights to tune) and ``flaky``
    (fails while ``tmp_path/flaky.down`` exists)."""
    with ExitStack() as stack:

        def start(
            *overrides: str, models: bool = True, plugin: object = None, wait_ready: bool = True
        ) -> RunningDaemon:
            kernel = table_kernel(
                tmp_path / "home",
                [
                    'plugins.load=["llmos-table", "llmos-anneal"]',
                    "monitor.bucket_s=0.5",
                    "monitor.sample_every_s=0.5",
                    "monitor.evaluate_every_s=0.5",
                    *overrides,
                ],
                plugin,
            )
            if models:
                weights = kernel.home / "models" / "slow" / "model.safetensors"
                write_safetensors(weights, {"w": [2, 2]})
                options = {"delay_s": 0.03, "capabilities": ["complete", "classify"]}
                kernel.registry.register(
                    ModelCard(name="slow", provider="table", source=str(weights), options=options)
                )
                add(kernel, "flaky", fail_file=str(tmp_path / "flaky.down"))
            return stack.enter_context(serve_app(create_app(kernel), wait_ready=wait_ready))

        yield start


class _Refs(HTMLParser):
    """Every src and href of a page."""

    def __init__(self) -> None:
        super().__init__()
        self.refs: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.refs += [v or "" for k, v in attrs if k in ("src", "href")]


# --------------------------------------------------------------------------
# The page and its assets, over HTTP
# --------------------------------------------------------------------------


def test_page_and_assets_are_served_offline_with_a_strict_policy_and_no_key(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon(f'server.api_keys=["{KEY}"]', models=False)
    with httpx.Client(base_url=daemon.url, timeout=10) as client:
        # The page and its assets hold no data: no key needed ...
        page = client.get("/")
        assert page.status_code == 200, page.text
        assert page.headers["content-type"] == "text/html; charset=utf-8"
        # ... while the data they show needs one.
        assert client.get("/api/monitor/summary").status_code == 401
        assert client.get("/api/monitor/summary", headers=AUTH).status_code == 200

        bodies = {"index.html": page}
        for name, content_type in ASSETS.items():
            if name != "index.html":
                bodies[name] = client.get(f"/dashboard/{name}")
                assert bodies[name].status_code == 200, name
                assert bodies[name].headers["content-type"] == content_type
        for name, response in bodies.items():
            assert response.headers["content-security-policy"] == CONTENT_SECURITY_POLICY
            assert response.headers["x-content-type-options"] == "nosniff"
            # Nothing from another host, not even a namespace URI.
            assert not re.search(r"(?i)\b(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", response.text), name
            assert "http:" not in response.text and "https:" not in response.text, name

        policy = dict(part.split(" ", 1) for part in CONTENT_SECURITY_POLICY.split("; "))
        assert policy["default-src"] == "'self'"
        assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
        assert policy["connect-src"] == "'self'" and policy["frame-ancestors"] == "'none'"

        # Every reference of the page is to this daemon's assets (or its own
        # fragment, or the empty icon), and there is no inline script or style.
        refs = _Refs()
        refs.feed(page.text)
        assert refs.refs and all(
            r.startswith("/dashboard/") or r.startswith("#") or r == "data:," for r in refs.refs
        ), refs.refs
        own = {r.removeprefix("/dashboard/") for r in refs.refs if r.startswith("/dashboard/")}
        assert own == {"app.js", "app.css"}  # and app.js imports charts.js:
        assert 'from "./charts.js"' in bodies["app.js"].text
        assert not re.search(r"<script(?![^>]*\bsrc=)[^>]*>", page.text)
        assert "<style" not in page.text and " style=" not in page.text
        assert not re.search(r"\son[a-z]+=", page.text)  # no inline handlers

        # Revalidation is cheap. Only the page's own files are open: any other
        # name needs the key like every other route, and is not there.
        etag = bodies["app.js"].headers["etag"]
        again = client.get("/dashboard/app.js", headers={"If-None-Match": etag})
        assert again.status_code == 304 and again.content == b""
        for missing in ("/dashboard/index.html", "/dashboard/nope.js", "/dashboard/..%2fapp.py"):
            assert client.get(missing).status_code == 401, missing
            response = client.get(missing, headers=AUTH)
            assert response.status_code == 404, missing
            assert response.json()["error"]["code"] == "not_found"


def test_the_page_loads_while_the_kernel_starts(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    blocker = BlockingStartup()
    daemon = start_daemon(models=False, plugin=blocker, wait_ready=False)
    try:
        assert httpx.get(f"{daemon.url}/", timeout=10).status_code == 200
        assert httpx.get(f"{daemon.url}/dashboard/app.js", timeout=10).status_code == 200
        # its data waits, and says why (the page shows that message)
        summary = httpx.get(f"{daemon.url}/api/monitor/summary", timeout=10)
        assert summary.status_code == 503
        assert "starting" in summary.json()["error"]["message"]
    finally:
        blocker.release.set()


def test_summary_says_the_finest_step_and_the_longest_window(
    start_daemon: Callable[..., RunningDaemon],
) -> None:
    daemon = start_daemon("monitor.keep_s=900", models=False)
    summary = httpx.get(f"{daemon.url}/api/monitor/summary", timeout=10).json()
    assert (summary["bucket_s"], summary["keep_s"]) == (0.5, 900.0)


def test_the_wheel_ships_the_dashboard(tmp_path: Path) -> None:
    from hatchling.builders.wheel import WheelBuilder

    wheel = Path(next(iter(WheelBuilder(str(CORE)).build(directory=str(tmp_path)))))
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        shipped = {
            name: archive.read(f"llmos/server/static/dashboard/{name}")
            for name in ASSETS
            if f"llmos/server/static/dashboard/{name}" in names
        }
    folder = CORE / "src" / "llmos" / "server" / "static" / "dashboard"
    assert shipped == {name: (folder / name).read_bytes() for name in ASSETS}


# --------------------------------------------------------------------------
# The page in headless Chromium
# --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    chromium = system_tool("chromium")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=chromium, headless=True, args=CHROMIUM_FLAGS
        )
        yield launched
        launched.close()


@pytest.fixture
def page(browser: Any) -> Iterator[Any]:
    """A fresh tab (its own sessionStorage) that records what goes wrong:
    ``page.problems`` lists uncaught errors, console errors other than failed
    loads (a 401 or a stopped daemon is expected to log those), and any
    Content-Security-Policy violation."""
    context = browser.new_context(viewport={"width": 1440, "height": 900})
    tab = context.new_page()
    problems: list[str] = []
    tab.on("pageerror", lambda error: problems.append(f"uncaught: {error}"))

    def console(message: Any) -> None:
        if message.type == "error" and not message.text.startswith("Failed to load resource"):
            problems.append(f"console: {message.text}")

    tab.on("console", console)
    tab.problems = problems
    yield tab
    context.close()


def save_screenshot(page: Any, path: Path) -> None:
    page.screenshot(path=str(path), full_page=True)
    target = os.environ.get("LLMOS_SCREENSHOT_DIR")
    if target:
        Path(target).mkdir(parents=True, exist_ok=True)
        shutil.copy(path, Path(target) / path.name)


def traffic(url: str, stop: threading.Event, down: Path, counts: dict[str, int]) -> None:
    """Completions to ``slow``; classifications to ``flaky``, every fourth
    one while it is down."""
    with httpx.Client(base_url=url, headers=AUTH, timeout=30) as client:
        n = 0
        while not stop.is_set():
            response = client.post("/v1/completions", json={"model": "slow", "prompt": "hi"})
            counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1
            if n % 4 == 0:
                down.touch()
            response = client.post("/api/classify", json={"model": "flaky", "texts": ["x"]})
            counts[str(response.status_code)] = counts.get(str(response.status_code), 0) + 1
            down.unlink(missing_ok=True)
            n += 1


def wait_until(check: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        last = check()
        if last and last[0]:
            return last
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}: {last}")


def cell(page: Any, model: str, field: str) -> tuple[str, str]:
    """A models-table cell of ``model``: its raw value and its text."""
    found = page.locator(f'#models tr[data-model="{model}"] [data-field="{field}"]')
    return found.get_attribute("data-value"), found.inner_text().strip()


def series_path(page: Any, chart: str, series: str) -> dict[str, str]:
    path = page.locator(f'#{chart} path[data-series="{series}"]')
    return {"points": path.get_attribute("data-points"), "last": path.get_attribute("data-last")}


def last_value(points: list[dict[str, Any]], key: str) -> float | None:
    values = [p[key] for p in points if p[key] is not None]
    return values[-1] if values else None


# The page is ready once: the latency chart has three points or more, the
# table a nonzero request rate, the tuning job its loss and dev curves, an
# alert fires and the failing model's advice is there.
DRAWN = """() => {
  const q = (s) => document.querySelector(s);
  const points = (s) => Number((q(s) || {dataset: {}}).dataset.points || 0);
  const rps = q('#models tr[data-model="slow@1"] [data-field="rps"]');
  return points('#chart-latency path[data-series="latency_p95_ms"]') >= 3
    && points('#chart-rps path[data-series="rps"]') >= 3
    && rps && Number(rps.dataset.value) > 0
    && points('#jobs [data-job] path[data-series="loss"]') >= 24
    && points('#jobs [data-job] path[data-series="dev/accuracy"]') >= 6
    && q('#alerts [data-alert="slow-latency"][data-status="firing"]') !== null
    && q('#advice [data-advice="errors"]') !== null;
}"""


def test_dashboard_draws_live_traffic_in_chromium(
    start_daemon: Callable[..., RunningDaemon], page: Any, tmp_path: Path
) -> None:
    daemon = start_daemon(
        f'server.api_keys=["{KEY}"]',
        'alerts.slow-latency.metric="latency_p95_ms"',
        'alerts.slow-latency.model="slow*"',
        "alerts.slow-latency.threshold=10",
        'alerts.slow-latency.window="30s"',
        'alerts.slow-latency.description="slow answers slowly"',
    )
    api = httpx.Client(base_url=daemon.url, headers=AUTH, timeout=10)
    stop = threading.Event()
    counts: dict[str, int] = {}
    runner = threading.Thread(
        target=traffic, args=(daemon.url, stop, tmp_path / "flaky.down", counts), daemon=True
    )
    try:
        # Keys are configured: the page loads, asks for one, and uses it.
        page.goto(daemon.url + "/")
        page.wait_for_selector("#key-panel:not([hidden])", timeout=15_000)
        assert page.locator("#status").get_attribute("data-state") == "auth"
        assert "API key" in page.locator("#key-message").inner_text()

        runner.start()
        job = api.post(
            "/api/tuning/jobs",
            json={
                "model": "slow",
                "method": "anneal",
                "data": {"train": ROWS, "dev": ROWS},
                "name": "slow-annealed",
                "params": {"steps": 24, "sleep": 0.05},
            },
        )
        assert job.status_code in (200, 201, 202), job.text

        page.fill("#key-input", KEY)
        page.click("#key-form button[type=submit]")
        page.wait_for_function(DRAWN, timeout=60_000, polling=250)
        assert page.locator("#key-panel").is_hidden()
        assert page.locator("#status").get_attribute("data-state") == "live"
        save_screenshot(page, tmp_path / "dashboard.png")
        assert (tmp_path / "dashboard.png").stat().st_size > 20_000

        # Stop the traffic; once the page has polled again, what it shows is
        # what the API says.
        stop.set()
        runner.join(30)
        assert counts.get("200", 0) > 10 and counts.get("503", 0) > 0, counts

        def settled() -> tuple[bool, Any]:
            summary = api.get("/api/monitor/summary", params={"window": 300}).json()
            figures = summary["models"]["slow@1"]
            shown = cell(page, "slow@1", "requests")[0]
            return shown == str(figures["requests"]), (shown, figures["requests"], summary)

        summary = wait_until(settled, 15, "the page to show the API's request count")[1][2]
        slow, flaky = summary["models"]["slow@1"], summary["models"]["flaky@1"]
        for field in ("requests", "latency_p50_ms", "latency_p95_ms", "latency_p99_ms"):
            raw, text = cell(page, "slow@1", field)
            assert float(raw) == slow[field], field
            if field == "requests":
                assert text == f"{slow['requests']:,}"
            else:  # 30 ms calls: one decimal
                assert 10 <= slow[field] < 100 and text == f"{slow[field]:.1f} ms", (field, text)
        assert float(cell(page, "flaky@1", "errors")[0]) == flaky["errors"] > 0
        assert cell(page, "flaky@1", "errors")[1].startswith(f"{flaky['errors']:,}")
        # the rate shown is the requests shown over the window the page was told
        window_s = float(page.locator("#models").get_attribute("data-window-s"))
        assert float(cell(page, "slow@1", "rps")[0]) == pytest.approx(
            slow["requests"] / window_s, rel=1e-9
        )
        assert float(cell(page, "slow@1", "rps")[0]) == pytest.approx(slow["rps"], rel=0.25)

        # The latency chart's last point is the API's (same window and step).
        step = max(300 / 150, summary["bucket_s"])

        def chart_matches() -> tuple[bool, Any]:
            series = api.get("/api/monitor/series", params={"window": 300, "step": step})
            points = series.json()["points"]
            drawn = series_path(page, "chart-latency", "latency_p95_ms")
            want = last_value(points, "latency_p95_ms")
            return drawn["last"] != "" and float(drawn["last"]) == want, (drawn, want)

        wait_until(chart_matches, 10, "the latency chart to end on the API's last point")

        # The tuning job's curves are the reported figures.
        jobs = api.get("/api/monitor/jobs").json()["data"]
        (tuned,) = [j for j in jobs if j["model"] == "slow-annealed"]
        loss = series_path(page, f'jobs [data-job="{tuned["job"]}"]', "loss")
        assert int(loss["points"]) == 24
        assert float(loss["last"]) == pytest.approx(0.1 + 2 * math.exp(-4), rel=1e-9)
        dev = series_path(page, f'jobs [data-job="{tuned["job"]}"]', "dev/accuracy")
        assert int(dev["points"]) == 6

        # Alerts and advice are the API's.
        firing = [a for a in summary["alerts_firing"] if a["alert"] == "slow-latency"]
        assert firing and firing[0]["model"] == "slow@1"
        assert page.locator('#kpis [data-kpi="alerts"]').get_attribute("data-value") == str(
            len(summary["alerts_firing"])
        )
        advice = api.get("/api/advice", params={"window": 300}).json()["data"]
        errors = [a for a in advice if a["id"] == "errors"]
        assert errors and errors[0]["model"] == "flaky@1"
        card = page.locator('#advice [data-advice="errors"]')
        assert errors[0]["title"] in card.inner_text()
        assert "error_rate" in card.locator("dl.evidence").inner_text()

        # Charting one model: a click on its row.
        page.click('#models tr[data-model="flaky@1"] .model-link')
        page.wait_for_function(
            """() => document.querySelector('#charts-title').textContent.includes('flaky@1')
                 && Number(document.querySelector('#chart-errors path[data-series="errors_per_s"]')
                           .dataset.points) > 0""",
            timeout=10_000,
        )
        assert "model=flaky%401" in page.url
        assert page.problems == []
    finally:
        stop.set()
        if runner.is_alive():
            runner.join(30)
        api.close()

    # The daemon goes away: the page says so and keeps what it showed.
    daemon.server.should_exit = True
    page.wait_for_function(
        "() => document.querySelector('#status').dataset.state === 'down'", timeout=30_000
    )
    assert "unreachable" in page.locator("#status-text").inner_text()
    assert page.locator('#models tr[data-model="slow@1"]').count() == 1
    assert page.problems == []


def test_dashboard_without_data_or_keys_in_chromium(
    start_daemon: Callable[..., RunningDaemon], page: Any, tmp_path: Path
) -> None:
    daemon = start_daemon("monitor.keep_s=900", models=False)
    page.goto(daemon.url + "/")
    page.wait_for_function(
        "() => document.querySelector('#status').dataset.state === 'live'", timeout=15_000
    )
    # No key asked for, empty states said in words, charts that say why they are empty.
    assert page.locator("#key-panel").is_hidden()
    assert page.locator("#models-empty").is_visible()
    assert page.locator("#jobs-empty").is_visible()
    assert page.locator("#advice-empty").is_visible()
    assert page.locator("#alerts-empty").is_visible()
    assert "no alert rules" in page.locator("#alerts-sub").inner_text()
    assert series_path(page, "chart-latency", "latency_p95_ms")["points"] == "0"
    assert "No requests in this window" in page.locator("#chart-latency").inner_text()
    # The process is sampled from the start.
    page.wait_for_function(
        """() => Number(document.querySelector('#chart-memory path[data-series="rss_mb"]')
                        .dataset.points) >= 2""",
        timeout=15_000,
    )
    # The window selector offers no window longer than the monitor keeps,
    # and charts what it says.
    assert page.locator('#window option[value="3600"]').is_disabled()
    assert page.locator('#window option[value="900"]').is_enabled()
    page.select_option("#window", "900")
    page.wait_for_function("() => location.hash.includes('window=900')", timeout=5_000)
    page.wait_for_function(
        "() => document.querySelector('#charts-sub').textContent.startsWith('last 15 min')",
        timeout=5_000,
    )
    save_screenshot(page, tmp_path / "dashboard-empty.png")
    assert page.problems == []


class _WatchedReplicas:
    """An executor whose placed models say how they are: HEALTHY with one
    replica running, or (while ``sick`` exists) a failing health check."""

    def __init__(self, context: Any, sick: Path) -> None:
        self.home, self.emit, self.sick = context.home / "replicas", context.emit, sick

    def place(self, request: Any) -> Any:
        from llmos.replica import Replica

        sick = self.sick

        class Watched(Replica):
            def health(self) -> dict[str, Any]:
                if sick.exists():
                    raise RuntimeError("the replica's node does not answer")
                return {"status": "HEALTHY", "replicas": {"RUNNING": 1}}

        return Watched(request, home=self.home, emit=self.emit)

    def close(self) -> None:
        pass


def test_the_state_column_shows_where_a_model_runs_and_its_health_in_chromium(
    start_daemon: Callable[..., RunningDaemon], page: Any, tmp_path: Path
) -> None:
    from llmos.plugin import hookimpl
    from llmos.types import ExecutorSpec

    sick = tmp_path / "sick"

    class Plugin:
        @hookimpl
        def llmos_register_executors(self, register: Callable[[Any], None]) -> None:
            register(ExecutorSpec(name="watched", create=lambda c: _WatchedReplicas(c, sick)))

    daemon = start_daemon('runtime.executor="watched"', plugin=Plugin())
    api = httpx.Client(base_url=daemon.url, timeout=30)
    answer = api.post("/v1/completions", json={"model": "slow", "prompt": "hi"})
    assert answer.status_code == 200, answer.text
    page.goto(daemon.url + "/")
    state = page.locator('#models tr[data-model="slow@1"] [data-field="state"]')
    page.wait_for_function(
        """() => { const s = document.querySelector(
                     '#models tr[data-model="slow@1"] [data-field="state"]');
                   return s && s.dataset.health === "HEALTHY"; }""",
        timeout=15_000,
    )
    assert state.get_attribute("data-placed") == "watched"
    assert state.inner_text().strip() == "loaded · table · watched HEALTHY 1 RUNNING"
    assert "bad" not in (state.get_attribute("class") or "")

    sick.touch()  # its health check now fails: the row says so
    page.wait_for_function(
        """() => document.querySelector(
                   '#models tr[data-model="slow@1"] [data-field="state"]').dataset.health
                 === "error" """,
        timeout=15_000,
    )
    assert "watched error: RuntimeError: the replica's node does not answer" in state.inner_text()
    assert "bad" in (state.get_attribute("class") or "")
    assert page.problems == []
