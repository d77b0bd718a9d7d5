"""The artifact store's local cache kept under ``[artifacts] cache_max_gb``.

Real files throughout: a ``file://`` root (a folder, so that the tests can
see it is never touched) whose artifacts are fetched into a cache folder;
entries are aged by setting their folders' mtimes, which is what a fetch
touches. A pin held by another process is a real ``flock`` in a real
subprocess, and the CLI runs as the installed console script.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import attrs
import pytest

from llmos.config import load_config
from llmos.errors import ConfigError
from llmos.registry.fsstore import GB, MANIFEST, RECENT_S, ArtifactStore
from llmos.registry.sources import SourcePolicy, policy_from_config
from llmos.runtime.kernel import KERNEL_SECTIONS
from llmos.testing import write_safetensors

from .conftest import llmos

HOUR = 3600.0


def store_at(root: Path | str, cache: Path, **fields: Any) -> ArtifactStore:
    root = root.as_uri() if isinstance(root, Path) else root
    policy = SourcePolicy(allowed_roots=())
    return ArtifactStore(root=root, cache=cache, limits=policy, **fields)


def put_many(tmp_path: Path, store: ArtifactStore, count: int) -> list[str]:
    """``count`` artifacts of one size each (a safetensors file), put through
    ``store``; their addresses, in order."""
    addresses = []
    for index in range(count):
        folder = tmp_path / "out" / str(index)
        write_safetensors(folder / "adapter_model.safetensors", {"w": [16, 16 + index % 2]})
        (folder / "adapter_config.json").write_text(json.dumps({"r": 4, "index": index}))
        addresses.append(store.put(folder, f"acme/a{index}"))
    return addresses


def digest_of(address: str) -> str:
    return address.rsplit("/", 1)[1]


def age(cache: Path, digest: str, seconds_ago: float) -> None:
    stamp = time.time() - seconds_ago
    os.utime(cache / digest, (stamp, stamp))


def snapshot(folder: Path) -> dict[str, tuple[str, float]]:
    """Every path under ``folder`` with its content hash (files) and mtime."""
    out = {}
    for path in sorted(folder.rglob("*")):
        stat = path.lstat()
        content = hashlib.sha256(path.read_bytes()).hexdigest() if path.is_file() else "dir"
        out[str(path.relative_to(folder))] = (content, stat.st_mtime)
    return out


@pytest.fixture
def filled(tmp_path: Path) -> tuple[ArtifactStore, list[str]]:
    """A ``file://`` root with five artifacts, all in the cache, aged 5, 4, … 1 hours
    (the first the least recently used), and no cap yet."""
    store = store_at(tmp_path / "root", tmp_path / "cache", cache_max_gb=float("inf"))
    addresses = put_many(tmp_path, store, 5)
    for index, address in enumerate(addresses):
        age(store.cache, digest_of(address), (5 - index) * HOUR)
    return store, addresses


def cached(store: ArtifactStore) -> list[str]:
    return sorted(p.name for p in store.cache.iterdir() if not p.name.startswith("."))


def test_prune_removes_the_least_recently_used_until_under_the_cap(
    tmp_path: Path, filled: tuple[ArtifactStore, list[str]]
) -> None:
    store, addresses = filled
    digests = [digest_of(a) for a in addresses]
    root_before = snapshot(tmp_path / "root")
    # the third was used last (an hour ago, after the others): the order is 0, 1, 3, 4, 2
    age(store.cache, digests[2], 0.5 * HOUR)
    listing = store.cache_listing()
    assert [e.digest for e in listing.entries] == [digests[i] for i in (0, 1, 3, 4, 2)]
    sizes = {e.digest: e.bytes for e in listing.entries}
    assert listing.bytes == sum(sizes.values()) > 0
    # each entry's size is what its folder holds
    for entry in listing.entries:
        assert entry.bytes == sum(p.stat().st_size for p in entry.path.rglob("*") if p.is_file())

    # room for two: three go, least recently used first
    keep = sizes[digests[4]] + sizes[digests[2]]
    report = store.prune((keep + 0.5) / GB)
    assert [e.digest for e in report.removed] == [digests[0], digests[1], digests[3]]
    assert report.after_bytes == keep and report.before_bytes == listing.bytes
    assert not report.kept_in_use and not report.kept_recent
    assert cached(store) == sorted([digests[2], digests[4]])
    # no scratch left behind, and the root is untouched: the cache is a copy
    assert not [p for p in store.cache.iterdir() if p.name.startswith(".")]
    assert snapshot(tmp_path / "root") == root_before
    # what was pruned is fetched again, verified, when it is wanted
    assert store.fetch(addresses[0]) == store.cache / digests[0]


def test_a_fetch_prunes_past_the_cap_and_keeps_what_it_fetched(tmp_path: Path) -> None:
    putter = store_at(tmp_path / "root", tmp_path / "putter-cache", cache_max_gb=float("inf"))
    addresses = put_many(tmp_path, putter, 3)
    one = max(e.bytes for e in putter.cache_listing().entries)
    # a daemon whose cache holds two entries at most
    store = store_at(tmp_path / "root", tmp_path / "cache", cache_max_gb=2.5 * one / GB)
    store.fetch(addresses[0])
    store.fetch(addresses[1])
    age(store.cache, digest_of(addresses[0]), 2 * HOUR)
    age(store.cache, digest_of(addresses[1]), 1 * HOUR)
    store.fetch(addresses[2])
    assert cached(store) == sorted(digest_of(a) for a in addresses[1:])
    # a cache hit marks the entry used: now the other one is the oldest
    age(store.cache, digest_of(addresses[2]), 3 * HOUR)
    store.fetch(addresses[1])
    store.fetch(addresses[0])
    assert cached(store) == sorted(digest_of(a) for a in addresses[:2])


def test_entries_in_use_or_used_recently_are_kept(
    tmp_path: Path, filled: tuple[ArtifactStore, list[str]]
) -> None:
    store, addresses = filled
    digests = [digest_of(a) for a in addresses]
    age(store.cache, digests[4], 60)  # a minute ago: between a fetch and its load
    pin = store.pin(store.fetch(f"{addresses[0]}/adapter_model.safetensors"))
    assert pin is not None
    age(store.cache, digests[0], 10 * HOUR)  # pinned, and the oldest
    assert store.pin(tmp_path / "elsewhere") is None
    try:
        report = store.prune(0)
        assert [e.digest for e in report.removed] == [digests[1], digests[2], digests[3]]
        assert [e.digest for e in report.kept_in_use] == [digests[0]]
        assert [e.digest for e in report.kept_recent] == [digests[4]]
        assert cached(store) == sorted([digests[0], digests[4]])
        assert [e.in_use for e in store.cache_listing().entries] == [True, False]
    finally:
        pin.close()
    pin.close()  # twice is once
    assert [e.digest for e in store.prune(0).removed] == [digests[0]]
    assert cached(store) == [digests[4]]
    # recent means RECENT_S: past it, the entry goes
    assert [e.digest for e in store.prune(0, now=time.time() + RECENT_S).removed] == [digests[4]]


PIN_HOLDER = """
import sys
from pathlib import Path
from llmos.registry.fsstore import Pin
pin = Pin(Path(sys.argv[1]))
print("pinned", flush=True)
sys.stdin.read()
"""


def test_a_pin_held_by_another_process_is_respected(
    filled: tuple[ArtifactStore, list[str]],
) -> None:
    store, addresses = filled
    oldest = store.cache / digest_of(addresses[0])
    holder = subprocess.Popen(
        [sys.executable, "-c", PIN_HOLDER, str(oldest)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "pinned\n"
        assert store.cache_listing().entries[0].in_use
        report = store.prune(0)
        assert [e.path for e in report.kept_in_use] == [oldest]
        assert len(report.removed) == 4 and oldest.is_dir()
    finally:
        holder.communicate("", timeout=30)  # the process ends, and its lock with it
    assert [e.path for e in store.prune(0).removed] == [oldest]


def test_a_dry_run_changes_nothing(tmp_path: Path, filled: tuple[ArtifactStore, list[str]]) -> None:
    store, addresses = filled
    before = snapshot(store.cache)
    report = store.prune(0, dry_run=True)
    assert report.dry_run
    assert [e.digest for e in report.removed] == [digest_of(a) for a in addresses]
    assert report.after_bytes == 0
    assert snapshot(store.cache) == before


def test_only_cache_entries_are_ever_removed(
    tmp_path: Path, filled: tuple[ArtifactStore, list[str]]
) -> None:
    store, _ = filled
    # a link named like an entry, to a folder outside the cache
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / MANIFEST).write_text("{}")
    (outside / "weights.bin").write_bytes(b"x" * 4096)
    (store.cache / ("f" * 64)).symlink_to(outside, target_is_directory=True)
    # another process's fetch in progress, an operator's file
    scratch = store.cache / ".0123456789abcdef.xyz"
    (scratch / "files").mkdir(parents=True)
    (store.cache / "README").write_text("mine")
    old = time.time() - 10 * HOUR
    for path in (scratch, store.cache / "README"):
        os.utime(path, (old, old))

    assert len(store.prune(0).removed) == 5
    assert sorted(p.name for p in store.cache.iterdir()) == sorted(
        [".0123456789abcdef.xyz", "README", "f" * 64]
    )
    assert (outside / "weights.bin").stat().st_size == 4096


@pytest.mark.parametrize("cache", ["root", "root/cache", "."])
def test_a_cache_that_overlaps_a_local_root_is_refused(tmp_path: Path, cache: str) -> None:
    root = tmp_path / "root"
    store = store_at(tmp_path / "root", tmp_path / "cache", cache_max_gb=float("inf"))
    put_many(tmp_path, store, 2)
    before = snapshot(root)
    for overlapping in (
        attrs.evolve(store, cache=tmp_path / cache),  # a file:// root
        attrs.evolve(store, root=str(root), cache=tmp_path / cache),  # a folder root
    ):
        with pytest.raises(ConfigError, match="overlaps \\[artifacts\\] root"):
            overlapping.prune(0)
        with pytest.raises(ConfigError, match="give it a folder of its own"):
            overlapping.cache_listing()
    assert snapshot(root) == before


def test_a_fetch_never_fails_on_a_cache_it_cannot_prune(tmp_path: Path) -> None:
    store = store_at(tmp_path / "root", tmp_path / "cache", cache_max_gb=float("inf"))
    (address,) = put_many(tmp_path, store, 1)
    inside = attrs.evolve(store, cache=tmp_path / "root" / "cache", cache_max_gb=0.0)
    assert inside.fetch(address).is_dir()


def config(tmp_path: Path, *overrides: str) -> Any:
    return load_config(
        env={"LLMOS_HOME": str(tmp_path / "home")}, overrides=overrides, sections=KERNEL_SECTIONS
    )


@pytest.mark.parametrize("value", ["-1", '"lots"', "nan", "[1]"])
def test_a_cap_that_is_not_a_size_is_a_config_error_naming_the_key(
    tmp_path: Path, value: str
) -> None:
    expected = re.escape("artifacts.cache_max_gb: expected a number of GB >= 0 (inf: no cap)")
    with pytest.raises(ConfigError, match=expected):
        config(tmp_path, f"artifacts.cache_max_gb={value}")


def test_the_cap_comes_from_the_config_or_the_disk(tmp_path: Path) -> None:
    def store(*overrides: str) -> ArtifactStore:
        found = policy_from_config(config(tmp_path, *overrides)).artifacts
        assert found is not None
        return found

    assert store("artifacts.cache_max_gb=2.5").cache_cap() == 2_500_000_000
    assert store("artifacts.cache_max_gb=0").cache_cap() == 0
    assert store("artifacts.cache_max_gb=inf").cache_cap() is None
    default = store()
    assert default.cache_max_gb is None
    free = shutil.disk_usage(tmp_path).free
    assert abs(default.cache_cap() - free // 2) < free // 100  # type: ignore[operator]


def test_the_cli_shows_and_prunes_the_cache(
    tmp_path: Path, filled: tuple[ArtifactStore, list[str]], env: dict[str, str]
) -> None:
    store, addresses = filled
    digests = [digest_of(a) for a in addresses]
    root_before = snapshot(tmp_path / "root")
    where = [
        "--set",
        f'artifacts.root="{store.root}"',
        "--set",
        f'artifacts.cache="{store.cache}"',
        "--set",
        "artifacts.cache_max_gb=inf",
    ]
    shown = llmos(*where, "artifacts", "cache", "--json", env=env)
    assert shown.returncode == 0, shown.stderr
    listing = json.loads(shown.stdout)
    assert listing["cap_bytes"] is None and listing["cap_from"] == "cache_max_gb"
    assert [e["digest"] for e in listing["entries"]] == digests
    assert listing["bytes"] == sum(e["bytes"] for e in listing["entries"])
    table = llmos(*where, "artifacts", "cache", env=env)
    assert table.returncode == 0, table.stderr
    assert "5 entries" in table.stdout and digests[0][:16] in table.stdout
    assert "4 h ago" in table.stdout

    one = max(e["bytes"] for e in listing["entries"])
    cap = str(2.5 * one / GB)
    before = snapshot(store.cache)
    dry = llmos(*where, "artifacts", "prune", "--max-gb", cap, "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    assert [e["digest"] for e in json.loads(dry.stdout)["removed"]] == digests[:3]
    assert snapshot(store.cache) == before

    done = llmos(*where, "artifacts", "prune", "--max-gb", cap, env=env)
    assert done.returncode == 0, done.stderr
    assert "removed 3 entries" in done.stdout
    assert cached(store) == sorted(digests[3:])
    assert snapshot(tmp_path / "root") == root_before

    bad = llmos(*where, "artifacts", "prune", "--max-gb", "-1", env=env)
    assert bad.returncode != 0 and "--max-gb -1" in bad.stderr
    unset = llmos("--set", "artifacts.cache_max_gb=-3", "artifacts", "cache", env=env)
    assert unset.returncode != 0 and "artifacts.cache_max_gb" in unset.stderr
