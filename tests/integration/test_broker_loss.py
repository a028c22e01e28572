"""A worker's broker connection lost while it holds an unacknowledged message, against a real
Redis. After the loss Celery 5.7 collects the connection (its transport loses its client) and
closes it; the channel's close then restores the unacknowledged message, which needs a new
Redis pool built from that client. Seen in a worker log: an ``AttributeError`` there that
nothing caught shut the worker down ("Unrecoverable error"), and its job never finished. The
close must end as a connection error, which Celery ignores before it reconnects, and the message
must stay in Redis to come back after the visibility timeout."""

from __future__ import annotations

import pytest
import redis as redis_lib
from kombu import Connection, Exchange, Queue

import batchvision.server.queue  # noqa: F401 - installs the guard under test
from batchvision.testing.servers import RedisServer

pytestmark = pytest.mark.integration


def test_closing_a_collected_channel_with_a_message_in_hand_is_a_connection_error() -> None:
    with RedisServer() as server:
        conn = Connection(server.url, transport_options={"visibility_timeout": 3600})
        queue = Queue("held", Exchange("held", type="direct"), routing_key="held")
        with conn.Producer() as producer:
            producer.publish({"n": 1}, exchange=queue.exchange, routing_key="held", declare=[queue])
        channel = conn.default_channel
        assert channel.basic_get("held", no_ack=False) is not None  # delivered, not acknowledged
        errors = conn.connection_errors
        server.stop()  # the broker goes away with the message in hand
        # The state of the worker's log: the channel's pool gone, the transport collected.
        channel._disconnect_pools()
        transport = conn.transport
        transport.client = None
        with pytest.raises(errors):
            channel.close()
        conn.maybe_close_channel(channel)  # what Celery's close does: ignored, the worker goes on
        server.start()
        client = redis_lib.Redis.from_url(server.url)
        try:
            # kombu's unacked set still holds it: restore_visible brings it back after the timeout.
            assert client.hlen("unacked") == 1
        finally:
            client.close()
