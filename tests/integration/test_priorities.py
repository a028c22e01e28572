"""Per-job priorities with real processes.

On both brokers (Redis, and a private RabbitMQ node), with a real API and a real worker serving
the sleeping stand-in model of ``bench/standins.py`` (a fixed time per batch), the order in which
the worker ran its batches (the batch log it writes to Redis, oldest first) shows that:

- a high-priority job submitted while a low-priority backlog is under way (its worker stopped,
  so the order is the policy's choice, not a race) finishes before that backlog, which still has
  work left when it does;
- where a high-priority backlog and a low-priority one wait together, the low one keeps moving
  (it gets batches before the high one is done), and the high one finishes first.

In arrival order (no priorities) the first would finish the backlog first, and strict
priorities would give the low backlog no batch at all in the second.

Without a worker (an API alone on a private Redis, whose queues are Redis lists): the priority
and the per-key maximum on every route that creates a job, the 422s, the job document, the queue
of each tier, and ``batchvision submit --priority``.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests

from batchvision.client import Client
from batchvision.client.errors import ApiError
from batchvision.core.synthetic import labelled_files
from batchvision.server import keys

pytestmark = pytest.mark.integration

IMAGES = [data for _, data, _ in labelled_files(8, seed=41)]
SLEEP_S = 0.1  # per batch of 8: the backlogs below take seconds, not minutes


def _files(n: int, prefix: str) -> list[tuple[str, tuple[str, bytes, str]]]:
    return [("files", (f"{prefix}-{i:04d}.jpg", IMAGES[i % len(IMAGES)], "image/jpeg")) for i in range(n)]


def _submit(url: str, n: int, priority: int, prefix: str, key: str | None = None) -> str:
    headers = {"X-API-Key": key} if key else {}
    resp = requests.post(
        f"{url}/v1/jobs", params={"priority": priority}, files=_files(n, prefix), headers=headers, timeout=120
    )
    assert resp.status_code == 202, resp.text
    assert resp.json()["priority"] == priority
    job_id: str = resp.json()["job_id"]
    return job_id


@pytest.fixture(scope="module")
def prio_stack(broker: str, start_sleeping_stack: Callable[..., Any]) -> Any:
    """The module's private stack (its own Redis, the API, workers started by each test,
    RabbitMQ as the broker when ``broker`` says so) serving the sleeping stand-in model."""
    return start_sleeping_stack(f"priorities-{broker}", broker, SLEEP_S, priority_ratio=3, result_ttl_s=600)


@pytest.fixture()
def stack(prio_stack: Any) -> Iterator[Any]:
    """The stack with an empty batch log, and no worker left running afterwards."""
    prio_stack.store.redis.delete(keys.BATCH_LOG)
    yield prio_stack
    prio_stack.stop_workers()


def _batches(stack: Any) -> list[set[str]]:
    """The jobs of each batch the worker ran, oldest first."""
    entries = stack.store.redis.lrange(keys.BATCH_LOG, 0, -1)
    return [set(json.loads(e)["jobs"]) for e in reversed(entries)]


def _last(batches: list[set[str]], job: str) -> int:
    return max(i for i, jobs in enumerate(batches) if job in jobs)


def _wait_final(stack: Any, wait_until: Callable[..., Any], *jobs: str) -> None:
    for job in jobs:
        wait_until(
            lambda j=job: stack.client.status(j).final, timeout=300, interval=0.2, message=f"{job} final"
        )
        status = stack.client.status(job)
        assert status.done == status.total and status.failed == 0, status


on_both_brokers = pytest.mark.parametrize(
    "broker", ["redis", pytest.param("rabbitmq", marks=pytest.mark.rabbitmq)], indirect=True, scope="module"
)


@on_both_brokers
def test_a_later_high_priority_job_finishes_before_the_low_backlog(
    stack: Any, wait_until: Callable[..., Any]
) -> None:
    stack.worker()
    low = _submit(stack.url, 960, 0, "low")  # 120 chunks: about 120 batches of SLEEP_S
    wait_until(
        lambda: stack.client.status(low).done >= 24, timeout=120, interval=0.1, message="backlog under way"
    )
    # The high job lands while no worker runs: what runs next is the policy's choice, not a race
    # between the upload and a worker eating the few seconds of backlog left on a loaded machine.
    # (A warm stop first finishes the chunks the worker holds, some thirty: the backlog is sized
    # so that most of it still waits in the broker.)
    stack.stop_workers()
    left = stack.client.status(low)
    assert left.total - left.done >= 320, f"most of the low backlog waits: {left}"
    high = _submit(stack.url, 32, 9, "high")  # 4 chunks
    stack.worker()
    _wait_final(stack, wait_until, high, low)
    batches = _batches(stack)
    assert _last(batches, high) < _last(batches, low)
    after = [b for b in batches[_last(batches, high) + 1 :] if low in b]
    assert len(after) >= 10, f"the low backlog still had work when the high job finished: {batches}"
    # Between its first and last batch the high job had (nearly) the worker to itself.
    first_high = min(i for i, b in enumerate(batches) if high in b)
    between = [b for b in batches[first_high : _last(batches, high) + 1] if high not in b]
    assert len(between) <= 2, batches


@on_both_brokers
def test_a_low_backlog_keeps_moving_beside_a_high_one(stack: Any, wait_until: Callable[..., Any]) -> None:
    # Both backlogs wait before a worker starts: what it takes first is its own choice.
    low = _submit(stack.url, 160, 0, "low")  # 20 chunks
    high = _submit(stack.url, 480, 9, "high")  # 60 chunks
    stack.worker()
    _wait_final(stack, wait_until, high, low)
    batches = _batches(stack)
    end_high = _last(batches, high)
    assert end_high < _last(batches, low), "the high backlog finished first"
    during = [b for b in batches[: end_high + 1] if low in b]
    high_batches = [b for b in batches[: end_high + 1] if high in b]
    # Weighted turns of 9 to 1: about 6 low chunks while the 60 high ones ran (a batch that
    # mixes both jobs counts for each: measured 9 to 15 batches); strict priority would give
    # none, arrival order all 20 first.
    assert 3 <= len(during) < len(high_batches) / 2, (len(during), len(high_batches), batches)


# -- without a worker: routes, limits, queues -------------------------------------------------------

KEY_A, KEY_B = "key-a-may-ask-anything", "key-b-capped-at-five"


@pytest.fixture(scope="module")
def alone(api_alone: Callable[..., AbstractContextManager[Any]]) -> Iterator[Any]:
    with api_alone(
        api_keys=f"{KEY_A},{KEY_B}", max_priority=5, key_max_priority=f"{KEY_A}=9", interactive_max_images=4
    ) as api:
        yield api


def _queued(api: Any) -> dict[str, list[int]]:
    """The priority of each message waiting in each bulk tier's queue (Redis lists)."""
    r = redis_lib.Redis.from_url(api.redis_url)
    out = {}
    for queue in ("batchvision", "batchvision.high", "batchvision.low", "batchvision.interactive"):
        bodies = [json.loads(m)["body"] for m in r.lrange(queue, 0, -1)]
        out[queue] = [_priority_of(b) for b in bodies]
    return out


def _priority_of(body: str) -> int:
    args, _, _ = json.loads(base64.b64decode(body))
    return int(args[0]["priority"])


def test_priority_on_every_route_and_the_queue_of_each_tier(alone: Any) -> None:
    url, a, b = alone.url, {"X-API-Key": KEY_A}, {"X-API-Key": KEY_B}
    before = _queued(alone)
    # multipart upload (bulk: 6 images > INTERACTIVE_MAX_IMAGES)
    job = requests.post(f"{url}/v1/jobs?priority=9", files=_files(6, "m"), headers=a, timeout=30)
    assert job.status_code == 202 and job.json()["priority"] == 9
    # an upload in parts: the job's priority holds for every part
    opened = requests.post(f"{url}/v1/jobs?priority=0", json={"expected": 6}, headers=b, timeout=30)
    assert opened.status_code == 202 and opened.json()["priority"] == 0
    part = requests.post(
        f"{url}/v1/jobs/{opened.json()['job_id']}/files", files=_files(6, "p"), headers=b, timeout=30
    )
    assert part.status_code == 202 and part.json()["priority"] == 0
    # a zip, a URL list, a manifest
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for i in range(6):
            z.writestr(f"z/{i}.jpg", IMAGES[i])
    zipped = requests.post(
        f"{url}/v1/jobs?priority=2",
        data=buf.getvalue(),
        headers={**b, "Content-Type": "application/zip"},
        timeout=30,
    )
    assert zipped.status_code == 202 and zipped.json()["priority"] == 2
    urls = [f"https://images.example.com/{i}.jpg" for i in range(6)]
    by_url = requests.post(f"{url}/v1/jobs?priority=8", json={"urls": urls}, headers=a, timeout=30)
    assert by_url.status_code == 202 and by_url.json()["priority"] == 8
    manifest = requests.post(
        f"{url}/v1/jobs?priority=4",
        data="\n".join(urls).encode(),
        headers={**b, "Content-Type": "text/uri-list"},
        timeout=30,
    )
    assert manifest.status_code == 202 and manifest.json()["priority"] == 4
    # no priority: the default; /v1/classify (interactive) keeps its priority in the job
    plain = requests.post(f"{url}/v1/jobs", files=_files(6, "d"), headers=b, timeout=30)
    assert plain.status_code == 202 and plain.json()["priority"] == 5
    sync = requests.post(
        f"{url}/v1/classify?timeout=0&priority=6", files=_files(1, "c"), headers=a, timeout=30
    )
    assert sync.status_code == 202 and sync.json()["priority"] == 6
    # a small one of the low tier waits there: the lane is no way around a low priority
    patient = requests.post(
        f"{url}/v1/classify?timeout=0&priority=1", files=_files(1, "f"), headers=b, timeout=30
    )
    assert patient.status_code == 202 and patient.json()["priority"] == 1
    # a client waits for a large one too, but it waits its turn in its tier's queue
    large = requests.post(
        f"{url}/v1/classify?timeout=0&priority=3", files=_files(6, "e"), headers=b, timeout=30
    )
    assert large.status_code == 202 and large.json()["priority"] == 3
    status = requests.get(f"{url}/v1/jobs/{job.json()['job_id']}", headers=a, timeout=30).json()
    assert status["priority"] == 9
    listed = requests.get(f"{url}/v1/jobs", headers=a, timeout=30).json()["jobs"]
    assert {j["priority"] for j in listed} == {9, 8, 6}
    # Each message went to the queue of its tier, carrying its priority.
    after = _queued(alone)
    added = {q: after[q][: len(after[q]) - len(before[q])] for q in after}
    assert sorted(added["batchvision.high"]) == [8, 9]
    assert sorted(added["batchvision.low"]) == [0, 1, 2, 3]
    assert sorted(added["batchvision"]) == [4, 5]
    assert added["batchvision.interactive"] == [6]


@pytest.mark.parametrize(
    ("key", "priority", "code", "allowed"),
    [
        (KEY_A, "10", "invalid_option", "0 to 9"),
        (KEY_A, "-1", "invalid_option", "0 to 9"),
        (KEY_B, "6", "priority_not_allowed", "0 to 5"),
        (KEY_B, "9", "priority_not_allowed", "0 to 5"),
    ],
)
def test_a_priority_out_of_range_or_above_the_keys_maximum_is_422(
    alone: Any, key: str, priority: str, code: str, allowed: str
) -> None:
    for route, kw in (
        ("/v1/jobs", {"files": _files(1, "x")}),
        ("/v1/jobs", {"json": {"expected": 3}}),
        ("/v1/jobs", {"json": {"urls": ["https://images.example.com/1.jpg"]}}),
        ("/v1/classify", {"files": _files(1, "x")}),
    ):
        resp = requests.post(
            f"{alone.url}{route}", params={"priority": priority}, headers={"X-API-Key": key}, timeout=30, **kw
        )
        assert resp.status_code == 422, (route, resp.text)
        error = resp.json()["error"]
        assert error["code"] == code and "priority" in error["message"], error
        assert error["details"] == [
            {"in": "query", "field": "priority", "value": int(priority), "allowed": allowed}
        ]
    # Not a number: the query's own check (400 naming the field).
    resp = requests.post(
        f"{alone.url}/v1/jobs?priority=high", files=_files(1, "x"), headers={"X-API-Key": key}, timeout=30
    )
    assert resp.status_code == 400 and "priority" in resp.text


def test_the_cli_and_the_client_send_the_priority(alone: Any, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    folder.mkdir()
    for i in range(3):
        (folder / f"{i}.jpg").write_bytes(IMAGES[i])
    env = {**os.environ, "BATCHVISION_API_URL": alone.url, "BATCHVISION_API_KEY": KEY_A}
    proc = subprocess.run(
        [sys.executable, "-m", "batchvision.cli", "submit", str(folder), "--priority", "7", "--no-progress"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip().splitlines()[-1]
    client = Client(alone.url, KEY_A)
    assert client.status(job_id).priority == 7
    assert client.submit_files([("a.jpg", IMAGES[0])], priority=3).priority == 3
    capped = Client(alone.url, KEY_B)
    with pytest.raises(ApiError) as info:
        capped.submit_files([("a.jpg", IMAGES[0])], priority=8)
    assert info.value.code == "priority_not_allowed" and info.value.status == 422
