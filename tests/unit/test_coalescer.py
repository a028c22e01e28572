"""The coalescer: small chunks of concurrent requests share one message, idle ones do not wait."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import pytest

from batchvision.server.coalescer import Coalescer


def test_an_idle_submit_is_sent_at_once_even_with_a_long_linger() -> None:
    sent: list[list[str]] = []
    c: Coalescer[str] = Coalescer(sent.append, max_weight=32, linger_s=60.0)
    c.submit("a", timeout_s=10.0)  # a linger applied at idle would time out here
    assert sent == [["a"]]


def test_items_arriving_while_a_message_is_sent_share_the_next_one(wait_until: Callable[..., Any]) -> None:
    sent: list[list[str]] = []
    release = threading.Event()
    first_started = threading.Event()

    def send(items: list[str]) -> None:
        if not sent:
            first_started.set()
            assert release.wait(10)
        sent.append(items)

    c: Coalescer[str] = Coalescer(send, max_weight=3, linger_s=60.0)
    first = threading.Thread(target=c.submit, args=("a",))
    first.start()
    assert first_started.wait(10)
    others = [threading.Thread(target=c.submit, args=(x,)) for x in "bcd"]
    for t in others:
        t.start()
    wait_until(lambda: c.pending() == 3)
    release.set()
    for t in [first, *others]:
        t.join(10)
    # Under load the next message waits (up to the linger) until it is full: three items.
    assert sent[0] == ["a"]
    assert sorted(sent[1]) == ["b", "c", "d"] and len(sent) == 2
    assert (c.messages, c.items) == (2, 4)


def test_weights_bound_a_message_and_a_heavy_item_goes_alone(wait_until: Callable[..., Any]) -> None:
    sent: list[list[int]] = []
    gate = threading.Event()
    started = threading.Event()

    def send(items: list[int]) -> None:
        if not sent and not gate.is_set():
            started.set()
            gate.wait(10)
        sent.append(items)

    c: Coalescer[int] = Coalescer(send, max_weight=4, linger_s=0.0, weight=lambda n: n)
    blocker = threading.Thread(target=c.submit, args=(1,))
    blocker.start()
    assert started.wait(10)
    worker = threading.Thread(target=c.submit_many, args=([3, 1, 9, 2],))
    worker.start()
    wait_until(lambda: c.pending() == 4)
    gate.set()
    blocker.join(10)
    worker.join(10)
    assert sent == [[1], [3, 1], [9], [2]]


def test_a_failed_send_raises_in_every_caller_of_that_message() -> None:
    def send(items: list[str]) -> None:
        raise ConnectionError("broker down")

    c: Coalescer[str] = Coalescer(send, max_weight=8, linger_s=0.0)
    with pytest.raises(ConnectionError, match="broker down"):
        c.submit("a", timeout_s=10)
    with pytest.raises(ConnectionError):
        c.submit_many(["b", "c"], timeout_s=10)
    assert c.messages == 2  # the thread survived the first error


def test_a_send_that_never_returns_times_the_caller_out() -> None:
    hang = threading.Event()
    c: Coalescer[str] = Coalescer(lambda items: hang.wait(30) and None, max_weight=8, linger_s=0.0)
    with pytest.raises(TimeoutError):
        c.submit("a", timeout_s=0.2)
    hang.set()
