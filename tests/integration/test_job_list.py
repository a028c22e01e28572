"""``GET /v1/jobs``, ``Client.jobs()`` and ``batchvision jobs`` against a real API and Redis with
two API keys (no worker: the jobs stay queued unless canceled): each key sees only its own jobs,
newest first; pages never skip or repeat a job, also among jobs with the same creation time;
status and creation-time filters; expired jobs leave the list; bad parameters get 400."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from typing import Any

import pytest
import redis as redis_lib
import requests

from batchvision.client import Client
from batchvision.core.synthetic import labelled_files
from batchvision.server import keys
from batchvision.server.job_list import list_jobs
from batchvision.server.keys import JobKeys

pytestmark = pytest.mark.integration

KEY_A, KEY_B = "key-a-for-job-list", "key-b-for-job-list"


@dataclass
class ListStack:
    url: str
    redis: redis_lib.Redis
    jobs_a: list[str]  # oldest first
    jobs_b: list[str]

    def get(self, key: str, **params: Any) -> requests.Response:
        return requests.get(
            f"{self.url}/v1/jobs", params=params, headers={"Authorization": f"Bearer {key}"}, timeout=10
        )


@pytest.fixture(scope="module")
def stack(api_alone: Callable[..., AbstractContextManager[Any]]) -> Iterator[ListStack]:
    with api_alone(api_keys=f"{KEY_A},{KEY_B}") as api:
        files = [(n, d) for n, d, _ in labelled_files(7, seed=3)]
        a, b = Client(api.url, KEY_A), Client(api.url, KEY_B)
        jobs_a = [a.submit_files([files[i]]).job_id for i in range(5)]
        jobs_b = [b.submit_files([files[i]]).job_id for i in range(5, 7)]
        yield ListStack(api.url, redis_lib.Redis.from_url(api.redis_url), jobs_a, jobs_b)


def _ids(resp: requests.Response) -> list[str]:
    assert resp.status_code == 200, resp.text
    return [j["job_id"] for j in resp.json()["jobs"]]


def test_each_key_sees_its_own_jobs_newest_first(stack: ListStack) -> None:
    assert _ids(stack.get(KEY_A)) == stack.jobs_a[::-1]
    assert _ids(stack.get(KEY_B)) == stack.jobs_b[::-1]
    doc = stack.get(KEY_A).json()
    assert doc["next_cursor"] is None
    job = doc["jobs"][0]
    assert job["status"] == "queued" and job["total"] == 1 and job["status_url"].endswith(stack.jobs_a[-1])
    # Client.jobs(): the same, typed.
    page = Client(stack.url, KEY_B).jobs()
    assert [j.job_id for j in page.jobs] == stack.jobs_b[::-1] and page.next_cursor is None


def test_pages_never_skip_or_repeat_a_job(stack: ListStack) -> None:
    seen: list[str] = []
    cursor = None
    pages = 0
    while True:
        params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
        doc = stack.get(KEY_A, **params).json()
        seen += [j["job_id"] for j in doc["jobs"]]
        pages += 1
        cursor = doc["next_cursor"]
        if cursor is None:
            break
    assert seen == stack.jobs_a[::-1] and pages == 3


def test_jobs_created_in_the_same_millisecond_page_one_by_one(stack: ListStack) -> None:
    index = keys.owner_jobs(_owner(stack, KEY_A))
    scores = {j: float(s) for j, s in stack.redis.zrange(index, 0, -1, withscores=True)}
    assert set(scores) == {j.encode() for j in stack.jobs_a}
    tied = 1_000.0  # every job of A in the same millisecond: only the id orders them
    stack.redis.zadd(index, dict.fromkeys(scores, tied))
    try:
        seen: list[str] = []
        cursor = None
        while True:
            doc = stack.get(KEY_A, limit=1, **({"cursor": cursor} if cursor else {})).json()
            seen += [j["job_id"] for j in doc["jobs"]]
            cursor = doc["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(stack.jobs_a, reverse=True)
    finally:
        stack.redis.zadd(index, scores)


def _owner(stack: ListStack, key: str) -> str:
    owner = stack.redis.hget(JobKeys.of(stack.jobs_a[0] if key == KEY_A else stack.jobs_b[0]).job, "owner")
    assert owner is not None
    return owner.decode()


def test_jobs_created_during_a_request_shift_none_of_its_batches(scratch_redis: redis_lib.Redis) -> None:
    # 190 jobs, 60 of them in one millisecond (more than a batch of 50), every 7th failed; five
    # new jobs are created while the request reads its first batch. A batch read by position
    # would then start five entries early and list some failed jobs twice.
    index = keys.owner_jobs("t")
    times = [1000.0 + i for i in range(130)] + [2000.0] * 60
    jobs = {f"{i:032x}": t for i, t in enumerate(times)}
    scratch_redis.zadd(index, jobs)
    status = {j: "failed" if n % 7 == 0 else "queued" for n, j in enumerate(jobs)}
    newest_first = sorted(jobs, key=lambda j: (jobs[j], j), reverse=True)
    calls = 0

    def get_many(ids: Sequence[str]) -> list[dict[str, Any] | None]:
        nonlocal calls
        calls += 1
        if calls == 1:
            scratch_redis.zadd(index, {f"{999 - i:032x}": 3000.0 + i for i in range(5)})
        return [{"job_id": j, "status": status.get(j, "queued")} for j in ids]

    page = list_jobs(scratch_redis, get_many, "t", limit=50, status="failed")
    assert [d["job_id"] for d in page.jobs] == [j for j in newest_first if status[j] == "failed"]
    assert page.next_cursor is None and calls > 3
    # A filter that matches little reads at most max_scanned entries a request, then hands
    # back a cursor: the pages that follow list the rest, none twice.
    got: list[str] = []
    cursor = None
    for _ in range(20):
        part = list_jobs(
            scratch_redis, get_many, "t", limit=50, status="failed", cursor=cursor, max_scanned=40
        )
        got += [d["job_id"] for d in part.jobs]
        cursor = part.next_cursor
        if cursor is None:
            break
    assert got == [j for j in newest_first if status[j] == "failed"]


def test_status_and_creation_time_filters(stack: ListStack) -> None:
    canceled = stack.jobs_a[1]
    resp = requests.post(
        f"{stack.url}/v1/jobs/{canceled}/cancel", headers={"Authorization": f"Bearer {KEY_A}"}, timeout=10
    )
    assert resp.status_code == 200 and resp.json()["status"] == "canceled"
    assert _ids(stack.get(KEY_A, status="canceled")) == [canceled]
    assert _ids(stack.get(KEY_A, status="queued")) == [j for j in stack.jobs_a[::-1] if j != canceled]
    assert _ids(stack.get(KEY_B, status="canceled")) == []
    created = {j["job_id"]: j["created_at"] for j in stack.get(KEY_A).json()["jobs"]}
    third = created[stack.jobs_a[2]]
    newer = [j for j in stack.jobs_a[::-1] if created[j] >= third]
    assert _ids(stack.get(KEY_A, created_after=third)) == newer
    assert _ids(stack.get(KEY_A, created_before=third)) == [j for j in stack.jobs_a[::-1] if j not in newer]


def test_the_cli_lists_every_page(stack: ListStack) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "batchvision.cli", "jobs", "--api-url", stack.url, "--api-key", KEY_A]
        + ["--limit", "2", "--all", "--json"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert [json.loads(line)["job_id"] for line in out.stdout.splitlines()] == stack.jobs_a[::-1]
    table = subprocess.run(
        [sys.executable, "-m", "batchvision.cli", "jobs", "--api-url", stack.url, "--api-key", KEY_B],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert [line.split()[0] for line in table.stdout.splitlines()] == stack.jobs_b[::-1]


def test_bad_parameters_are_refused_by_name(stack: ListStack) -> None:
    for params, text in (
        ({"cursor": "nonsense"}, "'cursor'"),
        ({"status": "lost"}, "'status'"),
        ({"limit": 0}, "'limit'"),
        ({"created_after": "yesterday"}, "'created_after'"),
        ({"order": "asc"}, "'order'"),
    ):
        resp = stack.get(KEY_A, **params)
        assert resp.status_code == 400, params
        error = resp.json()["error"]
        assert error["code"] == "bad_parameter" and text in error["message"], error
    assert requests.get(f"{stack.url}/v1/jobs", timeout=10).status_code == 401


def test_an_expired_job_leaves_the_list(stack: ListStack) -> None:
    gone = stack.jobs_b[0]
    index = keys.owner_jobs(_owner(stack, KEY_B))
    stack.redis.delete(JobKeys.of(gone).job)  # as its expiry would
    assert _ids(stack.get(KEY_B)) == [stack.jobs_b[1]]
    assert stack.redis.zscore(index, gone) is None, "dropped from the index"
