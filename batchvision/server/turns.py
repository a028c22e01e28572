"""Redis broker: the order a worker reads its queues in, with the priority tiers in weighted
turns (:class:`~batchvision.core.priorities.WeightedTurns`).

kombu's Redis transport takes the next message with one ``BRPOP`` over every queue a worker
consumes, in the order of its queue cycle (``queue_order_strategy``); ``BRPOP`` answers from the
first list that has a message. :class:`TierCycle` lists every interactive queue first (small
jobs stay ahead of every tier), then the bulk queues: first the tiers it last found empty (so a
message that arrives in one is taken at once), then the tier whose turn it is, then the other
tiers that have work, highest first. A message taken from a bulk queue uses a turn of its tier
among the tiers that have work; the tiers listed before it had none (``BRPOP`` answers from the
first list with a message) and sit out until they answer again. So under a backlog of several
tiers the worker takes them in the shares of ``BATCHVISION_PRIORITY_RATIO``, and a lone tier
gets every turn.

kombu builds the cycle from a dotted name with no arguments, so the ratio is part of the name:
``batchvision.server.turns:tier_cycle_3`` (see :func:`cycle_name`).

(With RabbitMQ each queue has its own consumer and prefetch: messages of every tier reach the
worker, where :class:`~batchvision.core.batching.Admission` takes the same weighted turns.)
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Any

from batchvision.core.priorities import TIERS_DOWN, Tier, WeightedTurns, tier_weights
from batchvision.server.routing import tier_of_queue

_NAME = re.compile(r"tier_cycle_([1-9][0-9]{0,2})")


def cycle_name(ratio: int) -> str:
    """The ``queue_order_strategy`` of a worker whose tiers take turns in ``ratio``."""
    return f"{__name__}:tier_cycle_{ratio}"


class TierCycle:
    """kombu's queue-cycle protocol (``update``, ``consume``, ``rotate``) with weighted tiers."""

    def __init__(self, it: Iterable[str] | None = None, *, ratio: int = 3) -> None:
        self.items: list[str] = list(it) if it is not None else []
        self.turns = WeightedTurns({t: tier_weights(ratio)[t] for t in TIERS_DOWN})
        #: Tiers a ``BRPOP`` found empty (listed before the one that answered), until one of
        #: them answers again.
        self.idle: set[Tier] = set()
        self._order: list[Tier] = []  # the tiers in the order of the last consume

    def update(self, it: Iterable[str]) -> None:
        """The worker's queues changed (consumers added or cancelled)."""
        self.items[:] = it

    def _tiers(self) -> dict[str, Tier | None]:
        return {q: tier_of_queue(q) for q in self.items}

    def consume(self, n: int) -> list[str]:
        """The first ``n`` queues in the order of the next ``BRPOP``: interactive, then the idle
        tiers (empty when last looked at: a message that arrived in one is taken at once, and
        from then on it takes turns), then the tier whose turn it is, then the others."""
        tiers = self._tiers()
        present = [t for t in TIERS_DOWN if t in tiers.values()]
        idle = [t for t in present if t in self.idle]
        waiting = [t for t in present if t not in self.idle]
        if waiting:
            first = self.turns.peek(waiting)
            waiting.remove(first)
            waiting.insert(0, first)
        self._order = idle + waiting
        interactive = [q for q in self.items if tiers[q] is None]
        bulk = [q for t in self._order for q in self.items if tiers[q] == t]
        return (interactive + bulk)[:n]

    def rotate(self, last_used: str) -> str:
        """A message came from ``last_used``: the tiers listed before it were empty (``BRPOP``
        answers from the first list with a message) and are idle now; its tier used a turn
        among the tiers that wait."""
        tier = tier_of_queue(last_used)
        if tier is None or tier not in self._order:
            return last_used
        at = self._order.index(tier)
        self.idle.update(self._order[:at])
        self.idle.discard(tier)
        self.turns.take([t for t in self._order if t not in self.idle], used_by=tier)
        return last_used


def __getattr__(name: str) -> Any:
    # ``tier_cycle_<ratio>``: the class kombu instantiates, with the ratio bound.
    match = _NAME.fullmatch(name)
    if match is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return functools.partial(TierCycle, ratio=int(match.group(1)))
