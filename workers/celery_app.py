"""The one Celery app of the workers: ``celery -A workers.celery_app worker``.

Run with ``--pool threads`` (``batchvision worker`` does): one process holds TensorFlow and
the model, never forked; task threads decode in parallel and feed one model thread.

The app holds the worker's components (:class:`workers.runtime.Worker`) while the Celery worker
runs: started before it consumes, stopped in reverse when it shuts down.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import Celery, signals

from batchvision.core.settings import Settings
from batchvision.server.queue import create_celery
from workers.lifecycle import StartError
from workers.runtime import Worker

log = logging.getLogger(__name__)


class WorkerApp(Celery):  # type: ignore[misc, unused-ignore]
    """The workers' Celery app, which holds the running :class:`Worker`."""

    runtime: Worker | None = None

    def worker(self) -> Worker:
        """The running worker's components (raises before the worker started)."""
        if self.runtime is None:
            raise RuntimeError("the worker has not started (worker_init did not run)")
        return self.runtime


settings = Settings.from_env()
app: WorkerApp = create_celery(settings, name="batchvision-worker", cls=WorkerApp)  # type: ignore[assignment, unused-ignore]
app.conf.include = ["workers.tasks"]

# -- structured logs: BATCHVISION_LOG_FORMAT=json replaces Celery's log setup -----------------
if settings.log_format == "json":
    from workers.logs import setup_json_logging

    setup_json_logging(app)  # now: what Celery says before its logging hook is JSON too

    @signals.setup_logging.connect
    def _json_logs(loglevel: Any = None, **_: Any) -> None:
        setup_json_logging(app, loglevel)


@signals.worker_init.connect
def _start(**_: Any) -> None:
    # Start every component (the models loaded and warmed up) before the worker consumes: a
    # task never pays for it, and a worker that cannot start (bad settings, missing model,
    # metrics port taken) exits at once, visibly, instead of consuming tasks it cannot run.
    worker = Worker(settings, app)
    try:
        worker.start()  # on failure, what started is stopped again, in reverse
    except StartError as exc:  # its message says what to change
        log.critical("worker cannot start: %s", exc)
        os._exit(3)
    except Exception:
        log.critical("worker cannot start", exc_info=True)
        os._exit(3)
    app.runtime = worker


@signals.worker_shutting_down.connect
def _release_parked(**_: Any) -> None:
    # The shutdown begins; the running tasks may take minutes, and the parked chunks should not
    # wait for them.
    worker = app.runtime
    if worker is not None:
        worker.processor.release_parked(wait=False)


@signals.worker_shutdown.connect
def _close(**_: Any) -> None:
    worker, app.runtime = app.runtime, None
    if worker is not None:
        worker.stop()
