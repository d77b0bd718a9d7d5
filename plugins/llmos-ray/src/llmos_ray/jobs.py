"""Tuning jobs as Ray actors: ``[tuning] executor = "ray"``.

The kernel's job manager hands the executor a job's worker payload (plain
values: the method, the base model, the data, and the job's folders, which
every node must see at the same paths — shared storage). :class:`JobRunner`,
a Ray actor placed by the resources ``[plugins.ray] tuning`` asks for
(``num_cpus``, ``num_gpus``, ``memory_mb``, ``resources``), starts the job's
worker process on its node with :func:`llmos.replica.start_job` and relays
what it sends. :class:`RayJobHandle` is the kernel's side (a
:class:`~llmos.types.JobHandle`).

A node that dies takes the actor and the worker with it: the handle then
says ``lost``, the kernel queues the job again, and the next attempt — on
whichever node has room — resumes from the checkpoints the method left in
the job's folder. The actor is never restarted by Ray (``max_restarts=0``):
the kernel decides what runs again.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import Any

import ray
import structlog
from ray import exceptions as rex

from llmos.errors import ConfigError
from llmos.replica import start_job

__all__ = ["JobRunner", "RayJobHandle", "job_actor_options"]

log = structlog.get_logger("llmos.ray")

#: what a call to the actor may take beyond its own timeout before the node is taken for lost
CALL_GRACE_S = 30.0
_LOST = (rex.RayActorError, rex.ActorUnavailableError, rex.NodeDiedError, rex.GetTimeoutError)


class JobRunner:
    """The actor's class: one job's worker process, on the actor's node."""

    def __init__(self, payload: Mapping[str, Any]) -> None:
        self.handle = start_job(payload)
        self.node = ray.get_runtime_context().get_node_id()

    def where(self) -> str:
        return f"node {self.node[:12]} {self.handle.where}"

    def receive(self, timeout: float) -> list[tuple[Any, ...]] | None:
        return self.handle.receive(timeout)

    def stop(self) -> None:
        self.handle.stop()

    def terminate(self) -> None:
        self.handle.terminate()

    def kill(self) -> None:
        self.handle.kill()

    def join(self, timeout: float | None) -> int | None:
        return self.handle.join(timeout)

    def close(self) -> None:
        self.handle.close()


def job_actor_options(options: Mapping[str, Any]) -> dict[str, Any]:
    """The actor's resources from ``[plugins.ray] tuning``, checked."""
    table = options.get("tuning", {})
    if not isinstance(table, Mapping):
        raise ConfigError("[plugins.ray] tuning must be a table", param="tuning")
    known = {"num_cpus", "num_gpus", "memory_mb", "resources"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(
            f"[plugins.ray] tuning: unknown key(s) {', '.join(unknown)};"
            f" known: {', '.join(sorted(known))}",
            param="tuning",
        )
    out: dict[str, Any] = {
        "num_cpus": float(table.get("num_cpus", 1)),
        "num_gpus": float(table.get("num_gpus", 0)),
        "max_restarts": 0,
        "max_concurrency": 4,  # receive, stop and join from the kernel while one waits
    }
    if "memory_mb" in table:
        out["memory"] = int(table["memory_mb"]) * 1024 * 1024
    if "resources" in table:
        out["resources"] = {str(k): float(v) for k, v in dict(table["resources"]).items()}
    return out


class RayJobHandle:
    """The kernel's side of a job running in a :class:`JobRunner` actor."""

    def __init__(self, payload: Mapping[str, Any], options: Mapping[str, Any]) -> None:
        self.lost = False
        self._ended = False
        self._actor = ray.remote(JobRunner).options(**job_actor_options(options)).remote(payload)
        try:
            self.where = ray.get(self._actor.where.remote(), timeout=120)
        except _LOST as exc:
            self.where = "a lost node"
            self._lose(exc)

    def _lose(self, exc: BaseException) -> None:
        if not self.lost:
            log.warning("ray.job_lost", where=self.where, error=type(exc).__name__)
        self.lost = True
        self._ended = True

    def receive(self, timeout: float) -> list[tuple[Any, ...]] | None:
        if self._ended:
            return None
        try:
            messages = ray.get(self._actor.receive.remote(timeout), timeout=timeout + CALL_GRACE_S)
        except _LOST as exc:
            self._lose(exc)
            return None
        if messages is None:
            self._ended = True
        return messages

    def _tell(self, what: str) -> None:
        if self.lost:
            return
        with contextlib.suppress(*_LOST):
            getattr(self._actor, what).remote()

    def stop(self) -> None:
        self._tell("stop")

    def terminate(self) -> None:
        self._tell("terminate")

    def kill(self) -> None:
        self._tell("kill")

    def join(self, timeout: float | None = None) -> int | None:
        if self.lost:
            return None
        wait = 0.0 if timeout is None else timeout
        try:
            return ray.get(self._actor.join.remote(timeout), timeout=wait + CALL_GRACE_S)
        except _LOST as exc:
            self._lose(exc)
            return None

    def close(self) -> None:
        with contextlib.suppress(Exception):
            ray.get(self._actor.close.remote(), timeout=10)
        with contextlib.suppress(Exception):
            ray.kill(self._actor)
