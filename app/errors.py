"""One error hierarchy for the whole service: every failure is a typed value with an HTTP
status, a contract error code, an optional offending parameter and an optional Retry-After.

    ServiceError (500 inference_error)
    ├── InvalidRequest (400 invalid_request)
    │   ├── UnsupportedField (400 unsupported_field)
    │   └── InputTooLong (400 INPUT_TOO_LONG)
    ├── PayloadTooLarge (413 INPUT_TOO_LONG)
    ├── ModelNotFound (404 MODEL_NOT_FOUND)
    ├── Unauthorized (401 invalid_api_key) / Forbidden (403 permission_denied)
    ├── RouteNotFound (404 not_found) / MethodNotAllowed (405 method_not_allowed)
    ├── RateLimited (429 rate_limit_exceeded: requests per minute)
    │   ├── TokenRateLimited (429 token_rate_limit_exceeded)
    │   └── ConcurrencyLimited (429 concurrency_limit_exceeded)
    ├── ModelLoadFailed (502 MODEL_LOAD_FAILED, never Retry-After)
    ├── Capacity errors (503 + Retry-After): Provisioning, ModelLoading, QueueFull,
    │   WorkerUnavailable
    ├── GenerationCancelled (503 generation_cancelled)
    └── InternalError (500 internal_error, carries a request id)

Rendering to HTTP (OpenAI or SIE body shape) lives in `app/api/errors.py`, in one place.
Errors cross Ray process boundaries, so they must pickle: `__reduce__` rebuilds them from
their constructor arguments.
"""

from __future__ import annotations

from typing import Any


class ServiceError(Exception):
    """Base of every error the service reports to a client."""

    status: int = 500
    code: str = "inference_error"
    default_retry_after_s: float | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        retry_after_s: float | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.retry_after_s = (
            retry_after_s if retry_after_s is not None else self.default_retry_after_s
        )
        self.extra = dict(extra or {})

    @property
    def openai_type(self) -> str:
        return "invalid_request_error" if self.status < 500 else "server_error"

    def __reduce__(self) -> tuple[Any, ...]:
        return (_rebuild, (type(self), self.message, self.param, self.retry_after_s, self.extra))

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.message!r}, code={self.code!r}, param={self.param!r})"


def _rebuild(
    cls: type[ServiceError],
    message: str,
    param: str | None,
    retry_after_s: float | None,
    extra: dict[str, Any],
) -> ServiceError:
    error = cls.__new__(cls)
    ServiceError.__init__(error, message, param=param, retry_after_s=retry_after_s, extra=extra)
    return error


class InvalidRequest(ServiceError):
    status = 400
    code = "invalid_request"


class UnsupportedField(InvalidRequest):
    code = "unsupported_field"

    def __init__(self, param: str, message: str | None = None) -> None:
        super().__init__(message or f"'{param}' is not supported", param=param)


class ModelPathInvalid(InvalidRequest):
    code = "MODEL_NOT_FOUND"


class InputTooLong(InvalidRequest):
    code = "INPUT_TOO_LONG"


class PayloadTooLarge(ServiceError):
    status = 413
    code = "INPUT_TOO_LONG"


class ModelNotFound(ServiceError):
    status = 404
    code = "MODEL_NOT_FOUND"

    def __init__(self, model: str) -> None:
        super().__init__(
            f"model '{model}' is not served here", param="model", extra={"model": model}
        )


class Unauthorized(ServiceError):
    """401: no key, or a key that is not valid here (the openai SDK's AuthenticationError)."""

    status = 401
    code = "invalid_api_key"


class Forbidden(ServiceError):
    """403: a valid key without the rights the route needs (pool changes need an admin key)."""

    status = 403
    code = "permission_denied"


class RouteNotFound(ServiceError):
    status = 404
    code = "not_found"


class MethodNotAllowed(ServiceError):
    status = 405
    code = "method_not_allowed"


class RateLimited(ServiceError):
    status = 429
    code = "rate_limit_exceeded"
    default_retry_after_s = 1.0


class TokenRateLimited(RateLimited):
    """A pool's or key's tokens per minute are used up (Retry-After: until enough leave the
    window)."""

    code = "token_rate_limit_exceeded"


class ConcurrencyLimited(RateLimited):
    """A pool or key already has its `concurrent_streams` requests in flight."""

    code = "concurrency_limit_exceeded"


class ModelLoadFailed(ServiceError):
    """Permanent load failure: 502 without Retry-After, so the SIE SDK does not retry."""

    status = 502
    code = "MODEL_LOAD_FAILED"

    def __init__(
        self,
        message: str,
        *,
        error_class: str = "UNKNOWN",
        permanent: bool = True,
        attempts: int = 1,
    ) -> None:
        super().__init__(
            message,
            extra={"error_class": error_class, "permanent": permanent, "attempts": attempts},
        )
        self.retry_after_s = None


class CapacityError(ServiceError):
    """503 with Retry-After: the clients retry these transparently."""

    status = 503
    code = "RESOURCE_EXHAUSTED"
    default_retry_after_s = 5.0


class Provisioning(CapacityError):
    code = "PROVISIONING"


class ModelLoading(CapacityError):
    code = "MODEL_LOADING"


class QueueFull(CapacityError):
    code = "QUEUE_FULL"
    default_retry_after_s = 1.0


class LimitsUnavailable(CapacityError):
    """`tenancy.on_ledger_unavailable: closed`: a limited request while the TenantLedger is out
    (and this replica's grants have lapsed)."""

    code = "limits_unavailable"
    default_retry_after_s = 1.0


class UsageUnavailable(CapacityError):
    """The TenantLedger (or one of its usage shards) did not answer a usage read in time."""

    code = "usage_unavailable"
    default_retry_after_s = 1.0


class WorkerUnavailable(CapacityError):
    """The worker serving a request went away (replica death, node loss)."""

    code = "transport_failure"
    default_retry_after_s = 1.0


class GenerationCancelled(ServiceError):
    status = 503
    code = "generation_cancelled"


class InternalError(ServiceError):
    status = 500
    code = "internal_error"

    def __init__(self, request_id: str) -> None:
        super().__init__(
            f"internal error (request id {request_id})", extra={"request_id": request_id}
        )


class PoolNotFound(ServiceError):
    status = 404
    code = "POOL_NOT_FOUND"

    def __init__(self, pool: str) -> None:
        super().__init__(f"pool '{pool}' does not exist", param="X-SIE-Pool", extra={"pool": pool})


class GenerationFailed(ServiceError):
    """The engine ended a generation with an error; `code` is the client-safe code it reported."""

    def __init__(self, message: str, code: str = "inference_error") -> None:
        super().__init__(message)
        self.code = code

    def __reduce__(self) -> tuple[Any, ...]:
        return (GenerationFailed, (self.message, self.code))


class UnsupportedMediaType(ServiceError):
    status = 415
    code = "unsupported_media_type"


class UnknownLora(InvalidRequest):
    code = "unknown_lora"

    def __init__(self, adapter: str, model: str) -> None:
        super().__init__(
            f"LoRA adapter '{adapter}' is not configured for model '{model}'",
            param="lora_adapter",
            extra={"lora_adapter": adapter},
        )
