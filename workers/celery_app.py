"""The one Celery app of the workers: ``celery -A workers.celery_app worker``.

Run with ``--pool threads`` (``batchvision worker`` does): one process holds TensorFlow and
the model, never forked; task threads decode in parallel and feed one model thread.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

from batchvision.core.settings import Settings
from batchvision.server.checks import check_worker_settings, eviction_warning
from batchvision.server.connect import connect_redis
from batchvision.server.queue import create_celery

settings = Settings.from_env()
app = create_celery(settings, name="batchvision-worker")
app.conf.include = ["workers.tasks"]

log = logging.getLogger(__name__)

# -- structured logs (issue 18): BATCHVISION_LOG_FORMAT=json replaces Celery's log setup -------
if settings.log_format == "json":
    from workers.logs import setup_json_logging

    setup_json_logging(app)  # now: what Celery says before its logging hook is JSON too

    @signals.setup_logging.connect
    def _json_logs(loglevel: Any = None, **_: Any) -> None:
        setup_json_logging(app, loglevel)


@signals.worker_init.connect
def _start(**_: Any) -> None:
    # Load (and warm up) the model before the worker consumes: a task never pays for it, and
    # a worker that cannot start (bad settings, missing model, metrics port taken) exits at
    # once, visibly, instead of consuming tasks it cannot run.
    try:
        check_worker_settings(settings)
        warning = eviction_warning(connect_redis(settings.redis_url))
        if warning:
            log.warning(warning)
        from batchvision.server import tracing
        from workers.runtime import get_runtime, start_sweeper

        tracing.setup("batchvision-worker", settings)  # issue 18: no-op unless configured
        get_runtime(settings)
        start_sweeper(settings, app)
    except Exception:
        log.critical("worker cannot start", exc_info=True)
        os._exit(3)


@signals.worker_shutdown.connect
def _close(**_: Any) -> None:
    from workers.runtime import shutdown

    shutdown()
