"""Connections shared by API, workers and tools."""

from __future__ import annotations

import redis
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
    )
    return redis.Redis(connection_pool=pool)
