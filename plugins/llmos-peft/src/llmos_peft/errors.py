"""What a tuning run raises on purpose (beyond :class:`~llmos.errors.UsageError`)."""

from __future__ import annotations

from llmos.errors import LlmosError

__all__ = ["Cancelled"]


class Cancelled(LlmosError):
    """The job asked the run to stop (``should_stop()`` turned true).

    Raised between two steps, after a checkpoint of the steps done so far was
    written, so that a job stopped by a daemon shutdown resumes where it was.
    The message is ``cancelled``; :attr:`step` says at which step it stopped.
    """

    type = "cancelled"

    def __init__(self, step: int) -> None:
        super().__init__("cancelled")
        self.step = step
