"""End-to-end throughput and latency, side by side in one run.

(a) in-process ceiling: sequential decode (draft mode), predict in batches of 32, no queue;
(b) the full stack: HTTP upload through the bulk endpoint to every result stored;
(c) latency of single-image jobs at idle (``POST /v1/classify``), submit to result.

Same generated photo-like JPEG set (640x480 and 1440x1080 mixed) and the same model
(``mobilenet_v2`` with ``weights=None``: real compute, no download) throughout.

    python bench/e2e.py [--images 256] [--model mobilenet_v2] [--latency-jobs 30]
                        [--broker redis --broker rabbitmq]

``--broker`` (repeatable): run (b) and (c) once per broker, side by side, with the CPU
seconds the broker process used during (b) (with RabbitMQ, Redis still holds jobs and uploads:
its CPU is shown too). RabbitMQ is a private ``rabbitmq-server`` (Debian's package).
"""

from __future__ import annotations

import argparse
import os
import platform
import threading
import time
from collections.abc import Callable
from pathlib import Path

from common import cpu_seconds, pct, photo_set, stack_processes, table

from batchvision.client import Client
from batchvision.core.imaging import decode_image
from batchvision.core.settings import Settings
from batchvision.testing.servers import RabbitMQServer


def ceiling(folder: Path, settings: Settings, batch: int = 32) -> float:
    """Images/s of decode-then-predict in this process, no queue."""
    from workers.keras_model import load_classifier

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


def batch1_latency(settings: Settings, n: int = 50) -> float:
    """p50 seconds of one bare model call on one image (the latency floor)."""
    import numpy as np

    from workers.keras_model import load_classifier

    clf = load_classifier(settings)
    w, h = clf.input_size
    img = [np.zeros((h, w, 3), np.uint8)]
    clf.predict(img)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        clf.predict(img)
        times.append(time.perf_counter() - t0)
    return pct(times, 50)


def full_stack(
    folder: Path, settings: Settings, latency_jobs: int, broker: str = "redis"
) -> tuple[float, list[float], list[float], dict[str, float]]:
    """(b) images/s, idle and loaded latencies, and CPU seconds during (b): ``broker`` (its
    process) and ``redis`` (the job store; the same process when Redis is the broker)."""
    rabbitmq = RabbitMQServer().start() if broker == "rabbitmq" else None
    try:
        s = settings.replace(broker_url=rabbitmq.url) if rabbitmq is not None else settings
        with stack_processes(s) as st:
            pids = st.pids()
            broker_pid = rabbitmq.pid() if rabbitmq is not None else pids["redis"]
            assert broker_pid is not None
            return _measure(folder, st.settings, latency_jobs, {"broker": broker_pid, "redis": pids["redis"]})
    finally:
        if rabbitmq is not None:
            rabbitmq.close()


def _measure(
    folder: Path, s: Settings, latency_jobs: int, pids: dict[str, int]
) -> tuple[float, list[float], list[float], dict[str, float]]:
    client = Client(f"http://127.0.0.1:{s.api_port}")
    warm = sorted(folder.glob("*.jpg"))[:8]
    client.wait(client.submit_files(warm).job_id, timeout=300)  # warm the worker's graph
    cpu0 = {name: cpu_seconds(pid) for name, pid in pids.items()}
    start = time.perf_counter()
    job = client.submit_folder(folder, part_files=32)
    status = client.wait(job.job_id, poll_s=0.05, timeout=900)
    elapsed = time.perf_counter() - start
    cpu = {name: cpu_seconds(pid) - cpu0[name] for name, pid in pids.items()}
    assert status.done == job.images, status
    one = warm[0].read_bytes()
    idle = single_latencies(client, one, latency_jobs)
    # The same single-image jobs while bulk uploads keep the worker busy.
    stop = threading.Event()

    def bulk() -> None:
        while not stop.is_set():
            client.submit_folder(folder, part_files=32)
            time.sleep(1.0)

    loader = threading.Thread(target=bulk, daemon=True)
    loader.start()
    time.sleep(2.0)
    loaded = single_latencies(client, one, latency_jobs)
    stop.set()
    loader.join()
    return job.images / elapsed, idle, loaded, cpu


def single_latencies(client: Client, image: bytes, n: int) -> list[float]:
    """Seconds from submit to result of ``n`` one-image jobs (``POST /v1/classify``)."""
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        body = client.classify([("one.jpg", image)], timeout=30)
        out.append(time.perf_counter() - t0)
        assert body.status == "succeeded"
        time.sleep(0.05)
    return out


def naive(folder: Path, settings: Settings) -> float:
    """Images/s of one Celery task per image, bytes in the message, batch size 1."""
    import base64
    import subprocess
    import sys

    from common import RedisServer

    with RedisServer() as redis:
        env = {**os.environ, **settings.replace(redis_url=redis.url).to_env()}
        here = Path(__file__).resolve().parent
        worker = subprocess.Popen([sys.executable, str(here / "naive_worker.py")], cwd=here, env=env)
        try:
            os.environ["BATCHVISION_REDIS_URL"] = redis.url
            sys.path.insert(0, str(here))
            import naive_worker

            naive_worker.app.conf.broker_url = naive_worker.app.conf.result_backend = redis.url
            files = sorted(folder.glob("*.jpg"))
            payloads = [base64.b64encode(f.read_bytes()).decode() for f in files]
            naive_worker.classify.delay(payloads[0]).get(timeout=300)  # model loaded
            start = time.perf_counter()
            results = [naive_worker.classify.delay(p) for p in payloads]
            for r in results:
                r.get(timeout=600)
            return len(payloads) / (time.perf_counter() - start)
        finally:
            worker.terminate()
            worker.wait(30)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--images", type=int, default=256)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--latency-jobs", type=int, default=30)
    ap.add_argument(
        "--broker", action="append", choices=("redis", "rabbitmq"), help="repeat to compare (default: redis)"
    )
    args = ap.parse_args()
    brokers = list(dict.fromkeys(args.broker or ["redis"]))
    folder = photo_set(args.images)
    settings = Settings.from_env(model=args.model, weights="none")
    os.environ["BATCHVISION_WEIGHTS"] = "none"
    # The full stack runs first: once this process has loaded TensorFlow (for the ceiling),
    # its idle thread pools still cost the stack a little CPU on a 2-core machine.
    runs = {broker: full_stack(folder, settings, args.latency_jobs, broker) for broker in brokers}
    a = ceiling(folder, settings)
    c = naive(folder, settings)
    batch1 = batch1_latency(settings)
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; "
        f"model {args.model} (weights=None); {args.images} JPEGs"
    )

    def row(
        label: str, value: Callable[[tuple[float, list[float], list[float], dict[str, float]]], str]
    ) -> tuple[str, ...]:
        return (label, *(value(runs[b]) for b in brokers))

    def ms(values: list[float], p: float) -> str:
        return f"{pct(values, p) * 1000:.0f} ms"

    print(
        table(
            [
                ("measure", *(f"broker: {b}" for b in brokers)),
                row("(a) in-process ceiling", lambda r: f"{a:.1f} img/s"),
                row("(b) full stack (HTTP bulk upload -> results)", lambda r: f"{r[0]:.1f} img/s"),
                row("(c) naive: one Celery task per image, bytes in message", lambda r: f"{c:.1f} img/s"),
                row("(b)/(a)", lambda r: f"{r[0] / a:.2f}"),
                row("(b)/(c)", lambda r: f"{r[0] / c:.2f}"),
                row("bare model, batch 1, p50", lambda r: f"{batch1 * 1000:.0f} ms"),
                row("single-image job latency p50", lambda r: ms(r[1], 50)),
                row("single-image job latency p95", lambda r: ms(r[1], 95)),
                row("same, under steady bulk load, p50", lambda r: ms(r[2], 50)),
                row("same, under steady bulk load, p95", lambda r: ms(r[2], 95)),
                row("broker CPU during (b)", lambda r: f"{r[3]['broker']:.2f} s"),
                row(
                    "Redis CPU during (b) (job store, and broker if Redis)",
                    lambda r: f"{r[3]['redis']:.2f} s",
                ),
            ]
        )
    )


if __name__ == "__main__":
    main()
