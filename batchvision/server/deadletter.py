"""RabbitMQ's dead-letter queue, drained by every worker: the RabbitMQ counterpart of the
chunk ledger's sweeper (:mod:`batchvision.server.recovery`), which only Redis needs.

RabbitMQ moves a task message to ``<QUEUE>.dead.letters`` (at least once: quorum queues with the
``at-least-once`` dead-letter strategy) in two cases, told apart by its ``x-death`` header:

- ``rejected``: its task raised after its own retries (Redis unreachable for minutes, a bug).
  With RabbitMQ the worker rejects such a message instead of acknowledging it
  (``task_acks_on_failure_or_timeout`` off). The handler sends the same message again to the
  queue it came from, after a short pause, at most :data:`MAX_RESENDS` times (header
  :data:`RESENDS_HEADER`): on Redis the sweeper re-sends it the same way. The pipeline's
  delivery counts (``claims``) see every resend, so images that keep failing end as
  ``poison_image`` errors after ``BATCHVISION_MAX_ATTEMPTS`` as usual.
- ``delivery_limit``: it came back more than ``x-delivery-limit`` times (workers died or lost
  their connection while holding it, see :func:`~batchvision.server.queue.delivery_limit`).
  The limit is above what the poison-image path needs, so this is a message that kills
  workers before the pipeline can count anything. Every image of it without a result gets
  the error ``delivery_limit`` (``canceled`` if its job was canceled), written with the same
  exactly-once script as every result, and its blobs and ledger entries are removed.

A message that gave up after its resends gets ``task_failed`` errors the same way. Anything
else (not a classify task, an unreadable body) is logged and dropped. A handler that cannot
reach Redis puts the message back and tries again a few seconds later: nothing is lost while
Redis is away.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

from kombu.connection import Connection
from kombu.entity import Exchange
from kombu.message import Message
from kombu.messaging import Consumer, Producer

from batchvision.core.results import Failure, error_result
from batchvision.core.settings import Settings
from batchvision.server.blobs import BlobStore
from batchvision.server.claims import Claims
from batchvision.server.messages import Chunk, ClassifyMessage
from batchvision.server.queue import (
    CLASSIFY_TASK,
    broker_url,
    dead_letter_queue_object,
    delivery_limit,
    task_queue,
)
from batchvision.server.recovery import MAX_RESENDS, resolve_chunks
from batchvision.server.store import JobStore

log = logging.getLogger(__name__)

#: Message header counting the resends of one message.
RESENDS_HEADER = "bv-resends"
#: Heartbeat of the dead-letter consumer's connection, seconds.
HEARTBEAT_S = 60


def chunks_of(body: Any) -> list[Chunk]:
    """The chunks of a classify message's body (Celery protocol 2: ``[args, kwargs, embed]``,
    ``args`` read by :meth:`ClassifyMessage.from_args`); raises ``ValueError``
    (:class:`~batchvision.server.messages.MessageError`) if it is not one."""
    try:
        args, kwargs = body[0], body[1] if len(body) > 1 else {}
    except (TypeError, IndexError, KeyError) as exc:
        raise ValueError(f"not a classify message body: {exc!r}") from None
    if not isinstance(args, list) or not isinstance(kwargs, dict):
        raise ValueError(f"not a classify message body: args {type(args).__name__}")
    return list(ClassifyMessage.from_args(args, kwargs).chunks)


def death(headers: dict[str, Any]) -> tuple[str, str]:
    """(reason, queue) of the latest dead-lettering recorded in ``x-death``."""
    deaths = headers.get("x-death") or []
    if deaths:
        latest = deaths[0]
        return str(latest.get("reason", "")), str(latest.get("queue", ""))
    return str(headers.get("x-first-death-reason", "")), str(headers.get("x-first-death-queue", ""))


class DeadLetters:
    """Handles the dead-letter queue's messages (see the module doc); :meth:`handle` is the
    whole decision, :class:`DeadLetterConsumer` the thread that feeds it."""

    def __init__(
        self,
        settings: Settings,
        store: JobStore,
        claims: Claims,
        blobs: BlobStore,
        pause: Callable[[float], None] = time.sleep,
    ) -> None:
        self.settings = settings
        self.store = store
        self.claims = claims
        self.blobs = blobs
        self.pause = pause
        self.handled: dict[str, int] = {}  # outcome -> count (tests, logs)

    def handle(self, message: Message, producer: Producer) -> str:
        """Decide what becomes of one dead-lettered message; returns the outcome. Raises if
        Redis (or the broker, for a resend) is unreachable: the caller puts it back."""
        headers = dict(message.headers or {})
        if headers.get("task") != CLASSIFY_TASK or message.content_type != "application/json":
            log.error(
                "dropping a dead-lettered message that is no JSON classify task: task=%r, type %r",
                headers.get("task"),
                message.content_type,
            )
            return self._count("dropped")
        try:
            chunks = chunks_of(message.decode())  # type: ignore[no-untyped-call, unused-ignore]
        except Exception as exc:  # noqa: BLE001 - not JSON, or not a classify message's arguments
            log.error("dropping a dead-lettered classify message: %s", exc)
            return self._count("dropped")
        reason, queue = death(headers)
        resends = int(headers.get(RESENDS_HEADER) or 0)
        described = "; ".join(c.describe() for c in chunks)
        if reason == "rejected" and resends < MAX_RESENDS and queue.startswith(self.settings.queue):
            log.warning(
                "re-sending failed task %s (%s) to %s, resend %d of %d",
                headers.get("id"),
                described,
                queue,
                resends + 1,
                MAX_RESENDS,
            )
            self.pause(min(30.0, 2.0**resends))
            self._resend(message, headers, queue, resends + 1, producer)
            return self._count("resent")
        if reason == "rejected":
            code = "task_failed"
            text = f"classifying this image failed {resends + 1} times; see the worker logs"
        else:
            code = "delivery_limit"
            text = (
                f"the message carrying this image came back more than {delivery_limit(self.settings)} "
                f"times without finishing ({reason or 'dead-lettered'}): workers crashed or lost "
                "their broker connection while holding it"
            )
        stored = self.resolve(chunks, error_result(code, text))
        log.error(
            "task %s (%s) dead-lettered (%s): %d image(s) stored as %s",
            headers.get("id"),
            described,
            reason,
            stored,
            code,
        )
        return self._count(code)

    def resolve(self, chunks: Sequence[Chunk], result: Failure) -> int:
        """Give every image of ``chunks`` without a result ``result`` (see :func:`resolve_chunks`)."""
        return resolve_chunks(self.store, self.claims, self.blobs, chunks, result)

    def _resend(
        self, message: Message, headers: dict[str, Any], queue: str, resends: int, producer: Producer
    ) -> None:
        for key in list(headers):
            if key.startswith("x-"):  # x-death and friends: this is a fresh message
                del headers[key]
        headers[RESENDS_HEADER] = resends
        target = task_queue(self.settings, queue)
        producer.publish(  # type: ignore[no-untyped-call, unused-ignore]
            message.body,
            exchange=target.exchange,
            routing_key=queue,
            headers=headers,
            content_type=message.content_type,
            content_encoding=message.content_encoding,
            delivery_mode=2,
            declare=[target],
            retry=True,
            retry_policy={"max_retries": 3},
        )

    def _count(self, outcome: str) -> str:
        self.handled[outcome] = self.handled.get(outcome, 0) + 1
        return outcome


class DeadLetterConsumer(threading.Thread):
    """A daemon thread of each worker that consumes the dead-letter queue (its own connection,
    prefetch 1) and hands every message to :meth:`DeadLetters.handle`; reconnects forever."""

    def __init__(self, handler: DeadLetters, retry_s: float = 3.0) -> None:
        super().__init__(name="dead-letters", daemon=True)
        self.handler = handler
        self.retry_s = retry_s
        self._stop = threading.Event()

    def run(self) -> None:
        while not self._stop.is_set():
            try:
                self._consume()
            except Exception as exc:  # noqa: BLE001 - broker away: reconnect after a pause
                log.warning("dead-letter consumer: %s; reconnecting", exc)
                self._stop.wait(self.retry_s)

    def _consume(self) -> None:
        settings = self.handler.settings
        # Heartbeats: a silent partition closes the connection, so RabbitMQ hands a message this
        # consumer held to another worker's (checked every second below; a pause is <= 30 s).
        with Connection(  # type: ignore[no-untyped-call, unused-ignore]
            broker_url(settings), heartbeat=HEARTBEAT_S, transport_options={"confirm_publish": True}
        ) as conn:
            conn.ensure_connection(max_retries=1)
            channel = conn.channel()
            queue = dead_letter_queue_object(settings)(channel)
            queue.declare()  # type: ignore[no-untyped-call, unused-ignore]
            producer = Producer(conn.channel(), exchange=Exchange(""))  # type: ignore[no-untyped-call, unused-ignore]

            def on_message(message: Message) -> None:
                try:
                    self.handler.handle(message, producer)
                except Exception:  # noqa: BLE001 - Redis or the broker away: keep it, retry
                    log.exception("dead-lettered message kept for a retry")
                    self._stop.wait(self.retry_s)
                    message.requeue()  # type: ignore[no-untyped-call, unused-ignore]
                    return
                message.ack()  # type: ignore[no-untyped-call, unused-ignore]

            with Consumer(channel, [queue], on_message=on_message, prefetch_count=1, accept=["json"]):  # type: ignore[no-untyped-call, unused-ignore]
                while not self._stop.is_set():
                    try:
                        conn.drain_events(timeout=1.0)
                    except TimeoutError:  # socket.timeout: nothing arrived this second
                        conn.heartbeat_check()  # type: ignore[no-untyped-call, unused-ignore]

    def stop(self) -> None:
        self._stop.set()
