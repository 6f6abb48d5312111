"""One exception family; each class is one HTTP status.

Everything the server refuses is raised as an ``IngrainError`` subclass and turned
into ``{"message": ...}`` (or OpenAI's error shape on ``/v1/``) by one handler.
"""

from __future__ import annotations


class IngrainError(Exception):
    status_code: int = 500
    error_type: str = "server_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


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


class UpstreamFailed(IngrainError):
    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeout(IngrainError):
    status_code = 504
    error_type = "upstream_error"
