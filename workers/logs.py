"""The worker's JSON log lines (``BATCHVISION_LOG_FORMAT=json``), Celery's own records and
native output included.

- Celery's task records (``Task ... received`` / ``succeeded in ...``) pass the task's fields
  as ``extra={"data": {...}}``; :class:`CeleryTaskFields` turns them into ``task_id``,
  ``task_name`` and ``duration_ms`` and drops the rest (argument and result reprs).
- TensorFlow, absl and CUDA write to file descriptors 1 and 2 from C++, past Python's
  logging. In JSON mode both descriptors become a pipe that a thread reads line by line into
  records of the logger ``native`` (level from absl's ``I``/``W``/``E``/``F`` prefix); the
  records themselves go to the process's original stderr.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import sys
import threading
from typing import IO, Any

from celery import Celery

from batchvision.core.logs import configure_logging

_ABSL = re.compile(r"^([IWEF])\d{4} ")
_LEVELS = {"I": logging.INFO, "W": logging.WARNING, "E": logging.ERROR, "F": logging.CRITICAL}
_lock = threading.Lock()
_out: IO[str] | None = None  # the original stderr, once descriptors 1 and 2 are captured


class CeleryTaskFields(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        data = record.__dict__.pop("data", None)
        if isinstance(data, dict):
            if data.get("id"):
                record.task_id = data["id"]
            if data.get("name"):
                record.task_name = data["name"]
            runtime = data.get("runtime")
            if isinstance(runtime, int | float):
                record.duration_ms = round(runtime * 1000, 3)
        return True


def setup_json_logging(app: Celery, loglevel: Any = None) -> None:
    """Every record as a JSON line on the original stderr; Python's ``print()`` output and
    native output as records too. Safe to call again (Celery's ``setup_logging`` hook)."""
    global _out
    with _lock:
        if _out is None:
            _out = _capture_native_output()
        level = loglevel if isinstance(loglevel, int) else str(loglevel or "INFO").upper()
        handler = configure_logging("json", level, service="worker", stream=_out)
        handler.addFilter(CeleryTaskFields())
    app.log.redirect_stdouts(logging.WARNING)


def _capture_native_output() -> IO[str]:
    for stream in (sys.stdout, sys.stderr):
        stream.flush()
    saved = (os.dup(1), os.dup(2))
    out = os.fdopen(os.dup(2), "w", buffering=1)
    read, write = os.pipe()
    os.dup2(write, 1)
    os.dup2(write, 2)
    os.close(write)
    pump = threading.Thread(target=_pump, args=(read,), name="native-output", daemon=True)
    pump.start()

    def restore() -> None:
        # At exit: give the descriptors back (closing the pipe's last writers), then let the
        # pump log what is left in the pipe.
        for stream in (sys.__stdout__, sys.__stderr__):
            if stream is not None:
                stream.flush()
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        pump.join(2.0)

    atexit.register(restore)
    return out


def _pump(fd: int) -> None:
    log = logging.getLogger("native")
    with os.fdopen(fd, "r", errors="replace") as lines:
        for line in lines:
            text = line.rstrip()
            if not text:
                continue
            match = _ABSL.match(text)
            log.log(_LEVELS[match.group(1)] if match else logging.WARNING, text)
