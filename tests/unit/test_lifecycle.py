"""The worker's components start in order and stop in reverse, also when a start fails."""

from __future__ import annotations

import pytest

from workers.lifecycle import Lifecycle


class Part:
    def __init__(self, name: str, log: list[str], fail: bool = False) -> None:
        self.name = name
        self.log = log
        self.fail = fail

    def start(self) -> None:
        if self.fail:
            raise OSError(f"{self.name} cannot start")
        self.log.append(f"start {self.name}")

    def stop(self) -> None:
        self.log.append(f"stop {self.name}")


def test_components_start_in_order_and_stop_in_reverse_once() -> None:
    log: list[str] = []
    life = Lifecycle([Part("a", log), Part("b", log), Part("c", log)])
    life.start()
    assert life.started == ["a", "b", "c"]
    life.stop()
    life.stop()  # twice: nothing more
    assert log == ["start a", "start b", "start c", "stop c", "stop b", "stop a"]


def test_a_failed_start_stops_what_started_in_reverse_and_raises() -> None:
    log: list[str] = []
    life = Lifecycle([Part("a", log), Part("b", log), Part("c", log, fail=True), Part("d", log)])
    with pytest.raises(OSError, match="c cannot start"):
        life.start()
    assert log == ["start a", "start b", "stop b", "stop a"]  # d never started, c never stopped
    assert life.started == []


def test_a_stop_that_fails_does_not_keep_the_others_running() -> None:
    log: list[str] = []

    class Stubborn(Part):
        def stop(self) -> None:
            raise RuntimeError("stuck")

    life = Lifecycle([Part("a", log), Stubborn("b", log), Part("c", log)])
    life.start()
    life.stop()
    assert log == ["start a", "start b", "start c", "stop c", "stop a"]


def test_the_worker_lists_its_components_in_order() -> None:
    from celery import Celery

    from batchvision.core.settings import Settings
    from workers.runtime import Worker

    redis_worker = Worker(Settings.from_env({}), Celery("t", set_as_current=False))
    names = [c.name for c in redis_worker.lifecycle.components]
    assert names == [
        "tracing",
        "gpu",
        "redis",
        "liveness",
        "models",
        "model-reporting",
        "hand-on",
        "processor",
        "metrics",
        "webhooks",
        "exports",
        "listings",
        "sweeper",
    ]
    amqp = Worker(Settings.from_env({}, broker_url="amqp://x//"), Celery("t", set_as_current=False))
    amqp_names = [c.name for c in amqp.lifecycle.components]
    assert amqp_names[-2:] == ["dead-letters", "sweeper"]
    assert "liveness" not in amqp_names  # RabbitMQ gives a dead worker's messages back itself
