"""The artifact store (``[artifacts]``, :mod:`llmos.registry.fsstore`) with real filesystems.

fsspec's ``memory://`` (shared by every kernel of this process, as a bucket is
by the daemons of a cluster), a local folder, ``file://``, and fsspec's HTTP
filesystem reading a folder an ``http.server`` serves on loopback. A tuning
job run by one kernel (data folder A) puts its artifact in the root; a daemon
with data folder B, sharing only the root, registers the card over HTTP and
serves the model from its own verified cache. The refusals are the push's:
names that leave the folder, links, pickles, sizes over the limit, and on top
bytes that no longer match their hashes.
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import json
import os
import shutil
import sys
import tarfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import fsspec
import httpx
import pytest

from llmos.config import load_config
from llmos.errors import (
    NotFoundError,
    PayloadTooLarge,
    Unavailable,
    UnsafeSourceError,
    UsageError,
)
from llmos.registry.fsstore import MANIFEST, ArtifactStore, Manifest, ManifestEntry
from llmos.registry.sources import SourcePolicy, check_source, policy_from_config
from llmos.runtime.kernel import KERNEL_SECTIONS, Kernel
from llmos.server import create_app
from llmos.testing import safetensors_bytes, serve_app, write_distribution, write_safetensors
from llmos.tuning.jobs import JobState
from llmos.types import CompletionRequest, ModelCard

#: a tuning method and a provider, installed like a pip package: the method
#: writes weights and a record of the labels it learnt; the provider answers
#: with the path it was handed and the labels it read there
PROBE = """
import json
from pathlib import Path

from llmos.plugin import hookimpl
from llmos.registry.weights import read_safetensors_header
from llmos.testing import write_safetensors
from llmos.types import (
    Capability, CompletionResult, ModelBase, ModelCard, ProviderSpec, TuningMethodSpec,
    TuningResult,
)


def run(request):
    out = request.output_dir
    write_safetensors(out / "model.safetensors", {"counts": [len(request.labels), 4]})
    (out / "labels.json").write_text(json.dumps(list(request.labels)))
    card = ModelCard(
        name=request.base.name, provider="probe", format="safetensors",
        source=str(out / "model.safetensors"),
    )
    return TuningResult(card=card, scores={"dev/accuracy": 1.0})


class Probe(ModelBase):
    capabilities = frozenset({Capability.COMPLETE})

    def __init__(self, card, path):
        super().__init__(card)
        read_safetensors_header(path)  # real weights, or the load fails
        self.answer = json.dumps(
            {"path": str(path), "labels": json.loads((path.parent / "labels.json").read_text())}
        )

    def complete(self, requests):
        return [CompletionResult(text=self.answer) for _ in requests]


@hookimpl
def llmos_register_tuning_methods(register):
    register(TuningMethodSpec(name="probe", run=run, tasks=("text-classification",)))


@hookimpl
def llmos_register_providers(register):
    register(ProviderSpec(name="probe", load=lambda request: Probe(request.card, request.path)))
"""

DATA = {
    "train": [{"text": "good", "label": "pos"}, {"text": "bad", "label": "neg"}],
    "dev": [{"text": "fine", "label": "pos"}, {"text": "poor", "label": "neg"}],
}


# --------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------


def policy(**limits: Any) -> SourcePolicy:
    return SourcePolicy(allowed_roots=(), **limits)


def store_at(root: str | Path, cache: Path, **limits: Any) -> ArtifactStore:
    return ArtifactStore(root=str(root), cache=cache, limits=policy(**limits))


def memory_root() -> str:
    """A fresh bucket in fsspec's in-process memory filesystem."""
    return f"memory://llmos-test-{uuid.uuid4().hex[:12]}"


def weights_folder(folder: Path, shape: tuple[int, int] = (4, 4)) -> Path:
    write_safetensors(folder / "adapter_model.safetensors", {"lora_A": list(shape)})
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4}))
    (folder / "tokenizer").mkdir()
    (folder / "tokenizer" / "tokenizer.json").write_text('{"version": "1.0"}')
    return folder


def plant(root: str, name: str, files: dict[str, bytes], *, listed: dict[str, Any] | None = None):
    """Write an artifact straight into the store, as someone with write access
    to the bucket could: ``files`` as they are, a manifest listing ``listed``
    (name -> (size, sha256)), default: the files themselves. Returns its URL."""
    fs, path = fsspec.core.url_to_fs(root)
    entries = listed or {
        n: (len(data), hashlib.sha256(data).hexdigest()) for n, data in files.items()
    }
    manifest = Manifest(
        name, tuple(ManifestEntry(n, size, digest) for n, (size, digest) in entries.items())
    ).to_bytes()
    digest = hashlib.sha256(manifest).hexdigest()
    folder = f"{path.rstrip('/')}/{name}/{digest}"
    for member, data in files.items():
        fs.makedirs(f"{folder}/{member}".rsplit("/", 1)[0], exist_ok=True)
        fs.pipe_file(f"{folder}/{member}", data)
    fs.pipe_file(f"{folder}/{MANIFEST}", manifest)
    return f"{root}/{name}/{digest}"


def leftovers(cache: Path) -> list[Path]:
    return sorted(cache.rglob("*")) if cache.exists() else []


# --------------------------------------------------------------------------
# put, fetch, exists, delete
# --------------------------------------------------------------------------


def test_put_then_fetch_by_another_daemon_through_memory(tmp_path: Path) -> None:
    root = memory_root()
    a = store_at(root, tmp_path / "a" / "cache")
    b = store_at(root, tmp_path / "b" / "cache")
    url = a.put(weights_folder(tmp_path / "out"), "acme/adapter")
    digest = url.rsplit("/", 1)[1]
    assert url == f"{root}/acme/adapter/{digest}"
    assert a.exists(url) and b.exists(url)
    # the putter's cache holds the copy it checked: it does not fetch its own
    assert (tmp_path / "a" / "cache" / digest / "adapter_model.safetensors").is_file()

    local = b.fetch(url)
    assert local == tmp_path / "b" / "cache" / digest
    for name in ("adapter_model.safetensors", "adapter_config.json", "tokenizer/tokenizer.json"):
        assert (local / name).read_bytes() == (tmp_path / "out" / name).read_bytes()
    assert hashlib.sha256((local / MANIFEST).read_bytes()).hexdigest() == digest
    # an address inside the artifact
    assert b.fetch(f"{url}/tokenizer/tokenizer.json") == local / "tokenizer" / "tokenizer.json"

    # the same files put again: the same address, nothing new in the store
    fs, _ = fsspec.core.url_to_fs(root)
    before = sorted(fs.find(root))
    assert a.put(tmp_path / "out", "acme/adapter") == url
    assert sorted(fs.find(root)) == before
    # other bytes: another address
    (tmp_path / "out" / "adapter_config.json").write_text('{"r": 8}')
    assert a.put(tmp_path / "out", "acme/adapter") != url

    b.delete(url)
    assert not b.exists(url) and not local.exists()
    with pytest.raises(NotFoundError, match="not in the store"):
        b.fetch(url)


def test_a_cache_hit_is_verified_and_a_changed_copy_fetched_again(tmp_path: Path) -> None:
    root = memory_root()
    a = store_at(root, tmp_path / "a")
    b = store_at(root, tmp_path / "b")
    url = a.put(weights_folder(tmp_path / "out"), "adapter")
    local = b.fetch(url)
    weights = local / "adapter_model.safetensors"
    good = weights.read_bytes()

    # a changed cached copy is not served: fetched again from the store
    weights.write_bytes(good[:-4] + b"\x01\x02\x03\x04")
    assert b.fetch(url) == local and weights.read_bytes() == good
    # a file added to the cached copy is not served either
    (local / "extra.json").write_text("{}")
    assert b.fetch(url) == local and not (local / "extra.json").exists()

    # a good cached copy is used as it is: the store is not read
    fs, path = fsspec.core.url_to_fs(root)
    fs.rm(f"{path}/adapter", recursive=True)
    assert b.fetch(url) == local
    # ... and a changed one, with the store gone, is an error, not stale bytes
    weights.write_bytes(good[:-4] + b"\x09\x09\x09\x09")
    with pytest.raises(NotFoundError, match="not in the store"):
        b.fetch(url)
    assert not local.exists()


def test_a_local_folder_root_is_read_in_place_and_verified(tmp_path: Path) -> None:
    shared = tmp_path / "nfs"
    a = store_at(shared, tmp_path / "a")
    b = store_at(shared, tmp_path / "b")
    address = a.put(weights_folder(tmp_path / "out"), "adapter")
    folder = Path(address)
    assert folder.parent == shared / "adapter" and (folder / MANIFEST).is_file()
    assert b.exists(address) and b.fetch(address) == folder
    assert not (tmp_path / "b").exists(), "a local root needs no cache"
    (folder / "adapter_config.json").write_text('{"r": 64}')
    with pytest.raises(UnsafeSourceError, match="changed after it was stored"):
        b.fetch(address)
    with pytest.raises(UnsafeSourceError, match="not inside"):
        b.fetch(str(tmp_path / "out"))


def test_a_file_url_root_is_fetched_into_the_cache(tmp_path: Path) -> None:
    root = (tmp_path / "shared").as_uri()
    a = store_at(root, tmp_path / "a")
    b = store_at(root, tmp_path / "b")
    url = a.put(weights_folder(tmp_path / "out"), "adapter")
    assert url.startswith(root + "/adapter/")
    assert b.fetch(url).parent == tmp_path / "b"


def test_an_http_mirror_is_read_only_and_fetched_over_loopback(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    shared = tmp_path / "shared"
    address = store_at(shared, tmp_path / "a").put(weights_folder(tmp_path / "out"), "adapter")
    with HTTPFolder(shared) as base:
        mirror = store_at(base, tmp_path / "b")
        url = f"{base}/adapter/{Path(address).name}"
        assert mirror.exists(url)
        local = mirror.fetch(url)
        assert (local / "adapter_model.safetensors").read_bytes() == (
            tmp_path / "out" / "adapter_model.safetensors"
        ).read_bytes()
        with pytest.raises(UsageError, match="read-only"):
            mirror.put(tmp_path / "out", "other")


# --------------------------------------------------------------------------
# the checks a push gets
# --------------------------------------------------------------------------

WEIGHTS = safetensors_bytes({"w": [2, 2]})


@pytest.mark.parametrize(
    ("name", "why"),
    [
        ("../escape.safetensors", "not a plain relative path"),
        ("/etc/passwd", "not a plain relative path"),
        ("a/../../b.safetensors", "not a plain relative path"),
        ("a\\b.safetensors", "not a plain relative path"),
        (MANIFEST, "not a plain relative path"),
    ],
)
def test_names_that_leave_the_folder_are_refused(tmp_path: Path, name: str, why: str) -> None:
    root = memory_root()
    url = plant(
        root,
        "m",
        {"ok.safetensors": WEIGHTS},
        listed={name: (len(WEIGHTS), hashlib.sha256(WEIGHTS).hexdigest())},
    )
    with pytest.raises(UnsafeSourceError, match=why):
        store_at(root, tmp_path / "cache").fetch(url)
    assert leftovers(tmp_path / "cache") == []


def test_pickles_are_refused_by_name_and_by_content(tmp_path: Path) -> None:
    root = memory_root()
    pickle = b"\x80\x04\x95\x10\x00\x00\x00\x00\x00\x00\x00}\x94."
    by_name = plant(root, "m", {"w.safetensors": WEIGHTS, "pytorch_model.bin": pickle})
    by_content = plant(root, "n", {"w.safetensors": WEIGHTS, "config.json": pickle})
    store = store_at(root, tmp_path / "cache")
    with pytest.raises(UnsafeSourceError, match=r"pickle weights are refused \(\.bin"):
        store.fetch(by_name)
    with pytest.raises(UnsafeSourceError, match="pickle weights are refused"):
        store.fetch(by_content)
    assert leftovers(tmp_path / "cache") == []
    # the operator's choice, as for pushes
    assert store_at(root, tmp_path / "c2", allow_pickle=True).fetch(by_content).is_dir()


def test_sizes_over_the_limit_and_bytes_beyond_the_manifest_are_refused(tmp_path: Path) -> None:
    root = memory_root()
    big = plant(root, "m", {"w.safetensors": WEIGHTS, "pad.json": b"0" * 4000})
    with pytest.raises(PayloadTooLarge, match="max_push_bytes"):
        store_at(root, tmp_path / "cache", max_push_bytes=1000).fetch(big)
    # a member that holds more than its manifest says: stopped at the declared size
    lying = plant(
        root,
        "n",
        {"w.safetensors": WEIGHTS + b"more"},
        listed={"w.safetensors": (len(WEIGHTS), hashlib.sha256(WEIGHTS).hexdigest())},
    )
    with pytest.raises(UnsafeSourceError, match="holds more than"):
        store_at(root, tmp_path / "cache").fetch(lying)
    assert leftovers(tmp_path / "cache") == []


def test_changed_bytes_and_bad_headers_are_refused(tmp_path: Path) -> None:
    root = memory_root()
    store = store_at(root, tmp_path / "cache")
    url = plant(root, "m", {"w.safetensors": WEIGHTS})
    fs, path = fsspec.core.url_to_fs(url)
    fs.pipe_file(f"{path}/w.safetensors", WEIGHTS[:-1] + b"\x01")
    with pytest.raises(UnsafeSourceError, match="does not match its manifest"):
        store.fetch(url)
    # a manifest rewritten to match: its hash is no longer the address
    fs.pipe_file(f"{path}/{MANIFEST}", fs.cat_file(f"{path}/{MANIFEST}").replace(b"m", b"x"))
    with pytest.raises(UnsafeSourceError, match="does not match the address"):
        store.fetch(url)
    broken = plant(root, "n", {"w.safetensors": b"\x08" + bytes(7) + b"{not json"})
    with pytest.raises(UsageError, match=r"w\.safetensors"):
        store.fetch(broken)
    assert leftovers(tmp_path / "cache") == []


def test_links_in_a_file_root_are_refused(tmp_path: Path) -> None:
    secret = tmp_path / "secret.safetensors"
    secret.write_bytes(WEIGHTS)
    root = (tmp_path / "shared").as_uri()
    url = plant(root, "m", {"w.safetensors": WEIGHTS})
    folder = Path(url.removeprefix("file://"))
    (folder / "w.safetensors").unlink()
    os.symlink(secret, folder / "w.safetensors")
    with pytest.raises(UnsafeSourceError, match="not a regular file"):
        store_at(root, tmp_path / "cache").fetch(url)
    assert leftovers(tmp_path / "cache") == []


def test_put_checks_the_folder_like_a_push(tmp_path: Path) -> None:
    store = store_at(memory_root(), tmp_path / "cache")
    linked = weights_folder(tmp_path / "linked")
    os.symlink(tmp_path / "linked" / "adapter_config.json", linked / "config.json")
    with pytest.raises(UnsafeSourceError, match="symlink"):
        store.put(linked, "m")
    pickled = weights_folder(tmp_path / "pickled")
    (pickled / "optimizer.pt").write_bytes(b"\x80\x04.")
    with pytest.raises(UnsafeSourceError, match="pickle"):
        store.put(pickled, "m")
    with pytest.raises(UsageError, match="model name"):
        store.put(weights_folder(tmp_path / "ok"), "../escape")
    assert [p for p in leftovers(tmp_path / "cache") if p.is_file()] == []


# --------------------------------------------------------------------------
# sources: inside the root only
# --------------------------------------------------------------------------


def config_policy(tmp_path: Path, *overrides: str) -> SourcePolicy:
    config = load_config(
        env={"LLMOS_HOME": str(tmp_path / "home"), "LLMOS_LOAD_PLUGINS": ""},
        overrides=list(overrides),
        sections=KERNEL_SECTIONS,
    )
    return policy_from_config(config)


def test_a_source_may_name_a_url_inside_the_artifact_root_only(tmp_path: Path) -> None:
    root = memory_root()
    home_policy = config_policy(tmp_path, f"artifacts.root={root}")
    store = home_policy.artifacts
    assert store is not None and store.cache == tmp_path / "home" / "cache" / "artifacts"
    url = store.put(weights_folder(tmp_path / "out"), "adapter")
    parsed = check_source(f"{url}/adapter_model.safetensors", home_policy)
    assert parsed.kind == "artifact" and parsed.value == f"{url}/adapter_model.safetensors"
    assert parsed.path == store.cache / url.rsplit("/", 1)[1] / "adapter_model.safetensors"

    other = plant(memory_root(), "adapter", {"w.safetensors": WEIGHTS})
    for source, why in [
        (other, "unknown scheme memory://"),
        (f"{root}-evil/adapter/{url.rsplit('/', 1)[1]}", "unknown scheme"),
        (f"{root}/adapter/../../x", "'..'"),
        (f"{root}/adapter/%2e%2e/x", "'..'"),
        (f"{root}/adapter", "inside the artifact root it must be"),
        (f"{root}/adapter/{'0' * 64}", "not in the store"),
        ("file:///etc/passwd", "file:// URLs are not accepted"),
        ("s3://bucket/adapter", "unknown scheme s3://"),
    ]:
        with pytest.raises((UnsafeSourceError, NotFoundError), match=why):
            check_source(source, home_policy)


def test_a_file_root_accepts_its_own_urls_and_no_other_file_url(tmp_path: Path) -> None:
    root = (tmp_path / "shared").as_uri()
    home_policy = config_policy(tmp_path, f"artifacts.root={root}")
    assert home_policy.artifacts is not None
    url = home_policy.artifacts.put(weights_folder(tmp_path / "out"), "adapter")
    assert check_source(url, home_policy).kind == "artifact"
    with pytest.raises(UnsafeSourceError, match="file:// URLs are not accepted"):
        check_source((tmp_path / "out").as_uri(), home_policy)


def test_the_default_root_is_the_data_folder_and_a_local_root_an_allowed_root(
    tmp_path: Path,
) -> None:
    default = config_policy(tmp_path)
    assert default.artifacts is not None
    assert default.artifacts.root == str(tmp_path / "home" / "artifacts")
    assert default.artifacts.local
    shared = config_policy(tmp_path, f"artifacts.root={tmp_path / 'nfs'}")
    assert (tmp_path / "nfs").resolve() in shared.allowed_roots
    address = shared.artifacts.put(weights_folder(tmp_path / "out"), "adapter")  # type: ignore[union-attr]
    parsed = check_source(address, shared)
    assert (parsed.kind, parsed.path) == ("path", Path(address))


# --------------------------------------------------------------------------
# Two daemons sharing only the root
# --------------------------------------------------------------------------


@pytest.fixture
def site(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    folder = tmp_path / "site"
    folder.mkdir()
    write_distribution(folder, "llmos-artifact-probe", PROBE)
    monkeypatch.syspath_prepend(str(folder))
    yield folder
    sys.modules.pop("llmos_artifact_probe", None)


def kernel_for(home: Path, *overrides: str) -> Kernel:
    config = load_config(
        env={"LLMOS_HOME": str(home), "LLMOS_LOAD_PLUGINS": "llmos-artifact-probe"},
        overrides=["server.drain_timeout=2", *overrides],
    )
    kernel = Kernel(config)
    kernel.load_plugins()
    return kernel


def tune(kernel: Kernel, name: str) -> str:
    """Run a real tuning job (a worker process) in ``kernel``; the new card's source."""
    write_safetensors(kernel.home / "models" / "base" / "model.safetensors", {"w": [2, 2]})
    kernel.registry.register(_card("base", str(kernel.home / "models" / "base")))
    job = kernel.jobs.submit(model="base", method="probe", inline=DATA, name=name)
    deadline = time.monotonic() + 60
    while not (done := kernel.jobs.get(job.id)).done:
        assert time.monotonic() < deadline, "the tuning job did not end"
        time.sleep(0.05)
    assert done.state is JobState.SUCCEEDED, done.error
    return kernel.registry.store.get(name).source


def _card(name: str, source: str) -> ModelCard:
    return ModelCard(name=name, provider="probe", format="safetensors", source=source)


@pytest.mark.slow
def test_an_adapter_tuned_by_one_daemon_is_served_by_another_sharing_only_the_root(
    tmp_path: Path, site: Path
) -> None:
    root = memory_root()
    tuner = kernel_for(tmp_path / "a", f"artifacts.root={root}")
    tuner.start()
    try:
        source = tune(tuner, "acme/sentiment")
    finally:
        tuner.stop()
    assert source.startswith(f"{root}/acme/sentiment/") and source.endswith("/model.safetensors")
    digest = source.split("/")[-2]
    # what the tuning daemon's data folder holds is a cache, not the artifact
    shutil.rmtree(tmp_path / "a")

    server = kernel_for(tmp_path / "b", f"artifacts.root={root}")
    with ExitStack() as stack:
        running = stack.enter_context(serve_app(create_app(server)))
        client = stack.enter_context(httpx.Client(base_url=running.url, timeout=30))
        made = client.post(
            "/api/models",
            json={
                "name": "acme/sentiment",
                "provider": "probe",
                "format": "safetensors",
                "source": source,
            },
        )
        assert made.status_code == 201, made.text
        answer = client.post(
            "/v1/completions", json={"model": "acme/sentiment", "prompt": "hi", "max_tokens": 1}
        )
        assert answer.status_code == 200, answer.text
        served = json.loads(answer.json()["choices"][0]["text"])
        cache = tmp_path / "b" / "cache" / "artifacts" / digest
        assert served == {"path": str(cache / "model.safetensors"), "labels": ["neg", "pos"]}

        # a card sent over HTTP may name no URL outside the root
        for outside in (
            plant(memory_root(), "acme/sentiment", {"model.safetensors": WEIGHTS}),
            (cache / "model.safetensors").as_uri(),
        ):
            refused = client.post(
                "/api/models",
                json={"name": "acme/other", "provider": "probe", "source": outside},
            )
            assert refused.status_code == 400, refused.text
            assert "refused" in refused.json()["error"]["message"]


@pytest.mark.slow
def test_a_push_to_one_daemon_is_served_by_another_sharing_the_root(
    tmp_path: Path, site: Path
) -> None:
    root = memory_root()
    archive = io.BytesIO()
    with tarfile.open(fileobj=archive, mode="w:gz") as tar:
        for name, data in (("model.safetensors", WEIGHTS), ("labels.json", b'["a", "b"]')):
            info = tarfile.TarInfo(f"m/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with ExitStack() as stack:
        urls = []
        for home in ("a", "b"):
            kernel = kernel_for(tmp_path / home, f"artifacts.root={root}")
            urls.append(stack.enter_context(serve_app(create_app(kernel))).url)
        a, b = (stack.enter_context(httpx.Client(base_url=u, timeout=30)) for u in urls)
        pushed = a.put(
            "/api/models/acme/pushed/artifact",
            params={"filename": "m.tgz", "provider": "probe"},
            content=archive.getvalue(),
        )
        assert pushed.status_code == 201, pushed.text
        card = pushed.json()["card"]
        assert card["source"].startswith(f"{root}/acme/pushed/"), card["source"]
        assert not list((tmp_path / "a" / "artifacts").rglob("*.safetensors"))
        made = b.post(
            "/api/models",
            json={
                "name": "acme/pushed",
                "provider": "probe",
                "source": f"{card['source']}/model.safetensors",
            },
        )
        assert made.status_code == 201, made.text
        answer = b.post("/v1/completions", json={"model": "acme/pushed", "prompt": "hi"})
        assert answer.status_code == 200, answer.text
        assert json.loads(answer.json()["choices"][0]["text"])["labels"] == ["a", "b"]


@pytest.mark.slow
def test_a_tuned_model_goes_to_the_data_folder_by_default(tmp_path: Path, site: Path) -> None:
    kernel = kernel_for(tmp_path / "home")
    kernel.start()
    try:
        source = Path(tune(kernel, "acme/sentiment"))
        assert source.parent.parent == tmp_path / "home" / "artifacts" / "acme" / "sentiment"
        assert kernel.call("acme/sentiment", "complete", [CompletionRequest(prompt="hi")])[0].text
        assert not (tmp_path / "home" / "cache" / "artifacts").exists()
    finally:
        kernel.stop()


# --------------------------------------------------------------------------
# an http.server on loopback
# --------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args: Any) -> None:
        pass


class HTTPFolder:
    """Serve ``folder`` read-only on a free loopback port."""

    def __init__(self, folder: Path) -> None:
        handler: Callable[..., Any] = functools.partial(_Quiet, directory=str(folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self) -> str:
        self.thread.start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


def test_storage_options_are_handed_to_the_store_and_masked_in_config_show(
    tmp_path: Path,
) -> None:
    file = tmp_path / "llmos.toml"
    file.write_text(
        '[artifacts]\nroot = "memory://bucket/llmos"\n'
        'storage_options = { key = "AKIAEXAMPLEKEY1234", secret = "s3cr3t-value-5678" }\n'
    )
    config = load_config(
        [file], env={"LLMOS_HOME": str(tmp_path / "home")}, sections=KERNEL_SECTIONS
    )
    store = policy_from_config(config).artifacts
    assert store is not None
    assert dict(store.storage_options) == {
        "key": "AKIAEXAMPLEKEY1234",
        "secret": "s3cr3t-value-5678",
    }
    assert "s3cr3t" not in repr(store)
    shown = config.to_dict()["artifacts"]["storage_options"]
    assert shown == {"key": "****1234", "secret": "****5678"}
    explained = dict((key, value) for key, value, _ in config.explain())
    assert "s3cr3t" not in json.dumps(explained)


@pytest.mark.parametrize("kind", ["memory", "folder"])
def test_keys_find_what_was_put_under_them(tmp_path: Path, kind: str) -> None:
    root = memory_root() if kind == "memory" else str(tmp_path / "shared")
    a = store_at(root, tmp_path / "a")
    b = store_at(root, tmp_path / "b")
    assert b.lookup("gguf-0123") is None
    address = a.put(weights_folder(tmp_path / "out"), "vendor/m", key="gguf-0123")
    assert b.lookup("gguf-0123") == address
    assert (b.fetch(address) / "adapter_model.safetensors").is_file()
    for bad in ("../x", "A", "", "a/b", "x" * 200):
        with pytest.raises(UsageError, match="artifact key"):
            b.lookup(bad)
    # a key leads only to an artifact of the store, complete
    b.delete(address)
    assert b.lookup("gguf-0123") is None


def test_a_key_rewritten_to_point_elsewhere_is_ignored(tmp_path: Path) -> None:
    root = memory_root()
    store = store_at(root, tmp_path / "cache")
    store.put(weights_folder(tmp_path / "out"), "m", key="k")
    fs, path = fsspec.core.url_to_fs(root)
    for pointer in (b"../../etc", b"m/" + b"0" * 64 + b"/x", b"memory://elsewhere/m/" + b"0" * 64):
        fs.pipe_file(f"{path}/.keys/k", pointer)
        assert store.lookup("k") is None


def test_a_store_that_cannot_be_reached_is_a_503_naming_the_root(tmp_path: Path) -> None:
    pytest.importorskip("aiohttp", reason="fsspec's HTTP filesystem needs aiohttp")
    shared = tmp_path / "shared"
    address = store_at(shared, tmp_path / "a").put(weights_folder(tmp_path / "out"), "adapter")
    with HTTPFolder(shared) as base:
        pass  # the server has stopped: its port refuses connections now
    mirror = store_at(base, tmp_path / "b")
    url = f"{base}/adapter/{Path(address).name}"
    with pytest.raises(Unavailable, match=f"artifact store at {base} failed") as caught:
        mirror.fetch(url)
    assert caught.value.status == 503
    assert mirror.lookup("gguf-0123") is None, "a lookup that fails is a miss, not an error"
    assert leftovers(tmp_path / "b") == []


def test_a_loaded_model_pins_its_cache_entry_until_it_is_unloaded(
    tmp_path: Path, site: Path
) -> None:
    """``[artifacts] cache_max_gb`` never takes the folder a loaded model
    was read from: the kernel pins it from load to unload."""
    root = memory_root()
    url = plant(root, "acme/pinned", {"model.safetensors": WEIGHTS, "labels.json": b'["a"]'})
    kernel = kernel_for(tmp_path / "home", f"artifacts.root={root}", "artifacts.cache_max_gb=0")
    kernel.registry.register(_card("acme/pinned", f"{url}/model.safetensors"))
    store = kernel.registry.policy.artifacts
    assert store is not None
    entry = tmp_path / "home" / "cache" / "artifacts" / url.rsplit("/", 1)[1]
    later = time.time() + 3600  # past the grace a fetch gets: only the pin keeps it
    try:
        worker = kernel.models.get("acme/pinned")
        report = store.prune(now=later)
        assert [e.path for e in report.kept_in_use] == [entry] and not report.removed
        assert kernel.models.unload(worker.name)
        assert [e.path for e in store.prune(now=later).removed] == [entry]
        assert not entry.exists()
    finally:
        kernel.models.close()
