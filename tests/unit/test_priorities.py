"""Per-job priorities, the pure parts: the range and the per-key maximum, the tiers and their
queues, the weighted turns (shares, spread, no starvation), the Redis queue cycle against a
simulated ``BRPOP``, the worker's admission, the message codec and the settings."""

from __future__ import annotations

import threading
from collections import Counter, deque
from collections.abc import Callable
from typing import Any

import pytest

from batchvision.core import settings as settings_module
from batchvision.core.batching import Admission
from batchvision.core.model_refs import JobOptions, resolve_options
from batchvision.core.priorities import (
    DEFAULT_PRIORITY,
    PriorityNotAllowed,
    Tier,
    WeightedTurns,
    check_priority,
    takes_interactive_lane,
    tier_of,
    tier_weights,
)
from batchvision.core.settings import Settings, SettingsError, key_digest, owner_of
from batchvision.server.messages import Chunk, ClassifyMessage, MessageError
from batchvision.server.routing import queue_for, tier_of_queue, worker_queues
from batchvision.server.turns import TierCycle

# -- range, per-key maximum ---------------------------------------------------------------------


def test_the_range_is_0_to_9_and_the_default_is_5() -> None:
    assert check_priority(None) == DEFAULT_PRIORITY == 5
    assert [check_priority(p) for p in (0, 9)] == [0, 9]
    for bad in (-1, 10, 255):
        with pytest.raises(PriorityNotAllowed) as info:
            check_priority(bad)
        assert info.value.status == 422 and info.value.code == "invalid_option"
        assert info.value.details == [{"in": "query", "field": "priority", "value": bad, "allowed": "0 to 9"}]
        assert "allowed priority: 0 to 9" in info.value.message


def test_above_the_keys_maximum_is_refused_naming_what_the_key_may_ask() -> None:
    assert check_priority(3, key_max=3) == 3
    with pytest.raises(PriorityNotAllowed) as info:
        check_priority(4, key_max=3)
    assert info.value.status == 422 and info.value.code == "priority_not_allowed"
    assert info.value.details[0]["allowed"] == "0 to 3" and "maximum of 3" in info.value.message
    # A job that names no priority gets the default, or the key's maximum when that is lower.
    assert check_priority(None, key_max=2) == 2 and check_priority(None, key_max=7) == 5


def test_options_carry_the_priority_through_the_job_hash() -> None:
    opts = resolve_options(
        model=None, top_k=None, min_score=None, default_model="m", default_top_k=5, known={}, priority=8
    )
    assert opts.priority == 8
    assert JobOptions.from_hash(opts.to_hash(), "m", 5) == opts
    # A job stored before priorities existed has the default.
    assert JobOptions.from_hash({"model": "m"}, "m", 5).priority == DEFAULT_PRIORITY
    with pytest.raises(PriorityNotAllowed):
        resolve_options(
            model=None,
            top_k=None,
            min_score=None,
            default_model="m",
            default_top_k=5,
            known={},
            priority=9,
            max_priority=6,
        )


def test_settings_give_each_key_its_maximum() -> None:
    digest = key_digest("key-b")
    s = Settings.from_env(
        {"BATCHVISION_MAX_PRIORITY": "5", "BATCHVISION_KEY_MAX_PRIORITY": f"key-a=9, {digest}=2"}
    )
    assert s.max_priority_of(owner_of(key_digest("key-a"))) == 9
    assert s.max_priority_of(owner_of(digest)) == 2
    assert s.max_priority_of(owner_of(key_digest("other"))) == 5
    assert s.max_priority_of("") == 5  # no API keys: the one tenant
    assert "key-a" not in repr(s)  # a secret


def test_the_key_maxima_are_parsed_once_per_value(monkeypatch: pytest.MonkeyPatch) -> None:
    raw = "key-parsed-once=8"  # a value of this test alone: nothing cached it before
    s = Settings.from_env({"BATCHVISION_KEY_MAX_PRIORITY": raw})
    parsed: list[str] = []
    parse = settings_module.key_max_priorities
    monkeypatch.setattr(settings_module, "key_max_priorities", lambda v: parsed.append(v) or parse(v))
    owner = owner_of(key_digest("key-parsed-once"))
    assert [s.max_priority_of(owner) for _ in range(3)] == [8, 8, 8]
    assert s.model_copy(update={"max_priority": 4}).max_priority_of("other") == 4
    assert parsed == [raw], "parsed on the first request only"


@pytest.mark.parametrize("raw", ["key-a", "key-a=10", "=3", "key-a=x", "key-a=-1"])
def test_a_bad_key_maximum_stops_the_settings_without_showing_the_key(raw: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"BATCHVISION_KEY_MAX_PRIORITY": raw})
    text = str(info.value)
    assert "BATCHVISION_KEY_MAX_PRIORITY=(secret)" in text and "KEY=MAX with MAX from 0 to 9" in text
    assert "key-a" not in text


def test_a_queue_name_may_not_end_like_a_lane() -> None:
    for name in ("jobs.high", "jobs.low", "jobs.interactive"):
        with pytest.raises(SettingsError):
            Settings.from_env({"BATCHVISION_QUEUE": name})


# -- tiers and queues -------------------------------------------------------------------------------


def test_tiers_and_their_queues() -> None:
    assert [tier_of(p) for p in range(10)] == [Tier.LOW] * 4 + [Tier.NORMAL] * 3 + [Tier.HIGH] * 3
    s = Settings.from_env({}, model="shapes")
    assert [queue_for(s, None, False, p) for p in (0, 5, 9)] == [
        "batchvision.low",
        "batchvision",
        "batchvision.high",
    ]
    assert queue_for(s, "colours", False, 9) == "batchvision.colours.high"
    assert queue_for(s, "colours", True, 9) == "batchvision.colours.interactive"  # one lane
    assert [tier_of_queue(q) for q in worker_queues(s, ["shapes", "colours"])] == [
        None,
        None,
        Tier.HIGH,
        Tier.HIGH,
        Tier.NORMAL,
        Tier.NORMAL,
        Tier.LOW,
        Tier.LOW,
    ]


# -- weighted turns ---------------------------------------------------------------------------


def _turns(ratio: int = 3) -> WeightedTurns[Tier]:
    return WeightedTurns({t: tier_weights(ratio)[t] for t in (Tier.HIGH, Tier.NORMAL, Tier.LOW)})


def test_every_tier_gets_its_share_spread_out() -> None:
    turns = _turns()
    everyone = set(Tier)
    taken = [turns.take(everyone) for _ in range(13 * 10)]
    assert Counter(taken) == {Tier.HIGH: 90, Tier.NORMAL: 30, Tier.LOW: 10}
    # Spread, not in bursts: the low tier never waits more than one round of 13 turns.
    lows = [i for i, t in enumerate(taken) if t is Tier.LOW]
    assert max(b - a for a, b in zip(lows, lows[1:], strict=False)) <= 13
    assert taken[0] is Tier.HIGH  # ties go to the highest tier


def test_only_the_tiers_that_wait_share_the_turns() -> None:
    turns = _turns()
    taken = [turns.take({Tier.HIGH, Tier.LOW}) for _ in range(100)]
    assert Counter(taken) == {Tier.HIGH: 90, Tier.LOW: 10}
    assert [turns.take({Tier.LOW}) for _ in range(5)] == [Tier.LOW] * 5  # alone: every turn
    # Ratio 1: equal turns (the tiers alternate).
    equal = _turns(1)
    assert Counter(equal.take(set(Tier)) for _ in range(30)) == {t: 10 for t in Tier}


def test_peek_changes_nothing() -> None:
    turns = _turns()
    assert {turns.peek(set(Tier)) for _ in range(5)} == {Tier.HIGH}
    with pytest.raises(ValueError):
        turns.peek(set())
    with pytest.raises(ValueError):
        WeightedTurns({Tier.LOW: 0})


# -- the Redis queue cycle against a simulated BRPOP ---------------------------------------------------


def _brpop(cycle: TierCycle, lists: dict[str, deque[str]]) -> str | None:
    """What one BRPOP over the cycle's order answers (the first list with a message), and the
    rotate kombu then calls."""
    for queue in cycle.consume(len(cycle.items)):
        if lists[queue]:
            item = lists[queue].popleft()
            cycle.rotate(queue)
            return item
    return None


def test_the_cycle_takes_interactive_first_then_tiers_in_weighted_turns() -> None:
    s = Settings.from_env({}, model="shapes")
    queues = worker_queues(s, ["shapes"])
    cycle = TierCycle(ratio=3)
    cycle.update(queues)
    lists = {q: deque[str]() for q in queues}
    lists["batchvision.low"].extend(f"low{i}" for i in range(200))
    lists["batchvision.high"].extend(f"high{i}" for i in range(90))
    lists["batchvision.interactive"].extend(["small0", "small1"])
    taken = [_brpop(cycle, lists) for _ in range(100)]
    assert taken[:2] == ["small0", "small1"]  # the interactive lane stays first
    kinds = Counter(str(t).rstrip("0123456789") for t in taken[2:])
    # 9:1 while both wait (the empty normal tier sits its turns out): low keeps moving.
    assert abs(kinds["high"] - 88) <= 1 and kinds["high"] + kinds["low"] == 98, kinds
    # The high backlog runs out: from then on low gets every turn, in order.
    while lists["batchvision.high"]:
        _brpop(cycle, lists)
    expected = list(lists["batchvision.low"])[:3]
    assert [_brpop(cycle, lists) for _ in range(3)] == expected


def test_a_later_high_message_overtakes_the_low_backlog() -> None:
    queues = ["q.interactive", "q.high", "q", "q.low"]
    cycle = TierCycle(queues, ratio=3)
    lists = {q: deque[str]() for q in queues}
    lists["q.low"].extend(f"low{i}" for i in range(50))
    first = [_brpop(cycle, lists) for _ in range(20)]
    assert first == [f"low{i}" for i in range(20)]
    lists["q.high"].extend(["high0", "high1", "high2"])
    nxt = [_brpop(cycle, lists) for _ in range(4)]
    # At most one low message (its turn came) before the high ones.
    assert [n for n in nxt if n and n.startswith("high")] == ["high0", "high1", "high2"]
    assert nxt.index("high2") <= 3


# -- the worker's admission -----------------------------------------------------------------------


def test_admission_takes_tiers_in_weighted_turns_after_urgent(wait_until: Callable[..., Any]) -> None:
    adm = Admission(limit=1, ratio=3)
    order: list[str] = []
    lock = threading.Lock()
    gate = threading.Event()

    def hold(name: str, urgent: bool = False, tier: Tier = Tier.NORMAL) -> None:
        with adm.admit(1, urgent, tier):
            with lock:
                order.append(name)
            if name == "blocker":
                assert gate.wait(10)

    blocker = threading.Thread(target=hold, args=("blocker",))
    blocker.start()
    wait_until(lambda: order == ["blocker"])
    threads = [threading.Thread(target=hold, args=(f"low{i}", False, Tier.LOW)) for i in range(3)]
    threads += [threading.Thread(target=hold, args=(f"high{i}", False, Tier.HIGH)) for i in range(12)]
    threads.append(threading.Thread(target=hold, args=("small", True)))
    for n, t in enumerate(threads, start=1):
        t.start()
        wait_until(lambda n=n: sum(adm.waiting()) == n)
    gate.set()
    for t in [blocker, *threads]:
        t.join(10)
    got = order[1:]
    assert got[0] == "small"  # urgent first
    # Then 9 high for each low while both wait, each tier in arrival order.
    assert [g for g in got if g.startswith("low")] == ["low0", "low1", "low2"]
    assert [g for g in got if g.startswith("high")] == [f"high{i}" for i in range(12)]
    assert got.index("low0") <= 10, got
    assert adm.held == 0


# -- the message codec ------------------------------------------------------------------------------


def test_the_message_carries_its_priority_compatibly() -> None:
    message = ClassifyMessage((Chunk.of("j", [0, 1]),), 1.5, False, 8)
    (body,) = message.to_args()
    assert body["v"] == 2 and body["priority"] == 8
    assert ClassifyMessage.from_args(message.to_args()) == message
    older = {k: v for k, v in body.items() if k != "priority"}  # an API from before priorities
    assert ClassifyMessage.from_args([older]).priority == DEFAULT_PRIORITY
    for bad in (10, -1, "9", True, 2.5):
        with pytest.raises(MessageError, match="priority"):
            ClassifyMessage.from_args([{**body, "priority": bad}])


def test_the_interactive_lane_is_for_the_normal_tier_and_above() -> None:
    assert [p for p in range(10) if takes_interactive_lane(p)] == [4, 5, 6, 7, 8, 9]
