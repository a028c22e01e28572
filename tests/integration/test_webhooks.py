"""Completion webhooks with real processes: a receiver on loopback that refuses the
first deliveries with 503, or holds the first one while its worker is killed with SIGKILL, must
end with exactly one accepted delivery carrying a valid signature; a delivery pending while no
worker runs at all is sent once one starts."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest
import redis as redis_lib
import requests

from batchvision.cli.runner import Service
from batchvision.client import Client
from batchvision.core.allow_list import AllowList
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server import keys, webhooks
from batchvision.server.fetch import SafeHTTP
from batchvision.server.keys import JobKeys
from batchvision.server.outputs import output_fields

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = [data for _, data, _ in labelled_files(4, seed=16)]
KEY_A, KEY_B = "key-a-for-webhook-tests", "key-b-for-webhook-tests"


class Server(ThreadingHTTPServer):
    """A loopback test server with a real listen backlog (the default of 5 drops the SYNs of a
    burst of parallel fetches, which then wait out TCP's one-second retransmission)."""

    request_queue_size = 128
    daemon_threads = True


@dataclass
class Delivery:
    headers: dict[str, str]
    body: bytes
    answered: int = 0
    at: float = field(default_factory=time.monotonic)


@dataclass
class Receiver:
    """What the receiver does with each POST (``fail_first`` 503s, or ``hold_first`` until
    ``release``), and what it got."""

    fail_first: int = 0
    retry_after: str | None = None  # sent with each 503
    hold_first: bool = False
    release: threading.Event = field(default_factory=threading.Event)
    got: list[Delivery] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def accepted(self) -> list[Delivery]:
        with self.lock:
            return [d for d in self.got if d.answered == 200]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    receiver = Receiver()

    def log_message(self, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: bytes, ctype: str = "text/plain") -> None:
        self.send_response(status)
        if status == 503 and Handler.receiver.retry_after is not None:
            self.send_header("Retry-After", Handler.receiver.retry_after)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - the images of the jobs
        self._answer(200, IMAGES[int(self.path.rsplit("/", 1)[1].split(".")[0])], "image/jpeg")

    def do_POST(self) -> None:  # noqa: N802 - the webhook
        r = Handler.receiver
        body = self.rfile.read(int(self.headers.get("Content-Length", "0")))
        delivery = Delivery({k.lower(): v for k, v in self.headers.items()}, body)
        with r.lock:
            r.got.append(delivery)
            n = len(r.got)
        if r.hold_first and n == 1:
            r.release.wait(60)
            status = 503
        else:
            status = 503 if n <= r.fail_first else 200
        try:
            self._answer(status, b"ok" if status == 200 else b"try later")
            delivery.answered = status
        except OSError:  # the sender is gone (killed): nothing was accepted
            pass


@pytest.fixture(scope="module")
def receiver_url() -> Iterator[str]:
    httpd = Server(("127.0.0.1", 0), Handler)
    httpd.daemon_threads = True
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()
    httpd.server_close()


class Env:
    """The module's private stack (``start_private_stack`` in ``conftest.py``: its own Redis,
    the API with two keys, workers on demand), a client with key A, and job submission."""

    def __init__(self, stack: Any) -> None:
        self.stack = stack
        self.settings: Settings = stack.settings
        self.url: str = stack.url
        self.client = Client(self.url, api_key=KEY_A)
        self.redis: redis_lib.Redis = stack.store.redis
        self.worker: Callable[[], Service] = stack.worker

    @property
    def workers(self) -> list[Service]:
        workers: list[Service] = self.stack.workers
        return workers

    def submit(self, receiver_url: str, n: int) -> str:
        urls = [f"{receiver_url}/img/{i}.jpg" for i in range(n)]
        return str(self.client.submit_urls(urls, callback_url=f"{receiver_url}/hook").job_id)

    def settled(self, job_id: str) -> bool:
        """The job's delivery is recorded as delivered and no longer owed (nothing sends it
        again): the positive signal that any unwanted extra delivery would have come before."""
        cb = self.client.status(job_id).callback
        return cb is not None and cb.state == "delivered" and self.redis.zscore(keys.WEBHOOKS, job_id) is None


@pytest.fixture(scope="module")
def env(start_private_stack: Callable[..., Any]) -> Env:
    stack = start_private_stack(
        "webhooks",
        api_keys=f"{KEY_A},{KEY_B}",
        fetch_allow="127.0.0.1/32",
        webhook_allow="127.0.0.1/32",  # callbacks have their own allow-list
        webhook_secret="server-secret-of-the-webhook-tests",
        webhook_timeout_s=5.0,  # a delivery's lease: 10 s
        webhook_retry_for_s=120,
    )
    return Env(stack)


def _check_signed(env: Env, delivery: Delivery, job_id: str) -> dict[str, Any]:
    secret = env.client.webhook_secret()
    other = Client(env.url, api_key=KEY_B).webhook_secret()
    assert secret != other
    header = delivery.headers["batchvision-signature"]
    assert webhooks.verify(secret, delivery.body, header)
    assert not webhooks.verify(other, delivery.body, header)  # another key's secret does not fit
    assert delivery.headers["batchvision-delivery"] == job_id
    assert delivery.headers["batchvision-event"] == "job.finished"
    doc = json.loads(delivery.body)
    assert doc["job_id"] == job_id and doc["status_url"].endswith(f"/v1/jobs/{job_id}")
    # The id to deduplicate on is in the signed body: a replay under another header is caught.
    assert doc["delivery_id"] == delivery.headers["batchvision-delivery"]
    return dict(doc)


def test_a_delivery_pending_while_no_worker_runs_is_sent_once_one_starts(
    env: Env, receiver_url: str, wait_until: Callable[..., Any]
) -> None:
    Handler.receiver = Receiver()
    job_id = env.submit(receiver_url, 2)
    assert env.client.status(job_id).callback.state == "waiting"
    env.client.cancel(job_id)  # final now, with no worker anywhere: the delivery waits in Redis
    assert env.redis.zscore(keys.WEBHOOKS, job_id) is not None
    assert env.client.status(job_id).callback.state == "pending"
    env.worker()
    delivered = wait_until(lambda: Handler.receiver.accepted(), timeout=60, message="the pending delivery")
    assert len(delivered) == 1 and len(Handler.receiver.got) == 1
    assert _check_signed(env, delivered[0], job_id)["status"] == "canceled"
    cb = wait_until(
        lambda: (c := env.client.status(job_id).callback).delivered_at and c,
        timeout=10,
        message="delivered_at",
    )
    assert (cb.state, cb.attempts, cb.last_status) == ("delivered", 1, 200)


def test_two_503s_then_exactly_one_accepted_signed_delivery(
    env: Env, receiver_url: str, wait_until: Callable[..., Any]
) -> None:
    Handler.receiver = Receiver(fail_first=2)
    job_id = env.submit(receiver_url, 3)
    status = env.client.wait(job_id, timeout=60, poll_s=0.2)
    assert status.status == "succeeded"
    wait_until(lambda: env.settled(job_id), timeout=30, message="an accepted delivery after two 503s")
    got = Handler.receiver.got
    assert [d.answered for d in got] == [503, 503, 200]
    assert [d.headers["batchvision-attempt"] for d in got] == ["1", "2", "3"]
    for d in got:
        doc = _check_signed(env, d, job_id)
    assert (doc["status"], doc["total"], doc["done"]) == ("succeeded", 3, 3)
    cb = env.client.status(job_id).callback
    assert cb is not None and (cb.state, cb.attempts, cb.last_status) == ("delivered", 3, 200)
    assert cb.delivered_at >= status.finished_at
    assert env.redis.zcard(keys.WEBHOOKS) == 0


def test_worker_killed_mid_delivery_the_delivery_still_arrives_once(
    env: Env, receiver_url: str, wait_until: Callable[..., Any]
) -> None:
    Handler.receiver = Receiver(hold_first=True)
    victim = env.workers[-1]
    job_id = env.submit(receiver_url, 3)
    # The first attempt arrives: the job is final.
    wait_until(lambda: Handler.receiver.got, timeout=60, message="the first delivery attempt")
    assert victim.proc is not None
    victim.proc.send_signal(signal.SIGKILL)  # between completion and a successful delivery
    victim.proc.wait()
    env.workers.remove(victim)
    Handler.receiver.release.set()  # the held attempt ends with 503, to a dead sender
    assert env.client.status(job_id).callback.state == "pending"  # still owed, in Redis
    env.worker()  # picks the delivery up once the dead worker's lease has run out
    delivered = wait_until(
        lambda: Handler.receiver.accepted(), timeout=60, message="the delivery after the kill"
    )
    wait_until(lambda: env.settled(job_id), timeout=30, message="the delivery recorded, no longer owed")
    assert len(Handler.receiver.accepted()) == 1 and len(Handler.receiver.got) == 2
    assert _check_signed(env, delivered[0], job_id)["status"] == "succeeded"
    cb = env.client.status(job_id).callback
    assert cb is not None and (cb.state, cb.last_status) == ("delivered", 200)
    assert env.redis.zcard(keys.WEBHOOKS) == 0


def test_uploads_and_jobs_in_parts_carry_callbacks_and_bad_ones_are_refused(
    env: Env, receiver_url: str, wait_until: Callable[..., Any]
) -> None:
    Handler.receiver = Receiver()
    hook = f"{receiver_url}/hook"
    auth = {"Authorization": f"Bearer {KEY_A}"}
    resp = requests.post(
        f"{env.url}/v1/jobs",
        params={"callback_url": hook},
        files=[("files", ("a.jpg", IMAGES[0], "image/jpeg"))],
        headers=auth,
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    uploaded = resp.json()["job_id"]
    parts = env.client.open_job(1, callback_url=hook).job_id
    env.client.add_part(parts, [("b.jpg", IMAGES[1])])
    env.client.seal(parts)
    wait_until(lambda: len(Handler.receiver.accepted()) == 2, timeout=60, message="both deliveries")
    assert sorted(d.headers["batchvision-delivery"] for d in Handler.receiver.accepted()) == sorted(
        [uploaded, parts]
    )
    for bad, reason in (
        ("http://10.0.0.1/hook", "blocked_address"),
        ("http://[::1]/hook", "blocked_address"),
        ("http://169.254.169.254/", "blocked_address"),
        ("ftp://hooks.example/x", "bad_url"),
    ):
        resp = requests.post(f"{env.url}/v1/jobs", json={"callback_url": bad}, headers=auth, timeout=30)
        assert resp.status_code == 422, resp.text
        err = resp.json()["error"]
        assert err["code"] == "bad_callback_url" and err["details"][0]["reason"] == reason, err


def test_a_503_with_retry_after_is_retried_no_sooner_than_asked(
    env: Env, receiver_url: str, wait_until: Callable[..., Any]
) -> None:
    # The first retry's own backoff is 0.5-1 s: the receiver asks for 4.
    Handler.receiver = Receiver(fail_first=1, retry_after="4")
    job_id = env.submit(receiver_url, 1)
    wait_until(lambda: env.settled(job_id), timeout=60, message="the delivery after the Retry-After")
    first, second = Handler.receiver.got
    assert (first.answered, second.answered) == (503, 200)
    assert second.at - first.at >= 4.0


def test_a_retry_after_past_the_retry_window_ends_the_delivery_as_failed(
    env: Env, receiver_url: str, wait_until: Callable[..., Any]
) -> None:
    # The window is 120 s (the module's WEBHOOK_RETRY_FOR_S): a day's wait cannot be honoured.
    Handler.receiver = Receiver(fail_first=100, retry_after="86400")
    job_id = env.submit(receiver_url, 1)
    cb = wait_until(
        lambda: (c := env.client.status(job_id).callback) and c.state == "failed" and c,
        timeout=60,
        message="the delivery given up",
    )
    assert (cb.attempts, cb.last_status, cb.last_error) == (1, 503, "retry_after_too_late")
    assert env.redis.zscore(keys.WEBHOOKS, job_id) is None  # nothing left to send
    assert len(Handler.receiver.got) == 1


def test_a_webhook_waits_for_its_output_and_goes_without_it_before_the_job_expires(
    scratch_redis: redis_lib.Redis, receiver_url: str
) -> None:
    # The deliverer in-process against a real Redis and the receiver: a job with an output
    # prefix is not sent while its files are written (no attempt counted), then with the output
    # document; one whose output is still pending when the job nears its expiry goes anyway.
    Handler.receiver = Receiver()
    settings = Settings.from_env({}, webhook_allow="127.0.0.1/32", result_ttl_s=3600)
    http = SafeHTTP(AllowList.parse(settings.webhook_allow))
    deliverer = webhooks.Deliverer(scratch_redis, settings, http)
    now = time.time()

    def job(job_id: str, finished: float) -> int:
        fields = {
            **webhooks.callback_fields(f"{receiver_url}/hook", None),
            **output_fields("s3://bucket/out/"),
            **{"created_at": f"{finished - 1:.3f}", "finished_at": f"{finished:.3f}", "total": "1"},
            **{"done": "1", "failed": "0", "canceled": "0", "sealed": "1", "cb_state": "pending"},
        }
        scratch_redis.hset(JobKeys.of(job_id).job, mapping=fields)
        lease = int(now * 1000)
        scratch_redis.zadd(keys.WEBHOOKS, {job_id: lease})
        return lease

    lease = job("j1", now)
    assert deliverer.deliver("j1", lease) == "deferred"
    due = scratch_redis.zscore(keys.WEBHOOKS, "j1")
    assert due is not None and due > now * 1000  # looked at again later
    assert scratch_redis.hget(JobKeys.of("j1").job, "cb_attempts") == b"0" and Handler.receiver.got == []
    scratch_redis.hset(JobKeys.of("j1").job, mapping={"out_state": "written", "out_written_at": f"{now:.3f}"})
    assert deliverer.deliver("j1", int(due)) == "delivered"
    (sent,) = Handler.receiver.accepted()
    assert json.loads(sent.body)["output"]["state"] == "written"

    # Finished 55 minutes ago with a 60-minute result TTL: no more waiting.
    lease = job("j2", now - 3300)
    assert deliverer.deliver("j2", lease) == "delivered"
    assert json.loads(Handler.receiver.accepted()[-1].body)["output"]["state"] == "pending"
