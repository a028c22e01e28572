"""Worker bookkeeping on a job: which images of a chunk still need a result, and how many
times a chunk or an image was delivered (the poison-image guard)."""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import redis

from batchvision.core.model_refs import OPTION_FIELDS
from batchvision.core.results import Failure, decode
from batchvision.server import keys, lua
from batchvision.server.keys import JobKeys
from batchvision.server.messages import Chunk


@dataclass(frozen=True)
class Claim:
    """What a worker starting a chunk must do: ``todo`` (indexes without a result), whether
    the job was canceled, how many times this chunk was delivered (this one included), and the
    job's options (its model, pinned version, ``top_k``, ``min_score``: fields of the job hash)."""

    todo: list[int]
    canceled: bool
    deliveries: int
    options: Mapping[str, str] = field(default_factory=dict)
    #: indexes whose stored result is a retryable error: their uploads stay for a retry
    kept: frozenset[int] = frozenset()


class Claims:
    """Delivery counts and chunk claims in the job's ``tries`` hash."""

    def __init__(self, client: redis.Redis, *, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self._release = client.register_script(lua.RELEASE)

    def claim(self, chunk: Chunk, attempt_key: str) -> Claim | None:
        """A worker starts a chunk, in one round trip; ``None`` if the job no longer exists."""
        return self.claim_many([chunk], lambda c: attempt_key)[0]

    def claim_many(
        self,
        chunks: Sequence[Chunk],
        attempt_key: Callable[[Chunk], str] = lambda c: f"chunk:{c.first}",
        also: Callable[[Any], None] | None = None,
    ) -> list[Claim | None]:
        """:meth:`claim` for the chunks of one message, in one round trip; ``also(pipe)`` may
        queue more commands on it (their replies are dropped). ``None`` for a vanished job."""
        pipe = self.redis.pipeline(transaction=False)
        for chunk in chunks:
            k = JobKeys.of(chunk.job_id)
            pipe.hmget(k.job, ["cancel", *OPTION_FIELDS])
            pipe.hmget(k.results, [str(i) for i in chunk.indexes])
            pipe.hincrby(k.tries, attempt_key(chunk), 1)
            pipe.expire(k.tries, self.ttl_s)
        if also is not None:
            also(pipe)
        replies = pipe.execute()
        out: list[Claim | None] = []
        for n, chunk in enumerate(chunks):
            (cancel, *options), have, tries, _ = replies[4 * n : 4 * n + 4]
            if cancel is None:  # the job hash is gone
                self.redis.delete(JobKeys.of(chunk.job_id).tries)
                out.append(None)
                continue
            todo = [i for i, v in zip(chunk.indexes, have, strict=True) if v is None]
            kept = frozenset(i for i, v in zip(chunk.indexes, have, strict=True) if _retryable_error(v))
            fields = {k: v.decode() for k, v in zip(OPTION_FIELDS, options, strict=True) if v is not None}
            out.append(Claim(todo, cancel in (b"1", b"open"), int(tries), fields, kept))
        return out

    def unclaim(self, chunk: Chunk) -> None:
        """Take back a chunk's delivery count (a worker that does not serve the job's model hands
        the chunk on: that was no delivery)."""
        self.redis.hincrby(JobKeys.of(chunk.job_id).tries, f"chunk:{chunk.first}", -1)

    def attempt(self, job_id: str, key: str, count: int = 1) -> int:
        """Count one more delivery of ``key`` (a chunk or an image; ``count=-1`` takes one back);
        returns the count."""
        k = JobKeys.of(job_id).tries
        pipe = self.redis.pipeline()
        pipe.hincrby(k, key, count)
        pipe.expire(k, self.ttl_s)
        return int(pipe.execute()[0])

    def forget(self, job_id: str) -> None:
        """A job vanished (an abandoned upload expired): release the images it still counted
        from the global counters, once, however many workers meet it."""
        try:
            self._release(keys=keys.RELEASE_KEYS, args=[time.time(), job_id, 0])
        except redis.exceptions.ResponseError as exc:
            raise out_of_memory(exc) from None


def _retryable_error(stored: bytes | None) -> bool:
    """Whether a stored result is an error a retry of the job would queue again."""
    if stored is None or b'"error"' not in stored:  # no result, or a prediction: not parsed
        return False
    result = decode(stored)
    return isinstance(result, Failure) and result.retryable


def out_of_memory(exc: Exception) -> Exception:
    """A script's error as Redis' own out-of-memory error when that is what it is: Redis 7 reports
    an OOM inside a script as ``ERR Error running script ... -OOM ...``, which the worker must
    retry like any out-of-memory answer."""
    if not isinstance(exc, redis.exceptions.OutOfMemoryError) and "-OOM " in str(exc):
        return redis.exceptions.OutOfMemoryError(str(exc))
    return exc
