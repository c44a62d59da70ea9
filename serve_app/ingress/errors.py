"""Errors that become JSON responses with a 4xx status instead of a 500."""

from __future__ import annotations


class BadRequest(ValueError):
    """The request (or one task of it) cannot be served as sent."""

    status_code = 400

    def __init__(self, message: str, status_code: int | None = None):
        super().__init__(message)
        if status_code is not None:
            self.status_code = status_code

    @property
    def message(self) -> str:
        return str(self)


class ImageError(BadRequest):
    """A task's image could not be fetched or decoded."""

    status_code = 422


class ServiceUnavailable(Exception):
    """The models cannot take this request now (overloaded, or a replica died twice): answer 503, retry later."""

    def __init__(self, message: str, retry_after_s: int = 10):
        super().__init__(message)
        self.retry_after_s = retry_after_s
