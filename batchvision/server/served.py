"""The result rows of a job as ``/results`` serves them: from Redis, and, for a job written
to its output prefix in parts, the rows of the parts already written from their JSON Lines
files (those rows left Redis).

Each page of rows is read from Redis in one transaction together with the count of parts
written, so a part written while a client reads is noticed: its rows are read from the part,
never served as pending.
"""

from __future__ import annotations

import itertools
import json
import time
from collections.abc import Callable, Iterator

from batchvision.core.errors import Conflict
from batchvision.core.results import Row
from batchvision.server.exports import part_url
from batchvision.server.s3 import S3, S3Error, S3Url
from batchvision.server.store import JobStore

#: Rows per Redis read.
PAGE = 500


class PartMissing(Conflict):
    """A written part's JSON Lines file is not there or not whole (deleted, cut short or
    changed in the bucket): its rows can be read only where the output went.
    ``details`` names the first row served again and the output prefix."""

    code = "results_in_output"

    def __init__(self, message: str, *, first_served: int, output: str) -> None:
        details = [{"in": "query", "field": "offset", "first_served": first_served, "output": output}]
        super().__init__(message, details=details)


def iter_rows(
    store: JobStore, s3: Callable[[], S3], job_id: str, offset: int = 0, limit: int | None = None
) -> Iterator[Row]:
    """Rows ``offset`` onwards (``limit`` at most) in upload order, from Redis or the parts
    they were written to. Raises :class:`PartMissing`, or :class:`S3Error` when the store
    cannot be read."""
    job = store.get(job_id)
    if job is None:
        return
    out = job["output"]
    size = int(out["part_rows"] or 0) if out is not None else 0
    passthrough = job["passthrough"] is not None
    end = job["total"] if limit is None else min(job["total"], offset + limit)
    pos = offset
    while pos < end:
        rows, spilled = store.results_page(job_id, pos, min(end, pos + PAGE), passthrough)
        if pos >= spilled * size:
            yield from rows
            pos += len(rows)
            continue
        assert out is not None  # spilled > 0 only for a job with an output in parts
        part = pos // size
        stop = min(end, (part + 1) * size)
        yield from _part_rows(s3(), S3Url.parse(out["url"]).folder, part, size, pos, stop)
        pos = stop


def _part_rows(s3: S3, prefix: S3Url, part: int, size: int, start: int, stop: int) -> Iterator[Row]:
    """Rows ``start`` to ``stop - 1`` of written part ``part`` (of ``size`` rows). A read that
    breaks off (a reset connection) is read again from the part's start, its rows served
    already skipped, as :meth:`S3.get` reads a body again: the client's answer, already
    begun, must not end short."""
    url = part_url(prefix, "jsonl", part)
    expected = start
    since = time.monotonic()
    for attempt in itertools.count(1):
        try:
            for line in s3.lines(url):
                if not line:
                    continue
                row = Row.from_document(json.loads(line))
                if row.index < expected:
                    continue
                if row.index >= stop:
                    break
                yield row
                expected = row.index + 1
        except S3Error as exc:
            if exc.code in ("object_not_found", "bucket_not_found"):
                why = "is not in the bucket"
                break
            wait = s3.body_broke(exc, attempt, since)
            if wait is None:
                raise
            time.sleep(wait)
            continue
        except (ValueError, KeyError, TypeError) as exc:
            why = f"is not a part's JSON Lines ({type(exc).__name__}: {exc})"
            break
        if expected >= stop:
            return
        why = f"ends at row {expected}, before row {stop}"
        break
    after = (part + 1) * size
    raise PartMissing(
        f"part {part} of the job ({url}) {why}: read the rows from {prefix} or ask for offset >= {after}",
        first_served=after,
        output=str(prefix),
    )
