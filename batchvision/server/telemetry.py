"""What operators and tests read about the whole service: queue depth, active jobs, and the
log of recent batches (their sizes and the jobs they mixed)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

import redis

from batchvision.server import keys


class Telemetry:
    """Global counters and the recent-batch log in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client

    def active_jobs(self) -> int:
        """Jobs created and not finished yet."""
        return int(self.redis.scard(keys.ACTIVE))

    def pending_images(self) -> int:
        """Accepted images that have no result yet, over all jobs."""
        return int(self.redis.get(keys.PENDING) or 0)

    def log_batch(self, size: int, jobs: Sequence[str], keep: int = 1000) -> None:
        """Remember a recent batch (size and the jobs it mixed), for operators and tests."""
        doc = json.dumps({"size": size, "jobs": sorted(set(jobs)), "at": round(time.time(), 3)})
        pipe = self.redis.pipeline()
        pipe.lpush(keys.BATCH_LOG, doc)
        pipe.ltrim(keys.BATCH_LOG, 0, keep - 1)
        pipe.execute()

    def recent_batches(self, n: int = 1000) -> list[dict[str, Any]]:
        """The last ``n`` batches, newest first."""
        return [json.loads(x) for x in self.redis.lrange(keys.BATCH_LOG, 0, n - 1)]
