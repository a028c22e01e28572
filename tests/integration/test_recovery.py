"""The chunk ledger's sweeper (``batchvision.server.recovery.sweep``) in-process, against a real,
private redis-server: lost chunks are re-sent once, finished ones dropped, nothing is re-sent
while its model's queues still hold messages, and one sweep runs at a time."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import pytest
import redis as redis_lib

from batchvision.core.results import Failure, Prediction
from batchvision.server import keys
from batchvision.server.liveness import Liveness, Orphans
from batchvision.server.messages import Chunk
from batchvision.server.recovery import (
    MAX_RESENDS,
    RESEND_FIRST_S,
    RESEND_MAX_S,
    RESENDS_TTL_S,
    chunk_member,
    ledger_add,
    ledger_done,
    ledger_failed,
    ledger_released,
    ledger_started,
    list_backlog,
    parse_member,
    resend_failed,
    sweep,
)
from batchvision.server.store import JobStore

QUEUES = ("bq", "bq.interactive")
OLD = 600.0  # seconds: older than the sweep's cutoff below
CUTOFF = 60.0


def _ledger(r: redis_lib.Redis, job_id: str, indexes: list[int], age_s: float) -> None:
    pipe = r.pipeline()
    ledger_add(pipe, [Chunk.of(job_id, indexes)], time.time() - age_s)
    pipe.execute()


def _job(store: JobStore, job_id: str, n: int, model: str = "m") -> None:
    store.create(job_id, model=model)
    store.add_files(job_id, [(f"{i}.jpg", f"{i}.jpg") for i in range(n)])
    store.seal(job_id)


@pytest.fixture()
def resends() -> list[tuple[str, list[int]]]:
    return []


def _backlog(store: JobStore) -> Callable[[str | None], bool]:
    return list_backlog(store.redis, lambda model: QUEUES if model in ("m", None) else (f"{model}.q",))


def _sweep(store: JobStore, resends: list[tuple[str, list[int]]]) -> int:
    return sweep(store, _backlog(store), CUTOFF, lambda c: resends.append((c.job_id, list(c.indexes))))


def test_ledger_members_round_trip() -> None:
    assert parse_member(chunk_member(Chunk.of("abc123", [8, 9, 15]))) == Chunk("abc123", (8, 9, 15))


def test_an_old_chunk_with_unresolved_images_is_resent_once(
    store: JobStore, scratch_redis: redis_lib.Redis, resends: list[tuple[str, list[int]]]
) -> None:
    _job(store, "j", 6)
    store.record("j", [(0, Failure("x", "y"))])
    _ledger(scratch_redis, "j", [0, 1, 2], age_s=OLD)  # partly done: a worker died in it
    _ledger(scratch_redis, "j", [3, 4, 5], age_s=1.0)  # young: may still be on its way
    assert _sweep(store, resends) == 1
    assert resends == [("j", [0, 1, 2])]  # the whole chunk; the worker skips what is done
    # Its age restarts: the next sweep leaves it to the re-sent message.
    score = scratch_redis.zscore(keys.CHUNKS, chunk_member(Chunk.of("j", [0, 1, 2])))
    assert score is not None and time.time() - score < CUTOFF
    assert _sweep(store, resends) == 0 and len(resends) == 1
    assert not scratch_redis.exists(keys.SWEEP_LOCK)  # released for the next sweeper


def test_a_chunk_whose_images_are_resolved_is_dropped(
    store: JobStore, scratch_redis: redis_lib.Redis, resends: list[tuple[str, list[int]]]
) -> None:
    _job(store, "j", 2)
    store.record("j", [(0, Prediction("a", 0, 1.0, ())), (1, Prediction("b", 1, 1.0, ()))])
    _ledger(scratch_redis, "j", [0, 1], age_s=OLD)
    _ledger(scratch_redis, "vanished", [0, 1], age_s=OLD)  # its job expired
    assert _sweep(store, resends) == 0
    assert resends == []
    assert scratch_redis.zcard(keys.CHUNKS) == 0


@pytest.mark.parametrize("queue", QUEUES)
def test_nothing_is_resent_while_a_queue_holds_messages(
    store: JobStore, scratch_redis: redis_lib.Redis, resends: list[tuple[str, list[int]]], queue: str
) -> None:
    _job(store, "j", 2)
    _ledger(scratch_redis, "j", [0, 1], age_s=OLD)
    scratch_redis.rpush(queue, "a message that may carry the chunk")
    assert _sweep(store, resends) == 0
    assert resends == []
    assert (
        scratch_redis.zscore(keys.CHUNKS, chunk_member(Chunk.of("j", [0, 1]))) is not None
    )  # kept, not dropped
    scratch_redis.delete(queue)
    assert _sweep(store, resends) == 1  # the same sweep, once the backlog is gone


def test_another_models_backlog_holds_up_only_that_models_chunks(
    store: JobStore, scratch_redis: redis_lib.Redis, resends: list[tuple[str, list[int]]]
) -> None:
    # A message waits for a model nobody serves (or a long bulk run of another model): the
    # lost chunks of every other model are re-sent all the same.
    _job(store, "j", 2)
    _job(store, "k", 2, model="other")
    _ledger(scratch_redis, "j", [0, 1], age_s=OLD)
    _ledger(scratch_redis, "k", [0, 1], age_s=OLD)
    scratch_redis.rpush("other.q", "a message that may carry k's chunk")
    assert _sweep(store, resends) == 1
    assert resends == [("j", [0, 1])]
    scratch_redis.delete("other.q")
    assert _sweep(store, resends) == 1 and resends[-1] == ("k", [0, 1])


def test_more_held_up_chunks_than_a_sweep_takes_at_once_hide_no_other_models_chunk(
    store: JobStore, scratch_redis: redis_lib.Redis, resends: list[tuple[str, list[int]]]
) -> None:
    # 25 old chunks of a backlogged model ahead of one lost chunk of another, with pages of 10:
    # the sweep reads on past them, and leaves them for the backlog.
    _job(store, "held", 50, model="other")
    for i in range(25):
        _ledger(scratch_redis, "held", [2 * i, 2 * i + 1], age_s=OLD + 100 - i)
    _job(store, "j", 2)
    _ledger(scratch_redis, "j", [0, 1], age_s=OLD)
    scratch_redis.rpush("other.q", "a backlog")
    assert (
        sweep(store, _backlog(store), CUTOFF, lambda c: resends.append((c.job_id, list(c.indexes))), limit=10)
        == 1
    )
    assert resends == [("j", [0, 1])]
    assert scratch_redis.zcard(keys.CHUNKS) == 26  # the held-up ones stay, for their backlog


def test_one_sweep_at_a_time(
    store: JobStore, scratch_redis: redis_lib.Redis, resends: list[tuple[str, list[int]]]
) -> None:
    _job(store, "j", 4)
    _ledger(scratch_redis, "j", [0, 1], age_s=OLD)
    _ledger(scratch_redis, "j", [2, 3], age_s=OLD)
    concurrent: list[int] = []

    def resend(chunk: Chunk) -> None:
        # Another worker's sweeper runs while this one is mid-sweep: it must back off.
        concurrent.append(
            sweep(store, _backlog(store), CUTOFF, lambda c: resends.append((c.job_id, list(c.indexes))))
        )
        resends.append((chunk.job_id, list(chunk.indexes)))

    assert sweep(store, _backlog(store), CUTOFF, resend) == 2
    assert concurrent == [0, 0]
    assert sorted(resends) == [("j", [0, 1]), ("j", [2, 3])]  # each once, by the lock holder
    assert not scratch_redis.exists(keys.SWEEP_LOCK)


def test_a_refused_sweep_leaves_the_holders_lock_alone(
    store: JobStore, scratch_redis: redis_lib.Redis, resends: list[tuple[str, list[int]]]
) -> None:
    _job(store, "j", 2)
    _ledger(scratch_redis, "j", [0, 1], age_s=OLD)
    scratch_redis.set(keys.SWEEP_LOCK, "1", ex=60)  # another worker is sweeping
    assert _sweep(store, resends) == 0
    assert resends == []
    assert scratch_redis.exists(keys.SWEEP_LOCK)  # still theirs


def test_a_sweep_that_outlasts_its_lock_leaves_the_next_holders_lock_alone(
    store: JobStore, scratch_redis: redis_lib.Redis, resends: list[tuple[str, list[int]]]
) -> None:
    _job(store, "j", 2)
    _ledger(scratch_redis, "j", [0, 1], age_s=OLD)

    def slow(chunk: Chunk) -> None:
        # The lock expired while this sweep ran, and another worker's sweep took it.
        scratch_redis.set(keys.SWEEP_LOCK, "another-sweeper", ex=60)
        resends.append((chunk.job_id, list(chunk.indexes)))

    assert sweep(store, _backlog(store), CUTOFF, slow) == 1
    assert scratch_redis.get(keys.SWEEP_LOCK) == b"another-sweeper"


def test_a_failed_chunk_is_resent_after_a_doubling_pause_even_behind_a_backlog(
    store: JobStore, scratch_redis: redis_lib.Redis, resends: list[tuple[str, list[int]]]
) -> None:
    _job(store, "j", 3)
    _ledger(scratch_redis, "j", [0, 1, 2], age_s=1.0)
    scratch_redis.rpush(QUEUES[0], "a backlog: the lost-chunk sweep waits, this one does not")
    given_up: list[tuple[Chunk, int]] = []

    def resend_due(now: float) -> int:
        return resend_failed(
            store,
            lambda c: resends.append((c.job_id, list(c.indexes))),
            lambda c, n: given_up.append((c, n)),
            now=now,
        )

    now = 1_000_000.0
    ledger_failed(scratch_redis, [Chunk.of("j", [0, 1, 2])], now=now)  # its task gave up
    assert resend_due(now + RESEND_FIRST_S - 1) == 0 and resends == []  # not yet
    assert resend_due(now + RESEND_FIRST_S) == 1 and resends == [("j", [0, 1, 2])]
    assert resend_due(now + 3600) == 0, "sent once: the resend is now the chunk's message"
    ledger_failed(scratch_redis, [Chunk.of("j", [0, 1, 2])], now=now)  # and failed again
    assert resend_due(now + 2 * RESEND_FIRST_S - 1) == 0
    assert resend_due(now + 2 * RESEND_FIRST_S) == 1 and len(resends) == 2
    # Failing every time: after MAX_RESENDS resends, the images are given up on, once.
    for _ in range(MAX_RESENDS - 2):
        ledger_failed(scratch_redis, [Chunk.of("j", [0, 1, 2])], now=now)
        assert resend_due(now + RESEND_MAX_S) == 1
    ledger_failed(scratch_redis, [Chunk.of("j", [0, 1, 2])], now=now)
    assert resend_due(now + RESEND_MAX_S) == 0 and len(resends) == MAX_RESENDS
    assert given_up == [(Chunk.of("j", [0, 1, 2]), MAX_RESENDS + 1)]
    assert not scratch_redis.exists(keys.chunk_resends(chunk_member(Chunk.of("j", [0, 1, 2])))), "anew"
    # A failed chunk whose images all got results meanwhile is just dropped.
    _job(store, "k", 1)
    store.record("k", [(0, Failure("x", "y"))])
    ledger_failed(scratch_redis, [Chunk.of("k", [0])], now=now)
    assert resend_due(now + RESEND_MAX_S) == 0 and scratch_redis.zcard(keys.FAILED_CHUNKS) == 0


def test_a_failed_chunk_whose_resend_fails_or_meets_a_full_redis_stays_due(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    _job(store, "j", 2)
    member = chunk_member(Chunk.of("j", [0, 1]))
    now = 1_000_000.0
    ledger_failed(scratch_redis, [Chunk.of("j", [0, 1])], now=now)

    def broker_down(chunk: Chunk) -> None:
        raise ConnectionError("the broker refused the message")

    with pytest.raises(ConnectionError):
        resend_failed(store, broker_down, lambda c, n: None, now=now + RESEND_MAX_S)
    # Due again shortly, and the failed resend was not counted.
    assert scratch_redis.zscore(keys.FAILED_CHUNKS, member) is not None
    assert scratch_redis.get(keys.chunk_resends(member)) == b"0"
    # Redis full: the count is refused first, so nothing is taken.
    scratch_redis.config_set("maxmemory", int(scratch_redis.info("memory")["used_memory"]) // 2)
    try:
        with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
            resend_failed(store, lambda c: None, lambda c, n: None, now=time.time() + RESEND_MAX_S)
    finally:
        scratch_redis.config_set("maxmemory", 0)
    assert scratch_redis.zscore(keys.FAILED_CHUNKS, member) is not None
    sent: list[Chunk] = []
    assert resend_failed(store, sent.append, lambda c, n: None, now=time.time() + RESEND_MAX_S) == 1
    assert sent == [Chunk.of("j", [0, 1])] and scratch_redis.zcard(keys.FAILED_CHUNKS) == 0
    # The count is of failures in a row: it lasts an hour past the last one.
    assert 0 < scratch_redis.ttl(keys.chunk_resends(member)) <= RESENDS_TTL_S


def _started(r: redis_lib.Redis, chunk: Chunk, taker: str) -> None:
    pipe = r.pipeline()
    ledger_add(pipe, [chunk], time.time() - 1)
    ledger_started(pipe, [chunk], taker)
    pipe.execute()


def _dead(r: redis_lib.Redis, name: str) -> None:
    """A worker that beat once, then died (its key lapsed)."""
    Liveness(r, name, beat_s=60).beat()
    r.delete(keys.worker_alive(name))


def _orphaned(store: JobStore) -> Chunk:
    """A job of two images whose one chunk a worker that died was running."""
    _job(store, "j", 2)
    _dead(store.redis, "gone")
    chunk = Chunk.of("j", [0, 1])
    _started(store.redis, chunk, "gone")
    return chunk


def _orphans(store: JobStore, resend: Callable[[Chunk], None], grace_s: float = 0.0) -> Orphans:
    Liveness(store.redis, "me", beat_s=60).beat()  # this worker's own key
    return Orphans(store, resend, me="me", grace_s=grace_s)


def test_a_dead_workers_chunks_are_resent_once_and_a_live_ones_are_left_alone(
    store: JobStore, scratch_redis: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    _job(store, "j", 10)
    store.record("j", [(6, Failure("x", "y")), (7, Failure("x", "y")), (8, Failure("x", "y"))])
    sent: list[Chunk] = []
    orphans = _orphans(store, sent.append)
    alive = Liveness(scratch_redis, "w-alive", beat_s=0.5)
    alive.start()
    Liveness(scratch_redis, "w-dying", beat_s=60).beat()
    try:
        _started(scratch_redis, Chunk.of("j", [0, 1, 2]), "w-alive")
        _started(scratch_redis, Chunk.of("j", [3, 4, 5]), "w-dying")
        _started(scratch_redis, Chunk.of("j", [6, 7, 8]), "w-dying")  # its results stored already
        _started(scratch_redis, Chunk.of("j", [9]), "me")  # this worker's own
        assert orphans() == 0 and sent == []  # every key alive
        scratch_redis.delete(keys.worker_alive("w-dying"))  # its key lapsed
        assert orphans() == 1
        assert sent == [Chunk.of("j", [3, 4, 5])]
        assert scratch_redis.hgetall(keys.CHUNK_TAKERS) == {
            chunk_member(Chunk.of("j", [0, 1, 2])).encode(): b"w-alive",
            chunk_member(Chunk.of("j", [9])).encode(): b"me",
        }
        assert scratch_redis.smembers(keys.TAKERS) == {b"me", b"w-alive"}  # the dead one looked after
        # The resent chunk stays in the ledger (its message may be lost too), the done one left it.
        assert scratch_redis.zscore(keys.CHUNKS, chunk_member(Chunk.of("j", [3, 4, 5]))) is not None
        assert scratch_redis.zscore(keys.CHUNKS, chunk_member(Chunk.of("j", [6, 7, 8]))) is None
        assert orphans() == 0 and len(sent) == 1  # once
        # The live worker's thread beats: a key Redis lost is back within a beat.
        scratch_redis.delete(keys.worker_alive("w-alive"))
        wait_until(lambda: scratch_redis.exists(keys.worker_alive("w-alive")), timeout=10, interval=0.05)
    finally:
        alive.stop()
    # A worker that stops forgets its chunks and its key: nothing of it is sent again.
    assert not scratch_redis.exists(keys.worker_alive("w-alive"))
    assert scratch_redis.hkeys(keys.CHUNK_TAKERS) == [chunk_member(Chunk.of("j", [9])).encode()]
    assert scratch_redis.smembers(keys.TAKERS) == {b"me"}


def test_a_missing_key_counts_only_after_the_grace_and_never_while_ones_own_is_missing(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    _orphaned(store)
    sent: list[Chunk] = []
    orphans = _orphans(store, sent.append, grace_s=10.0)
    assert orphans(now=100.0) == 0  # first seen missing
    assert orphans(now=109.0) == 0  # a worker whose Redis came back beats within the grace
    scratch_redis.delete(keys.worker_alive("me"))  # this worker's view: Redis lost the keys
    assert orphans(now=111.0) == 0
    Liveness(scratch_redis, "me", beat_s=60).beat()
    assert orphans(now=112.0) == 0  # judged anew: missing since 112
    assert orphans(now=121.0) == 0
    assert orphans(now=122.0) == 1 and sent == [Chunk.of("j", [0, 1])]


def test_a_full_redis_sends_nothing_and_the_grace_starts_anew(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    _orphaned(store)
    sent: list[Chunk] = []
    orphans = _orphans(store, sent.append, grace_s=10.0)
    assert orphans(now=100.0) == 0
    scratch_redis.config_set("maxmemory", int(scratch_redis.info("memory")["used_memory"]) // 2)
    try:
        # The script's first write is the ledger's stamp: refused before anything changed.
        with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
            orphans(now=111.0)
    finally:
        scratch_redis.config_set("maxmemory", 0)
    assert scratch_redis.hlen(keys.CHUNK_TAKERS) == 1 and sent == []
    assert orphans(now=112.0) == 0  # a live worker refused its beat meanwhile gets the grace again
    assert orphans(now=122.0) == 1 and sent == [Chunk.of("j", [0, 1])]


def test_takers_are_forgotten_when_their_chunks_finish_fail_or_move_on(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    _job(store, "j", 9)
    _dead(scratch_redis, "gone")
    done, failed, moved = Chunk.of("j", [0, 1, 2]), Chunk.of("j", [3, 4, 5]), Chunk.of("j", [6, 7, 8])
    for chunk in (done, failed, moved):
        _started(scratch_redis, chunk, "gone")
    pipe = scratch_redis.pipeline()
    ledger_done(pipe, [done])
    ledger_released(pipe, [moved])  # handed on to another queue: whoever takes it next
    pipe.execute()
    ledger_failed(scratch_redis, [failed])  # resend_failed's, after a pause
    assert scratch_redis.hlen(keys.CHUNK_TAKERS) == 0
    sent: list[Chunk] = []
    assert _orphans(store, sent.append)() == 0 and sent == []
    assert scratch_redis.smembers(keys.TAKERS) == {b"me"}


def test_an_orphan_whose_resend_fails_is_due_again_as_a_failed_chunk(
    store: JobStore, scratch_redis: redis_lib.Redis
) -> None:
    chunk = _orphaned(store)

    def broker_down(c: Chunk) -> None:
        raise ConnectionError("the broker refused the message")

    assert _orphans(store, broker_down)() == 0
    assert scratch_redis.zscore(keys.FAILED_CHUNKS, chunk_member(chunk)) is not None
    assert scratch_redis.hlen(keys.CHUNK_TAKERS) == 0


def test_liveness_survives_a_full_redis(
    scratch_redis: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    live = Liveness(scratch_redis, "w", beat_s=10)
    live.beat()
    late = Liveness(scratch_redis, "late", beat_s=60)  # a worker that starts while Redis is full
    scratch_redis.config_set("maxmemory", int(scratch_redis.info("memory")["used_memory"]) // 2)
    try:
        with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
            scratch_redis.set("anything", "x")
        scratch_redis.pexpire(keys.worker_alive("w"), 10_000)
        live.beat()  # a renewal needs no memory
        assert scratch_redis.pttl(keys.worker_alive("w")) > 25_000
        late.start()  # does not fail: it tries again within a second, not a beat
        assert not scratch_redis.exists(keys.worker_alive("late"))
    finally:
        scratch_redis.config_set("maxmemory", 0)
    try:
        wait_until(lambda: scratch_redis.exists(keys.worker_alive("late")), timeout=10, interval=0.05)
        assert b"late" in scratch_redis.smembers(keys.TAKERS)
    finally:
        late.stop()
