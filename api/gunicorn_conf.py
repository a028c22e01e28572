"""gunicorn hooks for ``batchvision api``, and gunicorn's own refusals as the API's JSON errors."""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util

#: The ``code`` of each status gunicorn answers itself, before a request reaches the app.
GUNICORN_CODES = {
    400: "bad_request",
    403: "forbidden",
    414: "request_line_too_long",
    417: "expectation_failed",
    431: "headers_too_large",
    500: "internal_error",
    501: "not_implemented",
}


def write_json_error(sock: Any, status_int: int, reason: str, mesg: str) -> None:
    """Answer a request gunicorn refuses (a request line or headers over its limits, a malformed
    request) with the API's error document, ``{"error": {"code", "message"}}``, instead of
    gunicorn's HTML page."""
    code = GUNICORN_CODES.get(status_int, "bad_request")
    body = json.dumps({"error": {"code": code, "message": mesg or reason}}).encode()
    head = (
        f"HTTP/1.1 {status_int} {reason}\r\nConnection: close\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    )
    util.write_nonblock(sock, head.encode("latin-1") + body)


# Every refusal of gunicorn's workers goes through this one function (Worker.handle_error); the
# master loads this file before it forks them, so each worker has the JSON one.
util.write_error = write_json_error


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges must not linger in the multiprocess metrics directory.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
