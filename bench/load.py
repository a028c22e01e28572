"""Bounded load test on loopback: concurrent submitters for a fixed time, then every
accepted image is checked for exactly one result.

Reports requests/s held, errors (anything but the intended 429s), 429s, and lost images.
Bounded in time (``--seconds``) and concurrency (``--clients``); talks only to 127.0.0.1.

    python bench/load.py [--seconds 120] [--clients 16] [--model models/demo.keras]
"""

from __future__ import annotations

import argparse
import random
import threading
import time
from collections import Counter
from pathlib import Path

import requests
from common import running_stack, table

from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--seconds", type=float, default=120)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--model", default=str(Path("models/demo.keras")))
    ap.add_argument("--max-queued", type=int, default=400)
    args = ap.parse_args()
    pool = [(n, d) for n, d, _ in labelled_files(64, seed=1)]
    settings = Settings.from_env(model=args.model, max_queued_images=args.max_queued, api_workers=2)
    with running_stack(settings) as s:
        url = f"http://127.0.0.1:{s.api_port}"
        accepted: list[tuple[str, int]] = []
        codes: Counter[int] = Counter()
        lock = threading.Lock()
        stop = time.monotonic() + args.seconds

        def submitter(seed: int) -> None:
            rng = random.Random(seed)
            session = requests.Session()
            while time.monotonic() < stop:
                files = [("files", pool[rng.randrange(len(pool))]) for _ in range(rng.randint(1, 8))]
                try:
                    resp = session.post(f"{url}/v1/jobs", files=files, timeout=30)
                    code = resp.status_code
                except requests.RequestException:
                    code = -1
                with lock:
                    codes[code] += 1
                    if code == 202:
                        accepted.append((resp.json()["job_id"], len(files)))
                if code == 429:
                    time.sleep(float(resp.headers.get("Retry-After", "1")) * rng.uniform(0.2, 0.5))

        threads = [threading.Thread(target=submitter, args=(i,)) for i in range(args.clients)]
        start = time.monotonic()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        elapsed = time.monotonic() - start
        client = Client(url)
        lost = 0
        images = 0
        for job_id, n in accepted:
            status = client.wait(job_id, timeout=600, poll_s=0.2)
            rows = client.results(job_id)
            images += n
            lost += n - sum(1 for r in rows if r.status != "pending")
            lost += abs(status.done + status.failed - n)
    total = sum(codes.values())
    errors = total - codes[202] - codes[429]
    print(
        table(
            [
                ("measure", "value"),
                ("duration", f"{elapsed:.0f} s, {args.clients} concurrent clients"),
                ("requests", f"{total} ({total / elapsed:.1f}/s)"),
                ("accepted (202)", f"{codes[202]} jobs, {images} images ({images / elapsed:.1f} img/s)"),
                ("backpressure (429)", str(codes[429])),
                (
                    "errors (other)",
                    f"{errors} {dict((k, v) for k, v in codes.items() if k not in (202, 429))}",
                ),
                ("lost images", str(lost)),
            ]
        )
    )


if __name__ == "__main__":
    main()
