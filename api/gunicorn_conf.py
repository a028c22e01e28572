"""gunicorn hooks for ``batchvision api``."""

from __future__ import annotations

from typing import Any


def child_exit(server: Any, worker: Any) -> None:
    # A dead worker's live gauges must not linger in the multiprocess metrics directory.
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)
