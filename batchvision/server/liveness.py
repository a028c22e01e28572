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

from batchvision.server.keys import CHUNK_TAKERS, CHUNKS, worker_alive
from batchvision.server.messages import Chunk
from batchvision.server.recovery import ledger_done, ledger_failed, parse_member
from batchvision.server.store import JobStore
from batchvision.server.text import as_text

log = logging.getLogger(__name__)


#: A worker's liveness key lapses this many beats after its last one.
LAPSE_BEATS = 3


class Liveness(threading.Thread):
    """Keeps the :func:`~batchvision.server.keys.worker_alive` key of this worker process
    (``worker``: an id of this process alone) while the process lives: written on
    :meth:`start`, its expiry pushed back every ``beat_s`` in a daemon thread, so it lapses
    :data:`LAPSE_BEATS` beats after the process died or lost Redis."""

    def __init__(self, client: Any, worker: str, beat_s: float) -> None:
        super().__init__(name="liveness", daemon=True)
        self.client = client
        self.worker = worker
        self.beat_s = beat_s
        self.key = worker_alive(worker)
        self._stop = threading.Event()

    def beat(self) -> None:
        """Push the key's expiry back (``PEXPIRE`` needs no memory: a full Redis takes it);
        write it anew when it is gone (the first beat, a Redis that lost it)."""
        lapse_ms = max(1, round(self.beat_s * LAPSE_BEATS * 1000))
        if not self.client.pexpire(self.key, lapse_ms):
            self.client.set(self.key, "1", px=lapse_ms)

    def start(self) -> None:
        self.beat()  # before any chunk names this worker as its taker
        super().start()

    def run(self) -> None:
        while not self._stop.wait(self.beat_s):
            try:
                self.beat()
            except Exception as exc:  # noqa: BLE001 - Redis away: its chunks may be sent again
                log.warning("could not renew this worker's liveness key %s: %s", self.key, exc)

    def stop(self) -> None:
        # The key is left to lapse: a chunk still running now (a shutdown cut short) is sent
        # again once it has, and what Celery gave back to the queue on its own has no taker.
        self._stop.set()


#: Take one chunk of a dead worker (one sweeper wins it): 1 while it is in the ledger, 0 when it
#: is not (done meanwhile), -1 when it is no longer that worker's.
_TAKE_ORPHAN = """
if redis.call('HGET', KEYS[1], ARGV[1]) ~= ARGV[2] then return -1 end
redis.call('HDEL', KEYS[1], ARGV[1])
if redis.call('ZSCORE', KEYS[2], ARGV[1]) then return 1 end
return 0
"""


class Orphans:
    """Sends again the chunks whose taker died while running them (its :class:`Liveness` key
    lapsed) and that still have images without a result; each by one worker (call it from
    the sweeper thread; ``me``: this worker's own id).

    A taker counts as dead once its key has been missing for ``grace_s`` (after an outage of
    Redis every worker's key is gone until its next beat), and never while this worker's own
    key is missing (Redis lost its keys, or this worker was cut off from it). A chunk whose
    resend fails is marked failed (:func:`resend_failed` sends it after a pause)."""

    def __init__(
        self,
        store: JobStore,
        resend: Callable[[Chunk], None],
        *,
        me: str,
        grace_s: float,
        limit: int = 1000,
    ) -> None:
        self.store = store
        self.resend = resend
        self.me = me
        self.grace_s = grace_s
        self.limit = limit
        self._missing: dict[str, float] = {}  # taker -> when its key was first seen missing

    def __call__(self, now: float | None = None) -> int:
        """One round; returns how many chunks were sent again."""
        now = time.monotonic() if now is None else now
        client = self.store.redis
        takers: dict[str, list[str]] = {}
        for n, (member, taker) in enumerate(client.hscan_iter(CHUNK_TAKERS, count=self.limit)):
            if n >= self.limit:
                break
            takers.setdefault(as_text(taker), []).append(as_text(member))
        if not takers:
            self._missing.clear()
            return 0
        names = [self.me, *(t for t in takers if t != self.me)]
        pipe = client.pipeline(transaction=False)
        for name in names:
            pipe.exists(worker_alive(name))
        me_alive, *alive = pipe.execute()
        if not me_alive:
            self._missing.clear()  # whatever was missing may be this side's view: judge anew
            return 0
        missing = {name for name, up in zip(names[1:], alive, strict=True) if not up}
        self._missing = {name: self._missing.get(name, now) for name in missing}
        resent = 0
        for taker, since in self._missing.items():
            if now - since >= self.grace_s:
                resent += self._resend(taker, takers[taker])
        return resent

    def _resend(self, taker: str, members: Sequence[str]) -> int:
        client = self.store.redis
        resent = 0
        for member in members:
            if int(client.eval(_TAKE_ORPHAN, 2, CHUNK_TAKERS, CHUNKS, member, taker)) != 1:
                continue
            chunk = parse_member(member)
            store = self.store
            if not store.exists(chunk.job_id) or not store.unresolved(chunk.job_id, chunk.indexes):
                done = client.pipeline(transaction=False)
                ledger_done(done, [chunk])
                done.execute()
                continue
            log.warning("re-sending chunk %s: worker %s, which was running it, is gone", member, taker)
            client.zadd(CHUNKS, {member: time.time()}, xx=True)
            try:
                self.resend(chunk)
            except Exception:  # noqa: BLE001 - the broker away: due again after a pause
                log.exception("could not re-send chunk %s; it is sent again after a pause", member)
                ledger_failed(client, [chunk])
                continue
            resent += 1
        return resent
