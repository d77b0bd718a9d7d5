"""PostgreSQL vs SQLite registry search: p50/p95 at 100k cards.

Loads the same synthetic cards (``registry_search.generate_cards``: the
vocabulary, vendors, families and tags of ``bench/registry_search.py``) into
the kernel's :class:`~llmos.registry.SQLiteStore` and into llmos-postgres's
:class:`~llmos_postgres.PostgresStore` on a throwaway PostgreSQL server
(Debian's binaries, loopback TCP, ``llmos_postgres.testing``), then times the
same searches against both, side by side in one process, alternating store
per query. Each query's first page must be the same on both stores (names and
scores): the run stops if not.

Query classes: keyword (free text, ranked by bm25), task filter, tag filter,
family filter, an OR query, and for information one very common word (the
worst case of ranking: every match is scored on PostgreSQL). The ratio is
PostgreSQL's p95 over SQLite's (above 1: PostgreSQL slower).

Needs llmos-postgres installed (``make test-postgres`` makes ``.venv-postgres``)::

    .venv-postgres/bin/python bench/registry_store_search.py            # 100k cards
    .venv-postgres/bin/python bench/registry_store_search.py --quick    # 5k cards, < 1 min

Results are JSON (``bench/results/registry_store_search.json``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

import psycopg

from llmos.logs import configure_logging
from llmos.registry import SQLiteStore
from llmos.registry.store import RegistryStore
from llmos_postgres import PostgresStore
from llmos_postgres.testing import find_binaries, temporary_server

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import registry_search as rs  # noqa: E402 - the sibling benchmark's card generator

DEFAULT_OUT = HERE / "results" / "registry_store_search.json"
QUICK_OUT = HERE / "results" / "registry_store_search-quick.json"
LIMIT = 20
CHUNK = 2_000

QUERY_CLASSES: dict[str, list[str]] = {
    "keyword": [rs.RARE_1, "salesforce", "multilingual", '"text classification"'],
    "task_filter": ["task:embedding", "sentiment task:text-classification"],
    "tag": ["tag:medical", "tag:medical license:apache-2.0"],
    "family": ["family:bert", "llama family:llama params:<10B"],
    "or_query": ["bert OR tag:nlp"],
    # for information: a word in most descriptions, every match scored on PostgreSQL
    "keyword_common": ["model"],
}
MAIN_CLASSES = ("keyword", "task_filter", "tag", "family", "or_query")


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load(store: RegistryStore, size: int, seed: int) -> float:
    """Register ``size`` cards in chunks; the seconds it took."""
    began = time.perf_counter()
    for start in range(0, size, CHUNK):
        store.register_many(rs.generate_cards(seed, start, min(CHUNK, size - start)))
    return time.perf_counter() - began


def page_of(store: RegistryStore, query: str) -> list[tuple[str, float | None]]:
    page = store.search(query, limit=LIMIT)
    return [(hit.card.name, hit.score) for hit in page.items]


def time_both(
    stores: dict[str, RegistryStore], query: str, *, reps: int, warmup: int, budget_s: float
) -> dict[str, list[float]]:
    """Alternate the stores call by call, so that both see the same machine."""
    for _ in range(warmup):
        for store in stores.values():
            store.search(query, limit=LIMIT)
    times: dict[str, list[float]] = {key: [] for key in stores}
    began = time.perf_counter()
    while len(times["sqlite"]) < reps:
        for key, store in stores.items():
            t0 = time.perf_counter()
            store.search(query, limit=LIMIT)
            times[key].append(time.perf_counter() - t0)
        if len(times["sqlite"]) >= 20 and time.perf_counter() - began > budget_s:
            break
    return times


def ratio(sqlite_ms: float, postgres_ms: float) -> float | None:
    return round(postgres_ms / sqlite_ms, 2) if sqlite_ms > 0 else None


def machine_info(server_version: str) -> dict[str, Any]:
    return {
        "cpu_count": os.cpu_count(),
        "cpus_usable": len(os.sched_getaffinity(0)),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "postgresql": server_version,
        "psycopg": metadata.version("psycopg"),
        "llmos": metadata.version("llmos"),
        "load_average": list(os.getloadavg()),
    }


def run(args: argparse.Namespace) -> dict[str, Any]:
    bin_dir = find_binaries()
    if bin_dir is None:
        raise SystemExit("PostgreSQL's initdb/pg_ctl not found: run `bash .ci/system-packages`")
    workdir = Path(tempfile.mkdtemp(prefix="llmos-bench-stores-"))
    # The whole data set in PostgreSQL's own cache, as SQLite maps its file whole.
    settings = {"shared_buffers": "512MB", "effective_cache_size": "2GB", "work_mem": "16MB"}
    with temporary_server(bin_dir, settings=settings) as server:
        sqlite = SQLiteStore(workdir / "registry.db")
        postgres = PostgresStore(server.dsn, schema="bench")
        try:
            say(f"loading {args.cards:,} cards into SQLite ...")
            sqlite_load = load(sqlite, args.cards, args.seed)
            say(f"  {sqlite_load:.1f} s; into PostgreSQL ...")
            postgres_load = load(postgres, args.cards, args.seed)
            say(f"  {postgres_load:.1f} s; VACUUM ANALYZE (autovacuum's job on a live server)")
            with psycopg.connect(server.dsn, autocommit=True) as conn:
                conn.execute("VACUUM ANALYZE")
                version = conn.execute("SHOW server_version").fetchone()[0]
            stores: dict[str, RegistryStore] = {"sqlite": sqlite, "postgres": postgres}
            classes: dict[str, Any] = {}
            for cls, queries in QUERY_CLASSES.items():
                entries = []
                pooled: dict[str, list[list[float]]] = {"sqlite": [], "postgres": []}
                for query in queries:
                    first = {key: page_of(store, query) for key, store in stores.items()}
                    same = [n for n, _ in first["sqlite"]] == [n for n, _ in first["postgres"]]
                    if not same:
                        raise SystemExit(f"{query!r}: the stores' first pages differ: {first}")
                    total = postgres.search(query, limit=1).total
                    times = time_both(
                        stores, query, reps=args.reps, warmup=args.warmup, budget_s=args.budget
                    )
                    figures = {key: rs.summarise(values) for key, values in times.items()}
                    for key, values in times.items():
                        pooled[key].append(values)
                    entries.append(
                        {
                            "query": query,
                            "total": total,
                            "same_first_page": same,
                            **figures,
                            "ratio_p50": ratio(
                                figures["sqlite"]["p50_ms"], figures["postgres"]["p50_ms"]
                            ),
                            "ratio_p95": ratio(
                                figures["sqlite"]["p95_ms"], figures["postgres"]["p95_ms"]
                            ),
                        }
                    )
                    say(
                        f"  {cls:<15} {query:<36} ({total:>5} hits) sqlite p95"
                        f" {figures['sqlite']['p95_ms']:8.3f} ms | postgres p95"
                        f" {figures['postgres']['p95_ms']:8.3f} ms  x{entries[-1]['ratio_p95']}"
                    )
                summary = {key: rs.summarise_pooled(groups) for key, groups in pooled.items()}
                classes[cls] = {
                    **summary,
                    "ratio_p50": ratio(summary["sqlite"]["p50_ms"], summary["postgres"]["p50_ms"]),
                    "ratio_p95": ratio(summary["sqlite"]["p95_ms"], summary["postgres"]["p95_ms"]),
                    "queries": entries,
                }
        finally:
            sqlite.close()
            postgres.close()
            for leftover in workdir.glob("*"):
                leftover.unlink()
            workdir.rmdir()
    return {
        "benchmark": "registry_store_search",
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cards": args.cards,
        "seed": args.seed,
        "limit": LIMIT,
        "ratio": "postgres / sqlite (above 1: PostgreSQL slower)",
        "server": "throwaway cluster, loopback TCP, shared_buffers 512MB, fsync off",
        "load_seconds": {"sqlite": round(sqlite_load, 1), "postgres": round(postgres_load, 1)},
        "machine": machine_info(version),
        "classes": classes,
        "summary_p95_ms": {
            cls: {
                "sqlite": classes[cls]["sqlite"]["p95_ms"],
                "postgres": classes[cls]["postgres"]["p95_ms"],
                "ratio": classes[cls]["ratio_p95"],
            }
            for cls in classes
        },
        "main_classes": list(MAIN_CLASSES),
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--cards", type=int, default=100_000)
    parser.add_argument("--quick", action="store_true", help="5,000 cards, fewer repetitions")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reps", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--budget", type=float, default=4.0, help="seconds per query, both stores")
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    if args.quick:
        args.cards, args.reps, args.budget = 5_000, 50, 1.0
    out = args.out or (QUICK_OUT if args.quick else DEFAULT_OUT)
    configure_logging("warning", fmt="console")
    result = run(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    say(f"written {out}")
    for cls, row in result["summary_p95_ms"].items():
        say(
            f"{cls:<15} p95 sqlite {row['sqlite']:8.3f} ms  postgres {row['postgres']:8.3f} ms"
            f"  x{row['ratio']}"
        )


if __name__ == "__main__":
    main()
