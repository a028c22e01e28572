"""Parking: a key runs at most its share of URL chunks in one worker process; the rest wait in
memory, oldest first, and go back to the queue as the key's chunks finish."""

from __future__ import annotations

from batchvision.server.messages import Chunk
from batchvision.server.parking import Parked, Parking


def item(owner: str, n: int) -> Parked:
    return Parked(Chunk.of(f"job-{owner}", range(16 * n, 16 * n + 16)), owner, "demo", False, 5)


def test_a_key_beyond_its_share_is_parked_and_other_keys_are_not() -> None:
    parking = Parking(per_key=2)
    assert parking.enter(item("a", 0)) and parking.enter(item("a", 1))
    assert not parking.enter(item("a", 2)) and not parking.enter(item("a", 3))
    assert parking.enter(item("b", 0)) and parking.enter(item("b", 1))
    assert parking.parked() == 2


def test_each_finish_sends_back_the_oldest_parked_chunk_of_its_key() -> None:
    parking = Parking(per_key=2)
    for n in range(5):
        parking.enter(item("a", n))
    parking.enter(item("b", 0))
    assert parking.leave("b") == []  # another key's finish frees nothing of a's
    assert parking.leave("a") == [item("a", 2)]
    # the chunk sent back does not hold the room: a newer chunk of the key may take it first
    assert parking.enter(item("a", 9))
    assert not parking.enter(item("a", 2))  # arrived again: parked again, at the back
    assert parking.leave("a") == [item("a", 3)]
    assert parking.enter(item("a", 3))  # it arrives: room for it
    assert parking.leave("a") == [item("a", 4)]
    assert parking.enter(item("a", 4))
    assert parking.leave("a") == [item("a", 2)]
    assert parking.parked() == 0
    assert parking.enter(item("a", 5))  # the key runs its share again
    assert not any(parking.enter(item("a", n)) for n in (6, 7, 8))
    assert parking.leave("a") == [item("a", 6)]
    # the last running chunk finishes: room for two, sent back at once
    assert parking.leave("a") == [item("a", 7), item("a", 8)]
    assert parking.parked() == 0


def test_a_second_delivery_of_a_parked_chunk_is_dropped() -> None:
    parking = Parking(per_key=1)
    parking.enter(item("a", 0))
    assert not parking.enter(item("a", 1))
    assert not parking.enter(item("a", 1))  # the sweep re-sent it while it waited here
    assert parking.parked() == 1
    assert parking.leave("a") == [item("a", 1)]


def test_the_key_of_an_api_without_keys_is_never_parked_or_counted() -> None:
    parking = Parking(per_key=1)
    assert all(parking.enter(item("", n)) for n in range(5))
    assert parking.leave("") == [] and parking.parked() == 0


def test_drain_returns_every_parked_chunk_once() -> None:
    parking = Parking(per_key=1)
    for owner in ("a", "b"):
        for n in range(3):
            parking.enter(item(owner, n))
    drained = parking.drain()
    assert sorted(drained, key=lambda p: (p.owner, p.chunk.first)) == [
        item(o, n) for o in ("a", "b") for n in (1, 2)
    ]
    assert parking.parked() == 0 and parking.drain() == []
