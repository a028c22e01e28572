"""Admission: a worker holds a bounded number of images, interactive requests first."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from batchvision.core.batching import Admission


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
