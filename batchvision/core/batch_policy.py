"""How long a forming batch waits: a pure policy fed by what the batcher observes.

Two reasons to wait, each within its own budget, counted from the oldest item of the batch:

- **Announced items** (a task reserved images it is still decoding): wait for them, up to
  ``max_delay_s``. They are sure to come.
- **Unannounced arrivals** (closed-loop clients: the next requests are still in HTTP, the
  API or the queue, so nothing announces them): wait only while an arrival is *expected*:
  the arrival rate says the next item comes within the budget, and the stream has not stopped
  (nothing for twice the usual gap means the clients are all waiting on this batch). The budget
  is ``adaptive_fraction`` of what the model takes for the batch (measured, per batch size),
  at most ``adaptive_max_s``: a wait costs a small share of the batch's own latency, on a slow
  CPU model as on a fast GPU one. At idle the gap between arrivals is long, so a lone request
  runs at once; an unmeasured model gets no adaptive wait.

Like Triton's ``max_queue_delay`` (bounded wait for a fuller batch) and BentoML's adaptive
batching (the model's time per batch size, learnt from the batches run). Pure and
deterministic: the caller passes the clock's readings in, so tests need no sleeping.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Padded batch sizes come in steps of this share of the largest batch (powers of two below).
PAD_STEPS = 8

#: Weight of the newest observation in the moving averages (arrival gap, run time per size).
SMOOTHING = 0.1
#: The stream of arrivals has stopped when nothing came for this many usual gaps.
STOPPED_GAPS = 2.0


def padded_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a model runs: each batch is padded to the next of them, so kernels (and
    oneDNN's primitive cache, or XLA's compilations) see a few shapes, not one per size.

    Powers of two up to an eighth of ``max_batch_size``, then every eighth: for 32, 1 2 4 8 12
    16 20 24 28 32. A batch wastes at most an eighth of the largest batch in padding (with
    powers of two alone, 17 images ran as 32)."""
    step = max(1, max_batch_size // PAD_STEPS)
    small = {2**k for k in range(step.bit_length()) if 2**k < step}
    return tuple(sorted(small | set(range(step, max_batch_size + 1, step)) | {max_batch_size}))


@dataclass(frozen=True)
class Forming:
    """The batch being formed, as the model thread sees it when it decides."""

    now: float
    oldest: float  # when its oldest item was queued
    queued: int  # items ready in its line
    reserved: int  # items announced, not yet submitted


class BatchPolicy:
    """Learns the arrival gap and the model's run time per batch size; says how long to wait."""

    def __init__(
        self,
        max_batch_size: int,
        max_delay_s: float,
        *,
        adaptive_max_s: float = 0.0,
        adaptive_fraction: float = 0.5,
    ) -> None:
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_s
        self.adaptive_max_s = adaptive_max_s
        self.adaptive_fraction = adaptive_fraction
        self.gap_s: float | None = None  # moving average of the time between arrivals
        self.last_arrival: float | None = None
        self._run_s: dict[int, float] = {}  # batch size -> moving average of its run time

    # -- observations ------------------------------------------------------------------------

    def arrived(self, now: float) -> None:
        """An item was queued at ``now``."""
        if self.last_arrival is not None:
            gap = max(0.0, now - self.last_arrival)
            self.gap_s = gap if self.gap_s is None else self.gap_s + SMOOTHING * (gap - self.gap_s)
        self.last_arrival = now

    def ran(self, size: int, run_s: float) -> None:
        """A batch of ``size`` items took ``run_s`` seconds in the model."""
        old = self._run_s.get(size)
        self._run_s[size] = run_s if old is None else old + SMOOTHING * (run_s - old)

    def run_time(self, size: int) -> float | None:
        """Expected model time of a batch of ``size``: the nearest measured size, scaled."""
        if not self._run_s:
            return None
        near = min(self._run_s, key=lambda s: (abs(s - size), -s))
        return self._run_s[near] * size / near

    # -- the decision --------------------------------------------------------------------------

    def wait_s(self, b: Forming) -> float:
        """Seconds to wait for more items before running the batch (0: run it now)."""
        if b.queued >= self.max_batch_size:
            return 0.0
        if b.reserved > 0:
            return max(0.0, b.oldest + self.max_delay_s - b.now)
        return self._adaptive(b)

    def _adaptive(self, b: Forming) -> float:
        gap, last = self.gap_s, self.last_arrival
        run = self.run_time(b.queued + 1)
        if self.adaptive_max_s <= 0 or gap is None or last is None or run is None:
            return 0.0
        deadline = b.oldest + min(self.adaptive_max_s, self.adaptive_fraction * run)
        stopped = last + STOPPED_GAPS * gap  # no arrival by then: the clients all wait on us
        expected = max(b.now, last + gap)  # when the next item should come
        if expected > deadline or b.now >= stopped:
            return 0.0
        return max(0.0, min(deadline, stopped) - b.now)
