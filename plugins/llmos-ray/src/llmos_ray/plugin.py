"""The ray plugin: the executor ``ray``, which serves models on a Ray cluster.

With ``[runtime] executor = "ray"`` (or a ``[models.NAME]`` deployment's
``executor = "ray"``) and ``[plugins.ray] address`` (``auto``, ``HOST:PORT``
or ``ray://HOST:PORT``), the kernel places each served model here: one Ray
Serve application per model, whose replicas load it with llmos's own
providers and batch on the replica; LoRA adapters are multiplexed on their
base's replicas (:mod:`llmos_ray.executor`). The rest of ``[plugins.ray]``
sets each deployment's replicas and resources (:mod:`llmos_ray.options`).

This module imports Ray only when the kernel creates the executor, so
``llmos plugins`` stays fast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from llmos.plugin import hookimpl
from llmos.types import ExecutorSpec, PluginContext

__all__ = ["EXECUTOR", "PLUGIN"]

#: the plugin's name: its entry-point name in pyproject.toml, and its options' table
PLUGIN = "ray"
EXECUTOR = "ray"


def _create(context: PluginContext) -> Any:
    from llmos_ray.executor import RayExecutor

    return RayExecutor.from_context(context)


@hookimpl
def llmos_register_executors(register: Callable[[ExecutorSpec], None]) -> None:
    register(
        ExecutorSpec(
            name=EXECUTOR,
            create=_create,
            description="Ray Serve: each model a Serve application of replicas on a Ray cluster"
            " ([plugins.ray] address, replicas, autoscaling, resources)",
        )
    )
