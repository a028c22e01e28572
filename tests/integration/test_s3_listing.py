"""Prefix jobs listed by the workers, a page at a time, against a real S3 endpoint (moto in
server mode), a real API and real worker processes: the request lists the first page, workers
the rest, and a worker killed with SIGKILL between adding a page and moving the cursor past it
leaves every image of a 5,000-image prefix exactly one row in every output format."""

from __future__ import annotations

import csv
import io
import json
import os
import re
import signal
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import requests

from batchvision.cli.redis_server import free_port
from batchvision.core.results import Prediction
from batchvision.core.synthetic import labelled_files
from batchvision.server import keys
from batchvision.server.exports import LATER, Exporter
from batchvision.server.keys import JobKeys
from batchvision.server.listing import Lister
from batchvision.server.outputs import output_fields
from batchvision.server.s3 import S3, S3Config, shared
from batchvision.server.sources import LISTING
from batchvision.server.store import JobStore
from batchvision.testing.s3server import CREDENTIALS, MotoServer

pytestmark = pytest.mark.slow

PAGE = 250
PARTS = 4 * PAGE


@pytest.fixture(scope="module")
def stack(start_private_stack: Any, s3_server: MotoServer) -> Any:
    # Small pages, so a few hundred images make several; a short visibility timeout, so a dead
    # worker's lease and tasks move on within the test.
    return start_private_stack(
        "s3-listing",
        s3_endpoint_url=s3_server.url,
        s3_allow="*",
        list_page_size=PAGE,
        visibility_timeout_s=8,
        task_time_limit_s=6,
        fetch_threads=8,
        chunk_size=32,
        result_ttl_s=600,
        output_part_rows=PARTS,
    )


def _put_images(s3_server: MotoServer, bucket: str, prefix: str, n: int, extra: int = 0) -> list[str]:
    """``n`` small JPEGs under ``prefix`` (keys in folders of 100) and ``extra`` other files
    among them; returns the image keys relative to the prefix."""
    images = [data for _, data, _ in labelled_files(40, seed=5)]
    names = [f"d{i // 100:03d}/img-{i:05d}.jpg" for i in range(n)]
    others = [f"d{i * (n // max(extra, 1)) // 100:03d}/notes-{i}.txt" for i in range(extra)]
    client = s3_server.client()

    def put(item: tuple[int, str]) -> None:
        i, name = item
        body = images[i % len(images)] if name.endswith(".jpg") else b"not an image"
        client.put_object(Bucket=bucket, Key=prefix + name, Body=body)

    with ThreadPoolExecutor(8) as pool:  # the client keeps 10 connections
        list(pool.map(put, enumerate([*names, *others])))
    return names


def _status(stack: Any, job_id: str) -> dict[str, Any]:
    doc: dict[str, Any] = requests.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json()
    return doc


def _finished(stack: Any, job_id: str, wait_until: Callable[..., Any], timeout: float = 300) -> Any:
    def done() -> dict[str, Any] | None:
        doc = _status(stack, job_id)
        final = doc["status"] in ("succeeded", "partial", "failed", "canceled")
        written = doc.get("output") is None or doc["output"]["state"] != "pending"
        return doc if final and written else None

    return wait_until(done, timeout=timeout, interval=0.25, message=f"job {job_id}")


def _get(s3_server: MotoServer, url: str) -> bytes:
    bucket, _, key = url.removeprefix("s3://").partition("/")
    body: bytes = s3_server.client().get_object(Bucket=bucket, Key=key)["Body"].read()
    return body


def test_the_request_lists_one_page_and_the_workers_the_rest(
    stack: Any, s3_server: MotoServer, s3_bucket: str, wait_until: Callable[..., Any]
) -> None:
    names = _put_images(s3_server, s3_bucket, "many/", 3 * PAGE + 17, extra=5)
    resp = requests.post(f"{stack.url}/v1/jobs", json={"source": f"s3://{s3_bucket}/many/"}, timeout=60)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    job_id = body["job_id"]
    # The request added the first page only; no worker runs yet, so the job waits, open.
    assert body["accepted"] == PAGE, body
    first = _status(stack, job_id)
    assert first["listing"]["state"] == "listing" and first["listing"]["images"] == PAGE, first
    assert first["status"] == "queued" and first["total"] == PAGE and first["finished_at"] is None
    assert stack.store.redis.zscore(keys.LISTINGS, job_id) is not None
    # Its images come from the listing: a seal (which would end it after one page) and an
    # uploaded file (which could take the name of an object not listed yet) are refused.
    image = next(iter(labelled_files(1, seed=6)))[1]
    for path, kw in (
        ("seal", {}),
        (
            "files",
            {"data": image, "params": {"filename": names[-1]}, "headers": {"Content-Type": "image/jpeg"}},
        ),
    ):
        resp = requests.post(f"{stack.url}/v1/jobs/{job_id}/{path}", timeout=10, **kw)  # type: ignore[arg-type]
        assert resp.status_code == 409 and resp.json()["error"]["code"] == "job_is_listed", resp.text
    assert _status(stack, job_id)["listing"]["state"] == "listing"

    port = free_port()
    stack.worker(BATCHVISION_WORKER_METRICS_PORT=str(port))
    job = _finished(stack, job_id, wait_until)
    assert job["status"] == "succeeded", job
    assert job["total"] == job["done"] == len(names)
    # The worker counts the images of the pages it listed (the API counted the first page).
    scraped = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    accepted = re.search(r"^batchvision_images_listed_total (\S+)$", scraped, re.M)
    assert accepted is not None and float(accepted.group(1)) == len(names) - PAGE, scraped[:2000]
    assert job["listing"] == {
        "url": f"s3://{s3_bucket}/many/",
        "state": "done",
        "images": len(names),
        "skipped": 5,
        "error": None,
    }
    assert stack.store.redis.zscore(keys.LISTINGS, job_id) is None
    rows = requests.get(f"{stack.url}/v1/jobs/{job_id}/results", params={"format": "jsonl"}, timeout=60)
    filenames = [json.loads(line)["filename"] for line in rows.text.splitlines()]
    assert sorted(filenames) == sorted(names)  # each key once, named relative to the prefix
    stack.stop_workers()


def test_the_listing_stays_a_bounded_step_ahead_of_the_workers(
    stack: Any, s3_server: MotoServer, s3_bucket: str, wait_until: Callable[..., Any]
) -> None:
    n = 6 * PAGE
    _put_images(s3_server, s3_bucket, "ahead/", n)
    # Slow batches, and a listing allowed one page ahead of the classified images.
    stack.worker(failpoints="slow-batch=0.05", BATCHVISION_LIST_AHEAD=str(PAGE))
    job_id = requests.post(
        f"{stack.url}/v1/jobs", json={"source": f"s3://{s3_bucket}/ahead/"}, timeout=60
    ).json()["job_id"]
    most_waiting = 0

    def finished() -> bool:
        nonlocal most_waiting
        doc = _status(stack, job_id)
        most_waiting = max(most_waiting, doc["total"] - doc["done"] - doc["failed"])
        return doc["status"] == "succeeded"

    wait_until(finished, timeout=300, interval=0.05, message=f"job {job_id}")
    # A page is listed only while fewer than LIST_AHEAD images wait: never more than that plus
    # one page wait at once (the whole prefix would, without the bound).
    assert most_waiting < 2 * PAGE, most_waiting
    assert _status(stack, job_id)["total"] == n
    stack.stop_workers()


def test_a_canceled_job_stops_its_listing(
    stack: Any, s3_server: MotoServer, s3_bucket: str, wait_until: Callable[..., Any]
) -> None:
    _put_images(s3_server, s3_bucket, "stop/", 2 * PAGE + 1)
    job_id = requests.post(
        f"{stack.url}/v1/jobs", json={"source": f"s3://{s3_bucket}/stop/"}, timeout=60
    ).json()["job_id"]
    assert requests.post(f"{stack.url}/v1/jobs/{job_id}/cancel", timeout=10).status_code == 200
    stack.worker()
    # The worker's lister takes the job (it is due at once) and records why it stopped.
    doc = wait_until(
        lambda: (d := _status(stack, job_id))["listing"]["state"] != "listing" and d,
        timeout=60,
        message="the listing of a canceled job ends",
    )
    assert doc["status"] == "canceled" and doc["listing"]["state"] == "failed", doc
    assert doc["listing"]["error"].startswith("canceled"), doc
    assert doc["total"] == PAGE  # nothing added after the cancel
    stack.stop_workers()


def test_a_worker_killed_between_a_page_and_its_cursor_leaves_each_of_5000_images_one_row(
    stack: Any, s3_server: MotoServer, s3_bucket: str, wait_until: Callable[..., Any]
) -> None:
    n = 5000
    names = _put_images(s3_server, s3_bucket, "big/", n)
    resp = requests.post(
        f"{stack.url}/v1/jobs",
        json={"source": f"s3://{s3_bucket}/big/", "output_url": f"s3://{s3_bucket}/out/big"},
        timeout=60,
    )
    assert resp.status_code == 202, resp.text
    job_id = resp.json()["job_id"]
    # This worker adds its third page, then SIGKILLs itself before moving the cursor past it
    # (and with tasks of its own in flight): the worst moment for the listing.
    victim = stack.worker(failpoints="crash-mid-listing=3", wait=False)
    assert victim.proc is not None
    wait_until(lambda: victim.proc.poll() is not None, timeout=120, message="the worker's crash")
    assert victim.proc.returncode == -signal.SIGKILL
    stack.workers.remove(victim)
    at_crash = _status(stack, job_id)
    assert at_crash["listing"]["state"] == "listing" and at_crash["listing"]["images"] == 3 * PAGE, at_crash
    # The page added before the crash is in the job, and the cursor is not past it.
    assert at_crash["total"] == 4 * PAGE
    cursor = stack.store.redis.hget(JobKeys.of(job_id).job, "ls_after").decode()
    assert cursor == "big/" + names[3 * PAGE - 1]

    stack.worker()  # takes the listing over once the dead worker's lease runs out
    job = _finished(stack, job_id, wait_until, timeout=600)
    assert (job["status"], job["total"], job["done"], job["failed"]) == ("succeeded", n, n, 0), job
    assert job["listing"]["state"] == "done" and job["listing"]["images"] == n, job
    out = job["output"]
    assert out["state"] == "written" and out["part_rows"] == PARTS, out
    manifest = json.loads(_get(s3_server, out["files"]["manifest"]))
    assert manifest["rows"] == n and manifest["done"] == n
    # Five parts per format, whether written while the job ran or at its end.
    for f in ("csv", "jsonl", "parquet"):
        parts = manifest["files"][f]["parts"]
        assert [p["url"].rpartition("/")[2] for p in parts] == [f"part-{k:05d}.{f}" for k in range(5)]
        assert [p["rows"] for p in parts] == [PARTS] * 5 and manifest["files"][f]["rows"] == n
    rows = [
        r
        for p in manifest["files"]["csv"]["parts"]
        for r in csv.DictReader(io.StringIO(_get(s3_server, p["url"]).decode()))
    ]
    assert sorted(r["filename"] for r in rows) == sorted(names)  # every input exactly one row
    assert all(r["label"] and r["model"] for r in rows)
    lines = [
        json.loads(x)
        for p in manifest["files"]["jsonl"]["parts"]
        for x in _get(s3_server, p["url"]).decode().splitlines()
    ]
    assert [x["filename"] for x in lines] == [r["filename"] for r in rows]
    # The Parquet parts are one dataset, as pyarrow reads a folder.
    table = pa.concat_tables(
        pq.read_table(io.BytesIO(_get(s3_server, p["url"]))) for p in manifest["files"]["parquet"]["parts"]
    )
    assert table.num_rows == n
    assert table.column("filename").to_pylist() == [r["filename"] for r in rows]
    assert table.column("label").to_pylist() == [r["label"] for r in rows]
    stack.stop_workers()


def test_a_large_prefix_job_writes_parts_as_they_fill_and_they_leave_redis(
    stack: Any, s3_server: MotoServer, s3_bucket: str
) -> None:
    # The exporter of a worker, driven by hand against the stack's Redis and the endpoint: a
    # job of 10 images in parts of 4, whose results arrive out of order.
    size = 4
    r = stack.store.redis
    store = stack.store
    job_id = os.urandom(16).hex()
    k = JobKeys.of(job_id)
    store.create(job_id, model="m")
    store.add_files(job_id, [(f"in/{i}.jpg", f"{i}.jpg") for i in range(10)])
    fields = output_fields(f"s3://{s3_bucket}/out/", part_rows=size)
    r.hset(
        k.job,
        mapping={
            **fields,
            **{"ls_url": f"s3://{s3_bucket}/in/", "ls_state": "listing"},
            **{"ls_images": 8, "ls_after": "in/7.jpg"},
        },
    )
    stack.stop_workers()  # no worker's exporter may take the job from this test
    # JSON Lines is not asked for: parts get it anyway, /results reads written rows from it.
    exporter = Exporter(r, store, lambda: shared(S3Config.from_settings(stack.settings)), ["csv", "parquet"])

    def ok(*indexes: int) -> None:
        store.record(job_id, [(i, Prediction(f"c{i}", i, 0.9, (), "m", 1)) for i in indexes])

    def export() -> str:
        r.zadd(keys.EXPORTS, {job_id: 5})  # held by this test (the lease a worker would take)
        return exporter.export(job_id, 5)

    r.hset(k.tries, mapping={"chunk:0": 2, "image:2": 1, "chunk:4": 1})  # delivery counts
    ok(0, 1, 3, 5)
    assert export() == LATER and r.hget(k.job, "spilled") is None  # part 0 lacks image 2
    ok(2)
    assert export() == LATER and r.hget(k.job, "spilled") == b"1"
    part0 = s3_server.client().get_object(Bucket=s3_bucket, Key="out/csv/part-00000.csv")["Body"].read()
    assert [row["filename"] for row in csv.DictReader(io.StringIO(part0.decode()))] == [
        "0.jpg",
        "1.jpg",
        "2.jpg",
        "3.jpg",
    ]
    assert r.hmget(k.results, ["0", "1", "2", "3"]) == [None] * 4  # left Redis...
    assert r.hmget(k.paths, ["in/0.jpg", "in/3.jpg"]) == [None, None]
    assert r.hgetall(k.tries) == {b"chunk:4": b"1"}  # the part's counts went with it
    ok(1)  # ...and a late copy of a result of the part counts nothing
    assert store.get(job_id)["done"] == 5 and r.hexists(k.results, "1") == 0
    # /results serves the written rows from the part, the rest from Redis, in one order.
    served = _results(stack, job_id)
    assert [row["filename"] for row in served] == [f"{i}.jpg" for i in range(10)]
    assert [row.get("label") for row in served[:6]] == ["c0", "c1", "c2", "c3", None, "c5"]
    assert [row["status"] for row in served[3:7]] == ["ok", "pending", "ok", "pending"]
    assert served[0]["top_k"] == [] and served[0]["model"] == "m" and served[0]["version"] == 1
    across = _results(stack, job_id, offset=2, limit=4)  # from inside the part, past its end
    assert [row["index"] for row in across] == [2, 3, 4, 5]
    text = requests.get(
        f"{stack.url}/v1/jobs/{job_id}/results", params={"format": "csv", "offset": 1, "limit": 2}, timeout=10
    ).text
    assert [(c["filename"], c["label"]) for c in csv.DictReader(io.StringIO(text))] == [
        ("1.jpg", "c1"),
        ("2.jpg", "c2"),
    ]
    ok(4, 6, 7, 8, 9)
    # Part 2 is complete, but the listing has not moved past it: a page listed again after a
    # crash may still add to it, so it waits.
    assert export() == LATER and r.hget(k.job, "spilled") == b"2"
    r.hset(k.job, mapping={"ls_images": 10, "ls_state": "done", "ls_after": "in/9.jpg"})
    store.seal(job_id)  # every image has a result: the job finishes, the last part is written
    assert export() == "written"
    manifest = json.loads(_get(s3_server, f"s3://{s3_bucket}/out/_SUCCESS"))
    assert manifest["rows"] == 10 and manifest["files"]["csv"]["url"] == f"s3://{s3_bucket}/out/csv/"
    assert [p["rows"] for p in manifest["files"]["parquet"]["parts"]] == [4, 4, 2]
    table = pa.concat_tables(
        pq.read_table(io.BytesIO(_get(s3_server, p["url"]))) for p in manifest["files"]["parquet"]["parts"]
    )
    assert table.column("filename").to_pylist() == [f"{i}.jpg" for i in range(10)]
    doc = requests.get(f"{stack.url}/v1/jobs/{job_id}", timeout=10).json()
    assert doc["output"]["parts"] == 2 and doc["output"]["files"]["csv"] == f"s3://{s3_bucket}/out/csv/"
    assert [p["rows"] for p in manifest["files"]["jsonl"]["parts"]] == [4, 4, 2]
    assert [row["label"] for row in _results(stack, job_id)] == [f"c{i}" for i in range(10)]
    # A written part's JSON Lines file gone from the bucket: a read that starts in it is
    # refused by name (one that reaches it breaks off there), the other rows are still served.
    s3_server.client().delete_object(Bucket=s3_bucket, Key="out/jsonl/part-00001.jsonl")
    resp = requests.get(f"{stack.url}/v1/jobs/{job_id}/results", params={"offset": 5}, timeout=10)
    assert resp.status_code == 409 and resp.json()["error"]["code"] == "results_in_output", resp.text
    assert resp.json()["error"]["details"][0]["first_served"] == 8
    resp = requests.get(f"{stack.url}/v1/jobs/{job_id}/results", params={"offset": 5, "limit": 1}, timeout=10)
    # The first row after the part, not after the limit.
    assert resp.json()["error"]["details"][0]["first_served"] == 8, resp.text
    assert [row["index"] for row in _results(stack, job_id, offset=8)] == [8, 9]
    # A part's file cut short or not JSON Lines: refused the same way, never served as pending.
    first = _get(s3_server, f"s3://{s3_bucket}/out/jsonl/part-00000.jsonl").splitlines(keepends=True)
    for body, why in ((b"".join(first[:2]), "ends at row 3"), (b"{not json\n", "is not a part's JSON Lines")):
        s3_server.client().put_object(Bucket=s3_bucket, Key="out/jsonl/part-00000.jsonl", Body=body)
        resp = requests.get(f"{stack.url}/v1/jobs/{job_id}/results", params={"offset": 3}, timeout=10)
        assert resp.status_code == 409 and why in resp.json()["error"]["message"], resp.text
        assert resp.json()["error"]["details"][0]["first_served"] == 4


def _results(stack: Any, job_id: str, **params: int) -> list[dict[str, Any]]:
    """``/results`` of the job as JSON Lines."""
    resp = requests.get(
        f"{stack.url}/v1/jobs/{job_id}/results", params={"format": "jsonl", **params}, timeout=10
    )
    assert resp.status_code == 200, resp.text
    return [json.loads(line) for line in resp.text.splitlines()]


def test_a_listing_outlasts_a_store_outage_of_minutes(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A store that cannot be reached (nothing listens on the port): the listing is retried
    # with backoff, well past the dozen tries (about five minutes) that used to cancel the job
    # and every image it had queued.
    job_id = os.urandom(16).hex()
    store.create(job_id, model="m")
    store.add_files(job_id, [("in/0.jpg", "0.jpg")])
    fields = {"ls_url": "s3://bucket/in/", "ls_after": "in/0.jpg", "ls_state": LISTING, "ls_images": "1"}
    store.redis.hset(JobKeys.of(job_id).job, mapping={**fields, "ls_attempts": "12"})
    store.redis.zadd(keys.LISTINGS, {job_id: 0})
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    down = S3(S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout_s=1))

    def never(*args: Any) -> int:
        raise AssertionError("nothing was listed: nothing can be added")

    lister = Lister(store.redis, store, lambda: down, never, page_size=10, max_images=100)
    assert lister.run_once()
    job = store.get(job_id)
    assert job is not None and job["status"] != "canceled", job
    state = store.redis.hmget(JobKeys.of(job_id).job, ["ls_state", "ls_attempts", "ls_error"])
    assert state[:2] == [LISTING.encode(), b"13"] and b"s3_unavailable" in state[2], state
    assert store.redis.zscore(keys.LISTINGS, job_id) is not None  # due again, later


def _parted_job(store: JobStore, bucket: str, images: int, size: int, out: str = "out/") -> str:
    """A running prefix job of ``images`` images, all listed, written in parts of ``size`` to
    ``s3://bucket/out``."""
    job_id = os.urandom(16).hex()
    store.create(job_id, model="m")
    store.add_files(job_id, [(f"in/{i:03d}.jpg", f"{i:03d}.jpg") for i in range(images)])
    listed = {"ls_url": f"s3://{bucket}/in/", "ls_state": LISTING, "ls_images": images}
    last = {"ls_after": f"in/{images - 1:03d}.jpg"}
    fields = output_fields(f"s3://{bucket}/{out}", part_rows=size)
    store.redis.hset(JobKeys.of(job_id).job, mapping={**fields, **listed, **last})
    return job_id


def _ok(store: JobStore, job_id: str, indexes: range) -> None:
    store.record(job_id, [(i, Prediction(f"c{i}", i, 0.9, (), "m", 1)) for i in indexes])


def test_a_part_the_store_cannot_take_is_retried_with_backoff_then_cancels_the_job(
    store: JobStore, s3_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    r = store.redis
    job_id = _parted_job(store, s3_bucket, 14, 4)
    k = JobKeys.of(job_id)
    _ok(store, job_id, range(8))  # parts 0 and 1 complete
    down = S3(S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout_s=1))
    up = S3(S3Config(endpoint_url=s3_server.url, max_attempts=1))
    current = [down]

    def s3() -> S3:  # one client a part: the first of several, then the last for good
        return current.pop(0) if len(current) > 1 else current[0]

    exporter = Exporter(r, store, s3, ["csv"], retry_for_s=3600)

    def export() -> tuple[str, float, float]:
        """The state recorded, and the pause before the next try at least and at most (measured
        from before and from after the call, so a slow machine cannot push it out of range)."""
        r.zadd(keys.EXPORTS, {job_id: 5})  # held by this test (the lease a worker would take)
        before = time.time()
        state = exporter.export(job_id, 5)
        after = time.time()
        due = (r.zscore(keys.EXPORTS, job_id) or 0) / 1000
        return state, due - before, due - after

    # The store away: tried again after a pause that doubles, the reason in the document, the
    # rows kept in Redis (the next part's rows were polled for again a second later, silently).
    pauses = [export() for _ in range(3)]
    assert [state for state, _, _ in pauses] == [LATER] * 3
    # backoff(1) is 0.5-1 s, backoff(3) 2-4 s (equal jitter)
    assert pauses[0][1] >= 0.5 and pauses[0][2] <= 1.0 and pauses[2][1] >= 2.0 and pauses[2][2] <= 4.0, pauses
    job = store.get(job_id)
    assert job is not None and job["status"] == "running", job
    assert job["output"]["state"] == "pending" and "s3_unavailable" in job["output"]["error"], job
    assert r.hget(k.job, "spilled") is None and r.hlen(k.results) == 8
    assert r.hget(k.job, "op_attempts") == b"3"
    # A look that writes a part before the next fails made progress: the count starts again.
    current[:] = [up, down]
    assert export()[0] == LATER and r.hget(k.job, "spilled") == b"1"
    assert r.hget(k.job, "op_attempts") == b"1"
    assert time.time() - float(r.hget(k.job, "op_failed_at") or 0) < 60
    # Back: the other part written, the failures in a row forgotten.
    current[:] = [up]
    assert export()[0] == LATER and r.hget(k.job, "spilled") == b"2"
    assert r.hmget(k.job, ["op_attempts", "op_failed_at", "out_error"]) == [None] * 3
    # Away again, longer than the retry window (the result TTL): the job is canceled (it could
    # never write its output, only fill Redis); its images without a result get `canceled`.
    current[:] = [down]
    _ok(store, job_id, range(8, 12))
    assert export()[0] == LATER
    r.hset(k.job, "op_failed_at", f"{time.time() - 3601:.3f}")
    assert export()[0] == LATER
    job = store.get(job_id)
    assert job is not None and job["status"] == "canceled" and job["canceled"] == 2, job
    assert "s3_unavailable" in job["output"]["error"]
    # A refusal (the output bucket gone) cancels at once.
    current[:] = [up]
    refused = _parted_job(store, f"{s3_bucket}-gone", 6, 2)
    _ok(store, refused, range(2))
    r.zadd(keys.EXPORTS, {refused: 5})
    assert exporter.export(refused, 5) == LATER
    job = store.get(refused)
    assert job is not None and job["status"] == "canceled", job
    assert job["output"]["error"].startswith("bucket_not_found"), job["output"]


def test_the_listing_waits_while_the_parts_are_behind(
    store: JobStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    r = store.redis
    job_id = _parted_job(store, "bucket", 30, 4)
    k = JobKeys.of(job_id)
    _ok(store, job_id, range(30))
    down = S3(S3Config(endpoint_url=f"http://127.0.0.1:{free_port()}", max_attempts=1, connect_timeout_s=1))

    def never(*args: Any) -> int:
        raise AssertionError("nothing can be listed: nothing can be added")

    lister = Lister(r, store, lambda: down, never, page_size=10, max_images=100, ahead=10)

    def step() -> list[bytes | None]:
        r.zadd(keys.LISTINGS, {job_id: 0})
        assert lister.run_once()
        return r.hmget(k.job, ["ls_state", "ls_attempts", "ls_error"])

    # 30 rows not written to a part (LIST_AHEAD 10 plus two parts of 4 is 18), but no part
    # failed: a part held back by a slow image is no reason to wait. It lists (and meets the
    # source store away).
    assert step()[1] == b"1"
    # A part failed to be written (the output store away): the listing must not add pages,
    # whose results would only pile up in Redis. Held: no listing, due again a little later.
    r.hset(k.job, "op_attempts", 1)
    state = step()
    assert state[0] == LISTING.encode() and state[1] in (None, b"0") and not state[2], state
    assert (r.zscore(keys.LISTINGS, job_id) or 0) > time.time() * 1000
    # Four parts written since (16 rows left Redis): 14 rows are fewer than 18, it lists on.
    r.hset(k.job, "spilled", 4)
    state = step()
    assert state[1] == b"1" and b"s3_unavailable" in (state[2] or b""), state
