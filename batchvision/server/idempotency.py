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

    def run(
        self, owner: str, key_digest: str, fingerprint: str, create: Callable[[], tuple[str, T]]
    ) -> tuple[str, T | None]:
        """``create()`` once per key: returns ``(job_id, its result)``, or ``(job_id, None)`` when
        an earlier request with this key and the same ``fingerprint`` (what was asked) created
        the job. Raises ``Conflict`` while that earlier request is still running, or when the key
        was used for a different request."""
        slot = keys.idempotency(owner, key_digest)
        if not self.redis.set(slot, f"pending {fingerprint}", nx=True, ex=self.pending_ttl_s):
            raw = self.redis.get(slot)
            state, _, earlier = (raw.decode() if isinstance(raw, bytes) else str(raw or "")).partition(" ")
            if earlier and earlier != fingerprint:
                raise Conflict(
                    "this Idempotency-Key was used for a different request; use a new key per request",
                    code="idempotency_key_reused",
                )
            if state in ("", "pending"):
                raise Conflict(
                    "a request with this Idempotency-Key is still in progress", code="idempotency_conflict"
                )
            return state, None
        try:
            job_id, result = create()
        except BaseException:
            self.redis.delete(slot)
            raise
        self.redis.set(slot, f"{job_id} {fingerprint}", ex=self.ttl_s)
        return job_id, result
