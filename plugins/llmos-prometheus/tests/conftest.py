"""A real daemon with the installed ``prometheus`` plugin and the kernel's
test plugin ``llmos-table`` (models that answer from tables in their cards,
in microseconds: see ``core/tests/tables.py``, reused here), and a scraper
that reads ``/metrics`` over HTTP and parses it with prometheus_client's own
parser."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from llmos.config import load_config
from llmos.logs import configure_logging
from llmos.runtime.kernel import Kernel
from llmos.server.app import create_app
from llmos.testing import RunningDaemon, serve_app

os.environ.setdefault("OMP_NUM_THREADS", "1")


def _core_tables() -> Any:
    """``core/tests/tables.py`` (not a package: loaded from its file)."""
    path = Path(__file__).resolve().parents[3] / "core" / "tests" / "tables.py"
    spec = importlib.util.spec_from_file_location("llmos_core_test_tables", path)
    assert spec is not None and spec.loader is not None, path
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


tables = _core_tables()


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    """Warnings and errors only: the log sink would print every event."""
    configure_logging("warning", fmt="console")


@pytest.fixture
def table_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    yield from tables.install(tmp_path / "site", monkeypatch)


def kernel_for(
    home: Path, overrides: Sequence[str] = (), *, plugins: str = "", strict: bool = True
) -> Kernel:
    """A kernel loading ``llmos-table``, the installed ``prometheus`` plugin and
    ``plugins`` (comma-separated), in strict mode unless told otherwise."""
    env = {
        "LLMOS_HOME": str(home),
        "LLMOS_LOAD_PLUGINS": ",".join(p for p in ("llmos-table", "prometheus", plugins) if p),
    }
    if strict:
        env["LLMOS_STRICT_PLUGINS"] = "1"
    return Kernel(load_config(env=env, overrides=list(overrides)))


@attrs.frozen
class Scrape:
    """One scrape of ``/metrics``: its text, and every sample by name."""

    text: str
    samples: Mapping[str, list[tuple[dict[str, str], float]]]

    def matching(self, name: str, **labels: str) -> list[float]:
        """The values of ``name``'s samples whose labels include ``labels``."""
        return [
            value
            for have, value in self.samples.get(name, ())
            if all(have.get(k) == v for k, v in labels.items())
        ]

    def get(self, name: str, **labels: str) -> float:
        """The sum of the :meth:`matching` samples (0 if none)."""
        return sum(self.matching(name, **labels))

    def has(self, name: str, **labels: str) -> bool:
        return bool(self.matching(name, **labels))

    def labels(self, name: str, label: str) -> set[str]:
        return {have[label] for have, _ in self.samples.get(name, ()) if label in have}


def parse(text: str) -> Scrape:
    samples: dict[str, list[tuple[dict[str, str], float]]] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples.setdefault(sample.name, []).append((dict(sample.labels), sample.value))
    return Scrape(text=text, samples=samples)


@attrs.define
class Daemon:
    """A running daemon for one test: its kernel, URL and an HTTP client."""

    kernel: Kernel
    running: RunningDaemon
    client: httpx.Client

    @property
    def url(self) -> str:
        return self.running.url

    def scrape(self, **headers: str) -> Scrape:
        response = self.client.get("/metrics", headers=headers)
        assert response.status_code == 200, response.text
        assert response.headers["content-type"].startswith("text/plain; version=0.0.4")
        return parse(response.text)

    def scrape_until(
        self, check: Callable[[Scrape], bool], what: str, timeout: float = 10.0
    ) -> Scrape:
        """Scrape until ``check`` holds: events reach the sink off the
        request's thread, a moment after its answer."""
        deadline = time.monotonic() + timeout
        while True:
            scrape = self.scrape()
            if check(scrape):
                return scrape
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; last scrape:\n{scrape.text}")
            time.sleep(0.02)

    def events_seen(self, kind: str, count: float) -> Scrape:
        """Scrape once the sink has received ``count`` events of ``kind``."""
        return self.scrape_until(
            lambda s: s.get("llmos_monitor_events_total", kind=kind) >= count,
            f"{count} {kind} events",
        )

    def classify(self, model: str, *texts: str) -> httpx.Response:
        return self.client.post("/api/classify", json={"model": model, "texts": list(texts)})


@pytest.fixture
def daemon(tmp_path: Path, table_module: Any) -> Iterator[Callable[..., Daemon]]:
    """``daemon(*overrides, models={name: options}, plugins="", before_start=None,
    api_key=None)`` starts one real daemon on a loopback port for the test."""
    stack = contextlib.ExitStack()

    def start(
        *overrides: str,
        models: Mapping[str, Mapping[str, Any]] | None = None,
        plugins: str = "",
        strict: bool = True,
        before_start: Callable[[Kernel], None] | None = None,
        api_key: str | None = None,
    ) -> Daemon:
        kernel = kernel_for(tmp_path / "home", overrides, plugins=plugins, strict=strict)
        kernel.load_plugins()
        for name, options in (models or {"m": {}}).items():
            tables.add(kernel, name, **options)
        if before_start is not None:
            before_start(kernel)
        running = stack.enter_context(serve_app(create_app(kernel)))
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        client = stack.enter_context(
            httpx.Client(base_url=running.url, headers=headers, timeout=30)
        )
        return Daemon(kernel=kernel, running=running, client=client)

    with stack:
        yield start
