"""A fusion, loaded: a :class:`~llmos.types.LoadedModel` whose calls go
through a strategy to its members.

Each batch is split by budget (requests with the same budget go together),
handed to the strategy's ``combine`` with a :class:`~llmos.fusion.call.Call`,
and each result comes back with ``meta["fusion"]``: the members asked for
that request, each one's latency and whether it agreed with the answer, the
members not asked, and whether the budget cut the request short. One
``fusion.call`` monitor event per batch carries the same per member.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import attrs
import structlog

from llmos.errors import LlmosError, PluginError
from llmos.fusion.call import Call, Member, same_answer
from llmos.types import (
    Budget,
    Capability,
    ChatRequest,
    ChatResult,
    ClassifyRequest,
    ClassifyResult,
    CompletionRequest,
    CompletionResult,
    EmbedRequest,
    EmbedResult,
    FusionStrategySpec,
    ModelBase,
    ModelCaller,
    ModelCard,
    MonitorEvent,
    StreamChunk,
)

__all__ = ["FusedModel"]

log = structlog.get_logger("llmos.fusion")


class FusedModel(ModelBase):
    """Members combined by a served strategy (see the module docstring)."""

    def __init__(
        self,
        models: ModelCaller,
        card: ModelCard,
        strategy: FusionStrategySpec,
        members: Sequence[Member],
        options: Mapping[str, Any],
        capabilities: frozenset[Capability],
        max_batch_size: int = 8,
    ) -> None:
        super().__init__(card)
        self.models = models
        self.strategy = strategy
        self.members = list(members)
        self.options = dict(options)
        self.capabilities = capabilities
        self.max_batch_size = max_batch_size

    # -- capabilities ----------------------------------------------------------

    def classify(self, requests: Sequence[ClassifyRequest]) -> list[ClassifyResult]:
        return self._run(Capability.CLASSIFY, requests)

    def complete(self, requests: Sequence[CompletionRequest]) -> list[CompletionResult]:
        return self._run(Capability.COMPLETE, requests)

    def chat(self, requests: Sequence[ChatRequest]) -> list[ChatResult]:
        return self._run(Capability.CHAT, requests)

    def embed(self, requests: Sequence[EmbedRequest]) -> list[EmbedResult]:
        return self._run(Capability.EMBED, requests)

    def stream(self, requests: Sequence[CompletionRequest | ChatRequest]) -> Iterator[StreamChunk]:
        """A fused answer is known only once it is combined: each request's
        whole answer comes as one chunk, then its end (streaming clients
        work; the fusion's meta is on the non-streamed routes)."""
        for index, request in enumerate(requests):
            chat = isinstance(request, ChatRequest)
            (result,) = self._run(Capability.CHAT if chat else Capability.COMPLETE, [request])
            text = result.message.content if chat else result.text
            yield StreamChunk(index=index, text=text)
            yield StreamChunk(
                index=index, text="", finish_reason=result.finish_reason, usage=result.usage
            )

    # -- the work --------------------------------------------------------------

    def _run(self, capability: Capability, requests: Sequence[Any]) -> list[Any]:
        if capability not in self.capabilities:
            raise self._unsupported(capability)
        groups: dict[Budget | None, list[int]] = {}
        for index, request in enumerate(requests):
            groups.setdefault(getattr(request, "budget", None), []).append(index)
        out: list[Any] = [None] * len(requests)
        for budget, indexes in groups.items():
            results = self._group(capability, [requests[i] for i in indexes], budget)
            for index, result in zip(indexes, results, strict=True):
                out[index] = result
        return out

    def _group(
        self, capability: Capability, requests: Sequence[Any], budget: Budget | None
    ) -> list[Any]:
        call = Call(self.models, self.members, capability, requests, self.options, budget)
        combine = self.strategy.combine
        assert combine is not None  # a merge strategy makes no served model
        try:
            results = combine(call)
        except LlmosError:
            raise
        except Exception as exc:
            raise PluginError(
                f"fusion strategy {self.strategy.name!r} failed on {self.card.ref!r}:"
                f" {type(exc).__name__}: {exc}"
            ) from exc
        if not isinstance(results, list) or len(results) != len(requests):
            raise PluginError(
                f"fusion strategy {self.strategy.name!r} returned"
                f" {len(results) if isinstance(results, list) else type(results).__name__}"
                f" results for {len(requests)} requests"
            )
        for row, result in enumerate(results):
            if result is None:
                errors = call.errors(row)
                raise LlmosError(
                    f"fusion {self.card.ref!r}: no member answered"
                    + (f" ({'; '.join(errors)})" if errors else "")
                )
        final = [self._with_meta(call, row, result) for row, result in enumerate(results)]
        self._emit(call, final)
        return final

    def _row_meta(self, call: Call, row: int, result: Any) -> dict[str, Any]:
        members = []
        for index, asked in sorted(call.asked[row].items()):
            entry: dict[str, Any] = {
                "model": self.members[index].ref,
                "latency_s": None if asked.latency_s is None else round(asked.latency_s, 6),
                "answered": asked.answered,
            }
            if asked.answered:
                entry["agreed"] = same_answer(asked.result, result)
                if isinstance(asked.result, ClassifyResult):
                    entry["label"] = asked.result.label
                nested = getattr(asked.result, "meta", None)
                if nested:
                    entry["meta"] = dict(nested)
            if asked.error is not None:
                entry["error"] = asked.error
            members.append(entry)
        skipped = [m.ref for i, m in enumerate(self.members) if i not in call.asked[row]]
        meta: dict[str, Any] = {
            "name": self.card.ref,
            "strategy": self.strategy.name,
            "members": members,
            "skipped": skipped,
            **call.notes[row],
        }
        if call.budget is not None:
            meta["budget"] = {
                "max_members": call.budget.max_members,
                "max_latency_ms": call.budget.max_latency_ms,
                "exhausted": row in call.cut,
            }
        return meta

    def _with_meta(self, call: Call, row: int, result: Any) -> Any:
        meta = {"fusion": self._row_meta(call, row, result)}
        try:
            return attrs.evolve(result, meta=meta)
        except (TypeError, ValueError, attrs.exceptions.NotAnAttrsClassError):
            return result  # a plugin's own result type: returned as it is

    def _emit(self, call: Call, results: Sequence[Any]) -> None:
        figures: dict[str, dict[str, Any]] = {}
        for row in range(len(results)):
            meta = results[row].meta.get("fusion") if hasattr(results[row], "meta") else None
            for entry in (meta or {}).get("members", ()):
                member = figures.setdefault(
                    entry["model"], {"asked": 0, "answered": 0, "agreed": 0, "latency_s": 0.0}
                )
                member["asked"] += 1
                member["answered"] += int(entry["answered"])
                member["agreed"] += int(entry.get("agreed") is True)
                member["latency_s"] = max(member["latency_s"], entry["latency_s"] or 0.0)
        self.models.emit(
            MonitorEvent(
                kind="fusion.call",
                model=self.card.ref,
                capability=str(call.capability),
                fields={
                    "strategy": self.strategy.name,
                    "rows": len(results),
                    "members": figures,
                    "member_calls": sum(f["asked"] for f in figures.values()),
                    "budget_cut": len(call.cut),
                    "latency_s": round(call.elapsed_ms() / 1000, 6),
                },
            )
        )

    def close(self) -> None:
        """Members are the kernel's: they stay loaded for their other users."""
