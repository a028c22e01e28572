"""Admission by what Redis can hold: a byte budget for the uploads that wait for a worker, and
per-key quotas of waiting images and bytes, so one key cannot fill the queue for everyone.

The counters are kept by the job scripts (:mod:`batchvision.server.lua`): ``ADD`` raises them in
the same atomic step that accepts the files, ``RECORD`` lowers them by the results it stores,
and a job that finishes or expires gives back whatever it still holds, once. Admission reads
them, with Redis' memory figures, in one round trip of reads before a request writes, and answers ``429`` with
``Retry-After`` long before Redis would refuse writes; a request that no wait would let in
gets ``413``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import redis

from batchvision.core.errors import OverQuota, TooManyRequests
from batchvision.core.settings import Settings
from batchvision.server import keys
from batchvision.server.telemetry import Telemetry

#: Seconds a refused upload is asked to wait: about what a worker needs to drain some room.
RETRY_AFTER_S = 3
#: How long one reading of Redis' ``maxmemory`` is trusted (it changes with CONFIG SET only).
MAXMEMORY_TTL_S = 5.0
#: Above this share of ``maxmemory`` in use, uploads wait whatever the counters say (results,
#: job hashes and the broker's messages use memory the byte budget does not count).
MEMORY_CEILING = 0.85


@dataclass(frozen=True)
class Memory:
    """Redis' ``maxmemory`` (0: none) and ``used_memory``, in bytes."""

    maxmemory: int
    used: int


@dataclass(frozen=True)
class Load:
    """What waits for a worker: over all jobs, and of one API key."""

    images: int
    bytes: int
    key_images: int
    key_bytes: int


class Quotas:
    """Admits or refuses the images of one request (see the module's description)."""

    def __init__(self, client: redis.Redis, settings: Settings, telemetry: Telemetry, *, redis_blobs: bool):
        self.redis = client
        self.settings = settings
        self.telemetry = telemetry
        #: Whether uploads wait in Redis (the default); a budget derived from ``maxmemory``
        #: only means something then.
        self.redis_blobs = redis_blobs
        self._maxmemory: tuple[float, int] | None = None

    def maxmemory(self) -> int:
        """Redis' ``maxmemory`` (0: none), read again at most every :data:`MAXMEMORY_TTL_S`.
        (Two requests may both read it when it is stale: harmless.)"""
        cached = self._maxmemory
        if cached is None or time.monotonic() - cached[0] > MAXMEMORY_TTL_S:
            info = self.redis.info("memory")
            cached = (time.monotonic(), int(info.get("maxmemory", 0) or 0))
            self._maxmemory = cached
        return cached[1]

    def byte_budget(self) -> int:
        """Bytes of uploads that may wait (0: no limit): ``MAX_QUEUED_BYTES``, else
        ``QUEUED_BYTES_SHARE`` of Redis' ``maxmemory`` when uploads wait in Redis and it has one."""
        if self.settings.max_queued_bytes:
            return self.settings.max_queued_bytes
        if not self.redis_blobs:
            return 0
        return int(self.maxmemory() * self.settings.queued_bytes_share)

    def read(self, owner: str) -> tuple[Load, Memory]:
        """What waits now, and Redis' memory figures: one round trip, reads only."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(keys.PENDING)
        pipe.get(keys.PENDING_BYTES)
        pipe.hmget(keys.QUOTA, [f"i:{owner}", f"b:{owner}"])
        pipe.info("memory")
        images, nbytes, (key_images, key_bytes), info = pipe.execute()
        load = Load(int(images or 0), int(nbytes or 0), int(key_images or 0), int(key_bytes or 0))
        return load, Memory(int(info.get("maxmemory", 0) or 0), int(info.get("used_memory", 0) or 0))

    def admit(self, owner: str, images: int, nbytes: int) -> None:
        """Raise :class:`TooManyRequests` (``429``, retry later) when ``images`` images of
        ``nbytes`` bytes from ``owner`` would go over a limit now, :class:`OverQuota`
        (``413``) when they would even on an empty queue."""
        s = self.settings
        budget = self.byte_budget()
        never = self._never_fits
        never(nbytes, budget, "BATCHVISION_MAX_QUEUED_BYTES (or its share of Redis maxmemory)")
        never(nbytes, s.max_queued_bytes_per_key, "BATCHVISION_MAX_QUEUED_BYTES_PER_KEY")
        never(images, s.max_queued_images_per_key, "BATCHVISION_MAX_QUEUED_IMAGES_PER_KEY", "images")
        limits = (budget, s.max_queued_images, s.max_queued_images_per_key, s.max_queued_bytes_per_key)
        if not any(limits) and not (self.redis_blobs and self.maxmemory()):
            return  # nothing to hold the request to: no round trip
        load, mem = self.read(owner)
        problem = self._problem(load, mem, budget, images, nbytes)
        # Open uploads that expired still count until released (a write): only worth it now.
        if problem is not None and problem[1] != "memory" and self.telemetry.release_expired():
            load, mem = self.read(owner)
            problem = self._problem(load, mem, budget, images, nbytes)
        if problem is not None:
            message, code = problem
            raise TooManyRequests(
                message, code="queue_full" if code == "memory" else code, retry_after=RETRY_AFTER_S
            )

    def _problem(
        self, load: Load, mem: Memory, budget: int, images: int, nbytes: int
    ) -> tuple[str, str] | None:
        """Why the request must wait, and the error code (``memory`` for a nearly full Redis)."""
        s = self.settings
        if self.redis_blobs and mem.maxmemory and mem.used > MEMORY_CEILING * mem.maxmemory:
            return f"the job store is {mem.used * 100 // mem.maxmemory}% full; retry later", "memory"
        if s.max_queued_images and load.images >= s.max_queued_images:
            return f"{s.max_queued_images} images are already waiting; retry later", "queue_full"
        if budget and load.bytes + nbytes > budget:
            return (
                f"{load.bytes} bytes of uploads are waiting and this request adds {nbytes}; the queue "
                f"holds {budget}: retry later",
                "queue_full",
            )
        if s.max_queued_images_per_key and load.key_images + images > s.max_queued_images_per_key:
            return (
                f"this API key has {load.key_images} images waiting and may have "
                f"{s.max_queued_images_per_key}; retry when some are done",
                "key_quota",
            )
        if s.max_queued_bytes_per_key and load.key_bytes + nbytes > s.max_queued_bytes_per_key:
            return (
                f"this API key has {load.key_bytes} bytes of uploads waiting and may have "
                f"{s.max_queued_bytes_per_key}; retry when some are done",
                "key_quota",
            )
        return None

    @staticmethod
    def _never_fits(amount: int, limit: int, setting: str, unit: str = "bytes") -> None:
        if limit and amount > limit:
            raise OverQuota(
                f"this request holds {amount} {unit}, more than the queue takes at once ({limit}, "
                f"{setting}): send it in smaller parts"
            )
