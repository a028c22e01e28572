"""Parking: a key runs at most its share of messages with URL chunks in one worker process;
the rest wait in memory, parked once their message's results are stored, and go back to the
queue as the key's messages finish here: the oldest for each finish, all of them once none of
the key's messages runs here."""

from __future__ import annotations

import random
from collections import deque

import pytest

from batchvision.server.messages import Chunk
from batchvision.server.parking import Entry, Parked, Parking

RUN, PARKED, BACK = Entry.RUN, Entry.PARKED, Entry.BACK


def item(owner: str, n: int) -> Parked:
    return Parked(Chunk.of(f"job-{owner}", range(16 * n, 16 * n + 16)), owner, "demo", False, 5)


def park(parking: Parking, *items: Parked) -> list[Parked]:
    """What a message does: decide, then (its results stored) add what waits."""
    waiting = [i for i in items if parking.decide(i) is not RUN]
    return parking.add(waiting)


def test_a_key_beyond_its_share_waits_and_other_keys_do_not() -> None:
    parking = Parking(per_key=2)
    assert [parking.decide(item("a", n)) for n in range(4)] == [RUN, RUN, PARKED, PARKED]
    assert [parking.decide(item("b", n)) for n in range(2)] == [RUN, RUN]
    assert parking.parked() == 0  # nothing is parked before its message's results are stored
    assert parking.add([item("a", 2), item("a", 3)]) == [] and parking.parked() == 2


def test_each_finish_sends_back_the_oldest_parked_chunk_of_its_key() -> None:
    parking = Parking(per_key=2)
    assert park(parking, *(item("a", n) for n in range(5))) == []
    parking.decide(item("b", 0))
    assert parking.leave("b") == []  # another key's finish frees nothing of a's
    assert parking.leave("a") == [item("a", 2)]
    # the chunk sent back does not hold the room: a newer chunk of the key may take it first
    assert parking.decide(item("a", 9)) is RUN
    assert park(parking, item("a", 2)) == []  # arrived again: parked again, at the back
    assert parking.leave("a") == [item("a", 3)]
    assert parking.decide(item("a", 3)) is RUN  # it arrives: room for it
    assert parking.leave("a") == [item("a", 4)]
    assert parking.parked() == 1


def test_when_none_of_the_key_runs_here_every_parked_chunk_goes_back() -> None:
    # The chunks sent back may run in other processes: none may wait here for a finish that
    # will not come.
    parking = Parking(per_key=2)
    park(parking, *(item("a", n) for n in range(6)))
    assert parking.leave("a") == [item("a", 2)]
    assert parking.leave("a") == [item("a", n) for n in (3, 4, 5)]
    assert parking.parked() == 0


def test_a_chunk_whose_key_stopped_running_before_its_message_stored_goes_back_at_once() -> None:
    # Another thread's finish took the key's last running message between the decision and
    # the add: parked now, nothing would ever send it back.
    parking = Parking(per_key=1)
    assert parking.decide(item("a", 0)) is RUN and parking.decide(item("a", 1)) is PARKED
    assert parking.leave("a") == []
    assert parking.add([item("a", 1)]) == [item("a", 1)] and parking.parked() == 0


def test_a_second_delivery_of_a_parked_chunk_waits_and_is_not_parked_twice() -> None:
    parking = Parking(per_key=1)
    park(parking, item("a", 0), item("a", 1))
    assert parking.is_parked(item("a", 1).chunk)
    assert parking.decide(item("a", 1)) is PARKED  # the sweep re-sent it while it waited here
    assert parking.add([item("a", 1)]) == [] and parking.parked() == 1
    assert parking.leave("a") == [item("a", 1)]


def test_the_key_of_an_api_without_keys_is_never_parked_or_counted() -> None:
    parking = Parking(per_key=1)
    assert all(parking.decide(item("", n)) is RUN for n in range(5))
    assert parking.leave("") == [] and parking.parked() == 0


def test_drain_returns_every_parked_chunk_once_and_then_nothing_parks() -> None:
    parking = Parking(per_key=1)
    for owner in ("a", "b"):
        park(parking, *(item(owner, n) for n in range(3)))
    drained = parking.drain()
    assert sorted(drained, key=lambda p: (p.owner, p.chunk.first)) == [
        item(o, n) for o in ("a", "b") for n in (1, 2)
    ]
    assert parking.parked() == 0 and parking.drain() == []
    # stopping: over the share, a chunk goes back at once; within it, it still runs
    assert parking.decide(item("a", 7)) is BACK
    assert parking.add([item("a", 7)]) == [item("a", 7)] and parking.parked() == 0
    parking.leave("a")
    assert parking.decide(item("a", 8)) is RUN


@pytest.mark.parametrize("processes", [2, 4, 8])
def test_processes_sharing_a_queue_strand_no_parked_chunk(processes: int) -> None:
    # Chunks sent back go to the shared queue and any process may take them: a process whose
    # last message of the key finishes must not keep parked chunks nobody will release. Many
    # seeded interleavings of takes and finishes; each chunk must run exactly once.
    for seed in range(100):
        rng = random.Random(seed)
        workers = [Parking(per_key=2) for _ in range(processes)]
        queue = deque(item("a", n) for n in range(40))
        running: list[list[Parked]] = [[] for _ in workers]
        ran: list[Parked] = []
        while queue or any(running):
            w = rng.randrange(processes)
            if queue and (not running[w] or rng.random() < 0.5):
                got = queue.popleft()
                if workers[w].decide(got) is RUN:
                    running[w].append(got)
                else:
                    queue.extend(workers[w].add([got]))
            elif running[w]:
                ran.append(running[w].pop(rng.randrange(len(running[w]))))
                queue.extend(workers[w].leave("a"))
        stranded = [p.parked() for p in workers]
        assert stranded == [0] * processes, (seed, stranded)
        assert sorted(p.chunk.first for p in ran) == [16 * n for n in range(40)], seed
