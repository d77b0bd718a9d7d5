"""Which llmos daemons use which Serve application, shared by every daemon on a cluster.

Several daemons (behind one load balancer, say) may serve the same model from
the same cluster: they share one Serve application rather than each deploying
its own — or worse, each redeploying the other's. :class:`Placements` is a
small detached actor, one per Ray namespace (``llmos-placements``), that
records for each application the daemons that hold it, by the name of each
daemon's event-queue actor (:mod:`llmos_ray.events`). That actor lives as
long as its daemon's Ray driver, so a daemon that died without saying so is
found out the next time anyone asks, and no longer counts.

It decides who deploys: the first daemon to :meth:`~Placements.acquire` an
application deploys it; the others wait until it is deployed and attach to
it; if the deploying daemon fails or dies first, the next one to ask deploys
it. :meth:`~Placements.release` says how many daemons still hold the
application, and the last one out deletes it. Replicas send their own events
(loaded, evicted) to every holder's queue (:meth:`~Placements.queues`). Each
daemon says again what it holds every few seconds (:meth:`~Placements.hold`),
so the records come back if this actor is restarted.
"""

from __future__ import annotations

from typing import Any, Literal

import attrs
import ray

__all__ = ["NAME", "Placements", "placements"]

#: the actor's name in each namespace
NAME = "llmos-placements"

#: what :meth:`Placements.acquire` tells a daemon to do
Step = Literal["deploy", "wait", "attach"]


@attrs.define
class _App:
    holders: set[str] = attrs.Factory(set)
    #: the holder deploying it now, if it is not deployed yet
    deployer: str | None = None
    deployed: bool = False


class Placements:
    """The actor's class: applications -> the daemons holding them. Every
    method gives the same answer run twice (Ray runs a call again when it met
    a restart of the actor)."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self._apps: dict[str, _App] = {}

    def _alive(self, holder: str) -> bool:
        try:
            ray.get_actor(holder, namespace=self.namespace)
        except ValueError:  # its driver (the daemon) is gone, and its actors with it
            return False
        return True

    def _pruned(self, app: str) -> _App:
        entry = self._apps.setdefault(app, _App())
        entry.holders = {h for h in entry.holders if self._alive(h)}
        if entry.deployer is not None and entry.deployer not in entry.holders:
            entry.deployer = None  # it died or gave up mid-deploy: the next one deploys
        return entry

    def acquire(self, app: str, holder: str) -> Step:
        """Hold ``app``, and what to do now: ``deploy`` it (no one else is),
        ``wait`` (another holder is deploying it; ask again) or ``attach``
        (it is deployed). Asking again is how a waiting daemon polls."""
        entry = self._pruned(app)
        entry.holders.add(holder)
        if entry.deployed:
            return "attach"
        if entry.deployer is None:
            entry.deployer = holder
        # asked again by the deployer (a call Ray retried): still its to deploy
        return "deploy" if entry.deployer == holder else "wait"

    def deployed(self, app: str, holder: str, ok: bool) -> None:
        """The deployer's word: ``ok`` (it runs), or it failed (the next asks deploy)."""
        entry = self._pruned(app)
        if entry.deployer == holder:
            entry.deployer = None
            entry.deployed = ok

    def forget(self, app: str) -> None:
        """The application is gone from Serve (deleted behind llmos's back):
        the next :meth:`acquire` deploys it again."""
        entry = self._pruned(app)
        entry.deployed = False
        entry.deployer = None

    def release(self, app: str, holder: str) -> int:
        """Let go of ``app``; how many daemons still hold it (0: delete it)."""
        entry = self._pruned(app)
        entry.holders.discard(holder)
        if entry.deployer == holder:
            entry.deployer = None
        left = len(entry.holders)
        if not left:
            del self._apps[app]
        return left

    def hold(self, apps: list[str], holder: str) -> None:
        """``holder`` says again which deployed applications it holds (every
        few seconds): records lost with this actor (a restart) come back."""
        for app in apps:
            entry = self._pruned(app)
            entry.holders.add(holder)
            entry.deployed, entry.deployer = True, None

    def queues(self, app: str) -> list[str]:
        """The event queues of the daemons holding ``app`` (live ones)."""
        return sorted(self._pruned(app).holders)

    def holders(self) -> dict[str, list[str]]:
        """Every application and its holders (for ``llmos``'s diagnostics and tests)."""
        return {app: self.queues(app) for app in list(self._apps)}


def placements(namespace: str) -> Any:
    """The namespace's :class:`Placements` actor, started if it is not yet:
    detached (it outlives the daemon that started it) and on the head node
    (whose loss ends the cluster anyway), so a worker node's death does not
    restart it with its records lost."""
    return (
        ray.remote(Placements)
        .options(
            name=NAME,
            namespace=namespace,
            lifetime="detached",
            get_if_exists=True,
            num_cpus=0,
            max_restarts=-1,
            # a call that meets a restart is run again: every method may run twice
            max_task_retries=-1,
            resources={"node:__internal_head__": 0.001},
        )
        .remote(namespace)
    )
