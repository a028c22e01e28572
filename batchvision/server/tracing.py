"""OpenTelemetry traces of a job's way through the service; optional and off by default.

On only when the ``otel`` extra is installed (``pip install batchvision[otel]``) and an OTLP
endpoint (``BATCHVISION_OTLP_ENDPOINT``, or the SDK's ``OTEL_EXPORTER_OTLP_ENDPOINT``) or a
trace file (``BATCHVISION_TRACE_FILE``) is configured; otherwise every helper here is a no-op
and ``opentelemetry`` is never imported.

The spans of one job:

- ``POST /v1/jobs`` (API, kind SERVER): the HTTP request, continuing a caller's
  ``traceparent``; attributes ``batchvision.job_id`` and ``batchvision.images``.
- ``enqueue <queue>`` (API, PRODUCER): one per Celery message, a child of the request; its
  context travels in the message's headers (``traceparent``). A message that coalesces the
  chunks of several requests is the child of the first and links to the others.
- ``batchvision.classify`` (worker, CONSUMER): one per task, the child of its ``enqueue``.
- ``model batch`` (worker): one per model call, a trace of its own (a batch mixes images of
  several tasks and jobs), with a link to the task span of every image it served (link
  attributes: ``batchvision.job_id``, ``batchvision.images``).

Attributes: ``batchvision.job_id`` (one job) or ``batchvision.job_ids``, ``batchvision.images``,
``batchvision.task_id``, ``batchvision.model``, ``batchvision.batch_size``.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from batchvision.core.batching import BatchInfo
from batchvision.core.settings import Settings
from batchvision.server.messages import Chunk

log = logging.getLogger(__name__)


_lock = threading.Lock()
_tracer: Any = None  # an opentelemetry Tracer once set up; None: tracing is off
_provider: Any = None


def enabled() -> bool:
    return _tracer is not None


def _otlp_configured(settings: Settings, env: Mapping[str, str]) -> bool:
    return bool(
        settings.otlp_endpoint
        or env.get("OTEL_EXPORTER_OTLP_ENDPOINT")
        or env.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    )


def wanted(settings: Settings, environ: Mapping[str, str] | None = None) -> bool:
    """Does the configuration ask for traces (an OTLP endpoint or a trace file)?"""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").strip().lower() == "true":
        return False
    return _otlp_configured(settings, env) or bool(settings.trace_file)


def traces_url(endpoint: str) -> str:
    """The OTLP/HTTP traces URL of a collector's base URL (``http://host:4318``)."""
    endpoint = endpoint.rstrip("/")
    return endpoint if endpoint.endswith("/v1/traces") else endpoint + "/v1/traces"


class _AppendLines:
    """A file that several processes append spans to: one ``write()`` system call per line
    (``O_APPEND``), so lines never interleave."""

    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def write(self, text: str) -> int:
        return os.write(self.fd, text.encode())

    def flush(self) -> None:
        pass


def setup(service: str, settings: Settings) -> bool:
    """Start tracing in this process if the configuration asks for it (once; later calls
    change nothing). Returns whether tracing is on."""
    with _lock:
        if _tracer is not None or not wanted(settings):
            return _tracer is not None
        otlp = _otlp_configured(settings, os.environ)
        try:
            from opentelemetry import trace
            from opentelemetry.sdk.resources import Resource
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.export import (
                BatchSpanProcessor,
                ConsoleSpanExporter,
                SimpleSpanProcessor,
            )

            if otlp:
                from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        except ImportError:
            log.warning(
                "tracing is configured but the otel extra is missing: pip install 'batchvision[otel]'"
            )
            return False
        provider = TracerProvider(resource=Resource.create({"service.name": service}))
        if otlp:
            exporter = (
                OTLPSpanExporter(endpoint=traces_url(settings.otlp_endpoint))
                if settings.otlp_endpoint
                else OTLPSpanExporter()  # the SDK reads OTEL_EXPORTER_OTLP_* itself
            )
            provider.add_span_processor(BatchSpanProcessor(exporter))
        if settings.trace_file:
            # The SDK's own JSON of each span, one line, appended as the span ends.
            out: Any = _AppendLines(settings.trace_file)
            provider.add_span_processor(
                SimpleSpanProcessor(
                    ConsoleSpanExporter(out=out, formatter=lambda span: span.to_json(indent=None) + "\n")
                )
            )
        trace.set_tracer_provider(provider)
        _install(provider)
        log.info("tracing on (%s)", service, extra={"otlp_endpoint": settings.otlp_endpoint or None})
        return True


def _install(provider: Any) -> None:
    """Use ``provider`` for this module's spans (tests pass one with an in-memory exporter)."""
    global _tracer, _provider
    _provider = provider
    _tracer = provider.get_tracer("batchvision")
    _install_log_ids()


def use_provider(provider: Any) -> None:
    """Trace through ``provider`` (an SDK ``TracerProvider``), e.g. with the in-memory
    exporter in tests; ``None`` turns tracing off again."""
    global _tracer, _provider
    with _lock:
        if provider is None:
            _tracer = _provider = None
        else:
            _install(provider)


def flush(timeout_s: float = 5.0) -> None:
    """Export the spans that have ended (before a process exits)."""
    if _provider is not None:
        _provider.force_flush(int(timeout_s * 1000))


_log_ids_installed = False


def _install_log_ids() -> None:
    """Log records made while a span is current carry its ``trace_id`` and ``span_id``."""
    global _log_ids_installed
    if _log_ids_installed:
        return
    _log_ids_installed = True
    from opentelemetry import trace

    previous = logging.getLogRecordFactory()

    def factory(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        ctx = trace.get_current_span().get_span_context()
        if ctx.is_valid:
            record.trace_id = format(ctx.trace_id, "032x")
            record.span_id = format(ctx.span_id, "016x")
        return record

    logging.setLogRecordFactory(factory)


def _jobs(job_ids: Sequence[str]) -> dict[str, Any]:
    unique = sorted(set(job_ids))
    attrs: dict[str, Any] = {"batchvision.job_ids": unique}
    if len(unique) == 1:
        attrs["batchvision.job_id"] = unique[0]
    return attrs


# -- API: the HTTP request --------------------------------------------------------------------


@dataclass
class ServerSpan:
    """An HTTP request's span, current in the request's greenlet until :func:`end_request`."""

    span: Any
    token: Any


def start_request(method: str, route: str, path: str, headers: Any) -> ServerSpan | None:
    """Open the span of an HTTP request (``headers``: the request's, for a caller's
    ``traceparent``) and make it current."""
    if _tracer is None:
        return None
    from opentelemetry import context, propagate, trace

    parent = propagate.extract(headers)
    span = _tracer.start_span(
        f"{method} {route}",
        context=parent,
        kind=trace.SpanKind.SERVER,
        attributes={"http.request.method": method, "http.route": route, "url.path": path},
    )
    token = context.attach(trace.set_span_in_context(span, parent))
    return ServerSpan(span, token)


def annotate_request(handle: ServerSpan | None, status: int, job_id: str | None, images: int | None) -> None:
    if handle is None:
        return
    handle.span.set_attribute("http.response.status_code", status)
    if job_id:
        handle.span.set_attribute("batchvision.job_id", job_id)
    if images is not None:
        handle.span.set_attribute("batchvision.images", images)
    if status >= 500:
        from opentelemetry.trace import Status, StatusCode

        handle.span.set_status(Status(StatusCode.ERROR))


def end_request(handle: ServerSpan | None, error: BaseException | None = None) -> None:
    if handle is None:
        return
    from opentelemetry import context
    from opentelemetry.trace import Status, StatusCode

    if error is not None:
        handle.span.record_exception(error)
        handle.span.set_status(Status(StatusCode.ERROR, type(error).__name__))
    handle.span.end()
    with contextlib.suppress(Exception):  # a context left by another greenlet: nothing to undo
        context.detach(handle.token)


# -- API: enqueue -----------------------------------------------------------------------------


def capture() -> Any:
    """This thread's trace context, to hand to the thread that publishes (the coalescer);
    ``None`` when tracing is off."""
    if _tracer is None:
        return None
    from opentelemetry import context

    return context.get_current()


@contextlib.contextmanager
def enqueue(
    job_ids: Sequence[str],
    images: int,
    queue: str,
    task_id: str,
    contexts: Sequence[Any] = (),
) -> Iterator[dict[str, str]]:
    """The span of publishing one message; yields the headers that carry its context.

    ``contexts``: the captured context of each item's request when another thread publishes
    (coalesced messages): the span is the child of the first, linked to the others."""
    if _tracer is None:
        yield {}
        return
    from opentelemetry import propagate, trace

    parent = contexts[0] if contexts and contexts[0] is not None else None
    links = []
    seen = set()
    for job, ctx in zip(job_ids, contexts, strict=False):
        span_ctx = trace.get_current_span(ctx).get_span_context() if ctx is not None else None
        if span_ctx is None or not span_ctx.is_valid or span_ctx.span_id in seen:
            continue
        seen.add(span_ctx.span_id)
        if ctx is not parent:
            links.append(trace.Link(span_ctx, {"batchvision.job_id": job}))
    attributes = {
        **_jobs(job_ids),
        "batchvision.images": images,
        "batchvision.task_id": task_id,
        "messaging.system": "celery",
        "messaging.destination.name": queue,
        "messaging.message.id": task_id,
    }
    with _tracer.start_as_current_span(
        f"enqueue {queue}", context=parent, kind=trace.SpanKind.PRODUCER, links=links, attributes=attributes
    ):
        headers: dict[str, str] = {}
        propagate.inject(headers)
        yield headers


# -- worker: the task and the model batches ---------------------------------------------------

HEADERS = ("traceparent", "tracestate")


@contextlib.contextmanager
def task(
    header: Callable[[str], Any],
    task_id: str,
    chunks: Sequence[Chunk],
    interactive: bool,
    model: str,
) -> Iterator[None]:
    """The span of one Celery task, the child of the ``enqueue`` whose context the message
    carries (``header(name)`` reads a message header)."""
    if _tracer is None:
        yield
        return
    from opentelemetry import propagate, trace

    carrier = {name: str(value) for name in HEADERS if (value := header(name))}
    attributes = {
        **_jobs([c.job_id for c in chunks]),
        "batchvision.images": sum(len(c) for c in chunks),
        "batchvision.task_id": task_id,
        "batchvision.interactive": interactive,
        "batchvision.model": model,
        "messaging.system": "celery",
        "messaging.message.id": task_id,
    }
    with _tracer.start_as_current_span(
        "batchvision.classify",
        context=propagate.extract(carrier),
        kind=trace.SpanKind.CONSUMER,
        attributes=attributes,
    ):
        yield


class SpanTag(tuple[Any, ...]):
    """A batcher item's tag ``(job_id, enqueued_at)`` that also remembers the span current
    when the item was submitted (the task's)."""

    span_context: Any = None


def span_tag(tag: Any) -> Any:
    """The batcher's ``on_submit`` hook: a tag ``(job_id, enqueued_at)`` that also remembers the
    span of the task thread that submitted it, so that :func:`record_batch` can link the batch
    to the tasks it served. Any other tag, or tracing off: the tag as it is."""
    if _tracer is None or not isinstance(tag, tuple):
        return tag
    from opentelemetry import trace

    tagged = SpanTag(tag)
    tagged.span_context = trace.get_current_span().get_span_context()
    return tagged


def submit_hook() -> Callable[[Any], Any] | None:
    """The ``on_submit`` hook a batcher gets: :func:`span_tag` when tracing is on."""
    return span_tag if _tracer is not None else None


def record_batch(info: BatchInfo, model: str) -> None:
    """The span of one model call, which has just ended (``on_batch``): its own trace, linked
    to the task span of every image in it."""
    if _tracer is None:
        return
    from opentelemetry import context, trace

    per_span: dict[tuple[int, int], tuple[Any, str, int]] = {}
    jobs: list[str] = []
    for tag in info.tags:
        job = str(tag[0]) if isinstance(tag, tuple) and tag else ""
        jobs.append(job)
        span_ctx = getattr(tag, "span_context", None)
        if span_ctx is None or not span_ctx.is_valid:
            continue
        key = (span_ctx.trace_id, span_ctx.span_id)
        _, _, n = per_span.get(key, (span_ctx, job, 0))
        per_span[key] = (span_ctx, job, n + 1)
    links = [
        trace.Link(span_ctx, {"batchvision.job_id": job, "batchvision.images": n})
        for span_ctx, job, n in per_span.values()
    ]
    end = time.time_ns()
    span = _tracer.start_span(
        "model batch",
        context=context.Context(),  # a root: the batch belongs to no single job's trace
        links=links,
        start_time=end - int(info.run_s * 1e9),
        attributes={
            **_jobs(jobs),
            "batchvision.batch_size": info.size,
            "batchvision.images": info.size,
            "batchvision.model": model,
            "batchvision.wait_ms": round(info.wait_s * 1000, 3),
        },
    )
    span.end(end_time=end)
