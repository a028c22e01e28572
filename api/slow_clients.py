"""A client that stops sending its request body is answered ``408 body_timeout``.

gunicorn's gevent workers bound the wait for a request's headers (``keepalive``) but not for
its body: a client that sends headers and then a few bytes (or none) held its connection, and
the memory set aside for its upload, for as long as it liked; enough of them fill every
worker's connections. Here each read of the body (and each write of the answer) waits at most
``BATCHVISION_API_BODY_TIMEOUT_S`` for the client, as nginx's ``client_body_timeout`` does:
a slow but steady upload is not cut, a stalled one is.
"""

from __future__ import annotations

import socket
from collections.abc import Callable, Iterable, Iterator
from typing import IO, Any

from flask import Flask

from batchvision.core.errors import BatchvisionError

#: The WSGI environ's key under which gunicorn passes the client's socket.
SOCKET_KEY = "gunicorn.socket"


class BodyTimeout(BatchvisionError):
    """The client sent no byte of its request body for the configured time."""

    status = 408
    code = "body_timeout"


class TimedInput:
    """``wsgi.input`` whose reads turn the socket's timeout into :class:`BodyTimeout`; the
    client's socket is shut for reading then, so that gunicorn closes the connection after the
    answer instead of waiting once more for the rest of the body."""

    def __init__(self, raw: IO[bytes], sock: socket.socket, seconds: float) -> None:
        self.raw = raw
        self.sock = sock
        self.seconds = seconds

    def read(self, size: int | None = -1) -> bytes:
        return self._timed(self.raw.read, size)

    def readline(self, size: int | None = -1) -> bytes:
        return self._timed(self.raw.readline, size)

    def readlines(self, hint: int | None = -1) -> list[bytes]:
        return self._timed(self.raw.readlines, hint)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.readline, b"")

    def _timed(self, read: Callable[[Any], Any], arg: Any) -> Any:
        try:
            return read(arg)
        except TimeoutError as exc:
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:  # the client is gone already
                pass
            raise BodyTimeout(
                f"no byte of the request body arrived for {self.seconds:g} s "
                "(BATCHVISION_API_BODY_TIMEOUT_S): send the body without pausing"
            ) from exc


def init_app(app: Flask, seconds: float) -> None:
    """Give every request served by gunicorn ``seconds`` per read of its body and per write
    of its answer (a request without gunicorn's socket, e.g. Flask's test client, is left as
    it is)."""
    inner = app.wsgi_app

    def timed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        sock = environ.get(SOCKET_KEY)
        if isinstance(sock, socket.socket):
            sock.settimeout(seconds)
            environ["wsgi.input"] = TimedInput(environ["wsgi.input"], sock, seconds)
        return inner(environ, start_response)

    app.wsgi_app = timed  # type: ignore[method-assign]
