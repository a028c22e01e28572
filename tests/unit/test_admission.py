"""Admission: a worker holds a bounded number of images, interactive requests first."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from batchvision.core.batching import Admission, Places, Uncounted


def _hold(adm: Admission, n: int, urgent: bool, entered: threading.Event, leave: threading.Event) -> None:
    with adm.admit(n, urgent):
        entered.set()
        assert leave.wait(10)


def test_urgent_requests_overtake_waiting_bulk_ones(wait_until: Callable[..., Any]) -> None:
    adm = Admission(limit=2)
    events = {name: (threading.Event(), threading.Event()) for name in ("first", "bulk", "urgent")}
    threads = {}
    for name, urgent in (("first", False), ("bulk", False), ("urgent", True)):
        entered, leave = events[name]
        threads[name] = threading.Thread(target=_hold, args=(adm, 2, urgent, entered, leave))
        threads[name].start()
        if name == "first":
            assert entered.wait(10)
        else:
            wait_until(lambda u=urgent: adm.waiting()[0 if u else 1] == 1)
    events["first"][1].set()  # the first holder leaves: room for one more request of 2
    assert events["urgent"][0].wait(10)
    # The bulk request arrived earlier but still waits: the urgent one was admitted first.
    assert not events["bulk"][0].is_set() and adm.waiting() == (0, 1) and adm.held == 2
    events["urgent"][1].set()
    assert events["bulk"][0].wait(10)
    events["bulk"][1].set()
    for t in threads.values():
        t.join(10)
    assert adm.held == 0


def test_a_request_larger_than_the_limit_runs_alone() -> None:
    adm = Admission(limit=4)
    with adm.admit(10):
        assert adm.held == 10
    assert adm.held == 0


def test_requests_within_the_limit_share_it() -> None:
    adm = Admission(limit=4)
    with adm.admit(2), adm.admit(2, urgent=True):
        assert adm.held == 4


def test_invalid_limit() -> None:
    with pytest.raises(ValueError):
        Admission(limit=0)


def test_lent_places_let_another_request_in_and_are_taken_back_in_line(
    wait_until: Callable[..., Any],
) -> None:
    adm = Admission(limit=4)
    entered, leave = threading.Event(), threading.Event()
    with adm.admit(4) as places:
        other = threading.Thread(target=_hold, args=(adm, 2, False, entered, leave))
        other.start()
        wait_until(lambda: adm.waiting() == (0, 1))
        places.lend(2)  # two images wait for their URLs: their places serve the other request
        assert entered.wait(10) and adm.held == 4 and places.held == 2
        taken = threading.Event()
        taker = threading.Thread(target=lambda: (places.take(), taken.set()))
        taker.start()
        wait_until(lambda: adm.waiting() == (0, 1))  # a fetched image waits in line for a place
        assert not taken.is_set()
        leave.set()
        assert taken.wait(10) and places.held == 3
        other.join(10)
        taker.join(10)
        assert adm.held == 3
    assert adm.held == 0 and places.closed


def test_a_take_waits_at_most_take_wait_s_then_goes_over_the_limit(monkeypatch: pytest.MonkeyPatch) -> None:
    # Slots held by requests that themselves wait for the image taking one must not stall it
    # for good: it goes in over the limit (its bytes are in memory already).
    monkeypatch.setattr(Places, "TAKE_WAIT_S", 0.2)
    adm = Admission(limit=2)
    with adm.admit(1) as mine, adm.admit(1):
        mine.lend()
        with adm.admit(1):
            mine.take()
            assert adm.held == 3 and mine.held == 1
    assert adm.held == 0


def test_lending_more_than_is_held_and_taking_after_the_end_leave_the_count_right() -> None:
    adm = Admission(limit=4)
    with adm.admit(2) as places:
        places.lend(5)
        assert places.held == 0 and adm.held == 0
    places.take()  # a fetch that completes after its request failed
    assert adm.held == 0


def test_uncounted_places_change_nothing() -> None:
    places = Uncounted()
    places.lend(3)
    places.take(2)
    assert places.held == 0


def test_busy_says_whether_a_request_would_wait(wait_until: Callable[..., Any]) -> None:
    adm = Admission(limit=4)
    assert not adm.busy(4) and not adm.busy(9)  # nothing held: even an oversized one goes in
    entered, leave = threading.Event(), threading.Event()
    holder = threading.Thread(target=_hold, args=(adm, 3, False, entered, leave))
    holder.start()
    assert entered.wait(10)
    assert not adm.busy(1) and adm.busy(2)  # 3 of 4 held
    waiter_in, waiter_leave = threading.Event(), threading.Event()
    waiter = threading.Thread(target=_hold, args=(adm, 2, False, waiter_in, waiter_leave))
    waiter.start()
    wait_until(lambda: adm.waiting() == (0, 1))
    assert adm.busy(1)  # a slot is free, but a request waits ahead of it
    leave.set()
    assert waiter_in.wait(10)
    waiter_leave.set()
    for t in (holder, waiter):
        t.join(10)
    assert not adm.busy(4)
