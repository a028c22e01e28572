"""An API key's jobs (``GET /v1/jobs``): each job is indexed at creation in a sorted set per
owner scored by its creation time (:func:`batchvision.server.keys.owner_jobs`), read newest
first a page at a time. Jobs whose records expired are dropped from the index as pages meet them.

The cursor is the creation time and id of the last job of a page: the next page starts right
after it in the index's order (time descending, then id descending), so a page boundary never
skips or repeats a job, even among jobs created in the same millisecond or while new jobs
arrive.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from batchvision.core.errors import BadRequest
from batchvision.core.job_list import CURSOR_PATTERN
from batchvision.server import keys

_CURSOR_RE = re.compile(CURSOR_PATTERN)


def index_job(pipe: Any, owner: str, job_id: str, created: float, ttl_s: int) -> None:
    """Queue on ``pipe`` the index entry of a new job; the index lives as long as its newest job."""
    key = keys.owner_jobs(owner)
    pipe.zadd(key, {job_id: created})
    pipe.expire(key, ttl_s)


def unindex_job(pipe: Any, owner: str, job_id: str) -> None:
    """Queue on ``pipe`` the removal of a deleted job from its owner's index."""
    pipe.zrem(keys.owner_jobs(owner), job_id)


def cursor_of(created: float, job_id: str) -> str:
    return f"{created:.3f}-{job_id}"


def parse_cursor(text: str) -> tuple[float, str]:
    """``400 bad_parameter`` for a cursor this service did not write."""
    if not _CURSOR_RE.match(text):
        raise BadRequest(
            f"query parameter 'cursor': {text[:60]!r} is not a cursor; pass next_cursor of the previous page",
            code="bad_parameter",
            details=[{"in": "query parameter", "field": "cursor", "value": text[:300]}],
        )
    created, _, job_id = text.partition("-")
    return float(created), job_id


@dataclass
class Page:
    jobs: list[dict[str, Any]]
    #: Where the next page starts; ``None`` when no job is left (a full last page may still
    #: carry one, and the page after it is empty).
    next_cursor: str | None


#: Index entries one request reads at most (a status filter that matches few jobs would
#: otherwise read the whole index): past it, the page ends short, with a cursor to go on from.
MAX_SCANNED = 2000


def list_jobs(
    client: redis.Redis,
    get_many: Callable[[Sequence[str]], list[dict[str, Any] | None]],
    owner: str,
    *,
    limit: int,
    cursor: str | None = None,
    status: str | None = None,
    created_after: float | None = None,
    created_before: float | None = None,
    max_scanned: int = MAX_SCANNED,
) -> Page:
    """A page of ``owner``'s jobs, newest first (``get_many``: the job store's documents).

    It reads the index in batches, each starting right after the last job read (by creation
    time and id, like the cursor, never by position: jobs created meanwhile go in ahead of it
    and shift no batch). A page may hold fewer than ``limit`` jobs with a ``next_cursor`` when
    it read ``max_scanned`` entries without filling up."""
    key = keys.owner_jobs(owner)
    after = parse_cursor(cursor) if cursor is not None else None
    high: str | float = "+inf"
    if created_before is not None:
        high = f"({created_before}"
    if after is not None and (created_before is None or after[0] < created_before):
        high = after[0]
    low: str | float = created_after if created_after is not None else "-inf"
    out: list[dict[str, Any]] = []
    batch = max(limit, 50)
    skip = 0  # entries at the score ``high`` already read (jobs of one millisecond)
    scanned = 0
    while True:
        raw: list[tuple[Any, Any]] = list(
            client.zrevrangebyscore(key, high, low, start=skip, num=batch, withscores=True)  # type: ignore[arg-type]
        )
        if not raw:
            return Page(out, None)
        read: list[tuple[str, float]] = [
            (m.decode() if isinstance(m, bytes) else str(m), round(float(s), 3)) for m, s in raw
        ]
        ids = read
        if after is not None:  # the same creation time as the cursor: only ids after it
            ids = [(j, s) for j, s in read if s < after[0] or j < after[1]]
        docs = get_many([j for j, _ in ids])
        gone = [j for (j, _), doc in zip(ids, docs, strict=True) if doc is None]
        if gone:  # expired: out of the index
            client.zrem(key, *gone)
        for (job_id, created), doc in zip(ids, docs, strict=True):
            after = (created, job_id)
            scanned += 1
            if doc is not None and (status is None or doc["status"] == status):
                out.append(doc)
                if len(out) == limit:
                    return Page(out, cursor_of(created, job_id))
            if scanned >= max_scanned:
                return Page(out, cursor_of(created, job_id))
        if len(raw) < batch:
            return Page(out, None)
        # The next batch starts at the last score read, past the entries of it read already
        # (those still in the index: an expired one was just removed).
        last = read[-1][1]
        at_last = sum(1 for j, sc in read if sc == last and j not in gone)
        skip = (skip if high == last else 0) + at_last
        high = last
