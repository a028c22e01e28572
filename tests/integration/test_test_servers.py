"""The suite's own server helpers (``batchvision.testing.servers``) against a real ``redis-server``
and ``rabbitmq-server``."""

from __future__ import annotations

import socket
import threading
from collections.abc import Callable
from typing import Any

import psutil
import pytest
import redis as redis_lib

from batchvision.testing.servers import RabbitMQServer, RedisServer, have_rabbitmq

pytestmark = pytest.mark.integration


def _bound(port: int) -> socket.socket:
    """A socket bound to ``port`` that does not listen: like an outgoing connection's."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", port))
    return sock


def test_a_restart_waits_for_a_port_another_socket_holds_for_a_moment() -> None:
    with RedisServer() as redis:
        redis.stop()
        # Something else holds the port while Redis is down (on a busy machine: an outgoing
        # connection given that ephemeral port), and lets it go 1.5 s later.
        holder = _bound(redis.port)
        release = threading.Timer(1.5, holder.close)
        release.start()
        try:
            redis.start()
        finally:
            release.join()
        client = redis_lib.Redis.from_url(redis.url)
        try:
            assert client.ping()
        finally:
            client.close()


def test_a_port_that_stays_taken_is_an_error_naming_the_log() -> None:
    with RedisServer() as redis:
        redis.stop()
        with _bound(redis.port), pytest.raises(RuntimeError, match="redis.log"):
            redis.start(port_busy_s=1.0)


def test_a_first_start_moves_off_a_port_taken_since_it_was_chosen() -> None:
    redis = RedisServer()
    chosen = redis.port
    # Another process binds the free port between its choice and the server's start, and
    # keeps it: no client knows the URL yet, so the server takes another port.
    with _bound(chosen):
        try:
            redis.start(port_busy_s=1.0)
            assert redis.port != chosen
            client = redis_lib.Redis.from_url(redis.url)
            try:
                assert client.ping()
            finally:
                client.close()
        finally:
            redis.close()


def _listeners(port: int) -> set[str]:
    """The addresses something listens on at TCP ``port``."""
    return {
        c.laddr.ip
        for c in psutil.net_connections(kind="tcp")
        if c.status == psutil.CONN_LISTEN and c.laddr.port == port
    }


@pytest.mark.slow
@pytest.mark.skipif(not have_rabbitmq(), reason="needs Debian's rabbitmq-server")
def test_a_rabbitmq_node_has_its_own_port_mapper_on_loopback_gone_with_it(
    wait_until: Callable[..., Any],
) -> None:
    # Erlang's default port mapper listens on every address at 4369 and outlives the node.
    node = RabbitMQServer().start()
    try:
        assert _listeners(node.epmd_port) in ({"127.0.0.1"}, {"127.0.0.1", "::1"})
    finally:
        node.close()
    wait_until(lambda: not _listeners(node.epmd_port), timeout=30, message="the port mapper stopped")
