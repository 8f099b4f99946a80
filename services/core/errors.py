"""Domain errors and the gRPC status each maps to.

Services raise these; the error interceptor (aimass.core.interceptors) turns
them into a gRPC status with a message that names the field and the problem,
and with google.rpc details where they help (BadRequest field violations,
RetryInfo). Anything else that escapes a handler becomes INTERNAL with a
generic message, never a stack trace.

    AimassError                     INTERNAL
    ├── InvalidArgument             INVALID_ARGUMENT (field violations)
    ├── NotFound                    NOT_FOUND
    ├── AlreadyExists               ALREADY_EXISTS
    ├── FailedPrecondition          FAILED_PRECONDITION
    ├── Aborted                     ABORTED (stale etag, lost race)
    ├── Unauthenticated             UNAUTHENTICATED
    ├── PermissionDenied            PERMISSION_DENIED
    ├── ResourceExhausted           RESOURCE_EXHAUSTED (RetryInfo)
    ├── Unavailable                 UNAVAILABLE
    └── Unimplemented               UNIMPLEMENTED
"""

from __future__ import annotations

from dataclasses import dataclass

import grpc


@dataclass(frozen=True)
class FieldViolation:
    """One bad field of a request: where it is and what is wrong with it."""

    field: str
    description: str


class AimassError(Exception):
    """Base of every error aimass raises on purpose. Maps to INTERNAL."""

    code: grpc.StatusCode = grpc.StatusCode.INTERNAL

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class InvalidArgument(AimassError):
    """A request field is malformed or out of range. Maps to INVALID_ARGUMENT."""

    code = grpc.StatusCode.INVALID_ARGUMENT

    def __init__(self, field: str, problem: str, *more: FieldViolation) -> None:
        violations = (FieldViolation(field, problem), *more)
        super().__init__("; ".join(f"{v.field}: {v.description}" for v in violations))
        self.violations = violations


class NotFound(AimassError):
    """The named resource does not exist. Maps to NOT_FOUND."""

    code = grpc.StatusCode.NOT_FOUND


class AlreadyExists(AimassError):
    """A resource of that name exists already. Maps to ALREADY_EXISTS."""

    code = grpc.StatusCode.ALREADY_EXISTS


class FailedPrecondition(AimassError):
    """The system is not in a state that allows the call. Maps to FAILED_PRECONDITION."""

    code = grpc.StatusCode.FAILED_PRECONDITION


class Aborted(AimassError):
    """A concurrent change won (stale etag, compare-and-swap lost). Maps to ABORTED."""

    code = grpc.StatusCode.ABORTED


class Unauthenticated(AimassError):
    """No valid credentials came with the call. Maps to UNAUTHENTICATED."""

    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(AimassError):
    """The caller's role does not allow the call. Maps to PERMISSION_DENIED."""

    code = grpc.StatusCode.PERMISSION_DENIED


class ResourceExhausted(AimassError):
    """A quota, rate limit or queue is full. Maps to RESOURCE_EXHAUSTED."""

    code = grpc.StatusCode.RESOURCE_EXHAUSTED

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


class Unavailable(AimassError):
    """A dependency (NATS, Triton, the database) cannot be reached. Maps to UNAVAILABLE."""

    code = grpc.StatusCode.UNAVAILABLE


class Unimplemented(AimassError):
    """The method exists in the API but this server does not serve it yet."""

    code = grpc.StatusCode.UNIMPLEMENTED
