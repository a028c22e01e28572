"""Ray Serve peer for bench/small_jobs.py: one deployment (one replica) that batches requests
with ``@serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02)`` and classifies each batch
with one model call (bench/peers/peer_model.py: the same decode and model as batchvision).

    POST /        raw JPEG body  ->  {"label", "class_id", "score"}
    GET  /stats   {"batches", "images"} so far (mean batch size = images / batches)

Run in bench/peers/.venv-ray (``make bench-peers``), with bench/peers on PYTHONPATH:

    python bench/peers/ray_serve_app.py --port 8100

It starts a local Ray instance (no dashboard), serves until SIGTERM or SIGINT, then shuts
Serve and Ray down (their processes with them).
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from typing import Any

import ray
from ray import serve
from starlette.requests import Request

MAX_BATCH_SIZE = 32
BATCH_WAIT_TIMEOUT_S = 0.02
# Ray's docs: allow at least a full batch of requests in flight to the replica, or batches can
# never fill (Ray's default is 5). Above it the replica rejects and the proxy retries with backoff.
MAX_ONGOING_REQUESTS = int(os.environ.get("BENCH_RAY_MAX_ONGOING_REQUESTS", str(2 * MAX_BATCH_SIZE)))


@serve.deployment(
    max_ongoing_requests=MAX_ONGOING_REQUESTS,
    ray_actor_options={
        "num_cpus": 1,
        # Ray sets OMP_NUM_THREADS to the actor's CPUs (1) when unset; TensorFlow in batchvision's
        # worker runs with its defaults, so the replica gets the machine's cores as well.
        "runtime_env": {"env_vars": {"OMP_NUM_THREADS": str(os.cpu_count() or 1)}},
    },
)
class Classifier:
    def __init__(self) -> None:
        import peer_model  # TensorFlow in the replica only, not in the driver

        self.model = peer_model.PeerModel()

    @serve.batch(max_batch_size=MAX_BATCH_SIZE, batch_wait_timeout_s=BATCH_WAIT_TIMEOUT_S)
    async def classify(self, bodies: list[bytes]) -> list[dict[str, Any]]:
        """One call per batch: decode every image, then one model call."""
        return self.model.classify(bodies)

    async def __call__(self, request: Request) -> dict[str, Any]:
        if request.method == "GET" and request.url.path.rstrip("/").endswith("/stats"):
            return dict(self.model.stats())
        result: dict[str, Any] = await self.classify(await request.body())
        return result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": args.port})
        app = Classifier.bind()  # type: ignore[attr-defined]  # serve.deployment adds it
        serve.run(app, name="classifier", route_prefix="/", blocking=False)
        print(f"ray serve: listening on 127.0.0.1:{args.port}", flush=True)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    main()
