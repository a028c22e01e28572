"""The unit tier: no processes it depends on, no Redis. A unit test that tries to reach Redis
fails at once with a clear message (it belongs in ``tests/integration/``) instead of waiting
for a connection timeout."""

from __future__ import annotations

from typing import NoReturn

import pytest
import redis.connection


@pytest.fixture(autouse=True)
def _no_redis(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: object, *args: object, **kwargs: object) -> NoReturn:
        raise RuntimeError("a unit test tried to connect to Redis: move it to tests/integration/")

    monkeypatch.setattr(redis.connection.AbstractConnection, "connect_check_health", refuse)
