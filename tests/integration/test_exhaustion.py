"""Exhaustion at the API: a full Redis, the byte budget and per-key quotas, bodies that would
amplify memory or recursion, and one job per ``Idempotency-Key`` under every failure order.

The app runs in this process (Flask's test client) on the private Redis (``scratch_redis``); no
worker reads it, so what a test queues stays queued until the test releases it (cancel, expiry).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import redis as redis_lib
from flask import Flask
from flask.testing import FlaskClient

from api import create_app
from api.services import Services
from batchvision.core.errors import TooManyRequests
from batchvision.core.results import Prediction
from batchvision.core.settings import Settings, key_digest, owner_of
from batchvision.core.synthetic import labelled_files
from batchvision.server import failpoints, keys, quotas
from batchvision.server.intake import Upload
from batchvision.testing.servers import RedisServer

KEY_A, KEY_B = "key-a-0123456789", "key-b-0123456789"


def _settings(server: RedisServer, **changes: Any) -> Settings:
    return Settings.from_env({}, redis_url=server.url, api_keys=f"{KEY_A},{KEY_B}", **changes)


def _app(server: RedisServer, **changes: Any) -> Flask:
    return create_app(_settings(server, **changes))


def _auth(key: str, **headers: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}", **headers}


def _images(n: int, seed: int = 1) -> list[tuple[str, bytes]]:
    return [(name, data) for name, data, _ in labelled_files(n, seed=seed)]


def _post_images(client: FlaskClient, key: str, files: list[tuple[str, bytes]], **headers: str) -> Any:
    data = {"files": [(io.BytesIO(b), n) for n, b in files]}
    return client.post(
        "/v1/jobs", data=data, headers=_auth(key, **headers), content_type="multipart/form-data"
    )


def _accounts(r: redis_lib.Redis) -> dict[str, int]:
    """Every counter of the queue's accounts, as numbers (absent: 0)."""
    quota = {k.decode(): int(v) for k, v in r.hgetall(keys.QUOTA).items()}
    return {
        "pending": int(r.get(keys.PENDING) or 0),
        "bytes": int(r.get(keys.PENDING_BYTES) or 0),
        "jobs": sum(1 for field in r.hkeys(keys.ACTIVE_PENDING) if b":" not in field),
        **quota,
    }


@pytest.fixture()
def flush(scratch_redis: redis_lib.Redis) -> Iterator[redis_lib.Redis]:
    yield scratch_redis
    scratch_redis.config_set("maxmemory", 0)
    failpoints.ACTIVE.pop("publish-fail", None)


# -- a full Redis ---------------------------------------------------------------------------


def test_an_out_of_memory_redis_is_a_503_with_retry_after(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    """Admission keeps uploads away from a full Redis (next tests); any other write that meets
    one (here a seal) is a 503 the client retries, never a 500."""
    client = _app(scratch_server).test_client()
    job = client.post("/v1/jobs", json={"expected": 1}, headers=_auth(KEY_A)).get_json()["job_id"]
    flush.config_set("maxmemory", 1)  # below what it uses: every write is refused (noeviction)
    resp = client.post(f"/v1/jobs/{job}/seal", headers=_auth(KEY_A))
    assert resp.status_code == 503, resp.get_json()
    assert resp.get_json()["error"]["code"] == "store_full"
    assert int(resp.headers["Retry-After"]) > 0
    fresh = _app(scratch_server).test_client()  # maxmemory is read again (it is cached a while)
    upload = _post_images(fresh, KEY_A, _images(1))
    assert upload.status_code == 429 and upload.get_json()["error"]["code"] == "queue_full"


def test_the_byte_budget_is_half_of_maxmemory_unless_set(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    flush.config_set("maxmemory", 64 * 2**20)
    derived = Services.create(_settings(scratch_server)).intake.quotas
    assert derived.byte_budget() == 32 * 2**20
    fixed = Services.create(_settings(scratch_server, max_queued_bytes=1000)).intake.quotas
    assert fixed.byte_budget() == 1000
    flush.config_set("maxmemory", 0)
    unlimited = Services.create(_settings(scratch_server)).intake.quotas
    assert unlimited.byte_budget() == 0  # no maxmemory, no setting: no byte limit


def test_over_the_byte_budget_uploads_get_429_and_get_in_once_room_is_made(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    files = _images(6)
    size = sum(len(b) for _, b in files[:3])
    client = _app(scratch_server, max_queued_bytes=size + 10).test_client()
    first = _post_images(client, KEY_A, files[:3])
    assert first.status_code == 202
    assert _accounts(flush)["bytes"] == size
    refused = _post_images(client, KEY_B, files[3:])  # any key: the budget is the whole queue's
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "queue_full"
    assert int(refused.headers["Retry-After"]) > 0
    assert client.delete(f"/v1/jobs/{first.get_json()['job_id']}", headers=_auth(KEY_A)).status_code == 204
    assert _accounts(flush) == {"pending": 0, "bytes": 0, "jobs": 0}  # all given back, once
    assert _post_images(client, KEY_B, files[3:]).status_code == 202
    too_big = _post_images(client, KEY_B, _images(12, seed=5))
    assert too_big.status_code == 413 and too_big.get_json()["error"]["code"] == "over_quota"


def test_one_key_cannot_take_the_whole_queue(
    scratch_server: RedisServer,
    flush: redis_lib.Redis,
) -> None:
    client = _app(scratch_server, max_queued_images_per_key=4).test_client()
    job = _post_images(client, KEY_A, _images(3)).get_json()["job_id"]
    refused = _post_images(client, KEY_A, _images(2, seed=2))
    assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "key_quota"
    assert "Retry-After" in refused.headers
    assert _post_images(client, KEY_B, _images(4, seed=3)).status_code == 202  # the other key is not held up
    accounts = _accounts(flush)
    owners = sorted((k, v) for k, v in accounts.items() if k.startswith("i:"))
    assert sorted(v for _, v in owners) == [3, 4] and accounts["pending"] == 7
    client.delete(f"/v1/jobs/{job}", headers=_auth(KEY_A))
    assert _post_images(client, KEY_A, _images(2, seed=2)).status_code == 202


def test_a_request_admitted_but_not_yet_written_holds_its_share(
    scratch_server: RedisServer,
    flush: redis_lib.Redis,
    monkeypatch: pytest.MonkeyPatch,
    wait_until: Callable[..., Any],
) -> None:
    """Concurrent requests of one key cannot all pass a quota that only their sum breaks: an
    admitted request holds its images until the writes that count them, which remove the hold
    (no image counted twice); a failed request gives it back, a dead one's lapses."""
    settings = _settings(scratch_server, max_queued_images_per_key=4)
    client = create_app(settings).test_client()
    intake = Services.create(settings).intake
    owner_a = owner_of(key_digest(KEY_A))
    # A request of key A admitted for three images, not written yet (its uploads still being
    # read, say): a second request of A that would go over the quota with them waits.
    with intake.backpressure(owner_a, 3, 3_000):
        refused = _post_images(client, KEY_A, _images(2))
        assert refused.status_code == 429 and refused.get_json()["error"]["code"] == "key_quota"
        assert "has 3 images waiting" in refused.get_json()["error"]["message"]
        assert _post_images(client, KEY_B, _images(4, seed=3)).status_code == 202  # not B's quota
        assert flush.zcard(keys.QUOTA_HELD) == 1
    assert flush.zcard(keys.QUOTA_HELD) == 0  # left without its writes: given back
    # A process that dies while it holds: the hold lapses.
    monkeypatch.setattr(quotas, "HOLD_LAPSE_S", 1)
    intake.backpressure(owner_a, 4, 4_000)
    assert _post_images(client, KEY_A, _images(1)).status_code == 429
    wait_until(
        lambda: _post_images(client, KEY_A, _images(1)).status_code == 202,
        timeout=20,
        message="the dead request's hold lapsed",
    )
    # Written requests count their images once: in the counters, their holds gone with the MULTI.
    assert _post_images(client, KEY_A, _images(2, seed=2)).status_code == 202
    opened = client.post("/v1/jobs", json={"expected": 2}, headers=_auth(KEY_A)).get_json()["job_id"]
    part = {"files": [(io.BytesIO(b), n) for n, b in _images(1, seed=4)]}
    added = client.post(f"/v1/jobs/{opened}/files", data=part, headers=_auth(KEY_A))
    assert added.status_code == 202, added.get_json()
    assert _accounts(flush)[f"i:{owner_a}"] == 4 and flush.zcard(keys.QUOTA_HELD) == 0
    part = {"files": [(io.BytesIO(b), n) for n, b in _images(1, seed=5)]}
    assert client.post(f"/v1/jobs/{opened}/files", data=part, headers=_auth(KEY_A)).status_code == 429
    assert flush.zcard(keys.QUOTA_HELD) == 0


def test_concurrent_requests_of_one_key_get_in_only_as_far_as_the_quota(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    """Ten requests of 60 images at once against a quota of 100, each through its own
    connections: exactly one gets in, whatever the order (before admission held what it let in,
    six to nine did)."""
    settings = _settings(scratch_server, max_queued_images_per_key=100)
    files = _images(60)
    services = [Services.create(settings) for _ in range(10)]
    start = threading.Barrier(len(services))
    codes: list[str] = []

    def submit(svc: Services, n: int) -> None:
        uploads = [Upload(f"{n}/{name}", name, data) for name, data in files]
        start.wait(30)
        try:
            svc.intake.submit(None, "owner", uploads, [], seal=True)
            codes.append("accepted")
        except TooManyRequests as err:
            codes.append(err.code)

    threads = [threading.Thread(target=submit, args=(svc, n)) for n, svc in enumerate(services)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert sorted(codes) == ["accepted"] + ["key_quota"] * 9
    assert _accounts(flush)["i:owner"] == 60 and flush.zcard(keys.QUOTA_HELD) == 0


def test_results_give_back_exactly_what_their_images_held(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    """Stored results lower the counters by their own images' bytes; a redelivered result
    changes nothing; a refused file (no blob) holds no bytes."""
    svc = Services.create(_settings(scratch_server))
    files = _images(3)
    uploads = [Upload(n, n, b) for n, b in files] + [Upload("bad.jpg", "bad.jpg", b"not an image")]
    done = svc.intake.submit(None, "owner", uploads, [], seal=True)
    assert [r.filename for r in done.rejected] == ["bad.jpg"]
    sizes = [len(b) for _, b in files]
    assert _accounts(flush) == {
        "pending": 3,
        "bytes": sum(sizes),
        "jobs": 1,
        "i:owner": 3,
        "b:owner": sum(sizes),
    }
    ok = Prediction("x", 0, 1.0, ())
    svc.store.record(done.job_id, [(0, ok)])
    svc.store.record(done.job_id, [(0, ok)])  # a redelivery
    left = sum(sizes[1:])
    assert _accounts(flush) == {"pending": 2, "bytes": left, "jobs": 1, "i:owner": 2, "b:owner": left}
    svc.store.record(done.job_id, [(1, ok), (2, ok)])
    assert _accounts(flush) == {"pending": 0, "bytes": 0, "jobs": 0}


def test_an_expired_upload_gives_back_what_it_held(
    scratch_server: RedisServer, flush: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    svc = Services.create(_settings(scratch_server, blob_ttl_s=1))
    svc.intake.submit(None, "owner", [Upload(n, n, b) for n, b in _images(2)], [], seal=False)
    assert _accounts(flush)["pending"] == 2
    wait_until(lambda: svc.telemetry.release_expired() == 1, timeout=10, message="the open upload expired")
    assert _accounts(flush) == {"pending": 0, "bytes": 0, "jobs": 0}
    assert svc.telemetry.release_expired() == 0  # released once


# -- bodies that amplify --------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    ["[" * 20_000 + "]" * 20_000, '{"urls": ' + "[" * 20_000 + "]" * 20_000 + "}"],
    ids=["array", "urls"],
)
def test_a_json_body_nested_too_deep_is_a_400(
    scratch_server: RedisServer, flush: redis_lib.Redis, body: str
) -> None:
    client = _app(scratch_server).test_client()
    resp = client.post("/v1/jobs", data=body, content_type="application/json", headers=_auth(KEY_A))
    assert resp.status_code == 400, resp.get_json()
    assert resp.get_json()["error"]["code"] == "bad_body"
    assert "nested deeper" in resp.get_json()["error"]["message"]


def test_url_lists_over_the_limit_are_refused_whole(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    client = _app(scratch_server, max_urls_per_job=50).test_client()
    urls = [f"https://example.com/{i}.jpg" for i in range(51)]
    as_json = client.post("/v1/jobs", json={"urls": urls}, headers=_auth(KEY_A))
    assert as_json.status_code == 413 and as_json.get_json()["error"]["code"] == "too_many_urls"
    listing = client.post(
        "/v1/jobs", data="\n".join(urls), content_type="text/uri-list", headers=_auth(KEY_A)
    )
    assert listing.status_code == 413 and listing.get_json()["error"]["code"] == "too_many_urls"
    fits = client.post("/v1/jobs", json={"urls": urls[:50]}, headers=_auth(KEY_A))
    assert fits.status_code == 202 and fits.get_json()["total"] == 50


# -- one job per Idempotency-Key ------------------------------------------------------------


def _jobs(r: redis_lib.Redis) -> int:
    return sum(1 for k in r.scan_iter(f"{keys.PREFIX}:job:*", count=1000) if k.endswith(b"}"))


def test_a_failed_publish_keeps_the_key_on_the_stored_job(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    client = _app(scratch_server).test_client()
    files = _images(2)
    failpoints.ACTIVE["publish-fail"] = ""
    failed = _post_images(client, KEY_A, files, **{"Idempotency-Key": "k1"})
    assert failed.status_code == 503  # the broker refused: the client retries
    del failpoints.ACTIVE["publish-fail"]
    retry = _post_images(client, KEY_A, files, **{"Idempotency-Key": "k1"})
    assert retry.status_code == 200 and retry.get_json()["idempotent_replay"] is True
    assert _jobs(flush) == 1
    job_id = retry.get_json()["job_id"]
    ledger = [m.decode() for m in flush.zrange(keys.CHUNKS, 0, -1)]
    assert ledger == [f"{job_id}:0,1"]  # what the sweeper re-sends: the job still runs


def test_an_api_killed_between_store_and_publish_leaves_one_job(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    settings = _settings(scratch_server)
    script = (
        "import io, sys\n"
        "from api import create_app\n"
        "from batchvision.core.synthetic import labelled_files\n"
        "name, data, _ = next(labelled_files(1, seed=1))\n"
        "c = create_app().test_client()\n"
        "c.post('/v1/jobs', data={'files': [(io.BytesIO(data), name)]}, content_type='multipart/form-data',\n"
        f"       headers={{'Authorization': 'Bearer {KEY_A}', 'Idempotency-Key': 'k2'}})\n"
        "sys.exit(3)  # not reached: the failpoint kills the process\n"
    )
    env = {**os.environ, **settings.to_env(include_secrets=True), "BV_FAILPOINTS": "crash-after-store"}
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, timeout=120)
    assert proc.returncode == -9, proc.stderr.decode()[-2000:]
    assert _jobs(flush) == 1
    client = _app(scratch_server).test_client()
    retry = _post_images(client, KEY_A, _images(1), **{"Idempotency-Key": "k2"})
    assert retry.status_code == 200 and retry.get_json()["idempotent_replay"] is True
    assert _jobs(flush) == 1


@pytest.mark.parametrize("first_to_commit", ["slow", "retry"])
def test_a_request_slower_than_the_pending_slot_still_makes_one_job(
    scratch_server: RedisServer, flush: redis_lib.Redis, wait_until: Callable[..., Any], first_to_commit: str
) -> None:
    """The slow request (a large archive) outlives its ``pending`` slot; its retry starts
    meanwhile. Whichever stores its job first makes the job; the other returns it."""
    svc = Services.create(_settings(scratch_server))
    svc.idempotency.pending_ttl_s = 1
    uploads = [Upload(n, n, b) for n, b in _images(2)]
    entered, go_on = threading.Event(), threading.Event()
    got: dict[str, tuple[str, Any]] = {}

    def slow_create(claim: Any) -> tuple[str, Any]:
        entered.set()
        go_on.wait(30)
        done = svc.intake.submit(None, "owner", uploads, [], seal=True, claim=claim)
        return done.job_id, done

    def slow() -> None:
        got["slow"] = svc.idempotency.run("owner", "digest", "fp", slow_create)

    def fast_create(claim: Any) -> tuple[str, Any]:
        done = svc.intake.submit(None, "owner", uploads, [], seal=True, claim=claim)
        return done.job_id, done

    thread = threading.Thread(target=slow)
    thread.start()
    try:
        entered.wait(30)
        slot = keys.idempotency("owner", "digest")
        wait_until(lambda: not flush.exists(slot), timeout=10, message="the pending slot expired")
        if first_to_commit == "slow":
            go_on.set()
            thread.join(30)
            got["retry"] = svc.idempotency.run("owner", "digest", "fp", fast_create)
        else:
            got["retry"] = svc.idempotency.run("owner", "digest", "fp", fast_create)
            go_on.set()
            thread.join(30)
    finally:
        go_on.set()
        thread.join(30)
    maker, other = ("slow", "retry") if first_to_commit == "slow" else ("retry", "slow")
    assert got[maker][1] is not None and got[other][1] is None  # the other one replays
    assert got[maker][0] == got[other][0]
    assert _jobs(flush) == 1
    assert _accounts(flush)["pending"] == 2  # the discarded request counted nothing


def test_the_submit_summary_is_typed_and_the_reply_is_the_document(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    client = _app(scratch_server).test_client()
    files = [*_images(1), ("bad.jpg", b"nope")]
    reply = _post_images(client, KEY_A, files).get_json()
    assert reply["accepted"] == 1 and reply["duplicates"] == 0 and reply["skipped"] == []
    assert [(r["index"], r["filename"], r["code"]) for r in reply["rejected"]] == [
        (1, "bad.jpg", "not_an_image")
    ]
    assert "queued" not in reply
    json.dumps(reply)


def test_zips_expanding_at_once_share_a_memory_budget_per_process(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    # Small zips that expand a hundredfold: together they would take the process' memory.
    import zipfile

    files = _images(4, seed=5)
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in files:
            zf.writestr(name, data)
    expands = sum(len(d) for _, d in files)
    app = _app(scratch_server, max_archive_bytes=expands, archive_memory_bytes=expands + expands // 2)
    memory = app.extensions["batchvision.archives"]
    memory.wait_s = 0.3
    client = app.test_client()

    def post() -> Any:
        return client.post(
            "/v1/jobs", data=buf.getvalue(), content_type="application/zip", headers=_auth(KEY_A)
        )

    other = app.test_request_context()  # another request is expanding one as large
    other.push()
    memory.take(expands)
    busy = post()
    assert busy.status_code == 503, busy.get_json()
    assert busy.get_json()["error"]["code"] == "archives_busy"
    assert "BATCHVISION_ARCHIVE_MEMORY_BYTES" in busy.get_json()["error"]["message"]
    assert int(busy.headers["Retry-After"]) > 0
    assert memory.used == expands  # the refused one holds nothing
    other.pop()  # its request ends: what it took is given back
    assert memory.used == 0
    accepted = post()
    assert accepted.status_code == 202 and accepted.get_json()["total"] == 4, accepted.get_json()
    assert memory.used == 0


def test_archive_memory_below_the_largest_archive_is_a_settings_error() -> None:
    from batchvision.core.settings import SettingsError

    with pytest.raises(SettingsError, match="ARCHIVE_MEMORY_BYTES .* is below .*MAX_ARCHIVE_BYTES"):
        Settings.from_env(
            {"BATCHVISION_ARCHIVE_MEMORY_BYTES": "1000", "BATCHVISION_MAX_ARCHIVE_BYTES": "2000"}
        )


def test_a_file_name_over_the_limit_is_refused_and_not_stored_whole(
    scratch_server: RedisServer, flush: redis_lib.Redis
) -> None:
    # Names are stored per file for as long as the job lives and no quota counts them: 50
    # names of 500 KB each would put 25 MB in Redis for a few KB of images.
    import zipfile

    files = _images(3, seed=6)
    long = "d/" + "A" * 200_000 + ".jpg"  # (a body under the test client's temporary-file size)
    client = _app(scratch_server).test_client()
    assert _post_images(client, KEY_A, files).status_code == 202  # Redis' first-use allocations
    before = flush.info("memory")["used_memory"]
    resp = _post_images(client, KEY_A, [files[0], (long, files[1][1]), (long, files[2][1])])
    assert resp.status_code == 202, resp.get_json()
    job = resp.get_json()
    assert job["total"] == 3 and [r["code"] for r in job["rejected"]] == ["bad_filename"] * 2, job
    assert "the limit is 1024" in job["rejected"][0]["message"]
    assert flush.info("memory")["used_memory"] - before < 100_000, "the long names were stored"
    files_listed = client.get(f"/v1/jobs/{job['job_id']}/files", headers=_auth(KEY_A)).get_json()
    names = files_listed["files"]  # the files' keys: their names, each once
    short = [n for n in names if n != files[0][0]]
    assert len(short) == 2 and all(n.startswith("d/AAA") and "…" in n and len(n) <= 1026 for n in short)
    # A zip member's name too.
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr(files[0][0], files[0][1])
        zf.writestr("B" * 60_000 + ".jpg", files[1][1])
    resp = client.post("/v1/jobs", data=buf.getvalue(), content_type="application/zip", headers=_auth(KEY_A))
    assert resp.status_code == 202 and [r["code"] for r in resp.get_json()["rejected"]] == ["bad_filename"]
    # Two different long names in two parts of one job: two files, not a file and its re-send.
    opened = client.post("/v1/jobs", json={"expected": 2}, headers=_auth(KEY_A)).get_json()
    for tail in ("x.jpg", "y.jpg"):
        data = {"files": [(io.BytesIO(files[0][1]), "C" * 2000 + tail)]}
        part = client.post(
            f"/v1/jobs/{opened['job_id']}/files",
            data=data,
            headers=_auth(KEY_A),
            content_type="multipart/form-data",
        )
        assert part.status_code in (200, 202) and part.get_json()["rejected"][0]["code"] == "bad_filename", (
            part.get_json()
        )
    assert (
        len(client.get(f"/v1/jobs/{opened['job_id']}/files", headers=_auth(KEY_A)).get_json()["files"]) == 2
    )
