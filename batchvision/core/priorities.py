"""Per-job priorities: the range, the tiers the queues serve, and the weighted turns that take
higher tiers first without starving lower ones.

A job asks for a ``priority`` from :data:`MIN_PRIORITY` (0, lowest) to :data:`MAX_PRIORITY`
(9, highest); :data:`DEFAULT_PRIORITY` (5) when it names none, so a caller may also lower its
own work below everyone else's without an administrator. An administrator caps what each API
key may ask for (``BATCHVISION_MAX_PRIORITY``, ``BATCHVISION_KEY_MAX_PRIORITY``).

The ten values are served in three :class:`Tier` s, each a queue of its own per model (as
kombu's Redis transport groups ten priorities into four lists): ``low`` 0-3, ``normal`` 4-6
(the model's plain bulk queue, so a job that names no priority goes where every worker reads),
``high`` 7-9; within a tier, arrival order. Where
two tiers both have work waiting, :class:`WeightedTurns` gives each tier ``ratio`` times the
turns of the tier below (``BATCHVISION_PRIORITY_RATIO``; 3: high 9, normal 3, low 1 of every
13 turns), so every tier keeps moving. The interactive lane (small jobs) stays ahead of all of
them, for jobs of the normal tier and above (:func:`takes_interactive_lane`). Pure: no I/O.
"""

from __future__ import annotations

import enum
from collections.abc import Hashable, Iterable, Mapping
from typing import Generic, TypeVar

from batchvision.core.errors import BatchvisionError

MIN_PRIORITY = 0
MAX_PRIORITY = 9
DEFAULT_PRIORITY = 5
#: The range as the error documents and the docs state it.
PRIORITY_RANGE = f"{MIN_PRIORITY} to {MAX_PRIORITY}"


class Tier(enum.IntEnum):
    """A queue's share of the worker: higher tiers are served first, in weighted turns."""

    LOW = 0
    NORMAL = 1
    HIGH = 2

    @property
    def suffix(self) -> str:
        """What the tier adds to a model's bulk queue name: '' for normal, so the default
        priority keeps the plain queue name that every worker consumes."""
        return "" if self is Tier.NORMAL else f".{self.name.lower()}"


def takes_interactive_lane(priority: int) -> bool:
    """Whether a small job of ``priority`` may go to the interactive lane, ahead of every tier:
    not one of the low tier, whose job says it can wait (or whose API key is capped there: the
    lane must not be a way around the cap)."""
    return tier_of(priority) is not Tier.LOW


#: Highest tier first: the order a worker lists its bulk queues and breaks ties in.
TIERS_DOWN = (Tier.HIGH, Tier.NORMAL, Tier.LOW)


def tier_of(priority: int) -> Tier:
    """The tier that serves ``priority``: 0-3 low, 4-6 normal, 7-9 high."""
    if priority <= 3:
        return Tier.LOW
    if priority <= 6:
        return Tier.NORMAL
    return Tier.HIGH


def tier_weights(ratio: int) -> dict[Tier, int]:
    """Each tier's turns: ``ratio`` times those of the tier below (``ratio`` 1: equal turns)."""
    return {tier: ratio ** int(tier) for tier in Tier}


class PriorityNotAllowed(BatchvisionError):
    """A priority out of the range, or above the API key's maximum: ``422`` naming the field
    and what is allowed."""

    status = 422
    code = "invalid_option"


def check_priority(priority: int | None, key_max: int = MAX_PRIORITY) -> int:
    """``priority`` (``None``: the default, lowered to ``key_max`` if that is below it) if it is
    in the range and at most ``key_max``, the caller's maximum; else :class:`PriorityNotAllowed`."""
    if priority is None:
        return min(DEFAULT_PRIORITY, key_max)
    if not MIN_PRIORITY <= priority <= MAX_PRIORITY:
        raise PriorityNotAllowed(
            f"priority={priority} is out of range; allowed priority: {PRIORITY_RANGE}",
            details=[{"in": "query", "field": "priority", "value": priority, "allowed": PRIORITY_RANGE}],
        )
    if priority > key_max:
        allowed = f"{MIN_PRIORITY} to {key_max}"
        raise PriorityNotAllowed(
            f"priority={priority} is above this API key's maximum of {key_max} (set by the "
            f"administrator); allowed priority: {allowed}",
            code="priority_not_allowed",
            details=[{"in": "query", "field": "priority", "value": priority, "allowed": allowed}],
        )
    return priority


K = TypeVar("K", bound=Hashable)


class WeightedTurns(Generic[K]):
    """Smooth weighted round robin (nginx's) over keys with integer weights: among the keys that
    have work (``active``), a key of weight ``w`` gets ``w`` of every ``sum(w)`` turns, spread
    out rather than in bursts. :meth:`peek` says whose turn it is; :meth:`take` uses the turn.

    Not thread-safe: the caller holds its own lock. Ties go to the key listed first in
    ``weights`` (list the highest tier first).
    """

    def __init__(self, weights: Mapping[K, int]) -> None:
        if not weights or any(w < 1 for w in weights.values()):
            raise ValueError("weights must be one or more positive integers")
        self.weights = dict(weights)
        self._current = dict.fromkeys(self.weights, 0)

    def _choose(self, active: Iterable[K]) -> tuple[K, list[K]]:
        wanted = set(active)
        keys = [k for k in self.weights if k in wanted]
        if not keys:
            raise ValueError("no active key")
        best = max(keys, key=lambda k: self._current[k] + self.weights[k])  # first of equals
        return best, keys

    def peek(self, active: Iterable[K]) -> K:
        """Whose turn it is among ``active`` (changes nothing)."""
        return self._choose(active)[0]

    def take(self, active: Iterable[K], used_by: K | None = None) -> K:
        """Use the turn among ``active``: returns whose it was. ``used_by``: the key that
        actually took it (one of ``active``), when that is not whose turn it was (its work came
        first where the turn's owner had none); it is charged instead."""
        best, keys = self._choose(active)
        if used_by is not None:
            if used_by not in keys:
                raise ValueError(f"{used_by!r} is not active")
            best = used_by
        for k in keys:
            self._current[k] += self.weights[k]
        self._current[best] -= sum(self.weights[k] for k in keys)
        return best
