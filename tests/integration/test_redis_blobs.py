"""The default blob store: one Redis string per image, with a TTL."""

from __future__ import annotations

import redis as redis_lib

from batchvision.server import keys
from batchvision.server.blobs import RedisBlobs, open_blobs


def test_redis_blobs_round_trip_and_expire(scratch_redis: redis_lib.Redis) -> None:
    store = open_blobs("redis", scratch_redis, 60)
    assert isinstance(store, RedisBlobs)
    assert store.get_many("job1", []) == []
    store.put_many("job1", {0: b"zero", 2: b"two"})
    store.put_many("job2", {0: b"other job"})
    assert store.get_many("job1", [0, 1, 2]) == [b"zero", None, b"two"]
    assert sorted(scratch_redis.scan_iter(match=keys.blob_pattern("job1"))) == [
        keys.blob("job1", 0).encode(),
        keys.blob("job1", 2).encode(),
    ]
    for index in (0, 2):
        assert 0 < scratch_redis.ttl(keys.blob("job1", index)) <= 60  # an abandoned upload expires
    store.delete_many("job1", [0])
    assert store.get_many("job1", [0, 2]) == [None, b"two"]
    store.delete_many("job1", [2, 5])  # deleting what is gone is fine
    store.delete_many("job1", [])
    assert store.get_many("job1", [2]) == [None]
    assert store.get_many("job2", [0]) == [b"other job"]  # other jobs untouched
