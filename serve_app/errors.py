"""Every error a client can see: one kind per class, one table from kind to HTTP status and OpenAI error type.

Body shape (OpenAI's, which the openai and cohere SDKs parse): {"error": {"message", "type", "param", "code"}}.
Client mistakes are always 4xx: clients retry 408/409/429/5xx, so a 5xx for a bad request would be retried
forever. These classes import nothing heavy, so model replicas raise them and the gateway unwraps them.
"""

from __future__ import annotations

from typing import Any


class ServingError(Exception):
    """Base of every error that reaches a client with a deliberate status."""

    status: int = 500
    type: str = "server_error"
    code: str = "internal_error"

    def __init__(self, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}

    def __reduce__(self):  # crosses Ray handle hops by pickle: keep param/code/headers
        return (_rebuild, (type(self), self.message, self.param, self.code, self.headers))

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _rebuild(cls, message, param, code, headers):
    return cls(message, param=param, code=code, headers=headers)


class InvalidRequest(ServingError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(ServingError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class Forbidden(ServingError):
    status, type, code = 403, "permission_error", "forbidden"


class NotFound(ServingError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class MethodNotAllowed(ServingError):
    status, type, code = 405, "invalid_request_error", "method_not_allowed"


class IdempotencyConflict(ServingError):
    """An Idempotency-Key already used for a different request (route or body)."""

    status, type, code = 409, "invalid_request_error", "idempotency_key_reused"


class PayloadTooLarge(ServingError):
    status, type, code = 413, "invalid_request_error", "payload_too_large"


class RateLimited(ServingError):
    status, type, code = 429, "rate_limit_error", "rate_limit_exceeded"


class InsufficientQuota(ServingError):
    """The key's prepaid credit is spent (balance at or below zero): OpenAI's answer for an exhausted quota. Not
    worth retrying until someone tops the key up, so the openai SDK is told not to (x-should-retry)."""

    status, type, code = 429, "insufficient_quota", "insufficient_quota"


class InternalError(ServingError):
    status, type, code = 500, "server_error", "internal_error"


class Overloaded(ServingError):
    """The model's queue is full or no replica can take the request: retry after a pause."""

    status, type, code = 503, "overloaded_error", "overloaded"


class ModelUnavailable(ServingError):
    status, type, code = 503, "server_error", "model_unavailable"


class ModelStarting(ModelUnavailable):
    """The model's application is deployed but no replica runs yet (weights loading): retry later, not a 404."""

    code = "model_starting"


class RequestTimeout(ServingError):
    """The model did not answer within the gateway's request_timeout_s."""

    status, type, code = 504, "server_error", "timeout"


class StoreUnavailable(ServingError):
    """The database behind API keys and the usage ledger cannot be reached: nothing is served unbilled."""

    status, type, code = 503, "server_error", "store_unavailable"


def status_table() -> dict[str, int]:
    """Kind -> status, for the README and the tests."""
    kinds = [InvalidRequest, Unauthorized, Forbidden, NotFound, ModelNotFound, MethodNotAllowed, IdempotencyConflict,
             PayloadTooLarge,
             RateLimited, InsufficientQuota, InternalError, Overloaded, ModelUnavailable, ModelStarting,
             RequestTimeout, StoreUnavailable]
    return {kind.__name__: kind.status for kind in kinds}
