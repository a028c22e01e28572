"""Coalescing small chunks into shared Celery messages (group commit for the queue).

Every message costs the API a publish and the worker a receive, three task events and an
acknowledgement, whatever it carries: for one-image jobs that fixed cost, not the model, bounds
throughput. So the API process hands interactive chunks to one :class:`Coalescer`, whose
thread sends everything that arrived together as one message. When the previous message left
more than ``linger_s`` ago (an idle service) a chunk goes out at once; under load it waits at
most until ``linger_s`` after the previous message, collecting the chunks of other requests.
The caller blocks until its message is published (or gets the publish error), so a ``202``
still means "queued".
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass
class _Pending(Generic[T]):
    item: T
    weight: int
    done: threading.Event = field(default_factory=threading.Event)
    error: BaseException | None = None


class Coalescer(Generic[T]):
    """Groups items submitted by many threads into calls of ``send(items)``."""

    def __init__(
        self,
        send: Callable[[list[T]], None],
        *,
        max_weight: int,
        linger_s: float,
        weight: Callable[[T], int] = lambda _: 1,
        name: str = "coalescer",
    ) -> None:
        if max_weight < 1:
            raise ValueError("max_weight must be >= 1")
        self._send = send
        self.max_weight = max_weight
        self.linger_s = linger_s
        self._weight = weight
        self._pending: list[_Pending[T]] = []
        self._cond = threading.Condition()
        self._last_send = 0.0
        self._name = name
        self._thread: threading.Thread | None = None
        self.messages = 0  # how many sends so far (tests, metrics)
        self.items = 0

    def submit(self, item: T, timeout_s: float | None = None) -> None:
        """Queue ``item`` and block until the message carrying it was sent; re-raises the
        send's exception, or ``TimeoutError`` after ``timeout_s``."""
        self.submit_many([item], timeout_s)

    def submit_many(self, items: Sequence[T], timeout_s: float | None = None) -> None:
        """Like :meth:`submit` for several items (they may travel in different messages)."""
        entries = [_Pending(item, max(1, self._weight(item))) for item in items]
        with self._cond:
            self._start()
            self._pending.extend(entries)
            self._cond.notify_all()
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for entry in entries:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            if not entry.done.wait(left):
                raise TimeoutError("the queue did not accept the task in time")
            if entry.error is not None:
                raise entry.error

    def pending(self) -> int:
        """Items waiting for a message (tests, metrics)."""
        with self._cond:
            return len(self._pending)

    def _start(self) -> None:
        # Started lazily, in the process that uses it: gunicorn forks workers after import.
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._run, name=self._name, daemon=True)
            self._thread.start()

    def _take(self) -> list[_Pending[T]]:
        with self._cond:
            while not self._pending:
                self._cond.wait()
            flush_at = self._last_send + self.linger_s
            while sum(p.weight for p in self._pending) < self.max_weight:
                left = flush_at - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
            batch: list[_Pending[T]] = []
            weight = 0
            while self._pending and (not batch or weight + self._pending[0].weight <= self.max_weight):
                entry = self._pending.pop(0)
                batch.append(entry)
                weight += entry.weight
            return batch

    def _run(self) -> None:
        while True:
            batch = self._take()
            try:
                self._send([p.item for p in batch])
            except Exception as exc:  # noqa: BLE001 - handed to every waiting caller
                for p in batch:
                    p.error = exc
            self._last_send = time.monotonic()
            self.messages += 1
            self.items += len(batch)
            for p in batch:
                p.done.set()
