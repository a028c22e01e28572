"""Fairness between API keys, with a real API and a real worker: one key floods the worker with
image URLs to a server that accepts connections and never answers, and with jobs whose
callbacks hang; another key's small URL jobs (with callbacks) still finish, and their webhooks
arrive, within a bound far below the timeouts the flood holds its threads and slots for.

The flood is larger than every pool of the worker: more chunks than task threads
(``WORKER_THREADS``), more images than admission places (``MAX_INFLIGHT_IMAGES``), more URLs
than fetch threads. Without the per-key limits (``FETCH_PER_KEY``, ``WEBHOOK_PER_KEY``), without
parking the key's chunks beyond its share (:mod:`batchvision.server.parking`), or with URLs
holding admission places while they are fetched, the flood holds one of those pools for
``FETCH_TIMEOUT_S`` / ``WEBHOOK_TIMEOUT_S`` (90 s), and the small jobs wait at least that long.
"""

from __future__ import annotations

import re
import socket
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server.routing import bulk_queue
from batchvision.testing.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = [data for _, data, _ in labelled_files(4, seed=23)]
FLOOD_KEY, SMALL_KEY = "key-that-floods-the-worker", "key-with-small-jobs"
HOLD_S = 90.0  # the fetch and webhook timeouts the flood holds threads and slots for
BOUND_S = 20.0  # the small jobs' bound


class Server(ThreadingHTTPServer):
    request_queue_size = 128
    daemon_threads = True


class Handler(BaseHTTPRequestHandler):
    """Images at ``/img/<n>.jpg``; ``POST /hang`` never answers (until the test ends);
    ``POST /hook`` records when it came."""

    protocol_version = "HTTP/1.1"
    release = threading.Event()
    hanging = 0
    hooks: dict[str, float] = {}
    lock = threading.Lock()

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802
        self._answer(200, IMAGES[int(self.path.rsplit("/", 1)[1].split(".")[0])], "image/jpeg")

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        if self.path == "/hang":
            with Handler.lock:
                Handler.hanging += 1
            Handler.release.wait(HOLD_S + 30)
            return
        with Handler.lock:
            Handler.hooks[self.headers["Batchvision-Delivery"]] = time.monotonic()
        del body
        self._answer(200, b"ok")


class BlackHole:
    """A TCP server that accepts connections, reads what comes and never sends a byte."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0), backlog=512)
        self.port = self.sock.getsockname()[1]
        self.held: list[socket.socket] = []
        self.accepted = 0
        self.open = 0
        self.most_open = 0
        self.lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with self.lock:
                self.held.append(conn)
                self.accepted += 1
                self.open += 1
                self.most_open = max(self.most_open, self.open)
            threading.Thread(target=self._drain, args=(conn,), daemon=True).start()

    def _drain(self, conn: socket.socket) -> None:
        try:
            while conn.recv(65536):
                pass
        except OSError:
            pass
        with self.lock:
            self.open -= 1

    def close(self) -> None:
        self.sock.close()
        for conn in self.held:
            conn.close()


@pytest.fixture(scope="module")
def servers() -> Iterator[tuple[str, BlackHole]]:
    httpd = Server(("127.0.0.1", 0), Handler)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    hole = BlackHole()
    yield f"http://127.0.0.1:{httpd.server_address[1]}", hole
    Handler.release.set()
    hole.close()
    httpd.shutdown()
    httpd.server_close()


@dataclass
class Stack:
    settings: Settings
    worker: Service


@pytest.fixture(scope="module")
def stack(settings: Settings, artifacts: Path, wait_worker: Callable[[Settings], None]) -> Iterator[Stack]:
    redis = RedisServer().start()
    s = settings.replace(
        redis_url=redis.url,
        api_port=free_port(),
        worker_metrics_port=free_port(),
        api_keys=f"{FLOOD_KEY},{SMALL_KEY}",
        fetch_allow="127.0.0.1/32",
        webhook_allow="127.0.0.1/32",
        fetch_threads=4,
        fetch_per_key=2,
        worker_threads=4,  # fewer than the flood's chunks (chunks of 16 images)
        max_inflight_images=16,  # fewer than the flood's images
        webhook_per_key=2,  # of the deliverer's 4 slots
        fetch_timeout_s=HOLD_S,
        fetch_connect_timeout_s=5.0,
        webhook_timeout_s=HOLD_S,
        interactive_max_images=0,  # every job is bulk work: no lane of its own for the small ones
    )
    logs = artifacts / "fairness"
    logs.mkdir(exist_ok=True)
    env = s.to_env(include_secrets=True)
    sup = Supervisor(
        [
            Service(
                "api",
                cli_argv("api", "--host", "127.0.0.1"),
                env,
                health_url=f"http://127.0.0.1:{s.api_port}/healthz",
                log_path=str(logs / "api.log"),
            ),
            Service(
                "worker",
                cli_argv("worker", "--name", f"fair@{free_port()}"),
                env,
                log_path=str(logs / "worker.log"),
            ),
        ]
    )
    sup.start()
    try:
        sup.wait_healthy(120)
        wait_worker(s)
        yield Stack(s, sup.services[1])
    finally:
        Handler.release.set()
        sup.stop()
        redis.close()


def parked_chunks(metrics_url: str) -> float:
    """The worker's ``batchvision_worker_parked_chunks``."""
    with urllib.request.urlopen(metrics_url, timeout=10) as resp:
        text = resp.read().decode()
    found = re.search(r"^batchvision_worker_parked_chunks (\S+)$", text, re.M)
    assert found, "the worker exports batchvision_worker_parked_chunks"
    return float(found.group(1))


def test_a_flooding_key_does_not_hold_back_another_keys_small_jobs(
    stack: Stack, servers: tuple[str, BlackHole], wait_until: Any
) -> None:
    web, hole = servers
    url = f"http://127.0.0.1:{stack.settings.api_port}"
    flood, small = Client(url, api_key=FLOOD_KEY), Client(url, api_key=SMALL_KEY)
    # The flood: 6 quick jobs whose callbacks hang, then 3 jobs of 60 URLs (12 chunks) to a
    # server that never answers (in this order: the flood's own quick jobs would wait behind its
    # hung fetches).
    for _ in range(6):
        flood.submit_urls([f"{web}/img/0.jpg"], callback_url=f"{web}/hang")
    wait_until(lambda: Handler.hanging >= 2, timeout=120, message="two callbacks hang")
    holes = [f"http://127.0.0.1:{hole.port}/never/{n}.jpg" for n in range(60)]
    for _ in range(3):
        flood.submit_urls(holes)
    wait_until(lambda: hole.open >= 2, timeout=120, message="two fetches hang")
    # The chunks beyond the key's share wait parked, holding no task thread.
    metrics = f"http://127.0.0.1:{stack.settings.worker_metrics_port}/metrics"
    wait_until(lambda: parked_chunks(metrics) >= 8, timeout=60, message="the flood's other chunks are parked")
    # Now the small key: 3 jobs of 3 URLs each, with a callback.
    started = time.monotonic()
    jobs = [
        str(small.submit_urls([f"{web}/img/{i}.jpg" for i in range(3)], callback_url=f"{web}/hook").job_id)
        for _ in range(3)
    ]
    finished: dict[str, float] = {}

    def all_done() -> bool:
        for job in jobs:
            if job not in finished and small.status(job).status.value == "succeeded":
                finished[job] = time.monotonic()
        return len(finished) == len(jobs)

    wait_until(all_done, timeout=HOLD_S * 3, message="the small jobs finish")
    wait_until(lambda: all(j in Handler.hooks for j in jobs), timeout=HOLD_S * 3, message="their webhooks")
    done_s = max(finished.values()) - started
    hooked_s = max(Handler.hooks[j] for j in jobs) - started
    most_open, hanging = hole.most_open, Handler.hanging
    print(
        f"\nfairness: small jobs done in {done_s:.2f} s, webhooks delivered in {hooked_s:.2f} s "
        f"(flood: at most {most_open} fetches held open by the black hole, {hanging} hanging "
        f"callbacks; timeouts {HOLD_S:.0f} s, bound {BOUND_S:.0f} s)"
    )
    assert done_s < BOUND_S and hooked_s < BOUND_S
    # the flood never held more than its share: 2 fetches and 2 deliveries at a time (none of
    # them has timed out yet, so every one it started is still held)
    assert time.monotonic() - started < HOLD_S
    assert most_open <= 2 and hanging <= 2, (most_open, hanging)


def test_a_stopping_worker_sends_its_parked_chunks_back_at_once(stack: Stack, wait_until: Any) -> None:
    """The flood's fetches still hang (a warm shutdown waits for them, up to 90 s): its parked
    chunks go back to their queue when the shutdown begins, for other workers to run."""
    s = stack.settings
    parked = parked_chunks(f"http://127.0.0.1:{s.worker_metrics_port}/metrics")
    assert parked >= 8
    r = redis_lib.Redis.from_url(s.redis_url)
    queue = bulk_queue(s)
    assert r.llen(queue) == 0
    stack.worker.terminate()
    wait_until(lambda: r.llen(queue) >= parked, timeout=30, message="the parked chunks are queued again")
    assert stack.worker.running, "the worker still finishes its running chunks"
