"""Admission by what Redis can hold: a byte budget for the uploads that wait for a worker, and
per-key quotas of waiting images and bytes, so one key cannot fill the queue for everyone.

The counters are kept by the job scripts (:mod:`batchvision.server.lua`): ``ADD`` raises them in
the same atomic step that accepts the files, ``RECORD`` lowers them by the results it stores,
and a job that finishes or expires gives back whatever it still holds, once. Admission answers
``429`` with ``Retry-After`` long before Redis would refuse writes; a request that no wait would
let in gets ``413``.

Between admission and the writes that count its images, a request may take a while (reading
uploads to a volume or bucket). So admission is one script (:data:`HOLD`) that checks the
counters plus what the other admitted requests hold, and adds the request's own images and bytes
to ``bv:quota:held`` in the same atomic step: concurrent requests of one key cannot all pass a
check that only their sum breaks. The writes remove the hold in their ``MULTI``; a request that
fails removes it on the way out, and one whose process dies leaves it to lapse after
:data:`HOLD_LAPSE_S`.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from types import TracebackType
from typing import Any

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
#: Seconds an admitted request's hold counts if its process dies before its writes remove it.
HOLD_LAPSE_S = 120

log = logging.getLogger(__name__)

#: Admit one request atomically. KEYS: pending, pending bytes, quota, held. ARGV: how long the
#: hold lasts (ms), its member ``<id>:<images>:<bytes>:<owner>``, owner, images, bytes, then the
#: limits (0: none): queued images, byte budget, images and bytes per key. Lapsed holds go first
#: (by Redis' clock, so a host whose clock is off neither drops others' holds nor keeps its
#: own). Returns the load counted (images, bytes, the owner's images and bytes, the others'
#: holds included) and 1 if the request fits (and now holds its images and bytes; nothing for a
#: request of none), else 0. The checks are :meth:`Quotas._problem`'s, in its order.
HOLD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local lapse, member, owner = now + tonumber(ARGV[1]), ARGV[2], ARGV[3]
local images, bytes = tonumber(ARGV[4]), tonumber(ARGV[5])
local max_images, budget, key_images_max, key_bytes_max =
  tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8]), tonumber(ARGV[9])
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local all_i = tonumber(redis.call('GET', KEYS[1]) or '0')
local all_b = tonumber(redis.call('GET', KEYS[2]) or '0')
local mine = redis.call('HMGET', KEYS[3], 'i:' .. owner, 'b:' .. owner)
local key_i, key_b = tonumber(mine[1] or '0'), tonumber(mine[2] or '0')
for _, m in ipairs(redis.call('ZRANGE', KEYS[4], 0, -1)) do
  local i, b, o = string.match(m, '^[^:]*:(%d+):(%d+):(.*)$')
  if i then
    all_i, all_b = all_i + tonumber(i), all_b + tonumber(b)
    if o == owner then key_i, key_b = key_i + tonumber(i), key_b + tonumber(b) end
  end
end
local load = {all_i, all_b, key_i, key_b}
if (max_images > 0 and all_i >= max_images)
  or (budget > 0 and all_b + bytes > budget)
  or (key_images_max > 0 and key_i + images > key_images_max)
  or (key_bytes_max > 0 and key_b + bytes > key_bytes_max) then
  table.insert(load, 0)
  return load
end
if images > 0 or bytes > 0 then redis.call('ZADD', KEYS[4], lapse, member) end
table.insert(load, 1)
return load
"""


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


class Hold:
    """What one admitted request holds of the queue and of its key's quota until the writes
    that count its images remove it (:meth:`release_on` in their ``MULTI``, then
    :meth:`released`). Leaving the ``with`` block otherwise removes it (best effort: a hold that
    cannot be removed lapses after :data:`HOLD_LAPSE_S`)."""

    def __init__(self, client: redis.Redis | None = None, member: str | None = None) -> None:
        self.redis = client
        self.member = member

    def release_on(self, pipe: Any) -> None:
        """Queue the hold's removal on ``pipe``, the ``MULTI`` whose writes count its images."""
        if self.member is not None:
            pipe.zrem(keys.QUOTA_HELD, self.member)

    def released(self) -> None:
        """The ``MULTI`` of :meth:`release_on` ran: nothing is left to remove."""
        self.member = None

    def release(self) -> None:
        """Remove the hold now (no-op if there is none left)."""
        member, self.member = self.member, None
        if member is None or self.redis is None:
            return
        try:
            self.redis.zrem(keys.QUOTA_HELD, member)
        except redis.RedisError:
            log.warning("could not remove a quota hold; it lapses in %d s", HOLD_LAPSE_S, exc_info=True)

    def __enter__(self) -> Hold:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


#: The hold of a request that holds nothing (no limits set, or no images).
NO_HOLD = Hold()


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
        self._hold = client.register_script(HOLD)

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

    def hold(
        self, owner: str, images: int, nbytes: int, limits: tuple[int, ...]
    ) -> tuple[Load, Memory, Hold]:
        """Check and hold ``images`` images of ``nbytes`` bytes for ``owner`` against ``limits``
        (queued images, byte budget, images and bytes per key), with Redis' memory figures: one
        round trip. The hold is empty when they do not fit."""
        member = f"{uuid.uuid4().hex}:{images}:{nbytes}:{owner}"
        pipe = self.redis.pipeline(transaction=False)
        pipe.info("memory")
        self._hold(
            keys=[keys.PENDING, keys.PENDING_BYTES, keys.QUOTA, keys.QUOTA_HELD],
            args=[HOLD_LAPSE_S * 1000, member, owner, images, nbytes, *limits],
            client=pipe,
        )
        info, (all_images, all_bytes, key_images, key_bytes, fits) = pipe.execute()
        load = Load(int(all_images), int(all_bytes), int(key_images), int(key_bytes))
        mem = Memory(int(info.get("maxmemory", 0) or 0), int(info.get("used_memory", 0) or 0))
        held = Hold(self.redis, member) if fits and (images or nbytes) else NO_HOLD
        return load, mem, held

    def admit(self, owner: str, images: int, nbytes: int) -> Hold:
        """Admit ``images`` images of ``nbytes`` bytes from ``owner``: returns their
        :class:`Hold`, to be removed by the writes that count them. Raises
        :class:`TooManyRequests` (``429``, retry later) when they would go over a limit now,
        :class:`OverQuota` (``413``) when they would even on an empty queue."""
        s = self.settings
        budget = self.byte_budget()
        never = self._never_fits
        never(nbytes, budget, "BATCHVISION_MAX_QUEUED_BYTES (or its share of Redis maxmemory)")
        never(nbytes, s.max_queued_bytes_per_key, "BATCHVISION_MAX_QUEUED_BYTES_PER_KEY")
        never(images, s.max_queued_images_per_key, "BATCHVISION_MAX_QUEUED_IMAGES_PER_KEY", "images")
        limits = (s.max_queued_images, budget, s.max_queued_images_per_key, s.max_queued_bytes_per_key)
        if not any(limits) and not (self.redis_blobs and self.maxmemory()):
            return NO_HOLD  # nothing to hold the request to: no round trip
        load, mem, held = self.hold(owner, images, nbytes, limits)
        problem = self._problem(load, mem, budget, images, nbytes)
        # Open uploads that expired still count until released (a write): only worth it now.
        if problem is not None and problem[1] != "memory" and self.telemetry.release_expired():
            held.release()
            load, mem, held = self.hold(owner, images, nbytes, limits)
            problem = self._problem(load, mem, budget, images, nbytes)
        if problem is not None:
            held.release()
            message, code = problem
            raise TooManyRequests(
                message, code="queue_full" if code == "memory" else code, retry_after=RETRY_AFTER_S
            )
        return held

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
