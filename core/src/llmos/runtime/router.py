"""Deployment groups: one logical model served by several deployments, with
retries, fallbacks and cooldowns.

A group is declared in config and used by its name like any model::

    [groups.chat]
    deployments = ["openai-4o", "azure-4o", "local-vllm"]   # model names
    strategy = "least-busy"          # round-robin | least-busy | latency-based
    retries = 2                      # further tries after a retryable failure
    backoff_ms = 50                  # before a retry; doubled each time
    fallbacks = ["small-chat"]       # groups or models tried when the group is spent
    cooldown_failures = 3            # failures within cooldown_window_s …
    cooldown_window_s = 60
    cooldown_s = 30                  # … take a deployment out for this long
    wait_for_cooldown = false        # all cooling down: wait (up to max_wait_s) or fail
    max_wait_s = 30

What the router does for each call (never blocking a thread: each attempt is
a future of the deployment's own worker, chained by callbacks and timers):

* pick a deployment that is not cooling down and not yet tried by this call,
  by the group's strategy; with every deployment tried and retries left, try
  again from all that are not cooling down (a group of one retries itself);
* on a retryable failure — the deployment is overloaded (429), unavailable,
  timed out, or failed unexpectedly (5xx) — count it against the deployment
  (N failures in the window cool it down, a group of one included: an outage
  then costs one failure per window, not every request's retries), back off,
  and retry; a request's own fault (4xx: bad input, unknown model, auth) is
  returned at once and counts against nobody;
* when the group is spent — retries used, or every deployment cooling down —
  wait for the first cooldown to end when asked to, else go to the fallbacks
  in order (each is a model or another group), else fail with the last error.

Every decision is a monitor event (``router.retry``, ``router.cooldown``,
``router.fallback``, ``router.wait``) and is in each result's
``meta["router"]``: the group, the deployment that answered, and every
attempt with its error and time.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import itertools
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import attrs
import structlog

from llmos.config import Field, Section, check_table
from llmos.errors import ConfigError, LlmosError, Unavailable
from llmos.types import (
    Capability,
    ChunkStream,
    LoadRequest,
    ModelCaller,
    ModelCard,
    ModelFormat,
    MonitorEvent,
    ProviderSpec,
    validate_model_name,
)

__all__ = [
    "PROVIDER",
    "STRATEGIES",
    "GroupModel",
    "GroupSettings",
    "Router",
    "group_card",
    "provider_spec",
    "retryable",
]

log = structlog.get_logger("llmos.router")

STRATEGIES = ("round-robin", "least-busy", "latency-based")

#: the [groups] config section (the kernel passes it to load_config)
SECTION = Section(
    "groups",
    {},
    entries={
        "deployments": Field(
            "list[str]", None, "The models (or groups) it spreads requests over.", required=True
        ),
        "strategy": Field(
            "str",
            None,
            "How a deployment is picked.",
            check=lambda strategy: strategy in STRATEGIES,
            expect="one of " + ", ".join(f'"{s}"' for s in STRATEGIES),
        ),
        "retries": Field("int", None, "Other deployments tried after a failure.", min=0),
        "backoff_ms": Field("float", None, "Wait before a retry.", expect="milliseconds", min=0),
        "fallbacks": Field("list[str]", None, "Models or groups asked when every one failed."),
        "cooldown_failures": Field(
            "int", None, "Failures within cooldown_window_s that cool a deployment.", min=1
        ),
        "cooldown_window_s": Field("float", None, "Window failures count in.", min=0),
        "cooldown_s": Field("float", None, "How long a deployment cools down.", min=0),
        "wait_for_cooldown": Field("bool", None, "Wait for a cooled deployment, not 503."),
        "max_wait_s": Field("float", None, "Longest wait for a cooled deployment.", min=0),
    },
    doc="Deployment groups: [groups.NAME] with deployments, strategy, retries, backoff_ms,"
    " fallbacks, cooldown_failures, cooldown_window_s, cooldown_s, wait_for_cooldown,"
    " max_wait_s.",
)

#: the weight of the newest latency in a deployment's moving average
EWMA_ALPHA = 0.3
#: the provider of deployment groups: the kernel serves a ``[groups.NAME]``
#: table like any model, through :attr:`Router.provider`
PROVIDER = "group"


def retryable(exc: BaseException) -> bool:
    """Whether another deployment (or a later try) may succeed where this failed:
    overload, unavailability, timeouts and unexpected failures — not a
    request's own fault (4xx)."""
    if isinstance(exc, LlmosError):
        return exc.status == 429 or exc.status >= 500
    return isinstance(exc, Exception)


def _fail(outer: concurrent.futures.Future[list[Any]], error: BaseException) -> None:
    """Fail the caller's future, unless it is settled already (a caller that
    timed out or went away cancels it while an attempt is under way)."""
    if not outer.done():
        with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled since
            outer.set_exception(error)


def _message(exc: BaseException) -> str:
    return getattr(exc, "message", None) or f"{type(exc).__name__}: {exc}"


@attrs.frozen(kw_only=True)
class GroupSettings:
    """A ``[groups.NAME]`` table, checked."""

    name: str
    deployments: tuple[str, ...]
    strategy: str = "round-robin"
    retries: int = 2
    backoff_ms: float = 50.0
    fallbacks: tuple[str, ...] = ()
    cooldown_failures: int = 3
    cooldown_window_s: float = 60.0
    cooldown_s: float = 30.0
    wait_for_cooldown: bool = False
    max_wait_s: float = 30.0

    @classmethod
    def from_table(cls, name: str, table: Any) -> GroupSettings:
        where = f"[groups.{name}]"
        table = check_table(where, table, {f.name for f in attrs.fields(cls)} - {"name"})
        validate_model_name(name)
        deployments = table.get("deployments")
        if (
            not isinstance(deployments, list)
            or not deployments
            or not all(isinstance(d, str) and d for d in deployments)
        ):
            raise ConfigError(f"{where}: deployments must be a list of one or more model names")
        fallbacks = table.get("fallbacks", [])
        if not isinstance(fallbacks, list) or not all(isinstance(f, str) for f in fallbacks):
            raise ConfigError(f"{where}: fallbacks must be a list of model or group names")
        if name in deployments or name in fallbacks:
            raise ConfigError(f"{where}: a group cannot be its own deployment or fallback")
        strategy = table.get("strategy", "round-robin")
        if strategy not in STRATEGIES:
            raise ConfigError(f"{where}: strategy must be one of {', '.join(STRATEGIES)}")

        def number(key: str, default: float, low: float, integer: bool = False) -> Any:
            value = table.get(key, default)
            ok = isinstance(value, int if integer else int | float) and not isinstance(value, bool)
            if not ok or value < low:
                kind = "an integer" if integer else "a number"
                raise ConfigError(f"{where}: {key} must be {kind} >= {low}, got {value!r}")
            return value

        wait = table.get("wait_for_cooldown", False)
        if not isinstance(wait, bool):
            raise ConfigError(f"{where}: wait_for_cooldown must be true or false")
        return cls(
            name=name,
            deployments=tuple(deployments),
            strategy=strategy,
            retries=number("retries", 2, 0, integer=True),
            backoff_ms=float(number("backoff_ms", 50.0, 0)),
            fallbacks=tuple(fallbacks),
            cooldown_failures=number("cooldown_failures", 3, 1, integer=True),
            cooldown_window_s=float(number("cooldown_window_s", 60.0, 0)),
            cooldown_s=float(number("cooldown_s", 30.0, 0)),
            wait_for_cooldown=wait,
            max_wait_s=float(number("max_wait_s", 30.0, 0)),
        )


@attrs.define
class _State:
    """What the router knows of one deployment of one group."""

    failures: deque[float] = attrs.field(factory=deque)
    cooled_until: float = 0.0
    in_flight: int = 0
    latency_s: float | None = None
    calls: int = 0
    errors: int = 0


class _Group:
    def __init__(self, settings: GroupSettings) -> None:
        self.settings = settings
        self.states = {d: _State() for d in settings.deployments}
        self.lock = threading.Lock()
        self._turn = itertools.count()

    def available(self, now: float) -> list[str]:
        return [d for d, s in self.states.items() if s.cooled_until <= now]

    def pick(self, tried: set[str], now: float) -> str | None:
        """The deployment for the next attempt, or ``None`` when all cool down."""
        with self.lock:
            ready = self.available(now)
            if not ready:
                return None
            fresh = [d for d in ready if d not in tried] or ready
            strategy = self.settings.strategy
            if strategy == "least-busy":
                return min(fresh, key=lambda d: (self.states[d].in_flight, self.states[d].calls))
            if strategy == "latency-based":
                # untried first (their latency is unknown), then the fastest
                return min(
                    fresh,
                    key=lambda d: (
                        self.states[d].latency_s is not None,
                        self.states[d].latency_s or 0.0,
                    ),
                )
            return fresh[next(self._turn) % len(fresh)]

    def next_ready(self, now: float) -> float:
        with self.lock:
            return min(s.cooled_until for s in self.states.values()) - now


@attrs.define
class _Attempts:
    """One call's way through a group (and its fallbacks)."""

    capability: Capability
    requests: Sequence[Any]
    outer: concurrent.futures.Future[list[Any]]
    started: float
    tried: set[str] = attrs.field(factory=set)
    log: list[dict[str, Any]] = attrs.field(factory=list)
    retries_left: int = 0
    waited_s: float = 0.0
    visited: tuple[str, ...] = ()
    #: fallbacks still to try, in order (a fallback group's own go first)
    pending: list[str] = attrs.field(factory=list)
    #: groups whose fallbacks are already in ``pending``
    expanded: set[str] = attrs.field(factory=set)
    last_error: BaseException | None = None
    #: the attempt under way: cancelled when the caller cancels ``outer``, so
    #: the deployment's worker stops work that nobody waits for any more
    current: concurrent.futures.Future[list[Any]] | None = None

    def track(self, future: concurrent.futures.Future[list[Any]]) -> None:
        """Make ``future`` the attempt under way (cancelled at once if the
        caller has gone already)."""
        self.current = future
        if self.outer.cancelled():
            future.cancel()

    def caller_done(self, outer: concurrent.futures.Future[list[Any]]) -> None:
        if outer.cancelled() and (current := self.current) is not None:
            current.cancel()


#: how the router sends requests on to a deployment (the kernel's ``submit``:
#: a model's worker, or another group)
Submit = Callable[[str, Capability, Sequence[Any]], concurrent.futures.Future[list[Any]]]


class Router:
    """The kernel's deployment groups (see the module docstring).

    ``groups`` is the checked ``[groups]`` config section; ``submit`` sends
    requests to a deployment (which may itself be a group); ``emit`` sends
    the router's monitor events.
    """

    def __init__(
        self,
        groups: Mapping[str, Any],
        submit: Submit,
        emit: Callable[[MonitorEvent], None],
    ) -> None:
        self._tables = groups
        self._send = submit
        self._events = emit
        self._groups: dict[str, _Group] = {}
        self._lock = threading.Lock()

    # -- groups ----------------------------------------------------------------

    def load(self, request: LoadRequest) -> GroupModel:
        """The provider's ``load``: the group as a model that routes each call."""
        if request.models is None:
            raise ConfigError(f"group {request.card.name!r}: the kernel gave no way to call models")
        self.group(request.card.name)  # a bad table fails here, with its reason
        return GroupModel(self, request.card, request.models)

    def has(self, name: str) -> bool:
        return isinstance(name, str) and name in self._tables

    def group(self, name: str) -> _Group:
        with self._lock:
            group = self._groups.get(name)
            if group is None:
                table = self._tables.get(name)
                group = _Group(GroupSettings.from_table(name, table))
                self._groups[name] = group
            return group

    def status(self) -> dict[str, Any]:
        """Each group's deployments: calls, errors, in flight, latency, cooldown."""
        now = time.monotonic()
        out: dict[str, Any] = {}
        for name in self._tables:
            try:
                group = self.group(name)
            except LlmosError as exc:
                out[name] = {"error": exc.message}
                continue
            with group.lock:
                out[name] = {
                    "strategy": group.settings.strategy,
                    "deployments": {
                        d: {
                            "calls": s.calls,
                            "errors": s.errors,
                            "in_flight": s.in_flight,
                            "latency_s": s.latency_s,
                            "cooling_down_s": max(0.0, s.cooled_until - now),
                        }
                        for d, s in group.states.items()
                    },
                }
        return out

    # -- calls -----------------------------------------------------------------

    def submit(
        self, name: str, capability: Capability, requests: Sequence[Any]
    ) -> concurrent.futures.Future[list[Any]]:
        """Run ``requests`` on group ``name``; the future gets the results."""
        group = self.group(name)
        state = _Attempts(
            capability=Capability(capability),
            requests=list(requests),
            outer=concurrent.futures.Future(),
            started=time.monotonic(),
            retries_left=group.settings.retries,
            visited=(name,),
        )
        state.outer.add_done_callback(state.caller_done)
        self._attempt(group, state)
        return state.outer

    def _emit(self, kind: str, group: str, **fields: Any) -> None:
        self._events(MonitorEvent(kind=kind, model=group, fields=fields))

    def _attempt(self, group: _Group, state: _Attempts) -> None:
        if state.outer.done():  # the caller gave up (timeout, disconnect)
            return
        now = time.monotonic()
        deployment = group.pick(state.tried, now)
        if deployment is None:
            self._spent(group, state, "every deployment is cooling down")
            return
        state.tried.add(deployment)
        entry: dict[str, Any] = {"deployment": deployment}
        state.log.append(entry)
        sent = time.monotonic()
        with group.lock:
            group.states[deployment].in_flight += 1
        try:
            future = self._send(deployment, state.capability, state.requests)
        except Exception as exc:  # refused at once (queue full, cannot load)
            self._done(group, state, deployment, entry, sent, None, exc)
            return
        state.track(future)
        future.add_done_callback(
            lambda f: self._done(group, state, deployment, entry, sent, f, None)
        )

    def _done(
        self,
        group: _Group,
        state: _Attempts,
        deployment: str,
        entry: dict[str, Any],
        sent: float,
        future: concurrent.futures.Future[list[Any]] | None,
        error: BaseException | None,
    ) -> None:
        latency = time.monotonic() - sent
        entry["latency_s"] = round(latency, 6)
        if future is not None and future.cancelled():
            # The caller went away and cancelled this attempt with it: not a
            # failure of the deployment, and nobody to retry for.
            with group.lock:
                group.states[deployment].in_flight -= 1
            return
        if error is None and future is not None:
            error = future.exception()
        settings = group.settings
        with group.lock:
            s = group.states[deployment]
            s.in_flight -= 1
            s.calls += 1
            if error is None:
                s.latency_s = (
                    latency
                    if s.latency_s is None
                    else EWMA_ALPHA * latency + (1 - EWMA_ALPHA) * s.latency_s
                )
        if error is None:
            assert future is not None
            self._succeed(group.settings.name, state, deployment, future.result())
            return
        entry["error"] = _message(error)
        state.last_error = error
        if not retryable(error):
            entry["retryable"] = False
            _fail(state.outer, error)
            return
        cooled = self._count_failure(group, deployment)
        if cooled:
            self._emit(
                "router.cooldown",
                settings.name,
                deployment=deployment,
                seconds=settings.cooldown_s,
                error=entry["error"],
            )
        if state.retries_left <= 0:
            self._spent(group, state, "its retries are used")
            return
        state.retries_left -= 1
        backoff = settings.backoff_ms / 1000 * 2 ** (settings.retries - state.retries_left - 1)
        self._emit(
            "router.retry",
            settings.name,
            deployment=deployment,
            error=entry["error"],
            backoff_s=backoff,
            retries_left=state.retries_left,
        )
        self._later(backoff, lambda: self._attempt(group, state))

    def _count_failure(self, group: _Group, deployment: str) -> bool:
        """Count a failure; whether it put the deployment in cooldown."""
        settings = group.settings
        now = time.monotonic()
        with group.lock:
            s = group.states[deployment]
            s.errors += 1
            s.failures.append(now)
            while s.failures and s.failures[0] < now - settings.cooldown_window_s:
                s.failures.popleft()
            if len(s.failures) >= settings.cooldown_failures and s.cooled_until <= now:
                s.cooled_until = now + settings.cooldown_s
                s.failures.clear()
                log.warning(
                    "router.cooldown",
                    group=settings.name,
                    deployment=deployment,
                    seconds=settings.cooldown_s,
                )
                return True
        return False

    def _spent(self, group: _Group, state: _Attempts, why: str) -> None:
        """The group cannot answer now: wait for a cooldown, fall back, or fail."""
        settings = group.settings
        now = time.monotonic()
        wait = group.next_ready(now)
        if (
            settings.wait_for_cooldown
            and wait > 0
            and state.waited_s + wait <= settings.max_wait_s
            and not group.available(now)
        ):
            state.waited_s += wait
            state.tried.clear()
            state.retries_left = max(state.retries_left, 0)
            self._emit("router.wait", settings.name, seconds=round(wait, 3), why=why)
            self._later(wait, lambda: self._attempt(group, state))
            return
        if settings.name not in state.expanded:
            state.expanded.add(settings.name)
            state.pending[:0] = settings.fallbacks
        while state.pending:
            fallback = state.pending.pop(0)
            if fallback in state.visited:
                continue
            state.visited += (fallback,)
            self._emit("router.fallback", settings.name, to=fallback, why=why)
            state.log.append({"fallback": fallback, "why": why})
            self._fall_back(fallback, state)
            return
        last = state.last_error
        detail = f"; last error: {_message(last)}" if last is not None else ""
        tried = " (and its fallbacks)" if len(state.visited) > 1 else ""
        _fail(
            state.outer,
            Unavailable(
                f"group {state.visited[0]!r}{tried} could not answer: {why}{detail}"
                + (
                    f" (cooling down for {wait:.1f} s more)"
                    if wait > 0 and not group.available(now)
                    else ""
                )
            ),
        )

    def _fall_back(self, target: str, state: _Attempts) -> None:
        if self.has(target):
            group = self.group(target)
            state.tried = set()
            state.retries_left = group.settings.retries
            self._attempt(group, state)
            return
        entry: dict[str, Any] = {"deployment": target}
        state.log.append(entry)
        sent = time.monotonic()
        try:
            future = self._send(target, state.capability, state.requests)
        except Exception as exc:
            self._fallback_done(target, state, entry, sent, None, exc)
            return
        state.track(future)
        future.add_done_callback(lambda f: self._fallback_done(target, state, entry, sent, f, None))

    def _fallback_done(
        self,
        target: str,
        state: _Attempts,
        entry: dict[str, Any],
        sent: float,
        future: concurrent.futures.Future[list[Any]] | None,
        error: BaseException | None,
    ) -> None:
        entry["latency_s"] = round(time.monotonic() - sent, 6)
        if future is not None and future.cancelled():
            return  # the caller went away and cancelled this attempt with it
        if error is None and future is not None:
            error = future.exception()
        if error is None:
            assert future is not None
            self._succeed(state.visited[0], state, target, future.result())
            return
        entry["error"] = _message(error)
        state.last_error = error
        if not retryable(error) or not state.pending:
            _fail(state.outer, error)
            return
        fallback = state.pending.pop(0)
        state.visited += (fallback,)
        self._emit("router.fallback", target, to=fallback, why=entry["error"])
        state.log.append({"fallback": fallback, "why": entry["error"]})
        self._fall_back(fallback, state)

    def _succeed(self, group: str, state: _Attempts, deployment: str, results: list[Any]) -> None:
        meta = {
            "group": group,
            "deployment": deployment,
            "attempts": list(state.log),
            "seconds": round(time.monotonic() - state.started, 6),
        }
        out = []
        for result in results:
            try:
                out.append(attrs.evolve(result, meta={**result.meta, "router": meta}))
            except (TypeError, AttributeError, attrs.exceptions.NotAnAttrsClassError):
                out.append(result)
        if len(state.log) > 1:
            log.info("router.recovered", group=group, deployment=deployment, attempts=state.log)
        if not state.outer.done():
            with contextlib.suppress(concurrent.futures.InvalidStateError):  # cancelled since
                state.outer.set_result(out)

    def _later(self, seconds: float, action: Any) -> None:
        if seconds <= 0:
            action()
            return
        timer = threading.Timer(seconds, action)
        timer.daemon = True
        timer.start()

    # -- streaming -------------------------------------------------------------

    def stream_target(self, name: str) -> str:
        """The deployment a streamed request goes to: streams are not retried
        once begun, so one is picked by the strategy among those not cooling
        down, else the first fallback."""
        group = self.group(name)
        deployment = group.pick(set(), time.monotonic())
        if deployment is not None:
            return deployment
        for fallback in group.settings.fallbacks:
            return self.stream_target(fallback) if self.has(fallback) else fallback
        raise Unavailable(f"group {name!r} could not answer: every deployment is cooling down")


def group_card(name: str, table: Any) -> ModelCard:
    """The card group ``name`` is served under: made from its ``[groups.NAME]``
    table each time it is resolved, never registered."""
    deployments = table.get("deployments") if isinstance(table, Mapping) else None
    listed = ", ".join(map(str, deployments)) if isinstance(deployments, list) else "?"
    return ModelCard(
        name=name,
        provider=PROVIDER,
        format=ModelFormat.GROUP,
        description=f"deployment group of {listed}",
    )


def provider_spec(router: Callable[[], Router]) -> ProviderSpec:
    """The kernel's ``group`` provider: a :func:`group_card` loads as a
    :class:`GroupModel` of ``router()`` (the kernel's router, made on first use)."""
    return ProviderSpec(
        name=PROVIDER,
        load=lambda request: router().load(request),
        description="deployment groups of config ([groups.NAME]): retries, fallbacks,"
        " cooldowns (built in)",
        formats=(ModelFormat.GROUP,),
        batching=False,
    )


class GroupModel:
    """A deployment group served like a model: each call goes at once to
    :meth:`Router.submit` (which picks, retries and falls back), each stream
    to the deployment :meth:`Router.stream_target` picks. It claims every
    capability: the deployment that answers checks its own."""

    max_batch_size = None

    def __init__(self, router: Router, card: ModelCard, models: ModelCaller) -> None:
        self.card = card
        self.capabilities = frozenset(Capability)
        self._router = router
        self._models = models

    def submit(
        self, capability: Capability, requests: Sequence[Any]
    ) -> concurrent.futures.Future[list[Any]]:
        return self._router.submit(self.card.name, capability, requests)

    def submit_stream(self, request: Any) -> ChunkStream:
        return self._models.stream(self._router.stream_target(self.card.name), request)

    def close(self) -> None:
        """Nothing to release: the deployments are models of their own."""
