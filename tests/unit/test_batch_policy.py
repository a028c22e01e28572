"""The batch policy on its own: every reading of the clock is passed in, so each test is a
fixed sequence of observations and decisions (no threads, no sleeping)."""

from __future__ import annotations

import pytest

from batchvision.core.batch_policy import STOPPED_GAPS, BatchPolicy, Forming, padded_sizes


def _policy(adaptive_max_s: float = 0.050, max_delay_s: float = 0.010) -> BatchPolicy:
    return BatchPolicy(32, max_delay_s, adaptive_max_s=adaptive_max_s, adaptive_fraction=0.5)


def _steady(p: BatchPolicy, gap_s: float, until: float, batch_run_s: float = 0.200) -> None:
    """Arrivals every ``gap_s`` up to ``until``, and a model that takes ``batch_run_s`` for
    a batch of 16 (so about 12.5 ms an image)."""
    t = 0.0
    while t <= until:
        p.arrived(t)
        t += gap_s
    p.ran(16, batch_run_s)


def test_a_full_batch_runs_at_once() -> None:
    p = _policy()
    _steady(p, 0.001, 1.0)
    assert p.wait_s(Forming(now=1.0, oldest=1.0, queued=32, reserved=5)) == 0.0


def test_announced_items_are_waited_for_up_to_the_delay_from_the_oldest() -> None:
    p = _policy(adaptive_max_s=0.0)
    assert p.wait_s(Forming(now=1.004, oldest=1.000, queued=3, reserved=2)) == pytest.approx(0.006)
    assert p.wait_s(Forming(now=1.011, oldest=1.000, queued=3, reserved=2)) == 0.0


def test_without_the_adaptive_budget_nothing_unannounced_is_waited_for() -> None:
    p = _policy(adaptive_max_s=0.0)
    _steady(p, 0.002, 1.0)
    assert p.wait_s(Forming(now=1.0, oldest=1.0, queued=4, reserved=0)) == 0.0


def test_a_steady_stream_is_waited_for_within_half_the_batch_run_time() -> None:
    p = _policy()
    _steady(p, 0.004, 1.0)  # 250 items/s; a batch of 5 takes about 62 ms
    wait = p.wait_s(Forming(now=1.0, oldest=0.998, queued=4, reserved=0))
    # Bounded by the stream stopping (two gaps after the last arrival) and by half the
    # model's time for a batch of 5 (31 ms) from the oldest item.
    assert 0 < wait <= STOPPED_GAPS * 0.004 + 1e-9
    # Arrivals keep coming: the wait goes on, each time until two gaps after the last one...
    for t in (1.004, 1.008, 1.012, 1.016, 1.020, 1.024):
        p.arrived(t)
    assert p.gap_s is not None
    more = p.wait_s(Forming(now=1.026, oldest=0.998, queued=10, reserved=0))
    assert more == pytest.approx(1.024 + STOPPED_GAPS * p.gap_s - 1.026)
    # ... until the budget from the oldest item ends it: half the model's time for a batch of 21
    # (131 ms), at most the adaptive maximum (50 ms).
    for t in (1.028, 1.032, 1.036, 1.040):
        p.arrived(t)
    last = p.wait_s(Forming(now=1.041, oldest=0.998, queued=20, reserved=0))
    assert last == pytest.approx(0.998 + 0.050 - 1.041)
    p.arrived(1.044)
    # The next arrival is due after the budget: run now.
    assert p.wait_s(Forming(now=1.045, oldest=0.998, queued=21, reserved=0)) == 0.0


def test_the_wait_is_capped_by_the_adaptive_maximum() -> None:
    p = _policy(adaptive_max_s=0.020)
    _steady(p, 0.001, 1.0, batch_run_s=2.0)  # a slow model: half of it would be a second
    wait = p.wait_s(Forming(now=1.0, oldest=0.995, queued=5, reserved=0))
    assert 0 < wait <= 0.015 + 1e-9


def test_at_idle_a_lone_request_runs_at_once() -> None:
    p = _policy()
    for t in (0.0, 1.0, 2.0, 3.0):  # one request a second: the next is far beyond the budget
        p.arrived(t)
    p.ran(1, 0.020)
    assert p.wait_s(Forming(now=3.0, oldest=3.0, queued=1, reserved=0)) == 0.0


def test_after_a_pause_the_first_request_runs_at_once() -> None:
    p = _policy()
    _steady(p, 0.002, 1.0)
    p.arrived(30.0)  # a long silence: the arrival gap moves far beyond the budget
    assert p.gap_s is not None and p.gap_s > 0.050
    assert p.wait_s(Forming(now=30.0, oldest=30.0, queued=1, reserved=0)) == 0.0


def test_a_stream_that_stopped_is_not_waited_for() -> None:
    # Closed-loop clients that are all in this batch: no arrival for two usual gaps.
    p = _policy()
    _steady(p, 0.002, 1.0)
    assert p.wait_s(Forming(now=1.0 + STOPPED_GAPS * 0.002 + 1e-6, oldest=0.99, queued=8, reserved=0)) == 0.0


def test_an_unmeasured_model_gets_no_adaptive_wait() -> None:
    p = _policy()
    for i in range(100):
        p.arrived(i * 0.001)
    assert p.run_time(4) is None
    assert p.wait_s(Forming(now=0.099, oldest=0.098, queued=3, reserved=0)) == 0.0


def test_run_time_scales_the_nearest_measured_size_and_follows_changes() -> None:
    p = _policy()
    p.ran(8, 0.080)
    p.ran(32, 0.200)
    assert p.run_time(8) == pytest.approx(0.080)
    assert p.run_time(4) == pytest.approx(0.040)
    assert p.run_time(30) == pytest.approx(0.200 * 30 / 32)
    for _ in range(100):  # the model got slower (another process took the cores)
        p.ran(8, 0.160)
    assert p.run_time(8) == pytest.approx(0.160, rel=1e-3)


@pytest.mark.parametrize(
    ("largest", "sizes"),
    [
        (1, (1,)),
        (5, (1, 2, 3, 4, 5)),
        (32, (1, 2, 4, 8, 12, 16, 20, 24, 28, 32)),
        (33, (1, 2, 4, 8, 12, 16, 20, 24, 28, 32, 33)),
        (256, (1, 2, 4, 8, 16, 32, 64, 96, 128, 160, 192, 224, 256)),
    ],
)
def test_padded_sizes_step_by_an_eighth_of_the_largest_batch(largest: int, sizes: tuple[int, ...]) -> None:
    assert padded_sizes(largest) == sizes


@pytest.mark.parametrize("largest", [1, 7, 32, 100, 256, 4096])
def test_a_batch_wastes_at_most_an_eighth_of_the_largest_in_padding(largest: int) -> None:
    sizes = padded_sizes(largest)
    assert sizes[-1] == largest and len(sizes) <= 8 + largest.bit_length()
    for n in range(1, largest + 1):
        padded = next(s for s in sizes if s >= n)
        assert padded - n < max(1, largest // 8), (n, padded)
