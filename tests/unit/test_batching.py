"""The dynamic batcher: size cap, delay cap, reservations, the batch contract.

No test depends on how threads happen to be scheduled: delays that must not expire are set
far beyond any test's run time, and where the order of events matters, the test waits (with a
deadline) for the batcher to be in the state it needs before it goes on.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import pytest

from batchvision.core.batching import BatchInfo, DynamicBatcher
from batchvision.core.errors import BatchError

NEVER = 60.0  # a batch delay no test waits out: a batch runs because it is full or complete


def _collect(max_delay_s: float = NEVER) -> tuple[list[BatchInfo], DynamicBatcher[int, int]]:
    seen: list[BatchInfo] = []
    b: DynamicBatcher[int, int] = DynamicBatcher(
        lambda xs: [x * 10 for x in xs], max_batch_size=4, max_delay_s=max_delay_s, on_batch=seen.append
    )
    return seen, b


def _model_thread_waiting(b: DynamicBatcher[Any, Any]) -> bool:
    """The model thread is blocked on the batcher's condition: it has seen the queued items
    and decided to wait for more. (A notify takes a waiter off the list, so after a submit the
    list fills again only once the model thread has looked at the new state and waits again.)"""
    return bool(b._cond._waiters)  # type: ignore[attr-defined]


def test_results_map_back_to_their_items_and_batches_are_capped() -> None:
    seen, b = _collect()
    with b.reserve(10) as slot:
        futs = [slot.submit(i, tag=f"job{i % 3}") for i in range(10)]
    assert [f.result(5) for f in futs] == [i * 10 for i in range(10)]
    b.close()
    # Announced items are waited for, so batches are full until the reservation runs out.
    assert [i.size for i in seen] == [4, 4, 2]
    assert [len(set(i.tags)) for i in seen] == [3, 3, 2]  # batches mix jobs


def test_lone_item_is_not_held_for_the_delay() -> None:
    seen, b = _collect()
    with b.reserve(1) as slot:
        fut = slot.submit(7)
    assert fut.result(10) == 70  # well before the 60 s delay: nothing else was announced
    b.close()
    assert [i.size for i in seen] == [1]


def test_batch_waits_for_announced_items(wait_until: Callable[..., Any]) -> None:
    seen, b = _collect()
    futs: list[Future[int]] = []
    with b.reserve(3) as slot:
        for i in range(3):
            futs.append(slot.submit(i))
            if i < 2:
                # The model thread has seen the queued items and chose to wait: the
                # reservation, not the scheduler, keeps them together.
                wait_until(lambda: _model_thread_waiting(b), timeout=10, message="model thread waiting")
                assert not seen and not any(f.done() for f in futs)
    assert [f.result(10) for f in futs] == [0, 10, 20]
    b.close()
    assert [i.size for i in seen] == [3]


def test_batch_waits_for_announced_items_only_up_to_the_delay() -> None:
    seen, b = _collect(max_delay_s=0.3)
    with b.reserve(3) as slot:
        fut = slot.submit(1)
        # The other two announced items never come while the reservation is open: the
        # batch runs anyway once the delay has passed, and not before.
        assert fut.result(30) == 10
    b.close()
    assert [i.size for i in seen] == [1]
    assert seen[0].wait_s >= 0.3 - 1e-6


def test_unused_reservations_are_released() -> None:
    seen, b = _collect()
    with b.reserve(3) as slot:
        fut = slot.submit(1)  # the other two "failed to decode"
    assert fut.result(10) == 10  # released on exit: no 60 s wait for them
    b.close()
    assert [i.size for i in seen] == [1]


def test_failed_call_fails_every_item_and_the_next_batch_still_runs() -> None:
    calls: list[list[int]] = []

    def flaky(xs: list[int]) -> list[int]:
        calls.append(xs)
        if len(calls) == 1:
            raise RuntimeError("GPU fell over")
        return xs

    b: DynamicBatcher[int, int] = DynamicBatcher(flaky, max_batch_size=8, max_delay_s=NEVER)
    with b.reserve(3) as slot:
        futs = [slot.submit(i) for i in range(3)]
    for f in futs:
        with pytest.raises(BatchError, match="GPU fell over"):
            f.result(5)
    assert b.submit(5).result(5) == 5  # the model thread survived the failed call
    b.close()
    assert calls == [[0, 1, 2], [5]]


def test_wrong_output_length_is_an_error_not_a_silent_shift() -> None:
    b: DynamicBatcher[int, int] = DynamicBatcher(lambda xs: xs[:-1], max_batch_size=8, max_delay_s=NEVER)
    with b.reserve(2) as slot:
        futs = [slot.submit(1), slot.submit(2)]
    for f in futs:
        with pytest.raises(BatchError, match="1 outputs for a batch of 2"):
            f.result(5)
    b.close()


def test_many_threads_share_batches() -> None:
    seen: list[BatchInfo] = []
    tasks, per_task = 16, 4
    submitted = threading.Semaphore(0)
    first_call = threading.Event()

    def model(xs: list[int]) -> list[int]:
        if not first_call.is_set():
            # Hold the first call until every task has queued its images: the rest then
            # waits together, and batches fill from many tasks whatever the scheduling.
            first_call.set()
            for _ in range(tasks):
                assert submitted.acquire(timeout=10)
        return xs

    b: DynamicBatcher[int, int] = DynamicBatcher(
        model, max_batch_size=16, max_delay_s=NEVER, on_batch=seen.append
    )

    def task(n: int) -> list[int]:
        with b.reserve(per_task) as slot:
            futs = [slot.submit(n * per_task + k, tag=n) for k in range(per_task)]
        submitted.release()
        return [f.result(30) for f in futs]

    with ThreadPoolExecutor(tasks) as pool:
        outs = list(pool.map(task, range(tasks)))
    b.close()
    assert outs == [[n * per_task + k for k in range(per_task)] for n in range(tasks)]
    assert sum(i.size for i in seen) == tasks * per_task
    assert all(i.size <= 16 for i in seen)
    # After the first call, the waiting images go in full batches: far fewer model calls
    # than tasks (one per task without cross-task batching).
    assert len(seen) <= 1 + 4
    assert any(len(set(i.tags)) > 1 for i in seen)


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(lambda xs: xs, max_batch_size=0)


def test_closed_batcher_refuses_new_items() -> None:
    _, b = _collect()
    b.close()
    with pytest.raises(RuntimeError, match="closed"):
        b.submit(1)


def test_urgent_items_jump_the_queue_in_a_batch_of_their_own() -> None:
    seen: list[BatchInfo] = []
    running = threading.Event()
    gate = threading.Event()

    def slow(xs: list[int]) -> list[int]:
        running.set()
        assert gate.wait(10)
        return xs

    b: DynamicBatcher[int, int] = DynamicBatcher(
        slow, max_batch_size=4, max_delay_s=0.01, on_batch=seen.append
    )
    first = b.submit(0, tag="bulk")
    assert running.wait(10)  # the first batch occupies the model
    bulk = [b.submit(i, tag="bulk") for i in range(1, 9)]
    urgent = b.submit(99, tag="user", urgent=True)
    gate.set()
    assert urgent.result(5) == 99 and first.result(5) == 0
    assert [f.result(5) for f in bulk] == list(range(1, 9))
    b.close()
    assert [i.tags for i in seen[:2]] == [("bulk",), ("user",)]  # right after the running batch, alone
    assert [i.size for i in seen[2:]] == [4, 4]


def test_urgent_images_of_one_message_share_a_batch_and_a_lone_one_does_not_wait() -> None:
    seen: list[BatchInfo] = []
    # A delay far above the test's timeouts: only announced images may hold a batch back.
    b: DynamicBatcher[int, int] = DynamicBatcher(
        lambda xs: xs, max_batch_size=8, max_delay_s=30.0, on_batch=seen.append
    )
    with b.reserve(3) as slot:
        futures = [slot.submit(i, tag="m", urgent=True) for i in range(3)]
    assert [f.result(5) for f in futures] == [0, 1, 2]
    assert [i.size for i in seen] == [3]  # the first image waited for the two announced ones
    lone = b.submit(7, tag="lone", urgent=True)
    assert lone.result(5) == 7  # nothing announced: no wait for the 30 s delay
    b.close()
