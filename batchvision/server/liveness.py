"""Workers that died running chunks: their chunks are sent again within seconds.

A worker killed while it runs chunks (``kill -9``, out of memory) holds their messages
unacknowledged; on the Redis broker kombu gives them back only after the visibility timeout (an
hour by default). So each worker process keeps a key alive while it lives (:class:`Liveness`),
records itself as the taker of each chunk it starts (:func:`~batchvision.server.recovery.ledger_started`),
and :class:`Orphans` sends again the chunks whose taker's key lapsed: a few beats after the death
instead of the timeout. Kombu's own redelivery later finds their results stored. RabbitMQ gives
such messages back at once (their connection closed), so there no takers are kept.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from batchvision.server.keys import CHUNK_TAKERS, CHUNKS, TAKERS, worker_alive
from batchvision.server.messages import Chunk
from batchvision.server.recovery import ledger_done, ledger_failed, parse_member
from batchvision.server.store import JobStore
from batchvision.server.text import as_text

log = logging.getLogger(__name__)

#: A worker's liveness key lapses this many beats after its last one.
LAPSE_BEATS = 3
#: The longest pause before a beat that Redis refused is tried again.
RETRY_S = 1.0


def grace_s(beat_s: float) -> float:
    """How long a taker's key must stay missing before its chunks are sent again: half a lapse,
    so that after an outage of Redis (every key gone) each worker beats anew first, and a beat
    tried again after a refusal, or slowed by a socket timeout, still comes in time."""
    return beat_s * LAPSE_BEATS / 2 + 2 * RETRY_S


class Liveness(threading.Thread):
    """Keeps the :func:`~batchvision.server.keys.worker_alive` key of this worker process
    (``worker``: an id of this process alone) while the process lives, and its id in
    :data:`~batchvision.server.keys.TAKERS`: written on :meth:`start` (where Redis takes it;
    else tried again within :data:`RETRY_S`), its expiry pushed back every ``beat_s`` in a
    daemon thread, so it lapses :data:`LAPSE_BEATS` beats after the process died or lost Redis."""

    def __init__(self, client: Any, worker: str, beat_s: float) -> None:
        super().__init__(name="liveness", daemon=True)
        self.client = client
        self.worker = worker
        self.beat_s = beat_s
        self.key = worker_alive(worker)
        self._stopping = threading.Event()
        self._due = 0.0  # when the next beat is (time.monotonic)

    def beat(self) -> None:
        """Push the key's expiry back (``PEXPIRE`` needs no memory: a full Redis takes it);
        write it anew, and this worker into the takers, when it is gone (the first beat, a
        Redis that lost it)."""
        lapse_ms = max(1, round(self.beat_s * LAPSE_BEATS * 1000))
        if not self.client.pexpire(self.key, lapse_ms):
            pipe = self.client.pipeline(transaction=False)
            pipe.sadd(TAKERS, self.worker)
            pipe.set(self.key, "1", px=lapse_ms)
            pipe.execute()

    def start(self) -> None:
        self._try_beat()  # before any chunk names this worker as its taker, where Redis takes it
        super().start()

    def run(self) -> None:
        # On a fixed schedule (a slow beat does not push the next one back); after a refusal
        # (Redis full, restarting, out of reach) the next try comes within RETRY_S.
        while not self._stopping.wait(max(0.0, self._due - time.monotonic())):
            self._try_beat()

    def _try_beat(self) -> None:
        start = time.monotonic()
        try:
            self.beat()
            self._due = start + self.beat_s
        except Exception as exc:  # noqa: BLE001 - Redis away or full: tried again shortly
            log.warning("could not renew this worker's liveness key %s: %s", self.key, exc)
            self._due = start + min(self.beat_s, RETRY_S)

    def stop(self) -> None:
        """Stop beating, and forget this worker's chunks and key: it stops in order, so what
        it ran is finished, or back in its queue (Celery gives back what it holds), or
        published again (parked chunks), and none of it is to be sent once more."""
        self._stopping.set()
        try:
            mine = [m for m, taker in self.client.hscan_iter(CHUNK_TAKERS) if as_text(taker) == self.worker]
            pipe = self.client.pipeline(transaction=False)
            if mine:
                pipe.hdel(CHUNK_TAKERS, *mine)
            pipe.srem(TAKERS, self.worker)
            pipe.delete(self.key)
            pipe.execute()
        except Exception as exc:  # noqa: BLE001 - Redis away: the key lapses, the chunks are resent
            log.warning("could not forget this worker's liveness key %s: %s", self.key, exc)


#: Take one chunk of a dead worker (one sweeper wins it): 1 (its ledger entry stamped anew) while
#: it is in the ledger, 0 when it is not (done meanwhile), -1 when it is no longer that worker's.
#: The stamp is the first write: a full Redis refuses the script before it changes anything.
_TAKE_ORPHAN = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return -1 end
if not redis.call('ZSCORE', KEYS[2], ARGV[1]) then
  redis.call('HDEL', KEYS[1], ARGV[1])
  return 0
end
redis.call('ZADD', KEYS[2], 'XX', ARGV[3], ARGV[1])
redis.call('HDEL', KEYS[1], ARGV[1])
return 1
"""


class Orphans:
    """Sends again the chunks whose taker died while running them (its :class:`Liveness` key
    lapsed) and that still have images without a result; each by one worker (call it from
    the sweeper thread; ``me``: this worker's own id).

    A taker counts as dead once its key has been missing for ``grace_s`` (see
    :func:`grace_s`), never while this worker's own key is missing (Redis lost its keys, or
    this worker was cut off from it), and the wait starts anew after a round that failed (Redis
    away or full). A chunk whose resend fails is marked failed (:func:`resend_failed
    <batchvision.server.recovery.resend_failed>` sends it after a pause)."""

    def __init__(self, store: JobStore, resend: Callable[[Chunk], None], *, me: str, grace_s: float) -> None:
        self.store = store
        self.resend = resend
        self.me = me
        self.grace_s = grace_s
        self._missing: dict[str, float] = {}  # taker -> when its key was first seen missing

    def __call__(self, now: float | None = None) -> int:
        """One round; returns how many chunks were sent again."""
        try:
            return self._round(time.monotonic() if now is None else now)
        except Exception:
            self._missing.clear()  # judged anew once Redis answers again
            raise

    def _round(self, now: float) -> int:
        client = self.store.redis
        others = sorted(as_text(t) for t in client.smembers(TAKERS) if as_text(t) != self.me)
        if not others:
            self._missing.clear()
            return 0
        pipe = client.pipeline(transaction=False)
        for name in [self.me, *others]:
            pipe.exists(worker_alive(name))
        me_alive, *alive = pipe.execute()
        if not me_alive:
            self._missing.clear()  # whatever is missing may be this side's view
            return 0
        missing = {name for name, up in zip(others, alive, strict=True) if not up}
        self._missing = {name: self._missing.get(name, now) for name in missing}
        dead = {name for name, since in self._missing.items() if now - since >= self.grace_s}
        if not dead:
            return 0
        members: dict[str, list[str]] = {name: [] for name in dead}
        for member, taker in client.hscan_iter(CHUNK_TAKERS, count=1000):
            if as_text(taker) in members:
                members[as_text(taker)].append(as_text(member))
        resent = 0
        for name, chunks in members.items():
            resent += self._resend(name, chunks)
            client.srem(TAKERS, name)  # (its chunks are taken: none is left to look for)
            del self._missing[name]
        return resent

    def _resend(self, taker: str, members: Sequence[str]) -> int:
        client, store = self.store.redis, self.store
        resent = 0
        for member in members:
            if int(client.eval(_TAKE_ORPHAN, 2, CHUNK_TAKERS, CHUNKS, member, taker, time.time())) != 1:
                continue
            chunk = parse_member(member)
            if not store.exists(chunk.job_id) or not store.unresolved(chunk.job_id, chunk.indexes):
                done = client.pipeline(transaction=False)
                ledger_done(done, [chunk])
                done.execute()
                continue
            log.warning("re-sending chunk %s: worker %s, which was running it, is gone", member, taker)
            try:
                self.resend(chunk)
            except Exception:  # noqa: BLE001 - the broker away: due again after a pause
                log.exception("could not re-send chunk %s; it is sent again after a pause", member)
                ledger_failed(client, [chunk])
                continue
            resent += 1
        return resent
