"""``Idempotency-Key``: the same key (per API key) returns the job it created the first time."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

import redis

from batchvision.core.errors import Conflict
from batchvision.server import keys

T = TypeVar("T")


class Idempotency:
    """Remembers which job each (owner, key digest) created, for ``ttl_s`` seconds."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, pending_ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        # "pending" lives only as long as a request can: a crashed request does not block the key.
        self.pending_ttl_s = pending_ttl_s

    def run(self, owner: str, key_digest: str, create: Callable[[], tuple[str, T]]) -> tuple[str, T | None]:
        """``create()`` once per key: returns ``(job_id, its result)``, or ``(job_id, None)`` when
        an earlier request with this key created the job. Raises ``Conflict`` while that earlier
        request is still running."""
        slot = keys.idempotency(owner, key_digest)
        if not self.redis.set(slot, "pending", nx=True, ex=self.pending_ttl_s):
            existing = self.redis.get(slot)
            if existing in (None, b"pending"):
                raise Conflict(
                    "a request with this Idempotency-Key is still in progress", code="idempotency_conflict"
                )
            return (existing.decode() if isinstance(existing, bytes) else str(existing)), None
        try:
            job_id, result = create()
        except BaseException:
            self.redis.delete(slot)
            raise
        self.redis.set(slot, job_id, ex=self.ttl_s)
        return job_id, result
