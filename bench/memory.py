"""Worker and Redis memory over many images.

- Worker RSS sampled after each job of ``--per-job`` images: it must stay flat after warm-up
  (no growth from retracing or leaked arrays).
- Redis memory per queued image, with consumption paused: should stay close to the image's
  own bytes (the blob), plus small per-image bookkeeping.

    python bench/memory.py [--images 10000] [--per-job 1000] [--model mobilenet_v2]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import redis as redis_lib
from common import running_stack, table
from null_model import small_jpegs

from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.server.queue import create_celery


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def worker_pid() -> int:
    """The local Celery worker's pid (the `batchvision worker` process execs into it)."""
    for pid in sorted(int(p) for p in os.listdir("/proc") if p.isdigit()):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if b"workers.celery_app" in cmd and b"worker" in cmd:
            return pid
    raise RuntimeError("worker process not found")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=10000)
    ap.add_argument("--per-job", type=int, default=1000)
    ap.add_argument("--model", default="mobilenet_v2")
    args = ap.parse_args()
    folder = small_jpegs(args.per_job)
    files = sorted(folder.iterdir())
    os.environ["BATCHVISION_WEIGHTS"] = "none"
    settings = Settings.from_env(model=args.model, weights="none", worker_metrics_port=0)
    with running_stack(settings) as s:
        client = Client(f"http://127.0.0.1:{s.api_port}")
        pid = worker_pid()
        samples = []
        start = time.perf_counter()
        for n in range(args.images // args.per_job):
            job = client.submit_folder(folder, part_files=250)
            client.wait(job.job_id, poll_s=0.2, timeout=1800)
            samples.append(((n + 1) * args.per_job, rss_mb(pid)))
        elapsed = time.perf_counter() - start

        r = redis_lib.Redis.from_url(s.redis_url)
        control = create_celery(s).control
        control.cancel_consumer(s.queue, reply=True)
        time.sleep(0.5)
        before = int(r.info("memory")["used_memory"])
        job = client.submit_folder(folder, part_files=250)
        after = int(r.info("memory")["used_memory"])
        control.add_consumer(s.queue, reply=True)
        client.wait(job.job_id, timeout=600)
    avg_bytes = sum(f.stat().st_size for f in files) / len(files)
    per_image = (after - before) / len(files)
    warm = samples[0][1]
    rows = [("images classified", "worker RSS (MB)", "vs after first job")]
    rows += [(str(n), f"{mb:.0f}", f"{mb - warm:+.0f} MB") for n, mb in samples]
    print(f"\n{args.images} images of 224x224 through {args.model} in {elapsed:.0f}s")
    print(table(rows))
    print(
        table(
            [
                ("Redis memory per queued image", "image bytes", "ratio"),
                (f"{per_image:.0f} B", f"{avg_bytes:.0f} B", f"{per_image / avg_bytes:.2f}"),
            ]
        )
    )


if __name__ == "__main__":
    main()
