"""The daemon's ASGI app: probes, plugin routes, errors in one shape.

:func:`create_app` builds a FastAPI app around a :class:`~llmos.runtime.kernel.Kernel`
that has not started yet. The app's lifespan starts the kernel in a worker
thread and does not wait for it, so the daemon listens and answers
``/healthz`` while plugins run ``llmos_startup``; ``/readyz`` turns 200 when
the kernel is ready, and every other route answers 503 until then.

The OpenAPI schema is FastAPI's, corrected here once for every route (the
kernel's and the plugins') by :func:`document_errors` so that it says what the
daemon really answers: errors in one ``Error`` shape, 400 (not FastAPI's 422)
for invalid input, the middleware's 401/403/408/413/503, server-sent events where
a route streams, model-name patterns, and the bearer key. A 405 names in
``Allow`` every method the path takes, whichever routes (or plugins) they
come from (:func:`allowed_methods`).
"""

from __future__ import annotations

import asyncio
import copy
import http
import json
import math
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import structlog
from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import compile_path

from llmos import __version__
from llmos.errors import LlmosError, PluginError
from llmos.plugin.manager import flatten_routes, route_keys
from llmos.runtime.kernel import Kernel, KernelState
from llmos.server.dashboard import PUBLIC_PATHS, dashboard_router
from llmos.server.fusions_api import fusions_router
from llmos.server.groups_api import groups_router
from llmos.server.middleware import (
    PROBE_PATHS,
    RETRY_AFTER_SECONDS,
    SAFE_METHODS,
    AccessMiddleware,
    BodyLimitMiddleware,
    HostCheckMiddleware,
    RequestContextMiddleware,
    error_body,
    error_headers,
)
from llmos.server.models_api import models_router, push_body_limit
from llmos.server.monitor_api import monitor_router
from llmos.server.openai_api import openai_router
from llmos.server.tuning_api import tuning_router
from llmos.types import NAME_MAX_LENGTH, NAME_PATTERN, RouteSpec

log = structlog.get_logger("llmos.server")

__all__ = ["DaemonState", "allowed_methods", "create_app", "document_errors", "kernel_routes"]


# --------------------------------------------------------------------------
# What the daemon knows about itself
# --------------------------------------------------------------------------


@attrs.define(eq=False)
class DaemonState:
    """The daemon's run-time state, shared by the lifespan, the middleware
    and the server (``app.state.daemon``).

    ``inflight`` and ``draining`` are only written from the event loop's
    thread (the middleware, the signal handler), so they need no lock;
    ``start_error`` is written once by the start thread before it ends.
    """

    kernel: Kernel
    #: requests (and websockets) the app is handling now
    inflight: int = 0
    #: a stop was asked for: no new work, wait for what is in flight
    draining: bool = False
    #: a second signal: stop waiting for anything
    forced: bool = False
    #: what ``kernel.start()`` raised, if it did
    start_error: BaseException | None = None
    start_thread: threading.Thread | None = None
    #: the address the server listens on, set by
    #: :class:`~llmos.server.run.DaemonServer` (``server.host`` may be overridden)
    bound_host: str | None = None

    @property
    def status(self) -> str:
        """``ready``, ``starting``, ``draining``, ``failed``, ``stopped`` (or ``created``)."""
        if self.start_error is not None:
            return "failed"
        if self.draining or self.kernel.state is KernelState.DRAINING:
            return "draining"
        return str(self.kernel.state)

    def unavailable_reason(self) -> str | None:
        """Why new work is refused now (a message for the 503), or ``None``."""
        status = self.status
        if status == "ready":
            return None
        if status == "draining":
            return "llmos is shutting down and takes no new requests; retry after it restarts"
        if status == "failed":
            return "llmos failed to start; see the daemon's log"
        if status == "stopped":
            return "llmos has stopped"
        return "llmos is starting; retry in a few seconds"

    def start_kernel(self) -> None:
        """Start the kernel in a daemon thread; return at once."""

        def run() -> None:
            try:
                self.kernel.start()
            except Exception as exc:
                self.start_error = exc
                if isinstance(exc, LlmosError):
                    # A deliberate error already says what to do: one line.
                    log.error("kernel.start_failed", error=str(exc), error_type=exc.type)
                else:
                    log.error("kernel.start_failed", error=repr(exc), exc_info=exc)

        # A daemon thread: a plugin stuck in llmos_startup must not keep the
        # process alive once the server has given up on it.
        self.start_thread = threading.Thread(target=run, name="llmos-kernel-start", daemon=True)
        self.start_thread.start()

    async def stop_kernel(self, start_timeout: float) -> None:
        """Wait (up to ``start_timeout``) for a start still running, then run
        ``kernel.stop()`` off the event loop; a forced exit stops waiting."""
        thread = self.start_thread
        if thread is not None and not await self._wait(thread.is_alive, start_timeout):
            # Shutting down plugins whose start-up has not returned would run
            # llmos_shutdown against half-made state; leave them to the exit.
            log.warning("kernel.start_unfinished", waited_s=start_timeout)
            return
        stopper = threading.Thread(target=self.kernel.stop, name="llmos-kernel-stop", daemon=True)
        stopper.start()
        await self._wait(stopper.is_alive, None)

    async def _wait(self, busy: Callable[[], bool], timeout: float | None) -> bool:
        """Poll ``busy`` until false (True), timeout or a forced exit (False)."""
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while busy():
            if self.forced or (deadline is not None and loop.time() >= deadline):
                return False
            await asyncio.sleep(0.05)
        return True


# --------------------------------------------------------------------------
# The app
# --------------------------------------------------------------------------


def create_app(kernel: Kernel) -> FastAPI:
    """Build the daemon's app for ``kernel`` (loading its plugins if needed).

    The app has the probes ``/healthz`` and ``/readyz``, the OpenAPI schema at
    ``/openapi.json``, the registry's routes (:mod:`llmos.server.models_api`),
    the OpenAI-compatible routes (:mod:`llmos.server.openai_api`),
    the dashboard at ``/`` (:mod:`llmos.server.dashboard`; open without a key),
    and every plugin's routes (``llmos_register_routes``);
    a plugin whose route collides with the kernel's or another plugin's is
    failed with a :class:`~llmos.errors.DuplicateNameError` naming both, and
    none of its routes is mounted. ``app.state.kernel`` is the kernel,
    ``app.state.daemon`` its :class:`DaemonState`.

    In strict plugin mode a collision raises instead.
    """
    kernel.load_plugins()
    settings = kernel.config.server
    daemon = DaemonState(kernel=kernel)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        daemon.start_kernel()
        try:
            yield
        finally:
            await daemon.stop_kernel(start_timeout=settings.drain_timeout)

    app = FastAPI(
        title="llmos",
        version=__version__,
        # Swagger UI and ReDoc load their JavaScript from a CDN; the daemon
        # must work offline, so only the schema itself is served.
        docs_url=None,
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.kernel = kernel
    app.state.daemon = daemon
    # The daemon's kernel runs the data folder's job queue: jobs any process
    # queued there, and jobs whose kernel died (see JobManager), from its start.
    kernel.jobs.adopt = True
    for router in _kernel_routers(kernel):
        app.include_router(router)
    _mount_plugin_routes(app, kernel)

    app.add_exception_handler(LlmosError, _llmos_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    # add_middleware wraps what is there, so the last added runs first.
    app.add_middleware(
        BodyLimitMiddleware,
        max_body_bytes=settings.max_body_bytes,
        limit_for=push_body_limit(kernel),
        body_timeout=settings.body_timeout_s,
    )
    app.add_middleware(
        AccessMiddleware, state=daemon, api_keys=settings.api_keys, open_paths=PUBLIC_PATHS
    )
    app.add_middleware(
        HostCheckMiddleware,
        state=daemon,
        configured_host=settings.host,
        allowed_hosts=settings.allowed_hosts,
    )
    app.add_middleware(RequestContextMiddleware, state=daemon)

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = document_errors(
                FastAPI.openapi(app), keys_required=bool(settings.api_keys)
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    return app


def _kernel_routers(kernel: Kernel) -> list[APIRouter]:
    """The routers of the daemon's own routes, in the order they are mounted."""
    return [
        _probes(),
        models_router(kernel),
        openai_router(kernel),
        tuning_router(kernel),
        fusions_router(kernel),
        groups_router(kernel),
        monitor_router(kernel),
        dashboard_router(),
    ]


def kernel_routes(kernel: Kernel) -> list[tuple[str, str]]:
    """``(method, path)`` of every route the daemon serves itself, schema
    included, without building the daemon: what ``llmos plugins`` checks
    plugin routes against (:meth:`PluginManager.check_routes`)."""
    app = FastAPI(docs_url=None, redoc_url=None)  # as create_app: /openapi.json only
    for router in _kernel_routers(kernel):
        app.include_router(router)
    return route_keys(app.routes)


def _probes() -> APIRouter:
    router = APIRouter(tags=["probes"])

    @router.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @router.get("/readyz", summary="Readiness: the kernel is ready and not draining")
    async def readyz(request: Request) -> JSONResponse:
        daemon: DaemonState = request.app.state.daemon
        reason = daemon.unavailable_reason()
        if reason is None:
            return JSONResponse({"status": "ready"})
        # The state for people and probes, and the error shape for clients
        # that only know that.
        body = {"status": daemon.status, **error_body(503, "unavailable", reason)}
        return JSONResponse(body, status_code=503, headers=error_headers(503))

    return router


# --------------------------------------------------------------------------
# Plugin routes
# --------------------------------------------------------------------------


def _mount_plugin_routes(app: FastAPI, kernel: Kernel) -> None:
    """Mount the routes of every plugin whose routes collide with nothing
    (:meth:`PluginManager.check_routes` fails the others)."""
    passed = kernel.plugins.check_routes(kernel, route_keys(app.routes))
    for plugin, specs in passed.items():
        _mount_one(app, kernel, plugin, specs)


def _mount_one(app: FastAPI, kernel: Kernel, plugin: str, specs: Sequence[RouteSpec]) -> None:
    """Mount all of one plugin's routes, or none of them."""
    # Gather the plugin's routers in one router first, so that the app gets
    # all of them in one step or, when one cannot be included, none.
    staging = APIRouter()
    try:
        for spec in specs:
            staging.include_router(spec.router, prefix=spec.prefix)
    except Exception as exc:
        kernel.plugins.reject(plugin, f"its routes could not be mounted: {exc!r}", PluginError)
        return
    app.include_router(staging, tags=[f"plugin: {plugin}"])
    log.debug(
        "server.plugin_routes",
        plugin=plugin,
        routes=sorted(f"{m} {p}" for m, p in route_keys(staging.routes)),
    )


# --------------------------------------------------------------------------
# The OpenAPI schema: what the daemon really answers
# --------------------------------------------------------------------------

#: the body of every error, as :func:`~llmos.server.middleware.error_body` makes it
ERROR_SCHEMA: dict[str, Any] = {
    "title": "Error",
    "description": "Every error the daemon sends, whatever made it (OpenAI's shape).",
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string", "description": "What is wrong and what to do."},
                "type": {
                    "type": "string",
                    "enum": [
                        "invalid_request_error",
                        "authentication_error",
                        "permission_error",
                        "rate_limit_error",
                        "server_error",
                    ],
                    "description": "The class of error, fixed by the HTTP status (OpenAI's): "
                    "authentication_error (401), permission_error (403), rate_limit_error (429), "
                    "server_error (5xx), invalid_request_error (any other 4xx).",
                },
                "param": {
                    "type": ["string", "null"],
                    "description": "The request field at fault (dotted path), if one is.",
                },
                "code": {
                    "type": ["string", "null"],
                    "description": "A stable name for the kind of error (OpenAI's where OpenAI "
                    "has one): model_not_found, invalid_api_key, rate_limit_exceeded, not_found, "
                    "unknown_parameter, unsupported_parameter, invalid_type, invalid_value, "
                    "payload_too_large, unavailable …; null for a plain invalid request.",
                },
            },
        }
    },
}

_RETRY_AFTER = {"description": "Seconds to wait before retrying", "schema": {"type": "integer"}}
#: status -> (component name, description, headers)
_ERRORS: dict[str, tuple[str, str, dict[str, Any]]] = {
    "400": (
        "BadRequest",
        "Invalid request: a field's type or value, malformed JSON, an invalid Content-Length, "
        "or a Host the daemon does not answer to (server.allowed_hosts). Request validation "
        "errors are 400, not FastAPI's 422.",
        {},
    ),
    "401": (
        "Unauthorized",
        "Missing or invalid API key (only where server.api_keys is set).",
        {"WWW-Authenticate": {"schema": {"type": "string", "const": "Bearer"}}},
    ),
    "403": (
        "Forbidden",
        "A browser write from another origin (Origin or Sec-Fetch-Site), or an action the "
        "daemon's config does not permit.",
        {},
    ),
    "404": ("NotFound", "Nothing by that name (model, version, job …), or no such route.", {}),
    "408": (
        "RequestTimeout",
        "The request body stalled longer than server.body_timeout_s; the connection is closed.",
        {},
    ),
    "413": (
        "PayloadTooLarge",
        "The body is over server.max_body_bytes (or the route's own cap); the connection is "
        "closed.",
        {},
    ),
    "429": (
        "TooManyRequests",
        "A queue is full; retry after Retry-After seconds.",
        {"Retry-After": _RETRY_AFTER},
    ),
    "503": (
        "Unavailable",
        f"The daemon is starting, draining or failed to start (Retry-After: "
        f"{RETRY_AFTER_SECONDS}).",
        {"Retry-After": _RETRY_AFTER},
    ),
    "default": (
        "Error",
        "Any other error, in the same shape: 409 (a conflict), 422 (a base model that cannot "
        "be tuned here), 500, 504 (a model took too long) …",
        {},
    ),
}
#: what every operation but the probes may answer, besides its own responses
_EVERYWHERE = ("400", "401", "404", "413", "429", "503", "default")

#: a model reference: a name, ``name@<version>`` or ``name@<alias>``
REF_PATTERN = NAME_PATTERN.pattern.removesuffix("$") + "(@[a-z0-9_-]{1,64})?$"
#: path parameters that name models, by the path they are under. A reference
#: is bounded as a name is: a schema cannot bound the name's part alone, and a
#: longer bound would make fuzzers send names the registry refuses
_NAME_PARAMETERS: dict[tuple[str, str], dict[str, Any]] = {
    ("/api/models/", "name"): {"pattern": NAME_PATTERN.pattern, "maxLength": NAME_MAX_LENGTH},
    ("/api/models/", "ref"): {"pattern": REF_PATTERN, "maxLength": NAME_MAX_LENGTH},
    ("/api/models/", "alias"): {"pattern": "^[a-z0-9_-]{1,64}$", "maxLength": 64},
    ("/api/fusions/", "name"): {"pattern": REF_PATTERN, "maxLength": NAME_MAX_LENGTH},
}

_OPENAI_STREAM = (
    'With "stream": true, server-sent events: one "data: <chunk JSON>" event per chunk, '
    'then "data: [DONE]".'
)
#: routes that answer server-sent events: (method, path) -> (only SSE?, description)
_EVENT_STREAMS: dict[tuple[str, str], tuple[bool, str]] = {
    ("post", "/v1/chat/completions"): (False, _OPENAI_STREAM),
    ("post", "/v1/completions"): (False, _OPENAI_STREAM),
    ("get", "/api/tuning/jobs/{job_id}/events"): (
        True,
        'Server-sent events: "progress" (a progress record), "state" (the job, after each '
        'change; the stream ends when the job does) and "end" (the daemon is stopping), with '
        '": keep-alive" comments while the job is quiet.',
    ),
}
_VALIDATION_SCHEMAS = ("HTTPValidationError", "ValidationError")


def document_errors(schema: dict[str, Any], *, keys_required: bool) -> dict[str, Any]:
    """Correct FastAPI's ``schema`` (in place) to what the daemon answers.

    * every operation but the probes lists 400, 401, 404, 413, 429 and 503
      (writes 403 too, operations with a body 408) and a ``default``, all with
      the ``Error`` schema; FastAPI's 422 goes, since validation errors are
      400 here;
    * the bearer ``securitySchemes``, required on every operation but the
      probes when ``keys_required``;
    * ``text/event-stream`` on the routes that stream (those in
      ``_EVENT_STREAMS`` and any whose body has a ``stream`` flag, which
      covers a plugin's OpenAI-style route);
    * ``pattern`` and ``maxLength`` on path parameters that name models.
    """
    components = schema.setdefault("components", {})
    schemas = components.setdefault("schemas", {})
    schemas["Error"] = copy.deepcopy(ERROR_SCHEMA)
    error_content = {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}
    responses = components.setdefault("responses", {})
    for name, description, headers in _ERRORS.values():
        response: dict[str, Any] = {"description": description, "content": error_content}
        if headers:
            response["headers"] = headers
        responses[name] = response
    components["securitySchemes"] = {
        "bearer": {
            "type": "http",
            "scheme": "bearer",
            "description": "A key from server.api_keys, as 'Authorization: Bearer <key>'. "
            + (
                "Required on every route but the probes."
                if keys_required
                else "This daemon has no keys set, so no route asks for one."
            ),
        }
    }
    if keys_required:
        schema["security"] = [{"bearer": []}]

    for path, item in schema.get("paths", {}).items():
        for method, operation in item.items():
            if method not in ("get", "put", "post", "delete", "options", "head", "patch"):
                continue
            _document_operation(schema, path, method, operation, keys_required=keys_required)

    text = json.dumps(schema)
    for name in _VALIDATION_SCHEMAS:
        if f'"#/components/schemas/{name}"' not in text:
            schemas.pop(name, None)
    return schema


def _document_operation(
    schema: dict[str, Any],
    path: str,
    method: str,
    operation: dict[str, Any],
    *,
    keys_required: bool,
) -> None:
    responses = operation.setdefault("responses", {})
    responses.pop("422", None)
    if path in PROBE_PATHS:
        # Open, never refused, never validated: only the readiness 503.
        if keys_required:
            operation["security"] = []
        if path == "/readyz":
            responses["503"] = {
                "description": "Not ready: starting, draining or failed. The body has the "
                "state in status, and the error.",
                "content": {
                    "application/json": {
                        "schema": {
                            "allOf": [
                                {"$ref": "#/components/schemas/Error"},
                                {
                                    "type": "object",
                                    "required": ["status"],
                                    "properties": {"status": {"type": "string"}},
                                },
                            ]
                        }
                    }
                },
            }
        responses.setdefault("default", _ref("default"))
        return
    statuses = list(_EVERYWHERE)
    if method.upper() not in SAFE_METHODS:  # a write: the Origin check's 403
        statuses.append("403")
    if "requestBody" in operation:
        statuses.append("408")
    for status in statuses:
        responses.setdefault(status, _ref(status))

    stream = _EVENT_STREAMS.get((method, path))
    if stream is None and _has_stream_flag(schema, operation):
        stream = (False, _OPENAI_STREAM)
    if stream is not None:
        only, description = stream
        ok = next((responses[s] for s in ("200", "201", "202") if s in responses), None)
        if ok is not None:
            content = {} if only else ok.setdefault("content", {})
            content.setdefault(
                "text/event-stream", {"schema": {"type": "string", "description": description}}
            )
            ok["content"] = content

    for parameter in operation.get("parameters", ()):
        if parameter.get("in") != "path":
            continue
        for (prefix, name), rules in _NAME_PARAMETERS.items():
            if parameter.get("name") == name and path.startswith(prefix):
                parameter.setdefault("schema", {}).update(rules)


def _ref(status: str) -> dict[str, str]:
    return {"$ref": f"#/components/responses/{_ERRORS[status][0]}"}


def _has_stream_flag(schema: dict[str, Any], operation: dict[str, Any]) -> bool:
    """Whether the operation's JSON body has a boolean ``stream`` property."""
    content = operation.get("requestBody", {}).get("content", {})
    body = content.get("application/json", {}).get("schema", {})
    ref = body.get("$ref", "")
    if ref.startswith("#/components/schemas/"):
        body = schema["components"]["schemas"].get(ref.rsplit("/", 1)[1], {})
    stream = body.get("properties", {}).get("stream", {})
    kinds = [stream.get("type")] + [option.get("type") for option in stream.get("anyOf", ())]
    return "boolean" in kinds


# --------------------------------------------------------------------------
# Exception handlers: everything in the one error shape
# --------------------------------------------------------------------------


def _error(
    status: int,
    code: str | None,
    message: str,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    return JSONResponse(
        error_body(status, code, message, param),
        status_code=status,
        headers={**error_headers(status), **(headers or {})},
    )


async def _llmos_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, LlmosError)
    if exc.status >= 500:
        log.warning("http.llmos_error", error=exc.message, error_type=exc.type)
    headers = None
    if exc.retry_after is not None and exc.retry_after > 0:
        headers = {"Retry-After": str(math.ceil(exc.retry_after))}  # whole seconds
    return _error(exc.status, exc.code, exc.message, exc.param, headers)


_LOCATIONS = frozenset({"body", "query", "path", "header", "cookie"})


def _dotted(loc: Sequence[Any]) -> str:
    """``("body", "messages", 0, "role")`` -> ``messages.0.role``; the source
    (body, query …) is dropped unless it is all there is."""
    parts = [str(p) for p in loc]
    if len(parts) > 1 and parts[0] in _LOCATIONS:
        parts = parts[1:]
    return ".".join(parts)


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    if not errors:
        return _error(400, None, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        detail = (first.get("ctx") or {}).get("error", "")
        message = f"request body is not valid JSON: {detail}".rstrip(": ")
        return _error(400, "invalid_json", message, "body")
    parts = []
    for error in errors[:5]:
        where = _dotted(error.get("loc", ()))
        parts.append(f"{where}: {error.get('msg', 'invalid value')}")
    if len(errors) > 5:
        parts.append(f"and {len(errors) - 5} more")
    return _error(
        400,
        _validation_code(str(first.get("type", ""))),
        "; ".join(parts),
        _dotted(first.get("loc", ())) or None,
    )


def _validation_code(kind: str) -> str:
    """``error.code`` of a failed validation, by pydantic's error type, in
    OpenAI's words: a field llmos does not know, a value of the wrong type,
    a field missing, or a value out of range."""
    if kind == "extra_forbidden":
        return "unknown_parameter"
    if kind == "missing":
        return "missing_required_parameter"
    if kind.endswith(("_type", "_parsing")) or kind in ("model_attributes_type", "is_instance_of"):
        return "invalid_type"
    return "invalid_value"


#: ``error.code`` of Starlette's HTTP errors (a route's own, or no route)
_HTTP_CODES: dict[int, str | None] = {
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    413: "payload_too_large",
    429: "rate_limit_exceeded",
    503: "unavailable",
}


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    status = exc.status_code
    headers = dict(exc.headers or {})
    code = _HTTP_CODES.get(status)
    detail = exc.detail
    try:
        default_detail = http.HTTPStatus(status).phrase
    except ValueError:
        default_detail = ""
    if status == 404 and detail == default_detail:
        message = f"no route for {request.method} {request.url.path}"
    elif status == 405 and detail == default_detail:
        # Starlette's Allow names the methods of the first route whose path
        # matched; other routes (or plugins) may take others on the same path.
        allowed = ", ".join(allowed_methods(request.app, request.url.path))
        headers["Allow"] = allowed
        message = f"method {request.method} is not allowed on {request.url.path}" + (
            f"; allowed: {allowed}" if allowed else ""
        )
    else:
        message = detail if isinstance(detail, str) else json.dumps(detail, default=str)
    return _error(status, code, message, headers=headers)


def allowed_methods(app: FastAPI, path: str) -> list[str]:
    """Every method some route of ``app`` takes on ``path``, sorted: what a
    405's ``Allow`` must say."""
    methods: set[str] = set()
    for prefix, route in flatten_routes(app.router.routes):
        route_methods = getattr(route, "methods", None)
        route_path = getattr(route, "path", None)
        if not route_methods or route_path is None:
            continue
        regex, _, _ = compile_path(prefix + route_path)
        if regex.match(path):
            methods |= set(route_methods)
    return sorted(methods)
