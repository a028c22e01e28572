"""The shared-directory blob store (``file:///path``) and the blob URL; Redis blobs are
tested in ``integration/test_redis_blobs.py``."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis as redis_lib

from batchvision.server.blobs import FileBlobs, open_blobs


def test_file_blobs_round_trip(tmp_path: Path) -> None:
    store = open_blobs(f"file://{tmp_path}/blobs", redis_lib.Redis(), 60)  # the client is never used
    assert isinstance(store, FileBlobs)
    store.put_many("job1", {0: b"zero", 2: b"two"})
    store.put_many("job2", {0: b"other job"})
    assert store.get_many("job1", [0, 1, 2]) == [b"zero", None, b"two"]
    store.put_many("job1", {0: b"zero again"})  # a re-sent part replaces the bytes
    assert store.get_many("job1", [0]) == [b"zero again"]
    store.delete_many("job1", [0])
    assert store.get_many("job1", [0, 2]) == [None, b"two"]
    store.delete_many("job1", [2, 5])  # deleting what is gone is fine
    assert store.get_many("job1", [2]) == [None]
    assert not (tmp_path / "blobs" / "job1").exists()  # the job's folder went with its last upload
    assert store.get_many("job2", [0]) == [b"other job"]  # other jobs untouched
    assert not list((tmp_path / "blobs").glob("**/.tmp-*"))  # writes are atomic renames


def test_unknown_blob_url() -> None:
    with pytest.raises(ValueError, match="BATCHVISION_BLOB_URL"):
        open_blobs("gs://bucket", redis_lib.Redis(), 60)
