"""``Idempotency-Key``: the same key (per API key) returns the job it created the first time.

One key gives one job under every failure order. A request first takes the key's slot as
``pending`` (so a concurrent retry gets ``409``); the job it creates is written to the slot in
the same ``MULTI`` as the job itself (:meth:`Claim.commit`), guarded by ``WATCH``: once a job
is stored, the key names it, whatever happens next (the publish fails, the API process dies
before publishing: the chunk ledger's sweeper sends the job's chunks), and a retry gets that
job back. A request slower than the ``pending`` slot's lifetime (a large archive) may overlap
a retry; whichever commits first makes the job, the other returns it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import redis

from batchvision.core.errors import Conflict
from batchvision.server import keys

T = TypeVar("T")

_PENDING = "pending"
# Give the slot up only while it is still pending: a slot that names a job stays.
_RELEASE_PENDING = """
local v = redis.call('GET', KEYS[1])
if v and string.sub(v, 1, 8) == 'pending ' then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Replay(Exception):  # noqa: N818 - a signal, not a failure
    """The key already names a job: the request returns it instead of creating one."""

    def __init__(self, job_id: str) -> None:
        super().__init__(job_id)
        self.job_id = job_id


@dataclass(frozen=True)
class Claim:
    """One request's hold on an ``Idempotency-Key`` slot."""

    slot: str
    fingerprint: str
    ttl_s: int

    def check(self, client: Any) -> None:
        """Raise :class:`Replay` if the slot names a job, ``Conflict`` if it was taken for a
        different request (``client``: Redis, or a pipeline in ``WATCH`` mode)."""
        raw = client.get(self.slot)
        state, _, earlier = (raw.decode() if isinstance(raw, bytes) else str(raw or "")).partition(" ")
        if earlier and earlier != self.fingerprint:
            raise Conflict(
                "this Idempotency-Key was used for a different request; use a new key per request",
                code="idempotency_key_reused",
            )
        if state not in ("", _PENDING):
            raise Replay(state)

    def commit(self, client: redis.Redis, job_id: str, writes: Callable[[Any], None]) -> None:
        """Queue ``writes`` on a ``MULTI`` pipeline with the slot's new value ``job_id`` and run
        it, unless the slot names a job by then (:class:`Replay`: nothing is written)."""
        while True:
            with client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.slot)  # type: ignore[no-untyped-call, unused-ignore]
                    self.check(pipe)
                    pipe.multi()
                    writes(pipe)
                    pipe.set(self.slot, f"{job_id} {self.fingerprint}", ex=self.ttl_s)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue  # another request wrote the slot: look again

    def release(self, client: redis.Redis, job_id: str) -> None:
        """Free the slot if it names ``job_id``: a job that was stored and then canceled before
        its request succeeded (storing its first page failed) must not be replayed to a retry."""
        while True:
            with client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(self.slot)  # type: ignore[no-untyped-call, unused-ignore]
                    raw = pipe.get(self.slot)
                    value = raw.decode() if isinstance(raw, bytes) else str(raw or "")
                    if value.partition(" ")[0] != job_id:
                        return  # another request's job (or nothing): not this request's to free
                    pipe.multi()
                    pipe.delete(self.slot)
                    pipe.execute()
                    return
                except redis.WatchError:
                    continue


def commit(client: redis.Redis, claim: Claim | None, job_id: str, writes: Callable[[Any], None]) -> None:
    """:meth:`Claim.commit`, or without a claim one plain ``MULTI`` of ``writes``."""
    if claim is not None:
        claim.commit(client, job_id, writes)
        return
    pipe = client.pipeline(transaction=True)
    writes(pipe)
    pipe.execute()


class Idempotency:
    """Remembers which job each (owner, key digest) created, for ``ttl_s`` seconds."""

    def __init__(self, client: redis.Redis, *, ttl_s: int, pending_ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        # "pending" lives only as long as a request can: a crashed request does not block the key.
        self.pending_ttl_s = pending_ttl_s
        self._release = client.register_script(_RELEASE_PENDING)

    def run(
        self, owner: str, key_digest: str, fingerprint: str, create: Callable[[Claim], tuple[str, T]]
    ) -> tuple[str, T | None]:
        """``create(claim)`` once per key: returns ``(job_id, its result)``, or ``(job_id, None)``
        when a request with this key and the same ``fingerprint`` (what was asked) created the
        job. ``create`` stores its job with :meth:`Claim.commit`. Raises ``Conflict`` while an
        earlier request with the key is still running, or when the key was used for a different
        request."""
        claim = Claim(keys.idempotency(owner, key_digest), fingerprint, self.ttl_s)
        try:
            if not self.redis.set(claim.slot, f"{_PENDING} {fingerprint}", nx=True, ex=self.pending_ttl_s):
                claim.check(self.redis)
                raise Conflict(
                    "a request with this Idempotency-Key is still in progress", code="idempotency_conflict"
                )
            try:
                job_id, result = create(claim)
            except BaseException:
                # A request that stored no job gives the key up; one that did keeps it naming
                # the job (its publish failed, or comes later from the sweeper).
                self._release(keys=[claim.slot])
                raise
        except Replay as replay:
            return replay.job_id, None
        self.redis.set(claim.slot, f"{job_id} {fingerprint}", ex=self.ttl_s)  # a create without commit
        return job_id, result
