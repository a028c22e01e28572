"""Errors the client raises."""

from __future__ import annotations

from typing import Any

from batchvision.core.errors import BatchvisionError


class ApiError(BatchvisionError):
    """The API answered with an error document."""

    def __init__(self, status: int, body: dict[str, Any]) -> None:
        err = body.get("error") if isinstance(body, dict) else None
        if not isinstance(err, dict):  # not the API's document: a proxy's, say
            err = {"message": f"HTTP {status}: {err}"} if isinstance(err, str) and err else {}
        super().__init__(
            err.get("message", f"HTTP {status}"),
            code=err.get("code", "http_error"),
            details=err.get("details"),
        )
        self.status = status
        self.retry_after: str | None = None
        #: Whether this answer came to a repeat of a request that may have arrived before.
        self.resent = False


class NoImages(BatchvisionError):
    """A folder upload found no image file to send: no job was created. ``details``: the files
    it skipped, with why."""

    code = "no_images"
