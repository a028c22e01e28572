"""Results written to a job's output prefix (``s3://``) when it finishes: CSV, JSON Lines and
Parquet (``BATCHVISION_OUTPUT_FORMATS``), then a ``_SUCCESS`` manifest.

**Durable** like completion webhooks: the Lua step that finishes a job with an ``out_url``
adds it to :data:`~batchvision.server.keys.EXPORTS` (score: when it is due). An
:class:`Exporter` thread in every worker process leases due jobs (their score moves to
``now + lease``, renewed while it writes), writes, and records the outcome while the lease is
still its own. A worker killed mid-write leaves the lease to run out, and another writes the
whole output again: the files have fixed names, so nothing is left half-written or doubled.

**Atomic**: each file is streamed from the store page by page into a local temporary file (never
the whole job in memory), then uploaded in one ``PutObject`` or a multipart upload, which S3
shows only when complete. ``_SUCCESS`` comes last and lists every file with its size and row
count: a reader that sees it sees whole files.

**Failures**: throttling and an unreachable store are retried with backoff (``out_state``
stays ``pending``, ``out_error`` says why) while results are kept (``RESULT_TTL_S``); access denied, a
missing bucket or any other refusal ends as ``failed`` with the code. The job's own status does
not change: its results are still served by ``/results`` until they expire.

A job written in parts (a large prefix job) meets the same failures while it runs: a part that
cannot be written is tried again with backoff (``out_error`` says why, ``op_attempts`` and
``op_failed_at`` count the failures in a row), and meanwhile the listing waits
(:mod:`~batchvision.server.listing`), so the results that could not leave Redis stay bounded.
A refusal, or a store away longer than ``RESULT_TTL_S``, cancels the job: it could never write
its output, and would only fill Redis. Its end then records the output as the others'.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any

import redis

from batchvision.core.results import Failure, Prediction, Row, csv_header, csv_row
from batchvision.server import keys
from batchvision.server.backoff import backoff
from batchvision.server.keys import JobKeys
from batchvision.server.leases import IF_OURS, Lease, LeasedWorker, due_again_if, now_ms
from batchvision.server.outputs import SUCCESS
from batchvision.server.s3 import S3, S3Error, S3Url
from batchvision.server.store import JobStore
from batchvision.server.text import as_text, hash_fields

log = logging.getLogger(__name__)

#: Record an attempt while the lease is ours. KEYS: the set, the job hash. ARGV: job id, lease,
#: state (written, pending: retry at ARGV[4], failed; ``dropped``: leave the set, the job hash
#: untouched; ``later``: a job written in parts, due again at ARGV[4], with an error if a part
#: failed, which counts a failure in a row, the first if ARGV[6] is :data:`AFRESH`), next due,
#: error, files JSON, now.
RECORD = (
    IF_OURS
    + """
if ARGV[3] == 'dropped' then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return 1
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
  return -1
end
if ARGV[3] == 'later' then
  redis.call('ZADD', KEYS[1], 'XX', ARGV[4], ARGV[1])
  if ARGV[5] ~= '' then  -- a part not written: one more failure in a row (the first: 'afresh')
    if ARGV[6] == 'afresh' then redis.call('HDEL', KEYS[2], 'op_attempts', 'op_failed_at') end
    redis.call('HINCRBY', KEYS[2], 'op_attempts', 1)
    redis.call('HSETNX', KEYS[2], 'op_failed_at', ARGV[7])
    redis.call('HSET', KEYS[2], 'out_error', ARGV[5])
  elseif redis.call('HEXISTS', KEYS[2], 'op_attempts') == 1 then
    redis.call('HDEL', KEYS[2], 'op_attempts', 'op_failed_at', 'out_error')
  end
  return 1
end
redis.call('HINCRBY', KEYS[2], 'out_attempts', 1)
redis.call('HSET', KEYS[2], 'out_state', ARGV[3], 'out_error', ARGV[5])
if ARGV[3] == 'written' then
  redis.call('HSET', KEYS[2], 'out_files', ARGV[6], 'out_written_at', ARGV[7])
end
"""
    + due_again_if("pending")
)

#: A write that failed for a transient reason is tried again: from a second, doubling, at most
#: five minutes apart (for the exporter's retry window after the job finished).
RETRY_FIRST_S = 1.0
RETRY_CAP_S = 300.0
#: What :meth:`Exporter.export` returns for a job it leaves alone (gone, or not finished): it
#: leaves the set, and its ``out_state`` (one of :class:`~batchvision.core.documents.OutputState`'s)
#: is not written.
DROPPED = "dropped"
#: What :meth:`Exporter.export` returns for a running job written in parts: due again soon.
LATER = "later"
#: RECORD's files argument for a part's failure after parts were written in the same look.
AFRESH = "afresh"
#: The job-hash fields that say whether a running job's next part can be written.
PART_FIELDS = ("part_rows", "spilled", "ls_url", "ls_images", "ls_after", "out_url", "finished_at")
#: How soon a running job written in parts is looked at again (ms).
PARTS_POLL_MS = 1000

#: A part written: its results leave Redis (with the delivery counts of its chunks and images),
#: while the lease is ours and the part is the next one. KEYS: the set, the job hash, its
#: results, files, paths and tries hashes. ARGV: job id, lease, part, its sizes (JSON), n, then n
#: indexes, then the paths keys of those images.
SPILL = (
    IF_OURS
    + """
if tonumber(redis.call('HGET', KEYS[2], 'spilled') or '0') ~= tonumber(ARGV[3]) then return 0 end
local n = tonumber(ARGV[5])
for i = 6, 5 + n do
  redis.call('HDEL', KEYS[3], ARGV[i])
  redis.call('HDEL', KEYS[4], ARGV[i], 's:' .. ARGV[i], 'm:' .. ARGV[i])
  redis.call('HDEL', KEYS[6], 'chunk:' .. ARGV[i], 'image:' .. ARGV[i])
end
for i = 6 + n, #ARGV do redis.call('HDEL', KEYS[5], ARGV[i]) end
redis.call('HSET', KEYS[2], 'spilled', tonumber(ARGV[3]) + 1, 'op:' .. ARGV[3], ARGV[4])
redis.call('HDEL', KEYS[2], 'p:' .. ARGV[3])
return 1
"""
)

#: File name and content type of each output format.
FORMATS = {
    "csv": ("results.csv", "text/csv"),
    "jsonl": ("results.jsonl", "application/x-ndjson"),
    "parquet": ("results.parquet", "application/vnd.apache.parquet"),
}
#: Rows per Parquet row group (and between lease renewals).
PAGE = 10_000


@dataclass(frozen=True)
class PartFailure:
    """Why a part of a running job was not written (``code: message``), and whether a later
    try may succeed."""

    error: str
    transient: bool


@dataclass(frozen=True)
class Written:
    """One file of an output: where, how many bytes and rows."""

    url: str
    bytes: int
    rows: int


def _parquet_writer(fh: IO[bytes], columns: Sequence[str]) -> tuple[Any, Callable[[list[Row]], None]]:
    """A pyarrow Parquet writer on ``fh`` and the function that appends a page of rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    fields = [
        pa.field("index", pa.int64()),
        pa.field("filename", pa.string()),
        pa.field("id", pa.string()),
        pa.field("status", pa.string()),
        pa.field("label", pa.string()),
        pa.field("score", pa.float64()),
        pa.field("class_id", pa.int64()),
        pa.field("top_k", pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))),
        pa.field("error_code", pa.string()),
        pa.field("error_message", pa.string()),
        pa.field("model", pa.string()),
        pa.field("version", pa.int64()),
        *(pa.field(c, pa.string()) for c in columns),
    ]
    schema = pa.schema(fields)
    writer = pq.ParquetWriter(fh, schema, compression="zstd")

    def append(rows: list[Row]) -> None:
        cols: dict[str, list[Any]] = {f.name: [] for f in fields}
        for row in rows:
            r, pt = row.result, row.passthrough
            given = dict(pt.columns) if pt is not None else {}
            pred = r if isinstance(r, Prediction) else None
            fail = r if isinstance(r, Failure) else None
            cols["index"].append(row.index)
            cols["filename"].append(row.filename)
            cols["id"].append(pt.id if pt is not None else None)
            cols["status"].append("pending" if r is None else "error" if fail else "ok")
            cols["label"].append(pred.label if pred else None)
            cols["score"].append(pred.score if pred else None)
            cols["class_id"].append(pred.class_id if pred else None)
            cols["top_k"].append([{"label": s.label, "score": s.score} for s in pred.top_k] if pred else None)
            cols["error_code"].append(fail.code if fail else None)
            cols["error_message"].append(fail.message if fail else None)
            cols["model"].append(pred.model if pred else None)
            cols["version"].append(pred.version if pred else None)
            for c in columns:
                v = given.get(c)
                cols[c].append(None if v is None else str(v))
        writer.write_table(pa.table(cols, schema=schema))

    return writer, append


def write_results(
    rows: Iterable[Row],
    formats: Sequence[str],
    with_id: bool,
    columns: Sequence[str],
    files: Mapping[str, IO[bytes]],
    on_page: Callable[[int], None] = lambda n: None,
) -> int:
    """Write ``rows`` once into each format's open binary file; returns the rows written.
    ``on_page(rows so far)`` runs every :data:`PAGE` rows (the exporter renews its lease)."""
    text: dict[str, io.TextIOWrapper] = {
        f: io.TextIOWrapper(files[f], encoding="utf-8", newline="", write_through=True)
        for f in formats
        if f in ("csv", "jsonl")
    }
    writer = csv.writer(text["csv"], lineterminator="\n") if "csv" in text else None
    if writer is not None:
        writer.writerow(csv_header(with_id, columns))
    parquet = _parquet_writer(files["parquet"], columns) if "parquet" in formats else None
    page: list[Row] = []
    count = 0

    def flush() -> None:
        if parquet is not None and page:
            parquet[1](page)
        page.clear()
        on_page(count)

    for row in rows:
        count += 1
        if writer is not None:
            writer.writerow(csv_row(row, with_id, columns))
        if "jsonl" in text:
            text["jsonl"].write(json.dumps(row.document(), separators=(",", ":")) + "\n")
        page.append(row)
        if len(page) >= PAGE:
            flush()
    flush()
    if parquet is not None:
        parquet[0].close()
    for t in text.values():
        t.flush()
        t.detach()  # the binary file stays open for the upload
    return count


def upload_rows(
    s3: S3,
    rows: Iterable[Row],
    targets: Mapping[str, S3Url],
    with_id: bool,
    columns: Sequence[str],
    on_page: Callable[[int], None] = lambda n: None,
) -> tuple[int, dict[str, Written]]:
    """Write ``rows`` once into a local file per format of ``targets``, then upload each to its
    URL (whole: one ``PutObject`` or a multipart upload); returns the rows and the files."""
    with tempfile.TemporaryDirectory(prefix="bv-export-") as tmp:
        files = {f: open(f"{tmp}/{FORMATS[f][0]}", "w+b") for f in targets}  # noqa: SIM115
        try:
            count = write_results(rows, list(targets), with_id, columns, files, on_page)
            written: dict[str, Written] = {}
            for f, fh in files.items():
                size = fh.tell()
                fh.seek(0)
                s3.put_file(targets[f], fh, FORMATS[f][1])
                written[f] = Written(str(targets[f]), size, count)
        finally:
            for fh in files.values():
                fh.close()
    return count, written


def part_formats(formats: Sequence[str]) -> tuple[str, ...]:
    """The formats a job written in parts gets: ``formats``, and JSON Lines in any case, since
    ``/results`` serves the rows of a written part from it (:mod:`batchvision.server.served`)."""
    return tuple(dict.fromkeys([*formats, "jsonl"]))


def part_url(prefix: S3Url, fmt: str, part: int) -> S3Url:
    """Where part ``part`` of a job written in parts goes, in format ``fmt``."""
    ext = FORMATS[fmt][0].rpartition(".")[2]
    return prefix.child(f"{fmt}/part-{part:05d}.{ext}")


def _in_parts(
    store: JobStore, s3: S3, job: Mapping[str, Any], formats: Sequence[str], on_page: Callable[[int], None]
) -> dict[str, Any]:
    """The files of a finished job written in parts: the parts written while it ran (recorded
    in ``op:<part>``) and the rest, written now from the store; per format, its folder and parts."""
    job_id = job["job_id"]
    out = job["output"]
    size = int(out["part_rows"])
    prefix = S3Url.parse(out["url"]).folder
    with_id, columns = job["passthrough"] or (False, ())
    parts: dict[str, list[dict[str, Any]]] = {f: [] for f in formats}
    done = int(out["parts"])
    recorded = store.redis.hmget(JobKeys.of(job_id).job, [f"op:{k}" for k in range(done)]) if done else []
    for k, raw in enumerate(recorded):
        info = json.loads(as_text(raw))
        for f in formats:
            parts[f].append(
                {"url": str(part_url(prefix, f, k)), "bytes": info["bytes"][f], "rows": info["rows"]}
            )
    for k in range(done, -(-int(job["total"]) // size)):
        rows = store.iter_results(job_id, k * size, size)
        _, written = upload_rows(
            s3, rows, {f: part_url(prefix, f, k) for f in formats}, with_id, columns, on_page
        )
        for f, w in written.items():
            parts[f].append({"url": w.url, "bytes": w.bytes, "rows": w.rows})
    return {
        f: {
            "url": str(prefix.child(f + "/")),
            "bytes": sum(p["bytes"] for p in ps),
            "rows": sum(p["rows"] for p in ps),
            "parts": ps,
        }
        for f, ps in parts.items()
    }


def export_job(
    store: JobStore,
    s3: S3,
    job_id: str,
    formats: Sequence[str],
    on_page: Callable[[int], None] = lambda n: None,
) -> dict[str, Any]:
    """Write a finished job's results under its ``out_url`` (one file per format, or, for a job
    written in parts, the parts not written yet); returns the ``_SUCCESS`` manifest (removed
    first, written last) with its own URL as ``manifest_url``. Raises
    :class:`~batchvision.server.s3.S3Error`."""
    job = store.get(job_id)
    if job is None or job["output"] is None:
        raise LookupError(job_id)
    out = job["output"]
    prefix = S3Url.parse(out["url"]).folder
    # A manifest of an earlier export (the job retried since) must not stand beside files
    # being replaced: readers take _SUCCESS to mean that every file it lists is whole.
    s3.delete([prefix.child(SUCCESS)])
    if out["part_rows"] and (out["parts"] or job["total"] > out["part_rows"]):
        files = _in_parts(store, s3, job, part_formats(formats), on_page)
    else:
        with_id, columns = job["passthrough"] or (False, ())
        targets = {f: prefix.child(FORMATS[f][0]) for f in formats}
        _, written = upload_rows(s3, store.iter_results(job_id), targets, with_id, columns, on_page)
        files = {f: {"url": w.url, "bytes": w.bytes, "rows": w.rows} for f, w in written.items()}
    rows = next(iter(files.values()))["rows"] if files else 0
    manifest = {
        "job_id": job_id,
        "status": job["status"],
        "total": job["total"],
        "done": job["done"],
        "failed": job["failed"],
        "canceled": job["canceled"],
        "model": job["model"],
        "rows": rows,
        "files": files,
        "written_at": round(time.time(), 3),
    }
    s3.put(prefix.child(SUCCESS), json.dumps(manifest, indent=2).encode(), "application/json")
    return {**manifest, "manifest_url": str(prefix.child(SUCCESS))}


class Exporter(LeasedWorker):
    """Writes due outputs, one job at a time per thread; one per worker process."""

    def __init__(
        self,
        client: redis.Redis,
        store: JobStore,
        s3: Callable[[], S3],
        formats: Sequence[str],
        *,
        retry_for_s: float = 3600.0,
        lease_s: float = 120.0,
        poll_s: float = 0.5,
    ) -> None:
        super().__init__("exporter", client, keys.EXPORTS, lease_s=lease_s, poll_s=poll_s)
        self.store = store
        self.s3 = s3
        self.formats = tuple(formats)
        self.retry_for_s = retry_for_s
        self._record = client.register_script(RECORD)
        self._spill = client.register_script(SPILL)

    def handle(self, held: Lease) -> str:
        return self.export(held.item, held.score)

    def export(self, job_id: str, lease: int) -> str:
        """Write one job's output under ``lease``; returns the state recorded (``written``,
        ``pending``, ``failed``), or :data:`DROPPED` for a job that is gone or not finished."""
        held = Lease(self.leases, job_id, lease)

        def renew(_: int) -> None:
            held.renew()

        finished, parted = self.redis.hmget(JobKeys.of(job_id).job, ["finished_at", "part_rows"])
        if finished is None and parted is not None:
            written, failure = self._spill_parts(job_id, held)
            if failure is not None:
                return self._part_failed(job_id, held.score, failure, afresh=written > 0)
            return self._write(job_id, held.score, LATER, now_ms() + PARTS_POLL_MS, "", "")
        if finished is None:
            # Gone, or running again (a retry): its output is queued anew when it finishes.
            return self._write(job_id, held.score, DROPPED, 0, "", "")
        try:
            manifest = export_job(self.store, self.s3(), job_id, self.formats, renew)
        except LookupError:
            return self._write(job_id, held.score, DROPPED, 0, "", "")
        except S3Error as exc:
            return self._failed(job_id, held.score, exc)
        except Exception as exc:  # a surprise is this output's error, never the thread's end
            log.exception("writing the output of job %s failed", job_id)
            return self._failed(job_id, held.score, S3Error(f"writing failed: {exc}"[:500]))
        files = {f: v["url"] for f, v in manifest["files"].items()}
        files["manifest"] = manifest["manifest_url"]
        log.info("job %s: %d rows written to %s", job_id, manifest["rows"], files["manifest"])
        return self._write(job_id, held.score, "written", 0, "", json.dumps(files))

    def _spill_parts(self, job_id: str, held: Lease) -> tuple[int, PartFailure | None]:
        """Write the next parts of a running job written in parts that are complete (every
        image has a result, and the listing moved past them), each leaving Redis once written;
        returns how many it wrote, and why the next could not be written, if it could not."""
        written = 0
        try:
            while self.spill(job_id, held):
                written += 1
        except S3Error as exc:
            return written, PartFailure(f"{exc.code}: {exc.message}", exc.transient)
        except redis.RedisError as exc:  # Redis away a moment: tried again
            return written, PartFailure(f"unavailable: {exc}"[:500], transient=True)
        except Exception as exc:  # a surprise is this output's error, never the thread's end
            log.exception("writing a part of job %s failed", job_id)
            return written, PartFailure(f"s3_error: writing a part failed: {exc}"[:500], transient=False)
        return written, None

    def _part_failed(self, job_id: str, lease: int, failure: PartFailure, *, afresh: bool) -> str:
        """A part of the running ``job_id`` not written: due again after a backoff, or, for a
        refusal or a store away longer than the retry window, the job canceled. ``afresh``:
        parts were written in the same look, so this is the first failure in a row."""
        raw = self.redis.hmget(JobKeys.of(job_id).job, ["op_attempts", "op_failed_at"])
        attempts = 1 if afresh else int(raw[0] or 0) + 1
        since = time.time() if afresh else float(raw[1] or time.time())
        error = failure.error
        first = AFRESH if afresh else ""
        if failure.transient and time.time() - since < self.retry_for_s:
            log.warning("job %s: a part was not written (%s); retrying", job_id, error)
            due = int((time.time() + backoff(attempts, RETRY_FIRST_S, RETRY_CAP_S)) * 1000)
            return self._write(job_id, lease, LATER, due, error, first)
        log.warning("job %s: a part cannot be written, the job is canceled: %s", job_id, error)
        # The error first, while the lease is ours (the job's end queues its output anew); a
        # worker killed before the cancel leaves the next look to fail and cancel again.
        state = self._write(job_id, lease, LATER, now_ms() + PARTS_POLL_MS, error, first)
        self.store.cancel(job_id)
        return state

    def spill(self, job_id: str, held: Lease) -> bool:
        """Write the next part of the running job ``job_id`` if it is complete, then drop its
        results (and filenames) from Redis while ``held`` is still ours; whether it did."""
        k = JobKeys.of(job_id)
        h = hash_fields(self.redis, k.job, PART_FIELDS)
        if not h["part_rows"] or not h["out_url"] or not h["ls_url"] or h["finished_at"]:
            return False
        size, part = int(h["part_rows"]), int(h["spilled"] or 0)
        # Only parts the listing is past: a page listed again after a crash adds nothing there.
        if (part + 1) * size > int(h["ls_images"] or 0):
            return False
        if int(self.redis.hget(k.job, f"p:{part}") or 0) < size:
            return False
        rows = list(self.store.iter_results(job_id, part * size, size))
        job = self.store.get(job_id)
        if job is None or len(rows) < size or any(r.result is None for r in rows):
            return False
        with_id, columns = job["passthrough"] or (False, ())
        prefix = S3Url.parse(h["out_url"]).folder
        targets = {f: part_url(prefix, f, part) for f in part_formats(self.formats)}
        _, written = upload_rows(self.s3(), rows, targets, with_id, columns)
        base = S3Url.parse(h["ls_url"]).folder.key
        info = json.dumps({"rows": size, "bytes": {f: w.bytes for f, w in written.items()}})
        # A prefix job's images are added by their keys; only keys the listing's cursor is past
        # are forgotten (a page listed again after a crash may still name a later one).
        after = (h["ls_after"] or "").encode()
        paths = [p for p in (base + r.filename for r in rows) if p.encode() <= after]
        args: list[str | int] = [job_id, held.score, part, info, size, *(r.index for r in rows), *paths]
        if not self._spill(keys=[keys.EXPORTS, k.job, k.results, k.files, k.paths, k.tries], args=args):
            return False
        log.info("job %s: part %d written (%d rows), its results left Redis", job_id, part, size)
        return held.renew()

    def _failed(self, job_id: str, lease: int, exc: S3Error) -> str:
        raw = self.redis.hmget(JobKeys.of(job_id).job, ["out_attempts", "finished_at"])
        attempts = int(raw[0] or 0) + 1
        finished = float(raw[1] or time.time())
        error = f"{exc.code}: {exc.message}"
        if exc.transient and time.time() - finished < self.retry_for_s:
            due = int((time.time() + backoff(attempts, RETRY_FIRST_S, RETRY_CAP_S)) * 1000)
            log.warning("job %s: output not written (%s); retrying", job_id, error)
            return self._write(job_id, lease, "pending", due, error, "")
        log.warning("job %s: output not written: %s", job_id, error)
        return self._write(job_id, lease, "failed", 0, error, "")

    def _write(self, job_id: str, lease: int, state: str, due: int, error: str, files: str) -> str:
        self._record(
            keys=[keys.EXPORTS, JobKeys.of(job_id).job],
            args=[job_id, lease, state, due, error, files, f"{time.time():.3f}"],
        )
        return state
