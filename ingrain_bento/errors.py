"""One exception family; each class is one HTTP status.

Everything the server refuses is raised as an ``IngrainError`` subclass and turned into
``{"message": ...}`` (or OpenAI's error shape on ``/v1/``) by one handler in the front. The
runner raises the same classes; they cross to the front as ``(status, message, type)``
(``as_reply``) and are raised there again (``from_reply``), so a runner's 404 is the
client's 404.
"""

from __future__ import annotations

from typing import Any

__all__ = [
    "AtCapacity", "BadRequest", "Conflict", "IngrainError", "ModelNotFound", "RunnerUnavailable", "TooLarge",
    "Unauthorized", "UpstreamFailed", "UpstreamTimeout", "from_reply",
]


class IngrainError(Exception):
    status_code: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` on a 503)."""
        return {}

    def as_reply(self) -> dict[str, Any]:
        """The error as it crosses from the runner to the front."""
        return {"status": self.status_code, "message": self.message, "type": self.error_type}


class BadRequest(IngrainError):
    status_code = 400
    error_type = "invalid_request_error"


class Unauthorized(IngrainError):
    status_code = 401
    error_type = "authentication_error"


class ModelNotFound(IngrainError):
    status_code = 404
    error_type = "not_found_error"


class Conflict(IngrainError):
    status_code = 409
    error_type = "conflict_error"


class TooLarge(IngrainError):
    status_code = 413
    error_type = "invalid_request_error"


class AtCapacity(IngrainError):
    status_code = 503
    error_type = "overloaded_error"


class RunnerUnavailable(AtCapacity):
    """The model runner is restarting (or unreachable): try again after ``retry_after_s``."""

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class UpstreamFailed(IngrainError):
    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeout(IngrainError):
    status_code = 504
    error_type = "upstream_error"


_BY_STATUS = {cls.status_code: cls for cls in (BadRequest, Unauthorized, ModelNotFound, Conflict, TooLarge,
                                               AtCapacity, UpstreamFailed, UpstreamTimeout)}


def from_reply(reply: dict[str, Any]) -> IngrainError:
    """The error a runner reply (``IngrainError.as_reply``) describes, as an exception again."""
    status = int(reply.get("status", 500))
    error = _BY_STATUS.get(status, IngrainError)(str(reply.get("message", "The model runner failed.")))
    error.status_code, error.error_type = status, str(reply.get("type", error.error_type))
    return error
