"""Clients that send their request body slowly, against a real API process (gunicorn, gevent):
one that stalls gets ``408 body_timeout`` and its connection closed, and nothing of its request
is stored; one that sends steadily, with pauses shorter than the limit, is served however long
the whole body takes."""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any
from urllib.parse import urlsplit

import pytest
import requests

from batchvision.core.synthetic import labelled_files

pytestmark = [pytest.mark.integration]

LIMIT_S = 2.0


@pytest.fixture(scope="module")
def api(api_alone: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    with api_alone(api_body_timeout_s=LIMIT_S) as alone:
        yield alone


def _head(url: str, path: str, length: int, *, close: bool = False) -> tuple[tuple[str, int], bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    lines = [
        f"POST {path} HTTP/1.1",
        f"Host: {host}:{port}",
        "Content-Type: image/png",
        f"Content-Length: {length}",
        *(["Connection: close"] if close else []),
    ]
    return (host, port), ("\r\n".join(lines) + "\r\n\r\n").encode()


def _answer(sock: socket.socket) -> tuple[int, dict[str, Any]]:
    """Read until the server closes the connection (the 30 s socket timeout fails the test if
    it never does): the status and the JSON body."""
    data = b""
    while chunk := sock.recv(65536):
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split(b" ", 2)[1]), json.loads(body)


def _jobs(api: Any) -> set[str]:
    return {job["job_id"] for job in requests.get(f"{api.url}/v1/jobs", timeout=30).json()["jobs"]}


def test_a_stalled_body_is_answered_408_and_its_connection_closed(api: Any) -> None:
    before = _jobs(api)
    address, head = _head(api.url, "/v1/jobs", 50_000)
    with socket.create_connection(address, timeout=30) as sock:
        # HTTP/1.1 keeps a connection open by default: only the stall closes this one.
        sock.sendall(head + b"\x89PNG" + b"\0" * 96)
        status, doc = _answer(sock)
    assert status == 408, doc
    error = doc["error"]
    assert error["code"] == "body_timeout" and "BATCHVISION_API_BODY_TIMEOUT_S" in error["message"], error
    # Nothing of the cut request was kept, and the API serves the next one.
    assert _jobs(api) == before
    assert requests.get(f"{api.url}/healthz", timeout=30).status_code == 200


def test_a_slow_but_steady_body_is_served(api: Any) -> None:
    before = _jobs(api)
    _, data, _ = next(iter(labelled_files(1, seed=3, fmt="PNG")))
    pieces = 12
    size = -(-len(data) // pieces)
    address, head = _head(api.url, "/v1/jobs", len(data), close=True)
    with socket.create_connection(address, timeout=30) as sock:
        sock.sendall(head)
        started = time.monotonic()
        for i in range(0, len(data), size):
            time.sleep(LIMIT_S / 8)  # well within the limit between two pieces
            sock.sendall(data[i : i + size])
        took = time.monotonic() - started
        status, doc = _answer(sock)
    # The whole body took longer than the limit: what is limited is the pause, not the total.
    assert took > LIMIT_S
    assert status == 202 and doc["accepted"] == 1, doc
    assert _jobs(api) - before == {doc["job_id"]}
