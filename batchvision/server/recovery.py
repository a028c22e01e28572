"""A safety net under Celery's Redis transport: chunks whose message was lost are re-sent.

Kombu takes a message off the queue with ``BRPOP`` and only then records it as unacknowledged;
a worker killed in between loses that message for good (Redis already removed it, and the
visibility-timeout restore never sees it). So the API records every chunk in a sorted set
(score: when it was sent) *before* publishing it, the worker removes it once the chunk's
results are stored, and a sweeper in every worker re-sends chunks that are older than the
visibility timeout, still have unresolved images, and are no longer anywhere in the queue
(a chunk is re-sent only while its model's queues are empty, so a long backlog is never
duplicated; another model's backlog holds nothing up).
Re-sending is safe: results are idempotent per (job, index).

A task that gives up (its own retries spent, or an error it cannot retry) has its message
acknowledged, yet its chunks are not lost: :func:`ledger_failed` marks them due again after a
pause, and :func:`resend_failed` sends them again, backlog or not (they are in no queue), the
pause doubling each time, at most :data:`MAX_RESENDS` times; then their images without a result
get ``task_failed``. It is the Redis counterpart of RabbitMQ's dead-letter queue
(:mod:`batchvision.server.deadletter`). Without it such a chunk waited for the sweep: two
visibility timeouts, and an empty queue. The API marks failed, the same way, the chunks of a
stored job whose publish failed (either broker).

The takers of running chunks (:func:`ledger_started` with ``taker``) are kept for
:mod:`batchvision.server.liveness`, which sends a dead worker's chunks again.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from typing import Any

import redis

from batchvision.core.results import Failure, ImageResult, canceled_result
from batchvision.server.blobs import BlobStore, keep_on, spent_blobs
from batchvision.server.claims import Claims
from batchvision.server.keys import (
    CHUNK_TAKERS,
    CHUNKS,
    FAILED_CHUNKS,
    SWEEP_LOCK,
    UNCONFIRMED_PARTS,
    chunk_resends,
)
from batchvision.server.messages import Chunk, split
from batchvision.server.store import JobStore
from batchvision.server.text import as_text

log = logging.getLogger(__name__)


def chunk_member(chunk: Chunk) -> str:
    """The chunk's member in the ledger: ``<job>:<i,j,..>``."""
    return f"{chunk.job_id}:{','.join(str(i) for i in chunk.indexes)}"


def parse_member(member: str) -> Chunk:
    job_id, _, rest = member.partition(":")
    return Chunk.of(job_id, [int(i) for i in rest.split(",") if i])


def ledger_add(pipe: Any, chunks: Sequence[Chunk], now: float) -> None:
    """Record chunks about to be published (queued on ``pipe``, a Redis pipeline)."""
    if chunks:
        pipe.zadd(CHUNKS, {chunk_member(c): now for c in chunks})


#: How long a part's new indexes may stay unconfirmed before their request counts as failed
#: (the request confirms them one round trip after indexing them; a stalled one may take
#: its socket timeouts and retries).
UNCONFIRMED_GRACE_S = 300.0


def part_member(job_id: str, first: int, last: int) -> str:
    """The member of a part's new indexes ``first..last`` in the unconfirmed parts (written by
    the job store's ``ADD`` script in this form)."""
    return f"{job_id}:{first}:{last}"


def confirm_part(pipe: Any, job_id: str, indexes: Sequence[int]) -> None:
    """Queue on ``pipe``: the part that added ``indexes`` (its new ones, consecutive) has its
    refusals and ledger entries written."""
    if indexes:
        pipe.zrem(UNCONFIRMED_PARTS, part_member(job_id, min(indexes), max(indexes)))


def unconfirm_part(pipe: Any, job_id: str, indexes: Sequence[int], chunks: Sequence[Chunk]) -> None:
    """Queue on ``pipe``: the request that stored ``indexes`` (and recorded ``chunks``) failed
    before it sent them, some of their blobs stored, others not. Their chunks leave the ledger
    and they become an unconfirmed part again (a run of consecutive indexes each), so that
    :func:`recover_parts` sends them once the job is sealed: a re-sent part may still store
    the missing ones, and none waits for the sweep."""
    ledger_done(pipe, chunks)
    runs: list[list[int]] = []
    for index in sorted(indexes):
        if runs and index == runs[-1][-1] + 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    if runs:
        pipe.zadd(UNCONFIRMED_PARTS, {part_member(job_id, run[0], run[-1]): time.time() for run in runs})


def recover_parts(
    store: JobStore,
    resend: Callable[[Chunk], None],
    chunk_size: int,
    older_than_s: float = UNCONFIRMED_GRACE_S,
    limit: int = 100,
) -> int:
    """Send the images of parts whose request failed after indexing them and before writing
    their ledger entries (so nothing was published for them, and no sweep would ever see
    them): each image without a result gets one, classified if a re-sent part stored its
    upload meanwhile, else ``upload_expired``. A part of a job still open waits (looked at
    again ``older_than_s`` later): its client may still send it again, and only the job's seal
    leaves no other way. One worker sends a part (the one that removes it); the ledger entries
    come first, so a worker that dies before sending leaves the part to the sweep. Returns how
    many images were sent."""
    client = store.redis
    sent = 0
    for raw in client.zrangebyscore(
        UNCONFIRMED_PARTS, "-inf", time.time() - older_than_s, start=0, num=limit
    ):
        member = as_text(raw)
        job_id, first, last = member.rsplit(":", 2)
        if store.is_open(job_id):
            client.zadd(UNCONFIRMED_PARTS, {member: time.time()}, xx=True)
            continue
        todo = store.unresolved(job_id, range(int(first), int(last) + 1)) if store.exists(job_id) else []
        chunks = split(job_id, todo, chunk_size)
        if chunks:
            pipe = client.pipeline(transaction=False)
            ledger_add(pipe, chunks, time.time())
            pipe.execute()
        if not client.zrem(UNCONFIRMED_PARTS, member):
            continue  # another worker took it
        if todo:
            log.warning(
                "sending %d images of %s: the request that added them failed half-way", len(todo), member
            )
        for chunk in chunks:
            resend(chunk)
        sent += len(todo)
    return sent


def ledger_started(pipe: Any, chunks: Sequence[Chunk], taker: str | None = None) -> None:
    """A worker took the chunks: their age now counts from here, so a chunk that waited in a
    long backlog is not mistaken for a lost one while it runs. ``taker``: the worker's
    :class:`~batchvision.server.liveness.Liveness` id, so that they are sent again soon after it dies."""
    now = time.time()
    members = {chunk_member(c): now for c in chunks}
    if not members:
        return
    pipe.zadd(CHUNKS, members, xx=True)
    if taker is not None:
        pipe.hset(CHUNK_TAKERS, mapping=dict.fromkeys(members, taker))


def ledger_released(pipe: Any, chunks: Sequence[Chunk]) -> None:
    """The worker that took the chunks sent them on (to another queue, or failed): whichever
    worker takes them next is their taker; until then none is."""
    if chunks:
        pipe.hdel(CHUNK_TAKERS, *[chunk_member(c) for c in chunks])


def ledger_done(pipe: Any, chunks: Sequence[Chunk]) -> None:
    """Every image of the chunks has a stored result."""
    if chunks:
        members = [chunk_member(c) for c in chunks]
        pipe.zrem(CHUNKS, *members)
        pipe.hdel(CHUNK_TAKERS, *members)


#: How many times a failed chunk is sent again before its images get ``task_failed``.
MAX_RESENDS = 10
#: The pause before a failed chunk is sent again: doubled with each resend, up to the cap.
RESEND_FIRST_S = 5.0
RESEND_MAX_S = 300.0
#: How often a worker looks for failed chunks that are due.
FAILED_EVERY_S = 2.0
#: How long a chunk's resend count outlives its last failure: the count is of failures in a
#: row (a chunk fails again within the longest pause, or not at all), and a chunk that
#: finished, then is retried later with its job, starts anew. (Not deleted as chunks finish:
#: that would be one more command on every message's path.)
RESENDS_TTL_S = 3600


def ledger_failed(client: Any, chunks: Sequence[Chunk], now: float | None = None) -> None:
    """A task gave up on ``chunks`` (its message is acknowledged): send them again after a
    pause (:func:`resend_failed`)."""
    if not chunks:
        return
    now = time.time() if now is None else now
    members = [chunk_member(c) for c in chunks]
    counts = client.mget([chunk_resends(m) for m in members])
    pipe = client.pipeline(transaction=False)
    pipe.zadd(
        FAILED_CHUNKS,
        {
            m: now + min(RESEND_MAX_S, RESEND_FIRST_S * 2 ** int(n or 0))
            for m, n in zip(members, counts, strict=True)
        },
    )
    for m, n in zip(members, counts, strict=True):
        if n is not None:  # counted as long as the chunk keeps failing
            pipe.expire(chunk_resends(m), RESENDS_TTL_S)
    ledger_released(pipe, chunks)  # due again in FAILED_CHUNKS: not a dead worker's to resend
    pipe.execute()


#: Take a due failed chunk (one worker wins) and count its resend, in one step. The count goes
#: first: a Redis out of memory refuses it before anything is written (a script is refused at
#: its first write only), so the chunk stays due and is taken on a later round.
_TAKE_FAILED = """
local n = redis.call('INCR', KEYS[2])
if redis.call('ZREM', KEYS[1], ARGV[1]) == 0 then
  if n == 1 then redis.call('DEL', KEYS[2]) else redis.call('DECR', KEYS[2]) end
  return 0
end
redis.call('EXPIRE', KEYS[2], ARGV[2])
return n
"""


def resend_failed(
    store: JobStore,
    resend: Callable[[Chunk], None],
    give_up: Callable[[Chunk, int], None],
    now: float | None = None,
    limit: int = 100,
) -> int:
    """Send again the failed chunks that are due (any worker; each chunk by one); after
    :data:`MAX_RESENDS` resends, ``give_up(chunk, failures)`` instead. Returns how many were
    sent. A chunk whose resend (or giving up) fails is due again after a pause."""
    client = store.redis
    now = time.time() if now is None else now
    sent = 0
    for raw in client.zrangebyscore(FAILED_CHUNKS, "-inf", now, start=0, num=limit):
        member = raw.decode() if isinstance(raw, bytes) else str(raw)
        counter = chunk_resends(member)
        resends = int(client.eval(_TAKE_FAILED, 2, FAILED_CHUNKS, counter, member, RESENDS_TTL_S))
        if not resends:
            continue  # another worker's
        chunk = parse_member(member)
        try:
            if not store.exists(chunk.job_id) or not store.unresolved(chunk.job_id, chunk.indexes):
                pipe = client.pipeline(transaction=False)
                ledger_done(pipe, [chunk])
                pipe.execute()
            elif resends > MAX_RESENDS:
                log.error(
                    "chunk %s failed %d times: its images without a result get task_failed", member, resends
                )
                give_up(chunk, resends)
                client.delete(counter)  # a retry of the job starts anew
            else:
                log.warning(
                    "re-sending chunk %s: its task gave up (resend %d of %d)", member, resends, MAX_RESENDS
                )
                client.zadd(CHUNKS, {member: time.time()}, xx=True)
                resend(chunk)
                sent += 1
        except Exception:
            with contextlib.suppress(Exception):  # (Redis may be what failed: the sweep remains)
                pipe = client.pipeline(transaction=False)
                pipe.decr(counter)
                pipe.zadd(FAILED_CHUNKS, {member: time.time() + RESEND_FIRST_S})
                pipe.execute()
            raise
    return sent


def resolve_chunks(
    store: JobStore, claims: Claims, blobs: BlobStore, chunks: Sequence[Chunk], result: Failure
) -> int:
    """Give every image of ``chunks`` without a result ``result`` (``canceled`` in a canceled
    job), exactly once, and take the chunks off the ledger; returns how many were stored."""
    stored = 0
    for chunk in chunks:
        claim = claims.claim(chunk, f"dead:{chunk.first}")
        outcomes: dict[int, ImageResult] = {}
        if claim is None:  # the job expired or was deleted
            claims.forget(chunk.job_id)
        elif claim.todo:
            outcome = canceled_result() if claim.canceled else result
            outcomes = dict.fromkeys(claim.todo, outcome)
            stored += store.record(chunk.job_id, sorted(outcomes.items())).total
        kept = claim.kept if claim is not None else ()
        spent = spent_blobs(chunk.indexes, outcomes, kept)
        if claim is not None and not blobs.expiring:
            pipe = store.redis.pipeline(transaction=False)
            keep_on(pipe, blobs, chunk.job_id, set(chunk.indexes).difference(spent))
            pipe.execute()
        blobs.delete_many(chunk.job_id, spent)
    pipe = store.redis.pipeline(transaction=False)
    ledger_done(pipe, chunks)
    pipe.execute()
    return stored


_RELEASE_IF_OURS = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


#: At most this many pages of :func:`sweep`'s ``limit`` ledger entries are read in one sweep.
SWEEP_PAGES = 20


def backlog_of(
    queues_of: Callable[[str | None], Sequence[str]], holds: Callable[[Sequence[str]], bool]
) -> Callable[[str | None], bool]:
    """For :func:`sweep`: whether a model's queues (``queues_of(model)``; ``None``: the default
    model) hold messages (``holds(queues)``), asked once per model."""
    known: dict[str | None, bool] = {}

    def backlog(model: str | None) -> bool:
        if model not in known:
            known[model] = holds(queues_of(model))
        return known[model]

    return backlog


def list_backlog(
    client: redis.Redis, queues_of: Callable[[str | None], Sequence[str]]
) -> Callable[[str | None], bool]:
    """:func:`backlog_of` for the Redis broker (its queues are lists)."""
    return backlog_of(queues_of, lambda queues: any(client.llen(q) for q in queues))


def sweep(
    store: JobStore,
    backlog: Callable[[str | None], bool],
    older_than_s: float,
    resend: Callable[[Chunk], None],
    limit: int = 1000,
) -> int:
    """Re-send lost chunks once; returns how many were re-sent. A chunk of a model whose queues
    hold messages (``backlog(model)``) is left alone: it may still be waiting in them. Other
    models' backlogs do not matter (a model nobody serves, a long bulk run of another model)."""
    client = store.redis
    token = uuid.uuid4().hex
    if not client.set(SWEEP_LOCK, token, nx=True, ex=60):
        return 0  # another worker is sweeping right now
    try:
        cutoff = time.time() - older_than_s
        resent = start = 0
        # Page by page: the chunks of a backlogged model stay in the range (skipped), and
        # however many there are, the others behind them are reached (up to a bound per sweep).
        for _ in range(SWEEP_PAGES):
            page = [as_text(m) for m in client.zrangebyscore(CHUNKS, "-inf", cutoff, start=start, num=limit)]
            if not page:
                break
            chunks = [parse_member(member) for member in page]
            routings = store.routings([chunk.job_id for chunk in chunks])
            for member, chunk, routing in zip(page, chunks, routings, strict=True):
                if routing is not None and backlog(routing.model):
                    start += 1  # its model's queues hold messages: it may be among them
                    continue
                if routing is None or not store.unresolved(chunk.job_id, chunk.indexes):
                    client.zrem(CHUNKS, member)  # its job is gone, or it is done
                    continue
                log.warning(
                    "re-sending chunk %s: no message carries it (a worker died while taking it, or a "
                    "publish failed)",
                    member,
                )
                client.zadd(CHUNKS, {member: time.time()}, xx=True)  # out of the range: no shift
                resend(chunk)
                resent += 1
                if resent >= limit:
                    return resent
        return resent
    finally:
        # Ours only: a sweep that outlasted the lock's 60 s may find another worker's lock.
        client.eval(_RELEASE_IF_OURS, 1, SWEEP_LOCK, token)


class Sweeper(threading.Thread):
    """Runs :func:`sweep` (``run``) every ``interval_s``, and ``run_failed``
    (:func:`resend_failed`) every :data:`FAILED_EVERY_S`, in a daemon thread."""

    def __init__(
        self, interval_s: float, run: Callable[[], int], run_failed: Callable[[], int] | None = None
    ) -> None:
        super().__init__(name="chunk-sweeper", daemon=True)
        self.interval_s = interval_s
        self._run_once = run
        self._run_failed = run_failed
        self._stopping = threading.Event()

    def run(self) -> None:
        tick = min(self.interval_s, FAILED_EVERY_S) if self._run_failed else self.interval_s
        last_sweep = time.monotonic()
        while not self._stopping.wait(tick):
            jobs: list[Callable[[], int]] = [self._run_failed] if self._run_failed else []
            if time.monotonic() - last_sweep >= self.interval_s:
                last_sweep = time.monotonic()
                jobs.append(self._run_once)
            for job in jobs:
                try:
                    job()
                except Exception:  # noqa: BLE001 - Redis may be restarting; try next round
                    log.exception("chunk sweep failed")

    def stop(self) -> None:
        self._stopping.set()
