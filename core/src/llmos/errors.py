"""The errors llmos raises on purpose.

Every error a user can cause or fix derives from :class:`LlmosError`. Each class
carries what the two front doors need to report it without a traceback: an HTTP
status and a stable kind (``type``, sent as the JSON error body's ``code``) for
the daemon, and an exit code for the CLI. Messages are one line and say what to
do.

The daemon's error body is OpenAI's: ``{"error": {"message", "type", "param",
"code"}}``, where ``type`` is the class of error, fixed by the HTTP status
(:func:`error_type`), and ``code`` a stable string naming the kind of error
(OpenAI's own where OpenAI has one: ``model_not_found``, ``invalid_api_key``,
``rate_limit_exceeded``) or ``null`` for a plain invalid request, as OpenAI
sends it. Clients branch on the status, then on ``code``.
"""

from __future__ import annotations


def error_type(status: int) -> str:
    """``error.type`` of an HTTP error with ``status``, as OpenAI names the
    classes: ``invalid_request_error`` for any 4xx but 401 (OpenAI's 404 for an
    unknown model is one too), 403 and 429, ``server_error`` for 5xx."""
    if status == 401:
        return "authentication_error"
    if status == 403:
        return "permission_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


#: the kinds whose ``code`` is not their ``type``: OpenAI's codes, and
#: ``None`` for a plain invalid request (OpenAI sends ``null``)
_CODES: dict[str, str | None] = {
    "invalid_request_error": None,
    "llmos_error": None,
    "authentication_error": "invalid_api_key",
    "overloaded": "rate_limit_exceeded",
}


class LlmosError(Exception):
    """Base of every error llmos raises deliberately."""

    #: stable machine-readable kind; the HTTP body's ``error.code`` (through
    #: :attr:`code`, which maps a few kinds to OpenAI's codes)
    type: str = "llmos_error"
    #: HTTP status the daemon answers with
    status: int = 500
    #: process exit code the CLI ends with
    exit_code: int = 1

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after: float | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        #: a finer kind than the class's, for ``error.code`` (``model_not_found``)
        self._code = code
        #: seconds after which a retry may succeed, when the error knows
        #: (an upstream's Retry-After); the daemon passes it on to its client
        self.retry_after = retry_after

    @property
    def code(self) -> str | None:
        """``error.code`` of the daemon's error body: the kind given when
        raised, else the class's (OpenAI's code where OpenAI has one)."""
        given = getattr(self, "_code", None)  # a subclass may skip our __init__
        if given is not None:
            return given
        return _CODES.get(self.type, self.type)

    def __str__(self) -> str:
        return self.message


class UsageError(LlmosError):
    """The request or command line is malformed."""

    type = "invalid_request_error"
    status = 400
    exit_code = 2


class UnsafeSourceError(UsageError):
    """A model source, URL or uploaded file refused for safety (traversal,
    private address, pickle, archive link ...); the message says why and what
    to do instead."""

    type = "unsafe_source"


class ConfigError(LlmosError):
    """A config file, include, interpolation or override is wrong."""

    type = "config_error"
    status = 500
    exit_code = 2


class PluginError(LlmosError):
    """A plugin failed to load or to register (strict mode makes this fatal)."""

    type = "plugin_error"
    status = 500
    exit_code = 3


class DuplicateNameError(PluginError):
    """Two plugins registered the same provider, strategy, method or sink name."""

    type = "duplicate_name"


class NotFoundError(LlmosError):
    """A model, version, alias, job or other named thing does not exist."""

    type = "not_found"
    status = 404
    exit_code = 4


class CapabilityNotSupported(LlmosError):
    """The model does not declare the capability that was asked of it."""

    type = "capability_not_supported"
    status = 400
    exit_code = 2


class AuthenticationError(LlmosError):
    """A missing or wrong API key."""

    type = "authentication_error"
    status = 401
    exit_code = 5


class PayloadTooLarge(LlmosError):
    """A request body over the configured cap."""

    type = "payload_too_large"
    status = 413
    exit_code = 2


class Unavailable(LlmosError):
    """The daemon is starting or draining and takes no new work."""

    type = "unavailable"
    status = 503
    exit_code = 6


class Overloaded(LlmosError):
    """A model's request queue is full; retry after a moment."""

    type = "overloaded"
    status = 429
    exit_code = 6


class RequestTimeout(LlmosError):
    """A request did not finish within its timeout."""

    type = "timeout"
    status = 504
    exit_code = 6
