"""A safety net under Celery's Redis transport: chunks whose message was lost are re-sent.

Kombu takes a message off the queue with ``BRPOP`` and only then records it as unacknowledged;
a worker killed in between loses that message for good (Redis already removed it, and the
visibility-timeout restore never sees it). So the API records every chunk in a sorted set
(score: when it was sent) *before* publishing it, the worker removes it once the chunk's
results are stored, and a sweeper in every worker re-sends chunks that are older than the
visibility timeout, still have unresolved images, and are no longer anywhere in the queue
(the sweep runs only when the queue list is empty, so a long backlog is never duplicated).
Re-sending is safe: results are idempotent per (job, index).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

from batchvision.server.keys import CHUNKS, SWEEP_LOCK
from batchvision.server.messages import Chunk
from batchvision.server.store import JobStore

log = logging.getLogger(__name__)


def chunk_member(chunk: Chunk) -> str:
    """The chunk's member in the ledger: ``<job>:<i,j,..>``."""
    return f"{chunk.job_id}:{','.join(str(i) for i in chunk.indexes)}"


def parse_member(member: str) -> Chunk:
    job_id, _, rest = member.partition(":")
    return Chunk.of(job_id, [int(i) for i in rest.split(",") if i])


def ledger_add(pipe: Any, chunks: Sequence[Chunk], now: float) -> None:
    """Record chunks about to be published (queued on ``pipe``, a Redis pipeline)."""
    pipe.zadd(CHUNKS, {chunk_member(c): now for c in chunks})


def ledger_started(pipe: Any, chunks: Sequence[Chunk]) -> None:
    """A worker took the chunks: their age now counts from here, so a chunk that waited in a
    long backlog is not mistaken for a lost one while it runs."""
    now = time.time()
    pipe.zadd(CHUNKS, {chunk_member(c): now for c in chunks}, xx=True)


def ledger_done(pipe: Any, chunks: Sequence[Chunk]) -> None:
    """Every image of the chunks has a stored result."""
    if chunks:
        pipe.zrem(CHUNKS, *[chunk_member(c) for c in chunks])


_RELEASE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


def sweep(
    store: JobStore,
    queues: Sequence[str],
    older_than_s: float,
    resend: Callable[[Chunk], None],
    limit: int = 1000,
) -> int:
    """Re-send lost chunks once; returns how many were re-sent."""
    client = store.redis
    if any(client.llen(q) for q in queues):
        return 0  # a backlog: chunks may still be waiting in it
    token = uuid.uuid4().hex
    if not client.set(SWEEP_LOCK, token, nx=True, ex=60):
        return 0  # another worker is sweeping right now
    try:
        cutoff = time.time() - older_than_s
        resent = 0
        for raw in client.zrangebyscore(CHUNKS, "-inf", cutoff, start=0, num=limit):
            member = raw.decode() if isinstance(raw, bytes) else str(raw)
            chunk = parse_member(member)
            if not store.exists(chunk.job_id) or not store.unresolved(chunk.job_id, chunk.indexes):
                client.zrem(CHUNKS, member)
                continue
            log.warning("re-sending chunk %s: its message was lost (worker died while taking it)", member)
            client.zadd(CHUNKS, {member: time.time()}, xx=True)
            resend(chunk)
            resent += 1
        return resent
    finally:
        # Ours only: a sweep that outlasted the lock's 60 s may find another worker's lock.
        client.eval(_RELEASE_IF_OURS, 1, SWEEP_LOCK, token)


class Sweeper(threading.Thread):
    """Runs :func:`sweep` every ``interval_s`` in a daemon thread."""

    def __init__(self, interval_s: float, run: Callable[[], int]) -> None:
        super().__init__(name="chunk-sweeper", daemon=True)
        self.interval_s = interval_s
        self._run_once = run
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self._run_once()
            except Exception:  # noqa: BLE001 - Redis may be restarting; try next round
                log.exception("chunk sweep failed")

    def stop(self) -> None:
        self._stop.set()
