"""Redis connections in a gevent process: readiness checks that do not wait skip gevent's hub."""

from __future__ import annotations

import enum
import subprocess
import sys
import textwrap

import pytest
import redis

from batchvision.server.connect import HiredisPacker, connect_redis

# Run in a child: gevent's monkey-patching cannot be undone in the test process.
_CHILD = textwrap.dedent(
    """
    from gevent import monkey

    monkey.patch_all()
    import select
    import socket

    import gevent
    import redis._parsers.hiredis as hiredis

    calls = []
    cooperative = select.poll

    def counting_poll():
        calls.append(1)
        return cooperative()

    select.poll = counting_poll
    from batchvision.server.connect import cooperative_poll_checks

    cooperative_poll_checks()
    cooperative_poll_checks()  # idempotent: the shim is not wrapped twice
    a, b = socket.socketpair()
    assert not hiredis._socket_can_read(a, 0)
    b.send(b"x")
    assert hiredis._socket_can_read(a, 0)
    assert not hiredis._socket_is_closed(a)
    a.recv(1)
    b.close()
    assert hiredis._socket_can_read(a, 0) and hiredis._socket_is_closed(a)
    assert calls == [], f"a zero-timeout check went through gevent's poll {len(calls)} times"
    # A poll that waits stays cooperative: the greenlet that sends runs during the wait.
    c, d = socket.socketpair()
    gevent.spawn_later(0.05, d.send, b"y")
    assert hiredis._socket_can_read(c, 5.0)
    assert calls == [1], calls
    print("ok")
    """
)


def test_zero_timeout_checks_are_system_calls_and_waits_stay_cooperative() -> None:
    out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


def test_nothing_changes_without_gevent() -> None:
    import select

    import redis._parsers.hiredis as hiredis

    from batchvision.server.connect import cooperative_poll_checks

    cooperative_poll_checks()
    assert hiredis.select is select


class _Number(enum.IntEnum):
    ONE = 1
    TWO = 2


class _Score(float):
    def __repr__(self) -> str:
        return "a score"


_ARGUMENTS: list[tuple[object, ...]] = [
    ("SET", "key", b"\x00\xffbytes", "EX", 600),
    ("HSET", "bv:job:x", "created_at", "1796655817.294", "model", "démo", "total", 0, "top_k", -3),
    ("ZADD", "bv:active", 1796655817.2941234, "job", 0.1, "other", 1e300, "big", 10**20, "x"),
    ("EVALSHA", "abc", 2, "k1", "k2", *range(50), *(f"f{i}.jpg" for i in range(50))),
    ("CLIENT SETNAME", "name"),
    (b"CONFIG GET", b"maxmemory"),
    ("SET", "k", bytearray(b"array"), "GET"),
    ("SET", "k", memoryview(b"view")),
    ("SET", _Number.ONE, _Score(0.25), "EX", _Number.TWO),
    ("SET", "", b"", 0, -0.0, float("inf")),
]


@pytest.mark.parametrize("args", _ARGUMENTS)
def test_the_packer_sends_what_redis_pys_own_packer_sends(args: tuple[object, ...]) -> None:
    theirs = redis.Connection()._command_packer  # redis-py's choice: hiredis with its encoder
    assert b"".join(HiredisPacker().pack(*args)) == b"".join(theirs.pack(*args))


@pytest.mark.parametrize("bad", [True, None, object()])
def test_the_packer_refuses_what_redis_py_refuses_with_its_error(bad: object) -> None:
    with pytest.raises(redis.exceptions.DataError, match="Invalid input of type"):
        HiredisPacker().pack("SET", "k", bad)


def test_the_project_s_connections_pack_with_it() -> None:
    client = connect_redis("redis://127.0.0.1:1/0")
    connection = client.connection_pool.make_connection()
    assert isinstance(connection._command_packer, HiredisPacker)
    client.close()
