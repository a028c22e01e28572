"""End-to-end throughput and latency, side by side in one run.

(a) in-process ceiling: sequential decode (draft mode), predict in batches of 32, no queue;
(b) the full stack: HTTP upload through the bulk endpoint to every result stored;
(c) latency of single-image jobs at idle (``POST /v1/classify``), submit to result.

Same generated photo-like JPEG set (640x480 and 1440x1080 mixed) and the same model
(``mobilenet_v2`` with ``weights=None``: real compute, no download) throughout.

    python bench/e2e.py [--images 256] [--model mobilenet_v2] [--latency-jobs 30]
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

from common import pct, photo_set, running_stack, table

from batchvision.client import Client
from batchvision.imaging import decode_image
from batchvision.settings import Settings


def ceiling(folder: Path, settings: Settings, batch: int = 32) -> float:
    """Images/s of decode-then-predict in this process, no queue."""
    from workers.model import load_classifier

    clf = load_classifier(settings)
    clf.warm_up()
    files = sorted(folder.glob("*.jpg"))
    data = [f.read_bytes() for f in files]
    clf.predict([decode_image(d, clf.input_size, max_pixels=10**8) for d in data[:batch]])  # warm
    start = time.perf_counter()
    for i in range(0, len(data), batch):
        arrays = [decode_image(d, clf.input_size, max_pixels=10**8) for d in data[i : i + batch]]
        clf.predict(arrays)
    return len(data) / (time.perf_counter() - start)


def full_stack(folder: Path, settings: Settings, latency_jobs: int) -> tuple[float, list[float]]:
    with running_stack(settings) as s:
        client = Client(f"http://127.0.0.1:{s.api_port}")
        warm = sorted(folder.glob("*.jpg"))[:8]
        client.wait(client.submit_files(warm)["job_id"], timeout=300)  # warm the worker's graph
        start = time.perf_counter()
        job = client.submit_folder(folder, part_files=32)
        status = client.wait(job["job_id"], poll_s=0.05, timeout=900)
        elapsed = time.perf_counter() - start
        assert status["done"] == job["images"], status
        one = warm[0].read_bytes()
        latencies = []
        for _ in range(latency_jobs):
            t0 = time.perf_counter()
            body = client.classify([("one.jpg", one)], timeout=30)
            latencies.append(time.perf_counter() - t0)
            assert body["status"] == "succeeded"
            time.sleep(0.05)
        return job["images"] / elapsed, latencies


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--latency-jobs", type=int, default=30)
    args = ap.parse_args()
    folder = photo_set(args.images)
    settings = Settings.from_env(model=args.model, weights="none")
    os.environ["BATCHVISION_WEIGHTS"] = "none"
    a = ceiling(folder, settings)
    b, lat = full_stack(folder, settings, args.latency_jobs)
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; "
        f"model {args.model} (weights=None); {args.images} JPEGs"
    )
    print(
        table(
            [
                ("measure", "value"),
                ("(a) in-process ceiling", f"{a:.1f} img/s"),
                ("(b) full stack (HTTP bulk upload -> results)", f"{b:.1f} img/s"),
                ("(b)/(a)", f"{b / a:.2f}"),
                ("single-image job latency p50", f"{pct(lat, 50) * 1000:.0f} ms"),
                ("single-image job latency p95", f"{pct(lat, 95) * 1000:.0f} ms"),
            ]
        )
    )


if __name__ == "__main__":
    main()
