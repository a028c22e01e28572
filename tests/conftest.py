"""What both tiers share: the tier markers, the one polling helper, a hostile HTTP server.

``tests/unit/`` runs in seconds without processes or Redis (``unit/conftest.py``);
``tests/integration/`` starts a real redis-server, worker and API processes (its rigs are in
``integration/conftest.py``). Every test under ``tests/integration/`` is marked ``integration``
here, by its place, so ``-m "not integration"`` is exactly the unit tier. Test modules never
import each other or a conftest (``unit/test_suite_rules.py``): shared helpers are fixtures,
and their API below is stable.

Fixtures (both tiers):

- ``wait_until(condition, timeout=30, interval=0.05, message="")``: the one way to wait. Polls
  ``condition`` until it returns something truthy, returns that value, or fails with
  ``AssertionError`` after ``timeout`` seconds. A negative check ("X never happens") waits with
  it for a positive signal that would come after X (a later marker job, the job's final state),
  never sleeps a fixed time; ``unit/test_suite_rules.py`` refuses hand-rolled deadline loops.
- ``hostile_origin(images, ssl_context=None)``: a hostile HTTP server on loopback, in this
  process, serving ``images`` and every bad answer a URL fetcher must survive (see
  :class:`HostileOrigin`); closed at the end of the requesting module.
- ``png_header_only(width, height)``: a tiny PNG claiming that size (decompression bombs).
"""

from __future__ import annotations

import gzip
import signal
import ssl
import struct
import sys
import threading
import time
import zlib
from collections.abc import Callable, Iterator, Sequence
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol, TypeVar
from urllib.parse import parse_qs, urlsplit

import pytest

TESTS = Path(__file__).resolve().parent
T = TypeVar("T")


def _stop_on_sigterm(signum: int, frame: object) -> None:
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # a second SIGTERM ends the run at once
    raise KeyboardInterrupt(f"signal {signum}")


def pytest_configure(config: pytest.Config) -> None:
    """A SIGTERM (a CI timeout, ``kill``) stops the run as Ctrl-C does: every fixture's teardown
    still runs, so the servers the suite started (Redis, workers, the tier's ``dockerd``) stop
    with it instead of outliving it."""
    if threading.current_thread() is threading.main_thread() and (
        signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    ):
        signal.signal(signal.SIGTERM, _stop_on_sigterm)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    integration = TESTS / "integration"
    for item in items:
        if integration in item.path.parents:
            item.add_marker(pytest.mark.integration)
        if TESTS / "containers" in item.path.parents:
            item.add_marker(pytest.mark.containers)


class WaitUntil(Protocol):
    def __call__(
        self, condition: Callable[[], T], timeout: float = ..., interval: float = ..., message: str = ...
    ) -> T: ...


def _wait_until(
    condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, message: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` passes
    (``AssertionError``). Use it instead of a fixed sleep: a slow machine only waits longer."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout:.1f}s: {message or condition}; last: {value!r}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def wait_until() -> WaitUntil:
    """``wait_until(condition, timeout=30, interval=0.05, message="")``: see :func:`_wait_until`."""
    return _wait_until


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height``: an IHDR and a tiny IDAT, no real pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def png_header_only() -> Callable[[int, int], bytes]:
    """``png_header_only(width, height)``: a tiny PNG claiming that size (decompression bombs)."""
    return _png_header_only


class HostileOrigin(ThreadingHTTPServer):
    """A hostile HTTP server on ``127.0.0.1``: good images and every bad answer.

    ``/ok.jpg``: ``images[0]``; ``/img/<n>.jpg``: ``images[n]``; ``/slow?s=S``: nothing for
    ``S`` seconds (default 3), then an image; ``/drip?s=S``: headers at once, then a byte every
    50 ms for ``S`` seconds (default 10); ``/drip-headers?s=S``: the status line, then a header
    a byte every 50 ms; ``/drip-chunked?s=S``: a chunked body's first size line likewise;
    ``/huge-declared``: a 10 GB ``Content-Length``;
    ``/huge-stream``: no length, 640 MiB of body; ``/page.jpg``: HTML typed ``image/jpeg``;
    ``/text``: ``text/plain``; ``/truncated.jpg``: half of ``images[0]``; ``/gzip.jpg``:
    ``images[0]`` gzip-encoded; ``/redirect?to=URL``: 302 to ``URL``; ``/loop``: 301 to itself;
    ``/status/<code>``: that status; ``/fail/<k>/<code>/<n>.jpg[?after=S]``: that status (with
    ``Retry-After: S``) the first ``k`` times it is asked, ``images[n]`` afterwards (a host that
    was down for a while); anything else: 404.

    ``url`` (``http://127.0.0.1:<port>``), ``address`` (``127.0.0.1:<port>``), ``port``;
    ``seen``: every request as ``(path, Host header)``; ``hits(path)``: how many asked it.
    """

    # A real listen backlog: the default of 5 drops the SYNs of a burst of parallel fetches,
    # which then wait out TCP's one-second retransmission.
    request_queue_size = 128
    daemon_threads = True

    def __init__(self, images: Sequence[bytes], ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(("127.0.0.1", 0), _HostileHandler)
        if ssl_context is not None:
            self.socket = ssl_context.wrap_socket(self.socket, server_side=True)
        self.images = list(images)
        self.seen: list[tuple[str, str]] = []
        self.port = int(self.server_address[1])
        self.address = f"127.0.0.1:{self.port}"
        self.url = f"http://{self.address}"

    def hits(self, path: str) -> int:
        return sum(seen == path for seen, _ in list(self.seen))

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that hangs up mid-answer (a fetcher past its deadline or its size cap, a
        # refused certificate) is what this server is for: no traceback on stderr.
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _HostileHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: HostileOrigin

    def log_message(self, *args: Any) -> None:
        pass

    def _send(self, status: int, body: bytes, ctype: str = "image/jpeg", **headers: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in headers.items():
            self.send_header(k.replace("_", "-"), v)
        self.end_headers()
        self.wfile.write(body)

    def _stream(self, head: bytes, chunks: int, chunk: bytes, every_s: float = 0.0) -> None:
        self.send_response(200)
        self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(head)
        for _ in range(chunks):
            time.sleep(every_s)
            self.wfile.write(chunk)
            self.wfile.flush()

    def _drip(self, seconds: float, byte: bytes) -> None:
        for _ in range(int(seconds / 0.05)):
            self.wfile.write(byte)
            self.wfile.flush()
            time.sleep(0.05)

    def do_GET(self) -> None:  # noqa: N802
        url = urlsplit(self.path)
        q = {k: v[0] for k, v in parse_qs(url.query).items()}
        self.server.seen.append((url.path, self.headers.get("Host", "")))
        self._route(url.path, q)

    def _route(self, path: str, q: dict[str, str]) -> None:
        image = self.server.images[0]
        if path == "/ok.jpg":
            self._send(200, image)
        elif path.startswith("/img/"):
            self._send(200, self.server.images[int(path[5:].split(".")[0])])
        elif path == "/slow":
            time.sleep(float(q.get("s", "3")))
            self._send(200, image)
        elif path == "/drip":
            self._stream(image[:3], int(float(q.get("s", "10")) / 0.05), b"\0", every_s=0.05)
        elif path == "/drip-headers":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nX-Padding: ")
            self._drip(float(q.get("s", "10")), b"a")
        elif path == "/drip-chunked":
            self.wfile.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            self._drip(float(q.get("s", "10")), b"0")  # a chunk-size line that never ends
        elif path == "/huge-declared":
            self.send_response(200)
            self.send_header("Content-Length", str(10**10))
            self.end_headers()
            self.wfile.write(image)
        elif path == "/huge-stream":
            self._stream(image[:-2], 10_000, b"\0" * 65536)
        elif path == "/page.jpg":
            self._send(200, b"<!doctype html><title>not an image</title>" + b" " * 100, "image/jpeg")
        elif path == "/text":
            self._send(200, b"just some text, served as text/plain", "text/plain")
        elif path == "/truncated.jpg":
            self._send(200, image[: len(image) // 2])
        elif path == "/gzip.jpg":
            self._send(200, gzip.compress(image), Content_Encoding="gzip")
        elif path == "/redirect":
            self._send(302, b"", "text/plain", Location=q["to"])
        elif path == "/loop":
            self._send(301, b"", "text/plain", Location="/loop")
        elif path.startswith("/fail/"):
            _, _, times, code, name = path.split("/", 4)
            if self.server.hits(path) <= int(times):
                after = {"Retry_After": q["after"]} if "after" in q else {}
                self._send(int(code), b"try again later", "text/plain", **after)
            else:
                self._send(200, self.server.images[int(name.split(".")[0])])
        elif path.startswith("/status/"):
            self._send(int(path.rsplit("/", 1)[1]), b"nope", "text/plain")
        else:
            self._send(404, b"not here", "text/plain")


class StartHostileOrigin(Protocol):
    def __call__(
        self, images: Sequence[bytes], ssl_context: ssl.SSLContext | None = ...
    ) -> HostileOrigin: ...


@pytest.fixture(scope="module")
def hostile_origin() -> Iterator[StartHostileOrigin]:
    """``hostile_origin(images, ssl_context=None)``: a started :class:`HostileOrigin` (HTTPS with
    ``ssl_context``); every one is shut down when the module ends."""
    started: list[HostileOrigin] = []

    def start(images: Sequence[bytes], ssl_context: ssl.SSLContext | None = None) -> HostileOrigin:
        server = HostileOrigin(images, ssl_context)
        threading.Thread(target=server.serve_forever, name="hostile-origin", daemon=True).start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.shutdown()
        server.server_close()
