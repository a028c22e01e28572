"""A client that stops sending its request body is answered ``408 body_timeout``.

gunicorn's gevent workers bound the wait for a request's headers (``keepalive``) but not for
its body: a client that sends headers and then a few bytes (or none) held its connection, and
the memory set aside for its upload, for as long as it liked; enough of them fill every
worker's connections. Here each read of the body waits at most
``BATCHVISION_API_BODY_TIMEOUT_S`` for the next bytes, as nginx's ``client_body_timeout``
does: a slow but steady upload is not cut, a stalled one is. The timeout is on the socket only
while the body is read (a socket timeout bounds a whole ``sendall``, which would cut a long
answer to a client that reads it slowly but steadily).
"""

from __future__ import annotations

import socket
import ssl
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
    """``wsgi.input`` whose reads wait at most ``seconds`` for each piece of the body, and turn
    the socket's timeout into :class:`BodyTimeout`."""

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
        self.sock.settimeout(self.seconds)  # each recv of the read waits at most this long
        try:
            data = read(arg)
        except TimeoutError as exc:
            # The timeout stays on the socket: gunicorn, reading the rest of the body before it
            # would take a next request, gives up after it too and closes the connection. A
            # plain socket is shut for reading at once (an SSL socket's shutdown would end its
            # TLS session before the answer).
            if not isinstance(self.sock, ssl.SSLSocket):
                try:
                    self.sock.shutdown(socket.SHUT_RD)
                except OSError:  # the client is gone already
                    pass
            raise BodyTimeout(
                f"no byte of the request body arrived for {self.seconds:g} s "
                "(BATCHVISION_API_BODY_TIMEOUT_S): send the body without pausing"
            ) from exc
        self.sock.settimeout(None)  # the answer's writes are not bounded by it
        return data


def init_app(app: Flask, seconds: float) -> None:
    """Give every request served by gunicorn ``seconds`` per read of its body (a request without
    gunicorn's socket, e.g. Flask's test client, is left as it is)."""
    inner = app.wsgi_app

    def timed(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        sock = environ.get(SOCKET_KEY)
        if isinstance(sock, socket.socket):
            environ["wsgi.input"] = TimedInput(environ["wsgi.input"], sock, seconds)
        return inner(environ, start_response)

    app.wsgi_app = timed  # type: ignore[method-assign]
