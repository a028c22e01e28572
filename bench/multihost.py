"""Scale-out across hosts: the API, Redis and 1, 2, 4 worker hosts, each host a network
namespace of its own on a private subnet (:mod:`batchvision.testing.netns`), started with the
compose file's commands and environment. Workers run the sleeping stand-in model (a fixed
time per batch, standing for an accelerator), so the figure is the orchestration's: how many
images/s each added worker host brings. Needs root (``ip netns``).

    python bench/multihost.py [--images 4096] [--sleep 0.25] [--workers 1,2,4] [--json FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import time
from pathlib import Path

from common import OUT, table
from null_model import small_jpegs
from standins import SLEEPING_MODEL

from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.testing import netns
from batchvision.testing.netns import HostStack, Network

BENCH = Path(__file__).resolve().parent


def measure(stack: HostStack, folder: Path, workers: int) -> tuple[float, float]:
    """Images/s of one job of every image in ``folder`` with ``workers`` worker hosts, from
    the moment the workers may start (the job uploaded while they were paused, so the upload's
    speed is not measured), and the seconds the upload took."""
    hosts = [stack.add_worker() for _ in range(workers)]
    try:
        stack.wait_workers(workers)
        client = Client(stack.api_url, api_key=stack.api_key)
        warm = client.submit_files(sorted(folder.iterdir())[:64])  # connections, model warm-up
        client.wait(warm.job_id, timeout=120)
        processes = [svc.proc for host in hosts for svc in host.services if svc.proc is not None]
        for proc in processes:
            os.killpg(proc.pid, signal.SIGSTOP)
        try:
            start = time.perf_counter()
            job = client.submit_folder(folder, part_files=256)
            upload_s = time.perf_counter() - start
        finally:
            began = time.time()
            for proc in processes:
                os.killpg(proc.pid, signal.SIGCONT)
        status = client.wait(job.job_id, poll_s=0.05, timeout=900)
        assert status.done == job.images, status
        client.close()
        return float(job.images) / (float(status.finished_at or 0.0) - began), upload_s
    finally:
        stack.stop_workers()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=4096)
    ap.add_argument("--sleep", type=float, default=0.25, help="seconds per batch of the stand-in model")
    ap.add_argument("--workers", default="1,2,4", help="worker hosts per run")
    ap.add_argument("--json", help="also write the figures to this file")
    args = ap.parse_args()
    reason = netns.unavailable()
    if reason:
        raise SystemExit(f"cannot run: {reason}")
    folder = small_jpegs(args.images)
    settings = Settings.from_env({}, model=SLEEPING_MODEL)
    env = {"PYTHONPATH": str(BENCH), "BENCH_SLEEP_S": str(args.sleep)}
    counts = [int(x) for x in args.workers.split(",")]
    rates: dict[int, float] = {}
    with Network() as net:
        stack = HostStack(net, settings, OUT / "multihost-logs", env)
        try:
            stack.start_redis()
            stack.start_api()
            assert stack.redis is not None and stack.api is not None
            hosts = f"client {net.gateway}, redis {stack.redis.address}, api {stack.api.address}"
            print(f"subnet {net.network}: {hosts}")
            for n in counts:
                rates[n], upload_s = measure(stack, folder, n)
                print(f"{n} worker host(s): {rates[n]:.0f} images/s (upload {upload_s:.1f}s)", flush=True)
        finally:
            stack.close()
    base_n = counts[0]
    base = rates[base_n]
    per_host = base / base_n
    rows = [("worker hosts", "images/s", f"vs {base_n}", "per added host", "of ideal")]
    prev_n, prev = base_n, base
    for n in counts:
        added = "" if n == prev_n else f"{(rates[n] - prev) / (n - prev_n):+.0f} img/s"
        ideal = rates[n] / (n * per_host)
        rows.append((str(n), f"{rates[n]:.0f}", f"{rates[n] / base:.2f}x", added, f"{ideal:.2f}"))
        prev_n, prev = n, rates[n]
    batch = settings.max_batch_size
    print(
        f"\n{args.images} JPEGs of 224x224 in one job (uploaded in parts of 256 while the workers were "
        f"paused, then timed until the last result), sleeping model {args.sleep}s per batch "
        f"of up to {batch} (ideal {batch / args.sleep:.0f} images/s per host), API and Redis on hosts of "
        f"their own, {os.cpu_count()} CPUs shared by all hosts"
    )
    print(table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps({"sleep_s": args.sleep, "images": args.images, "rates": rates}))


if __name__ == "__main__":
    OUT.mkdir(exist_ok=True)
    main()
