"""One error hierarchy, mapped to HTTP statuses by the API and to per-image errors by workers."""

from __future__ import annotations

from typing import Any


class BatchvisionError(Exception):
    """Base error: a stable ``code`` for machines, a ``message`` for people."""

    status = 500
    code = "internal_error"

    def __init__(self, message: str, *, code: str | None = None, details: Any = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        self.details = details


class InvalidImage(BatchvisionError):
    """An upload that is not an image we accept (format, truncation, limits)."""

    status = 422
    code = "invalid_image"


class ImageTooLarge(InvalidImage):
    """Over the byte or pixel limit (also decompression bombs)."""

    status = 413
    code = "image_too_large"


class BadRequest(BatchvisionError):
    status = 400
    code = "bad_request"


class UnsupportedMediaType(BatchvisionError):
    status = 415
    code = "unsupported_media_type"


class NotFound(BatchvisionError):
    status = 404
    code = "not_found"


class Gone(BatchvisionError):
    status = 410
    code = "gone"


class Conflict(BatchvisionError):
    status = 409
    code = "conflict"


class TooManyRequests(BatchvisionError):
    status = 429
    code = "too_many_requests"

    def __init__(self, message: str, *, retry_after: int = 5, **kw: Any) -> None:
        super().__init__(message, **kw)
        self.retry_after = retry_after


class Unauthorized(BatchvisionError):
    status = 401
    code = "unauthorized"


class ServiceUnavailable(BatchvisionError):
    status = 503
    code = "unavailable"


class BatchError(BatchvisionError):
    """A model call failed: every image in that batch gets this error."""

    code = "inference_failed"


class OverQuota(BatchvisionError):
    """A request larger than a queue limit allows even when the queue is empty (``413``): no
    wait would let it in, so it is not a ``429``."""

    status = 413
    code = "over_quota"
