"""Durable work items that any worker process may take: a Redis sorted set of ids scored by
when each is due (ms), and a thread per process that leases due ones.

A lease moves the id's score to ``now + lease``: no other process sees it due until then. The
holder renews it while it works and records the outcome only while the score is still its
own lease (its own ``RECORD`` script compares the score first), so a process that stalled past
its lease cannot overwrite what the next holder did. A process killed mid-item leaves the lease
to run out and another takes the item again: items must be safe to do twice.

Used by :mod:`batchvision.server.exports` (output files) and :mod:`batchvision.server.listing`
(prefix listings).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

import redis

from batchvision.server.text import as_text

log = logging.getLogger(__name__)

#: Take the earliest due id and lease it: KEYS[1] the set; ARGV now (ms), lease (ms).
LEASE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, 1)
if #due == 0 then return false end
local lease = tonumber(ARGV[1]) + tonumber(ARGV[2])
redis.call('ZADD', KEYS[1], 'XX', lease, due[1])
return {due[1], tostring(lease)}
"""
#: The start of a script that acts only while the lease is ours (it returns 0 otherwise):
#: KEYS[1] the set, ARGV[1] the item, ARGV[2] the lease (its score when taken or renewed).
IF_OURS = """
local score = redis.call('ZSCORE', KEYS[1], ARGV[1])
if not score or tonumber(score) ~= tonumber(ARGV[2]) then return 0 end
"""
#: Move our lease (ARGV[2]) of ARGV[1] to ARGV[3], only while it is still ours.
RENEW = (
    IF_OURS
    + """
redis.call('ZADD', KEYS[1], 'XX', ARGV[3], ARGV[1])
return 1
"""
)


def due_again_if(state: str) -> str:
    """The end of a script that records an outcome under :data:`IF_OURS`: the item stays in
    the set, due at ARGV[4], when ARGV[3] is ``state``, and leaves it otherwise."""
    return f"""
if ARGV[3] == '{state}' then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[4], ARGV[1])
else
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return 1
"""


def now_ms() -> int:
    """The time as the sets score it."""
    return int(time.time() * 1000)


class Lease:
    """One held item: its id and the score that proves the lease is still ours."""

    def __init__(self, leases: LeasedSet, item: str, score: int) -> None:
        self.leases = leases
        self.item = item
        self.score = score

    def renew(self) -> bool:
        """Hold the item another lease period; False once another process has it."""
        new = now_ms() + self.leases.lease_ms
        if self.leases.renew_script(keys=[self.leases.key], args=[self.item, self.score, new]):
            self.score = new
            return True
        return False


class LeasedSet:
    """The sorted set ``key`` of due items, leased ``lease_s`` at a time."""

    def __init__(self, client: redis.Redis, key: str, lease_s: float) -> None:
        self.redis = client
        self.key = key
        self.lease_ms = int(lease_s * 1000)
        self._lease = client.register_script(LEASE)
        self.renew_script = client.register_script(RENEW)

    def lease(self) -> Lease | None:
        """The earliest due item, now held by this process; ``None`` when none is due."""
        taken = self._lease(keys=[self.key], args=[now_ms(), self.lease_ms])
        if not taken:
            return None
        return Lease(self, as_text(taken[0]), int(as_text(taken[1])))


class LeaseLoop:
    """A daemon thread that hands each due item of ``leases`` to ``handle``, one at a time;
    a Redis outage or a failing item is waited out, never the thread's end."""

    def __init__(
        self, name: str, leases: LeasedSet, handle: Callable[[Lease], object], *, poll_s: float = 0.5
    ) -> None:
        self.name = name
        self.leases = leases
        self.handle = handle
        self.poll_s = poll_s
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                busy = self.run_once()
            except redis.RedisError as exc:
                log.warning("%s: Redis unavailable (%s); retrying", self.name, exc)
                busy = False
            except Exception:  # the item's lease runs out and it is taken again: never the thread's end
                log.exception("%s: an item failed", self.name)
                busy = False
            self._stop.wait(0.01 if busy else self.poll_s)

    def run_once(self) -> bool:
        """Lease and handle one due item; whether there was one."""
        held = self.leases.lease()
        if held is None:
            return False
        self.handle(held)
        return True


class LeasedWorker:
    """Base of a component that works through the due items of the set ``key`` in a thread
    (:meth:`handle` each, leased ``lease_s`` at a time): started, stopped, or stepped by hand."""

    def __init__(self, name: str, client: redis.Redis, key: str, *, lease_s: float, poll_s: float) -> None:
        self.redis = client
        self.leases = LeasedSet(client, key, lease_s)
        self._loop = LeaseLoop(name, self.leases, self.handle, poll_s=poll_s)

    def handle(self, held: Lease) -> object:
        """Work on one leased item."""
        raise NotImplementedError

    def start(self) -> None:
        self._loop.start()

    def stop(self) -> None:
        self._loop.stop()

    def run_once(self) -> bool:
        """Lease and handle one due item; whether there was one."""
        return self._loop.run_once()
