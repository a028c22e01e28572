"""Fault injection for the reliability tests; inert unless ``BV_FAILPOINTS`` is set.

``BV_FAILPOINTS`` is a comma-separated list:

- ``poison-kill``: a worker that decodes an upload containing :data:`POISON_MARKER` kills its
  own process with SIGKILL (an image that crashes the worker every time).
- ``slow-batch=SECONDS``: every model call takes that much longer (widens "mid-batch").
- ``batch-gate=PATH``: every model call waits until the file ``PATH`` exists, and creates
  ``PATH.waiting`` as it starts to wait (a test holds a batch mid-way, then lets it go).
- ``task-error=N``: the first N classify tasks of a worker process fail with an error they
  do not retry (a bug in the worker, say).
- ``publish-fail``: the API stores a new job, then fails to publish its messages (a broker
  outage at the worst moment).
- ``crash-after-store``: the API process kills itself with SIGKILL between storing a new job
  and publishing its messages.
- ``crash-mid-listing=N``: a worker kills itself with SIGKILL after adding the N-th page it
  listed of a prefix job, before moving the listing's cursor past it.
"""

from __future__ import annotations

import os
import signal
import threading
import time

POISON_MARKER = b"BV-POISON-PILL"


def _active() -> dict[str, str]:
    out = {}
    for item in os.environ.get("BV_FAILPOINTS", "").split(","):
        name, _, value = item.strip().partition("=")
        if name:
            out[name] = value
    return out


ACTIVE = _active()
_pages_listed = [0]
_tasks_failed = [0]
_lock = threading.Lock()


def before_decode(data: bytes) -> None:
    if "poison-kill" in ACTIVE and POISON_MARKER in data:
        os.kill(os.getpid(), signal.SIGKILL)


def after_store() -> None:
    if "crash-after-store" in ACTIVE:
        os.kill(os.getpid(), signal.SIGKILL)
    if "publish-fail" in ACTIVE:
        from kombu.exceptions import OperationalError

        raise OperationalError("failpoint publish-fail: the broker refused the message")


def before_batch() -> None:
    delay = ACTIVE.get("slow-batch")
    if delay:
        time.sleep(float(delay))
    gate = ACTIVE.get("batch-gate")
    if gate:
        with open(f"{gate}.waiting", "a"):
            pass
        while not os.path.exists(gate):
            time.sleep(0.01)


def before_task() -> None:
    failing = ACTIVE.get("task-error")
    if not failing:
        return
    with _lock:  # (task threads)
        if _tasks_failed[0] >= int(failing):
            return
        _tasks_failed[0] += 1
        count = _tasks_failed[0]
    raise RuntimeError(f"failpoint task-error: task {count} of {failing} fails")


def after_listed_page() -> None:
    limit = ACTIVE.get("crash-mid-listing")
    if limit:
        _pages_listed[0] += 1
        if _pages_listed[0] >= int(limit):
            os.kill(os.getpid(), signal.SIGKILL)
