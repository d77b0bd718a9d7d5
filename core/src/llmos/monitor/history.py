"""Reading the monitor's history: the database the ``sqlite`` sink writes.

:class:`History` opens ``LLMOS_HOME/monitor/metrics.db`` read-only (it works
with the daemon stopped, and never takes a writer's lock) and answers what
``llmos report`` — and anything else that wants more than the live hour of
:class:`~llmos.monitor.metrics.MetricWindows` — needs: the models that have
history, one :class:`~llmos.monitor.metrics.RequestStats` over a time range,
figures at a step (stored buckets merged with ``RequestStats.merge``, then
``figures()``), and the raw events of some kinds.

A model is named as requests record it (``name@version`` for a registered
model, the deployment name for a ``[models.NAME]`` one); asking for ``name``
covers every version, ``name@3`` that one (:func:`model_matches`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from llmos import db
from llmos.errors import LlmosError, NotFoundError
from llmos.monitor.metrics import RequestStats
from llmos.monitor.store import SCHEMA_VERSION, db_path

__all__ = ["History", "model_matches"]


def model_matches(stored: str | None, name: str) -> bool:
    """``stored`` (a model as events record it) is ``name``, or a version of it."""
    if not stored:
        return False
    return stored == name or ("@" not in name and stored.partition("@")[0] == name)


class History:
    """The metrics database, read-only. Times are seconds since the epoch;
    a range is ``[since, until)``."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise NotFoundError(
                f"no monitor history at {self.path}: the sqlite sink (a default plugin) writes it"
                " while the daemon or a CLI kernel runs"
            )
        what = f"monitor history {self.path}"
        try:
            self._con = db.connect(self.path, what=what, busy_timeout=5.0, read_only=True)
        except LlmosError as exc:
            raise NotFoundError(str(exc)) from None
        try:
            version = db.schema_version(self._con, what=what)
        except LlmosError as exc:  # not a database at all
            self._con.close()
            raise NotFoundError(str(exc)) from None
        if version > SCHEMA_VERSION:
            self._con.close()
            db.check_not_newer(version, SCHEMA_VERSION, what=what)
        self._empty = version == 0  # created, never written: no tables yet

    @classmethod
    def of_home(cls, home: Path) -> History:
        """The history of the kernel whose data folder is ``home``."""
        return cls(db_path(home))

    def __enter__(self) -> History:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._con.close()

    # -- requests -----------------------------------------------------------

    def models(self) -> list[str]:
        """Every model with request figures, sorted."""
        if self._empty:
            return []
        rows = self._con.execute("SELECT DISTINCT model FROM requests ORDER BY model")
        return [model for (model,) in rows]

    def resolve(self, name: str) -> list[str]:
        """The stored models ``name`` covers (:func:`model_matches`); a
        :class:`~llmos.errors.NotFoundError` listing the models that have
        history when there are none."""
        models = self.models()
        found = [m for m in models if model_matches(m, name)]
        if not found:
            known = ", ".join(models) if models else "none yet"
            raise NotFoundError(
                f"no monitor history for {name!r} in {self.path}; models with history: {known}"
            )
        return found

    def buckets(
        self, models: Sequence[str], since: float, until: float
    ) -> Iterator[tuple[float, float, str, str, RequestStats]]:
        """``(start, width, model, capability, stats)`` of every stored bucket
        of ``models`` that starts in the range, oldest first."""
        if self._empty or not models:
            return
        marks = ", ".join("?" * len(models))
        rows = self._con.execute(
            "SELECT start, width, model, capability, stats FROM requests"
            f" WHERE model IN ({marks}) AND start >= ? AND start < ? ORDER BY start",
            (*models, since, until),
        )
        for start, width, model, capability, stats in rows:
            yield start, width, model, capability, RequestStats.from_dict(json.loads(stats))

    def span(self, models: Sequence[str]) -> tuple[float, float] | None:
        """The start of the oldest bucket of ``models`` and the end of the newest."""
        if self._empty or not models:
            return None
        marks = ", ".join("?" * len(models))
        first, last = self._con.execute(
            f"SELECT min(start), max(start + width) FROM requests WHERE model IN ({marks})",
            models,
        ).fetchone()
        return None if first is None else (first, last)

    def total(
        self, models: Sequence[str], since: float, until: float
    ) -> tuple[RequestStats, dict[str, int], float]:
        """Every bucket of the range merged, requests per capability, and the
        seconds that have data (from the first bucket's start to the last one's
        end, within the range): what rates over the whole range are taken over."""
        total = RequestStats()
        capabilities: dict[str, int] = {}
        first = last = None
        for start, width, _, capability, stats in self.buckets(models, since, until):
            total.merge(stats)
            capabilities[capability] = capabilities.get(capability, 0) + stats.requests
            first = start if first is None else min(first, start)
            last = start + width if last is None else max(last, start + width)
        seconds = 0.0 if first is None or last is None else min(last, until) - max(first, since)
        return total, capabilities, seconds

    def widest(self, models: Sequence[str], since: float, until: float) -> float | None:
        """The widest bucket stored in the range (coarse ones past a day)."""
        if self._empty or not models:
            return None
        marks = ", ".join("?" * len(models))
        (width,) = self._con.execute(
            f"SELECT max(width) FROM requests WHERE model IN ({marks})"
            " AND start >= ? AND start < ?",
            (*models, since, until),
        ).fetchone()
        return width

    def series(
        self, models: Sequence[str], since: float, until: float, step: float
    ) -> list[dict[str, Any]]:
        """One point per ``step`` from ``since`` (aligned down to the step)
        to ``until``: the time the step starts and the step's figures
        (:meth:`RequestStats.figures`, rates over the step, or over the part
        of the last step before ``until``). A bucket counts in the step its start
        falls in, so ``step`` should be no narrower than the widest bucket
        (:meth:`widest`)."""
        if step <= 0:
            raise ValueError("step must be > 0")
        first = math.floor(since / step) * step
        count = max(math.ceil((until - first) / step), 1)
        steps = [RequestStats() for _ in range(count)]
        for start, _, _, _, stats in self.buckets(models, first, until):
            steps[min(int((start - first) // step), count - 1)].merge(stats)
        # the last step may end at ``until``: its rates are over what it covers
        return [
            {"time": first + i * step, **stats.figures(min(step, until - first - i * step))}
            for i, stats in enumerate(steps)
        ]

    # -- other events -------------------------------------------------------

    def events(
        self,
        kinds: str | Iterable[str],
        since: float | None = None,
        until: float | None = None,
        model: str | None = None,
    ) -> list[dict[str, Any]]:
        """Stored events of ``kinds`` (a kind, or several), oldest first, as
        ``{"time", "kind", "model", "capability", "fields"}``; only those of
        ``model`` (:func:`model_matches`) when it is given."""
        if self._empty:
            return []
        kinds = [kinds] if isinstance(kinds, str) else list(kinds)
        marks = ", ".join("?" * len(kinds))
        rows = self._con.execute(
            "SELECT time, kind, model, capability, fields FROM events"
            f" WHERE kind IN ({marks}) AND time >= ? AND time < ? ORDER BY time, id",
            (*kinds, -math.inf if since is None else since, math.inf if until is None else until),
        )
        return [
            {
                "time": time,
                "kind": kind,
                "model": stored,
                "capability": capability,
                "fields": json.loads(fields),
            }
            for time, kind, stored, capability, fields in rows
            if model is None or model_matches(stored, model)
        ]
