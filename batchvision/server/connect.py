"""Connections shared by API, workers and tools."""

from __future__ import annotations

import select
import sys
import types
from typing import Any

import hiredis
import redis
import redis._parsers.hiredis
from redis._parsers.encoders import Encoder
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

#: Most connections one process opens to Redis. A request holds one only for the length of a
#: command or pipeline (waiting clients share one pub/sub connection), so this bounds the
#: concurrency of Redis calls, not of requests.
MAX_CONNECTIONS = 256
#: How long a caller waits for a free connection when all are in use, before a 503.
POOL_TIMEOUT_S = 10.0
#: Longest wait for a reply (and for a connection). Without it, a command sent while the
#: network silently drops packets (a partition: no RST, no FIN) waits until TCP gives up,
#: about 15 minutes: API requests hang instead of answering 503, and readiness never fails
#: (tests/integration/test_multihost.py). Every command of the project (a chunk's MGET, a
#: part's MULTI, the job scripts) answers in milliseconds; pub/sub reads pass their own timeout.
SOCKET_TIMEOUT_S = 5.0


def connect_redis(url: str, max_connections: int = MAX_CONNECTIONS) -> redis.Redis:
    """A Redis client that survives a Redis restart: a pooled connection the server closed
    is retried on a fresh one (three tries, short backoff) instead of failing the request.

    The pool blocks when every connection is in use (redis-py's default pool raises "Too many
    connections" instead, which a burst of a few hundred concurrent requests under gevent hits).
    """
    cooperative_poll_checks()
    pool = redis.BlockingConnectionPool.from_url(
        url,
        max_connections=max_connections,
        timeout=POOL_TIMEOUT_S,
        socket_connect_timeout=SOCKET_TIMEOUT_S,
        socket_timeout=SOCKET_TIMEOUT_S,
        socket_keepalive=True,
        health_check_interval=10,
        # Only a connection error is retried (a pooled connection the server closed): a reply
        # that timed out may belong to a command that ran, and retrying it would run it twice
        # (and would hold an API request for four timeouts instead of one during a partition).
        retry=Retry(
            ExponentialBackoff(cap=0.5, base=0.05), 3, supported_errors=(redis.exceptions.ConnectionError,)
        ),
        retry_on_error=[redis.exceptions.ConnectionError],
        command_packer=HiredisPacker(),
    )
    return redis.Redis(connection_pool=pool)


class HiredisPacker:
    """Commands packed by hiredis in C, as redis-py 6 did, without redis-py 8's Python encoding
    of each argument first (an ``isinstance`` chain and a generator step per argument).

    A job's writes are about a hundred arguments, and that encoding was a fifth of what its
    Redis round trips cost the API in CPU (``bench/request_path.py``). hiredis encodes ``str``
    (UTF-8), ``bytes``, ``int`` and ``float`` as redis-py's encoder does; anything else it
    refuses, and then redis-py's encoder converts it (``bytearray``, ``memoryview``) or raises
    its ``DataError`` (``bool``, ``None``) as it would have."""

    def __init__(self) -> None:
        encoder: Any = Encoder  # untyped in redis-py
        self._encode: Any = encoder("utf-8", "strict", decode_responses=False).encode

    def pack(self, *args: Any) -> list[bytes]:
        """The command as one RESP buffer (a multi-word command name split, as redis-py does)."""
        if isinstance(args[0], str):
            args = (*args[0].encode().split(), *args[1:])
        elif b" " in args[0]:
            args = (*args[0].split(), *args[1:])
        try:
            return [hiredis.pack_command(args)]
        except TypeError:
            encoded: tuple[Any, ...] = tuple(bytes(self._encode(a)) for a in args)
            return [hiredis.pack_command(encoded)]


class ZeroTimeoutPoll:
    """``select.poll`` for redis-py's readiness checks in a gevent process.

    The pool asks each connection it hands out whether unread bytes wait on it, with a poll of
    timeout 0. gevent's cooperative poll spends about 20 us on that (watchers, a turn of the hub)
    where the system call takes under 2 us, and a poll that does not wait cannot block the hub;
    in the API that was a twentieth of its CPU per request. A poll that waits (a pub/sub read
    with a timeout) still goes through ``cooperative``."""

    def __init__(self, system: Any, cooperative: Any) -> None:
        self._system = system
        self._cooperative = cooperative
        self._registered: list[tuple[Any, int]] = []

    def register(self, fd: Any, eventmask: int = select.POLLIN | select.POLLPRI | select.POLLOUT) -> None:
        self._registered.append((fd, eventmask))

    def poll(self, timeout: float | None = None) -> list[tuple[int, int]]:
        poller = (self._system if timeout == 0 else self._cooperative)()
        for fd, eventmask in self._registered:
            poller.register(fd, eventmask)
        result: list[tuple[int, int]] = poller.poll(timeout)
        return result


def cooperative_poll_checks() -> None:
    """In a process gevent has patched (the API's workers), give redis-py's hiredis parser a
    ``select`` whose zero-timeout polls are system calls (:class:`ZeroTimeoutPoll`); elsewhere
    nothing changes. Idempotent."""
    monkey = sys.modules.get("gevent.monkey")
    parser = vars(redis._parsers.hiredis)  # its `select` is the module it polls with
    if monkey is None or not monkey.is_module_patched("select") or parser.get("select") is not select:
        return
    system = monkey.get_original("select", "poll")
    cooperative = select.poll
    shim = types.SimpleNamespace(**{k: v for k, v in vars(select).items() if not k.startswith("__")})
    shim.poll = lambda: ZeroTimeoutPoll(system, cooperative)
    parser["select"] = shim
