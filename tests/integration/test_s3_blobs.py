"""Uploads waiting in a bucket (``BATCHVISION_BLOB_URL=s3://...``), against a real S3 endpoint
(moto in server mode), a real API and a real worker: the images land in the bucket, Redis holds
no byte of them, and each is deleted once its result is stored."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from batchvision.core.synthetic import labelled_files
from batchvision.testing.s3server import MotoServer, S3FaultProxy

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def blob_bucket(s3_server: MotoServer) -> str:
    name = f"blobs-{os.urandom(4).hex()}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="module")
def blob_stack(start_private_stack: Any, s3_server: MotoServer, blob_bucket: str) -> Any:
    # No worker yet: the test looks at the bucket and Redis while the uploads wait.
    return start_private_stack(
        "s3-blobs", blob_url=f"s3://{blob_bucket}/uploads/", s3_endpoint_url=s3_server.url
    )


def _keys(s3_server: MotoServer, bucket: str, prefix: str) -> list[str]:
    pages = s3_server.client().get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return sorted(o["Key"] for page in pages for o in page.get("Contents", ()))


def _redis_values(client: redis_lib.Redis) -> Iterator[bytes]:
    """Every value Redis holds, of every key of every type (the broker's queues included)."""
    for key in client.scan_iter(count=1000):
        kind = client.type(key).decode()
        yield key
        if kind == "string":
            yield client.get(key) or b""
        elif kind == "hash":
            for field, value in client.hgetall(key).items():
                yield field
                yield value
        elif kind == "list":
            yield from client.lrange(key, 0, -1)
        elif kind == "set":
            yield from client.smembers(key)
        elif kind == "zset":
            yield from client.zrange(key, 0, -1)
        elif kind == "stream":
            for _, entry in client.xrange(key):
                yield from (b for pair in entry.items() for b in pair)


def test_uploads_wait_in_the_bucket_not_in_redis_and_are_deleted_after_their_results(
    blob_stack: Any,
    s3_server: MotoServer,
    blob_bucket: str,
    demo_model: Path,
    reference_labels: Any,
    wait_until: Callable[..., Any],
) -> None:
    files = [(name, data) for name, data, _ in labelled_files(20, seed=77)]
    job = blob_stack.client.submit_files(files)
    assert job.accepted == len(files)

    waiting = _keys(s3_server, blob_bucket, f"uploads/{job.job_id}/")
    assert len(waiting) == len(files), waiting
    stored = {s3_server.client().get_object(Bucket=blob_bucket, Key=k)["Body"].read() for k in waiting}
    assert stored == {data for _, data in files}, "each upload is one object, byte for byte"
    # No image's bytes anywhere in Redis: a distinctive slice of each is looked for in every
    # value (encoded or not, a blob in Redis or in a queued message would contain it).
    redis = redis_lib.Redis.from_url(blob_stack.settings.redis_url)
    try:
        values = list(_redis_values(redis))
        assert values, "the job's metadata is in Redis"
        for name, data in files:
            probe = data[len(data) // 2 : len(data) // 2 + 48]
            assert not any(probe in v for v in values), f"bytes of {name} found in Redis"
    finally:
        redis.close()

    blob_stack.worker()
    blob_stack.client.wait(job.job_id, timeout=180, poll_s=0.2)
    rows = blob_stack.client.results(job.job_id)
    expected = dict(zip([n for n, _ in files], reference_labels(demo_model, files), strict=True))
    assert {r.filename: r.label for r in rows} == expected
    wait_until(
        lambda: not _keys(s3_server, blob_bucket, "uploads/"),
        timeout=30,
        interval=0.2,
        message="every upload deleted from the bucket once its result is stored",
    )
    blob_stack.stop_workers()


def test_a_blob_store_that_struggles_is_waited_for_and_one_that_refuses_fails_each_image(
    blob_stack: Any, s3_server: MotoServer, blob_bucket: str, wait_until: Callable[..., Any]
) -> None:
    files = [(name, data) for name, data, _ in labelled_files(6, seed=78)]
    uploads = f"/{blob_bucket}/uploads/"
    with S3FaultProxy(s3_server.url) as proxy:
        # The worker reaches the bucket through the proxy (two calls per read, the SDK's own
        # retries); the API writes to it directly.
        blob_stack.worker(BATCHVISION_S3_ENDPOINT_URL=proxy.url, BATCHVISION_S3_MAX_ATTEMPTS="2")
        # Throttled for a while: the task is retried with backoff, not failed (its chunk would
        # wait for the ledger's re-send, hours later).
        proxy.fail("GET", uploads, 503, "SlowDown")
        job = blob_stack.client.submit_files(files)
        wait_until(lambda: sum(proxy.hits.values()) >= 2 * len(files), timeout=60, message="reads throttled")
        proxy.clear()
        done = blob_stack.client.wait(job.job_id, timeout=120, poll_s=0.2)
        assert (done.status, done.done) == ("succeeded", len(files))
        # Refused for good: each image says why; the message does not fail until its images
        # count as poison.
        proxy.fail("GET", uploads, 403, "AccessDenied")
        refused = blob_stack.client.submit_files(files)
        done = blob_stack.client.wait(refused.job_id, timeout=120, poll_s=0.2)
        assert (done.status, done.failed) == ("failed", len(files))
        errors = {
            (r.error.code, r.error.retryable) for r in blob_stack.client.results(refused.job_id) if r.error
        }
        assert errors == {("access_denied", False)}
        # One object refused among others: that image alone fails.
        proxy.clear()
        proxy.fail("GET", f"{uploads}[0-9a-f]+/2$", 403, "AccessDenied")
        one = blob_stack.client.submit_files(files)
        done = blob_stack.client.wait(one.job_id, timeout=120, poll_s=0.2)
        assert (done.status, done.done, done.failed) == ("partial", len(files) - 1, 1)
        failed = [r for r in blob_stack.client.results(one.job_id) if r.error]
        assert [(r.filename, r.error.code) for r in failed] == [(files[2][0], "access_denied")]
    blob_stack.stop_workers()
