"""The ``[plugins.prometheus]`` table: what an operator may set, checked.

A misspelt key or a bucket list that is not a rising list of positive numbers
is a :class:`~llmos.errors.ConfigError` that names the key and what it must
be, raised when the sink starts (``monitor sink 'prometheus' failed to
start: …``), not a silently ignored setting.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from llmos.config import check_table
from llmos.errors import ConfigError

__all__ = ["BATCH_BUCKETS", "DURATION_BUCKETS", "WHERE", "Settings", "settings"]

WHERE = "[plugins.prometheus]"

#: seconds: from a table model's sub-millisecond answer to a long LLM
#: generation (a bucket every ~2.5x, as Prometheus' own defaults, but wider)
DURATION_BUCKETS: tuple[float, ...] = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
)

#: requests in one model call: powers of two up to far past any max_batch_size
BATCH_BUCKETS: tuple[float, ...] = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@attrs.frozen(kw_only=True)
class Settings:
    """The checked options of the sink."""

    #: upper bounds (seconds) of the latency histograms' buckets
    buckets: tuple[float, ...] = DURATION_BUCKETS
    #: upper bounds of ``llmos_batch_size``'s buckets
    batch_buckets: tuple[float, ...] = BATCH_BUCKETS
    #: also export the process's CPU, memory and Python figures
    process_metrics: bool = True
    #: ended tuning jobs whose series stay exported (older ones are removed)
    finished_jobs: int = 10


_KNOWN = tuple(f.name for f in attrs.fields(Settings))


def settings(options: Mapping[str, Any]) -> Settings:
    """Check ``options`` (the ``[plugins.prometheus]`` table) and fill in the defaults."""
    table = check_table(WHERE, options, _KNOWN)
    checked: dict[str, Any] = {}
    for key in ("buckets", "batch_buckets"):
        if key in table:
            checked[key] = _buckets(key, table[key])
    if "process_metrics" in table:
        value = table["process_metrics"]
        if not isinstance(value, bool):
            raise ConfigError(f"{WHERE} process_metrics must be true or false, got {value!r}")
        checked["process_metrics"] = value
    if "finished_jobs" in table:
        value = table["finished_jobs"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ConfigError(f"{WHERE} finished_jobs must be an integer >= 0, got {value!r}")
        checked["finished_jobs"] = value
    return Settings(**checked)


def _buckets(key: str, value: Any) -> tuple[float, ...]:
    what = f"{WHERE} {key} must be a list of positive numbers in rising order"
    if isinstance(value, str | bytes) or not isinstance(value, Sequence) or not value:
        raise ConfigError(f"{what}, got {value!r}")
    previous: float | None = None
    for item in value:
        if isinstance(item, bool) or not isinstance(item, int | float):
            raise ConfigError(f"{what}; {item!r} is not a number")
        if not math.isfinite(item) or item <= 0:
            raise ConfigError(f"{what}; {item!r} is not a finite number > 0 (+Inf is implied)")
        if previous is not None and item <= previous:
            raise ConfigError(f"{what}; {item!r} comes after {previous!r}")
        previous = item
    return tuple(float(item) for item in value)
