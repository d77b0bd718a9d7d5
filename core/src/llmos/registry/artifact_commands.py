"""``llmos artifacts …``: the artifact store's local cache, seen and pruned by hand.

The cache (``[artifacts] cache``) holds verified copies of artifacts fetched
from a URL root; a daemon prunes it after each fetch, down to ``[artifacts]
cache_max_gb`` (:meth:`llmos.registry.fsstore.ArtifactStore.prune`). These
commands work on the folder itself, so they see (and respect) the pins of a
daemon running beside them. Tables for people, ``--json`` for programs.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import click
from rich.console import Console
from rich.table import Table

from llmos.errors import UsageError
from llmos.output import emit_json, json_option
from llmos.registry.fsstore import ArtifactStore, CacheEntry, PruneReport

__all__ = ["artifacts_group"]

#: given the click context, the kernel's artifact store
StoreGetter = Callable[[click.Context], ArtifactStore]


def human_bytes(count: int | None) -> str:
    """``1.5 GB``, ``320 MB``, ``12 kB`` (powers of 1000, like ``cache_max_gb``)."""
    if count is None:
        return "no cap"
    for unit, size in (("TB", 10**12), ("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} B"


def _ago(epoch: float, now: float) -> str:
    seconds = max(0.0, now - epoch)
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f} {unit} ago"
    return f"{seconds:.0f} s ago"


def _entries_table(title: str, entries: tuple[CacheEntry, ...], now: float) -> None:
    table = Table(title=title)
    for column in ("entry", "size", "last used", "in use"):
        table.add_column(column, overflow="fold")
    for entry in entries:
        table.add_row(
            entry.digest[:16],
            human_bytes(entry.bytes),
            _ago(entry.last_used, now),
            "yes" if entry.in_use else "",
        )
    Console().print(table)


def _show_report(report: PruneReport) -> None:
    verb = "would remove" if report.dry_run else "removed"
    freed = report.before_bytes - report.after_bytes
    click.echo(
        f"{report.cache}: {verb} {len(report.removed)} entries ({human_bytes(freed)});"
        f" {human_bytes(report.after_bytes)} left, cap {human_bytes(report.cap_bytes)}"
    )
    now = time.time()
    for entry in report.removed:
        click.echo(f"  {verb} {entry.digest[:16]}  {human_bytes(entry.bytes)}")
    for entry in report.kept_in_use:
        click.echo(f"  kept {entry.digest[:16]}  {human_bytes(entry.bytes)}  (a loaded model's)")
    for entry in report.kept_recent:
        click.echo(
            f"  kept {entry.digest[:16]}  {human_bytes(entry.bytes)}"
            f"  (used {_ago(entry.last_used, now)})"
        )
    if report.cap_bytes is not None and report.after_bytes > report.cap_bytes:
        click.echo("still over the cap: what is left is in use or was used in the last 10 minutes")


def artifacts_group(get_store: StoreGetter) -> click.Group:
    """Build the ``artifacts`` command group on top of ``get_store``."""

    @click.group("artifacts")
    def artifacts() -> None:
        """The artifact store's local cache: see it, prune it."""

    @artifacts.command("cache")
    @json_option
    @click.pass_context
    def cache(ctx: click.Context, as_json: bool) -> None:
        """What the local cache holds: its size and cap, and each entry's size and last use
        (least recently used first, the first to be pruned)."""
        store = get_store(ctx)
        listing = store.cache_listing()
        if as_json:
            emit_json({"root": store.root, **listing.to_dict()})
            return
        cap = human_bytes(listing.cap_bytes)
        origin = (
            "[artifacts] cache_max_gb"
            if listing.configured
            else "default: half of it plus free disk"
        )
        click.echo(
            f"{listing.cache}: {len(listing.entries)} entries, {human_bytes(listing.bytes)}"
            f" (cap {cap}, {origin})"
        )
        if store.local:
            click.echo(
                f"the root ({store.root}) is a folder, read in place: nothing is fetched here"
            )
        if listing.entries:
            _entries_table("artifact cache", listing.entries, time.time())

    @artifacts.command("prune")
    @click.option(
        "--max-gb",
        type=float,
        help="Prune down to this many GB (default: [artifacts] cache_max_gb).",
    )
    @click.option("--dry-run", is_flag=True, help="Say what would be removed; remove nothing.")
    @json_option
    @click.pass_context
    def prune(ctx: click.Context, max_gb: float | None, dry_run: bool, as_json: bool) -> None:
        """Remove the least recently used cache entries past the cap.

        Entries a loaded model was read from (in a daemon too) and entries used
        in the last 10 minutes are kept. The store's root is never touched:
        the cache holds copies, fetched again when needed.
        """
        if max_gb is not None and not max_gb >= 0:
            raise UsageError(f"--max-gb {max_gb}: give a number of GB >= 0", param="max_gb")
        report = get_store(ctx).prune(max_gb, dry_run=dry_run)
        if as_json:
            emit_json(report.to_dict())
        else:
            _show_report(report)

    return artifacts
