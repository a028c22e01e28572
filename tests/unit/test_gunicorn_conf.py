"""The API's gunicorn responses: the status line and headers leave with the first body bytes,
in one ``send``, and every kind of response still arrives whole and in order."""

from __future__ import annotations

import http.client
import io
import socket
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from gunicorn.config import Config
from gunicorn.http import wsgi

from api.gunicorn_conf import OneSendResponse


@dataclass
class _Req:
    """What a gunicorn response reads of its request."""

    method: str = "GET"
    version: tuple[int, int] = (1, 1)

    def should_close(self) -> bool:
        return False


class _CountingSocket:
    """A real socket that records each ``sendall`` and ``sendfile``, in order."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.calls: list[tuple[str, bytes]] = []

    def sendall(self, data: bytes) -> None:
        self.calls.append(("sendall", bytes(data)))
        self.sock.sendall(data)

    def sendfile(self, file: Any, offset: int = 0, count: int | None = None) -> int:
        file.seek(offset)
        self.calls.append(("sendfile", file.read(count)))
        file.seek(offset)
        return self.sock.sendfile(file, offset, count)


@pytest.fixture
def pair() -> Iterator[tuple[_CountingSocket, socket.socket]]:
    a, b = socket.socketpair()
    yield _CountingSocket(a), b
    a.close()
    b.close()


def _respond(
    sock: _CountingSocket, req: _Req, status: str, headers: list[tuple[str, str]], body: list[bytes]
) -> None:
    resp = OneSendResponse(req, sock, Config())
    resp.start_response(status, headers)
    for item in body:
        resp.write(item)
    resp.close()


def _read(peer: socket.socket, method: str = "GET") -> http.client.HTTPResponse:
    peer.settimeout(5)
    resp = http.client.HTTPResponse(peer, method=method)  # type: ignore[arg-type]
    resp.begin()
    return resp


def test_the_gunicorn_config_installs_the_one_send_response() -> None:
    assert wsgi.Response is OneSendResponse


def test_a_json_answer_is_one_send(pair: tuple[_CountingSocket, socket.socket]) -> None:
    sock, peer = pair
    body = b'{"status": "done"}'
    _respond(
        sock,
        _Req(),
        "200 OK",
        [("Content-Type", "application/json"), ("Content-Length", str(len(body)))],
        [body],
    )
    assert [kind for kind, _ in sock.calls] == ["sendall"]
    assert sock.calls[0][1].startswith(b"HTTP/1.1 200 OK\r\n") and sock.calls[0][1].endswith(body)
    resp = _read(peer)
    assert resp.status == 200 and resp.getheader("Content-Type") == "application/json"
    assert resp.read() == body


def test_a_streamed_answer_is_chunked_whole(pair: tuple[_CountingSocket, socket.socket]) -> None:
    sock, peer = pair
    parts = [b"row 1\n", b"", b"row 2\n", b"row 3\n"]
    _respond(sock, _Req(), "200 OK", [("Content-Type", "application/x-ndjson")], parts)
    # headers with the first chunk; an empty item sends nothing; the last chunk ends it
    assert len(sock.calls) == 4
    assert sock.calls[0][1].endswith(b"\r\n\r\n6\r\nrow 1\n\r\n")
    assert sock.calls[-1][1] == b"0\r\n\r\n"
    resp = _read(peer)
    assert resp.getheader("Transfer-Encoding") == "chunked"
    assert resp.read() == b"row 1\nrow 2\nrow 3\n"


@pytest.mark.parametrize(("method", "status"), [("HEAD", "200 OK"), ("DELETE", "204 No Content")])
def test_an_answer_without_a_body_sends_its_headers(
    pair: tuple[_CountingSocket, socket.socket], method: str, status: str
) -> None:
    sock, peer = pair
    _respond(sock, _Req(method=method), status, [("Content-Length", "0")], [])
    assert [kind for kind, _ in sock.calls] == ["sendall"]
    resp = _read(peer, method)
    assert resp.status == int(status.split()[0]) and resp.read() == b""


def test_a_large_body_is_not_copied_behind_the_headers(pair: tuple[_CountingSocket, socket.socket]) -> None:
    sock, peer = pair
    body = bytes(range(256)) * 1024  # 256 KiB
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
    received = io.BytesIO()
    reader = threading.Thread(target=lambda: received.write(_read(peer).read()))
    reader.start()
    _respond(sock, _Req(), "200 OK", [("Content-Length", str(len(body)))], [body])
    reader.join(10)
    assert [len(data) for _, data in sock.calls][1] == len(body)
    assert received.getvalue() == body


def test_a_file_goes_after_its_headers(pair: tuple[_CountingSocket, socket.socket], tmp_path: Path) -> None:
    sock, peer = pair
    path = tmp_path / "page.html"
    path.write_bytes(b"<html>hello</html>")
    resp = OneSendResponse(_Req(), sock, Config())
    resp.start_response("200 OK", [("Content-Length", str(path.stat().st_size))])
    with path.open("rb") as f:
        resp.write_file(wsgi.FileWrapper(f))
    resp.close()
    assert [kind for kind, _ in sock.calls] == ["sendall", "sendfile"]
    assert sock.calls[0][1].startswith(b"HTTP/1.1 200 OK")
    assert _read(peer).read() == b"<html>hello</html>"
