"""Waiting for jobs to finish without a Redis connection (or a thread) per waiting client.

One listener per process subscribes to :data:`~batchvision.server.keys.FINISHED`, on which the
job scripts publish each finished job id, and wakes the local waiters of that job. Pub/sub
delivers at most once and only while subscribed, so a waiter never trusts it alone: it checks
the job itself when it starts waiting (the job may already be done) and again every
``recheck_s`` (a message lost while the listener reconnected costs at most that long).

The first check is skipped for a job whose wait began (:meth:`Waiter.mark`) before the job was
created, while the listener has stayed subscribed since before that mark: every finish of such
a job is then either among the ids the listener heard in the last :data:`RECENT_S` seconds, or
still to come and wakes the waiter. That saves a Redis round trip per ``POST /v1/classify``.

The listener also subscribes to a channel of its own (:attr:`Waiter.channel`): a job created
with it as ``reply_to`` (:meth:`JobStore.create <batchvision.server.store.JobStore.create>`) is
announced there with its rows, which the wait returns (:attr:`Finished.reply`): the request
answers without reading the job again.

Under gunicorn's gevent workers the listener and the waiters are greenlets: thousands of
clients can wait in ``POST /v1/classify`` at the cost of a dictionary entry each.
"""

from __future__ import annotations

import atexit
import logging
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass

import redis

from batchvision.server import keys

log = logging.getLogger(__name__)

#: How long the listener remembers a finished job id (a wait marked longer ago asks Redis).
RECENT_S = 30.0
#: ... and at most this many ids.
RECENT_MAX = 100_000
#: How long rows that came before anyone waited for their job are kept for the wait about to
#: start (its request was between creating the job and waiting when the job finished).
REPLY_KEEP_S = 2.0

_FINISHED = keys.FINISHED.encode()


@dataclass(frozen=True)
class Finished:
    """A wait that saw its job finish; ``reply``: the rows its news carried (``None``: read
    them), for :meth:`JobStore.snapshot <batchvision.server.store.JobStore.snapshot>`."""

    reply: bytes | None = None


class Waiter:
    """Per-process registry of jobs being waited on, fed by one pub/sub listener."""

    def __init__(
        self, client: redis.Redis, is_finished: Callable[[str], bool], *, recheck_s: float = 1.0
    ) -> None:
        self.redis = client
        self.is_finished = is_finished
        self.recheck_s = recheck_s
        #: this waiter's own channel: jobs created with it as ``reply_to`` finish with their rows
        self.channel = keys.reply_channel(uuid.uuid4().hex)
        self._events: dict[str, list[threading.Event]] = {}
        #: job id -> (when heard, the rows its news carried), oldest first: while someone waits
        #: for the job, or for REPLY_KEEP_S
        self._replies: dict[str, tuple[float, bytes]] = {}
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._subscribed = threading.Event()
        self._closed = threading.Event()
        self.subscriptions = 0  # how many times the listener (re)subscribed (tests, logs)
        self.checks = 0  # how many times a wait asked Redis (tests)
        #: job id -> when the listener heard it finish, oldest first
        self._recent: dict[str, float] = {}
        #: since when every finish published is in ``_recent`` (None: not subscribed)
        self._complete_since: float | None = None

    def mark(self) -> float:
        """The start of a wait for a job about to be created: pass it to :meth:`wait` as
        ``since``, so the wait need not ask Redis whether the job already finished."""
        self._ensure_listener()
        return time.monotonic()

    def wait(self, job_id: str, timeout_s: float, since: float | None = None) -> Finished | None:
        """Block until ``job_id`` finishes or ``timeout_s`` passes; ``None`` if it did not
        finish in time.

        ``since``: a :meth:`mark` taken before the job was created."""
        self._ensure_listener()
        event = threading.Event()
        with self._lock:
            self._events.setdefault(job_id, []).append(event)
            heard = job_id in self._recent
            complete = self._complete_since
            early = self._reply(job_id)
        # Heard to finish since the mark: done. Without a mark, the job may have finished
        # before and been retried since (it runs again): ask Redis.
        if heard and since is not None:
            self._done(job_id, event)
            return Finished(early)
        # Every finish since the mark was heard, or is still to come and sets the event.
        trusted = since is not None and complete is not None and complete <= since
        try:
            deadline = time.monotonic() + timeout_s
            while True:
                # Registered before the check: a finish published from now on sets the event.
                if not trusted and self._check(job_id):
                    return Finished()
                trusted = False  # a re-check asks Redis: a message may have been lost since
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                if event.wait(min(left, self.recheck_s)):
                    # The finish was announced: no need to ask Redis again.
                    with self._lock:
                        return Finished(self._reply(job_id))
        finally:
            self._done(job_id, event)

    def _check(self, job_id: str) -> bool:
        self.checks += 1
        return self.is_finished(job_id)

    def _reply(self, job_id: str) -> bytes | None:
        # (Under the lock.)
        kept = self._replies.get(job_id)
        return None if kept is None else kept[1]

    def _done(self, job_id: str, event: threading.Event) -> None:
        with self._lock:
            waiters = self._events.get(job_id, [])
            if event in waiters:
                waiters.remove(event)
            if not waiters:
                self._events.pop(job_id, None)
                self._replies.pop(job_id, None)

    def waiting(self) -> int:
        """How many waits are in progress (for tests and metrics)."""
        with self._lock:
            return sum(len(v) for v in self._events.values())

    def _ensure_listener(self) -> None:
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                if self._thread is None:
                    # Stopped before logging shuts down at exit: a daemon thread that logs
                    # after that (its Redis gone first) prints "--- Logging error ---".
                    atexit.register(self.close)
                self._thread = threading.Thread(target=self._listen, name="job-waiter", daemon=True)
                self._thread.start()
        # The first wait does not race the subscription (a bounded wait: the re-check covers it).
        self._subscribed.wait(self.recheck_s)

    def close(self) -> None:
        """Stop the listener (within its 1 s poll); waits in progress fall back to re-checks."""
        self._closed.set()
        atexit.unregister(self.close)

    def _listen(self) -> None:
        backoff = 0.05
        while not self._closed.is_set():
            pubsub = self.redis.pubsub()  # type: ignore[no-untyped-call, unused-ignore]
            try:
                pubsub.subscribe(keys.FINISHED, self.channel)
                backoff = 0.05
                while not self._closed.is_set():
                    msg = pubsub.get_message(timeout=1.0)
                    if msg is None:
                        continue
                    if msg.get("type") == "message":
                        data = msg["data"]
                        data = data if isinstance(data, bytes) else str(data).encode()
                        job_id, _, reply = data.partition(b"\n")
                        self._wake(job_id.decode(), reply or None)
                    elif msg.get("type") == "subscribe" and msg.get("channel") == _FINISHED:
                        # Confirmed: Redis delivers every publish from now on (on both channels:
                        # one SUBSCRIBE names them, so no publish falls between them).
                        with self._lock:
                            self._recent.clear()
                            self._complete_since = time.monotonic()
                        self.subscriptions += 1
                        self._subscribed.set()
            except Exception as exc:  # noqa: BLE001 - Redis restarts: resubscribe, waiters re-check
                if self._closed.is_set():
                    break
                log.warning("job waiter lost its subscription (%s); resubscribing", exc)
                self._closed.wait(backoff)
                backoff = min(2.0, backoff * 2)
            finally:
                with self._lock:
                    self._complete_since = None
                pubsub.close()

    def _wake(self, job_id: str, reply: bytes | None = None) -> None:
        now = time.monotonic()
        with self._lock:
            waiters = list(self._events.get(job_id, ()))
            if reply is not None:
                self._keep_reply(job_id, reply, now)
            recent = self._recent
            recent.pop(job_id, None)
            recent[job_id] = now
            while recent:
                oldest, at = next(iter(recent.items()))
                if at > now - RECENT_S and len(recent) <= RECENT_MAX:
                    break
                del recent[oldest]
                if self._complete_since is not None:  # a wait marked before this asks Redis
                    self._complete_since = max(self._complete_since, at)
        for event in waiters:
            event.set()

    def _keep_reply(self, job_id: str, reply: bytes, now: float) -> None:
        """(Under the lock.) Keep the rows of ``job_id``'s news for its waits, those in progress
        or one about to start; forget rows kept longer than :data:`REPLY_KEEP_S` that nobody
        waits for."""
        self._replies.pop(job_id, None)
        self._replies[job_id] = (now, reply)
        # Oldest first: the scan stops at the first row young enough (no copy of the whole dict
        # for every finish).
        stale = []
        for old, (at, _) in self._replies.items():
            if at >= now - REPLY_KEEP_S:
                break
            if old not in self._events:
                stale.append(old)
        for old in stale:
            del self._replies[old]
