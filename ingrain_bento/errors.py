"""One exception family; each class is one HTTP status.

Everything the server refuses is raised as an ``IngrainError`` subclass and turned into
``{"message": ...}`` (or OpenAI's error shape on ``/v1/``) by one handler in the front. The
runner raises the same classes; they cross to the front by their class name (``as_reply``) and
are raised there again as the same class (``from_reply``): a runner's ``StaleModel`` is the
front's ``StaleModel``, not just some 409.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "AtCapacity", "BadRequest", "Conflict", "IngrainError", "ModelNotFound", "ModelStillLoading", "RetryLater",
    "RunnerUnavailable", "StaleModel", "TooLarge", "Unauthorized", "UpstreamFailed", "UpstreamTimeout",
    "from_reply",
]

_BY_NAME: dict[str, type[IngrainError]] = {}


class IngrainError(Exception):
    status_code: ClassVar[int] = 500
    error_type: ClassVar[str] = "server_error"  # OpenAI's error "type" on the /v1/ routes

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _BY_NAME[cls.__name__] = cls

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def headers(self) -> dict[str, str]:
        """Extra response headers (``Retry-After`` on a 503)."""
        return {}

    def as_reply(self) -> dict[str, Any]:
        """The error as it crosses from the runner to the front."""
        return {"error": type(self).__name__, "status": self.status_code, "message": self.message}

    @classmethod
    def from_fields(cls, message: str, reply: dict[str, Any]) -> IngrainError:
        """This class again, from its ``as_reply`` (subclasses with more fields read them here)."""
        return cls(message)


_BY_NAME["IngrainError"] = IngrainError


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


class StaleModel(Conflict):
    """The front prepared its inputs for another store entry of this model (deleted and stored
    again since): it drops its handle and asks again."""


class TooLarge(IngrainError):
    status_code = 413
    error_type = "invalid_request_error"


class AtCapacity(IngrainError):
    status_code = 503
    error_type = "overloaded_error"


class RetryLater(AtCapacity):
    """A 503 that will pass by itself: the client is told when to send the request again."""

    def __init__(self, message: str, retry_after_s: int = 2) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}

    def as_reply(self) -> dict[str, Any]:
        return {**super().as_reply(), "retry_after_s": self.retry_after_s}

    @classmethod
    def from_fields(cls, message: str, reply: dict[str, Any]) -> IngrainError:
        return cls(message, int(reply.get("retry_after_s", 2)))


class RunnerUnavailable(RetryLater):
    """The model runner does not answer at all (restarting, or unreachable)."""


class ModelStillLoading(RetryLater):
    """The model is being loaded (or restored after a restart) and was not resident in time."""


class UpstreamFailed(IngrainError):
    status_code = 502
    error_type = "upstream_error"


class UpstreamTimeout(IngrainError):
    status_code = 504
    error_type = "upstream_error"


def from_reply(reply: dict[str, Any]) -> IngrainError:
    """The error a runner reply (``IngrainError.as_reply``) describes, as the same class again; a
    reply naming a class this side does not know (a front and runner of different versions) is a
    plain 500 ``IngrainError`` with its message."""
    message = str(reply.get("message", "The model runner failed."))
    return _BY_NAME.get(str(reply.get("error")), IngrainError).from_fields(message, reply)
