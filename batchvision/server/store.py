"""The job store: a job's lifecycle (create, add files, seal, cancel), its results, and reads.

Keys are named in :mod:`batchvision.server.keys`, the scripts live in
:mod:`batchvision.server.lua`. Exactly one result per image: results are written with
``HSETNX`` in a Lua script that raises ``done``/``failed``/``canceled`` only when the write
stored something, so a redelivered task never counts twice, and that finishes the job
(status, ``finished_at``, TTLs) in the same step.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from batchvision.core.model_refs import NAME_RE as MODEL_NAME_RE
from batchvision.core.priorities import DEFAULT_PRIORITY
from batchvision.core.results import (
    Failure,
    ImageResult,
    Passthrough,
    Row,
    canceled_result,
    decode,
    encode,
    status_of,
)
from batchvision.server import keys, lua
from batchvision.server.job_list import index_job, unindex_job
from batchvision.server.keys import JobKeys
from batchvision.server.outputs import output_document
from batchvision.server.sources import listing_document
from batchvision.server.text import as_text
from batchvision.server.webhooks import callback_document

#: Only a job of at most this many files is created with ``reply_to``: the script that finishes
#: a job publishes at most this many rows (and :data:`~batchvision.server.lua.REPLY_MAX_BYTES`).
REPLY_MAX_ROWS = lua.REPLY_MAX_ROWS


@dataclass(frozen=True)
class Routing:
    """Where a job's chunks are queued: its model's queues (``None``: the default model's),
    the tier of its priority."""

    model: str | None
    priority: int = DEFAULT_PRIORITY


@dataclass(frozen=True)
class Counts:
    """Results newly stored by one :meth:`JobStore.record` call, by outcome."""

    done: int = 0
    failed: int = 0
    canceled: int = 0

    @property
    def total(self) -> int:
        return self.done + self.failed + self.canceled


def _eval(pipe: Any, script: str, keys: list[str], args: list[Any]) -> None:
    # EVAL with the source, not EVALSHA: redis-py would check a pipeline's scripts with an
    # extra SCRIPT EXISTS round trip, and a NOSCRIPT inside MULTI (after a Redis restart
    # emptied the script cache) would not roll back the rest. Redis caches the compiled script.
    pipe.eval(script, len(keys), *keys, *args)


def _routing(raw_model: Any, raw_priority: Any) -> Routing:
    """A job's :class:`Routing` from its hash's ``model`` and ``priority`` fields."""
    name = as_text(raw_model) if raw_model else ""
    return Routing(
        name if MODEL_NAME_RE.match(name) else None, int(raw_priority) if raw_priority else DEFAULT_PRIORITY
    )


def _document(job_id: str, raw: dict[Any, Any]) -> dict[str, Any] | None:
    """A job hash as the public status document (``None`` for a missing job)."""
    if not raw:
        return None
    h = {as_text(k): as_text(v) for k, v in raw.items()}
    status, counts = status_of(h)
    return {
        "job_id": job_id,
        "status": status.value,
        **counts,
        "sealed": h.get("sealed") == "1",
        "created_at": float(h["created_at"]),
        "finished_at": float(h["finished_at"]) if h.get("finished_at") else None,
        "model": h.get("model", ""),
        "model_version": int(h["version"]) if h.get("version") else None,
        "top_k": int(h["top_k"]) if h.get("top_k") else None,
        "min_score": float(h["min_score"]) if h.get("min_score") else None,
        "priority": int(h["priority"]) if h.get("priority") else DEFAULT_PRIORITY,
        "owner": h.get("owner", ""),
        "callback": callback_document(h),
        "passthrough": _passthrough_shape(h),
        "output": output_document(h),
        "listing": listing_document(h),
    }


def _from_reply(job_id: str, idx: list[str], reply: bytes) -> tuple[dict[str, Any] | None, list[Row]] | None:
    """:meth:`JobStore.snapshot` from the JSON the finish published: ``None`` (read the job
    instead) if it is not that, or holds fewer rows than ``idx`` names."""
    try:
        flat, names, results = json.loads(reply)
        # Lua's JSON writes an empty table as {} and a missing field as false.
        names, results = names or [], results or []
        if len(names) < len(idx) or len(results) < len(idx):
            return None
        job = _document(job_id, dict(zip(flat[::2], flat[1::2], strict=True)))
        if job is None or not idx:
            return job, []
        rows = _rows(idx[: job["total"]], [n or None for n in names], [r or None for r in results])
        return job, list(rows)
    except (ValueError, TypeError, KeyError, AttributeError, IndexError):
        # Not UTF-8, not JSON, not the three parts, not a job: whoever published it, read the job.
        return None


def _passthrough_shape(h: dict[str, str]) -> tuple[bool, tuple[str, ...]] | None:
    """Whether the job's inputs carry ids, and the names of their pass-through columns
    (``None``: they carry nothing)."""
    if "pt" not in h:
        return None
    return h["pt"] == "id", tuple(json.loads(h.get("pt_columns") or "[]"))


def _rows(
    idx: Sequence[str], names: Sequence[Any], results: Sequence[Any], passed: Sequence[Any] | None = None
) -> Iterator[Row]:
    """Result rows from ``HMGET`` replies of the files and results hashes (and of the files
    hash's ``m:<index>`` pass-through fields, for a job that has them)."""
    for n, (i, name, res) in enumerate(zip(idx, names, results, strict=False)):
        pt = passed[n] if passed is not None else None
        yield Row(
            int(i),
            as_text(name) if name else i,
            decode(res) if res is not None else None,
            Passthrough.decode(pt) if pt is not None else None,
        )


class JobStore:
    """Jobs and results in Redis; every method is safe to call from many threads."""

    def __init__(self, client: redis.Redis, *, result_ttl_s: int, blob_ttl_s: int) -> None:
        self.redis = client
        self.result_ttl_s = result_ttl_s
        self.open_ttl_s = blob_ttl_s
        self._record = client.register_script(lua.RECORD)
        self._seal = client.register_script(lua.SEAL)
        self._cancel_flag = client.register_script(lua.CANCEL_FLAG)
        self._add = client.register_script(lua.ADD)

    def create(
        self,
        job_id: str,
        *,
        model: str,
        owner: str = "",
        pipe: Any = None,
        options: Mapping[str, str] | None = None,
        reply_to: str | None = None,
    ) -> None:
        """Open an empty job; files are added with :meth:`add_files`, then :meth:`seal`.
        With ``pipe`` (a Redis pipeline) the writes are only queued on it. ``options``: the
        job's per-job options (:meth:`JobOptions.to_hash <batchvision.core.model_refs.JobOptions.to_hash>`),
        which set ``model`` too. ``reply_to``: a request waits to answer with the job's rows,
        so its finish is published with them on this channel (its waiter's
        :func:`~batchvision.server.keys.reply_channel`; see :meth:`snapshot`)."""
        key = JobKeys.of(job_id).job
        own = pipe is None
        pipe = self.redis.pipeline() if own else pipe
        created = round(time.time(), 3)
        pipe.hset(
            key,
            mapping={
                "total": 0,
                "done": 0,
                "failed": 0,
                "canceled": 0,
                "sealed": 0,
                "cancel": 0,
                "created_at": f"{created:.3f}",
                "model": model,
                "owner": owner,
                **(options or {}),
                **({"reply_to": reply_to} if reply_to else {}),
            },
        )
        pipe.expire(key, self.open_ttl_s)
        pipe.zadd(keys.ACTIVE, {job_id: time.time() + self.open_ttl_s})
        index_job(pipe, owner, job_id, created, self.result_ttl_s + self.open_ttl_s)
        if own:
            pipe.execute()

    def create_whole(
        self,
        pipe: Any,
        job_id: str,
        *,
        model: str,
        owner: str,
        files: Sequence[tuple[str, str]],
        errors: Sequence[tuple[int, ImageResult]],
        seal: bool,
        options: Mapping[str, str] | None = None,
        sizes: Sequence[int] | None = None,
        reply_to: str | None = None,
    ) -> None:
        """Queue on ``pipe`` (a ``MULTI`` pipeline) a new job with all of its files, the results
        of files refused at upload, and optionally its seal: one round trip, all or nothing.
        The files' keys must be distinct; file ``i`` gets index ``i``. ``sizes``: the bytes
        each file's blob holds (0 for a refused file), counted against the queue's byte budget
        and the owner's quota until the file has a result. ``reply_to``: as for :meth:`create`,
        for a job of at most :data:`REPLY_MAX_ROWS` files."""
        k = JobKeys.of(job_id).lua()
        reply_to = reply_to if len(files) <= REPLY_MAX_ROWS else None
        self.create(job_id, model=model, owner=owner, pipe=pipe, options=options, reply_to=reply_to)
        _eval(pipe, lua.ADD, k, self._add_args(job_id, files, sizes))
        if errors:
            _eval(pipe, lua.RECORD, k, self._record_args(job_id, errors))
        if seal:
            _eval(pipe, lua.SEAL, k, [self.result_ttl_s, f"{time.time():.3f}", job_id])

    def add_files(
        self,
        job_id: str,
        files: Sequence[tuple[str, str]],
        sizes: Sequence[int] | None = None,
        *,
        unconfirmed: bool = False,
    ) -> list[tuple[int, bool]]:
        """Index ``(key, filename)`` pairs in order; a key the job already has keeps its index.

        The key is the file's relative path, so a re-sent part enqueues nothing twice.
        ``sizes``: as for :meth:`create_whole` (counted for new files only). ``unconfirmed``:
        the new indexes stay in :data:`~batchvision.server.keys.UNCONFIRMED_PARTS` (member
        :func:`~batchvision.server.recovery.part_member`) until the caller confirms them.
        Returns ``(index, is_new)`` per file. Raises ``LookupError`` for an unknown job and
        ``PermissionError`` for a sealed or canceled one.
        """
        k = JobKeys.of(job_id).lua()
        if unconfirmed:
            k.append(keys.UNCONFIRMED_PARTS)
        out = self._add(keys=k, args=self._add_args(job_id, files, sizes))
        if out == -1:
            raise LookupError(job_id)
        if out == -2:
            raise PermissionError(job_id)
        return [(int(out[i]), bool(out[i + 1])) for i in range(0, len(out), 2)]

    def touch(self, job_id: str) -> None:
        """Keep an open job (and its files) alive another open-upload TTL, as an added file
        would: raises as :meth:`add_files` does."""
        self.add_files(job_id, [])

    def seal(self, job_id: str) -> None:
        """No more files: the job finishes once every image has a result."""
        self._seal(keys=JobKeys.of(job_id).lua(), args=[self.result_ttl_s, f"{time.time():.3f}", job_id])

    def record(self, job_id: str, results: Sequence[tuple[int, ImageResult]]) -> Counts:
        """Store results idempotently; returns how many of each kind were new (none on a redelivery)."""
        if not results:
            return Counts()
        done, failed, canceled = self._record(
            keys=JobKeys.of(job_id).lua(), args=self._record_args(job_id, results)
        )
        return Counts(int(done), int(failed), int(canceled))

    def record_on(self, pipe: Any, job_id: str, results: Sequence[tuple[int, ImageResult]]) -> bool:
        """Queue :meth:`record` on ``pipe``; its reply ``[done, failed, canceled]`` comes back
        with the pipeline's. Returns whether anything was queued."""
        if not results:
            return False
        _eval(pipe, lua.RECORD, JobKeys.of(job_id).lua(), self._record_args(job_id, results))
        return True

    def _add_args(
        self, job_id: str, files: Sequence[tuple[str, str]], sizes: Sequence[int] | None
    ) -> list[str | int]:
        args: list[str | int] = [self.open_ttl_s, f"{time.time():.3f}", job_id]
        for (key, filename), size in zip(files, sizes or [0] * len(files), strict=True):
            args += [key, filename, size]
        return args

    def _record_args(self, job_id: str, results: Sequence[tuple[int, ImageResult]]) -> list[Any]:
        args: list[Any] = [self.result_ttl_s, f"{time.time():.3f}", job_id]
        for index, result in results:
            args += [index, encode(result), result.outcome]
        return args

    def get(self, job_id: str) -> dict[str, Any] | None:
        """The job's public status document, or ``None`` if it does not exist."""
        return _document(job_id, self.redis.hgetall(JobKeys.of(job_id).job))

    def get_many(self, job_ids: Sequence[str]) -> list[dict[str, Any] | None]:
        """:meth:`get` for several jobs, in one round trip."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hgetall(JobKeys.of(job_id).job)
        return [_document(j, raw) for j, raw in zip(job_ids, pipe.execute(), strict=True)]

    def snapshot(
        self, job_id: str, rows: int, reply: bytes | None = None
    ) -> tuple[dict[str, Any] | None, list[Row]]:
        """The status document and the first ``rows`` result rows, in one round trip (a small
        job's whole answer). ``reply``: what the news of the job's finish carried (see
        :meth:`create`'s ``reply_to``); when it holds them, nothing is read."""
        idx = [str(i) for i in range(rows)]
        if reply is not None and (heard := _from_reply(job_id, idx, reply)) is not None:
            return heard
        k = JobKeys.of(job_id)
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(k.job)
        if idx:
            pipe.hmget(k.files, idx)
            pipe.hmget(k.results, idx)
        raw, *pages = pipe.execute()
        job = _document(job_id, raw)
        if job is None or not idx:
            return job, []
        return job, list(_rows(idx[: job["total"]], *pages))

    def is_gone(self, job_id: str, owner: str) -> bool:
        """True if the job existed, belonged to ``owner`` (an API key's id, ``""`` without
        keys), and its results expired. (A tombstone written before it named its owner, ``1``,
        answers for anyone until it expires.)"""
        tomb = self.redis.get(JobKeys.of(job_id).tomb)
        return tomb is not None and tomb in (b"1", b"o:" + owner.encode())

    def unresolved(self, job_id: str, indexes: Sequence[int] | range) -> list[int]:
        """The indexes among ``indexes`` that have no result yet."""
        if not indexes:
            return []
        have = self.redis.hmget(JobKeys.of(job_id).results, [str(i) for i in indexes])
        return [i for i, v in zip(indexes, have, strict=True) if v is None]

    def filenames(self, job_id: str, indexes: Sequence[int]) -> list[str]:
        if not indexes:
            return []
        names = self.redis.hmget(JobKeys.of(job_id).files, [str(i) for i in indexes])
        return [as_text(n) if n is not None else str(i) for i, n in zip(indexes, names, strict=True)]

    def file_keys(self, job_id: str) -> list[str]:
        """Every file key (relative path) the job has."""
        return [as_text(k) for k in self.redis.hkeys(JobKeys.of(job_id).paths)]

    def cancel(self, job_id: str, page: int = 1000) -> bool:
        """Cancel what has no result yet; results so far stay. False if the job is unknown.

        The flag is persistent (workers check it before each chunk, unlike Celery's in-memory
        revokes), and every unresolved image gets a ``canceled`` result at once, so the job
        finishes now; a worker mid-batch loses the ``HSETNX`` race and counts nothing.
        """
        key = JobKeys.of(job_id).job
        finished, sealed = self.redis.hmget(key, ["finished_at", "sealed"])
        if sealed is None:
            return False
        if finished is not None:
            return True  # nothing left to cancel
        # "open": the upload itself was cut short, so the job is canceled whatever it received.
        if not self._cancel_flag(keys=[key], args=["1" if sealed == b"1" else "open"]):
            return False  # deleted since it was read
        total = int(self.redis.hget(key, "total") or 0)
        marker = canceled_result()
        for start in range(0, total, page):
            todo = self.unresolved(job_id, range(start, min(total, start + page)))
            self.record(job_id, [(i, marker) for i in todo])
        self.seal(job_id)
        return True

    def retryable_failures(self, pipe: Any, job_id: str) -> dict[int, Failure]:
        """The stored errors of ``job_id`` that a retry queues again, by index (read on
        ``pipe``, a pipeline in immediate mode that may be watching the job)."""
        out: dict[int, Failure] = {}
        for index, raw in pipe.hgetall(JobKeys.of(job_id).results).items():
            result = decode(raw)
            if isinstance(result, Failure) and result.retryable:
                out[int(index)] = result
        return dict(sorted(out.items()))

    def requeue(
        self, pipe: Any, job_id: str, images: Sequence[tuple[int, int]], *, listed: bool = False
    ) -> None:
        """Queue on ``pipe`` (a ``MULTI`` pipeline) the removal of the results of ``images``
        (``(index, bytes of its blob)`` pairs) of a finished job, which then runs again:
        :data:`~batchvision.server.lua.RETRY`. Its reply is how many were removed (-1: no job,
        -2: not finished, -3: canceled). ``listed``: the blobs are kept in a store that lists
        them (:data:`~batchvision.server.keys.KEPT_BLOBS`): an image whose listing is gone
        stays, and the reply is ``[n, index...]`` with those."""
        args: list[Any] = [self.result_ttl_s, f"{time.time():.3f}", job_id]
        for index, size in images:
            args += [index, size]
        k = JobKeys.of(job_id).lua()
        if listed:
            k.append(keys.KEPT_BLOBS)
        _eval(pipe, lua.RETRY, k, args)

    def remove(self, job_id: str, owner: str) -> bool:
        """Remove the job, its results and its place in ``owner``'s job list, after giving
        back what it still holds in the queue's counters (its blobs are the blob store's).
        False if it did not exist."""
        # Not a MULTI: Redis at maxmemory refuses every command queued in one, and removing a
        # job is how a full Redis gets memory back (the script deletes before it writes).
        pipe = self.redis.pipeline(transaction=False)
        _eval(pipe, lua.REMOVE, JobKeys.of(job_id).lua(), [self.result_ttl_s, f"{time.time():.3f}", job_id])
        unindex_job(pipe, owner, job_id)
        existed, _ = pipe.execute()
        return bool(existed)

    def model_of(self, job_id: str) -> str | None:
        """The job's model name (``None``: unknown job, or one from before models had names)."""
        return self.routing_of(job_id).model

    def routing_of(self, job_id: str) -> Routing:
        """Where the job's chunks go: its model (``None``: unknown job, or one from before
        models had names) and priority (the default for a job from before priorities)."""
        raw_model, raw_priority = self.redis.hmget(JobKeys.of(job_id).job, ["model", "priority"])
        return _routing(raw_model, raw_priority)

    def routings(self, job_ids: Sequence[str]) -> list[Routing | None]:
        """:meth:`routing_of` for each of ``job_ids`` in one round trip; ``None`` for a job
        that is gone."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            pipe.hmget(JobKeys.of(job_id).job, ["created_at", "model", "priority"])
        return [None if created is None else _routing(m, p) for created, m, p in pipe.execute()]

    def exists(self, job_id: str) -> bool:
        return bool(self.redis.exists(JobKeys.of(job_id).job))

    def is_open(self, job_id: str) -> bool:
        """True while the job takes more files (not sealed, not canceled, not gone)."""
        sealed, cancel = self.redis.hmget(JobKeys.of(job_id).job, ["sealed", "cancel"])
        return sealed == b"0" and cancel in (b"0", None)

    def iter_results(
        self, job_id: str, offset: int = 0, limit: int | None = None, page: int = 500
    ) -> Iterator[Row]:
        """Result rows in upload order, read page by page so memory stays bounded."""
        job = self.get(job_id)
        if job is None:
            return
        end = job["total"] if limit is None else min(job["total"], offset + limit)
        for start in range(offset, end, page):
            rows, _ = self.results_page(job_id, start, min(end, start + page), job["passthrough"] is not None)
            yield from rows

    def results_page(self, job_id: str, start: int, end: int, passthrough: bool) -> tuple[list[Row], int]:
        """Rows ``start`` to ``end - 1`` and, read in the same transaction, how many parts of
        the job were written out (``spilled``): rows of those parts left Redis, so a caller
        that finds ``start`` inside one reads them from the part instead."""
        k = JobKeys.of(job_id)
        idx = [str(i) for i in range(start, end)]
        pipe = self.redis.pipeline()  # MULTI: a part written meanwhile is all or nothing here
        pipe.hget(k.job, "spilled")
        pipe.hmget(k.files, idx)
        pipe.hmget(k.results, idx)
        if passthrough:
            pipe.hmget(k.files, [f"m:{i}" for i in idx])
        spilled, *replies = pipe.execute()
        return list(_rows(idx, *replies)), int(spilled or 0)

    def passthrough_on(
        self, pipe: Any, job_id: str, passed: Sequence[tuple[int, Passthrough]], columns: Sequence[str]
    ) -> None:
        """Queue on ``pipe`` what inputs pass through (``m:<index>`` beside their filenames) and
        the job's shape of it: whether they carry ids, and the column names in first-seen order)."""
        if not passed:
            return
        k = JobKeys.of(job_id)
        pipe.hset(k.files, mapping={f"m:{i}": p.encode() for i, p in passed})
        fields: dict[str | bytes, str | bytes] = {"pt_columns": json.dumps(list(columns))}
        if any(p.id is not None for _, p in passed):
            fields["pt"] = "id"
        else:
            pipe.hsetnx(k.job, "pt", "columns")
        pipe.hset(k.job, mapping=fields)

    def is_finished(self, job_id: str) -> bool:
        """True once the job has finished (also when it no longer exists: nothing to wait for)."""
        finished, total = self.redis.hmget(JobKeys.of(job_id).job, ["finished_at", "total"])
        return finished is not None or total is None
