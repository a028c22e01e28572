"""A TCP proxy that breaks connections on purpose: the network blips the client must survive.

It forwards ``127.0.0.1:<port>`` to a target and counts HTTP/1.1 requests by the direction of
the traffic (the client speaks after the server answered: a new request, also on a kept-alive
connection). Every ``every``-th request meets a fault, in turn (and request ``n`` meets
``faults_at[n]``, when given):

- ``request``: half of what the client sent so far reaches the server, then both sides are
  closed (the server sees a truncated request and does nothing);
- ``response``: the whole request reaches the server, which does the work; the connection is
  closed as its answer starts, so the client never learns the outcome (the case idempotency
  keys exist for);
- ``midway``: the answer is cut after a random number of its bytes: inside the headers or
  the body (an answer with a ``Content-Length`` is always cut short; a streamed one, a result
  file, within its first ``midway_max`` bytes when it is that long).

Used by the tests (``tests/integration/test_client_faults.py``); handy by hand too::

    with FaultProxy(("127.0.0.1", 8000), every=5) as proxy:
        ...  # point a client at proxy.url
"""

from __future__ import annotations

import itertools
import random
import re
import selectors
import socket
import threading
from collections import Counter
from collections.abc import Callable, Mapping
from types import TracebackType

MODES = ("request", "response", "midway")
_STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) ")
_CONTENT_LENGTH = re.compile(rb"\r\ncontent-length:\s*(\d+)\r\n", re.IGNORECASE)


class FaultProxy:
    """Forward to ``target``, breaking every ``every``-th request (0: never)."""

    def __init__(
        self,
        target: tuple[str, int],
        every: int = 7,
        modes: tuple[str, ...] = MODES,
        midway_max: int = 20_000,
        seed: int = 0,
        on_request: Callable[[int, bytes], None] | None = None,
        faults_at: Mapping[int, str] | None = None,
    ) -> None:
        """``on_request(n, head)`` runs in the connection's thread before request ``n`` (its
        first bytes: ``head``) goes on: a test may break something else at that moment."""
        self.faults_at = dict(faults_at or {})
        unknown = (set(modes) | set(self.faults_at.values())) - set(MODES)
        if unknown:
            raise ValueError(f"unknown fault modes {sorted(unknown)}: use {MODES}")
        self.target = target
        self.every = every
        self._modes = itertools.cycle(modes)
        self.midway_max = midway_max
        self.on_request = on_request
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.requests = 0
        #: Faults injected so far, by mode (a ``midway`` cut counts once it happens).
        self.faults: Counter[str] = Counter()
        #: The status codes of the answers the server started, forwarded or not.
        self.statuses: Counter[int] = Counter()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._closed = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepter = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> FaultProxy:
        self._accepter.start()
        return self

    def close(self) -> None:
        self._closed.set()
        self._listener.close()
        self._accepter.join(5)
        for t in self._threads:
            t.join(5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()

    def _next_request(self, head: bytes) -> tuple[str | None, int]:
        """Count a request: the fault it meets, if any, and for ``midway`` where to cut."""
        with self._lock:
            self.requests += 1
            n = self.requests
            fault: tuple[str | None, int] = (None, 0)
            if n in self.faults_at:
                fault = self.faults_at[n], self._random.randint(1, self.midway_max)
            elif self.every and n % self.every == 0:
                fault = next(self._modes), self._random.randint(1, self.midway_max)
        if self.on_request is not None:
            self.on_request(n, head)
        return fault

    def _answer(self, head: bytes, cut_at: int) -> int:
        """Count the status of an answer starting with ``head``; where a midway cut falls."""
        match = _STATUS_LINE.match(head)
        if match:
            with self._lock:
                self.statuses[int(match.group(1))] += 1
        end = head.find(b"\r\n\r\n")
        length = _CONTENT_LENGTH.search(head, 0, end + 2) if end > 0 else None
        if length is not None:
            size = end + 4 + int(length.group(1))
            return 1 + cut_at % max(1, size - 1)  # somewhere before its last byte
        return cut_at

    def _count(self, mode: str) -> None:
        with self._lock:
            self.faults[mode] += 1

    def _accept(self) -> None:
        self._listener.settimeout(0.2)
        while not self._closed.is_set():
            try:
                client, _ = self._listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            t = threading.Thread(target=self._pipe, args=(client,), name="faultproxy-conn", daemon=True)
            self._threads = [x for x in self._threads if x.is_alive()] + [t]
            t.start()

    def _pipe(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(self.target, timeout=10)
        except OSError:
            client.close()  # the server is down: the client sees a closed connection
            return
        sel = selectors.DefaultSelector()
        sel.register(client, selectors.EVENT_READ)
        sel.register(upstream, selectors.EVENT_READ)
        server_spoke = True  # so the client's first bytes count as a request
        fault: str | None = None
        cut_at = answered = 0
        try:
            while not self._closed.is_set():
                for key, _ in sel.select(timeout=0.2):
                    sock = key.fileobj
                    assert isinstance(sock, socket.socket)
                    data = sock.recv(65536)
                    if not data:
                        return
                    if sock is client:
                        if server_spoke:
                            server_spoke = False
                            fault, cut_at = self._next_request(data[:2048])
                            answered = 0
                        if fault == "request":
                            upstream.sendall(data[: len(data) // 2])
                            self._count("request")
                            return
                        upstream.sendall(data)
                    else:
                        if not server_spoke:
                            cut_at = self._answer(data[:4096], cut_at)
                        server_spoke = True
                        if fault == "response":
                            self._count("response")
                            return
                        if fault == "midway" and answered + len(data) >= cut_at:
                            client.sendall(data[: cut_at - answered])
                            self._count("midway")
                            return
                        answered += len(data)
                        client.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            for s in (client, upstream):
                try:
                    s.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
                s.close()
