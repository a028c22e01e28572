"""The broker choice without any process: settings, the Celery configuration each
broker gets, the delivery limit against the poison-image path, `batchvision up`'s choice, and
how a dead-lettered message is read."""

from __future__ import annotations

import datetime as dt

import pytest
from kombu.utils.scheduling import cycle_by_name

from batchvision.cli.local import local_broker
from batchvision.core.settings import Settings, SettingsError
from batchvision.server.deadletter import chunks_of, death
from batchvision.server.messages import Chunk
from batchvision.server.queue import (
    CLASSIFY_TASK,
    broker_url,
    celery_config,
    create_celery,
    dead_letter_queue,
    delivery_limit,
    uses_amqp,
)
from batchvision.server.routing import interactive_queue

AMQP = "amqp://batchvision:pw@rabbit.example:5672/"


def test_the_broker_defaults_to_the_redis_url_and_accepts_amqp() -> None:
    s = Settings.from_env({}, redis_url="redis://:rpw@r:6379/0")
    assert s.broker_url == "" and broker_url(s) == "redis://:rpw@r:6379/0" and not uses_amqp(s)
    amqp = Settings.from_env({"BATCHVISION_BROKER_URL": AMQP})
    assert broker_url(amqp) == AMQP and uses_amqp(amqp)
    assert "pw@" not in repr(amqp) and ":**********@rabbit.example" in repr(amqp)


@pytest.mark.parametrize(
    ("value", "says"),
    [
        ("http://rabbit:5672/", "redis:// or amqp://"),
        ("amqp://", "must name its host"),
        ("amqp:///vhost", "must name its host"),
    ],
)
def test_a_bad_broker_url_is_refused_naming_the_variable(value: str, says: str) -> None:
    with pytest.raises(SettingsError) as info:
        Settings.from_env({"BATCHVISION_BROKER_URL": value})
    assert f"BATCHVISION_BROKER_URL={value!r}" in str(info.value) and says in str(info.value)


def test_redis_keeps_its_configuration() -> None:
    config = celery_config(Settings.from_env({}))
    assert config["broker_url"].startswith("redis://")
    # kombu builds the queue cycle from the name: interactive first, then the priority tiers
    cycle = cycle_by_name(config["broker_transport_options"]["queue_order_strategy"])()
    cycle.update(["batchvision.interactive", "batchvision.high", "batchvision", "batchvision.low"])
    assert cycle.consume(4) == [
        "batchvision.interactive",
        "batchvision.high",
        "batchvision",
        "batchvision.low",
    ]
    assert "task_queues" not in config and config["task_acks_on_failure_or_timeout"] is True


def test_rabbitmq_gets_quorum_queues_confirms_and_dead_lettering() -> None:
    s = Settings.from_env({"BATCHVISION_BROKER_URL": AMQP})
    config = celery_config(s)
    assert config["broker_url"] == AMQP
    assert config["broker_transport_options"]["confirm_publish"] is True
    assert config["broker_transport_options"]["write_timeout"] > 0
    assert config["task_routes"][CLASSIFY_TASK]["confirm_timeout"] > 0  # a blocked broker: 503
    # As on Redis: late acks, requeue on a lost worker, one message per task thread, JSON only.
    assert config["task_acks_late"] and config["task_reject_on_worker_lost"]
    assert config["worker_prefetch_multiplier"] == 1 and config["accept_content"] == ["json"]
    # A failed task is rejected (dead-lettered), not acknowledged away.
    assert config["task_acks_on_failure_or_timeout"] is False
    assert config["worker_detect_quorum_queues"] is True  # per-consumer prefetch
    names = [q.name for q in config["task_queues"]]
    assert names == [interactive_queue(s), f"{s.queue}.high", s.queue, f"{s.queue}.low"]
    for queue in config["task_queues"]:
        args = queue.queue_arguments
        assert queue.durable and args["x-queue-type"] == "quorum"
        assert args["x-delivery-limit"] == delivery_limit(s)
        assert args["x-dead-letter-exchange"] == ""
        assert args["x-dead-letter-routing-key"] == dead_letter_queue(s)
        assert args["x-dead-letter-strategy"] == "at-least-once" and args["x-overflow"] == "reject-publish"
        assert queue.exchange.name == s.queue and queue.routing_key == queue.name


def test_any_other_queue_is_declared_like_the_task_queues() -> None:
    # Another model's queues, a worker's --queues: never a classic queue, which would
    # also clash with the quorum queue of that name (PRECONDITION_FAILED).
    s = Settings.from_env({"BATCHVISION_BROKER_URL": AMQP})
    app = create_celery(s)
    other = app.amqp.queues[f"{s.queue}.resnet50"]
    assert other.queue_arguments["x-queue-type"] == "quorum"
    assert other.queue_arguments["x-delivery-limit"] == delivery_limit(s)
    assert other.exchange.name == s.queue and other.routing_key == other.name
    # No model's queue can be the dead-letter queue (model names have no dots).
    assert dead_letter_queue(s).count(".") == s.queue.count(".") + 2


@pytest.mark.parametrize(
    ("chunk", "batch", "attempts"), [(16, 32, 3), (8, 32, 2), (64, 32, 5), (4, 4, 1), (1000, 4096, 100)]
)
def test_the_delivery_limit_leaves_room_for_the_poison_image_path(
    chunk: int, batch: int, attempts: int
) -> None:
    s = Settings.from_env({}, chunk_size=chunk, max_batch_size=batch, max_attempts=attempts)
    # The largest message: a chunk, or interactive chunks coalesced up to a batch. If every
    # image of it kills the worker, it comes back once whole, then attempts - 1 times per image
    # while the pipeline isolates them; the last attempt of each stores poison_image.
    images = max(chunk, batch)
    assert delivery_limit(s) > 1 + images * (attempts - 1)


def test_up_starts_its_own_rabbitmq_only_when_asked_and_none_is_named() -> None:
    assert local_broker(None, "") == (None, "")  # Redis
    assert local_broker("redis", AMQP) == (None, "")  # the flag wins
    assert local_broker("redis", "amqp://") == (None, "")  # ... also over "start your own"
    assert local_broker(None, AMQP) == (None, AMQP)  # a named broker is used as it is
    assert local_broker("rabbitmq", AMQP) == (None, AMQP)  # ... also the machine's own
    for asked in [("rabbitmq", ""), (None, "amqp://"), (None, "rabbitmq")]:
        server, url = local_broker(*asked)
        assert server is not None and url == server.url and url.startswith("amqp://batchvision:")
        assert f"127.0.0.1:{server.port}//" in url
        server.close()  # never started: only its temporary directory


def test_a_dead_lettered_message_is_read_from_its_body_and_x_death() -> None:
    body = [[[["job1", [0, 1, 2]], ["job2", [7]]], 1.5, True], {}, {"callbacks": None}]
    assert chunks_of(body) == [Chunk.of("job1", [0, 1, 2]), Chunk.of("job2", [7])]
    for bad in ([], [[]], [[[["job", ["x"]]]]], {"a": 1}, None):
        with pytest.raises(ValueError):
            chunks_of(bad)
    when = dt.datetime(2026, 1, 1)
    headers = {
        "x-death": [
            {"reason": "delivery_limit", "queue": "batchvision", "count": 1, "time": when},
            {"reason": "rejected", "queue": "batchvision.interactive", "count": 1, "time": when},
        ],
        "x-first-death-reason": "rejected",
    }
    assert death(headers) == ("delivery_limit", "batchvision")
    assert death({"x-first-death-reason": "rejected", "x-first-death-queue": "q"}) == ("rejected", "q")
    assert death({}) == ("", "")
