"""Dynamic batching across tasks: many producer threads, one model thread.

Task threads decode their images and :meth:`DynamicBatcher.submit` them; a single model
thread takes up to ``max_batch_size`` items, runs ``predict`` once, and resolves each item's
future. Items from different tasks (and so different jobs) share a batch.

The batch waits up to ``max_delay_s`` to fill while more items are known to be coming: a task
announces its images with :meth:`reserve` before decoding them, so a lone one-image job is
flushed as soon as its image arrives instead of sleeping out the delay. With
``adaptive_max_s``, it also waits for items nobody announced yet while the arrival rate says
they are about to come (closed-loop clients); :mod:`batchvision.core.batch_policy` decides.

The batch contract follows Ray Serve's batching module: a list in, a list of the same
length out, checked at run time; if the call fails, every item of the batch gets the error.
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from typing import Any, Generic, TypeVar

from batchvision.core.batch_policy import BatchPolicy, Forming
from batchvision.core.errors import BatchError
from batchvision.core.priorities import TIERS_DOWN, Tier, WeightedTurns, tier_weights

In = TypeVar("In")
Out = TypeVar("Out")


@dataclasses.dataclass(frozen=True)
class BatchInfo:
    """What one model call did; passed to the ``on_batch`` hook (metrics, tests)."""

    size: int
    tags: tuple[Any, ...]
    wait_s: float
    run_s: float


@dataclasses.dataclass
class _Item(Generic[In, Out]):
    value: In
    tag: Any
    future: Future[Out]
    enqueued: float
    urgent: bool = False


class BatcherClosed(RuntimeError):
    """An item was submitted to a batcher that was closed (its model version was unloaded)."""


class DynamicBatcher(Generic[In, Out]):
    """Collects items from many threads into batches for one ``predict`` callable."""

    def __init__(
        self,
        predict: Callable[[list[In]], Sequence[Out]],
        *,
        max_batch_size: int = 32,
        max_delay_s: float = 0.01,
        adaptive_max_s: float = 0.0,
        on_batch: Callable[[BatchInfo], None] | None = None,
        on_submit: Callable[[Any], Any] | None = None,
        name: str = "batcher",
    ) -> None:
        """``on_batch``: called in the model thread after each model call. ``on_submit``:
        called in the submitting thread with each item's tag, returns the tag the item keeps
        (what the submitting thread knows, e.g. its trace span, travels with the item into
        :attr:`BatchInfo.tags`). ``adaptive_max_s``: the longest wait for unannounced items
        (0: none)."""
        if max_batch_size < 1:
            raise ValueError("max_batch_size must be >= 1")
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.policy = BatchPolicy(max_batch_size, max_delay_s, adaptive_max_s=adaptive_max_s)
        self._on_batch = on_batch
        self._on_submit = on_submit
        self._items: deque[_Item[In, Out]] = deque()
        self._urgent: deque[_Item[In, Out]] = deque()  # served first, in arrival order
        self._reserved = 0
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @contextlib.contextmanager
    def reserve(self, n: int) -> Iterator[Reservation[In, Out]]:
        """Announce ``n`` items about to be submitted, so a forming batch waits for them.

        Submit through the yielded :class:`Reservation`; reservations left unused on exit
        (an image that failed to decode) are released, so no batch waits for them.
        """
        slot = Reservation(self, n)
        with self._cond:
            self._reserved += n
        try:
            yield slot
        finally:
            with self._cond:
                self._reserved -= slot.left
                slot.left = 0
                self._cond.notify_all()

    def in_use(self) -> bool:
        """Whether items are announced or waiting (a task is feeding this batcher now)."""
        with self._cond:
            return self._reserved > 0 or bool(self._items) or bool(self._urgent)

    def submit(self, value: In, tag: Any = None, urgent: bool = False) -> Future[Out]:
        """Queue one item (``urgent``: ahead of the others); the future resolves with its
        output or the batch's error."""
        return self._put(value, tag, None, urgent)

    def _put(
        self, value: In, tag: Any, slot: Reservation[In, Out] | None, urgent: bool = False
    ) -> Future[Out]:
        fut: Future[Out] = Future()
        if self._on_submit is not None:
            tag = self._on_submit(tag)
        with self._cond:
            if self._closed:
                raise BatcherClosed("batcher is closed")
            if slot is not None and slot.left > 0:
                slot.left -= 1
                self._reserved -= 1
            item = _Item(value, tag, fut, time.monotonic(), urgent)
            self.policy.arrived(item.enqueued)
            (self._urgent if urgent else self._items).append(item)
            self._cond.notify_all()
        return fut

    def close(self, timeout: float | None = 5.0) -> None:
        """Stop the model thread after it has run what is queued."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout)

    # -- model thread -------------------------------------------------------------------

    def _next_batch(self) -> list[_Item[In, Out]] | None:
        with self._cond:
            while not self._items and not self._urgent:
                if self._closed:
                    return None
                self._cond.wait()
            # Wait while the policy expects more items soon and the batch is not full: images
            # announced (a message still in decode) for at most max_delay after the oldest item
            # of the line that goes next; unannounced ones only while the arrival rate says
            # they come within a share of the batch's own run time. A lone image at idle runs at
            # once. Urgent items arriving end the wait of a bulk batch: they go next.
            urgent = bool(self._urgent)
            while not self._closed and urgent == bool(self._urgent):
                line = self._urgent if urgent else self._items
                now = time.monotonic()
                left = self.policy.wait_s(Forming(now, line[0].enqueued, len(line), self._reserved))
                if left <= 0:
                    break
                self._cond.wait(left)
            if self._urgent:
                # Someone is waiting on these: run them now, in a small batch of their own,
                # instead of in the next full (and slow) batch.
                n = min(len(self._urgent), self.max_batch_size)
                return [self._urgent.popleft() for _ in range(n)]
            n = min(len(self._items), self.max_batch_size)
            return [self._items.popleft() for _ in range(n)]

    def _run(self) -> None:
        while (batch := self._next_batch()) is not None:
            start = time.monotonic()
            try:
                outputs = list(self._predict([item.value for item in batch]))
                if len(outputs) != len(batch):
                    raise BatchError(f"predict returned {len(outputs)} outputs for a batch of {len(batch)}")
            except Exception as exc:  # noqa: BLE001 - the error goes to every waiting item
                err = exc if isinstance(exc, BatchError) else BatchError(f"model call failed: {exc}")
                for item in batch:
                    item.future.set_exception(err)
            else:
                for item, out in zip(batch, outputs, strict=True):
                    item.future.set_result(out)
            with self._cond:
                self.policy.ran(len(batch), time.monotonic() - start)
            if self._on_batch is not None:
                info = BatchInfo(
                    size=len(batch),
                    tags=tuple(item.tag for item in batch),
                    wait_s=start - batch[0].enqueued,
                    run_s=time.monotonic() - start,
                )
                with contextlib.suppress(Exception):
                    self._on_batch(info)


class Reservation(Generic[In, Out]):
    """Announced items of one producer; see :meth:`DynamicBatcher.reserve`."""

    def __init__(self, batcher: DynamicBatcher[In, Out], n: int) -> None:
        self._batcher = batcher
        self.left = n

    def submit(self, value: In, tag: Any = None, urgent: bool = False) -> Future[Out]:
        """Queue one announced item."""
        return self._batcher._put(value, tag, self, urgent)


class Admission:
    """Bounds how many images a worker holds at once (decoded, or waiting for the model).

    A task asks for as many slots as it has images before it fetches or decodes anything;
    ``urgent`` (interactive) requests are admitted before waiting bulk ones, in arrival order.
    Bulk requests wait in their priority tier; where several tiers wait, the tiers take weighted
    turns (:class:`~batchvision.core.priorities.WeightedTurns`, ``ratio`` times the turns of the
    tier below), each in arrival order, so a higher tier goes first and a lower one still moves.
    A request larger than the whole limit is admitted when nothing else is held, so it never
    waits forever.
    """

    def __init__(self, limit: int, ratio: int = 3) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.limit = limit
        self.held = 0
        self._cond = threading.Condition()
        self._urgent: deque[object] = deque()
        self._tiers: dict[Tier, deque[object]] = {t: deque() for t in TIERS_DOWN}
        self._turns = WeightedTurns({t: tier_weights(ratio)[t] for t in TIERS_DOWN})

    def waiting(self) -> tuple[int, int]:
        """How many requests wait, ``(urgent, bulk)`` (tests, metrics)."""
        with self._cond:
            return len(self._urgent), sum(len(line) for line in self._tiers.values())

    def busy(self, n: int) -> bool:
        """Whether a request of ``n`` slots would wait if it came now (others wait, or the
        slots are held)."""
        with self._cond:
            waiting = bool(self._urgent) or any(self._tiers.values())
            return waiting or not (self.held == 0 or self.held + n <= self.limit)

    @contextlib.contextmanager
    def admit(self, n: int, urgent: bool = False, tier: Tier = Tier.NORMAL) -> Iterator[Places]:
        """Hold ``n`` slots for the duration of the ``with`` block (``tier``: of a bulk request).
        The yielded :class:`Places` gives slots back early and takes them again."""
        self._enter(n, urgent, tier)
        places = Places(self, n, urgent, tier)
        try:
            yield places
        finally:
            with self._cond:
                self.held -= places.held
                places.held, places.closed = 0, True
                self._cond.notify_all()

    def _enter(self, n: int, urgent: bool, tier: Tier, wait_s: float | None = None) -> None:
        """Wait for the turn of a request of ``n`` slots (at most ``wait_s``: then it goes in
        over the limit), then hold them."""
        ticket = object()
        line = self._urgent if urgent else self._tiers[tier]
        until = None if wait_s is None else time.monotonic() + wait_s
        with self._cond:
            line.append(ticket)
            try:
                while not self._may_enter(ticket, n):
                    left = None if until is None else until - time.monotonic()
                    if left is not None and left <= 0:
                        break
                    self._cond.wait(left)
                if not urgent:
                    self._turns.take(self._active(), used_by=tier)
            finally:
                line.remove(ticket)
                self._cond.notify_all()
            self.held += n

    def _active(self) -> list[Tier]:
        return [t for t, line in self._tiers.items() if line]

    def _next(self) -> object:
        """The request whose turn it is: the first urgent one, else the first of the tier whose
        turn it is."""
        if self._urgent:
            return self._urgent[0]
        return self._tiers[self._turns.peek(self._active())][0]

    def _may_enter(self, ticket: object, n: int) -> bool:
        return self._next() is ticket and (self.held == 0 or self.held + n <= self.limit)


class Places:
    """The slots one :meth:`Admission.admit` holds. An image that will wait a long time for
    something other than this worker (a URL being fetched) gives its slot back with
    :meth:`lend` and takes one again with :meth:`take` once it is ready to decode, so slow
    servers hold no slot the other requests could use; an image whose result is known gives
    its slot back at once."""

    #: The longest :meth:`take` waits in line before it goes in over the limit. What it
    #: takes a slot for is in memory already (fetched bytes, on one of a bounded number of
    #: fetch threads), and a wait without end could close a circle: slots held by requests
    #: that wait, themselves, for images waiting here.
    #: Short: while a large request waits at the head of the line for places that only the
    #: images of requests already in can free, each take would wait the whole time (with 2 s,
    #: eight fetch threads decoded four images a second).
    TAKE_WAIT_S = 0.05

    def __init__(self, admission: Admission, held: int, urgent: bool, tier: Tier) -> None:
        self._admission = admission
        self.held = held
        self._urgent = urgent
        self._tier = tier
        #: the ``with`` block ended: slots taken now are given back at once
        self.closed = False

    def lend(self, n: int = 1) -> None:
        """Give ``n`` of the held slots back now."""
        adm = self._admission
        with adm._cond:
            n = min(n, self.held)
            self.held -= n
            adm.held -= n
            adm._cond.notify_all()

    def take(self, n: int = 1) -> None:
        """Wait for ``n`` slots again, in line with new requests of the same urgency and tier
        (at most :attr:`TAKE_WAIT_S`)."""
        adm = self._admission
        if self.closed:  # its request ended (it failed): nothing to hold a slot for
            return
        adm._enter(n, self._urgent, self._tier, self.TAKE_WAIT_S)
        with adm._cond:
            if self.closed:  # late (its request failed meanwhile): nobody would give them back
                adm.held -= n
                adm._cond.notify_all()
            else:
                self.held += n


class Uncounted(Places):
    """Places of work that runs outside the admission (a suspect image, alone): lending and
    taking change nothing."""

    def __init__(self) -> None:
        super().__init__(Admission(1), 0, True, Tier.NORMAL)

    def lend(self, n: int = 1) -> None:
        pass

    def take(self, n: int = 1) -> None:
        pass
