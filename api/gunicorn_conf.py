"""gunicorn hooks for ``batchvision api``, and gunicorn's own refusals as the API's JSON errors."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from typing import Any

from gunicorn import glogging, util

from batchvision.core.logs import gunicorn_config

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


class NoAccessLog(glogging.Logger):
    """gunicorn's logger without the access log (``BATCHVISION_API_ACCESS_LOG=false``)."""

    def access(self, resp: Any, req: Any, environ: Any, request_time: Any) -> None:
        return None


# JSON lines from gunicorn itself (error and access logs) with the app's, when asked for.
if os.environ.get("BATCHVISION_LOG_FORMAT") == "json":
    logconfig_dict = gunicorn_config("api")

#: What the master made for this server, removed when it exits.
_MADE: list[str] = []


def on_starting(server: Any) -> None:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # The metrics of all workers are aggregated through files in this directory; it must
        # start empty, so it belongs to this one server (the workers, forked later, inherit it).
        path = tempfile.mkdtemp(prefix="batchvision-metrics-")
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = path
        _MADE.append(path)


def on_exit(server: Any) -> None:
    if getattr(server, "reexec_pid", 0):
        return  # upgraded in place (USR2): the new master and its workers use the directory
    for path in _MADE:
        shutil.rmtree(path, ignore_errors=True)


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges must not linger in the multiprocess metrics directory.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
