"""Alert rules: a metric crossing a threshold, for long enough, fires.

A rule is a ``[alerts.NAME]`` table::

    [alerts.slow-chat]
    metric = "latency_p95_ms"     # a name in llmos.monitor.metrics.METRICS
    model = "smollm2*"            # a model name or a glob over models seen
    window = "5m"                 # the figure is taken over this window
    op = ">"                      # >, >=, <, <=
    threshold = 2000
    for = "1m"                    # it must hold this long before firing
    min_requests = 20             # fewer requests in the window: no verdict
    severity = "warning"

Every ``evaluate_every_s`` the :class:`AlertManager` computes each rule's
figure per matching model. A rule that holds turns *pending*; pending for
``for`` it turns *firing* and an ``alert.firing`` event goes to every sink
(and the webhook); when it stops holding, ``alert.resolved`` follows.

Accuracy drift is a rule on ``metric = "accuracy"``: every ``every`` the
model is scored on labelled data — ``data`` (a file under an allowed root),
or by default the test (else dev) file its tuning job recorded — and the
rule compares that score with ``threshold``, which defaults to the score the
registry holds for the model (``score``, default ``test/accuracy`` or
``dev/accuracy``) minus ``tolerance``.
"""

from __future__ import annotations

import fnmatch
import json
import operator
import os
import queue
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import attrs
import structlog

from llmos.config import Field, Section, check_table
from llmos.errors import ConfigError, LlmosError
from llmos.monitor.metrics import METRICS, PROCESS_METRICS, MetricWindows, parse_duration
from llmos.tuning.data import load_file
from llmos.tuning.evaluation import evaluate
from llmos.types import Capability, ClassifyRequest, ModelCaller, ModelCard, MonitorEvent

log = structlog.get_logger("llmos.monitor")

__all__ = ["AlertManager", "AlertRule", "Webhook"]

#: the [monitor] config section (the kernel passes it to load_config)
MONITOR_SECTION = Section(
    "monitor",
    {
        "bucket_s": Field(
            "float",
            10.0,
            "Width of one metric bucket: the finest step of charts and windows.",
            expect="a number of seconds",
            min=0.05,
            max=3600,
        ),
        "keep_s": Field(
            "float",
            3600.0,
            "How long metric windows are kept in memory (the sqlite sink keeps history).",
            expect="a number of seconds",
            min=60,
        ),
        "sample_every_s": Field(
            "float",
            5.0,
            "How often the daemon samples its own memory and CPU.",
            expect="a number of seconds",
            above=0,
        ),
        "evaluate_every_s": Field(
            "float",
            5.0,
            "How often alert rules are evaluated.",
            expect="a number of seconds",
            above=0,
        ),
        "webhook_url": Field(
            "str",
            "",
            "Where firing and resolved alerts are POSTed as JSON (http or https).",
        ),
        "webhook_token_env": Field(
            "str",
            "",
            "Environment variable holding a token sent as 'Authorization: Bearer …'.",
        ),
        "webhook_timeout_s": Field(
            "float",
            5.0,
            "Timeout of one webhook POST.",
            expect="a number of seconds",
            above=0,
        ),
        "latency_target_ms": Field(
            "float",
            0.0,
            "The p95 latency the advisor holds models to (0: no target).",
            expect="a number of milliseconds",
            min=0,
        ),
    },
    doc="Metric windows, alert evaluation and the alert webhook.",
)
#: the [alerts] config section (the kernel passes it to load_config)
ALERTS_SECTION = Section(
    "alerts",
    {},
    free_form=True,
    doc="Alert rules: [alerts.NAME] with metric, model, window, op, threshold, for.",
)

_OPS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}
_SEVERITIES = ("info", "warning", "critical")
_RULE_KEYS = {
    "metric",
    "model",
    "window",
    "op",
    "threshold",
    "for",
    "min_requests",
    "severity",
    "description",
    "webhook",
    # accuracy checks
    "every",
    "data",
    "score",
    "tolerance",
    "max_rows",
    "labels",
}


@attrs.frozen(kw_only=True)
class AlertRule:
    """One ``[alerts.NAME]`` table, checked."""

    name: str
    metric: str
    model: str = "*"
    window_s: float = 300.0
    op: str = ">"
    threshold: float | None = None
    for_s: float = 0.0
    min_requests: int = 1
    severity: str = "warning"
    description: str = ""
    #: post to the webhook (``True``), not (``False``), or to this URL
    webhook: bool | str = True
    # accuracy checks
    every_s: float = 3600.0
    data: str | None = None
    score: str | None = None
    tolerance: float = 0.02
    max_rows: int = 1000
    labels: tuple[str, ...] = ()

    @classmethod
    def from_table(cls, name: str, table: Any) -> AlertRule:
        where = f"[alerts.{name}]"
        table = check_table(where, table, _RULE_KEYS)
        metric = table.get("metric")
        if metric not in METRICS:
            raise ConfigError(
                f"{where}: metric must be one of {', '.join(sorted(METRICS))}; got {metric!r}"
            )
        op = table.get("op", "<" if metric == "accuracy" else ">")
        if op not in _OPS:
            raise ConfigError(f"{where}: op must be one of {' '.join(_OPS)}; got {op!r}")
        threshold = table.get("threshold")
        if threshold is not None and (
            isinstance(threshold, bool) or not isinstance(threshold, int | float)
        ):
            raise ConfigError(f"{where}: threshold must be a number; got {threshold!r}")
        if threshold is None and metric != "accuracy":
            raise ConfigError(f"{where}: threshold is required for metric {metric!r}")
        severity = table.get("severity", "warning")
        if severity not in _SEVERITIES:
            raise ConfigError(f"{where}: severity must be one of {', '.join(_SEVERITIES)}")
        model = table.get("model", "*")
        if not isinstance(model, str) or not model:
            raise ConfigError(f"{where}: model must be a model name or a glob like 'chat-*'")
        if metric == "accuracy" and any(c in model for c in "*?["):
            raise ConfigError(f"{where}: an accuracy check names one model, not a glob")
        webhook = table.get("webhook", True)
        if isinstance(webhook, str):
            check_webhook_url(webhook, f"{where} webhook")
        elif not isinstance(webhook, bool):
            raise ConfigError(f"{where}: webhook must be true, false or a URL")
        labels = table.get("labels", [])
        if not isinstance(labels, list) or not all(isinstance(x, str) for x in labels):
            raise ConfigError(f"{where}: labels must be a list of strings")
        try:
            rule = cls(
                name=name,
                metric=metric,
                model=model,
                window_s=parse_duration(table.get("window", 300), f"{where} window"),
                op=op,
                threshold=None if threshold is None else float(threshold),
                for_s=parse_duration(table.get("for", 0), f"{where} for"),
                min_requests=_positive_int(table.get("min_requests", 1), f"{where} min_requests"),
                severity=severity,
                description=str(table.get("description", "")),
                webhook=webhook,
                every_s=parse_duration(table.get("every", 3600), f"{where} every"),
                data=None if table.get("data") is None else str(table["data"]),
                score=None if table.get("score") is None else str(table["score"]),
                tolerance=float(table.get("tolerance", 0.02)),
                max_rows=_positive_int(table.get("max_rows", 1000), f"{where} max_rows"),
                labels=tuple(labels),
            )
        except ValueError as exc:
            raise ConfigError(str(exc)) from None
        if rule.metric == "accuracy" and rule.every_s < 1:
            raise ConfigError(f"{where}: every must be at least 1s")
        return rule

    def matches(self, model: str) -> bool:
        """``model`` is a deployment (``name@version``); a rule names models
        with or without the version."""
        name = model.partition("@")[0]
        return fnmatch.fnmatchcase(model, self.model) or fnmatch.fnmatchcase(name, self.model)


def _positive_int(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what}: expected a whole number >= 1, got {value!r}")
    return value


def check_webhook_url(url: str, what: str) -> str:
    """An ``http(s)://host/...`` URL without credentials in it, or a ConfigError."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ConfigError(f"{what}: {url!r} is not an http(s) URL")
    if parts.username or parts.password:
        raise ConfigError(
            f"{what}: put no credentials in the URL; set [monitor] webhook_token_env instead"
        )
    return url


# --------------------------------------------------------------------------
# The webhook
# --------------------------------------------------------------------------


class Webhook:
    """POSTs alert bodies as JSON off the caller's thread: a bounded queue
    (a full one drops and counts), a few retries with backoff on network
    errors and 5xx, and a log line when a body is given up on."""

    def __init__(
        self,
        url: str,
        *,
        token: str | None = None,
        timeout_s: float = 5.0,
        retries: int = 3,
        backoff_s: float = 0.5,
        capacity: int = 1000,
    ) -> None:
        self.url = check_webhook_url(url, "[monitor] webhook_url")
        self.token = token
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_s = backoff_s
        self._queue: queue.Queue[tuple[str, dict[str, Any]] | None] = queue.Queue(capacity)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._thread = threading.Thread(target=self._run, name="llmos-webhook", daemon=True)
        self._thread.start()

    def post(self, body: Mapping[str, Any], url: str | None = None) -> None:
        try:
            self._queue.put_nowait((url or self.url, dict(body)))
        except queue.Full:
            self.dropped += 1

    def close(self, timeout: float = 5.0) -> None:
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:
            return
        self._thread.join(timeout)

    def _run(self) -> None:
        while (item := self._queue.get()) is not None:
            url, body = item
            self._deliver(url, body)

    def _deliver(self, url: str, body: dict[str, Any]) -> None:
        data = json.dumps(body).encode()
        headers = {"Content-Type": "application/json", "User-Agent": "llmos-alerts"}
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        error = ""
        for attempt in range(self.retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method="POST")
            try:
                with _OPENER.open(request, timeout=self.timeout_s) as response:
                    response.read(1024)
                self.sent += 1
                return
            except urllib.error.HTTPError as exc:
                error = f"HTTP {exc.code}"
                if exc.code < 500 and exc.code != 429:
                    break  # the receiver refuses it: retrying will not help
            except (OSError, ValueError) as exc:
                error = repr(exc)
            if attempt < self.retries:
                time.sleep(self.backoff_s * 2**attempt)
        self.failed += 1
        log.warning("monitor.webhook_failed", url=url, alert=body.get("alert"), error=error)


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # a webhook that redirects fails; alerts go where configured


# No environment proxies, no redirects: the body goes to the configured URL.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect)


# --------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------


@attrs.define(eq=False)
class AlertState:
    rule: AlertRule
    model: str | None
    status: str = "inactive"  # inactive, pending, firing
    since: float | None = None
    fired_at: float | None = None
    value: float | None = None
    threshold: float | None = None
    requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {
            "alert": self.rule.name,
            "model": self.model,
            "status": self.status,
            "metric": self.rule.metric,
            "op": self.rule.op,
            "value": self.value,
            "threshold": self.threshold,
            "window_s": self.rule.window_s,
            "for_s": self.rule.for_s,
            "severity": self.rule.severity,
            "description": self.rule.description,
            "since": self.since,
            "fired_at": self.fired_at,
            "requests": self.requests,
        }


class AlertManager:
    """Evaluates the rules on a clock, keeps their states, emits events."""

    def __init__(
        self,
        rules: Sequence[AlertRule],
        windows: MetricWindows,
        emit: Callable[[MonitorEvent], None],
        *,
        webhook: Webhook | None = None,
        models: Callable[[], Sequence[str]] | None = None,
        clock: Callable[[], float] = time.time,
        default_webhook: bool = True,
    ) -> None:
        self.rules = list(rules)
        self.windows = windows
        self.emit = emit
        self.webhook = webhook
        self.models = models or windows.models
        self.clock = clock
        self._states: dict[tuple[str, str | None], AlertState] = {}
        self._lock = threading.Lock()
        self.history: list[dict[str, Any]] = []
        #: the webhook's own URL is the [monitor] one (not just a rule's)
        self.default_webhook = default_webhook

    @classmethod
    def from_config(
        cls,
        monitor: Mapping[str, Any],
        windows: MetricWindows,
        rules: Sequence[AlertRule],
        emit: Callable[[MonitorEvent], None],
    ) -> AlertManager:
        """The manager for ``rules`` with the ``[monitor]`` webhook (``monitor``
        is that section); a rule with its own webhook URL posts there instead."""
        timeout_s = float(monitor.get("webhook_timeout_s", 5.0))
        url = str(monitor.get("webhook_url") or "")
        token = None
        token_env = str(monitor.get("webhook_token_env") or "")
        if token_env:
            token = os.environ.get(token_env)
            if not token:
                raise ConfigError(
                    f"[monitor] webhook_token_env names {token_env!r}, which is not set"
                )
        own = next((r.webhook for r in rules if isinstance(r.webhook, str)), None)
        webhook = None
        if url or own:
            webhook = Webhook(str(url or own), token=token, timeout_s=timeout_s)
        return cls(rules, windows, emit, webhook=webhook, default_webhook=bool(url))

    def evaluate(self, now: float | None = None) -> list[dict[str, Any]]:
        """One pass over every rule; returns the events it emitted (as dicts)."""
        now = self.clock() if now is None else now
        emitted = []
        for rule in self.rules:
            if rule.metric in PROCESS_METRICS:
                targets: list[str | None] = [None]
            else:
                targets = [m for m in self.models() if rule.matches(m)]
            for model in targets:
                change = self._evaluate_one(rule, model, now)
                if change is not None:
                    emitted.append(change)
        return emitted

    def _evaluate_one(
        self, rule: AlertRule, model: str | None, now: float
    ) -> dict[str, Any] | None:
        value, requests = self.windows.value(rule.metric, model, rule.window_s, now=now)
        threshold = rule.threshold
        if rule.metric == "accuracy" and threshold is None:
            evaluation = self.windows.evaluations().get(model or "", {})
            registered = evaluation.get("registered")
            threshold = None if registered is None else float(registered) - rule.tolerance
        with self._lock:
            state = self._states.get((rule.name, model))
            if state is None:
                state = self._states[(rule.name, model)] = AlertState(rule, model)
            state.value, state.threshold, state.requests = value, threshold, requests
            enough = rule.metric == "accuracy" or requests >= rule.min_requests
            holds = (
                value is not None
                and threshold is not None
                and enough
                and _OPS[rule.op](value, threshold)
            )
            if holds:
                if state.status == "inactive":
                    state.status, state.since = "pending", now
                if state.status == "pending" and now - (state.since or now) >= rule.for_s:
                    state.status, state.fired_at = "firing", now
                    return self._announce(state, "firing", now)
                return None
            if state.status == "firing":
                change = self._announce(state, "resolved", now)
                state.status, state.since, state.fired_at = "inactive", None, None
                return change
            state.status, state.since = "inactive", None
            return None

    def _announce(self, state: AlertState, status: str, now: float) -> dict[str, Any]:
        body = {**state.to_dict(), "status": status, "time": now}
        if status == "resolved":
            body["resolved_at"] = now
        self.emit(
            MonitorEvent(
                kind=f"alert.{status}",
                model=state.model,
                fields={k: v for k, v in body.items() if k not in ("model", "status")},
            )
        )
        write = log.warning if status == "firing" else log.info
        write(f"alert.{status}", alert=state.rule.name, model=state.model, value=state.value)
        rule = state.rule
        if self.webhook is not None:
            if isinstance(rule.webhook, str):
                self.webhook.post(body, rule.webhook)
            elif rule.webhook and self.default_webhook:
                self.webhook.post(body)
        self.history.append(body)
        del self.history[:-200]
        return body

    def states(self) -> list[dict[str, Any]]:
        """Every rule's state per model (pending and firing first)."""
        order = {"firing": 0, "pending": 1, "inactive": 2}
        with self._lock:
            rows = [state.to_dict() for state in self._states.values()]
        rows.sort(key=lambda r: (order[r["status"]], r["alert"], r["model"] or ""))
        return rows

    def firing(self) -> list[dict[str, Any]]:
        return [s for s in self.states() if s["status"] == "firing"]

    def close(self) -> None:
        if self.webhook is not None:
            self.webhook.close()


# --------------------------------------------------------------------------
# Accuracy checks
# --------------------------------------------------------------------------


def run_accuracy_check(
    cards: Callable[[str], ModelCard], models: ModelCaller, rule: AlertRule
) -> MonitorEvent:
    """Score ``rule.model`` (its card from ``cards``) on its labelled data
    through ``models`` (the kernel: the model's own worker) and
    return the ``eval.result`` event (also when the check itself fails: the
    event then carries ``error`` and no score)."""
    started = time.perf_counter()
    fields: dict[str, Any] = {"alert": rule.name}
    try:
        card = cards(rule.model)
        provenance = dict(card.options.get("tuning") or {})
        sources = dict(dict(provenance.get("data") or {}).get("sources") or {})
        data = rule.data or sources.get("test") or sources.get("dev")
        if not data or data == "inline":
            raise ConfigError(
                f"[alerts.{rule.name}]: {card.ref} has no recorded test or dev file; "
                'name one with data = "PATH"'
            )
        # The path comes from the operator's config or the tuning job's own
        # record, not from a request: it is read like `llmos eval` reads.
        path = Path(data).expanduser()
        if not path.is_file():
            raise ConfigError(f"[alerts.{rule.name}]: the data file {str(path)!r} does not exist")
        rows = load_file(path, max_rows=rule.max_rows)
        key = rule.score or next(
            (k for k in ("test/accuracy", "dev/accuracy", "accuracy") if k in card.scores), None
        )
        registered = card.scores.get(key) if key else None
        labels = rule.labels or tuple(provenance.get("labels") or ())

        def predict(texts: Sequence[str]) -> list[str]:
            requests = [ClassifyRequest(text=t) for t in texts]
            return [r.label for r in models.call(card.ref, Capability.CLASSIFY, requests)]

        report = evaluate(predict, rows, mapping=_label_map(labels, rows))
        fields.update(
            score=report["accuracy"],
            registered=registered,
            score_key=key,
            rows=len(rows),
            data=str(path),
            model_ref=card.ref,
        )
    except (LlmosError, OSError, ValueError) as exc:
        fields["error"] = getattr(exc, "message", None) or str(exc)
        log.error("monitor.accuracy_check_failed", alert=rule.name, error=fields["error"])
    fields["seconds"] = round(time.perf_counter() - started, 3)
    return MonitorEvent(
        kind="eval.result", model=fields.get("model_ref", rule.model), fields=fields
    )


def _label_map(labels: Sequence[str], rows: Sequence[Mapping[str, str]]) -> dict[str, str]:
    """Data labels that are indexes into the model's labels (``0``/``1`` for
    ``negative``/``positive``, as tuning stores them) are mapped to names."""
    found = {row["label"] for row in rows}
    if labels and found and all(x.isdigit() and int(x) < len(labels) for x in found):
        return {x: labels[int(x)] for x in found if labels[int(x)] != x}
    return {}
