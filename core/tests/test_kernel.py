"""The kernel's lifecycle and its monitor bus, with real in-process plugins."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import pytest

from llmos.config import load_config
from llmos.errors import PluginError
from llmos.monitor.bus import EventBus
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel, KernelState
from llmos.types import MonitorEvent, MonitorSinkSpec


@pytest.fixture
def kernel(tmp_path: Path) -> Kernel:
    kernel = Kernel(
        load_config(env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_LOAD_PLUGINS": ""})
    )
    kernel.load_plugins()
    yield kernel
    kernel.stop()


class Recorder:
    def __init__(self) -> None:
        self.events: list[MonitorEvent] = []
        self.closed = False

    def emit(self, event: MonitorEvent) -> None:
        self.events.append(event)

    def close(self) -> None:
        self.closed = True


def test_import_llmos_pulls_in_no_model_library() -> None:
    code = (
        "import sys, llmos, llmos.types, llmos.plugin, llmos.runtime.kernel, llmos.cli;"
        "bad = [m for m in ('torch', 'transformers', 'peft', 'vllm') if m in sys.modules];"
        "print(bad); sys.exit(1 if bad else 0)"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert run.returncode == 0, run.stdout + run.stderr


def test_start_creates_home_runs_startup_and_stop_runs_shutdown(kernel: Kernel) -> None:
    calls: list[str] = []

    class Lifecycle:
        @hookimpl
        def llmos_startup(self, kernel):
            calls.append(f"start:{kernel.state}")

        @hookimpl
        def llmos_shutdown(self, kernel):
            calls.append("stop")

    kernel.plugins.register(Lifecycle(), "lifecycle")
    assert kernel.state is KernelState.CREATED and not kernel.home.exists()
    kernel.start()
    assert kernel.ready and kernel.home.is_dir()
    assert calls == ["start:starting"]
    kernel.stop()
    assert calls == ["start:starting", "stop"]
    assert kernel.state is KernelState.STOPPED


def test_a_plugin_failing_at_startup_is_failed_and_the_kernel_still_starts(kernel: Kernel) -> None:
    class Broken:
        @hookimpl
        def llmos_startup(self, kernel):
            raise ConnectionError("database down")

        @hookimpl
        def llmos_register_monitor_sinks(self, register):
            register(MonitorSinkSpec(name="broken-sink", create=lambda options: Recorder()))

    kernel.plugins.register(Broken(), "broken")
    kernel.start()
    assert kernel.ready
    broken = next(p for p in kernel.plugins.plugins() if p.name == "broken")
    assert broken.status == "failed" and "database down" in broken.error
    assert "broken-sink" not in kernel.plugins.monitor_sinks


def test_a_sink_that_fails_to_start_fails_its_plugin_and_the_others_run(kernel: Kernel) -> None:
    good = Recorder()

    class Sinks:
        @hookimpl
        def llmos_register_monitor_sinks(self, register):
            register(MonitorSinkSpec(name="bad-sink", create=lambda options: {}["no such option"]))

    class Good:
        @hookimpl
        def llmos_register_monitor_sinks(self, register):
            register(MonitorSinkSpec(name="good-sink", create=lambda options: good))

    kernel.plugins.register(Sinks(), "sinks")
    kernel.plugins.register(Good(), "good")
    kernel.start()
    assert kernel.ready
    bad = next(p for p in kernel.plugins.plugins() if p.name == "sinks")
    assert bad.status == "failed"
    assert "monitor sink 'bad-sink' failed to start: KeyError" in bad.error
    assert "good-sink" in kernel.bus.sinks and "bad-sink" not in kernel.bus.sinks
    kernel.stop()
    assert "kernel.started" in [e.kind for e in good.events]


def test_strict_startup_failure_raises(tmp_path: Path) -> None:
    kernel = Kernel(
        load_config(
            env={"LLMOS_HOME": str(tmp_path), "LLMOS_LOAD_PLUGINS": "", "LLMOS_STRICT_PLUGINS": "1"}
        )
    )
    kernel.load_plugins()

    class Broken:
        @hookimpl
        def llmos_startup(self, kernel):
            raise ConnectionError("database down")

    kernel.plugins.register(Broken(), "broken")
    with pytest.raises(PluginError, match="database down"):
        kernel.start()


def test_every_shutdown_hook_runs_even_when_one_raises(kernel: Kernel) -> None:
    ran: list[str] = []

    def plugin(name: str, fail: bool) -> object:
        class P:
            @hookimpl
            def llmos_shutdown(self, kernel):
                ran.append(name)
                if fail:
                    raise RuntimeError("cannot close")

        return P()

    kernel.plugins.register(plugin("a", fail=True), "a")
    kernel.plugins.register(plugin("b", fail=False), "b")
    kernel.start()
    kernel.stop()
    assert sorted(ran) == ["a", "b"]


def test_sinks_receive_events_with_the_plugin_options(tmp_path: Path) -> None:
    recorder = Recorder()
    seen_options: list[dict] = []

    class SinkPlugin:
        @hookimpl
        def llmos_register_monitor_sinks(self, register):
            def create(context):
                seen_options.append(dict(context.options))
                assert context.home == tmp_path
                return recorder

            register(MonitorSinkSpec(name="recorder", create=create))

    kernel = Kernel(
        load_config(
            overrides=["plugins.recorder-plugin.level=3"],
            env={"LLMOS_HOME": str(tmp_path), "LLMOS_LOAD_PLUGINS": ""},
        )
    )
    kernel.load_plugins()
    kernel.plugins.register(SinkPlugin(), "recorder-plugin")
    kernel.start()
    kernel.emit(MonitorEvent(kind="request", model="m", fields={"latency_s": 0.1}))
    kernel.stop()
    assert seen_options == [{"level": 3}]
    # (the monitor's own process samples and request sums come on its clock)
    kinds = [e.kind for e in recorder.events if e.kind not in ("process.sample", "request.bucket")]
    assert kinds == ["kernel.started", "request", "kernel.stopped"]
    assert recorder.closed


def test_a_failing_sink_never_fails_the_caller_nor_the_other_sinks() -> None:
    class Failing:
        def emit(self, event):
            raise ValueError("disk full")

        def close(self):
            raise ValueError("still full")

    good = Recorder()
    bus = EventBus({"failing": Failing(), "good": good})
    bus.start()
    for i in range(3):
        bus.emit(MonitorEvent(kind="request", fields={"i": i}))
    bus.stop()
    assert [e.fields["i"] for e in good.events] == [0, 1, 2]
    assert bus.sink_errors["failing"] == 3
    assert good.closed


def test_a_slow_sink_never_blocks_emit_and_a_full_queue_drops() -> None:
    release = threading.Event()

    class Slow:
        def emit(self, event):
            release.wait(1)

        def close(self):
            pass

    bus = EventBus({"slow": Slow()}, capacity=10)
    bus.start()
    for _ in range(50):
        bus.emit(MonitorEvent(kind="request"))
    release.set()
    bus.stop()
    # 50 events into a queue of 10 behind a stuck sink: emit did not wait for
    # room (it would then have dropped nothing); the overflow was counted.
    assert bus.dropped >= 50 - 10 - 1
