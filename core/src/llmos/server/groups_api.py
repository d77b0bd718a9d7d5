"""Deployment groups over HTTP: ``GET /api/groups`` — each group's strategy
and, per deployment, calls, errors, requests in flight, moving-average
latency and the seconds of cooldown left (see :mod:`llmos.runtime.router`)."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from llmos.runtime.kernel import Kernel

__all__ = ["groups_router"]


def groups_router(kernel: Kernel) -> APIRouter:
    router = APIRouter()

    @router.get("/api/groups", tags=["groups"], summary="Deployment groups and their state")
    def groups() -> dict[str, Any]:
        return {"data": kernel.router.status()}

    return router
