"""The dynamic batcher: size cap, delay cap, reservations, the batch contract."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from batchvision.core.batching import BatchInfo, DynamicBatcher
from batchvision.core.errors import BatchError


def _collect() -> tuple[list[BatchInfo], DynamicBatcher[int, int]]:
    seen: list[BatchInfo] = []
    b: DynamicBatcher[int, int] = DynamicBatcher(
        lambda xs: [x * 10 for x in xs], max_batch_size=4, max_delay_s=0.2, on_batch=seen.append
    )
    return seen, b


def test_results_map_back_to_their_items_and_batches_are_capped() -> None:
    seen, b = _collect()
    with b.reserve(10) as slot:
        futs = [slot.submit(i, tag=f"job{i % 3}") for i in range(10)]
    assert [f.result(5) for f in futs] == [i * 10 for i in range(10)]
    b.close()
    assert sum(i.size for i in seen) == 10
    assert max(i.size for i in seen) <= 4
    assert any(len(set(i.tags)) > 1 for i in seen)  # batches mix jobs


def test_lone_item_is_not_held_for_the_delay() -> None:
    seen, b = _collect()
    b.max_delay_s = 5.0
    start = time.monotonic()
    with b.reserve(1) as slot:
        fut = slot.submit(7)
    assert fut.result(2) == 70
    assert time.monotonic() - start < 1.0
    b.close()


def test_batch_waits_for_announced_items_up_to_the_delay() -> None:
    seen, b = _collect()
    b.max_delay_s = 1.0

    def producer() -> None:
        with b.reserve(3) as slot:
            for i in range(3):
                slot.submit(i)
                time.sleep(0.05)

    t = threading.Thread(target=producer)
    t.start()
    t.join()
    time.sleep(0.1)
    b.close()
    assert [i.size for i in seen] == [3]


def test_unused_reservations_are_released() -> None:
    seen, b = _collect()
    b.max_delay_s = 5.0
    start = time.monotonic()
    with b.reserve(3) as slot:
        fut = slot.submit(1)  # the other two "failed to decode"
    assert fut.result(3) == 10
    assert time.monotonic() - start < 1.0
    b.close()


def test_failed_call_fails_every_item() -> None:
    def boom(xs: list[int]) -> list[int]:
        raise RuntimeError("GPU fell over")

    b: DynamicBatcher[int, int] = DynamicBatcher(boom, max_batch_size=8, max_delay_s=0.01)
    futs = [b.submit(i) for i in range(3)]
    for f in futs:
        with pytest.raises(BatchError, match="GPU fell over"):
            f.result(5)
    b.close()


def test_wrong_output_length_is_an_error_not_a_silent_shift() -> None:
    b: DynamicBatcher[int, int] = DynamicBatcher(lambda xs: xs[:-1], max_batch_size=8, max_delay_s=0.05)
    with b.reserve(2) as slot:
        futs = [slot.submit(1), slot.submit(2)]
    for f in futs:
        with pytest.raises(BatchError, match="outputs for a batch of"):
            f.result(5)
    b.close()


def test_many_threads_share_batches() -> None:
    seen: list[BatchInfo] = []

    def slow(xs: list[int]) -> list[int]:
        time.sleep(0.02)
        return xs

    b: DynamicBatcher[int, int] = DynamicBatcher(
        slow, max_batch_size=16, max_delay_s=0.05, on_batch=seen.append
    )

    def task(n: int) -> list[int]:
        with b.reserve(4) as slot:
            futs = [slot.submit(n * 4 + k, tag=n) for k in range(4)]
        return [f.result(10) for f in futs]

    with ThreadPoolExecutor(8) as pool:
        outs = list(pool.map(task, range(16)))
    b.close()
    assert outs == [[n * 4 + k for k in range(4)] for n in range(16)]
    assert sum(i.size for i in seen) == 64
    assert len(seen) < 16  # far fewer model calls than tasks


def test_rejects_bad_config() -> None:
    with pytest.raises(ValueError):
        DynamicBatcher(lambda xs: xs, max_batch_size=0)


def test_urgent_items_jump_the_queue_in_a_batch_of_their_own() -> None:
    seen: list[BatchInfo] = []
    gate = threading.Event()

    def slow(xs: list[int]) -> list[int]:
        gate.wait(5)
        return xs

    b: DynamicBatcher[int, int] = DynamicBatcher(
        slow, max_batch_size=4, max_delay_s=0.01, on_batch=seen.append
    )
    first = b.submit(0, tag="bulk")  # occupies the model
    time.sleep(0.05)
    bulk = [b.submit(i, tag="bulk") for i in range(1, 9)]
    urgent = b.submit(99, tag="user", urgent=True)
    gate.set()
    assert urgent.result(5) == 99 and first.result(5) == 0
    assert [f.result(5) for f in bulk] == list(range(1, 9))
    b.close()
    assert seen[1].tags == ("user",)  # right after the running batch, alone
