"""What a replica sends back: plain picklable values."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs

__all__ = ["Answer"]


@attrs.frozen(kw_only=True)
class Answer:
    """One caller's results from a replica, with the replica's timing of them."""

    results: list[Any]
    #: queue_wait_s, latency_s, model_s, batch_size (the replica worker's clock)
    timing: Mapping[str, Any]
    #: the replica that answered (Serve's replica id)
    replica: str
