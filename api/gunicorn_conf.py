"""gunicorn hooks for ``batchvision api``, and gunicorn's own refusals as the API's JSON errors."""

from __future__ import annotations

import json
from typing import Any

from gunicorn import util
from gunicorn.http import wsgi

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


class OneSendResponse(wsgi.Response):
    """gunicorn's response, with the status line and headers sent together with the first body
    bytes: a JSON answer leaves in one ``send`` instead of two. On loopback and in a pod each
    ``send`` runs the receiver's TCP path too; the second one was about a tenth of the API's CPU
    per ``POST /v1/classify``."""

    _head = b""
    headers_sent: bool
    _hold = True  # the headers wait for the body (not for a file sent by sendfile(2))

    def send_headers(self) -> None:
        if self.headers_sent:
            return
        if not self._hold:
            super().send_headers()
            return
        lines = self.default_headers()
        lines.extend(f"{k}: {v}\r\n" for k, v in self.headers)
        self._head = util.to_bytestring("{}\r\n".format("".join(lines)), "latin-1")
        self.headers_sent = True  # committed: a failure from now on closes the connection

    def _send(self, data: bytes = b"") -> None:
        head, self._head = self._head, b""
        if head and len(data) > 1 << 16:  # a large body is not copied behind the headers
            self.sock.sendall(head)
            head = b""
        if head or data:
            self.sock.sendall(head + data)

    def _emit_body(self, data: bytes) -> None:
        self._send(b"%X\r\n%s\r\n" % (len(data), data) if self.chunked else data)

    def sendfile(self, respiter: Any) -> bool:
        self._hold = False
        self._send()
        return bool(super().sendfile(respiter))

    def close(self) -> None:
        self.send_headers()
        self._send(b"0\r\n\r\n" if self.chunked else b"")


# wsgi.create() builds each worker's responses from the module's ``Response``.
wsgi.Response = OneSendResponse


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges must not linger in the multiprocess metrics directory.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
