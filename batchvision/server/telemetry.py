"""What operators and tests read about the whole service: queue depth, active jobs, and the
log of recent batches (their sizes and the jobs they mixed)."""

from __future__ import annotations

import contextlib
import json
import logging
import queue
import threading
import time
from collections.abc import Sequence
from typing import Any

import redis

from batchvision.server import keys, lua

log = logging.getLogger(__name__)


class Telemetry:
    """Global counters and the recent-batch log in Redis."""

    def __init__(self, client: redis.Redis) -> None:
        self.redis = client
        self._release = client.register_script(lua.RELEASE)

    def active_jobs(self) -> int:
        """Jobs created and not finished yet (open uploads that expired are released first)."""
        self.release_expired()
        return int(self.redis.zcard(keys.ACTIVE))

    def pending_images(self) -> int:
        """Accepted images that have no result yet, over all jobs (open uploads that expired
        are released first: their images will never get one)."""
        self.release_expired()
        return int(self.redis.get(keys.PENDING) or 0)

    def release_expired(self, limit: int = 1000) -> int:
        """Release open uploads whose expiry passed (a cheap range query when there are none);
        returns how many."""
        return int(self._release(keys=keys.RELEASE_KEYS, args=[time.time(), "", limit]))

    def pending_bytes(self) -> int:
        """Bytes of accepted images that have no result yet, over all jobs."""
        return int(self.redis.get(keys.PENDING_BYTES) or 0)

    def log_batch(
        self,
        size: int,
        jobs: Sequence[str],
        keep: int = 1000,
        model: str | None = None,
        version: int | None = None,
    ) -> None:
        """Remember a recent batch (size, the jobs it mixed, the model and version that ran it),
        for operators and tests."""
        entry: dict[str, Any] = {"size": size, "jobs": sorted(set(jobs)), "at": round(time.time(), 3)}
        if model is not None:
            entry.update(model=model, version=version)
        doc = json.dumps(entry)
        pipe = self.redis.pipeline()
        pipe.lpush(keys.BATCH_LOG, doc)
        pipe.ltrim(keys.BATCH_LOG, 0, keep - 1)
        pipe.execute()

    def recent_batches(self, n: int = 1000) -> list[dict[str, Any]]:
        """The last ``n`` batches, newest first."""
        return [json.loads(x) for x in self.redis.lrange(keys.BATCH_LOG, 0, n - 1)]


class BatchLog:
    """:meth:`Telemetry.log_batch` from a thread of its own, for the worker's model thread,
    which must never wait on Redis: a write stuck on an unreachable Redis (a network
    partition) held every image behind it until ``TASK_TIME_LIMIT_S`` passed, and those
    images were stored as ``inference_timeout`` errors once Redis was back
    (tests/integration/test_multihost.py). While Redis is away, entries beyond ``backlog``
    are dropped: it is a log, not work."""

    def __init__(self, telemetry: Telemetry, backlog: int = 1000) -> None:
        self.telemetry = telemetry
        self._queue: queue.Queue[tuple[int, list[str], str | None, int | None]] = queue.Queue(backlog)
        threading.Thread(target=self._run, name="batch-log", daemon=True).start()

    def put(self, size: int, jobs: list[str], model: str | None = None, version: int | None = None) -> None:
        """Queue one entry; never blocks."""
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait((size, jobs, model, version))

    def _run(self) -> None:
        while True:
            size, jobs, model, version = self._queue.get()
            try:
                self.telemetry.log_batch(size, jobs, model=model, version=version)
            except Exception as exc:  # noqa: BLE001 - Redis away: the entry is lost, not the work
                log.debug("batch log entry dropped: %s", exc)
