"""Blob stores: Redis (default) and a shared directory (``file:///path``)."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_lib

from batchvision.server.blobs import FileBlobs, RedisBlobs, open_blobs


def _roundtrip(blobs: RedisBlobs | FileBlobs) -> None:
    blobs.put_many("job1", {0: b"zero", 2: b"two"})
    assert blobs.get_many("job1", [0, 1, 2]) == [b"zero", None, b"two"]
    blobs.delete_many("job1", [0])
    assert blobs.get_many("job1", [0, 2]) == [None, b"two"]
    blobs.delete_many("job1", [2, 5])  # deleting what is gone is fine
    assert blobs.get_many("job1", [2]) == [None]


def test_file_blobs(tmp_path: Path) -> None:
    store = open_blobs(f"file://{tmp_path}/blobs", redis_lib.Redis(), 60)
    assert isinstance(store, FileBlobs)
    _roundtrip(store)
    assert not (tmp_path / "blobs" / "job1").exists()  # the job's folder went with its last upload
    assert not list((tmp_path / "blobs").glob("**/.tmp-*"))  # writes are atomic renames


def test_redis_blobs_expire(redis_client: redis_lib.Redis) -> None:
    store = open_blobs("redis", redis_client, 60)
    assert isinstance(store, RedisBlobs)
    _roundtrip(store)
    store.put_many("job2", {0: b"x"})
    assert 0 < redis_client.ttl(RedisBlobs.key("job2", 0)) <= 60


def test_unknown_blob_url() -> None:
    with pytest.raises(ValueError, match="BATCHVISION_BLOB_URL"):
        open_blobs("s3://bucket", redis_lib.Redis(), 60)
