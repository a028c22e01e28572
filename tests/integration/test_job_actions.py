"""Retry, cancel and delete a job, against a real redis-server.

The store level runs the real chunk processor (the ``rig``: stand-in colour models) so the
blobs a retry needs are kept or deleted by the worker's own code; only publishing is replaced
by a list of the chunks sent. The HTTP level runs the real API under gunicorn (``api_alone``):
routes, status codes, headers, and gunicorn's own refusals as JSON.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import kombu.exceptions
import pytest
import redis as redis_lib
import requests

from batchvision.core.errors import Conflict, ServiceUnavailable
from batchvision.core.model_refs import JobOptions
from batchvision.core.priorities import DEFAULT_PRIORITY
from batchvision.core.results import error_result
from batchvision.core.settings import Settings
from batchvision.server import intake as intake_module
from batchvision.server import job_actions, keys, lua
from batchvision.server.blobs import REAP_STALE_S, FileBlobs, S3Blobs, reap_kept
from batchvision.server.intake import Intake, Upload
from batchvision.server.keys import JobKeys
from batchvision.server.messages import Chunk
from batchvision.server.recovery import RESEND_FIRST_S, recover_parts, resend_failed
from batchvision.server.registry import READY, ModelRegistry
from batchvision.server.s3 import S3, S3Config, S3Url
from batchvision.server.telemetry import Telemetry
from batchvision.server.webhooks import delivery_id
from batchvision.testing.s3server import CREDENTIALS, MotoServer

pytestmark = pytest.mark.integration

JOB = "a" * 32


class SentChunks:
    """What the intake publishes, recorded instead of sent (the rig processes it)."""

    def __init__(self) -> None:
        self.sent: list[tuple[tuple[Chunk, ...], bool, str | None, int]] = []

    def send(
        self,
        chunks: Sequence[Chunk],
        now: float,
        interactive: bool,
        model: str | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        self.sent.append((tuple(chunks), interactive, model, priority))


@pytest.fixture()
def intake(rig: Any) -> Intake:
    settings = Settings.from_env({}, redis_url="redis://unused/0", chunk_size=8)
    return Intake(settings, rig.r, rig.store, rig.blobs, Telemetry(rig.r), SentChunks())  # type: ignore[arg-type]


def _finished_with_a_poison_image(rig: Any, job_id: str = JOB) -> None:
    """A job of four images (red, green, blue, not an image) whose first delivery died, and
    whose image 0 already killed a worker twice: image 0 ends as ``poison_image`` (retryable),
    image 3 as ``not_an_image``-like (not retryable)."""
    images = [rig.jpeg("red"), rig.jpeg("green"), rig.jpeg("blue"), b"not an image at all"]
    rig.job(job_id, images)
    rig.r.hset(JobKeys.of(job_id).tries, mapping={"chunk:0": 1, "image:0": 2})
    rig.process((job_id, [0, 1, 2, 3]))


def test_a_retry_requeues_retryable_errors_exactly_once_even_when_retries_race(
    rig: Any, intake: Intake
) -> None:
    _finished_with_a_poison_image(rig)
    rows = rig.rows(JOB)
    assert rows[0]["error"] == {**rows[0]["error"], "code": "poison_image", "retryable": True}
    assert rows[3]["status"] == "error" and rows[3]["error"]["retryable"] is False
    assert [r["label"] for r in rows[1:3]] == ["green", "blue"]
    # The worker kept the blob of the retryable error only.
    assert rig.blobs_left(JOB) == [keys.blob(JOB, 0).encode()]
    assert rig.store.get(JOB)["status"] == "partial"

    # Eight retries at once: one queues image 0, the others find the job running again.
    start = threading.Barrier(8)
    outcomes: list[Any] = []

    def one() -> None:
        start.wait()
        try:
            outcomes.append(job_actions.retry(intake, JOB))
        except Conflict as exc:
            outcomes.append(exc.code)

    threads = [threading.Thread(target=one) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done = [o for o in outcomes if isinstance(o, job_actions.Retry)]
    assert [d.requeued for d in done if d.requeued] == [1], outcomes
    assert all(o == "job_running" for o in outcomes if not isinstance(o, job_actions.Retry)), outcomes
    sent = intake.enqueuer.sent  # type: ignore[attr-defined]
    assert sent == [((Chunk.of(JOB, [0]),), True, "colours", DEFAULT_PRIORITY)]
    job = rig.store.get(JOB)
    assert (job["status"], job["done"], job["failed"], job["finished_at"]) == ("running", 2, 1, None)
    assert int(rig.r.get(keys.PENDING)) == 1
    assert int(rig.r.hget(keys.ACTIVE_PENDING, JOB)) == 1
    assert rig.in_ledger(JOB, [0])

    # The worker classifies it (a first delivery again: the job's delivery counts were reset).
    rig.process((JOB, [0]))
    job = rig.store.get(JOB)
    assert (job["status"], job["done"], job["failed"]) == ("partial", 3, 1)
    assert rig.labels(JOB)[:3] == ["red", "green", "blue"]
    assert int(rig.r.get(keys.PENDING)) == 0 and rig.r.hget(keys.ACTIVE_PENDING, JOB) is None
    assert int(rig.r.get(keys.PENDING_BYTES)) == 0
    assert rig.blobs_left(JOB) == [] and not rig.in_ledger(JOB, [0])
    # Nothing retryable is left: a retry changes nothing.
    assert job_actions.retry(intake, JOB) == job_actions.Retry(0)
    assert rig.store.get(JOB)["finished_at"] == job["finished_at"]


def test_a_retry_for_a_model_removed_from_the_registry_is_refused(rig: Any, intake: Intake) -> None:
    # The job's model ("colours") was forgotten (DELETE /v1/models/colours) after the job ran:
    # no worker reads its queues, so requeued images would wait there for good.
    _finished_with_a_poison_image(rig)
    registry = ModelRegistry(rig.r, cache_s=3600)  # a stale cache must not hide the removal
    intake.models = registry
    registry.raw()
    with pytest.raises(Conflict) as err:
        job_actions.retry(intake, JOB)
    assert err.value.code == "model_forgotten" and "'colours'" in err.value.message
    assert intake.enqueuer.sent == []  # type: ignore[attr-defined]
    assert rig.rows(JOB)[0]["error"]["code"] == "poison_image" and not rig.in_ledger(JOB, [0])
    # Served again: the retry goes ahead, to the job's own model.
    registry.announce_version("colours", 1, READY, classes=3)
    registry.announce_model("colours", 1)
    assert job_actions.retry(intake, JOB).requeued == 1
    assert intake.enqueuer.sent == [((Chunk.of(JOB, [0]),), True, "colours", DEFAULT_PRIORITY)]  # type: ignore[attr-defined]


def test_an_image_whose_input_expired_is_listed_not_requeued(rig: Any, intake: Intake) -> None:
    _finished_with_a_poison_image(rig)
    rig.blobs.delete_many(JOB, [0])
    outcome = job_actions.retry(intake, JOB)
    assert outcome == job_actions.Retry(0, (job_actions.NotRequeued(0, "poison_image", "input_expired"),))
    assert rig.store.get(JOB)["status"] == "partial"
    assert rig.rows(JOB)[0]["error"]["code"] == "poison_image"


@pytest.fixture(params=["file", "s3"])
def lasting_blobs(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """A blob store whose blobs never expire on their own: a volume, or a bucket."""
    if request.param == "file":
        return FileBlobs(tmp_path / "blobs", keep_s=600)
    server: MotoServer = request.getfixturevalue("s3_server")
    bucket: str = request.getfixturevalue("s3_bucket")
    return S3Blobs(S3Url.parse(f"s3://{bucket}/blobs/"), S3(S3Config(endpoint_url=server.url)), keep_s=600)


class HalfStore(FileBlobs):
    """A volume whose writes fail after ``fail_after`` blobs of a call (``None``: never)."""

    fail_after: int | None = None

    def put_many(self, job_id: str, blobs: Any, pipe: Any = None) -> None:
        items = list(blobs.items())
        if self.fail_after is None:
            super().put_many(job_id, dict(items))
            return
        super().put_many(job_id, dict(items[: self.fail_after]))
        raise OSError("the store went away")


class FailingDeletes:
    """A blob store whose deletes fail (a volume or bucket refusing for the moment)."""

    def __init__(self, blobs: Any) -> None:
        self.blobs = blobs
        self.expiring = blobs.expiring

    def delete_many(self, job_id: str, indexes: Any, pipe: Any = None) -> None:
        raise OSError("the store refused the delete")


def _held(blobs: Any, job_id: str, total: int) -> list[int]:
    return [i for i, n in enumerate(blobs.sizes(job_id, list(range(total)))) if n]


def test_a_file_or_s3_store_keeps_a_retryable_images_blob_for_a_retry_until_it_is_reaped(
    scratch_redis: redis_lib.Redis, rig_on: Callable[..., Any], lasting_blobs: Any
) -> None:
    rig = rig_on(scratch_redis, blobs=lasting_blobs)
    settings = Settings.from_env({}, redis_url="redis://unused/0", chunk_size=8)
    intake = Intake(settings, rig.r, rig.store, lasting_blobs, Telemetry(rig.r), SentChunks())  # type: ignore[arg-type]
    _finished_with_a_poison_image(rig)
    # Only the retryable error's blob stays, listed to be reaped keep_s from now.
    assert _held(lasting_blobs, JOB, 4) == [0]
    deadline = rig.r.zscore(keys.KEPT_BLOBS, f"{JOB}:0")
    assert deadline is not None and abs(deadline - (time.time() + 600)) < 60
    assert rig.r.zcard(keys.KEPT_BLOBS) == 1
    assert reap_kept(rig.r, lasting_blobs) == 0  # not due: nothing goes

    # A retry queues it (no longer listed: the reaper leaves it to the worker), the worker
    # classifies it and deletes its blob.
    assert job_actions.retry(intake, JOB) == job_actions.Retry(1)
    assert rig.r.zcard(keys.KEPT_BLOBS) == 0
    rig.process((JOB, [0]))
    assert rig.labels(JOB)[:3] == ["red", "green", "blue"]
    assert _held(lasting_blobs, JOB, 4) == []

    # A second job: its kept blob is reaped once due; a retry then lists it as expired.
    other = "d" * 32
    _finished_with_a_poison_image(rig, other)
    assert _held(lasting_blobs, other, 4) == [0]
    rig.r.zadd(keys.KEPT_BLOBS, {f"{other}:0": time.time() - 1})
    assert reap_kept(rig.r, lasting_blobs) == 1
    assert _held(lasting_blobs, other, 4) == [] and rig.r.zcard(keys.KEPT_BLOBS) == 0
    assert job_actions.retry(intake, other) == job_actions.Retry(
        0, (job_actions.NotRequeued(0, "poison_image", "input_expired"),)
    )

    # A reap begun before a retry (the listing taken, the delete not done yet): the retry leaves
    # that image as it is, an input gone, rather than queue it while its blob goes.
    racing = "f" * 32
    _finished_with_a_poison_image(rig, racing)
    rig.r.zrem(keys.KEPT_BLOBS, f"{racing}:0")
    rig.r.zadd(keys.KEPT_BLOBS_REAPING, {f"{racing}:0": time.time()})
    assert job_actions.retry(intake, racing) == job_actions.Retry(
        0, (job_actions.NotRequeued(0, "poison_image", "input_expired"),)
    )
    assert rig.rows(racing)[0]["error"]["code"] == "poison_image" and not rig.in_ledger(racing, [0])
    # A reap whose delete failed (or whose worker died) is taken up again later.
    failing = FailingDeletes(lasting_blobs)
    rig.r.zadd(keys.KEPT_BLOBS, {f"{racing}:0": time.time() - 1})
    rig.r.zrem(keys.KEPT_BLOBS_REAPING, f"{racing}:0")
    with pytest.raises(OSError):
        reap_kept(rig.r, failing)
    assert _held(lasting_blobs, racing, 4) == [0] and rig.r.zcard(keys.KEPT_BLOBS_REAPING) == 1
    assert reap_kept(rig.r, lasting_blobs) == 0  # begun lately: not yet another worker's
    rig.r.zadd(keys.KEPT_BLOBS_REAPING, {f"{racing}:0": time.time() - REAP_STALE_S - 1})
    assert reap_kept(rig.r, lasting_blobs) == 1
    assert _held(lasting_blobs, racing, 4) == [] and rig.r.zcard(keys.KEPT_BLOBS_REAPING) == 0

    # Deleting a job takes its kept blobs and their listing with it.
    third = "e" * 32
    _finished_with_a_poison_image(rig, third)
    assert rig.r.zcard(keys.KEPT_BLOBS) == 1
    job_actions.delete(intake, third, "")
    assert _held(lasting_blobs, third, 4) == [] and rig.r.zcard(keys.KEPT_BLOBS) == 0


def test_running_canceled_and_unknown_jobs_are_refused(rig: Any, intake: Intake) -> None:
    rig.job(JOB, [rig.jpeg("red")])
    with pytest.raises(Conflict) as running:
        job_actions.retry(intake, JOB)
    assert running.value.code == "job_running" and running.value.status == 409
    rig.store.cancel(JOB)
    with pytest.raises(Conflict) as canceled:
        job_actions.retry(intake, JOB)
    assert canceled.value.code == "job_canceled"
    with pytest.raises(LookupError):
        job_actions.retry(intake, "b" * 32)


_CHANGES = {
    "results gone": "redis.call('DEL', K_RES)",
    "running again": "redis.call('HDEL', K_JOB, 'finished_at')",
    "canceled": "redis.call('HSET', K_JOB, 'cancel', '1')",
    "job gone": "redis.call('DEL', K_JOB)",
}


@pytest.mark.parametrize("change", sorted(_CHANGES))
def test_a_retry_whose_script_requeues_nothing_sends_nothing_and_leaves_no_ledger_entry(
    rig: Any, intake: Intake, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    # The job changes as the script starts: what WATCH cannot see (an expiry, say).
    _finished_with_a_poison_image(rig)
    first = "if redis.call('EXISTS', K_JOB) == 0 then return -1 end"
    assert first in lua.RETRY
    monkeypatch.setattr(lua, "RETRY", lua.RETRY.replace(first, _CHANGES[change] + "\n" + first))
    if change == "results gone":
        assert job_actions.retry(intake, JOB) == job_actions.Retry(0)
    else:
        with pytest.raises((Conflict, LookupError)) as refused:
            job_actions.retry(intake, JOB)
        expected = {"running again": "job_running", "canceled": "job_canceled"}.get(change)
        assert getattr(refused.value, "code", None) == expected
    assert intake.enqueuer.sent == []  # type: ignore[attr-defined]
    assert rig.r.zrange(keys.CHUNKS, 0, -1) == []
    if change == "job gone":
        assert JOB.encode() not in rig.r.zrange(keys.owner_jobs(""), 0, -1)


def test_the_webhook_waits_for_the_new_end_under_a_new_delivery_id(rig: Any, intake: Intake) -> None:
    rig.store.create(JOB, model="colours")
    rig.r.hset(JobKeys.of(JOB).job, mapping={"cb_url": "http://hook.example/x", "cb_state": "waiting"})
    indexed = rig.store.add_files(JOB, [("0.jpg", "0.jpg")])
    rig.blobs.put_many(JOB, {indexed[0][0]: rig.jpeg("green")})
    rig.store.record(JOB, [(0, error_result("fetch_timeout", "no answer within 2s"))])
    rig.store.seal(JOB)
    assert rig.r.zscore(keys.WEBHOOKS, JOB) is not None
    # The first end was delivered.
    rig.r.hset(JobKeys.of(JOB).job, mapping={"cb_state": "delivered", "cb_attempts": 1, "cb_delivered_at": 1})
    rig.r.zrem(keys.WEBHOOKS, JOB)

    assert job_actions.retry(intake, JOB).requeued == 1
    callback = rig.store.get(JOB)["callback"]
    assert (callback["state"], callback["attempts"], callback["delivered_at"]) == ("waiting", 0, None)
    assert rig.r.zscore(keys.WEBHOOKS, JOB) is None
    rig.process((JOB, [0]))
    assert rig.r.zscore(keys.WEBHOOKS, JOB) is not None  # due again, for the new end
    fields = {k.decode(): v.decode() for k, v in rig.r.hgetall(JobKeys.of(JOB).job).items()}
    assert fields["cb_state"] == "pending" and delivery_id(JOB, fields) == f"{JOB}.1"


def test_a_part_that_fails_half_way_leaves_every_image_a_way_to_a_result(
    rig: Any, intake: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    first = [Upload("a.jpg", "a.jpg", rig.jpeg("red"))]
    job = intake.submit(None, "", first, [], seal=False, options=JobOptions("colours")).job_id
    part = [Upload("b.jpg", "b.jpg", rig.jpeg("green")), Upload("c.jpg", "c.jpg", b"not an image")]

    def full(*args: Any, **kwargs: Any) -> None:
        raise redis_lib.exceptions.OutOfMemoryError("OOM command not allowed when used memory > 'maxmemory'")

    monkeypatch.setattr(intake.blobs, "put_many", full)
    with pytest.raises(redis_lib.exceptions.OutOfMemoryError):
        intake.submit(job, "", part, [], seal=False)  # Redis full as the part's blobs arrive
    monkeypatch.undo()
    # Indexed, and each has its way to a result: the refusal is stored, the image is an
    # unconfirmed part again (sent once the job is sealed; its ledger entry is gone).
    assert [r["filename"] for r in rig.rows(job)][1:] == ["b.jpg", "c.jpg"]
    assert rig.rows(job)[2]["error"]["code"] == "not_an_image"
    assert not rig.in_ledger(job, [1]) and rig.r.zscore(keys.UNCONFIRMED_PARTS, f"{job}:1:1") is not None
    intake.store.seal(job)  # the client gives up on the part and seals the job
    resent: list[Chunk] = []
    assert recover_parts(intake.store, resent.append, chunk_size=8, older_than_s=0) == 1
    rig.process((job, [0]), *((c.job_id, c.indexes) for c in resent))  # its first message, and the part
    doc = intake.store.get(job)
    assert doc is not None and doc["finished_at"] is not None
    assert [r.get("label") or r["error"]["code"] for r in rig.rows(job)] == [
        "red",
        "upload_expired",
        "not_an_image",
    ]


@pytest.mark.parametrize(
    ("fails", "refused"),
    [("record", "upload_expired"), ("ledger_add", "not_an_image")],
    ids=["before-its-refusals", "before-its-ledger-entries"],
)
def test_a_part_whose_request_dies_after_indexing_still_gives_every_image_a_result(
    rig: Any, intake: Intake, monkeypatch: pytest.MonkeyPatch, fails: str, refused: str
) -> None:
    first = [Upload("a.jpg", "a.jpg", rig.jpeg("red"))]
    job = intake.submit(None, "", first, [], seal=False, options=JobOptions("colours")).job_id
    rig.process((job, [0]))
    part = [Upload("b.jpg", "b.jpg", rig.jpeg("green")), Upload("c.jpg", "c.jpg", b"not an image")]

    def cut(*args: Any, **kwargs: Any) -> None:
        raise redis_lib.exceptions.ConnectionError("Connection reset by peer")

    # The connection is lost (or the API process killed) once the part's files are indexed.
    monkeypatch.setattr(
        *((intake.store, "record") if fails == "record" else (intake_module, "ledger_add")), cut
    )
    with pytest.raises(redis_lib.exceptions.ConnectionError):
        intake.submit(job, "", part, [], seal=False)
    monkeypatch.undo()
    resent: list[Chunk] = []
    # While the job is open, its client may still send the part again: nothing is taken yet.
    assert recover_parts(intake.store, resent.append, chunk_size=8, older_than_s=0) == 0 and resent == []
    intake.store.seal(job)  # the client resumes: both files are listed, so it only seals
    assert not rig.in_ledger(job, [1]) and intake.store.get(job)["finished_at"] is None
    # Within the grace period the request may still be running: nothing is taken.
    assert recover_parts(intake.store, resent.append, chunk_size=8) == 0 and resent == []
    assert recover_parts(intake.store, resent.append, chunk_size=8, older_than_s=0) == (
        2 if fails == "record" else 1
    )
    assert recover_parts(intake.store, resent.append, chunk_size=8, older_than_s=0) == 0  # once
    rig.process(*((c.job_id, c.indexes) for c in resent))
    doc = intake.store.get(job)
    assert doc is not None and doc["finished_at"] is not None
    assert rig.labels(job) == ["red", "upload_expired", refused]


def test_a_part_half_stored_in_a_bucket_is_sent_once_the_job_is_sealed(
    scratch_redis: redis_lib.Redis, rig_on: Callable[..., Any], tmp_path: Path
) -> None:
    # A volume or bucket takes the blobs one by one: the store went away after the first of a
    # part's two, before anything was sent. The client sends the part again, which stores the
    # missing one; the stored one used to be taken for an image on its way and waited for the
    # sweep (hours).
    blobs = HalfStore(tmp_path / "blobs")
    rig = rig_on(scratch_redis, blobs=blobs)
    settings = Settings.from_env({}, redis_url="redis://unused/0", chunk_size=8)
    intake = Intake(settings, rig.r, rig.store, blobs, Telemetry(rig.r), SentChunks())  # type: ignore[arg-type]
    first = [Upload("a.jpg", "a.jpg", rig.jpeg("red"))]
    job = intake.submit(None, "", first, [], seal=False, options=JobOptions("colours")).job_id
    rig.process((job, [0]))
    part = [Upload("b.jpg", "b.jpg", rig.jpeg("green")), Upload("c.jpg", "c.jpg", rig.jpeg("blue"))]
    blobs.fail_after = 1
    with pytest.raises(OSError):
        intake.submit(job, "", part, [], seal=False)
    blobs.fail_after = None
    assert blobs.sizes(job, [1, 2])[0] > 0 and blobs.sizes(job, [1, 2])[1] == 0  # half stored
    intake.submit(job, "", part, [], seal=False)  # the client's re-send: c.jpg stored and queued
    intake.store.seal(job)
    sent = intake.enqueuer.sent  # type: ignore[attr-defined]
    rig.process(*((c.job_id, c.indexes) for chunks, *_ in sent[1:] for c in chunks))
    assert intake.store.get(job)["finished_at"] is None  # b.jpg still has no result
    resent: list[Chunk] = []
    assert recover_parts(intake.store, resent.append, chunk_size=8, older_than_s=0) >= 1
    rig.process(*((c.job_id, c.indexes) for c in resent))
    assert rig.labels(job) == ["red", "green", "blue"]
    assert intake.store.get(job)["finished_at"] is not None


def test_a_part_that_succeeds_leaves_nothing_to_recover(rig: Any, intake: Intake) -> None:
    first = [Upload("a.jpg", "a.jpg", rig.jpeg("red"))]
    job = intake.submit(None, "", first, [], seal=False, options=JobOptions("colours")).job_id
    part = [Upload("b.jpg", "b.jpg", rig.jpeg("green")), Upload("c.jpg", "c.jpg", b"not an image")]
    intake.submit(job, "", part, [], seal=False)
    intake.submit(job, "", part[:1], [], seal=False)  # a re-sent file: nothing new
    assert rig.r.zcard(keys.UNCONFIRMED_PARTS) == 0
    assert recover_parts(intake.store, lambda chunk: None, chunk_size=8, older_than_s=0) == 0


def test_a_re_sent_part_queues_only_the_images_whose_upload_never_arrived(rig: Any, intake: Intake) -> None:
    first = [Upload("a.jpg", "a.jpg", rig.jpeg("red"))]
    job = intake.submit(None, "", first, [], seal=False, options=JobOptions("colours")).job_id
    part = [Upload("b.jpg", "b.jpg", rig.jpeg("green")), Upload("c.jpg", "c.jpg", rig.jpeg("blue"))]
    intake.submit(job, "", part, [], seal=False)
    sent = intake.enqueuer.sent  # type: ignore[attr-defined]
    assert [chunks for chunks, *_ in sent] == [(Chunk.of(job, [0]),), (Chunk.of(job, [1, 2]),)]
    # Re-sent while its images wait in the queue (a client that lost the answer): nothing new.
    again = intake.submit(job, "", part, [], seal=False)
    assert (again.accepted, again.queued, again.duplicates) == (0, 0, 2)
    assert len(sent) == 2
    # One upload never arrived (its request failed before its blob was stored): the re-send
    # stores and queues that one only.
    intake.blobs.delete_many(job, [1])
    assert intake.submit(job, "", part, [], seal=True).queued == 1
    assert [chunks for chunks, *_ in sent[2:]] == [(Chunk.of(job, [1]),)]
    rig.process((job, [0]), (job, [1, 2]), (job, [1]))
    assert rig.labels(job) == ["red", "green", "blue"]


@pytest.mark.parametrize("lost", ["writes", "reply"])
def test_uploads_on_a_volume_go_when_their_job_was_not_stored(
    rig: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path, lost: str
) -> None:
    # Uploads on a volume (or in a bucket) are written before the job's MULTI and never expire.
    settings = Settings.from_env({}, redis_url="redis://unused/0", chunk_size=8)
    blobs = FileBlobs(tmp_path / "blobs")
    intake = Intake(settings, rig.r, rig.store, blobs, Telemetry(rig.r), SentChunks())  # type: ignore[arg-type]
    real = intake_module.commit

    def cut(client: Any, claim: Any, job_id: str, writes: Any) -> None:
        if lost == "reply":  # Redis ran the MULTI; its answer was lost with the connection
            real(client, claim, job_id, writes)
        raise redis_lib.exceptions.ConnectionError("Connection reset by peer")

    monkeypatch.setattr(intake_module, "commit", cut)
    with pytest.raises(redis_lib.exceptions.ConnectionError):
        intake.submit(None, "", [Upload("a.jpg", "a.jpg", rig.jpeg("red"))], [], seal=True)
    files = [p for p in (tmp_path / "blobs").rglob("*") if p.is_file()]
    assert len(files) == (1 if lost == "reply" else 0), files


def test_a_job_whose_publish_failed_is_sent_again_after_a_pause_backlog_or_not(
    rig: Any, intake: Intake, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The request gets its 503; the job is stored. Only the sweep used to send its chunks,
    # once every queue was empty: under load, its images held the owner's quota meanwhile.
    def broker_down(*args: Any, **kwargs: Any) -> None:
        raise kombu.exceptions.OperationalError("the broker did not take the task in time")

    monkeypatch.setattr(intake.enqueuer, "send", broker_down)
    with pytest.raises(ServiceUnavailable) as refused:  # a 503 that names the stored job
        intake.submit(
            None,
            "",
            [Upload("a.jpg", "a.jpg", rig.jpeg("red"))],
            [],
            seal=True,
            options=JobOptions("colours"),
        )
    monkeypatch.undo()
    (detail,) = refused.value.details
    assert intake.store.get(detail["job_id"]) is not None
    assert isinstance(refused.value.__cause__, kombu.exceptions.OperationalError)
    resent: list[Chunk] = []

    def give_up(chunk: Chunk, failures: int) -> None:
        raise AssertionError(f"{chunk} given up after {failures}")

    assert resend_failed(intake.store, resent.append, give_up) == 0  # not before the pause
    assert resend_failed(intake.store, resent.append, give_up, now=time.time() + RESEND_FIRST_S) == 1
    rig.process(*((c.job_id, c.indexes) for c in resent))
    assert rig.labels(resent[0].job_id) == ["red"]


def test_a_prefix_job_of_a_key_whose_quota_is_below_a_page_lists_pages_that_fit(
    rig: Any, s3_server: MotoServer, s3_bucket: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A first page of LIST_PAGE_SIZE (1,000) images never fits a quota of 5: it was refused
    # for good (413, "send it in smaller parts", which a prefix cannot).
    for name, value in CREDENTIALS.items():
        monkeypatch.setenv(name, value)
    for i in range(8):
        s3_server.client().put_object(Bucket=s3_bucket, Key=f"in/{i}.jpg", Body=rig.jpeg("red"))
    settings = Settings.from_env(
        {},
        redis_url="redis://unused/0",
        s3_endpoint_url=s3_server.url,
        s3_allow="*",
        max_queued_images_per_key=5,
    )
    intake = Intake(settings, rig.r, rig.store, rig.blobs, Telemetry(rig.r), SentChunks())  # type: ignore[arg-type]
    submitted = intake.submit_prefix("", f"s3://{s3_bucket}/in/", options=JobOptions("colours"))
    assert submitted.accepted == 5
    assert rig.store.get(submitted.job_id)["listing"]["state"] == "listing"  # the rest: the workers'


def test_delete_leaves_nothing_of_the_job(rig: Any, intake: Intake) -> None:
    _finished_with_a_poison_image(rig)  # a kept blob
    other = "c" * 32
    rig.job(other, [rig.jpeg("red"), rig.jpeg("blue")])  # queued, never processed
    assert int(rig.r.get(keys.PENDING)) == 2
    for job_id in (JOB, other):
        job_actions.delete(intake, job_id, "")
        assert list(rig.r.scan_iter(match=f"*{job_id}*")) == [], job_id
    assert int(rig.r.get(keys.PENDING)) == 0 and int(rig.r.get(keys.PENDING_BYTES)) == 0
    assert rig.r.zcard(keys.owner_jobs("")) == 0 and rig.r.zscore(keys.ACTIVE, other) is None
    # A worker holding the deleted job's chunk stores nothing and counts nothing.
    rig.process((other, [0, 1]))
    assert list(rig.r.scan_iter(match=f"*{other}*")) == []
    assert int(rig.r.get(keys.PENDING)) == 0


# -- over HTTP, the API under gunicorn (no worker) ------------------------------------------------

ADMIN = "admin-key-of-the-job-actions-test"


@pytest.fixture(scope="module")
def api(api_alone: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    with api_alone(admin_keys=ADMIN, chunk_size=8) as alone:
        yield alone


def _job(url: str, files: int = 3) -> str:
    parts = [("files", (f"{i}.png", _png(), "image/png")) for i in range(files)]
    resp = requests.post(f"{url}/v1/jobs", files=parts, timeout=30)
    assert resp.status_code == 202, resp.text
    return str(resp.json()["job_id"])


def _png() -> bytes:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, "PNG")
    return buf.getvalue()


def test_http_retry_cancel_and_delete(api: Any) -> None:
    r = redis_lib.Redis.from_url(api.redis_url)
    job_id = _job(api.url)
    # No worker: the job runs (queued) until canceled.
    retry = requests.post(f"{api.url}/v1/jobs/{job_id}/retry", timeout=30)
    assert retry.status_code == 409 and retry.json()["error"]["code"] == "job_running"
    unknown = requests.post(f"{api.url}/v1/jobs/{'0' * 32}/retry", timeout=30)
    assert unknown.status_code == 404 and unknown.json()["error"]["code"] == "job_not_found"
    bad = requests.post(f"{api.url}/v1/jobs/not-a-job/retry", timeout=30)
    assert bad.status_code == 400 and bad.json()["error"]["code"] == "bad_job_id"

    # POST .../cancel: canceled, still readable.
    canceled = requests.post(f"{api.url}/v1/jobs/{job_id}/cancel", timeout=30)
    assert canceled.status_code == 200 and canceled.json()["status"] == "canceled"
    assert requests.get(f"{api.url}/v1/jobs/{job_id}/files", timeout=30).status_code == 200
    refused = requests.post(f"{api.url}/v1/jobs/{job_id}/retry", timeout=30)
    assert refused.status_code == 409 and refused.json()["error"]["code"] == "job_canceled"

    # The old DELETE, for one more version: cancels, deprecated, points to its successor.
    old = _job(api.url)
    resp = requests.delete(f"{api.url}/v1/jobs/{old}?mode=cancel", timeout=30)
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    assert resp.headers["Deprecation"].startswith("@") and resp.headers["Sunset"].endswith(" GMT")
    assert resp.headers["Link"] == f'</v1/jobs/{old}/cancel>; rel="successor-version"'
    assert requests.get(f"{api.url}/v1/jobs/{old}", timeout=30).status_code == 200
    wrong = requests.delete(f"{api.url}/v1/jobs/{old}?mode=erase", timeout=30)
    assert wrong.status_code == 400 and "mode" in wrong.json()["error"]["message"]

    # DELETE removes the job, its results and its blobs: every route answers 404 after it.
    queued = _job(api.url, files=5)
    assert len(list(r.scan_iter(match=keys.blob_pattern(queued)))) == 5
    gone = requests.delete(f"{api.url}/v1/jobs/{queued}", timeout=30)
    assert gone.status_code == 204 and gone.content == b""
    for method, path in [
        ("GET", ""),
        ("GET", "/files"),
        ("GET", "/results"),
        ("POST", "/cancel"),
        ("POST", "/retry"),
        ("DELETE", ""),
    ]:
        after = requests.request(method, f"{api.url}/v1/jobs/{queued}{path}", timeout=30)
        assert after.status_code == 404 and after.json()["error"]["code"] == "job_not_found", (method, path)
    assert list(r.scan_iter(match=f"*{queued}*")) == []
    listed = requests.get(f"{api.url}/v1/jobs", timeout=30).json()["jobs"]
    assert queued not in {j["job_id"] for j in listed} and job_id in {j["job_id"] for j in listed}
    # What the queue counted for the deleted (and canceled) jobs was given back.
    assert int(r.get(keys.PENDING) or 0) == 0 and int(r.get(keys.PENDING_BYTES) or 0) == 0


def test_a_whole_number_version_is_an_integer_and_a_fraction_is_named(api: Any) -> None:
    headers = {"Authorization": f"Bearer {ADMIN}"}
    url = f"{api.url}/v1/models/shapes/reload"
    whole = requests.post(url, json={"version": 192.0}, headers=headers, timeout=30)
    # Accepted as 192: what refuses it is that no worker serves a model named shapes here.
    assert whole.status_code == 404 and whole.json()["error"]["code"] == "model_not_found", whole.text
    for value in (192.5, True, "192"):
        half = requests.post(url, json={"version": value}, headers=headers, timeout=30)
        error = half.json()["error"]
        assert half.status_code == 400 and error["code"] == "bad_body", half.text
        assert (
            error["message"].startswith("body field 'version': ")
            and error["details"][0]["field"] == "version"
        )


def test_gunicorn_refusals_are_the_json_error_document(api: Any) -> None:
    long_line = requests.get(f"{api.url}/v1/jobs?cursor={'x' * 10_000}", timeout=30)
    assert long_line.status_code == 414
    assert long_line.headers["Content-Type"] == "application/json"
    error = long_line.json()["error"]
    assert error["code"] == "request_line_too_long" and "8190" in error["message"], error
    big_header = requests.get(f"{api.url}/healthz", headers={"X-Big": "y" * 10_000}, timeout=30)
    assert big_header.status_code == 431 and big_header.json()["error"]["code"] == "headers_too_large"
    # The server is fine afterwards: it answers (within the request's 30 s, not a tighter bound
    # that a loaded CI machine would miss).
    assert requests.get(f"{api.url}/healthz", timeout=30).status_code == 200
