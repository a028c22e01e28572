"""Per-key shares of a worker's task threads for chunks whose images are fetched by URL.

A message with chunks of URLs holds its task thread until every URL is fetched; the fetch pool
lets one API key fetch only ``FETCH_PER_KEY`` URLs at a time, so a key whose servers are slow
(or never answer) would otherwise fill every task thread with messages that only wait for that
key's turn, and the other keys' messages would wait behind them. So a process runs at most
``per_key`` messages with chunks of URLs of one key at once (the chunks of one message run
together: they share its thread). A further chunk is *parked*: its message is acknowledged and
the chunk waits in memory, stamped anew in the chunk ledger (so only a dead process's parked
chunks are re-sent by the sweep). It is published again, to the tail of its queue, when one of
its key's messages is done here: the oldest one for each message done, and all of them once
none of the key's messages runs here (the chunks sent back may be taken by other processes:
none is left waiting for a finish that will not come).

The key ``""`` (an API without keys: one tenant) is never parked.
"""

from __future__ import annotations

import enum
import threading
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass

from batchvision.server.messages import Chunk


class Entry(enum.Enum):
    """What :meth:`Parking.decide` made of a chunk."""

    RUN = "run"  #: its message runs now, counted until :meth:`Parking.leave`
    PARKED = "parked"  #: it waits here (or it does already: a second delivery)
    BACK = "back"  #: over its key's share while the worker stops: to be sent back at once


@dataclass(frozen=True)
class Parked:
    """A chunk waiting for its key's turn, with what publishing it again needs."""

    chunk: Chunk
    owner: str
    model: str
    urgent: bool
    priority: int
    #: when its job queued it (kept through the parking: the queue-wait metric counts from it)
    enqueued_at: float | None = None


class Parking:
    """Counts the messages with URL chunks each key runs in this process, and parks the chunks
    over its share.

    A message decides first (:meth:`decide`: its chunks of a key run, or wait) and parks what
    waits only once its results are stored (:meth:`add`): a message that fails is tried again
    with all of its chunks, so none of them may wait here (or be published) meanwhile.
    """

    def __init__(self, per_key: int) -> None:
        self.per_key = max(1, per_key)
        self._lock = threading.Lock()
        self._running: Counter[str] = Counter()
        self._parked: dict[str, deque[Parked]] = {}
        self._members: set[Chunk] = set()
        self._stopping = False  # (after drain: nothing is parked any more)

    def decide(self, item: Parked) -> Entry:
        """Run ``item``'s message now (it then counts once for its key, until :meth:`leave`),
        or let the chunk wait (also when it is parked here already: a second delivery, the
        sweep re-sent it meanwhile), or, once the worker stops, send it back."""
        if not item.owner:
            return Entry.RUN
        with self._lock:
            if item.chunk in self._members:
                return Entry.PARKED
            if self._running[item.owner] < self.per_key:
                self._running[item.owner] += 1
                return Entry.RUN
            return Entry.BACK if self._stopping else Entry.PARKED

    def is_parked(self, chunk: Chunk) -> bool:
        """Whether ``chunk`` waits here (a second delivery of it runs not)."""
        with self._lock:
            return chunk in self._members

    def add(self, items: Sequence[Parked]) -> list[Parked]:
        """Park ``items`` (their message's results are stored); those to publish at once: all
        when the worker stops, and those of a key none of whose messages runs here any more
        (no finish would send them back)."""
        out: list[Parked] = []
        with self._lock:
            for item in items:
                if item.chunk in self._members:
                    continue  # parked here already
                if self._stopping or not self._running[item.owner]:
                    out.append(item)
                    continue
                self._parked.setdefault(item.owner, deque()).append(item)
                self._members.add(item.chunk)
        return out

    def leave(self, owner: str) -> list[Parked]:
        """A message of ``owner`` that :meth:`decide` let run is done: the parked chunks of
        that key to publish again: the oldest one, or all of them when none of the key's
        messages runs here any more. (On arrival a newer chunk of the key may have taken the
        room: then it is parked again, at the back.)"""
        if not owner:
            return []
        with self._lock:
            self._running[owner] -= 1
            left = self._running[owner]
            if not left:
                del self._running[owner]
            line = self._parked.get(owner)
            out: list[Parked] = []
            while line and (not left or not out):
                item = line.popleft()
                self._members.discard(item.chunk)
                out.append(item)
            if line is not None and not line:
                del self._parked[owner]
            return out

    def chunks(self) -> list[Chunk]:
        """The chunks parked now."""
        with self._lock:
            return list(self._members)

    def parked(self) -> int:
        """Chunks parked now (tests, metrics)."""
        with self._lock:
            return len(self._members)

    def drain(self) -> list[Parked]:
        """Every parked chunk (the worker stops: they are published again); from now on
        nothing is parked."""
        with self._lock:
            self._stopping = True
            out = [item for line in self._parked.values() for item in line]
            self._parked.clear()
            self._members.clear()
            return out
