"""The job store: jobs, filenames and per-image results in Redis.

Key layout (one prefix; every key of a job carries the ``{job_id}`` hash tag):

- ``bv:job:{id}`` hash: ``total done failed canceled sealed cancel created_at finished_at model owner``
- ``bv:job:{id}:files`` hash index -> filename; ``bv:job:{id}:paths`` hash filename -> index
- ``bv:job:{id}:res`` hash index -> result JSON
- ``bv:job:{id}:tries`` hash chunk/index -> delivery attempts (poison-image guard)
- ``bv:job:{id}:notify`` list pushed once when the job finishes (``POST /v1/classify`` waits on it)
- ``bv:pending`` counter of accepted images without a result (queue depth, backpressure)
- ``bv:tomb:{id}`` marks a finished job after its results expired (``410 Gone``)

Exactly one result per image: results are written with ``HSETNX`` in a Lua script that raises
``done``/``failed``/``canceled`` only when the write stored something, so a redelivered task
never counts twice, and that finishes the job (status, ``finished_at``, TTLs) in the same step.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from batchvision.schemas import canceled_result, entry, job_status

PENDING_KEY = "bv:pending"
ACTIVE_KEY = "bv:active"
BATCH_LOG_KEY = "bv:batches"
_SUFFIXES = ("", ":files", ":paths", ":res", ":tries", ":notify")

# Shared tail of the Lua scripts: finish the job if it is sealed and every image has a result.
# KEYS[1..6] are the job's keys in _SUFFIXES order, KEYS[7] the tombstone, KEYS[8] the set of
# active jobs; ARGV[1] the result TTL, ARGV[2] the current time, ARGV[3] the job id.
_FINISH_LUA = """
local v = redis.call('HMGET', KEYS[1], 'total', 'done', 'failed', 'canceled', 'sealed', 'finished_at')
if v[5] == '1' and not v[6] and
   (tonumber(v[2] or '0') + tonumber(v[3] or '0') + tonumber(v[4] or '0')) >= tonumber(v[1] or '0') then
  redis.call('HSET', KEYS[1], 'finished_at', ARGV[2])
  redis.call('RPUSH', KEYS[6], '1')
  for i = 1, 6 do redis.call('EXPIRE', KEYS[i], ARGV[1]) end
  redis.call('SET', KEYS[7], '1', 'EX', tonumber(ARGV[1]) + 7 * 86400)
  redis.call('SREM', KEYS[8], ARGV[3])
end
"""

_RECORD_LUA = (
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return {0, 0, 0} end
local n = {done = 0, failed = 0, canceled = 0}
for i = 4, #ARGV, 3 do
  if redis.call('HSETNX', KEYS[4], ARGV[i], ARGV[i + 1]) == 1 then
    redis.call('HINCRBY', KEYS[1], ARGV[i + 2], 1)
    n[ARGV[i + 2]] = n[ARGV[i + 2]] + 1
  end
end
local stored = n.done + n.failed + n.canceled
if stored > 0 then redis.call('DECRBY', KEYS[9], stored) end
"""
    + _FINISH_LUA
    + "return {n.done, n.failed, n.canceled}"
)

# A sealed job is kept until it finishes (every image then has a result, at the latest an
# expired-upload error): only open, abandoned uploads expire with the upload TTL.
_SEAL_LUA = (
    """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'sealed', '1')
for i = 1, 5 do redis.call('PERSIST', KEYS[i]) end
"""
    + _FINISH_LUA
    + "return 1"
)

_ADD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return -1 end
local flags = redis.call('HMGET', KEYS[1], 'sealed', 'cancel')
if flags[1] == '1' or flags[2] == '1' then return -2 end
local out = {}
local added = 0
for i = 2, #ARGV, 2 do
  local idx = redis.call('HGET', KEYS[3], ARGV[i])
  if idx then
    table.insert(out, tonumber(idx)); table.insert(out, 0)
  else
    idx = redis.call('HINCRBY', KEYS[1], 'total', 1) - 1
    redis.call('HSET', KEYS[3], ARGV[i], idx)
    redis.call('HSET', KEYS[2], idx, ARGV[i + 1])
    table.insert(out, idx); table.insert(out, 1)
    added = added + 1
  end
end
if added > 0 then redis.call('INCRBY', KEYS[4], added) end
-- an open upload lives as long as its blobs; seal makes the job permanent until it finishes
for _, k in ipairs({KEYS[1], KEYS[2], KEYS[3], KEYS[5]}) do redis.call('EXPIRE', k, ARGV[1]) end
return out
"""


@dataclass(frozen=True)
class Counts:
    """Results newly stored by one :meth:`JobStore.record` call, by outcome."""

    done: int = 0
    failed: int = 0
    canceled: int = 0

    @property
    def total(self) -> int:
        return self.done + self.failed + self.canceled


def outcome(result: dict[str, Any]) -> str:
    """``done``, ``failed`` or ``canceled``: the counter a stored result raises."""
    err = result.get("error")
    if err is None:
        return "done"
    return "canceled" if err.get("code") == "canceled" else "failed"


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def new_job_id() -> str:
    """A random, unguessable job id."""
    return uuid.uuid4().hex


class JobStore:
    """Jobs and results in Redis; every method is safe to call from many threads."""

    def __init__(self, client: redis.Redis, *, result_ttl_s: int, blob_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.open_ttl_s = blob_ttl_s
        self._record = client.register_script(_RECORD_LUA)
        self._seal = client.register_script(_SEAL_LUA)
        self._add = client.register_script(_ADD_LUA)

    @staticmethod
    def keys(job_id: str) -> list[str]:
        return [f"bv:job:{{{job_id}}}{s}" for s in _SUFFIXES] + [f"bv:tomb:{{{job_id}}}"]

    def create(self, job_id: str, *, model: str, owner: str = "") -> None:
        """Open an empty job; files are added with :meth:`add_files`, then :meth:`seal`."""
        key = self.keys(job_id)[0]
        pipe = self.redis.pipeline()
        pipe.hset(
            key,
            mapping={
                "total": 0,
                "done": 0,
                "failed": 0,
                "canceled": 0,
                "sealed": 0,
                "cancel": 0,
                "created_at": f"{time.time():.3f}",
                "model": model,
                "owner": owner,
            },
        )
        pipe.expire(key, self.open_ttl_s)
        pipe.sadd(ACTIVE_KEY, job_id)
        pipe.execute()

    def add_files(self, job_id: str, files: Sequence[tuple[str, str]]) -> list[tuple[int, bool]]:
        """Index ``(key, filename)`` pairs in order; a key the job already has keeps its index.

        The key is the file's relative path, so a re-sent part enqueues nothing twice.
        Returns ``(index, is_new)`` per file. Raises ``LookupError`` for an unknown job and
        ``PermissionError`` for a sealed or canceled one.
        """
        keys = self.keys(job_id)
        args: list[Any] = [self.open_ttl_s, *(arg for pair in files for arg in pair)]
        out = self._add(keys=[keys[0], keys[1], keys[2], PENDING_KEY, keys[3]], args=args)
        if out == -1:
            raise LookupError(job_id)
        if out == -2:
            raise PermissionError(job_id)
        return [(int(out[i]), bool(out[i + 1])) for i in range(0, len(out), 2)]

    def seal(self, job_id: str) -> None:
        """No more files: the job finishes once every image has a result."""
        self._seal(
            keys=[*self.keys(job_id), ACTIVE_KEY], args=[self.result_ttl_s, f"{time.time():.3f}", job_id]
        )

    def record(self, job_id: str, results: Sequence[tuple[int, dict[str, Any]]]) -> Counts:
        """Store results idempotently; returns how many of each kind were new (none on a redelivery)."""
        if not results:
            return Counts()
        args: list[Any] = [self.result_ttl_s, f"{time.time():.3f}", job_id]
        for index, result in results:
            args += [index, json.dumps(result, separators=(",", ":")), outcome(result)]
        done, failed, canceled = self._record(keys=[*self.keys(job_id), ACTIVE_KEY, PENDING_KEY], args=args)
        return Counts(int(done), int(failed), int(canceled))

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's public status document, or ``None`` if it does not exist."""
        raw = self.redis.hgetall(self.keys(job_id)[0])
        if not raw:
            return None
        h = {_text(k): _text(v) for k, v in raw.items()}
        counts = {k: int(h.get(k, 0)) for k in ("total", "done", "failed", "canceled")}
        status = job_status(**counts, sealed=h.get("sealed") == "1", cancel_requested=h.get("cancel") == "1")
        return {
            "job_id": job_id,
            "status": status.value,
            **counts,
            "sealed": h.get("sealed") == "1",
            "created_at": float(h["created_at"]),
            "finished_at": float(h["finished_at"]) if h.get("finished_at") else None,
            "model": h.get("model", ""),
            "owner": h.get("owner", ""),
        }

    def is_gone(self, job_id: str) -> bool:
        """True if the job existed and its results expired."""
        return bool(self.redis.exists(self.keys(job_id)[6]))

    def unresolved(self, job_id: str, indexes: Sequence[int] | range) -> list[int]:
        """The indexes among ``indexes`` that have no result yet."""
        if not indexes:
            return []
        have = self.redis.hmget(self.keys(job_id)[3], [str(i) for i in indexes])
        return [i for i, v in zip(indexes, have, strict=True) if v is None]

    def filenames(self, job_id: str, indexes: Sequence[int]) -> list[str]:
        names = self.redis.hmget(self.keys(job_id)[1], [str(i) for i in indexes])
        return [_text(n) if n is not None else str(i) for i, n in zip(indexes, names, strict=True)]

    def claim(
        self, job_id: str, indexes: Sequence[int], attempt_key: str
    ) -> tuple[list[int], bool, int] | None:
        """A worker starts a chunk, in one round trip: ``(unresolved indexes, canceled,
        delivery count)``, or ``None`` if the job no longer exists."""
        keys = self.keys(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hget(keys[0], "cancel")
        pipe.hmget(keys[3], [str(i) for i in indexes])
        pipe.hincrby(keys[4], attempt_key, 1)
        pipe.expire(keys[4], self.open_ttl_s)
        cancel, have, tries, _ = pipe.execute()
        if cancel is None:  # the job hash is gone
            self.redis.delete(keys[4])
            return None
        todo = [i for i, v in zip(indexes, have, strict=True) if v is None]
        return todo, cancel == b"1", int(tries)

    def forget(self, job_id: str, images: int) -> None:
        """A job vanished (an abandoned upload expired) with ``images`` never classified:
        release them from the global counters."""
        pipe = self.redis.pipeline()
        pipe.decrby(PENDING_KEY, images)
        pipe.srem(ACTIVE_KEY, job_id)
        pipe.execute()

    def file_keys(self, job_id: str) -> list[str]:
        """Every file key (relative path) the job has."""
        return [_text(k) for k in self.redis.hkeys(self.keys(job_id)[2])]

    def attempt(self, job_id: str, key: str) -> int:
        """Count one more delivery of ``key`` (a chunk or an image); returns the count."""
        k = self.keys(job_id)[4]
        pipe = self.redis.pipeline()
        pipe.hincrby(k, key, 1)
        pipe.expire(k, self.open_ttl_s)
        return int(pipe.execute()[0])

    def cancel(self, job_id: str, page: int = 1000) -> bool:
        """Cancel what has no result yet; results so far stay. False if the job is unknown.

        The flag is persistent (workers check it before each chunk, unlike Celery's in-memory
        revokes), and every unresolved image gets a ``canceled`` result at once, so the job
        finishes now; a worker mid-batch loses the ``HSETNX`` race and counts nothing.
        """
        key = self.keys(job_id)[0]
        if not self.exists(job_id):
            return False
        self.redis.hset(key, "cancel", 1)
        total = int(self.redis.hget(key, "total") or 0)
        marker = canceled_result()
        for start in range(0, total, page):
            todo = self.unresolved(job_id, range(start, min(total, start + page)))
            self.record(job_id, [(i, marker) for i in todo])
        self.seal(job_id)
        return True

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(self.keys(job_id)[0]))

    def iter_results(
        self, job_id: str, offset: int = 0, limit: int | None = None, page: int = 500
    ) -> Iterator[dict[str, Any]]:
        """Result rows in upload order, read page by page so memory stays bounded."""
        job = self.get(job_id)
        if job is None:
            return
        end = job["total"] if limit is None else min(job["total"], offset + limit)
        keys = self.keys(job_id)
        for start in range(offset, end, page):
            idx = [str(i) for i in range(start, min(end, start + page))]
            pipe = self.redis.pipeline()
            pipe.hmget(keys[1], idx)
            pipe.hmget(keys[3], idx)
            names, results = pipe.execute()
            for i, name, res in zip(idx, names, results, strict=True):
                stored = json.loads(res) if res is not None else None
                yield entry(int(i), _text(name) if name else i, stored)

    def wait(self, job_id: str, timeout_s: float) -> bool:
        """Block until the job finishes or ``timeout_s`` passes; True if finished."""
        keys = self.keys(job_id)
        deadline = time.monotonic() + timeout_s
        while not self.redis.hget(keys[0], "finished_at"):
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            # BLMOVE onto the same list rotates the one marker instead of consuming it, so any
            # number of waiters wake up. Short slices stay under the client's socket timeout.
            self.redis.blmove(keys[5], keys[5], max(0.01, min(left, 2.0)), "LEFT", "RIGHT")  # type: ignore[arg-type]
        return True

    def active_jobs(self) -> int:
        """Jobs created and not finished yet."""
        return int(self.redis.scard(ACTIVE_KEY))

    def pending_images(self) -> int:
        """Accepted images that have no result yet, over all jobs."""
        return int(self.redis.get(PENDING_KEY) or 0)

    def log_batch(self, size: int, jobs: Sequence[str], keep: int = 1000) -> None:
        """Remember a recent batch (size and the jobs it mixed), for operators and tests."""
        doc = json.dumps({"size": size, "jobs": sorted(set(jobs)), "at": round(time.time(), 3)})
        pipe = self.redis.pipeline()
        pipe.lpush(BATCH_LOG_KEY, doc)
        pipe.ltrim(BATCH_LOG_KEY, 0, keep - 1)
        pipe.execute()

    def recent_batches(self, n: int = 1000) -> list[dict[str, Any]]:
        return [json.loads(x) for x in self.redis.lrange(BATCH_LOG_KEY, 0, n - 1)]
