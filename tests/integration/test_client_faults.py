"""The real CLI through real faults: ``batchvision submit --wait`` of a 300-image folder tree,
with a TCP proxy between client and API that breaks every few requests (truncated requests,
lost answers, answers cut mid-way) and Redis restarted under the API twice (the API answers
``503`` meanwhile): once during the upload, once while the CLI polls.

The client's one retry policy must turn all of that into a plain success: exit code 0, one
job (not one per retried create), one result per image.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from batchvision.cli.local import stack as local_stack
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Supervisor
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server.keys import JobKeys
from batchvision.testing.faultproxy import FaultProxy
from batchvision.testing.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

N_IMAGES = 300
JOB_KEY = re.compile(r"^bv:job:\{([0-9a-f]+)\}$")


class Stack:
    def __init__(self, settings: Settings, redis: RedisServer, logs: Path) -> None:
        self.settings = settings
        self.redis = redis
        self.logs = logs


@pytest.fixture(scope="module")
def faulty_stack(
    settings: Settings,
    tmp_path_factory: pytest.TempPathFactory,
    artifacts: Path,
    wait_worker: Callable[[Settings], None],
) -> Iterator[Stack]:
    """A private Redis (AOF on: it is restarted on purpose), the API and one worker."""
    # Redis is stopped however the rest starts.
    with RedisServer(data_dir=tmp_path_factory.mktemp("faults-redis")) as redis:
        s = settings.replace(
            redis_url=redis.url,
            api_port=free_port(),
            worker_metrics_port=free_port(),
            # A chunk whose results could not be stored while Redis was down comes back soon.
            visibility_timeout_s=10,
            task_time_limit_s=8,
            chunk_size=16,
            result_ttl_s=600,
        )
        logs = artifacts / "client-faults"
        logs.mkdir(exist_ok=True)
        sup = Supervisor([svc for svc in local_stack(s, None, flower=False) if svc.name in ("api", "worker")])
        for svc in sup.services:
            svc.log_path = str(logs / f"{svc.name}.log")
            Path(svc.log_path).unlink(missing_ok=True)
        try:
            sup.start()
            sup.wait_healthy(120)
            wait_worker(s)
            yield Stack(s, redis, logs)
        finally:
            sup.stop()


def _folder(root: Path) -> dict[str, str]:
    """300 images in nested folders; relative path -> true label."""
    labels = {}
    for i, (name, data, label) in enumerate(labelled_files(N_IMAGES, seed=1212)):
        rel = f"batch{i % 3}/{label}/part{i % 2}/{name}"
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
        labels[rel] = label
    return labels


class RedisBlips:
    """Restarts Redis under the API when the proxy sees chosen requests: the 3rd upload part,
    and the first status poll after the seal (a long poll: the job may well finish within it).
    Redis stays down ``down_s`` each time."""

    def __init__(self, redis: RedisServer, down_s: float = 2.5) -> None:
        self.redis = redis
        self.down_s = down_s
        self.parts = self.polls = 0
        self.sealed = False
        self.restarts: list[str] = []
        self.creates: list[bytes] = []  # the request heads of POST /v1/jobs
        self.errors: list[BaseException] = []
        self.timers: list[threading.Timer] = []
        self.lock = threading.Lock()

    def __call__(self, _n: int, head: bytes) -> None:
        line = head.split(b"\r\n", 1)[0]
        with self.lock:
            if line.startswith(b"POST /v1/jobs "):
                self.creates.append(head)
            elif re.match(rb"POST /v1/jobs/[0-9a-f]+/files", line):
                self.parts += 1
                if self.parts == 3:
                    self._blip("upload")
            elif re.match(rb"POST /v1/jobs/[0-9a-f]+/seal", line):
                self.sealed = True
            elif self.sealed and re.match(rb"GET /v1/jobs/[0-9a-f]+[ ?]", line):
                self.polls += 1
                if self.polls == 1:
                    self._blip("polling")

    def _blip(self, when: str) -> None:
        # Down now, before this request reaches the API; up again a little later.
        self.redis.stop()
        self.restarts.append(when)
        timer = threading.Timer(self.down_s, self._start)
        self.timers.append(timer)
        timer.start()

    def _start(self) -> None:
        try:
            self.redis.start()
        except BaseException as exc:  # reported by the test, not lost in a timer thread
            self.errors.append(exc)

    def join(self) -> None:
        for t in self.timers:
            t.join(30)


def _run_cli(
    wait_until: Callable[..., Any], blips: RedisBlips, logs: list[Path], argv: list[str], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    """Run the CLI until it exits; fail at once, with the services' logs, if Redis could not be
    started again (the CLI would retry against a 503 forever) or the CLI runs past 300 s."""
    with subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        out: list[str] = []
        reader = threading.Thread(target=lambda: out.extend(proc.communicate()), daemon=True)
        reader.start()
        try:
            wait_until(lambda: not reader.is_alive() or blips.errors, timeout=300, interval=0.5)
        except AssertionError:
            pass
        if reader.is_alive() or blips.errors:
            proc.kill()
            reader.join(30)
            tails = "\n".join(
                f"--- {p.name}\n{p.read_text(errors='replace')[-3000:]}" for p in logs if p.exists()
            )
            stderr = out[1][-3000:] if len(out) > 1 else ""
            pytest.fail(
                f"the CLI did not finish; Redis restart errors {blips.errors}\n--- cli\n{stderr}\n{tails}"
            )
        return subprocess.CompletedProcess(argv, proc.returncode, out[0], out[1])


def test_submit_wait_survives_dropped_connections_and_redis_restarts(
    faulty_stack: Stack,
    tmp_path: Path,
    reference_labels: Callable[..., list[str]],
    wait_until: Callable[..., Any],
) -> None:
    folder = tmp_path / "photos"
    labels = _folder(folder)
    s = faulty_stack.settings
    blips = RedisBlips(faulty_stack.redis)
    out = tmp_path / "results.csv"
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHVISION_")}
    # Request 1 is the job's creation: the API creates it, its answer is lost on the way back.
    faults = {1: "response"}
    with FaultProxy(("127.0.0.1", s.api_port), every=4, seed=7, on_request=blips, faults_at=faults) as proxy:
        start = time.monotonic()
        proc = _run_cli(
            wait_until,
            blips,
            [*sorted(faulty_stack.logs.glob("*.log")), faulty_stack.redis.data_dir / "redis.log"],
            [
                sys.executable,
                "-m",
                "batchvision.cli",
                "submit",
                str(folder),
                "--wait",
                "-o",
                str(out),
                "--api-url",
                proxy.url,
                "--part-files",
                "16",
                "--no-progress",
            ],
            env=env,
        )
        elapsed = time.monotonic() - start
        blips.join()
    print(f"submit took {elapsed:.1f}s; faults {dict(proxy.faults)}; answers {dict(proxy.statuses)}")
    assert not blips.errors, blips.errors
    assert proc.returncode == 0, proc.stderr[-4000:]

    # The faults happened: every kind of broken connection, and Redis restarted twice under
    # the API, which answered 503 to at least one request meanwhile.
    assert set(proxy.faults) == {"request", "response", "midway"}, proxy.faults
    assert blips.restarts == ["upload", "polling"]
    assert proxy.statuses[503] >= 1, proxy.statuses
    # The creation was sent again with the same Idempotency-Key (the API replays the job).
    keys = [re.search(rb"(?i)\r\nidempotency-key: *(\S+)", head) for head in blips.creates]
    assert len(keys) >= 2 and all(keys), blips.creates
    assert len({k.group(1) for k in keys if k}) == 1

    # Exactly one job, the one the CLI printed, complete.
    r = redis_lib.Redis.from_url(faulty_stack.redis.url, decode_responses=True)
    try:
        jobs = [m.group(1) for key in r.scan_iter("bv:job:*") if (m := JOB_KEY.match(key))]
        job_id = proc.stdout.split()[-1]
        assert jobs == [job_id], jobs
        job = r.hgetall(JobKeys.of(job_id).job)
        assert (int(job["total"]), int(job["done"]), int(job["failed"])) == (N_IMAGES, N_IMAGES, 0), job
        assert r.hlen(JobKeys.of(job_id).results) == N_IMAGES
    finally:
        r.close()

    # One row per image, each a prediction.
    with open(out, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == N_IMAGES
    assert sorted(row["filename"] for row in rows) == sorted(labels)
    assert [row["error"] for row in rows] == [""] * N_IMAGES
    # Each label is the demo model's own for that image (never how well it happened to train).
    files = [(row["filename"], (folder / row["filename"]).read_bytes()) for row in rows]
    assert [row["label"] for row in rows] == reference_labels(Path(s.model), files)
    assert not list(tmp_path.glob(".results.csv.part")), "no partial download left behind"
