"""The core pipeline for real: redis-server, `batchvision api` (gunicorn), `batchvision worker`
(Celery, threads pool) and the demo Keras model. Nothing mocked."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis as redis_lib
import requests
from PIL import Image

from batchvision.client import ApiError, Client
from batchvision.core.documents import Job
from batchvision.core.settings import Settings
from batchvision.core.synthetic import encode, labelled_files
from batchvision.server import keys
from batchvision.server.keys import JobKeys
from batchvision.server.store import JobStore
from batchvision.server.telemetry import Telemetry


def _wait(api_url: str, job_id: str, timeout: float = 600) -> Job:
    return Client(api_url).wait(job_id, timeout=timeout, poll_s=0.2)


def test_three_concurrent_jobs_exactly_one_correct_result_each(
    api_url: str,
    settings: Settings,
    demo_model: Path,
    reference_labels: Callable[..., list[str]],
    wait_until: Callable[..., Any],
) -> None:
    jobs = [list(labelled_files(n, seed=100 + k)) for k, n in enumerate((60, 50, 45))]
    client = Client(api_url)
    with ThreadPoolExecutor(3) as pool:
        submitted = list(pool.map(lambda files: client.submit_files([(n, d) for n, d, _ in files]), jobs))
    assert all(s.total == len(f) for s, f in zip(submitted, jobs, strict=True))
    total = 0
    for sub, files in zip(submitted, jobs, strict=True):
        status = _wait(api_url, sub.job_id)
        assert status.status == "succeeded", status
        assert status.done == len(files) and status.failed == 0
        rows = client.results(sub.job_id)
        assert [r.index for r in rows] == list(range(len(files)))  # one per image, upload order
        assert [r.filename for r in rows] == [n for n, _, _ in files]
        for row in rows:
            assert set(row.model_dump(exclude_unset=True)) >= {"label", "class_id", "score", "top_k"}
            assert len(row.top_k) == min(settings.top_k, 6)
            total += 1
        # Correct: the label the same model file gives each image in this process.
        assert [r.label for r in rows] == reference_labels(demo_model, [(n, d) for n, d, _ in files])
    assert total >= 150

    # Every image went through exactly one batch, and batches held several images. (Whether a
    # batch here mixes the jobs depends on when each upload arrives, which is up to the machine:
    # cross-job batches are checked where arrival is the test's, in test_chunk_processor.py's
    # test_one_message_of_several_jobs_is_classified_together and the batcher's unit tests.)
    store = JobStore(redis_lib.Redis.from_url(settings.redis_url), result_ttl_s=60, blob_ttl_s=60)
    telemetry = Telemetry(store.redis)
    ids = {s.job_id for s in submitted}

    def logged() -> list[dict[str, Any]]:
        return [b for b in telemetry.recent_batches() if set(b["jobs"]) & ids]

    # (The log is written by a thread of its own, just after each batch's results are out.)
    wait_until(
        lambda: sum(b["size"] for b in logged()) >= total, timeout=60, message="the batch log has every image"
    )
    batches = logged()
    assert sum(b["size"] for b in batches) == total
    assert max(b["size"] for b in batches) > 1
    # Blobs are deleted once their result is stored.
    assert not list(store.redis.scan_iter(match=keys.blob_pattern(submitted[0].job_id)))


def test_bad_images_get_per_image_errors_and_the_rest_is_processed(
    api_url: str, demo_model: Path, reference_labels: Callable[..., list[str]]
) -> None:
    good = list(labelled_files(4, seed=7))
    jpeg = good[0][1]
    huge = encode(Image.new("RGB", (2100, 2000), (9, 9, 9)), "PNG")  # 4.2 MP > the 4 MP test limit
    files = [
        (good[0][0], good[0][1]),
        ("truncated.jpg", jpeg[: len(jpeg) // 2]),
        (good[1][0], good[1][1]),
        ("notes.jpg", b"this is a text file renamed .jpg\n"),
        ("huge.png", huge),
        (good[2][0], good[2][1]),
    ]
    resp = requests.post(f"{api_url}/v1/jobs", files=[("files", f) for f in files], timeout=30)
    assert resp.status_code == 202
    body = resp.json()
    assert resp.headers["Location"].endswith(f"/v1/jobs/{body['job_id']}")
    assert {r["filename"]: r["code"] for r in body["rejected"]} == {
        "truncated.jpg": "truncated",
        "notes.jpg": "not_an_image",
        "huge.png": "too_many_pixels",
    }
    status = _wait(api_url, body["job_id"])
    assert (status.status, status.done, status.failed) == ("partial", 3, 3)
    rows = Client(api_url).results(body["job_id"])
    by_name = {r.filename: r for r in rows}
    sent = [(n, d) for n, d, _ in good[:3]]
    assert [by_name[n].label for n, _ in sent] == reference_labels(demo_model, sent)
    for bad in ("truncated.jpg", "notes.jpg", "huge.png"):
        assert by_name[bad].status == "error" and by_name[bad].error.message


def test_request_with_no_usable_file_is_422_with_reasons(api_url: str) -> None:
    files = [("files", ("a.jpg", b"nope")), ("files", ("b.gif", b"GIF89a-broken"))]
    resp = requests.post(f"{api_url}/v1/jobs", files=files, timeout=30)
    assert resp.status_code == 422
    err = resp.json()["error"]
    assert err["code"] == "no_valid_images"
    assert [d["filename"] for d in err["details"]] == ["a.jpg", "b.gif"]


def test_unknown_job_is_404_and_a_malformed_id_400(api_url: str) -> None:
    unknown = uuid.uuid4().hex  # well formed, never created
    for path in (f"/v1/jobs/{unknown}", f"/v1/jobs/{unknown}/results"):
        resp = requests.get(api_url + path, timeout=10)
        assert resp.status_code == 404
        assert resp.json()["error"]["code"] == "job_not_found"
    assert requests.delete(f"{api_url}/v1/jobs/{unknown}", timeout=10).status_code == 404
    resp = requests.get(f"{api_url}/v1/jobs/nope", timeout=10)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_job_id"


def test_a_long_poll_answers_when_the_job_is_final(api_url: str) -> None:
    client = Client(api_url)
    job_id = client.submit_files([(n, d) for n, d, _ in labelled_files(20, seed=12)]).job_id
    # One request: the answer is held until every image has its result.
    resp = requests.get(f"{api_url}/v1/jobs/{job_id}?wait=120", timeout=180)
    assert resp.status_code == 200
    assert (resp.json()["status"], resp.json()["done"]) == ("succeeded", 20)
    # An upload still open cannot finish: the poll answers the job as it stands when `wait` ends.
    open_id = client.open_job().job_id
    started = time.monotonic()
    job = client.status(open_id, wait=0.5)
    assert (job.status, job.total) == ("queued", 0)
    assert time.monotonic() - started >= 0.5  # held for the whole wait
    for bad in ("-1", "soon", "1e9"):
        resp = requests.get(f"{api_url}/v1/jobs/{job_id}?wait={bad}", timeout=10)
        assert resp.status_code == 400 and "'wait'" in resp.json()["error"]["message"], resp.text


def test_a_long_poll_is_held_at_most_sync_timeout_s(
    api_alone: Callable[..., AbstractContextManager[Any]],
) -> None:
    # The longest wait the contract allows (3600 s) on a job that cannot finish: the API
    # answers after SYNC_TIMEOUT_S, so a client's timeout just above that is always enough.
    with api_alone(sync_timeout_s=2) as api:
        open_id = Client(api.url).open_job().job_id
        started = time.monotonic()
        resp = requests.get(f"{api.url}/v1/jobs/{open_id}?wait=3600", timeout=60)
        held = time.monotonic() - started
        assert resp.status_code == 200 and resp.json()["status"] == "queued", resp.text
        assert 2 <= held < 30, held


def test_raw_image_body_and_sync_classify(api_url: str) -> None:
    name, data, label = next(labelled_files(1, seed=11))
    resp = requests.post(
        f"{api_url}/v1/classify?timeout=20", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["status"] == "succeeded"
    assert body["results"][0]["label"] == label


def test_sync_classify_answers_from_the_news_of_its_finish(
    api_url: str, redis_commands: Callable[[], AbstractContextManager[list[dict[str, Any]]]]
) -> None:
    """The finish publishes a classify job's rows: the API answers without reading the job."""
    _, data, label = next(labelled_files(1, seed=12))
    with redis_commands() as seen:
        resp = requests.post(
            f"{api_url}/v1/classify?timeout=20", data=data, headers={"Content-Type": "image/jpeg"}, timeout=60
        )
    assert resp.status_code == 200, resp.text
    answer = resp.json()
    assert answer["results"][0]["label"] == label
    job = JobKeys.of(answer["job_id"]).job
    reads = [c for c in seen if c["command"].split(" ")[:2] == ["HGETALL", job]]
    assert [c["client_type"] for c in reads] == ["lua"]  # the finish's, for the news
    published = [
        c["command"]
        for c in seen
        if c["command"].startswith(f"PUBLISH {keys.FINISHED}") and answer["job_id"] in c["command"]
    ]
    # The rows to one API process's channel; the id alone to every process.
    assert [c.split(" ")[2].startswith(f"{answer['job_id']}\\n") for c in published] == [True, False]
    assert published[1] == f"PUBLISH {keys.FINISHED} {answer['job_id']}"
    assert label in published[0]


def test_results_as_csv_and_paged_json(api_url: str) -> None:
    files = list(labelled_files(5, seed=21))
    job = Client(api_url).submit_files([(n, d) for n, d, _ in files])
    _wait(api_url, job.job_id)
    csv_text = requests.get(f"{api_url}/v1/jobs/{job.job_id}/results?format=csv", timeout=10).text
    lines = csv_text.strip().splitlines()
    assert lines[0] == "filename,label,score,class_id,top_k,error,model,version"
    assert [ln.split(",")[0] for ln in lines[1:]] == [n for n, _, _ in files]
    page = requests.get(f"{api_url}/v1/jobs/{job.job_id}/results?offset=2&limit=2", timeout=10).json()
    assert [r["index"] for r in page["results"]] == [2, 3]


def test_cancel_stops_the_remaining_images(
    api_url: str, settings: Settings, redis_client: redis_lib.Redis, wait_until: Callable[..., Any]
) -> None:
    from batchvision.server.queue import create_celery

    client = Client(api_url)
    job_id = client.open_job().job_id
    first = [(n, d) for n, d, _ in labelled_files(10, seed=31)]
    client.add_part(job_id, first)
    wait_until(lambda: client.status(job_id).done >= 10, timeout=60, message="first part classified")
    # Hold the queue (the worker stops consuming), so the next part is certainly waiting.
    control = create_celery(settings).control
    control.cancel_consumer(settings.queue, reply=True)
    try:
        client.add_part(job_id, [(f"later_{i}.jpg", _noise_jpeg(i)) for i in range(30)])
        assert _ledger_of(redis_client, job_id)  # its chunks are queued, not taken
        canceled = client.cancel(job_id)
    finally:
        control.add_consumer(settings.queue, reply=True)
    assert canceled.status == "canceled"
    assert (canceled.done, canceled.canceled, canceled.total) == (10, 30, 40)
    rows = client.results(job_id)
    assert [r.status for r in rows] == ["ok"] * 10 + ["error"] * 30  # results so far are kept
    assert {r.error.code for r in rows[10:]} == {"canceled"}
    with pytest.raises(ApiError) as exc:
        client.add_part(job_id, first[:1])
    assert exc.value.status == 409
    # The held messages are consumed now (the worker drops their ledger entries and the
    # uploads once it has looked at them) and change nothing: the flag outlives Celery revokes.
    wait_until(
        lambda: (
            not _ledger_of(redis_client, job_id)
            and not list(redis_client.scan_iter(match=keys.blob_pattern(job_id)))
        ),
        timeout=60,
        message="the held chunks were consumed",
    )
    status = client.status(job_id)
    assert (status.done, status.canceled, status.status) == (10, 30, "canceled")
    assert client.results(job_id) == rows


def _ledger_of(r: redis_lib.Redis, job_id: str) -> list[bytes]:
    """The job's chunks in the chunk ledger: sent, and not yet taken by a worker to the end."""
    return [m for m in r.zrange(keys.CHUNKS, 0, -1) if m.decode().startswith(f"{job_id}:")]


def _noise_jpeg(seed: int) -> bytes:
    rng = np.random.default_rng(seed)
    return encode(Image.fromarray(rng.integers(0, 255, (240, 320, 3), np.uint8)), "JPEG", quality=80)
