"""Typed errors of trillm_client, and the one place that maps what a server
or transport said onto them.

Every error carries the server's (or the transport's) message unchanged in
``.message`` and, when the transport gave one, ``.status``: the HTTP status
code (``int``) or the gRPC status code name (``"INVALID_ARGUMENT"``).

Triton reports errors on a gRPC *stream* without a status code (only the
text), and our Python models report input errors as ``input '<name>': <rule>``,
so classification looks at the message as well as at any status code.
"""

from __future__ import annotations

import re


class TrillmError(Exception):
    """Base class of every error raised by trillm_client."""

    def __init__(self, message: str, *, status: int | str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


class InvalidInputError(TrillmError, ValueError):
    """The request was rejected: by client-side validation, or by the server
    (HTTP 400, gRPC ``INVALID_ARGUMENT``, or an input error on a stream)."""


class ModelNotFoundError(TrillmError, LookupError):
    """The server has no such model, or no such version of it."""


class ModelNotReadyError(TrillmError):
    """The model exists in the repository but is not loaded and ready."""


class UnavailableError(TrillmError, ConnectionError):
    """The server could not be reached (connection refused, reset, DNS...)."""


class RequestTimeoutError(TrillmError, TimeoutError):
    """No response arrived within the client's timeout (the request was cancelled)."""


class RequestCancelledError(TrillmError):
    """The server reports that the request was cancelled."""


class AdminKeyError(TrillmError, PermissionError):
    """The server refused a model-control call: the admin key is missing or wrong."""


_NOT_READY = re.compile(r"has no available versions|is not ready|not ready", re.IGNORECASE)
_NOT_FOUND = re.compile(r"unknown model|is not found|model not found", re.IGNORECASE)
_CANCELLED = re.compile(r"\bcancel(l)?ed\b", re.IGNORECASE)
# Server faults a stream reports only as text: our drain and shutdown, a dead model stub, a
# connection the server dropped mid-stream (gRPC RST_STREAM "Stream removed").
_UNAVAILABLE = re.compile(r"server shutting down|is not healthy|server is stopping|stream removed|socket closed",
                          re.IGNORECASE)
# Triton's own input checks ("expected number of inputs ...", "unexpected
# datatype ...", "Unable to parse 'data' ...") and ours ("input 'top_p': ...").
_BAD_INPUT = re.compile(
    r"\binputs?\b|unable to parse|failed to parse|data-?type|unexpected shape|must be",
    re.IGNORECASE,
)

_GRPC_CODES: dict[str, type[TrillmError]] = {
    "INVALID_ARGUMENT": InvalidInputError,
    "NOT_FOUND": ModelNotFoundError,
    "UNAVAILABLE": UnavailableError,
    "DEADLINE_EXCEEDED": RequestTimeoutError,
    "CANCELLED": RequestCancelledError,
}
_HTTP_STATUSES: dict[int, type[TrillmError]] = {
    400: InvalidInputError,
    404: ModelNotFoundError,
    408: RequestTimeoutError,
    499: RequestCancelledError,
    503: UnavailableError,
    504: RequestTimeoutError,
}


def classify(message: str, *, http_status: int | None = None, grpc_code: str | None = None) -> TrillmError:
    """The typed error for a failure the server (or transport) reported.

    ``grpc_code`` is a ``grpc.StatusCode`` name, with or without the
    ``StatusCode.`` prefix tritonclient puts in front of it.
    """
    code = grpc_code.rsplit(".", 1)[-1] if grpc_code else None
    status: int | str | None = http_status if http_status is not None else code
    if _UNAVAILABLE.search(message):
        return UnavailableError(message, status=status)
    if _NOT_READY.search(message):
        return ModelNotReadyError(message, status=status)
    if _NOT_FOUND.search(message):
        return ModelNotFoundError(message, status=status)
    if code in _GRPC_CODES:
        return _GRPC_CODES[code](message, status=status)
    if http_status in _HTTP_STATUSES:
        return _HTTP_STATUSES[http_status](message, status=status)
    if _CANCELLED.search(message):
        return RequestCancelledError(message, status=status)
    if not message.lower().startswith("internal") and _BAD_INPUT.search(message):
        return InvalidInputError(message, status=status)
    return TrillmError(message, status=status)
