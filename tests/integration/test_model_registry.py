"""The model registry against a private redis-server: what workers announce is what
the API lists and checks submits against; heartbeats count the workers serving each model and
forget the silent ones; a reload request moves the live pointer and reaches the subscribers."""

from __future__ import annotations

import json
import time
from typing import Any

import redis as redis_lib

from batchvision.core.model_refs import ModelFacts
from batchvision.server import keys
from batchvision.server.registry import FAILED, FOUND, HEARTBEAT_TTL_S, READY, ModelRegistry
from batchvision.testing.servers import RedisServer


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
    # Version 3's files mended: "found" replaces the refusal, but never a "ready" another
    # worker announced meanwhile.
    other.announce_version("shapes", 3, FOUND, only_new=True, over_failed=True)
    assert [v["status"] for v in api.listing(default="x")[0]["versions"]] == [READY, FOUND]
    worker.announce_version("shapes", 3, READY, classes=6)
    other.announce_version("shapes", 3, FOUND, only_new=True, over_failed=True)
    assert [v["status"] for v in api.listing(default="x")[0]["versions"]] == [READY, READY]


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


def test_an_admin_forgets_a_model_no_worker_serves_and_its_jobs_are_refused_again(
    scratch_server: RedisServer, scratch_redis: redis_lib.Redis
) -> None:
    # A model once served stays announced forever; jobs naming it were accepted and waited for
    # a worker that would not come.
    from api import create_app
    from batchvision.core.settings import Settings

    user, admin = "user-key-0123456789", "admin-key-0123456789"
    settings = Settings.from_env(
        {}, redis_url=scratch_server.url, api_keys=user, admin_keys=admin, model="shapes"
    )
    registry = ModelRegistry(scratch_redis)
    for name in ("shapes", "demo"):
        registry.announce_version(name, 1, READY, classes=6, input_size=[48, 48], labels=list("abcdef"))
        registry.announce_model(name, 1)
        registry.heartbeat(f"w-{name}", {name: 1})
    scratch_redis.set(keys.model_live("demo"), "1")
    client = create_app(settings).test_client()

    def forget(name: str, key: str = admin) -> Any:
        return client.delete(f"/v1/models/{name}", headers={"Authorization": f"Bearer {key}"})

    assert forget("demo", user).status_code == 403
    served = forget("demo")
    assert (served.status_code, served.get_json()["error"]["code"]) == (409, "model_served")
    assert "1 worker serves model 'demo'" in served.get_json()["error"]["message"]
    registry.leave("w-demo", ["demo"])
    gone = forget("demo")
    assert (gone.status_code, gone.get_json()) == (200, {"model": "demo", "forgotten": True})
    headers = {"Authorization": f"Bearer {user}"}
    assert [m["name"] for m in client.get("/v1/models", headers=headers).get_json()["models"]] == ["shapes"]
    refused = client.post("/v1/jobs?model=demo", data=b"x", content_type="image/jpeg", headers=headers)
    assert (refused.status_code, refused.get_json()["error"]["code"]) == (422, "invalid_option")
    assert not [k for k in scratch_redis.scan_iter(match="bv:models:*demo*")]
    assert not [f for f in scratch_redis.hkeys(keys.MODELS) if f.startswith(b"demo")]
    registry.leave("w-shapes", ["shapes"])
    default = forget("shapes")
    assert (default.status_code, default.get_json()["error"]["code"]) == (409, "default_model")
    assert forget("nope").status_code == 404
