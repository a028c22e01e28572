"""Celery configuration and enqueueing by task name (the API never imports the workers).

A message carries one or more chunks (a job id and some of its image indexes), never image
bytes.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import redis
from celery import Celery
from celery.app.amqp import Queues
from kombu.entity import Exchange, Queue
from kombu.exceptions import OperationalError
from kombu.transport import redis as kombu_redis

from batchvision.core.priorities import DEFAULT_PRIORITY, Tier, takes_interactive_lane
from batchvision.core.settings import Settings
from batchvision.server import tracing, turns
from batchvision.server.coalescer import Coalescer
from batchvision.server.connect import SOCKET_TIMEOUT_S
from batchvision.server.messages import Chunk, ClassifyMessage
from batchvision.server.routing import bulk_queue, default_model, interactive_queue, queue_for

log = logging.getLogger(__name__)

CLASSIFY_TASK = "batchvision.classify"


# -- broker selection: Redis (default) or RabbitMQ ------------------------------

#: URL schemes of RabbitMQ (kombu's py-amqp transport).
AMQP_SCHEMES = ("amqp", "amqps", "pyamqp")
#: Longest a publish waits for RabbitMQ's confirm before it counts as failed (the API answers
#: 503; a publisher blocked by a broker alarm does not hang a request forever).
CONFIRM_TIMEOUT_S = 10.0


def broker_url(settings: Settings) -> str:
    """The broker's URL: ``BATCHVISION_BROKER_URL``, or the Redis URL when that is empty."""
    return settings.broker_url or settings.redis_url


def uses_amqp(settings: Settings) -> bool:
    """Whether the broker is RabbitMQ (rather than Redis)."""
    return broker_url(settings).split(":", 1)[0].lower() in AMQP_SCHEMES


def dead_letter_queue(settings: Settings) -> str:
    """RabbitMQ: where a message goes that failed or was delivered too often. Two dots: no
    model's queue (``<QUEUE>.<model>``, model names have no dots) can be named so."""
    return f"{settings.queue}.dead.letters"


def delivery_limit(settings: Settings) -> int:
    """RabbitMQ's ``x-delivery-limit`` of the task queues: how many times a message may come
    back (its worker died or lost the connection) before it is dead-lettered.

    Above what the poison-image path needs: a message of ``n`` images in which every image
    kills the worker comes back once for the whole message and ``MAX_ATTEMPTS - 1`` times per
    image while the pipeline isolates them (the last attempt stores ``poison_image``), so
    ``1 + n * (MAX_ATTEMPTS - 1)`` returns, with ``n`` the largest message (a chunk, or
    interactive chunks coalesced up to a batch), plus 10 for returns that are no image's fault
    (rolling restarts, connection cuts while a message waited in a worker's prefetch)."""
    images = max(settings.chunk_size, settings.max_batch_size)
    return 1 + images * (settings.max_attempts - 1) + 10


def task_queue(settings: Settings, name: str) -> Queue:
    """One task queue on RabbitMQ: a durable quorum queue (replicated with Raft, acknowledged
    per message) bound by its name to a direct exchange named after ``BATCHVISION_QUEUE``.
    A message that failed or came back more than :func:`delivery_limit` times is
    dead-lettered, at least once, to :func:`dead_letter_queue`, which every worker drains
    (:mod:`batchvision.server.deadletter`)."""
    arguments = {
        "x-queue-type": "quorum",
        "x-delivery-limit": delivery_limit(settings),
        "x-dead-letter-exchange": "",  # the default exchange: routed by queue name
        "x-dead-letter-routing-key": dead_letter_queue(settings),
        # At-least-once dead-lettering (RabbitMQ >= 3.10) requires reject-publish overflow;
        # without a length limit nothing is ever rejected for length.
        "x-dead-letter-strategy": "at-least-once",
        "x-overflow": "reject-publish",
    }
    exchange = Exchange(settings.queue, type="direct", durable=True)  # type: ignore[no-untyped-call, unused-ignore]
    return Queue(name, exchange, routing_key=name, durable=True, queue_arguments=arguments)  # type: ignore[no-untyped-call, unused-ignore]


def amqp_queues(settings: Settings) -> list[Queue]:
    """The task queues every app knows up front (interactive first, then the priority tiers);
    any other queue name it meets (another model's) gets the same declaration, see
    :class:`_TaskQueues`."""
    names = (
        interactive_queue(settings),
        *(bulk_queue(settings, tier=t) for t in (Tier.HIGH, Tier.NORMAL, Tier.LOW)),
    )
    return [task_queue(settings, name) for name in names]


class _TaskQueues(Queues):  # type: ignore[misc, unused-ignore]
    """Celery's queue map, where a queue it does not know yet (``--queues`` of a worker, a
    publish to another model's queue) is declared like the others, not as a classic queue."""

    def __init__(self, settings: Settings, *args: Any, **kwargs: Any) -> None:
        self.settings = settings
        super().__init__(*args, **kwargs)

    def new_missing(self, name: str) -> Queue:
        return task_queue(self.settings, name)


def dead_letter_queue_object(settings: Settings) -> Queue:
    """The dead-letter queue (quorum, durable, reached through the default exchange)."""
    return Queue(  # type: ignore[no-untyped-call, unused-ignore]
        dead_letter_queue(settings),
        Exchange(""),  # type: ignore[no-untyped-call, unused-ignore]
        routing_key=dead_letter_queue(settings),
        durable=True,
        queue_arguments={"x-queue-type": "quorum"},
    )


def check_broker(settings: Settings, timeout_s: float = 2.0) -> None:
    """Raise if a broker other than Redis does not accept a connection within ``timeout_s``
    (``/readyz``; Redis is checked by its own ping)."""
    if not uses_amqp(settings):
        return
    from kombu.connection import Connection

    conn = Connection(broker_url(settings), connect_timeout=timeout_s)  # type: ignore[no-untyped-call, unused-ignore]
    try:
        conn.ensure_connection(max_retries=0, timeout=timeout_s)  # type: ignore[no-untyped-call, unused-ignore]
    finally:
        conn.release()  # type: ignore[no-untyped-call, unused-ignore]


def amqp_backlog(settings: Settings, queues: Sequence[str], timeout_s: float = 5.0) -> int:
    """RabbitMQ: messages waiting in ``queues`` (ready, not yet handed to a consumer), from a
    passive declare of each; a queue that does not exist yet counts 0."""
    return sum(amqp_lengths(settings, queues, timeout_s))


def amqp_lengths(settings: Settings, queues: Sequence[str], timeout_s: float = 5.0) -> list[int]:
    """RabbitMQ: the ready messages of each of ``queues``, over one connection (0 for a queue
    that does not exist yet)."""
    from kombu.connection import Connection

    lengths = []
    conn = Connection(broker_url(settings), connect_timeout=timeout_s)  # type: ignore[no-untyped-call, unused-ignore]
    try:
        for name in queues:
            channel = conn.channel()  # type: ignore[no-untyped-call, unused-ignore]
            try:
                lengths.append(int(channel.queue_declare(queue=name, passive=True).message_count))
            except conn.channel_errors:  # 404: not declared yet (the channel is closed by it)
                lengths.append(0)
            finally:
                with contextlib.suppress(Exception):
                    channel.close()
    finally:
        conn.release()  # type: ignore[no-untyped-call, unused-ignore]
    return lengths


def _amqp_config(settings: Settings) -> dict[str, Any]:
    """What RabbitMQ changes in :func:`celery_config`."""
    return {
        "broker_url": broker_url(settings),
        # Every publish waits for RabbitMQ's confirm (the message is on the quorum queue's
        # majority): a 202 means the task is stored, as with Redis' LPUSH reply.
        # A write that stalls (a silent partition, a broker alarm blocking publishers) fails
        # after the same timeout as Redis commands instead of hanging the request.
        "broker_transport_options": {"confirm_publish": True, "write_timeout": SOCKET_TIMEOUT_S},
        "broker_heartbeat": 30,  # a silent partition is noticed within a minute
        "task_queues": amqp_queues(settings),
        "task_default_exchange": settings.queue,
        "task_default_exchange_type": "direct",
        "task_routes": {CLASSIFY_TASK: {"queue": settings.queue, "confirm_timeout": CONFIRM_TIMEOUT_S}},
        # A task that raised (after its own retries) is rejected, not acknowledged: RabbitMQ
        # dead-letters it and the dead-letter handler re-sends it or stores per-image errors.
        # (On Redis the chunk ledger's sweeper re-sends it.)
        "task_acks_on_failure_or_timeout": False,
        # Quorum queues have no global QoS: per-consumer prefetch (each queue its own credit).
        "worker_detect_quorum_queues": True,
        # Celery declares its native delayed-delivery queues whenever quorum queues are used;
        # our direct exchanges never route ETA tasks through them, so keep them cheap.
        "broker_native_delayed_delivery_queue_type": "classic",
    }


def celery_config(settings: Settings) -> dict[str, Any]:
    """The settings both sides of the queue share. Chosen so that nothing is lost or run
    twice: late acks, requeue on a lost worker, prefetch 1 (the backlog stays in the broker,
    visible to autoscalers), JSON only, and a visibility timeout above the longest task.
    With RabbitMQ (``BATCHVISION_BROKER_URL=amqp://...``) see :func:`_amqp_config`."""
    config = {
        "broker_url": settings.redis_url,
        "broker_transport_options": {
            "visibility_timeout": settings.visibility_timeout_s,
            # How soon a dead worker's unacknowledged tasks go back to the queue once the
            # visibility timeout has passed: kombu's default sweep runs only every ~100 s.
            "unacked_restore_interval": max(1, min(10, settings.visibility_timeout_s // 4)),
            "unacked_restore_throttle": 1,
            # Take from the queues in the order the worker lists them (interactive first),
            # not round-robin: a free worker thread always picks a waiting small job. The bulk
            # queues of the priority tiers follow in weighted turns (batchvision.server.turns).
            "queue_order_strategy": turns.cycle_name(settings.priority_ratio),
            # A worker killed while it holds the restore lock would block every other
            # worker's sweep for the lock's lifetime (kombu's default: 300 s).
            "unacked_mutex_expire": max(5, min(60, settings.visibility_timeout_s // 2)),
            # Without a socket timeout a publish (or an ack) sent while the network silently
            # drops packets waits until TCP gives up: an API request hung for the whole of a
            # Redis partition (tests/integration/test_multihost.py). BRPOP is not affected: it
            # is read by the event loop, and answers within its own 1 s timeout.
            "socket_timeout": SOCKET_TIMEOUT_S,
            "socket_connect_timeout": SOCKET_TIMEOUT_S,
            "socket_keepalive": True,
            "health_check_interval": 10,
        },
        "broker_connection_retry_on_startup": True,
        "broker_connection_max_retries": None,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "event_serializer": "json",
        "task_ignore_result": True,  # results live in the job store, keyed per image
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "task_acks_on_failure_or_timeout": True,
        "worker_prefetch_multiplier": 1,
        "worker_cancel_long_running_tasks_on_connection_loss": True,
        "task_default_queue": settings.queue,
        "task_routes": {CLASSIFY_TASK: {"queue": settings.queue}},
        "task_time_limit": settings.task_time_limit_s,
        "worker_send_task_events": True,
        "task_send_sent_event": True,
        "worker_hijack_root_logger": False,
    }
    if uses_amqp(settings):
        config.update(_amqp_config(settings))
    return config


_connparams = kombu_redis.Channel._connparams


def _connparams_of_an_open_transport(self: Any, asynchronous: bool = False) -> Any:
    """kombu's Redis connection parameters, or a connection error once the transport is closed.

    After a lost broker connection Celery 5.7 collects the connection (its transport loses its
    client) and then closes it; closing its channel restores the unacknowledged messages,
    which builds a new pool from that client: an ``AttributeError`` that no one catches, so a
    worker that had a message in hand when Redis restarted shut down. Guarded here, at the one
    call that reads the client, rather than around each close. As a connection error it is
    ignored like the other errors of that close; the messages stay in Redis' unacked set and
    come back after the visibility timeout."""
    if self.connection.client is None:
        raise redis.exceptions.ConnectionError("the broker connection is closed")
    return _connparams(self, asynchronous)  # type: ignore[no-untyped-call, unused-ignore]


kombu_redis.Channel._connparams = _connparams_of_an_open_transport  # type: ignore[method-assign]

_remove_from_indices = kombu_redis.QoS._remove_from_indices


def _remove_from_indices_without_multi(self: Any, delivery_tag: str, pipe: Any = None) -> Any:
    """kombu's removal of a message from the unacknowledged hash and index (an ack), in a plain
    pipeline rather than a ``MULTI``.

    Redis at ``maxmemory`` (``noeviction``) refuses every command queued in a ``MULTI``, even
    deletions: an ack failed, and Celery stopped the worker ("Unrecoverable error") whenever
    Redis was full. Outside a ``MULTI`` the two deletions run. The hash entry goes first: a
    death between the two leaves an index entry without its message, which kombu's restore
    drops. A ``pipe`` given (kombu's own restore transaction) is used as it is."""
    if pipe is not None:
        return _remove_from_indices(self, delivery_tag, pipe)  # type: ignore[no-untyped-call, unused-ignore]
    with self.channel.conn_or_acquire() as client:
        plain = client.pipeline(transaction=False)
        return plain.hdel(self.unacked_key, delivery_tag).zrem(self.unacked_index_key, delivery_tag)


kombu_redis.QoS._remove_from_indices = _remove_from_indices_without_multi  # type: ignore[method-assign]

_append = kombu_redis.QoS.append
_restore_visible = kombu_redis.QoS.restore_visible


def _append_even_when_full(self: Any, message: Any, delivery_tag: str) -> None:
    """kombu's record of a message just taken off its queue, kept in Redis until the ack; when
    Redis is full (it took the message with ``BRPOP``, but refuses the copy), the message is run
    from memory all the same. Raising here stopped the worker with the message gone from Redis;
    now only a death of this worker before the ack loses it, and the chunk ledger's sweep sends
    its chunks again."""
    try:
        _append(self, message, delivery_tag)  # type: ignore[no-untyped-call, unused-ignore]
    except redis.exceptions.OutOfMemoryError:
        log.warning("Redis is full: message %s runs without its copy in Redis's unacked set", delivery_tag)
        super(kombu_redis.QoS, self).append(message, delivery_tag)


def _restore_visible_unless_full(self: Any, *args: Any, **kwargs: Any) -> Any:
    """kombu's periodic return of messages held past the visibility timeout; skipped for the
    moment while Redis is full (its lock is a write Redis refuses), instead of stopping the worker."""
    try:
        return _restore_visible(self, *args, **kwargs)  # type: ignore[no-untyped-call, unused-ignore]
    except redis.exceptions.OutOfMemoryError as exc:
        log.warning("Redis is full: returning expired unacknowledged messages waits (%s)", exc)
        return None


kombu_redis.QoS.append = _append_even_when_full  # type: ignore[method-assign]
kombu_redis.QoS.restore_visible = _restore_visible_unless_full  # type: ignore[method-assign]


def _size_without_multi(self: Any, queue: str) -> int:
    """kombu's length of a queue (its lists, one per priority step), read in a plain pipeline:
    Redis at ``maxmemory`` refuses every command queued in a ``MULTI``, reads too, so a worker
    that declared its queues while Redis was full stopped at start ("Unrecoverable error")."""
    with self.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for pri in self.priority_steps:
            pipe.llen(self._q_for_pri(queue, pri))
        return sum(size for size in pipe.execute() if isinstance(size, int))


def _has_queue_without_multi(self: Any, queue: str, **kwargs: Any) -> bool:
    """kombu's check that a queue exists, in a plain pipeline (as :func:`_size_without_multi`)."""
    with self.conn_or_acquire() as client:
        pipe = client.pipeline(transaction=False)
        for pri in self.priority_steps:
            pipe.exists(self._q_for_pri(queue, pri))
        return any(pipe.execute())


#: While Redis is full, a binding that must be written (a queue this Redis has not seen) is
#: tried again after this pause, doubled each time up to :data:`BIND_MAX_S`.
BIND_FIRST_S = 1.0
BIND_MAX_S = 30.0

_queue_bind = kombu_redis.Channel._queue_bind


def _queue_bind_when_there_is_room(
    self: Any, exchange: str, routing_key: str, pattern: str, queue: str
) -> Any:
    """kombu's binding of a queue to an exchange: two set members, written at every declaration.
    A binding Redis already holds is not written again, since a full Redis refuses even a write
    that would change nothing, and a worker (re)started while Redis was full stopped. A new
    binding waits for room, logging why, and gives up only when the worker is asked to stop:
    without it the queue gets no messages."""
    binding = self.sep.join([routing_key or "", pattern or "", queue or ""])
    if queue not in self._expires:  # an expiring binding is written to renew it
        with self.conn_or_acquire() as client:
            pipe = client.pipeline(transaction=False)
            pipe.sismember(self.keyprefix_queue % (exchange,), binding)
            pipe.sismember(self.keyprefix_binding_permanent % (exchange,), binding)
            held = all(pipe.execute())
        if held and self.typeof(exchange).type != "fanout":
            return None
    delay = BIND_FIRST_S
    while True:
        try:
            return _queue_bind(self, exchange, routing_key, pattern, queue)  # type: ignore[no-untyped-call, unused-ignore]
        except redis.exceptions.OutOfMemoryError as exc:
            log.warning(
                "Redis is full: queue %s waits for room to be bound, tried again in %.0f s (%s)",
                queue,
                delay,
                exc,
            )
        _sleep_unless_stopping(delay)
        delay = min(2 * delay, BIND_MAX_S)


def _sleep_unless_stopping(seconds: float) -> None:
    """Sleep, in short steps; raise Celery's ``WorkerShutdown`` once the worker is asked to stop
    (its signal handlers only set a flag)."""
    from celery.exceptions import WorkerShutdown
    from celery.worker import state

    until = time.monotonic() + seconds
    while (left := until - time.monotonic()) > 0:
        if state.should_stop is not None or state.should_terminate is not None:
            raise WorkerShutdown(0)
        time.sleep(min(left, 0.25))


kombu_redis.Channel._size = _size_without_multi  # type: ignore[method-assign]
kombu_redis.Channel._has_queue = _has_queue_without_multi  # type: ignore[method-assign]
kombu_redis.Channel._queue_bind = _queue_bind_when_there_is_room  # type: ignore[method-assign]


def create_celery(settings: Settings, name: str = "batchvision", cls: type[Celery] = Celery) -> Celery:
    """A Celery app (of class ``cls``) configured for ``settings`` (workers add the tasks)."""
    app = cls(name, set_as_current=False)
    app.conf.update(celery_config(settings))
    if uses_amqp(settings):
        app.amqp.queues_cls = functools.partial(_TaskQueues, settings)
    return app


def chunked(indexes: Sequence[int], size: int) -> list[list[int]]:
    """Split image indexes into task-sized chunks, in order."""
    size = max(1, size)
    return [list(indexes[i : i + size]) for i in range(0, len(indexes), size)]


def describe(items: Sequence[Chunk]) -> str:
    """What Flower shows instead of the raw arguments (never image bytes)."""
    return "; ".join(c.describe() for c in items)


def publish(
    app: Celery,
    settings: Settings,
    items: Sequence[Chunk],
    enqueued_at: float,
    interactive: bool = False,
    producer: Any = None,
    contexts: Sequence[Any] = (),
    model: str | None = None,
    priority: int = DEFAULT_PRIORITY,
) -> None:
    """Publish one classify message carrying ``items`` by task name (the API never imports
    the task). Each chunk must already be in the chunk ledger (:mod:`~batchvision.server.recovery`).

    ``contexts``: the trace context of each item's request, when another thread publishes.
    ``model``: the items' model (all of one model), whose queues the message goes to
    (:mod:`~batchvision.server.routing`; ``None``: the default model); ``priority``: the
    items' (a bulk message goes to the queue of its tier)."""
    # -- tracing and logs: the message's headers carry the enqueue span's context.
    queue = queue_for(settings, model, interactive, priority)
    task_id = str(uuid.uuid4())
    message = ClassifyMessage(tuple(items), enqueued_at, interactive, priority)
    jobs = [c.job_id for c in items]
    images = message.images
    with tracing.enqueue(jobs, images, queue, task_id, contexts) as headers:
        app.send_task(
            CLASSIFY_TASK,
            args=message.to_args(),
            queue=queue,
            producer=producer,
            argsrepr=describe(items),
            task_id=task_id,
            **({"headers": headers} if headers else {}),
        )
    unique = sorted(set(jobs))
    ids: dict[str, Any] = {"job_id": unique[0]} if len(unique) == 1 else {"job_ids": unique}
    log.info(
        "queued %d images of %s as task %s on %s",
        images,
        " ".join(unique),
        task_id,
        queue,
        extra={**ids, "task_id": task_id, "images": images, "queue": queue},
    )


class Enqueuer:
    """Sends chunks: bulk ones one message each, interactive ones coalesced across requests
    (see :mod:`batchvision.server.coalescer`), each message carrying up to a batch of images.
    Each model has its own queues and its own coalescer: a message never carries two models."""

    def __init__(self, app: Celery, settings: Settings) -> None:
        self.app = app
        self.settings = settings
        self._lock = threading.Lock()
        self._coalescers: dict[str, Coalescer[tuple[Chunk, float, Any, int]]] = {}
        self.coalescer = self._coalescer(default_model(settings))  # the default model's

    def _coalescer(self, model: str) -> Coalescer[tuple[Chunk, float, Any, int]]:
        with self._lock:
            if model not in self._coalescers:
                # Items: (chunk, enqueued_at, the request's trace context or None, priority).
                self._coalescers[model] = Coalescer(
                    functools.partial(self._send_interactive, model),
                    max_weight=self.settings.max_batch_size,
                    linger_s=self.settings.enqueue_linger_ms / 1000.0,
                    weight=lambda item: len(item[0]),
                    name=f"enqueue-{model}",
                )
            return self._coalescers[model]

    def send(
        self,
        chunks: Sequence[Chunk],
        enqueued_at: float,
        interactive: bool,
        model: str | None = None,
        priority: int = DEFAULT_PRIORITY,
    ) -> None:
        """Publish ``chunks`` (already in the ledger, of a job of ``priority``) to ``model``'s
        queues (``None``: the default model's); returns once they are on the queue.
        ``interactive``: a small job someone waits for, sent to the interactive lane unless its
        priority is of the low tier."""
        interactive = interactive and takes_interactive_lane(priority)
        if interactive and self.settings.enqueue_linger_ms > 0:
            # Bounded like a publish: a broker that is down gives the caller an error, not a hang.
            context = tracing.capture()  # the coalescer's thread publishes: hand it over
            coalescer = self._coalescer(model or default_model(self.settings))
            try:
                coalescer.submit_many([(c, enqueued_at, context, priority) for c in chunks], timeout_s=30.0)
            except TimeoutError as exc:
                # The broker's failure, like a failed publish: a 503, not a 500.
                raise OperationalError(f"the broker did not take the task in time: {exc}") from exc
            return
        with self.app.producer_or_acquire() as producer:
            for chunk in chunks:
                publish(
                    self.app,
                    self.settings,
                    [chunk],
                    enqueued_at,
                    interactive,
                    producer,
                    model=model,
                    priority=priority,
                )

    def _send_interactive(self, model: str, items: list[tuple[Chunk, float, Any, int]]) -> None:
        chunks = [c for c, _, _, _ in items]
        contexts = [x for _, _, x, _ in items]
        first = min(t for _, t, _, _ in items)
        priority = max(p for _, _, _, p in items)
        publish(
            self.app, self.settings, chunks, first, True, contexts=contexts, model=model, priority=priority
        )
