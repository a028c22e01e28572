"""The orchestration's own capacity: the real pipeline (HTTP upload, Redis, Celery, decode,
batcher, result store) with a model that answers at once, and with one that sleeps a fixed
time per batch (standing for an accelerator), for 1, 2, 4 and 8 workers on this machine; and
how the orchestration alone (the null model) scales with the decode threads of one worker and
with the number of worker processes.

    python bench/null_model.py [--images 8192] [--sleep 0.25] [--workers 1,2,4,8]
                               [--decode-threads 1,2,4] [--null-workers 1,2]
"""

from __future__ import annotations

import argparse
import io
import os
import time
from pathlib import Path

import numpy as np
from common import OUT, running_stack, table
from PIL import Image
from standins import NULL_MODEL, SLEEPING_MODEL

from batchvision.cli.local import wait_for_workers
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.settings import Settings


def small_jpegs(n: int) -> Path:
    folder = OUT / f"small-{n}"
    if folder.exists() and len(list(folder.iterdir())) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = rng.integers(0, 255, (28, 28, 3), np.uint8)
        img = Image.fromarray(arr).resize((224, 224), Image.Resampling.BICUBIC)
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=85)
        (folder / f"s_{i:05d}.jpg").write_bytes(buf.getvalue())
    return folder


def run(folder: Path, model: str, workers: int, chunk: int, decode_threads: int = 0) -> float:
    """Images/s through the full stack with ``workers`` worker processes (``decode_threads``
    each; 0: the default, one per CPU)."""
    settings = Settings.from_env(
        model=model, worker_metrics_port=0, chunk_size=chunk, api_workers=2, decode_threads=decode_threads
    )
    with running_stack(settings, names=("api",)) as s:
        extra = [
            Service("worker", cli_argv("worker", "--name", f"w{i}@{free_port()}"), s.to_env())
            for i in range(workers)
        ]
        sup = Supervisor(extra)
        sup.start()
        try:
            wait_for_workers(s, count=workers)
            client = Client(f"http://127.0.0.1:{s.api_port}")
            client.wait(client.submit_files(sorted(folder.iterdir())[:64]).job_id, timeout=120)
            start = time.perf_counter()
            job = client.submit_folder(folder, part_files=256)
            status = client.wait(job.job_id, poll_s=0.05, timeout=600)
            elapsed = time.perf_counter() - start
            assert status.done == job.images, status
            return float(job.images) / elapsed
        finally:
            sup.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=8192)
    ap.add_argument("--sleep", type=float, default=0.25)
    ap.add_argument("--workers", default="1,2,4,8")
    ap.add_argument("--chunk", type=int, default=Settings().chunk_size)
    ap.add_argument("--decode-threads", default="1,2,4", help="null model, 1 worker: decode threads to try")
    ap.add_argument("--null-workers", default="1,2", help="null model: worker processes to try")
    args = ap.parse_args()
    folder = small_jpegs(args.images)
    cpus = os.cpu_count() or 1
    rows = [("model", "workers", "decode threads", "images/s", "vs first")]
    first = None
    for threads in (int(x) for x in args.decode_threads.split(",")):
        rate = run(folder, NULL_MODEL, 1, args.chunk, threads)
        first = first or rate
        rows.append(("null (instant)", "1", str(threads), f"{rate:.0f}", f"{rate / first:.2f}x"))
    first = None
    for n in (int(x) for x in args.null_workers.split(",")):
        rate = run(folder, NULL_MODEL, n, args.chunk)
        first = first or rate
        rows.append(("null (instant)", str(n), f"{cpus} (default)", f"{rate:.0f}", f"{rate / first:.2f}x"))
    base = None
    for n in (int(x) for x in args.workers.split(",")):
        os.environ["BENCH_SLEEP_S"] = str(args.sleep)
        rate = run(folder, SLEEPING_MODEL, n, args.chunk)
        base = base or rate
        rows.append(
            (
                f"sleep {args.sleep}s/batch",
                str(n),
                f"{cpus} (default)",
                f"{rate:.0f}",
                f"{rate / base:.2f}x (ideal {n}x)",
            )
        )
    print(f"\n{args.images} JPEGs of 224x224, chunks of {args.chunk}, batches up to 32, {cpus} CPUs")
    print(table(rows))


if __name__ == "__main__":
    main()
