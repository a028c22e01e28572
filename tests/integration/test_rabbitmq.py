"""RabbitMQ as the broker: what only RabbitMQ has. The faults both brokers share
(kill -9, SIGTERM, restarts, outages, poison image, pickle) are in test_reliability.py.

With real processes (marked ``rabbitmq``; a private rabbitmq-server on free ports, Redis, the API,
workers started per test):

- the queues the API declares are durable quorum queues with a delivery limit and dead-lettering;
- the connection between a worker and RabbitMQ is cut mid-batch (a TCP proxy between them
  closes every connection): the unacknowledged messages come back, every image ends with one
  result;
- a message that came back more than the delivery limit ends as per-image ``delivery_limit``
  errors, written by the workers' dead-letter consumer: nothing is lost, nothing doubled;
- a task that fails is dead-lettered (not acknowledged away) and sent again;
- ``batchvision up --broker rabbitmq`` starts its own RabbitMQ and classifies the demo folder.

In-process (no RabbitMQ, the private Redis): what the dead-letter handler decides for each kind
of dead-lettered message.
"""

from __future__ import annotations

import contextlib
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests
from kombu.connection import Connection
from kombu.message import Message

from batchvision.cli.runner import Service
from batchvision.core.results import Prediction
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server import keys
from batchvision.server.blobs import RedisBlobs
from batchvision.server.claims import Claims
from batchvision.server.deadletter import RESENDS_HEADER, DeadLetters
from batchvision.server.keys import JobKeys
from batchvision.server.messages import Chunk
from batchvision.server.queue import (
    CLASSIFY_TASK,
    amqp_backlog,
    create_celery,
    dead_letter_queue,
    dead_letter_queue_object,
    delivery_limit,
    task_queue,
)
from batchvision.server.recovery import MAX_RESENDS, chunk_member, ledger_add
from batchvision.server.routing import interactive_queue
from batchvision.server.store import JobStore
from batchvision.server.telemetry import Telemetry
from batchvision.testing.servers import RabbitMQServer, have_rabbitmq

ROOT = Path(__file__).resolve().parents[2]


class CutProxy:
    """A TCP proxy in front of ``target`` whose :meth:`cut` resets every open connection (both
    sides see the connection die mid-stream, as in a network failure); new connections are
    accepted again at once, so the client may reconnect through it."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = int(self.listener.getsockname()[1])
        self._lock = threading.Lock()
        self._pairs: list[tuple[socket.socket, socket.socket]] = []
        self._closed = False
        self.cuts = 0
        threading.Thread(target=self._accept, name="cut-proxy", daemon=True).start()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            upstream.settimeout(None)
            with self._lock:
                self._pairs.append((client, upstream))
            threading.Thread(target=self._pump, args=(client, upstream), daemon=True).start()

    def _pump(self, a: socket.socket, b: socket.socket) -> None:
        sel = selectors.DefaultSelector()
        sel.register(a, selectors.EVENT_READ, b)
        sel.register(b, selectors.EVENT_READ, a)
        try:
            while True:
                for key, _ in sel.select():
                    data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                    if not data:
                        return
                    key.data.sendall(data)
        except OSError:
            return
        finally:
            sel.close()
            for s in (a, b):
                with contextlib.suppress(OSError):
                    s.close()

    def cut(self) -> int:
        """Reset every connection open now; returns how many were cut."""
        with self._lock:
            pairs, self._pairs = self._pairs, []
        for pair in pairs:
            for s in pair:
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                    s.shutdown(socket.SHUT_RDWR)
                with contextlib.suppress(OSError):
                    s.close()
        self.cuts += 1
        return len(pairs)

    def close(self) -> None:
        self._closed = True
        self.listener.close()
        self.cut()


class Rig:
    """The module's private stack (``start_private_stack`` in ``conftest.py``: Redis, a private
    RabbitMQ node as the broker, the API; workers on demand) and the checks these tests share."""

    def __init__(self, stack: Any, wait_until: Callable[..., Any]) -> None:
        self.stack = stack
        self.settings: Settings = stack.settings
        self.rabbitmq: RabbitMQServer = stack.rabbitmq
        self.url: str = stack.url
        self.store: JobStore = stack.store
        self.redis: redis_lib.Redis = stack.store.redis
        self.wait_until = wait_until

    def worker(self, name: str, failpoints: str = "", broker_url: str = "") -> Service:
        """A worker (not waited for: :meth:`wait_worker`), reaching the broker at ``broker_url``
        when given (a proxy)."""
        env = {"BATCHVISION_BROKER_URL": broker_url} if broker_url else {}
        svc: Service = self.stack.worker(name, failpoints=failpoints, wait=False, **env)
        return svc

    def wait_worker(self, svc: Service, timeout: float = 120) -> None:
        self.stack.wait_ready(svc, timeout)

    def stop_workers(self) -> None:
        self.stack.stop_workers()

    def submit(self, n: int, seed: int) -> str:
        files = [("files", (name, data)) for name, data, _ in labelled_files(n, seed=seed)]
        resp = requests.post(f"{self.url}/v1/jobs", files=files, timeout=30)
        assert resp.status_code == 202, resp.text
        job_id: str = resp.json()["job_id"]
        return job_id

    def status(self, job_id: str) -> dict[str, Any]:
        resp = requests.get(f"{self.url}/v1/jobs/{job_id}", timeout=30)
        assert resp.status_code == 200, resp.text
        status: dict[str, Any] = resp.json()
        return status

    def rows(self, job_id: str) -> list[dict[str, Any]]:
        resp = requests.get(f"{self.url}/v1/jobs/{job_id}/results", params={"format": "json"}, timeout=30)
        assert resp.status_code == 200, resp.text
        body = resp.json()
        rows: list[dict[str, Any]] = body["results"] if isinstance(body, dict) else body
        return rows

    def wait_final(self, job_id: str, timeout: float = 120) -> dict[str, Any]:
        def final() -> dict[str, Any] | None:
            status = self.status(job_id)
            return status if status["status"] in ("succeeded", "partial", "failed", "canceled") else None

        status: dict[str, Any] = self.wait_until(
            final, timeout=timeout, interval=0.2, message=f"{job_id} final"
        )
        return status

    def exactly_once(self, job_id: str, n: int, code: str | None = None) -> None:
        """Every image has one stored result: a classification, or the error ``code``."""
        status = self.wait_final(job_id)
        rows = self.rows(job_id)
        assert [r["index"] for r in rows] == list(range(n))
        if code is None:
            assert (status["done"], status["failed"]) == (n, 0), status
            assert [r["status"] for r in rows] == ["ok"] * n, [r.get("error") for r in rows]
        else:
            assert (status["done"], status["failed"]) == (0, n), status
            assert {r["error"]["code"] for r in rows} == {code}, rows
        assert self.redis.hlen(JobKeys.of(job_id).results) == n
        left = [m for m in self.redis.zrange(keys.CHUNKS, 0, -1) if m.decode().startswith(job_id)]
        assert left == [], "every chunk of the job left the ledger"

    def queues(self) -> dict[str, dict[str, Any]]:
        out = self.rabbitmq.ctl("list_queues", "name", "type", "durable", "messages", "arguments", "-q")
        found = {}
        for line in out.splitlines():
            parts = line.split("\t")
            if len(parts) == 5 and parts[3].isdigit() and not parts[0].startswith("celery"):
                found[parts[0]] = {"type": parts[1], "durable": parts[2], "messages": int(parts[3])}
                found[parts[0]]["arguments"] = parts[4]
        return found

    def amqp(self) -> Connection:
        return Connection(self.settings.broker_url)


@pytest.fixture(scope="module")
def rig(start_private_stack: Callable[..., Any], wait_until: Callable[..., Any]) -> Rig:
    stack = start_private_stack(
        "rabbitmq",
        broker="rabbitmq",
        queue=f"rmq{uuid.uuid4().hex[:6]}",
        max_attempts=2,
        chunk_size=4,
        max_batch_size=4,
        visibility_timeout_s=6,
        task_time_limit_s=5,
        result_ttl_s=600,
    )
    return Rig(stack, wait_until)


@pytest.fixture()
def fresh(rig: Rig) -> Iterator[Rig]:
    """The rig with empty queues, and no worker left running afterwards (it would steal the
    next test's tasks)."""
    s = rig.settings
    with rig.amqp() as conn:
        for queue in (
            task_queue(s, s.queue),
            task_queue(s, interactive_queue(s)),
            dead_letter_queue_object(s),
        ):
            bound = queue(conn.default_channel)
            bound.declare()
            bound.purge()
    yield rig
    rig.stop_workers()


def _take_all(conn: Connection, queue: Any, handle: Callable[[Message], None]) -> int:
    """Get every message of ``queue`` (one at a time, unacknowledged) and ``handle`` it."""
    taken = 0
    while (message := queue(conn.default_channel).get(no_ack=False)) is not None:
        handle(message)
        taken += 1
    return taken


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_a_message_over_the_delivery_limit_ends_as_per_image_errors(fresh: Rig) -> None:
    s = fresh.settings
    job_id = fresh.submit(12, seed=31)  # 3 bulk chunks of 4, no worker yet
    # The API declared the task queues: durable quorum queues, with the delivery limit and
    # dead-lettering (at least once) to the dead-letter queue.
    queues = fresh.queues()
    for name in (s.queue, interactive_queue(s)):
        assert queues[name]["type"] == "quorum" and queues[name]["durable"] == "true", queues
        args = queues[name]["arguments"]
        assert f'{{"x-delivery-limit",{delivery_limit(s)}}}' in args
        assert f'{{"x-dead-letter-routing-key","{dead_letter_queue(s)}"}}' in args
        assert '{"x-dead-letter-strategy","at-least-once"}' in args
    assert amqp_backlog(s, [s.queue]) == 3  # (rabbitmqctl's counts of quorum queues lag)
    # A consumer that dies on these messages before it can count anything (here: gives them
    # back) until RabbitMQ stops delivering them: over the limit, they are dead-lettered.
    returns = 0
    with fresh.amqp() as conn:
        dead = dead_letter_queue_object(s)(conn.default_channel)
        dead.declare()
        for _round in range(delivery_limit(s) + 1):
            returns += _take_all(conn, task_queue(s, s.queue), lambda m: m.requeue())
        assert task_queue(s, s.queue)(conn.default_channel).get() is None
    assert returns == 3 * (delivery_limit(s) + 1)
    assert amqp_backlog(s, [dead_letter_queue(s)]) == 3
    # A worker's dead-letter consumer gives every image of them a delivery_limit error, once.
    w = fresh.worker("rmq-limit")
    fresh.exactly_once(job_id, 12, code="delivery_limit")
    fresh.wait_worker(w)
    assert Telemetry(fresh.redis).pending_images() == 0
    assert amqp_backlog(s, [dead_letter_queue(s)]) == 0
    assert (
        "dead-lettered (delivery_limit): 4 image(s) stored as delivery_limit" in Path(w.log_path).read_text()
    )


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_a_failed_task_is_dead_lettered_and_sent_again(fresh: Rig) -> None:
    s = fresh.settings
    job_id = fresh.submit(12, seed=32)
    # What the worker does with a task that raised: reject it without requeueing (not ack).
    with fresh.amqp() as conn:
        dead_letter_queue_object(s)(conn.default_channel).declare()
        assert _take_all(conn, task_queue(s, s.queue), lambda m: m.reject(requeue=False)) == 3
    w = fresh.worker("rmq-resend")
    fresh.exactly_once(job_id, 12)  # re-sent by the dead-letter consumer, then classified

    # Each of the three is re-sent once. On a slow start the recovery sweeper may re-send a
    # chunk first and the job end before the consumer has logged its own re-send: wait for it.
    def resent() -> str | None:
        log = Path(w.log_path).read_text()
        return log if log.count("re-sending failed task") >= 3 else None

    log = fresh.wait_until(resent, timeout=60, interval=0.2, message="three failed tasks re-sent")
    assert log.count("re-sending failed task") == 3 and "resend 1 of" in log
    # A real failing task: its arguments make the task raise. The worker rejects it, RabbitMQ
    # dead-letters it, and the consumer drops it (no chunk to resolve), saying so.
    app = create_celery(s)
    app.send_task(CLASSIFY_TASK, args=[[[job_id, ["not-an-index"]]], time.time(), False], queue=s.queue)
    app.close()
    fresh.wait_until(
        lambda: "dropping a dead-lettered classify message" in Path(w.log_path).read_text(),
        timeout=60,
        interval=0.2,
        message=f"the dead-letter consumer drops the message: see {w.log_path}",
    )
    assert w.proc is not None and w.proc.poll() is None


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_a_connection_cut_mid_batch_loses_nothing_and_doubles_nothing(fresh: Rig) -> None:
    proxy = CutProxy(("127.0.0.1", fresh.rabbitmq.port))
    try:
        via = fresh.settings.broker_url.replace(f":{fresh.rabbitmq.port}/", f":{proxy.port}/")
        w = fresh.worker("rmq-cut", failpoints="slow-batch=0.3", broker_url=via)
        fresh.wait_worker(w)
        job_id = fresh.submit(48, seed=33)
        fresh.wait_until(lambda: fresh.status(job_id)["done"] >= 8, timeout=120, interval=0.02)
        assert proxy.cut() >= 1  # the worker's connections to RabbitMQ (consumer, pidbox, ...)
        assert fresh.status(job_id)["done"] < 48  # really mid-job
        # RabbitMQ puts the unacknowledged messages back at once; the worker reconnects
        # through the proxy and takes them again (it skips what already has a result).
        fresh.exactly_once(job_id, 48)
        log = Path(w.log_path).read_text()
        assert "Connection to broker lost" in log, log[-3000:]
        assert w.proc is not None and w.proc.poll() is None
    finally:
        proxy.close()


@pytest.mark.rabbitmq
@pytest.mark.slow
def test_the_queue_gauge_counts_rabbitmq_messages(fresh: Rig) -> None:
    """``batchvision_queue_tasks`` (the dashboard's waiting-tasks panel) reads RabbitMQ's queues
    when RabbitMQ is the broker, not the Redis lists, which then stay empty."""
    s = fresh.settings
    api = f"http://127.0.0.1:{s.api_port}"
    files = [("files", (name, data, "image/jpeg")) for name, data, _ in labelled_files(12, seed=5)]
    assert requests.post(f"{api}/v1/jobs", files=files, timeout=30).status_code == 202  # no worker runs

    def gauge() -> float:
        text = requests.get(f"{api}/metrics", timeout=10).text
        rows = [line for line in text.splitlines() if line.startswith("batchvision_queue_tasks")]
        assert rows, text[-2000:]
        return sum(float(line.rsplit(" ", 1)[1]) for line in rows)

    waiting = amqp_backlog(s, [s.queue, interactive_queue(s)])
    assert waiting > 0
    assert gauge() == waiting


def test_up_starts_its_own_rabbitmq(tmp_path: Path, demo_model: Path) -> None:
    if not have_rabbitmq():
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server; make test does)")
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHVISION_")}
    env.update({"BATCHVISION_MODEL": str(demo_model), "BATCHVISION_LOG_FORMAT": "text"})
    cmd = [
        sys.executable,
        "-m",
        "batchvision.cli",
        "up",
        "--broker",
        "rabbitmq",
        "--demo",
        "--exit-after-demo",
    ]
    with open(tmp_path / "up.out", "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
        try:
            code = proc.wait(timeout=400)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            raise
    text = (tmp_path / "up.out").read_text(errors="replace")
    assert code == 0, text[-4000:]
    assert "rabbitmq amqp://batchvision:***@127.0.0.1:" in text, text[-4000:]
    assert ": succeeded, 12 classified, 0 failed" in text, text[-4000:]


# --- the dead-letter handler in-process (no RabbitMQ) ----------------------------------------


class FakeProducer:
    def __init__(self) -> None:
        self.published: list[dict[str, Any]] = []

    def publish(self, body: Any, **kwargs: Any) -> None:
        self.published.append({"body": body, **kwargs})


def _message(chunks: list[list[Any]], reason: str, queue: str, **headers: Any) -> Message:
    body = json.dumps([[chunks, 1.0, False], {}, {"callbacks": None}]).encode()
    x_death = [{"reason": reason, "queue": queue, "count": 1, "exchange": queue, "routing-keys": [queue]}]
    return Message(
        body=body,
        content_type="application/json",
        content_encoding="utf-8",
        headers={"task": CLASSIFY_TASK, "id": "t1", "x-death": x_death, **headers},
        accept={"application/json"},
    )


@pytest.fixture()
def handler(store: JobStore, scratch_redis: redis_lib.Redis) -> DeadLetters:
    s = Settings.from_env({}, queue="dq", redis_url="redis://127.0.0.1:1/0")
    return DeadLetters(
        s, store, Claims(scratch_redis, ttl_s=600), RedisBlobs(scratch_redis, 600), pause=lambda _: None
    )


def _job(store: JobStore, job_id: str, n: int) -> None:
    store.create(job_id, model="m")
    store.add_files(job_id, [(f"{i}.jpg", f"{i}.jpg") for i in range(n)])
    store.seal(job_id)


def test_over_the_limit_every_image_without_a_result_gets_one_error_once(
    handler: DeadLetters, store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    _job(store, "j", 4)
    store.record("j", [(1, Prediction("cat", 0, 1.0, ()))])
    pipe = scratch_redis.pipeline()
    ledger_add(pipe, [Chunk.of("j", [0, 1, 2, 3])], time.time())
    pipe.execute()
    scratch_redis.set(RedisBlobs.key("j", 0), b"x")
    producer = FakeProducer()
    message = _message([["j", [0, 1, 2, 3]]], "delivery_limit", "dq")
    assert handler.handle(message, producer) == "delivery_limit"
    assert handler.handle(message, producer) == "delivery_limit"  # at least once: twice is fine
    rows = {int(k): json.loads(v) for k, v in scratch_redis.hgetall(JobKeys.of("j").results).items()}
    assert sorted(rows) == [0, 1, 2, 3] and rows[1]["label"] == "cat"
    assert {rows[i]["error"]["code"] for i in (0, 2, 3)} == {"delivery_limit"}
    assert store.get("j")["failed"] == 3 and store.is_finished("j")  # type: ignore[index]
    assert scratch_redis.zscore("bv:chunks", chunk_member(Chunk.of("j", [0, 1, 2, 3]))) is None
    # delivery_limit is retryable: image 0's upload stays for a retry of the job (until its
    # blob expires), also after the second, redundant handling.
    assert scratch_redis.exists(RedisBlobs.key("j", 0)) and producer.published == []


def test_a_canceled_or_vanished_job_is_settled_without_errors(handler: DeadLetters, store: JobStore) -> None:
    _job(store, "c", 2)
    store.cancel("c")
    producer = FakeProducer()
    assert handler.handle(_message([["c", [0, 1]], ["gone", [0, 1, 2]]], "delivery_limit", "dq"), producer)
    assert store.unresolved("c", [0, 1]) == [] and store.get("c")["failed"] == 0  # type: ignore[index]
    assert not store.exists("gone") and producer.published == []


def test_a_failed_task_is_resent_then_given_up_as_task_failed(handler: DeadLetters, store: JobStore) -> None:
    _job(store, "f", 2)
    producer = FakeProducer()
    message = _message([["f", [0, 1]]], "rejected", "dq.interactive", **{"x-first-death-reason": "rejected"})
    assert handler.handle(message, producer) == "resent"
    (sent,) = producer.published
    assert sent["routing_key"] == "dq.interactive" and sent["body"] == message.body
    assert sent["headers"][RESENDS_HEADER] == 1 and sent["headers"]["task"] == CLASSIFY_TASK
    assert not [k for k in sent["headers"] if k.startswith("x-")], "a fresh message, no x-death"
    assert store.unresolved("f", [0, 1]) == [0, 1]
    last = _message([["f", [0, 1]]], "rejected", "dq", **{RESENDS_HEADER: MAX_RESENDS})
    assert handler.handle(last, producer) == "task_failed"
    assert len(producer.published) == 1 and store.unresolved("f", [0, 1]) == []


def test_what_is_no_classify_task_is_dropped(handler: DeadLetters) -> None:
    producer = FakeProducer()
    other = Message(
        body=b"{}", content_type="application/json", headers={"task": "other"}, accept={"application/json"}
    )
    pickled = Message(
        body=b"\x80", content_type="application/x-python-serialize", headers={"task": CLASSIFY_TASK}
    )
    broken = _message([["j", ["x"]]], "rejected", "dq")
    assert [handler.handle(m, producer) for m in (other, pickled, broken)] == ["dropped"] * 3
    assert producer.published == []
