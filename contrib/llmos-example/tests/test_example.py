"""Tests of the installed llmos-example distribution.

They load the plugin the way the kernel does, through its ``llmos`` entry
point, so the distribution must be installed (``pip install -e`` or
``pip install --target`` plus ``PYTHONPATH``). Then each hook is exercised for
real through what the plugin manager recorded; the fusion strategy through a
real kernel, since the kernel is what calls a fusion's members.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import attrs
import httpx
import pytest
import structlog
from click.testing import CliRunner
from fastapi import FastAPI

import llmos_example
from llmos.cli import cli
from llmos.config import load_config
from llmos.errors import CapabilityNotSupported, UsageError
from llmos.plugin import hookimpl
from llmos.plugin.manager import HOOK_NAMES, PluginManager
from llmos.replica import Replica
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos.types import (
    Budget,
    Capability,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    LoadedModel,
    LoadRequest,
    ModelCard,
    MonitorEvent,
    MonitorSink,
    MonitorSinkSpec,
    PluginContext,
    TuningRequest,
)

PLUGIN = "example"


@pytest.fixture(scope="module")
def pm() -> PluginManager:
    manager = PluginManager()
    manager.load()  # entry-point discovery, as the kernel does it
    return manager


@pytest.fixture(scope="module")
def card(pm: PluginManager) -> ModelCard:
    cards = [r.spec for r in pm.discover_models() if r.plugin == PLUGIN]
    assert [c.name for c in cards] == ["example/sentiment-keywords"]
    return cards[0]


def load(pm: PluginManager, card: ModelCard) -> LoadedModel:
    registered = pm.providers[card.provider]
    assert registered.plugin == PLUGIN
    return registered.spec.load(LoadRequest(card=card))


def keyword_card(name: str, positive: list[str], negative: list[str]) -> ModelCard:
    return ModelCard(
        name=name,
        provider="example-keyword",
        options={"keywords": {"positive": positive, "negative": negative}},
    )


# --------------------------------------------------------------------------
# Loading through the entry point
# --------------------------------------------------------------------------


def test_the_entry_point_is_loaded_with_every_hook(pm: PluginManager) -> None:
    info = {i.name: i for i in pm.plugins()}[PLUGIN]
    assert info.status == "loaded", info.error
    assert info.error is None
    assert info.distribution == "llmos-example"
    assert info.version == llmos_example.__version__ == "0.1.0"
    assert info.module == "llmos_example.plugin"
    assert set(info.hooks) == HOOK_NAMES
    assert info.registered == {
        "providers": ["example-keyword"],
        "fusion_strategies": ["example-first-confident"],
        "tuning_methods": ["example-keywords"],
        "monitor_sinks": ["example-counter"],
        "commands": ["example"],
        "config_sections": ["example"],
        "registry_stores": ["example-audited"],
        "executors": ["example-replicas"],
    }
    assert pm.providers["example-keyword"].plugin == PLUGIN
    assert pm.fusion_strategies["example-first-confident"].plugin == PLUGIN
    assert pm.tuning_methods["example-keywords"].plugin == PLUGIN
    assert pm.monitor_sinks["example-counter"].plugin == PLUGIN
    assert pm.commands["example"].plugin == PLUGIN


def test_the_discovered_card(card: ModelCard) -> None:
    assert card.provider == "example-keyword"
    assert card.tasks == ("text-classification",)
    assert card.tags == ("example",)
    assert card.license == "Apache-2.0"
    assert set(card.options["keywords"]) == {"positive", "negative"}


# --------------------------------------------------------------------------
# Provider
# --------------------------------------------------------------------------


def test_classify_scores_sum_to_one_and_pick_the_label(pm: PluginManager, card: ModelCard) -> None:
    model = load(pm, card)
    assert isinstance(model, LoadedModel)
    assert "classify" in model.capabilities
    results = model.classify(
        [
            ClassifyRequest(text="A great film, I love it"),
            ClassifyRequest(text="Awful. The worst, most boring evening"),
            ClassifyRequest(text="It was a film"),
        ]
    )
    assert [r.label for r in results] == ["positive", "negative", "positive"]
    for result in results:
        assert sum(result.scores.values()) == pytest.approx(1.0)
    # two positive hits, none negative: (2 + 1) / (2 + 2) with add-one smoothing
    assert results[0].scores == pytest.approx({"positive": 0.75, "negative": 0.25})
    assert results[1].scores == pytest.approx({"positive": 0.2, "negative": 0.8})
    assert results[2].scores == pytest.approx({"positive": 0.5, "negative": 0.5})
    assert results[0].usage.prompt_tokens == 6


def test_classify_over_given_labels(pm: PluginManager, card: ModelCard) -> None:
    [result] = load(pm, card).classify(
        [ClassifyRequest(text="bad bad", labels=("neutral", "negative"))]
    )
    assert result.scores == pytest.approx({"neutral": 0.25, "negative": 0.75})


def test_the_provider_answers_only_classify(pm: PluginManager, card: ModelCard) -> None:
    with pytest.raises(CapabilityNotSupported, match="supports: classify"):
        load(pm, card).complete([CompletionRequest(prompt="hi")])


def test_the_provider_rejects_a_card_without_keywords(pm: PluginManager) -> None:
    card = ModelCard(name="example/empty", provider="example-keyword")
    with pytest.raises(UsageError, match="keywords"):
        pm.providers["example-keyword"].spec.load(LoadRequest(card=card))


# --------------------------------------------------------------------------
# Fusion strategy
# --------------------------------------------------------------------------


class Recorder:
    """An in-process plugin whose monitor sink keeps every event."""

    def __init__(self) -> None:
        self.events: list[MonitorEvent] = []

    @hookimpl
    def llmos_register_monitor_sinks(self, register: Any) -> None:
        events = self.events

        class Sink:
            def emit(self, event: MonitorEvent) -> None:
                events.append(event)

            def close(self) -> None:
                pass

        register(MonitorSinkSpec(name="test-recorder", create=lambda options: Sink()))


@pytest.fixture
def recorder() -> Recorder:
    return Recorder()


@pytest.fixture
def kernel(tmp_path: Path, recorder: Recorder) -> Iterator[Kernel]:
    """A real kernel with only this plugin (found through its entry point) and
    three keyword members that read the words differently, so who answered
    shows: ``first`` and ``second`` disagree on "good", ``second`` knows
    "fine", ``third`` knows "meh"."""
    kernel = Kernel(
        load_config(env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_LOAD_PLUGINS": PLUGIN})
    )
    kernel.load_plugins()
    kernel.plugins.register(recorder, "test-recorder")
    assert kernel.plugins.fusion_strategies["example-first-confident"].plugin == PLUGIN
    for card in (
        keyword_card("first", ["good"], ["bad"]),
        keyword_card("second", ["fine"], ["good"]),
        keyword_card("third", ["meh"], ["so"]),
    ):
        kernel.registry.register(card)
    kernel.start()
    try:
        yield kernel
    finally:
        kernel.stop()


def test_the_audited_registry_store_sends_every_write_to_the_monitor(
    tmp_path: Path, recorder: Recorder
) -> None:
    kernel = Kernel(
        load_config(
            overrides=['registry.store="example-audited"'],
            env={"LLMOS_HOME": str(tmp_path), "LLMOS_LOAD_PLUGINS": PLUGIN},
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(recorder, "test-recorder")
    kernel.start()
    try:
        kernel.registry.register(keyword_card("audited", ["good"], ["bad"]))
        kernel.registry.store.set_alias("audited", "prod", 1)
        assert kernel.registry.store.get("audited@prod").version == 1  # reads pass through
        kernel.bus.flush()
    finally:
        kernel.stop()
    writes = [
        (e.model, e.fields["operation"]) for e in recorder.events if e.kind == "registry.write"
    ]
    assert ("audited", "set_alias") in writes
    assert any(operation == "register" for _, operation in writes)
    assert (tmp_path / "registry.db").is_file()  # the kernel's own file, behind the audit


def test_the_replica_executor_places_models_and_a_group_calls_them(
    tmp_path: Path, recorder: Recorder
) -> None:
    kernel = Kernel(
        load_config(
            overrides=[
                'runtime.executor="example-replicas"',
                'groups.g.deployments=["pooled"]',
            ],
            env={"LLMOS_HOME": str(tmp_path), "LLMOS_LOAD_PLUGINS": PLUGIN},
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(recorder, "test-recorder")
    kernel.start()
    try:
        kernel.registry.register(keyword_card("pooled", ["good"], ["bad"]))
        (result,) = kernel.call("g", Capability.CLASSIFY, texts("good"))
        assert result.label == "positive"
        worker = kernel.models.get("pooled")
        assert isinstance(worker.model, Replica)
        assert worker.model.worker.settings.batching, "the replica batches, the kernel does not"
    finally:
        kernel.bus.flush()
        kernel.stop()
    loaded = [e for e in recorder.events if e.kind == "model.loaded"]
    assert {e.model: e.fields.get("executor") for e in loaded} == {
        "pooled@1": "example-replicas",
        "g": None,
    }


def test_a_cards_table_for_the_executor_is_kept_for_it_and_not_loaded(tmp_path: Path) -> None:
    kernel = Kernel(
        load_config(
            overrides=['runtime.executor="example-replicas"'],
            env={"LLMOS_HOME": str(tmp_path), "LLMOS_LOAD_PLUGINS": PLUGIN},
        )
    )
    kernel.start()
    try:
        card = keyword_card("pooled", ["good"], ["bad"])
        options = {**card.options, "example-replicas": {"replicas": 2}}
        card = kernel.registry.register(attrs.evolve(card, options=options))
        assert card.options["example-replicas"] == {"replicas": 2}, "the registry keeps it"
        (result,) = kernel.call("pooled", Capability.CLASSIFY, texts("good"))
        assert result.label == "positive"
        replica = kernel.models.get("pooled").model
        assert isinstance(replica, Replica)
        # the provider loaded the model without the executor's table
        assert replica.card.options == {"keywords": {"positive": ["good"], "negative": ["bad"]}}
    finally:
        kernel.stop()


def test_top_shows_where_a_placed_model_runs_and_its_health(tmp_path: Path) -> None:
    kernel = Kernel(
        load_config(
            overrides=[
                'runtime.executor="example-replicas"',
                # a deployment the kernel runs itself
                'models.here.provider="example-keyword"',
                'models.here.options.keywords={positive=["good"], negative=["bad"]}',
                'models.here.executor="local"',
            ],
            env={"LLMOS_HOME": str(tmp_path), "LLMOS_LOAD_PLUGINS": PLUGIN},
        )
    )
    # the daemon's logs would print into the CLI's captured output
    with structlog.testing.capture_logs(), serve_in_thread(kernel) as url:
        kernel.registry.register(keyword_card("pooled", ["good"], ["bad"]))
        for model in ("pooled", "here"):
            answer = httpx.post(
                f"{url}/api/classify", json={"model": model, "texts": ["good"]}, timeout=30
            )
            assert answer.status_code == 200, answer.text
        runner = CliRunner()
        shown = runner.invoke(cli, ["top", "--url", url, "--json"], catch_exceptions=False)
        assert shown.exit_code == 0, shown.output
        models = json.loads(shown.output)["models"]
        assert models["pooled@1"]["placed"] == "example-replicas"
        assert models["pooled@1"]["health"] == {
            "status": "HEALTHY",
            "replicas": {"RUNNING": 1},
            "queued": 0,
        }
        # a model the kernel runs itself: placed nowhere, and no health to ask
        assert models["here"]["placed"] is None and "health" not in models["here"]
        frame = runner.invoke(cli, ["top", "--url", url, "--once"], catch_exceptions=False)
        assert frame.exit_code == 0, frame.output
        (pooled,) = [line for line in frame.output.splitlines() if "pooled@1" in line]
        assert pooled.rstrip(" │|").endswith("example-replicas HEALTHY 1 RUNNING"), pooled
        (here,) = [line for line in frame.output.splitlines() if "│here " in line]
        assert here.rstrip(" │|").endswith(" -"), here


def classify(kernel: Kernel, model: str, requests: list[ClassifyRequest]) -> list[ClassifyResult]:
    return kernel.call(model, Capability.CLASSIFY, requests)


def texts(*words: str) -> list[ClassifyRequest]:
    return [ClassifyRequest(text=w) for w in words]


def asked(result: ClassifyResult) -> list[str]:
    """The members the fusion asked for this result's row."""
    return [m["model"] for m in result.meta["fusion"]["members"]]


def test_fusion_takes_the_first_confident_member(kernel: Kernel, recorder: Recorder) -> None:
    card = kernel.fusions.create(
        "cascade", strategy="example-first-confident", members=["first", "second", "third"]
    )
    assert card.options["fusion"]["options"] == {"threshold": 0.6}  # check() filled it in
    good, fine, meh, ok = classify(kernel, "cascade", texts("good", "fine", "meh", "ok"))
    # "good": first is 2/3 sure (>= 0.6) -> its positive, not second's negative
    assert good.label == "positive" and good.scores["positive"] == pytest.approx(2 / 3)
    # "fine": first is unsure (1/2) -> second's; "meh": first two unsure -> third's
    assert fine.label == "positive" and fine.scores["positive"] == pytest.approx(2 / 3)
    assert meh.label == "positive" and meh.scores["positive"] == pytest.approx(2 / 3)
    # "ok": nobody is sure -> the last member's answer all the same
    assert ok.scores == pytest.approx({"positive": 0.5, "negative": 0.5})

    results = [good, fine, meh, ok]
    assert [r.meta["fusion"]["answered_by"] for r in results] == [
        "first@1",
        "second@1",
        "third@1",
        "third@1",
    ]
    # later members were not asked for rows an earlier one was sure of
    assert [asked(r) for r in results] == [
        ["first@1"],
        ["first@1", "second@1"],
        ["first@1", "second@1", "third@1"],
        ["first@1", "second@1", "third@1"],
    ]
    assert [r.meta["fusion"]["skipped"] for r in results] == [
        ["second@1", "third@1"],
        ["third@1"],
        [],
        [],
    ]
    assert [m["agreed"] for m in fine.meta["fusion"]["members"]] == [True, True]
    assert [m["label"] for m in good.meta["fusion"]["members"]] == ["positive"]

    # The members' own workers saw exactly that: 4 rows, then 3, then 2.
    kernel.bus.stop()
    served = {
        name: sum(
            e.fields["requests"]
            for e in recorder.events
            if e.kind == "request" and e.model == name and e.fields["status"] == "ok"
        )
        for name in ("first@1", "second@1", "third@1")
    }
    assert served == {"first@1": 4, "second@1": 3, "third@1": 2}
    [event] = [e for e in recorder.events if e.kind == "fusion.call"]
    assert event.model == "cascade@1" and event.fields["strategy"] == "example-first-confident"
    assert event.fields["member_calls"] == 9
    assert {m: f["asked"] for m, f in event.fields["members"].items()} == served


def test_fusion_threshold_option(kernel: Kernel) -> None:
    members = ["first", "second"]
    kernel.fusions.create(
        "strict", strategy="example-first-confident", members=members, options={"threshold": 0.9}
    )
    kernel.fusions.create(
        "lenient", strategy="example-first-confident", members=members, options={"threshold": 0.5}
    )
    [good] = classify(kernel, "strict", texts("good"))
    # 2/3 < 0.9: first is not sure enough, so second answered (it reads "good" as negative)
    assert good.label == "negative" and good.scores["negative"] == pytest.approx(2 / 3)
    assert asked(good) == ["first@1", "second@1"]
    assert good.meta["fusion"]["answered_by"] == "second@1"
    [fine] = classify(kernel, "lenient", texts("fine"))
    # first's 1/2 reaches 0.5: its answer stands and second is never asked
    assert fine.scores == pytest.approx({"positive": 0.5, "negative": 0.5})
    assert asked(fine) == ["first@1"] and fine.meta["fusion"]["skipped"] == ["second@1"]
    # with the default 0.6 the same row goes on to second
    kernel.fusions.create("default", strategy="example-first-confident", members=members)
    [fine] = classify(kernel, "default", texts("fine"))
    assert fine.meta["fusion"]["answered_by"] == "second@1"


def test_fusion_keeps_the_request_budget(kernel: Kernel) -> None:
    kernel.fusions.create(
        "cascade", strategy="example-first-confident", members=["first", "second"]
    )
    [fine] = classify(
        kernel, "cascade", [ClassifyRequest(text="fine", budget=Budget(max_members=1))]
    )
    # first is unsure, but the budget allows one member: its answer stands
    assert fine.scores == pytest.approx({"positive": 0.5, "negative": 0.5})
    assert fine.meta["fusion"]["answered_by"] == "first@1"
    assert fine.meta["fusion"]["skipped"] == ["second@1"]
    assert fine.meta["fusion"]["budget"]["exhausted"] is True


def test_fusion_is_scored_on_dev_data(kernel: Kernel) -> None:
    dev = [
        {"text": "good", "label": "positive"},
        {"text": "fine", "label": "positive"},
        {"text": "bad", "label": "negative"},
    ]
    card = kernel.fusions.create(
        "scored", strategy="example-first-confident", members=["first", "second"], dev=dev
    )
    assert card.scores == {"dev/accuracy": 1.0}
    # only "fine" needed the second member
    assert card.options["fusion"]["fit"]["member_calls_per_row"] == pytest.approx(4 / 3)


@pytest.mark.parametrize(
    ("members", "options", "message"),
    [
        (["first", "second"], {"treshold": 0.7}, "unknown option.*treshold"),
        (["first", "second"], {"threshold": 1.5}, r"in \[0, 1\]"),
        (["first", "second"], {"threshold": -0.1}, r"in \[0, 1\]"),
        (["first", "second"], {"threshold": "high"}, "must be a number"),
        (["first", "second"], {"threshold": True}, "must be a number"),
        (["first"], {}, "two or more members"),
    ],
)
def test_fusion_check_refuses_bad_options(
    kernel: Kernel, members: list[str], options: dict[str, Any], message: str
) -> None:
    with pytest.raises(UsageError, match=message):
        kernel.fusions.create(
            "refused", strategy="example-first-confident", members=members, options=options
        )
    assert kernel.fusions.list() == []  # nothing registered


# --------------------------------------------------------------------------
# Tuning method
# --------------------------------------------------------------------------

DATA = {
    "train": [
        {"text": "a delightful and charming film", "label": "positive"},
        {"text": "charming story with delightful acting", "label": "positive"},
        {"text": "an uplifting and delightful ending", "label": "positive"},
        {"text": "uplifting music and a charming cast", "label": "positive"},
        {"text": "a dull and tedious film", "label": "negative"},
        {"text": "tedious plot with dull acting", "label": "negative"},
        {"text": "a clumsy and dull ending", "label": "negative"},
        {"text": "clumsy dialogue and a tedious cast", "label": "negative"},
    ],
    "dev": [
        {"text": "Delightful, and so uplifting!", "label": "positive"},
        {"text": "tedious and clumsy", "label": "negative"},
        {"text": "what a charming film", "label": "positive"},
        {"text": "the story was dull", "label": "negative"},
    ],
    "test": [
        {"text": "charming", "label": "positive"},
        {"text": "clumsy", "label": "negative"},
    ],
}


def test_tuning_learns_keywords_that_classify_dev(pm: PluginManager, card: ModelCard) -> None:
    spec = pm.tuning_methods["example-keywords"].spec
    assert spec.tasks == ("text-classification",)
    reports: list[dict[str, Any]] = []
    result = spec.run(
        TuningRequest(
            base=card,
            task="text-classification",
            data=DATA,
            hyperparameters={"top_k": 3},
            report=lambda figures: reports.append(dict(figures)),
        )
    )
    assert result.card.options["keywords"] == {
        "negative": ["dull", "tedious", "clumsy"],
        "positive": ["charming", "delightful", "uplifting"],
    }
    assert result.scores == {"dev/accuracy": 1.0, "test/accuracy": 1.0}
    assert result.card.scores == result.scores
    assert result.card.provider == "example-keyword"
    assert result.card.parents == (card.name,)
    assert reports and reports[-1]["dev/accuracy"] == 1.0
    # The base model knows none of these words: the tuning is what made it right.
    base_labels = [
        r.label
        for r in load(pm, card).classify([ClassifyRequest(text=row["text"]) for row in DATA["dev"]])
    ]
    assert base_labels != [row["label"] for row in DATA["dev"]]
    tuned = load(pm, result.card)
    [answer] = tuned.classify([ClassifyRequest(text="such a tedious story")])
    assert answer.label == "negative"


def test_tuning_needs_train_rows(pm: PluginManager, card: ModelCard) -> None:
    spec = pm.tuning_methods["example-keywords"].spec
    with pytest.raises(UsageError, match="train"):
        spec.run(TuningRequest(base=card, task="text-classification", data={"dev": DATA["dev"]}))


# --------------------------------------------------------------------------
# Monitor sink
# --------------------------------------------------------------------------


def test_the_sink_counts_events_from_many_threads(pm: PluginManager, tmp_path: Path) -> None:
    path = tmp_path / "out" / "counts.json"
    context = PluginContext(options={"path": "out/counts.json"}, home=tmp_path)
    sink = pm.monitor_sinks["example-counter"].spec.create(context)
    assert isinstance(sink, MonitorSink)

    def emit_many() -> None:
        for i in range(500):
            sink.emit(MonitorEvent(kind="request" if i % 5 else "kernel.started"))

    threads = [threading.Thread(target=emit_many) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sink.counts() == {"request": 1600, "kernel.started": 400}
    assert not path.exists()
    sink.close()
    assert json.loads(path.read_text()) == {"kernel.started": 400, "request": 1600}


def test_the_sink_without_a_path_writes_nothing(pm: PluginManager, tmp_path: Path) -> None:
    sink = pm.monitor_sinks["example-counter"].spec.create(PluginContext(home=tmp_path))
    sink.emit(MonitorEvent(kind="request"))
    sink.close()
    assert sink.counts() == {"request": 1}
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------
# Lifecycle
# --------------------------------------------------------------------------


def test_startup_and_shutdown_log_the_home_folder(pm: PluginManager, tmp_path: Path) -> None:
    kernel = SimpleNamespace(home=tmp_path)  # the hooks read only kernel.home
    # an earlier test's configure_logging("warning") filters info out before
    # any processor (capture_logs is one) sees it: let every level through here
    saved = structlog.get_config()
    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(0))
    try:
        with structlog.testing.capture_logs() as logs:
            pm.startup(kernel)  # type: ignore[arg-type]
            pm.shutdown(kernel)  # type: ignore[arg-type]
    finally:
        structlog.configure(**saved)
    mine = [(e["event"], e["home"]) for e in logs if e.get("plugin") == PLUGIN]
    assert mine == [("example.started", str(tmp_path)), ("example.stopped", str(tmp_path))]
    assert {i.name: i for i in pm.plugins()}[PLUGIN].status == "loaded"


# --------------------------------------------------------------------------
# Command and route
# --------------------------------------------------------------------------


def test_the_keywords_command(pm: PluginManager) -> None:
    command = pm.commands["example"].spec.command
    runner = CliRunner()
    result = runner.invoke(command, ["keywords", "a great film, I love it"])
    assert result.exit_code == 0, result.output
    assert result.output.splitlines() == [
        "example/sentiment-keywords: positive",
        "  positive   0.750",
        "  negative   0.250",
    ]
    result = runner.invoke(command, ["keywords", "--json", "terrible"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.output)
    assert data["model"] == "example/sentiment-keywords"
    assert data["label"] == "negative"
    assert data["scores"] == pytest.approx({"positive": 1 / 3, "negative": 2 / 3})


def test_the_info_route_answers_with_the_plugins_config_section(
    pm: PluginManager, tmp_path: Path
) -> None:
    config = tmp_path / "llmos.toml"
    config.write_text('[example]\nmotd = "run by the acme team"\n')
    kernel = Kernel(load_config([config], env={"LLMOS_HOME": str(tmp_path)}), plugins=pm)
    routes = [r.spec for r in pm.routes(kernel) if r.plugin == PLUGIN]
    assert [r.prefix for r in routes] == ["/example"]
    app = FastAPI()
    app.include_router(routes[0].router, prefix=routes[0].prefix)

    async def get(path: str) -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.get(path)

    response = asyncio.run(get("/example/info"))
    assert response.status_code == 200
    assert response.json() == {
        "plugin": "example",
        "version": llmos_example.__version__,
        "providers": ["example-keyword"],
        "motd": "run by the acme team",
    }
