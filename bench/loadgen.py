"""A small closed-loop HTTP load generator for the benchmarks (ours and the peers alike).

``concurrency`` client threads each hold one keep-alive HTTP/1.1 connection (``http.client``,
opened before the clock starts) and take units of work from a shared count until ``total`` units
are done. A unit is a function of the connection and the unit's index: one request, or a whole
submit/poll/fetch exchange; its latency is timed around it. Request bodies are prepared in memory
beforehand, so on a 2-core machine the client spends as little CPU as it can next to the server.
Everything talks to 127.0.0.1 only, and every loop is bounded by ``total``.
"""

from __future__ import annotations

import http.client
import json
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

#: ``Outcome.status`` values that are not HTTP statuses: no HTTP answer (connection refused,
#: reset, timed out); answered, but some image got no prediction; a job not final in time.
NO_RESPONSE = 0
NO_PREDICTION = 1
NOT_FINISHED = 2
_LABELS = {NO_RESPONSE: "no response", NO_PREDICTION: "no prediction", NOT_FINISHED: "not finished"}


def status_label(code: int) -> str:
    """``"503"``, or what a non-HTTP outcome code means."""
    return _LABELS.get(code, str(code))


_STALE = (http.client.RemoteDisconnected, ConnectionResetError, BrokenPipeError, ConnectionAbortedError)


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: http.client.HTTPMessage

    def json(self) -> Any:
        return json.loads(self.body)


class Conn:
    """One keep-alive connection to ``host:port``; reconnects once if the server closed it idle."""

    def __init__(self, host: str, port: int, timeout: float) -> None:
        self._conn = http.client.HTTPConnection(host, port, timeout=timeout)
        self._used = False

    def connect(self) -> None:
        self._conn.connect()

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> Response:
        """Send one request and read the whole answer (the connection is then free again)."""
        for attempt in (0, 1):
            try:
                self._conn.request(method, path, body=body, headers=headers or {})
                resp = self._conn.getresponse()
                data = resp.read()
                self._used = True
                return Response(resp.status, data, resp.headers)
            except _STALE:
                self._conn.close()
                # A server may close a keep-alive connection while it is idle: the request never
                # reached it, so one retry on a fresh connection is safe. Anything else counts.
                if attempt or not self._used:
                    raise
        raise AssertionError("unreachable")

    def close(self) -> None:
        self._conn.close()


@dataclass(frozen=True)
class Outcome:
    """What one unit of work ended with: the HTTP status that decided it, images classified."""

    status: int
    images: int = 0


@dataclass
class LoadResult:
    """Per-unit latencies and outcomes of one run, over the wall time of the whole run."""

    elapsed_s: float
    concurrency: int
    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    images: int = 0

    @property
    def units(self) -> int:
        return sum(self.statuses.values())

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0

    @property
    def units_per_s(self) -> float:
        return self.statuses[200] / self.elapsed_s if self.elapsed_s > 0 else 0.0

    def errors(self) -> dict[int, int]:
        """Units that did not end in 200, by status (``0``: no response), 429s included."""
        return {code: n for code, n in sorted(self.statuses.items()) if code != 200}


Unit = Callable[[Conn, int], Outcome]


def run_load(
    host: str, port: int, unit: Unit, total: int, concurrency: int, timeout: float = 120.0
) -> LoadResult:
    """Run ``total`` units on ``concurrency`` client threads, each with its own connection."""
    concurrency = max(1, min(concurrency, total))
    lock = threading.Lock()
    next_index = 0
    result = LoadResult(0.0, concurrency)
    start_line = threading.Barrier(concurrency + 1)

    def client() -> None:
        nonlocal next_index
        conn = Conn(host, port, timeout)
        try:
            try:
                conn.connect()
            except OSError:
                pass  # counted on the first request
            start_line.wait()
            while True:
                with lock:
                    if next_index >= total:
                        return
                    i = next_index
                    next_index += 1
                t0 = time.perf_counter()
                try:
                    out = unit(conn, i)
                except (OSError, http.client.HTTPException):
                    conn.close()
                    out = Outcome(NO_RESPONSE)
                dt = time.perf_counter() - t0
                with lock:
                    result.latencies_s.append(dt)
                    result.statuses[out.status] += 1
                    result.images += out.images
        finally:
            conn.close()

    threads = [threading.Thread(target=client, daemon=True) for _ in range(concurrency)]
    for t in threads:
        t.start()
    start_line.wait()
    start = time.perf_counter()
    for t in threads:
        t.join()
    result.elapsed_s = time.perf_counter() - start
    return result


def multipart(
    field_name: str, files: list[tuple[str, bytes]], content_type: str = "image/jpeg"
) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with one part per file; returns (body, Content-Type)."""
    boundary = uuid.uuid4().hex
    chunks: list[bytes] = []
    for name, data in files:
        chunks.append(
            f'--{boundary}\r\nContent-Disposition: form-data; name="{field_name}"; filename="{name}"\r\n'
            f"Content-Type: {content_type}\r\n\r\n".encode()
        )
        chunks.append(data)
        chunks.append(b"\r\n")
    chunks.append(f"--{boundary}--\r\n".encode())
    return b"".join(chunks), f"multipart/form-data; boundary={boundary}"


def sequential_latencies(host: str, port: int, unit: Unit, n: int, timeout: float = 120.0) -> LoadResult:
    """``n`` units one after the other on one connection (idle latency)."""
    return run_load(host, port, unit, n, 1, timeout)
