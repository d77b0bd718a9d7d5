"""The registry's HTTP routes against inputs that once reached an internal
error (issue 14, item 4) or filled the disk (item 8), over real HTTP on
loopback: each must be a 4xx in the daemon's one error shape, saying what to
do, and must leave the registry and the data folder as they were."""

from __future__ import annotations

import base64
import io
import json
import tarfile
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import httpx
import pytest

from llmos.config import load_config
from llmos.errors import error_type
from llmos.plugin import hookimpl
from llmos.runtime.kernel import Kernel
from llmos.server import create_app
from llmos.testing import serve_app
from llmos.types import ModelCard, ProviderSpec

MAX_INT = 2**63 - 1


class _Provider:
    """Installs the ``plain`` provider the cards name (a card's provider must
    be installed); nothing here loads a model."""

    @hookimpl
    def llmos_register_providers(self, register: Callable[[ProviderSpec], None]) -> None:
        register(ProviderSpec(name="plain", load=lambda request: None))  # type: ignore[arg-type,return-value]


@pytest.fixture
def client(tmp_path: Path) -> Iterator[httpx.Client]:
    """A daemon with one card, ``acme/bert@1``, and room for a 64 MiB push."""
    config = load_config(
        env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_LOAD_PLUGINS": ""},
        overrides=[f"registry.max_push_bytes={64 << 20}", "server.drain_timeout=2"],
    )
    kernel = Kernel(config)
    kernel.load_plugins()
    kernel.plugins.register(_Provider(), "plain")
    kernel.registry.store.register(
        ModelCard(name="acme/bert", provider="plain", description="a sentiment model")
    )
    with ExitStack() as stack:
        running = stack.enter_context(serve_app(create_app(kernel)))
        yield stack.enter_context(httpx.Client(base_url=running.url, timeout=30))


def _error(response: httpx.Response, status: int = 400) -> str:
    """The message of ``response``'s error, checked to be in the one shape."""
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == error_type(status), body
    return str(body["error"]["message"])


def _unchanged(client: httpx.Client) -> None:
    """The registry holds ``acme/bert@1`` and nothing else."""
    listed = client.get("/api/models", params={"all_versions": True}).json()
    assert [hit["card"]["name"] for hit in listed["items"]] == ["acme/bert"]
    assert [
        v["card"]["version"]
        for v in client.get("/api/models/acme/bert/versions").json()["versions"]
    ] == [1]


@pytest.mark.parametrize(
    ("params", "words"),
    [
        ({"offset": 2**63}, "offset must be between 0 and"),
        ({"offset": 2**64, "q": "sentiment"}, "offset must be between 0 and"),
        ({"q": "sentiment\x00"}, "a NUL byte"),
        ({"q": '"a\x00b"'}, "a NUL byte"),
        ({"q": "tag:\x1b[31m"}, "control character"),
        ({"q": " OR ".join(f"w{i}" for i in range(1000))}, "more than 200 search terms"),
        ({"q": "(" * 400 + "bert" + ")" * 400}, "nested more than 32 deep"),
        ({"q": "NOT " * 1000 + "bert"}, "nested more than 32 deep"),
        ({"q": "params:<" + "9" * 5000}, "too long"),
    ],
)
def test_search_inputs_that_made_500s_are_400s(
    client: httpx.Client, params: dict[str, Any], words: str
) -> None:
    assert words in _error(client.get("/api/models", params=params))
    if "offset" not in params:  # the seed document's search shares the parser
        assert words in _error(client.get("/discover", params={"q": params["q"]}))
    _unchanged(client)


def test_a_forged_cursor_with_huge_numbers_is_a_400(client: httpx.Client) -> None:
    cursor = base64.urlsafe_b64encode(json.dumps(["x", "a", 2**70]).encode()).decode()
    assert "invalid search cursor" in _error(client.get("/api/models", params={"cursor": cursor}))


@pytest.mark.parametrize(
    ("method", "path", "body"),
    [
        ("GET", f"/api/models/acme/bert@{2**63}", None),
        ("GET", "/api/models/acme/bert@" + "9" * 5000, None),
        ("POST", f"/api/models/acme/bert@{2**64}/tags", {"tags": ["x"]}),
        ("POST", f"/api/models/acme/bert@{2**63}/deprecate", None),
        ("PATCH", f"/api/models/acme/bert@{2**63}", {"description": "x"}),
        ("DELETE", f"/api/models/acme/bert@{2**63}", None),
        ("PUT", "/api/models/acme/bert/aliases/prod", {"version": 2**63}),
    ],
)
def test_versions_past_64_bits_are_400s(
    client: httpx.Client, method: str, path: str, body: Any
) -> None:
    message = _error(client.request(method, path, json=body))
    assert f"no version is above {MAX_INT}" in message or f"up to {MAX_INT}" in message
    _unchanged(client)


def _card(**fields: Any) -> dict[str, Any]:
    return {"name": "acme/new", "provider": "plain", **fields}


@pytest.mark.parametrize(
    ("body", "words"),
    [
        (_card(parameters=2**63), f"parameters must be a whole number from 0 to {MAX_INT}"),
        (_card(parameters=10**30), "parameters must be a whole number"),
        (_card(source="~nosuchuser-llmos/models/m"), "'~nosuchuser-llmos' is not expanded"),
        (_card(source="~/models/m"), "'~' is not expanded (the daemon's home is not yours)"),
        (_card(tags=["a\x00b"]), "tags[0] holds a NUL byte"),
        (_card(tags=["\x1b]0;title\x07"]), "tags[0] holds the control character"),
        (_card(description="x" * 70_000), "description is 70000 characters long"),
        (_card(tags=[f"t{i}" for i in range(1001)]), "1001 tags, more than the 1000 allowed"),
    ],
)
def test_cards_that_made_500s_or_junk_are_400s(
    client: httpx.Client, body: dict[str, Any], words: str
) -> None:
    assert words in _error(client.post("/api/models", json=body))
    _unchanged(client)


@pytest.mark.parametrize(
    "raw",
    [
        b'{"name": "acme/new", "provider": "plain", "description": "x\\ud800"}',
        b'{"name": "acme/new", "provider": "plain", "tags": ["\\udfff"]}',
        b'{"name": "acme/new", "provider": "plain", "options": {"k": "\\ud800"}}',
        b'{"name": "acme/new", "provider": "plain", "source": "/models/\\ud800"}',
    ],
)
def test_lone_surrogates_in_a_card_are_400s(client: httpx.Client, raw: bytes) -> None:
    # JSON may escape a surrogate that UTF-8 cannot carry; SQLite (or, in a
    # source, os.fsencode) then failed.
    response = client.post("/api/models", content=raw, headers={"content-type": "application/json"})
    assert "lone surrogate" in _error(response)
    _unchanged(client)


def test_a_lone_surrogate_in_a_fusions_dev_path_is_a_400(client: httpx.Client) -> None:
    raw = b'{"name": "f", "strategy": "vote", "members": ["acme/bert"], "dev": "/d\\ud800"}'
    response = client.post(
        "/api/fusions", content=raw, headers={"content-type": "application/json"}
    )
    assert "lone surrogate" in _error(response)
    _unchanged(client)


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/api/models/scan", {"path": "~nosuchuser-llmos/models"}),
        ("/register", {"model_name": "acme/new", "model_url": "~nosuchuser-llmos/m"}),
        (
            "/api/fusions",
            {
                "name": "f",
                "strategy": "vote",
                "members": ["acme/bert"],
                "dev": "~nosuchuser-llmos/dev.jsonl",
            },
        ),
    ],
)
def test_tilde_user_paths_are_400s_that_say_what_to_give(
    client: httpx.Client, path: str, body: dict[str, Any]
) -> None:
    message = _error(client.post(path, json=body))
    assert "'~nosuchuser-llmos' is not expanded" in message
    assert "absolute path under the data folder" in message
    _unchanged(client)


def test_a_gzip_bomb_push_is_refused_and_leaves_nothing(
    client: httpx.Client, tmp_path: Path
) -> None:
    # 48 MiB of zeros in a 50 KB tar.gz: under the 64 MiB cap, a thousandfold
    # over [registry] max_push_ratio. It used to be stored.
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
        for name, data in (("config.json", b"{}"), ("weights.dat", bytes(48 << 20))):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    body = buffer.getvalue()
    assert len(body) < 100_000
    response = client.put(
        "/api/models/acme/bomb/artifact", params={"filename": "bomb.tar.gz"}, content=body
    )
    message = _error(response)
    assert f"unpacks to {(48 << 20) + 2} bytes from {len(body)}" in message
    assert "[registry] max_push_ratio = 100" in message
    _unchanged(client)
    home = tmp_path / "home"
    assert not (home / "artifacts").exists()
    assert list((home / "tmp").iterdir()) == []
