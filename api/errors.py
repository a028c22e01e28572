"""Every error is JSON: ``{"error": {"code", "message"[, "details"]}}``."""

from __future__ import annotations

import logging

import redis
from flask import Flask, Response, has_request_context, jsonify, request
from kombu.exceptions import OperationalError
from werkzeug.exceptions import HTTPException

from batchvision.core.errors import BatchvisionError, ServiceUnavailable, TooManyRequests, Unauthorized

#: Parts a multipart form may hold beyond BATCHVISION_MAX_FILES_PER_REQUEST files, before
#: werkzeug refuses it (the files themselves are counted, with a clearer error, in uploads.py).
FORM_PARTS_SLACK = 16

log = logging.getLogger(__name__)

#: Seconds a client is asked to wait before retrying a 503.
RETRY_AFTER_S = 5


def error_response(status: int, code: str, message: str, details: object = None) -> Response:
    """The error answer; under ``/v2`` the Open Inference Protocol's shape, ``{"error":
    message}`` (every error there: routing, authentication, a full store, a crash)."""
    body: dict[str, object] = {"code": code, "message": message}
    if details is not None:
        body["details"] = details
    resp = jsonify({"error": message if _inference_protocol() else body})
    resp.status_code = status
    return resp


def _inference_protocol() -> bool:
    return has_request_context() and (request.path == "/v2" or request.path.startswith("/v2/"))


def register(app: Flask) -> None:
    """Install the JSON error handlers."""

    @app.errorhandler(BatchvisionError)
    def _domain(exc: BatchvisionError) -> Response:
        resp = error_response(exc.status, exc.code, exc.message, exc.details)
        if isinstance(exc, TooManyRequests):
            resp.headers["Retry-After"] = str(exc.retry_after)
        elif isinstance(exc, ServiceUnavailable) or exc.status == 503:
            # Every 503 is a wait (the store throttling or unreachable too): say how long.
            resp.headers["Retry-After"] = str(RETRY_AFTER_S)
        if isinstance(exc, Unauthorized):
            resp.headers["WWW-Authenticate"] = 'Bearer realm="batchvision"'
        return resp

    @app.errorhandler(HTTPException)
    def _http(exc: HTTPException) -> Response:
        code = (exc.name or "error").lower().replace(" ", "_")
        message = exc.description or exc.name
        if exc.code == 413:
            limit = app.config["MAX_CONTENT_LENGTH"]
            if request.mimetype != "multipart/form-data" or (request.content_length or 0) > limit:
                message = f"the request is larger than the limit of {limit} bytes"
            else:  # werkzeug's form parser: a count of parts, or a text field's size
                files = app.config["MAX_FORM_PARTS"] - FORM_PARTS_SLACK
                message = (
                    f"the multipart form holds more parts than a request may ({files} files, "
                    f"BATCHVISION_MAX_FILES_PER_REQUEST), or a text field over "
                    f"{app.config['MAX_FORM_MEMORY_SIZE']} bytes: send the files in several requests"
                )
        resp = error_response(exc.code or 500, code, message)
        for name, value in exc.get_headers():  # e.g. Allow on a 405 (RFC 9110)
            if name.lower() != "content-type":
                resp.headers[name] = value
        return resp

    @app.errorhandler(redis.exceptions.ConnectionError)
    @app.errorhandler(redis.exceptions.TimeoutError)
    @app.errorhandler(OperationalError)
    def _unavailable(exc: Exception) -> Response:
        log.warning("backend unavailable: %s %s: %s", request.method, request.path, exc)
        what = "the broker (the task queue)" if isinstance(exc, OperationalError) else "the job store (Redis)"
        resp = error_response(503, "unavailable", f"{what} is unreachable; retry later")
        resp.headers["Retry-After"] = str(RETRY_AFTER_S)
        return resp

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception) -> Response:
        if out_of_memory(exc):
            # Redis refuses writes at maxmemory (noeviction) until workers drain the queue: a
            # wait, not a fault, so the client retries it like any other 503.
            log.warning("job store full: %s", exc)
            resp = error_response(503, "store_full", "the job store (Redis) is full; retry later")
            resp.headers["Retry-After"] = str(RETRY_AFTER_S)
            return resp
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")


def out_of_memory(exc: BaseException) -> bool:
    """Whether Redis refused a write for want of memory: a command's ``OutOfMemoryError``, or a
    Lua script's error that carries the refusal of a write inside it (a plain ``ResponseError``)."""
    if isinstance(exc, redis.exceptions.OutOfMemoryError):
        return True
    return isinstance(exc, redis.exceptions.ResponseError) and "OOM command not allowed" in str(exc)
