"""Per-job priorities under a flood: high-priority latency with and without priorities, and the
low-priority throughput meanwhile.

One stack per run (Redis, the API, one worker serving the ``sleeping`` stand-in model of
``standins.py``: a fixed time per batch, so the figures do not depend on the host's CPU). Each
run queues a flood of bulk jobs, then submits a stream of small bulk jobs (more images than
the interactive lane takes) at a fixed interval and times each from submit to final:

- ``priorities``: the flood at priority 0 (low tier), the stream at priority 9 (high tier);
- ``none``: every job at the default priority, i.e. arrival order (what the service did before
  priorities, and what it does for jobs of one tier).

Printed per run: the stream's p50/p95/max latency, and the flood's images/s while the stream
ran and overall (it must keep moving). No timed assertions.

    python bench/priorities.py [--sleep 0.1] [--flood 1200] [--stream 15] [--interval 0.6]
                               [--broker redis --broker rabbitmq]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import threading
import time
from pathlib import Path

from common import pct, stack_processes, table
from standins import SLEEPING_MODEL

from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.testing.servers import RabbitMQServer

FLOOD_JOB = 64  # images per flood job (8 chunks)
STREAM_JOB = 16  # images per stream job (2 chunks; bulk: over INTERACTIVE_MAX_IMAGES)


def run(settings: Settings, args: argparse.Namespace, low: int, high: int) -> dict[str, float]:
    images = [(n, d) for n, d, _ in labelled_files(16, seed=5)]

    def files(n: int, prefix: str) -> list[tuple[str, bytes]]:
        return [(f"{prefix}-{i}.jpg", images[i % len(images)][1]) for i in range(n)]

    logs = Path(tempfile.mkdtemp(prefix="bench-priorities-"))  # the services' output, not ours
    with stack_processes(settings, log_dir=logs) as st:
        client = Client(f"http://127.0.0.1:{st.settings.api_port}")
        flood_start = time.monotonic()
        flood = [
            client.submit_files(files(FLOOD_JOB, f"f{j}"), priority=low).job_id
            for j in range(args.flood // FLOOD_JOB)
        ]

        def flood_done() -> int:
            return sum(client.status(j).done for j in flood)

        latencies: list[float] = []
        lock = threading.Lock()

        def one(k: int) -> None:
            t0 = time.monotonic()
            job = client.submit_files(files(STREAM_JOB, f"s{k}"), priority=high).job_id
            client.wait(job, timeout=3600, poll_s=0.05)
            with lock:
                latencies.append(time.monotonic() - t0)

        done_before = flood_done()
        t_start = time.monotonic()
        threads = []
        for k in range(args.stream):
            threads.append(threading.Thread(target=one, args=(k,)))
            threads[-1].start()
            time.sleep(args.interval)
        for t in threads:
            t.join()
        window = time.monotonic() - t_start
        done_during = flood_done() - done_before
        for j in flood:
            client.wait(j, timeout=3600, poll_s=0.2)
        total = time.monotonic() - flood_start
    return {
        "p50": pct(latencies, 50),
        "p95": pct(latencies, 95),
        "max": max(latencies),
        "flood_during": done_during / window,
        "flood_overall": (args.flood // FLOOD_JOB) * FLOOD_JOB / total,
        "window": window,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--sleep", type=float, default=0.1, help="seconds per batch of the sleeping model")
    p.add_argument("--flood", type=int, default=1200, help="low-priority images queued first")
    p.add_argument("--stream", type=int, default=15, help="high-priority jobs of 16 images")
    p.add_argument("--interval", type=float, default=0.6, help="seconds between stream jobs")
    p.add_argument("--broker", action="append", choices=["redis", "rabbitmq"])
    args = p.parse_args()
    os.environ["BENCH_SLEEP_S"] = str(args.sleep)
    base = Settings.from_env({}, model=SLEEPING_MODEL, max_batch_size=8, chunk_size=8, worker_metrics_port=0)
    rows = [["broker", "run", "stream p50 s", "p95 s", "max s", "flood img/s during", "flood img/s overall"]]
    for broker in args.broker or ["redis"]:
        rabbitmq = RabbitMQServer().start() if broker == "rabbitmq" else None
        try:
            s = base.replace(broker_url=rabbitmq.url) if rabbitmq is not None else base
            for name, low, high in (("none", 5, 5), ("priorities", 0, 9)):
                r = run(s, args, low, high)
                rows.append(
                    [
                        broker,
                        name,
                        f"{r['p50']:.2f}",
                        f"{r['p95']:.2f}",
                        f"{r['max']:.2f}",
                        f"{r['flood_during']:.0f}",
                        f"{r['flood_overall']:.0f}",
                    ]
                )
                print(table(rows), flush=True)
        finally:
            if rabbitmq is not None:
                rabbitmq.close()
    capacity = 8 / args.sleep
    print(
        f"\nmodel capacity {capacity:.0f} img/s (8 per {args.sleep}s); stream: {args.stream} jobs of "
        f"{STREAM_JOB} every {args.interval}s ({STREAM_JOB / args.interval:.0f} img/s); flood "
        f"{args.flood} images in jobs of {FLOOD_JOB}"
    )


if __name__ == "__main__":
    main()
