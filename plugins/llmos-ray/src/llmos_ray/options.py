"""How a served model maps to a Ray Serve deployment, checked before anything runs.

The operator's ``[plugins.ray]`` table sets the defaults for every model and
``[plugins.ray.deployments.NAME]`` overrides them for one; a card may carry
its own under ``options.ray`` (the replica takes that key out before the
provider sees the card's options). Later wins: plugin defaults, then the
card, then the operator's per-model table — the operator has the last word
on resources.

Every key is checked here, in the kernel's process, so a typo or an
impossible autoscaling range is a :class:`~llmos.errors.ConfigError` naming
the key and what it takes, not a Serve controller error minutes later.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import attrs

from llmos.errors import ConfigError

__all__ = ["AUTOSCALING_KEYS", "DEPLOYMENT_KEYS", "Autoscaling", "ServeSettings", "serve_settings"]

#: keys of a deployment table (``[plugins.ray]``, ``[plugins.ray.deployments.NAME]``,
#: a card's ``options.ray``)
DEPLOYMENT_KEYS = {
    "num_replicas": "an integer >= 1 (fixed replicas; leave out with autoscaling)",
    "autoscaling": "a table: min_replicas, max_replicas, target_ongoing_requests",
    "num_cpus": "a number >= 0 (CPUs each replica reserves)",
    "num_gpus": "a number >= 0 (GPUs each replica reserves)",
    "memory_mb": "an integer >= 1 (memory each replica reserves, MiB)",
    "resources": "a table of custom Ray resources each replica reserves, name -> number",
    "max_ongoing_requests": "an integer >= 1 (requests a replica runs or batches at once)",
    "max_queued_requests": "an integer >= 1, or -1 for no limit (429 past it)",
    "max_adapters": "an integer >= 1 (LoRA adapters kept loaded per replica)",
}
AUTOSCALING_KEYS = {
    "min_replicas": "an integer >= 0",
    "max_replicas": "an integer >= 1",
    "target_ongoing_requests": "a number > 0",
    "upscale_delay_s": "a number of seconds >= 0 (Serve's default: 30)",
    "downscale_delay_s": "a number of seconds >= 0 (Serve's default: 600)",
    "look_back_period_s": "a number of seconds > 0 the load is averaged over (Serve's: 30)",
}
#: the autoscaling keys passed to Serve only when set (Serve's defaults otherwise)
_TIMING_KEYS = ("upscale_delay_s", "downscale_delay_s", "look_back_period_s")
#: the keys of [plugins.ray] that are not deployment keys
CLUSTER_KEYS = {
    "address",
    "connect_timeout_s",
    "namespace",
    "deployments",
    "event_interval_s",
    "node_ip_address",
    "replica_home",
    "tuning",
}


@attrs.frozen(kw_only=True)
class Autoscaling:
    """Serve's ``autoscaling_config``: replicas between ``min`` and ``max``,
    aiming at ``target_ongoing_requests`` per replica."""

    min_replicas: int = 1
    max_replicas: int = 1
    target_ongoing_requests: float = 2.0
    #: how soon Serve acts on the load, and over how long it averages it (None: Serve's)
    upscale_delay_s: float | None = None
    downscale_delay_s: float | None = None
    look_back_period_s: float | None = None

    def to_serve(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "min_replicas": self.min_replicas,
            "max_replicas": self.max_replicas,
            "target_ongoing_requests": self.target_ongoing_requests,
        }
        for key in _TIMING_KEYS:
            if (value := getattr(self, key)) is not None:
                out[key] = value
        return out


@attrs.frozen(kw_only=True)
class ServeSettings:
    """One model's deployment: replicas (fixed or autoscaled) and what each reserves."""

    num_replicas: int = 1
    autoscaling: Autoscaling | None = None
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    memory_mb: int | None = None
    resources: Mapping[str, float] = attrs.field(factory=dict)
    max_ongoing_requests: int = 16
    max_queued_requests: int = 64
    max_adapters: int = 4

    def deployment_options(self) -> dict[str, Any]:
        """Keyword arguments of ``serve.deployment(...)`` / ``.options(...)``."""
        actor: dict[str, Any] = {"num_cpus": self.num_cpus, "num_gpus": self.num_gpus}
        if self.memory_mb is not None:
            actor["memory"] = self.memory_mb * 1024 * 1024
        if self.resources:
            actor["resources"] = dict(self.resources)
        out: dict[str, Any] = {
            "ray_actor_options": actor,
            "max_ongoing_requests": self.max_ongoing_requests,
            "max_queued_requests": self.max_queued_requests,
        }
        if self.autoscaling is not None:
            out["autoscaling_config"] = self.autoscaling.to_serve()
        else:
            out["num_replicas"] = self.num_replicas
        return out


def _int(where: str, key: str, value: Any, low: int, *, minus_one: bool = False) -> int:
    ok = isinstance(value, int) and not isinstance(value, bool)
    if ok and (value >= low or (minus_one and value == -1)):
        return int(value)
    raise ConfigError(
        f"{where}: {key} = {value!r}; it takes {DEPLOYMENT_KEYS.get(key) or AUTOSCALING_KEYS[key]}",
        param=key,
    )


def _number(where: str, key: str, value: Any, *, positive: bool = False) -> float:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    if ok and (value > 0 if positive else value >= 0):
        return float(value)
    raise ConfigError(
        f"{where}: {key} = {value!r}; it takes {DEPLOYMENT_KEYS.get(key) or AUTOSCALING_KEYS[key]}",
        param=key,
    )


def _table(where: str, key: str, value: Any) -> Mapping[str, Any]:
    if isinstance(value, Mapping):
        return value
    raise ConfigError(f"{where}: {key} = {value!r}; it takes {DEPLOYMENT_KEYS[key]}", param=key)


def _unknown(where: str, table: Mapping[str, Any], known: Mapping[str, str] | set[str]) -> None:
    unknown = sorted(set(table) - set(known))
    if unknown:
        raise ConfigError(
            f"{where}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
            param=unknown[0],
        )


def _autoscaling(where: str, table: Mapping[str, Any]) -> Autoscaling:
    where = f"{where} autoscaling"
    _unknown(where, table, AUTOSCALING_KEYS)
    low = _int(where, "min_replicas", table.get("min_replicas", 1), 0)
    high = _int(where, "max_replicas", table.get("max_replicas", max(low, 1)), 1)
    if low > high:
        raise ConfigError(
            f"{where}: min_replicas ({low}) is above max_replicas ({high}); make max_replicas"
            " at least min_replicas",
            param="min_replicas",
        )
    target = _number(
        where, "target_ongoing_requests", table.get("target_ongoing_requests", 2.0), positive=True
    )
    timing = {
        key: _number(where, key, table[key], positive=key == "look_back_period_s")
        for key in _TIMING_KEYS
        if key in table
    }
    return Autoscaling(
        min_replicas=low, max_replicas=high, target_ongoing_requests=target, **timing
    )


def _apply(settings: ServeSettings, where: str, table: Mapping[str, Any]) -> ServeSettings:
    """``settings`` with one table's keys checked and laid over it."""
    _unknown(where, table, DEPLOYMENT_KEYS)
    changes: dict[str, Any] = {}
    if "num_replicas" in table:
        changes["num_replicas"] = _int(where, "num_replicas", table["num_replicas"], 1)
        changes["autoscaling"] = None
    if "autoscaling" in table:
        if "num_replicas" in table:
            raise ConfigError(
                f"{where}: num_replicas and autoscaling both set; a deployment has a fixed"
                " number of replicas or an autoscaling range, not both: drop one",
                param="num_replicas",
            )
        changes["autoscaling"] = _autoscaling(
            where, _table(where, "autoscaling", table["autoscaling"])
        )
    for key in ("num_cpus", "num_gpus"):
        if key in table:
            changes[key] = _number(where, key, table[key])
    if "memory_mb" in table:
        changes["memory_mb"] = _int(where, "memory_mb", table["memory_mb"], 1)
    if "resources" in table:
        resources = _table(where, "resources", table["resources"])
        changes["resources"] = {
            str(name): _number(where, "resources", amount) for name, amount in resources.items()
        }
    for key in ("max_ongoing_requests", "max_adapters"):
        if key in table:
            changes[key] = _int(where, key, table[key], 1)
    if "max_queued_requests" in table:
        changes["max_queued_requests"] = _int(
            where, "max_queued_requests", table["max_queued_requests"], 1, minus_one=True
        )
    return attrs.evolve(settings, **changes)


def serve_settings(
    name: str,
    plugin_options: Mapping[str, Any],
    card_options: Mapping[str, Any] | None = None,
    *,
    max_batch_size: int = 1,
) -> ServeSettings:
    """The deployment of model ``name``: ``[plugins.ray]`` defaults, the card's
    ``options.ray``, then ``[plugins.ray.deployments.NAME]``, each checked.

    ``max_batch_size`` (the model's batching) raises the default
    ``max_ongoing_requests`` so that a replica admits a full batch: Serve only
    batches requests a replica has been sent."""
    defaults = {k: v for k, v in plugin_options.items() if k not in CLUSTER_KEYS}
    settings = ServeSettings(max_ongoing_requests=max(16, 2 * max_batch_size))
    settings = _apply(settings, "[plugins.ray]", defaults)
    card = (card_options or {}).get("ray")
    if card is not None:
        settings = _apply(settings, f"model {name!r} options.ray", _table(name, "ray", card))
    deployments = plugin_options.get("deployments", {})
    if not isinstance(deployments, Mapping):
        raise ConfigError(
            "[plugins.ray] deployments must be a table of [plugins.ray.deployments.NAME] tables",
            param="deployments",
        )
    own = deployments.get(name)
    if own is not None:
        where = f"[plugins.ray.deployments.{name}]"
        if not isinstance(own, Mapping):
            raise ConfigError(f"{where} must be a table", param="deployments")
        settings = _apply(settings, where, own)
    if settings.max_ongoing_requests < max_batch_size:
        raise ConfigError(
            f"model {name!r}: max_ongoing_requests ({settings.max_ongoing_requests}) is below"
            f" its max_batch_size ({max_batch_size}); a replica could never fill a batch:"
            " raise max_ongoing_requests or lower max_batch_size",
            param="max_ongoing_requests",
        )
    return settings
