"""One job per size from an ``s3://`` prefix to an output prefix, through the real stack (the
API, one worker with the null model, a private Redis, moto in server mode as the store): the
orchestration's images/s, and what Redis holds while the job runs (``used_memory`` sampled
every 0.2 s, less what it held before the job: its peak, and when 10, 50 and 90 % of the images
had a result) and after it finished (the job's results wait
there for ``RESULT_TTL_S``), with the biggest keys of the job.

    python bench/s3_prefix.py [--sizes 10000,100000] [--page 1000] [--ahead 10000]

The images are small generated JPEGs (64 distinct ones, stored once per key in the endpoint).
"""

from __future__ import annotations

import argparse
import io
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import redis
import requests
from common import stack_processes, table
from PIL import Image
from standins import NULL_MODEL

from batchvision.core.settings import Settings
from batchvision.server.keys import JobKeys
from batchvision.testing.s3server import CREDENTIALS, MotoServer

BUCKET = "bench"


def jpegs(n: int = 64) -> list[bytes]:
    """``n`` distinct small JPEGs (64x64)."""
    rng = np.random.default_rng(0)
    out = []
    for _ in range(n):
        buf = io.BytesIO()
        Image.fromarray(rng.integers(0, 255, (64, 64, 3), np.uint8)).save(buf, "JPEG", quality=85)
        out.append(buf.getvalue())
    return out


def upload(moto: MotoServer, prefix: str, n: int) -> float:
    """Put ``n`` images under ``prefix``; returns the seconds it took."""
    images = jpegs()
    client = moto.client()
    start = time.perf_counter()

    def put(i: int) -> None:
        key = f"{prefix}d{i // 1000:04d}/img-{i:07d}.jpg"
        client.put_object(Bucket=BUCKET, Key=key, Body=images[i % len(images)])

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(put, range(n)))
    return time.perf_counter() - start


class Sampler:
    """Redis ``used_memory`` every ``period_s`` seconds, in a thread, while it runs, with the
    images of ``job`` (once set) that had a result then."""

    def __init__(self, client: redis.Redis, period_s: float = 0.2) -> None:
        self.redis = client
        self.period_s = period_s
        self.job: str | None = None
        self.samples: list[tuple[int, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            done = int(self.redis.hget(JobKeys.of(self.job).job, "done") or 0) if self.job else 0
            self.samples.append((int(self.redis.info("memory")["used_memory"]), done))
            self._stop.wait(self.period_s)

    def at(self, done: int) -> int:
        """``used_memory`` at the first sample with at least ``done`` results."""
        return next(used for used, d in self.samples if d >= done)

    def __enter__(self) -> Sampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def mb(n: float) -> str:
    return f"{n / 1e6:.1f}"


def run(moto: MotoServer, st: Any, n: int) -> dict[str, Any]:
    prefix = f"in/{n}/"
    put_s = upload(moto, prefix, n)
    client = redis.Redis.from_url(st.settings.redis_url)
    base = int(client.info("memory")["used_memory"])
    url = f"http://127.0.0.1:{st.settings.api_port}"
    body = {"source": f"s3://{BUCKET}/{prefix}", "output_url": f"s3://{BUCKET}/out/{n}/"}
    with Sampler(client) as sampler:
        start = time.perf_counter()
        resp = requests.post(f"{url}/v1/jobs", json=body, timeout=600)
        answered = time.perf_counter() - start
        resp.raise_for_status()
        job_id = resp.json()["job_id"]
        sampler.job = job_id
        finished = written = 0.0
        while True:
            doc = requests.get(f"{url}/v1/jobs/{job_id}", timeout=30).json()
            if not finished and doc["finished_at"]:
                finished = time.perf_counter() - start
            if doc["output"]["state"] != "pending":
                written = time.perf_counter() - start
                break
            time.sleep(0.2)
    assert doc["status"] == "succeeded" and doc["done"] == n, doc
    assert doc["output"]["state"] == "written", doc
    k = JobKeys.of(job_id)
    biggest = {
        name: int(client.memory_usage(key) or 0)  # type: ignore[no-untyped-call]
        for name, key in (("results", k.results), ("files", k.files), ("paths", k.paths), ("tries", k.tries))
    }
    after = int(client.info("memory")["used_memory"])
    client.close()
    # Every row back through /results: written parts are read from the bucket, the rest from Redis.
    start = time.perf_counter()
    with requests.get(
        f"{url}/v1/jobs/{job_id}/results", params={"format": "jsonl"}, stream=True, timeout=600
    ) as r:
        r.raise_for_status()
        served = sum(1 for line in r.iter_lines() if line)
    read_s = time.perf_counter() - start
    assert served == n, (served, n)
    return {
        "n": n,
        "put_s": put_s,
        "answered_s": answered,
        "finished_s": finished,
        "written_s": written,
        "peak": max(used for used, _ in sampler.samples) - base,
        "during": [sampler.at(n * q // 10) - base for q in (1, 5, 9)],
        "after": after - base,
        "keys": biggest,
        "parts": doc["output"]["parts"],
        "read_s": read_s,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sizes", default="10000,100000")
    parser.add_argument("--page", type=int, default=1000, help="BATCHVISION_LIST_PAGE_SIZE")
    parser.add_argument("--ahead", type=int, default=10_000, help="BATCHVISION_LIST_AHEAD")
    args = parser.parse_args()
    os.environ.update(CREDENTIALS)  # the SDK's variables, inherited by the API and the worker
    with MotoServer() as moto:
        moto.client().create_bucket(Bucket=BUCKET)
        settings = Settings.from_env(
            model=NULL_MODEL,
            s3_endpoint_url=moto.url,
            s3_allow="*",
            list_page_size=args.page,
            list_ahead=args.ahead,
            fetch_threads=32,
            max_objects_per_job=10_000_000,
            worker_metrics_port=0,
        )
        with stack_processes(settings) as st:
            rows = [run(moto, st, int(n)) for n in args.sizes.split(",")]
    print(f"page {args.page}, ahead {args.ahead}, null model, 1 API, 1 worker, moto as the store")
    print(
        table(
            [
                [
                    "images",
                    "put s",
                    "202 after s",
                    "all results s",
                    "img/s",
                    "output written s",
                    "Redis peak MB",
                    "Redis MB at 10 / 50 / 90 % done",
                    "Redis after MB",
                    "results / files / paths / tries MB",
                    "parts written while running",
                    "/results whole: s (rows/s)",
                ],
                *[
                    [
                        str(r["n"]),
                        f"{r['put_s']:.0f}",
                        f"{r['answered_s']:.2f}",
                        f"{r['finished_s']:.1f}",
                        f"{r['n'] / r['finished_s']:.0f}",
                        f"{r['written_s']:.1f}",
                        mb(r["peak"]),
                        " / ".join(mb(v) for v in r["during"]),
                        mb(r["after"]),
                        " / ".join(mb(v) for v in r["keys"].values()),
                        str(r["parts"]),
                        f"{r['read_s']:.1f} ({r['n'] / r['read_s']:.0f})",
                    ]
                    for r in rows
                ],
            ]
        )
    )


if __name__ == "__main__":
    main()
