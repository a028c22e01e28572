"""The model registry against a private redis-server: what workers announce is what
the API lists and checks submits against; heartbeats count the workers serving each model and
forget the silent ones; a reload request moves the live pointer and reaches the subscribers."""

from __future__ import annotations

import json
import time

import redis as redis_lib

from batchvision.core.model_refs import ModelFacts
from batchvision.server import keys
from batchvision.server.registry import FAILED, FOUND, HEARTBEAT_TTL_S, READY, ModelRegistry


def test_announcements_make_the_listing_and_the_submit_facts(scratch_redis: redis_lib.Redis) -> None:
    worker, other = ModelRegistry(scratch_redis), ModelRegistry(scratch_redis)
    api = ModelRegistry(scratch_redis, cache_s=0)
    worker.announce_version(
        "shapes", 1, READY, classes=6, input_size=[48, 48], labels=list("abcdef"), load_s=0.5
    )
    worker.announce_version("shapes", 2, FOUND, only_new=True)
    worker.announce_version("shapes", 3, FAILED, error="ModelMismatch: 6 classes, 4 labels")
    other.announce_version("shapes", 3, FOUND, only_new=True)  # never hides what is known
    assert api.facts() == {}, "a model is listed once it is announced, not before"
    worker.announce_model("shapes", 1)
    worker.heartbeat("w1", {"shapes": 1})
    other.heartbeat("w2", {"shapes": 1})
    assert api.facts() == {"shapes": ModelFacts("shapes", 1, {1: 6, 2: None})}
    (listed,) = api.listing(default="shapes")
    assert listed["default"] and listed["live_version"] == 1 and listed["pinned_live_version"] is None
    assert (listed["input_size"], listed["classes"], listed["labels"]) == ([48, 48], 6, list("abcdef"))
    assert [(v["version"], v["status"]) for v in listed["versions"]] == [(1, READY), (2, FOUND), (3, FAILED)]
    assert "4 labels" in listed["versions"][2]["error"]
    assert (listed["workers"], listed["workers_by_version"]) == (2, {"1": 2})
    other.leave("w2", ["shapes"])
    assert api.listing(default="x")[0]["workers"] == 1
    worker.forget_versions("shapes", [2])
    assert [v["version"] for v in api.listing(default="x")[0]["versions"]] == [1, 3]


def test_silent_workers_stop_counting_and_are_forgotten(scratch_redis: redis_lib.Redis) -> None:
    registry = ModelRegistry(scratch_redis, cache_s=0)
    registry.announce_model("colours", 1)
    long_ago = time.time() - 20 * HEARTBEAT_TTL_S
    scratch_redis.zadd(
        keys.model_workers("colours"), {"dead": long_ago, "quiet": time.time() - 2 * HEARTBEAT_TTL_S}
    )
    scratch_redis.hset(keys.model_served("colours"), mapping={"dead": "1", "quiet": "1"})
    registry.heartbeat("alive", {"colours": 2})
    (listed,) = registry.listing(default="shapes")
    assert (listed["workers"], listed["workers_by_version"]) == (1, {"2": 1})
    served = set(scratch_redis.hkeys(keys.model_served("colours")))
    assert served == {b"quiet", b"alive"}, "the long-silent worker is forgotten"


def test_a_reload_request_moves_the_pointer_and_reaches_the_workers(scratch_redis: redis_lib.Redis) -> None:
    registry = ModelRegistry(scratch_redis, cache_s=0)
    registry.announce_model("shapes", 2)
    sub = registry.subscribe()
    time.sleep(0.05)
    req = registry.request_reload("shapes", 1, latest=False)
    assert req["receivers"] == 1 and registry.live_pointer("shapes") == 1
    deadline = time.monotonic() + 5
    while (msg := sub.get_message(timeout=0.5)) is None:
        assert time.monotonic() < deadline
    assert json.loads(msg["data"]) == {"id": req["id"], "model": "shapes", "version": 1, "latest": False}
    assert registry.listing(default="shapes")[0]["pinned_live_version"] == 1
    registry.request_reload("shapes", None, latest=True)
    assert registry.live_pointer("shapes") is None
    sub.close()
