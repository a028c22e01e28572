"""Where uploaded bytes wait for a worker: never inside a Celery message.

``redis`` (default): one key per image with a TTL. ``file:///dir``: one file per image on a
volume shared by API and workers, for images too large or too many to keep in Redis memory.
``s3://bucket/prefix/``: one object per image in a bucket, so API and workers share no volume
and Redis holds only metadata (a bucket lifecycle rule on the prefix plays the TTL's part for
uploads whose job was deleted before they were classified).
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from collections.abc import Collection, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlparse

import redis

from batchvision.core.results import Failure, ImageResult
from batchvision.server import keys
from batchvision.server.s3 import S3, S3Config, S3Error, S3Url, shared
from batchvision.server.text import as_text


class BlobStore(Protocol):
    """Bytes per (job, image index)."""

    #: Whether writes and deletes can ride on a Redis pipeline (``pipe=``) with other commands.
    pipelined: bool
    #: Whether a blob expires on its own (``BLOB_TTL_S`` after upload). The blobs of images that
    #: failed for a retryable reason are kept for a retry of their job in every store; in one that
    #: does not expire them they are listed in :data:`~batchvision.server.keys.KEPT_BLOBS` and
    #: deleted by :func:`reap_kept` ``keep_s`` seconds later.
    expiring: bool
    #: How long a kept blob stays (``BLOB_TTL_S``).
    keep_s: int

    def put_many(self, job_id: str, blobs: Mapping[int, bytes], pipe: Any = None) -> None:
        """Store blobs; with ``pipe`` (a Redis pipeline) a Redis store only queues the writes."""

    def get_many(self, job_id: str, indexes: Sequence[int]) -> list[bytes | None]: ...

    def get_batch(self, wanted: Sequence[tuple[str, Sequence[int]]]) -> list[list[bytes | None]]:
        """:meth:`get_many` for several jobs at once (one round trip for Redis)."""

    def delete_many(self, job_id: str, indexes: Sequence[int], pipe: Any = None) -> None:
        """Delete blobs; with ``pipe`` a Redis store only queues the deletes."""

    def sizes(self, job_id: str, indexes: Sequence[int]) -> list[int]:
        """The bytes each blob holds, ``0`` for one that is gone (without reading them)."""


class RedisBlobs:
    """Blobs as Redis strings ``bv:blob:{job}:index`` with a TTL."""

    pipelined = True
    expiring = True

    def __init__(self, client: redis.Redis, ttl_s: int) -> None:
        self.redis = client
        self.ttl_s = ttl_s
        self.keep_s = ttl_s

    @staticmethod
    def key(job_id: str, index: int) -> str:
        return keys.blob(job_id, index)

    def put_many(self, job_id: str, blobs: Mapping[int, bytes], pipe: Any = None) -> None:
        own = pipe is None
        pipe = self.redis.pipeline(transaction=False) if own else pipe
        for index, data in blobs.items():
            pipe.set(self.key(job_id, index), data, ex=self.ttl_s)
        if own:
            pipe.execute()

    def get_many(self, job_id: str, indexes: Sequence[int]) -> list[bytes | None]:
        if not indexes:
            return []
        return [
            v if isinstance(v, bytes) or v is None else v.encode()
            for v in self.redis.mget([self.key(job_id, i) for i in indexes])
        ]

    def get_batch(self, wanted: Sequence[tuple[str, Sequence[int]]]) -> list[list[bytes | None]]:
        pipe = self.redis.pipeline(transaction=False)
        for job_id, indexes in wanted:
            pipe.mget([self.key(job_id, i) for i in indexes] or ["-"])
        return [
            [v if isinstance(v, bytes) or v is None else v.encode() for v in values][: len(ix)]
            for values, (_, ix) in zip(pipe.execute(), wanted, strict=True)
        ]

    def delete_many(self, job_id: str, indexes: Sequence[int], pipe: Any = None) -> None:
        if indexes:
            (pipe or self.redis).unlink(*[self.key(job_id, i) for i in indexes])

    def sizes(self, job_id: str, indexes: Sequence[int]) -> list[int]:
        pipe = self.redis.pipeline(transaction=False)
        for i in indexes:
            pipe.strlen(self.key(job_id, i))
        return [int(n) for n in pipe.execute()] if indexes else []


class FileBlobs:
    """Blobs as files ``<root>/<job>/<index>`` on a shared volume (written atomically)."""

    pipelined = False
    expiring = False

    def __init__(self, root: str | Path, keep_s: int = 172_800) -> None:
        self.root = Path(root)
        self.keep_s = keep_s
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, job_id: str, index: int) -> Path:
        return self.root / job_id / str(index)

    def put_many(self, job_id: str, blobs: Mapping[int, bytes], pipe: Any = None) -> None:
        folder = self.root / job_id
        folder.mkdir(exist_ok=True)
        for index, data in blobs.items():
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
            with os.fdopen(fd, "wb") as fh:
                fh.write(data)
            os.replace(tmp, self._path(job_id, index))

    def get_many(self, job_id: str, indexes: Sequence[int]) -> list[bytes | None]:
        out: list[bytes | None] = []
        for index in indexes:
            try:
                out.append(self._path(job_id, index).read_bytes())
            except FileNotFoundError:
                out.append(None)
        return out

    def get_batch(self, wanted: Sequence[tuple[str, Sequence[int]]]) -> list[list[bytes | None]]:
        return [self.get_many(job_id, indexes) for job_id, indexes in wanted]

    def delete_many(self, job_id: str, indexes: Sequence[int], pipe: Any = None) -> None:
        for index in indexes:
            with contextlib.suppress(FileNotFoundError):
                self._path(job_id, index).unlink()
        with contextlib.suppress(OSError):  # the job's folder goes with its last upload
            (self.root / job_id).rmdir()

    def sizes(self, job_id: str, indexes: Sequence[int]) -> list[int]:
        out = []
        for index in indexes:
            try:
                out.append(self._path(job_id, index).stat().st_size)
            except FileNotFoundError:
                out.append(0)
        return out


def spent_blobs(
    indexes: Sequence[int],
    results: Mapping[int, ImageResult],
    kept: Collection[int] = (),
) -> list[int]:
    """Of ``indexes`` whose results were just stored (or were already: a redelivery), those
    whose blobs may be deleted: all but the images that failed for a retryable reason, now
    (``results``) or before (``kept``: a claim's), whose blobs are kept for a retry of the job."""
    return [
        i for i in indexes if i not in kept and not (isinstance(r := results.get(i), Failure) and r.retryable)
    ]


def keep_on(pipe: Any, blobs: BlobStore, job_id: str, indexes: Collection[int]) -> None:
    """Queue on ``pipe`` the listing of ``indexes``' blobs as kept for a retry, for a store
    whose blobs do not expire (:func:`reap_kept` deletes them ``keep_s`` seconds from now)."""
    if blobs.expiring or not indexes:
        return
    deadline = time.time() + blobs.keep_s
    pipe.zadd(keys.KEPT_BLOBS, {f"{job_id}:{i}": deadline for i in indexes})


def unkeep_on(pipe: Any, job_id: str, indexes: Collection[int]) -> None:
    """Queue on ``pipe`` the end of the listing of ``indexes``' kept blobs (deleted with their
    job)."""
    if indexes:
        pipe.zrem(keys.KEPT_BLOBS, *(f"{job_id}:{i}" for i in indexes))


#: A reap begun this long ago and not finished (its worker died, the store refused the delete)
#: is taken up again.
REAP_STALE_S = 600.0

#: Move the listed blobs due by ARGV[1] (now) from KEYS[1] (kept) to KEYS[2] (being reaped,
#: scored by when), at most ARGV[2], and take up again the reaps begun before ARGV[3]; returns
#: the members to delete. Moved in one step, so a retry (which queues only listed images) and a
#: reap never both have one.
_TAKE_DUE = """
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(due) do
  redis.call('ZREM', KEYS[1], m)
  redis.call('ZADD', KEYS[2], ARGV[1], m)
end
local stale = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[3], 'LIMIT', 0, ARGV[2])
for _, m in ipairs(stale) do
  redis.call('ZADD', KEYS[2], ARGV[1], m)
  due[#due + 1] = m
end
return due
"""


def reap_kept(client: redis.Redis, blobs: BlobStore, limit: int = 1000) -> int:
    """Delete the kept blobs whose time is up; returns how many. Each leaves the listing for
    :data:`~batchvision.server.keys.KEPT_BLOBS_REAPING` in one step (a retry queues only images
    still listed, so none is queued with its blob going), is deleted, and only then leaves
    that: a delete that fails, or a worker that dies, leaves it to a later reap."""
    now = time.time()
    due = [
        as_text(m)
        for m in client.eval(
            _TAKE_DUE,
            2,
            keys.KEPT_BLOBS,
            keys.KEPT_BLOBS_REAPING,
            f"{now:.3f}",
            limit,
            f"{now - REAP_STALE_S:.3f}",
        )
    ]
    by_job: dict[str, list[int]] = {}
    for member in due:
        job_id, _, index = member.rpartition(":")
        if index.isdigit():
            by_job.setdefault(job_id, []).append(int(index))
    for job_id, indexes in by_job.items():
        blobs.delete_many(job_id, indexes)
        client.zrem(keys.KEPT_BLOBS_REAPING, *(f"{job_id}:{i}" for i in indexes))
    return sum(len(v) for v in by_job.values())


class S3Blobs:
    """Blobs as objects ``<prefix><job>/<index>`` in a bucket (each ``PutObject`` is atomic);
    reads and writes of one call go in parallel on a small pool of threads."""

    pipelined = False
    # Objects stay until deleted (a bucket's lifecycle rule aside): kept ones are reaped.
    expiring = False

    def __init__(self, prefix: S3Url, s3: S3, threads: int = 16, keep_s: int = 172_800) -> None:
        self.prefix = prefix.folder
        self.keep_s = keep_s
        self.s3 = s3
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="s3-blobs")

    def _url(self, job_id: str, index: int) -> S3Url:
        return self.prefix.child(f"{job_id}/{index}")

    def put_many(self, job_id: str, blobs: Mapping[int, bytes], pipe: Any = None) -> None:
        list(self._pool.map(lambda item: self.s3.put(self._url(job_id, item[0]), item[1]), blobs.items()))

    def _get(self, url: S3Url) -> bytes | None:
        try:
            return self.s3.get(url)
        except S3Error as exc:
            if exc.code == "object_not_found":
                return None
            raise

    def get_many(self, job_id: str, indexes: Sequence[int]) -> list[bytes | None]:
        return list(self._pool.map(self._get, [self._url(job_id, i) for i in indexes]))

    def get_batch(self, wanted: Sequence[tuple[str, Sequence[int]]]) -> list[list[bytes | None]]:
        flat = [self._url(job_id, i) for job_id, indexes in wanted for i in indexes]
        got = iter(self._pool.map(self._get, flat))
        return [[next(got) for _ in indexes] for _, indexes in wanted]

    def delete_many(self, job_id: str, indexes: Sequence[int], pipe: Any = None) -> None:
        if indexes:
            self.s3.delete([self._url(job_id, i) for i in indexes])

    def sizes(self, job_id: str, indexes: Sequence[int]) -> list[int]:
        heads = self._pool.map(self.s3.head, [self._url(job_id, i) for i in indexes])
        return [head.size if head is not None else 0 for head in heads]


def open_blobs(url: str, client: redis.Redis, ttl_s: int, s3: S3Config | None = None) -> BlobStore:
    """The blob store named by ``BATCHVISION_BLOB_URL`` (``s3``: how to reach a bucket)."""
    if url in ("", "redis"):
        return RedisBlobs(client, ttl_s)
    parsed = urlparse(url)
    if parsed.scheme == "file":
        return FileBlobs(parsed.path, keep_s=ttl_s)
    if parsed.scheme == "s3":
        return S3Blobs(S3Url.parse(url), shared(s3 or S3Config()), keep_s=ttl_s)
    raise ValueError(
        f"unsupported BATCHVISION_BLOB_URL {url!r}: use 'redis', 'file:///dir' or 's3://bucket/prefix/'"
    )
