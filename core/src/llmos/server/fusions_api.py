"""Fusions over HTTP: ``/api/fusions``.

* ``POST /api/fusions`` — create (and, with ``dev``, fit) a fusion; 201 with
  its card. ``dev`` is rows (``[{"text": ..., "label": ...}]``) or the absolute
  path of a file under the data folder or ``[registry] allowed_roots``. Without
  ``dev`` a classification fusion is checked against nothing: the card comes
  with ``"warnings": [...]`` saying so;
* ``GET /api/fusions`` — the registered fusions;
* ``GET /api/fusions/strategies`` — the installed strategies;
* ``GET /api/fusions/{name}`` — one fusion's card.

A fusion is served through every inference route under its name, like any
model; a request may carry a budget (``"llmos": {"max_members": 1,
"max_latency_ms": 200}`` in the OpenAI-shaped routes) and gets the fusion's
accounting back in ``"llmos": {"meta": ...}``.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from llmos.errors import LlmosError, UsageError
from llmos.fusion.service import strategy_rows
from llmos.registry.sources import check_client_path, check_source
from llmos.runtime.kernel import Kernel
from llmos.tuning.data import load_file
from llmos.types import ModelFormat

__all__ = ["fusions_router"]

PREFIX = "/api/fusions"
CREATED_BY = "api"
_TAGS = ["fusion"]


class FusionIn(BaseModel):
    """A fusion to create."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(description="The fusion's model name")
    strategy: str = Field(description="vote, mean, stack, cascade, router, rank, merge …")
    members: list[str | dict[str, Any]] = Field(
        description='Models in order: "name", "name@2", or {"model", "labels", "map"}'
    )
    options: dict[str, Any] = Field(default_factory=dict, description="Strategy options")
    dev: list[dict[str, Any]] | str | None = Field(
        None, description="Dev rows to fit on, or an absolute file path under an allowed root"
    )
    description: str = ""
    tags: list[str] = Field(default_factory=list)


def fusions_router(kernel: Kernel) -> APIRouter:
    router = APIRouter()

    def dev_rows(value: list[dict[str, Any]] | str | None) -> list[dict[str, Any]] | None:
        if not isinstance(value, str):
            return value
        check_client_path(value, kernel.registry.policy, param="dev")
        try:
            parsed = check_source(value, kernel.registry.policy)
        except LlmosError as exc:
            raise UsageError(f"dev: {exc.message}", param="dev") from None
        if parsed.path is None:
            raise UsageError(
                "dev: give rows, or the path of a file under the data folder or"
                " [registry] allowed_roots",
                param="dev",
            )
        return load_file(parsed.path)

    @router.post(PREFIX, status_code=201, tags=_TAGS, summary="Create a fusion")
    async def create(body: FusionIn) -> JSONResponse:
        def work() -> dict[str, Any]:
            card = kernel.fusions.create(
                body.name,
                strategy=body.strategy,
                members=body.members,
                options=body.options,
                dev=dev_rows(body.dev),
                description=body.description,
                tags=body.tags,
                created_by=CREATED_BY,
            )
            risk = kernel.fusions.risk(card)
            return {**card.to_dict(), **({"warnings": [risk]} if risk else {})}

        return JSONResponse(await run_in_threadpool(work), status_code=201)

    @router.get(PREFIX, tags=_TAGS, summary="List fusions")
    async def list_fusions() -> dict[str, Any]:
        cards = await run_in_threadpool(kernel.fusions.list)
        return {"data": [card.to_dict() for card in cards]}

    @router.get(f"{PREFIX}/strategies", tags=_TAGS, summary="Installed fusion strategies")
    async def strategies() -> dict[str, Any]:
        return {"data": strategy_rows(kernel.load_plugins())}

    @router.get(PREFIX + "/{name:path}", tags=_TAGS, summary="One fusion")
    async def show(name: str) -> dict[str, Any]:
        card = await run_in_threadpool(kernel.registry.store.get, name)
        if card.format != ModelFormat.FUSION and "merge" not in card.options:
            raise UsageError(f"{card.ref!r} is not a fusion (its format is {card.format})")
        return card.to_dict()

    return router
