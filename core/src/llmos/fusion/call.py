"""One batch through a fusion: members asked through the kernel, within a budget.

A :class:`Call` is what a strategy's ``combine`` gets (the
:class:`~llmos.types.FusionCall` protocol). Members are called through the
kernel — their own workers, batching and monitoring — never directly, so a
model that is both served alone and a member is loaded once. The call keeps
the requests' :class:`~llmos.types.Budget`:

* ``max_members``: a row is not sent to more members than this;
* ``max_latency_ms``: past the deadline no member is asked for a row that
  already has an answer, and a member not back by then is left behind. The
  first member a row reaches always answers: a fusion never answers with
  nothing.

It records, per row, which members were asked, how long each took and what
each said, for the result's ``meta`` and the ``fusion.call`` monitor event.
"""

from __future__ import annotations

import concurrent.futures
import threading
import time
from collections.abc import Mapping, Sequence
from typing import Any

import attrs

from llmos.errors import UsageError
from llmos.types import (
    Budget,
    Capability,
    ClassifyRequest,
    ClassifyResult,
    ModelCaller,
    ModelCard,
)

__all__ = ["Asked", "Call", "Member"]


@attrs.frozen(kw_only=True)
class Member:
    """A member as the fusion uses it.

    ``labels``: the member is asked zero-shot over these labels (a causal LM
    scoring label words); ``label_map`` renames the labels it answers with to
    the fusion's (``{"positive": "1"}``).
    """

    ref: str
    card: ModelCard
    labels: tuple[str, ...] = attrs.field(default=(), converter=tuple)
    label_map: Mapping[str, str] = attrs.field(factory=dict)

    def request(self, request: Any) -> Any:
        """``request`` as this member is asked it."""
        if isinstance(request, ClassifyRequest) and self.labels:
            return attrs.evolve(request, labels=self.labels, budget=None)
        if getattr(request, "budget", None) is not None:
            # a member that is itself a fusion gets what is left of the budget
            # from the parent's deadline, not the whole budget again
            return attrs.evolve(request, budget=None)
        return request

    def result(self, result: Any) -> Any:
        """The member's ``result`` in the fusion's labels."""
        if isinstance(result, ClassifyResult) and self.label_map:
            scores: dict[str, float] = {}
            for label, p in result.scores.items():
                mapped = self.label_map.get(label, label)
                scores[mapped] = scores.get(mapped, 0.0) + p
            return attrs.evolve(result, scores=scores)
        return result


@attrs.define
class Asked:
    """One member's part in one row."""

    member: int
    latency_s: float | None = None
    result: Any = None
    #: ``False``: asked, but not back within the budget (or it failed)
    answered: bool = False
    error: str | None = None


class Call:
    """One batch of one capability through a fusion (see the module docstring)."""

    def __init__(
        self,
        models: ModelCaller,
        members: Sequence[Member],
        capability: Capability,
        requests: Sequence[Any],
        options: Mapping[str, Any],
        budget: Budget | None,
        timeout: float | None = None,
    ) -> None:
        self.models = models
        self._members = list(members)
        self.members = [m.card for m in self._members]
        self.capability = capability
        self.requests = list(requests)
        self.options = options
        self.budget = budget
        self.started = time.monotonic()
        self.deadline = (
            self.started + budget.max_latency_ms / 1000
            if budget is not None and budget.max_latency_ms is not None
            else None
        )
        self.max_members = budget.max_members if budget is not None else None
        #: a member call's own limit: the kernel's request timeout
        self.timeout = timeout or models.request_timeout
        self.asked: list[dict[int, Asked]] = [{} for _ in self.requests]
        self.notes: list[dict[str, Any]] = [{} for _ in self.requests]
        #: rows the budget cut short (a member not asked or left behind)
        self.cut: set[int] = set()
        self._lock = threading.Lock()

    # -- the FusionCall protocol ---------------------------------------------

    def ask(
        self, member: int, rows: Sequence[int] | None = None, requests: Sequence[Any] | None = None
    ) -> dict[int, Any]:
        return self._ask_many([member], rows, requests)[0]

    def ask_all(
        self, members: Sequence[int] | None = None, rows: Sequence[int] | None = None
    ) -> list[dict[int, Any]]:
        indexes = list(range(len(self._members))) if members is None else list(members)
        return self._ask_many(indexes, rows, None)

    def helper(self, model: str, capability: Capability, requests: Sequence[Any]) -> list[Any]:
        return self.models.call(model, capability, requests, timeout=self.timeout)

    def note(self, row: int, **facts: Any) -> None:
        self.notes[row].update(facts)

    # -- internals -------------------------------------------------------------

    def _check_member(self, member: int) -> None:
        if isinstance(member, bool) or not isinstance(member, int):
            raise UsageError(f"member index must be an integer, got {member!r}")
        if not 0 <= member < len(self._members):
            raise UsageError(f"no member {member}: the fusion has {len(self._members)}")

    def _allowed(self, member: int, rows: Sequence[int]) -> list[int]:
        """The rows ``member`` may still be asked for, within the budget."""
        now = time.monotonic()
        allowed = []
        for row in rows:
            asked = self.asked[row]
            if member in asked:
                allowed.append(row)  # asking again costs no new member
                continue
            if not asked:
                allowed.append(row)  # the first member always answers
                continue
            over_count = self.max_members is not None and len(asked) >= self.max_members
            over_time = self.deadline is not None and now >= self.deadline
            if over_count or over_time:
                self.cut.add(row)
            else:
                allowed.append(row)
        return allowed

    def _ask_many(
        self,
        members: Sequence[int],
        rows: Sequence[int] | None,
        requests: Sequence[Any] | None,
    ) -> list[dict[int, Any]]:
        every = list(range(len(self.requests))) if rows is None else [int(r) for r in rows]
        if requests is not None and len(requests) != len(every):
            raise UsageError(f"{len(requests)} requests for {len(every)} rows")
        for row in every:
            if not 0 <= row < len(self.requests):
                raise UsageError(f"no row {row}: the batch has {len(self.requests)}")
        own = dict(zip(every, requests, strict=True)) if requests is not None else {}
        pending: dict[concurrent.futures.Future[list[Any]], tuple[int, list[int], float]] = {}
        answers: list[dict[int, Any]] = [{} for _ in members]
        for slot, member in enumerate(members):
            self._check_member(member)
            with self._lock:
                allowed = self._allowed(member, every)
                for row in allowed:
                    self.asked[row].setdefault(member, Asked(member))
            if not allowed:
                continue
            spec = self._members[member]
            batch = [spec.request(own.get(row, self.requests[row])) for row in allowed]
            try:
                future = self.models.submit(spec.ref, self.capability, batch)
            except Exception as exc:  # a member that cannot be queued fails its rows alone
                self._failed(member, allowed, exc)
                continue
            pending[future] = (slot, allowed, time.monotonic())
        self._collect(pending, members, answers)
        return answers

    def _wait_limit(self, rows_waiting: set[int]) -> float | None:
        """How long to wait for the next member: until the deadline, unless a
        row still has no answer at all (then until the member's own timeout)."""
        if self.deadline is None:
            return self.timeout
        if any(not any(a.answered for a in self.asked[row].values()) for row in rows_waiting):
            return self.timeout
        return max(0.0, self.deadline - time.monotonic())

    def _collect(
        self,
        pending: dict[concurrent.futures.Future[list[Any]], tuple[int, list[int], float]],
        members: Sequence[int],
        answers: list[dict[int, Any]],
    ) -> None:
        while pending:
            waiting = {row for _, rows, _ in pending.values() for row in rows}
            limit = self._wait_limit(waiting)
            done, _ = concurrent.futures.wait(
                pending, timeout=limit, return_when=concurrent.futures.FIRST_COMPLETED
            )
            if not done:
                # past the budget (or a member's own timeout): leave the rest behind
                for future, (_, rows, _) in pending.items():
                    future.cancel()
                    self.cut.update(rows)
                return
            for future in done:
                slot, rows, sent = pending.pop(future)
                member = members[slot]
                latency = time.monotonic() - sent
                try:
                    results = future.result()
                except Exception as exc:
                    self._failed(member, rows, exc, latency)
                    continue
                spec = self._members[member]
                for row, result in zip(rows, results, strict=True):
                    mapped = spec.result(result)
                    entry = self.asked[row][member]
                    entry.latency_s, entry.result, entry.answered = latency, mapped, True
                    answers[slot][row] = mapped

    def _failed(
        self, member: int, rows: Sequence[int], exc: BaseException, latency: float | None = None
    ) -> None:
        message = getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"
        for row in rows:
            entry = self.asked[row].setdefault(member, Asked(member))
            entry.latency_s, entry.error = latency, message

    # -- after combine ---------------------------------------------------------

    def errors(self, row: int) -> list[str]:
        return [
            f"{self._members[a.member].ref}: {a.error}"
            for a in self.asked[row].values()
            if a.error is not None
        ]

    def answered(self, row: int) -> bool:
        return any(a.answered for a in self.asked[row].values())

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.started) * 1000


def same_answer(a: Any, b: Any) -> bool | None:
    """Whether a member's result agrees with the fusion's (``None``: not comparable)."""
    if a is None or b is None:
        return None
    if isinstance(a, ClassifyResult) and isinstance(b, ClassifyResult):
        return a.label == b.label
    text_a, text_b = _text(a), _text(b)
    if text_a is None or text_b is None:
        return None
    return text_a.strip() == text_b.strip()


def _text(result: Any) -> str | None:
    text = getattr(result, "text", None)
    if isinstance(text, str):
        return text
    message = getattr(result, "message", None)
    content = getattr(message, "content", None)
    return content if isinstance(content, str) else None
