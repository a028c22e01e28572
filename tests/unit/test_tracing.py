"""Tracing helpers with the OpenTelemetry SDK's in-memory exporter: the context crosses the
Celery headers and the coalescer's thread, a batch links to the task spans it served, and
nothing happens (no span, no header) when tracing is off. The spans of real API and worker
processes are checked in tests/integration/test_observability.py."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest

from batchvision.core.batching import DynamicBatcher
from batchvision.core.settings import Settings
from batchvision.server import tracing
from batchvision.server.messages import Chunk
from batchvision.server.queue import Enqueuer, publish

otel = pytest.importorskip(
    "opentelemetry.sdk.trace", reason="the otel extra (pip install 'batchvision[otel]')"
)
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind  # noqa: E402


@pytest.fixture()
def spans() -> Iterator[InMemorySpanExporter]:
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.use_provider(provider)
    try:
        yield exporter
    finally:
        tracing.use_provider(None)


class FakeCelery:
    """What publish() and Enqueuer use of a Celery app: send_task and a producer."""

    def __init__(self) -> None:
        self.sent: list[dict[str, Any]] = []
        self.lock = threading.Lock()

    def send_task(self, name: str, **options: Any) -> None:
        with self.lock:
            self.sent.append({"name": name, **options})

    @contextlib.contextmanager
    def producer_or_acquire(self) -> Iterator[None]:
        yield None


SETTINGS = Settings.from_env({}, enqueue_linger_ms=50.0)


def by_name(exporter: InMemorySpanExporter, name: str) -> list[ReadableSpan]:
    return [s for s in exporter.get_finished_spans() if s.name == name]


def test_off_by_default_no_spans_no_headers() -> None:
    assert not tracing.wanted(Settings.from_env({}), environ={})
    assert tracing.wanted(Settings.from_env({}, otlp_endpoint="http://c:4318"), environ={})
    assert tracing.wanted(Settings.from_env({}), environ={"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318"})
    assert not tracing.wanted(
        Settings.from_env({}, trace_file="/tmp/x"), environ={"OTEL_SDK_DISABLED": "true"}
    )
    assert not tracing.enabled()
    app = FakeCelery()
    publish(app, SETTINGS, [Chunk.of("job1", [0, 1])], 1.0)
    (message,) = app.sent
    assert "headers" not in message and message["task_id"]
    with tracing.task(lambda _: None, "t", [Chunk.of("job1", [0])], False, "m"):
        pass
    assert tracing.submit_hook() is None
    assert tracing.capture() is None


def test_traces_url() -> None:
    assert tracing.traces_url("http://collector:4318") == "http://collector:4318/v1/traces"
    assert tracing.traces_url("http://collector:4318/v1/traces/") == "http://collector:4318/v1/traces"


def test_request_enqueue_and_task_form_one_trace(spans: InMemorySpanExporter) -> None:
    app = FakeCelery()
    handle = tracing.start_request("POST", "/v1/jobs", "/v1/jobs", {})
    publish(app, SETTINGS, [Chunk.of("job1", [0, 1, 2])], 1.0)
    tracing.annotate_request(handle, 202, "job1", 3)
    tracing.end_request(handle)
    (message,) = app.sent
    headers = message["headers"]
    assert headers["traceparent"].startswith("00-")
    # the worker side: the task reads the message's headers
    with tracing.task(headers.get, message["task_id"], [Chunk.of("job1", [0, 1, 2])], False, "demo"):
        pass
    (request,) = by_name(spans, "POST /v1/jobs")
    (enqueue,) = by_name(spans, "enqueue batchvision")
    (task,) = by_name(spans, "batchvision.classify")
    assert (
        request.kind == SpanKind.SERVER
        and enqueue.kind == SpanKind.PRODUCER
        and task.kind == SpanKind.CONSUMER
    )
    assert request.context is not None and enqueue.context is not None and task.context is not None
    trace_id = request.context.trace_id
    assert enqueue.context.trace_id == trace_id and task.context.trace_id == trace_id
    assert enqueue.parent is not None and enqueue.parent.span_id == request.context.span_id
    assert task.parent is not None and task.parent.span_id == enqueue.context.span_id
    assert request.attributes is not None and request.attributes["batchvision.job_id"] == "job1"
    assert request.attributes["batchvision.images"] == 3
    assert task.attributes is not None and task.attributes["batchvision.task_id"] == message["task_id"]
    assert task.attributes["batchvision.images"] == 3 and task.attributes["batchvision.model"] == "demo"


def test_a_callers_traceparent_is_continued(spans: InMemorySpanExporter) -> None:
    caller = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    handle = tracing.start_request("GET", "/v1/jobs/<job_id>", "/v1/jobs/x", {"traceparent": caller})
    tracing.end_request(handle)
    (span,) = spans.get_finished_spans()
    assert span.context is not None and format(span.context.trace_id, "032x") == caller.split("-")[1]
    assert span.parent is not None and format(span.parent.span_id, "016x") == caller.split("-")[2]


def test_a_coalesced_message_is_a_child_of_the_first_request_and_links_the_others(
    spans: InMemorySpanExporter,
) -> None:
    app = FakeCelery()
    enqueuer = Enqueuer(app, SETTINGS)
    release = threading.Barrier(3)

    def request(job: str) -> None:
        handle = tracing.start_request("POST", "/v1/classify", "/v1/classify", {})
        release.wait()
        enqueuer.send([Chunk.of(job, [0])], 1.0, interactive=True)  # the coalescer's thread publishes
        tracing.end_request(handle)

    threads = [threading.Thread(target=request, args=(f"job{n}",)) for n in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    request_spans = {s.context.span_id: s for s in by_name(spans, "POST /v1/classify") if s.context}
    assert len(request_spans) == 3
    enqueues = by_name(spans, "enqueue batchvision.interactive")
    assert sum(len(e.attributes["batchvision.job_ids"]) for e in enqueues if e.attributes) == 3
    reached = set()
    for enqueue in enqueues:
        assert enqueue.parent is not None and enqueue.parent.span_id in request_spans
        reached.add(enqueue.parent.span_id)
        reached |= {link.context.span_id for link in enqueue.links}
        for link in enqueue.links:
            assert link.attributes is not None and str(link.attributes["batchvision.job_id"]).startswith(
                "job"
            )
    assert reached == set(request_spans), "every request's trace reaches a message"
    assert any(e.links for e in enqueues), "at least two requests shared a message"


def test_a_batch_links_to_the_task_spans_of_its_images(spans: InMemorySpanExporter) -> None:
    hook = tracing.submit_hook()
    assert hook is tracing.span_tag
    batches: list[Any] = []
    gate = threading.Event()

    def predict(items: list[int]) -> list[int]:
        gate.wait(5)
        return [x * 2 for x in items]

    batcher = DynamicBatcher(
        predict, max_batch_size=8, max_delay_s=0.5, on_batch=lambda info: batches.append(info), on_submit=hook
    )
    headers: dict[str, str] = {}

    def task(task_id: str, job: str, n: int, ready: threading.Barrier) -> None:
        with tracing.task(headers.get, task_id, [Chunk.of(job, range(n))], False, "demo"):
            with batcher.reserve(n) as slot:
                ready.wait()
                futures = [slot.submit(i, tag=(job, 1.0)) for i in range(n)]
            assert [f.result(5) for f in futures] == [2 * i for i in range(n)]

    ready = threading.Barrier(2)
    threads = [
        threading.Thread(target=task, args=("t1", "jobA", 3, ready)),
        threading.Thread(target=task, args=("t2", "jobB", 2, ready)),
    ]
    for t in threads:
        t.start()
    gate.set()
    for t in threads:
        t.join()
    batcher.close()
    for info in batches:
        tracing.record_batch(info, "demo")
    tasks = {
        s.attributes["batchvision.task_id"]: s for s in by_name(spans, "batchvision.classify") if s.attributes
    }
    linked: dict[str, int] = {}
    for batch in by_name(spans, "model batch"):
        assert batch.parent is None, "a batch is a trace of its own"
        assert batch.attributes is not None and batch.attributes["batchvision.model"] == "demo"
        assert (
            sum(int(link.attributes["batchvision.images"]) for link in batch.links if link.attributes)
            == (batch.attributes["batchvision.batch_size"])
        )
        for link in batch.links:
            (task_id,) = [
                t for t, s in tasks.items() if s.context and s.context.span_id == link.context.span_id
            ]
            assert link.attributes is not None
            assert link.attributes["batchvision.job_id"] == {"t1": "jobA", "t2": "jobB"}[task_id]
            linked[task_id] = linked.get(task_id, 0) + int(link.attributes["batchvision.images"])
    assert linked == {"t1": 3, "t2": 2}, "every image's batch links to its task"


def test_log_records_carry_the_current_trace(spans: InMemorySpanExporter) -> None:
    import logging

    handle = tracing.start_request("GET", "/x", "/x", {})
    rec = logging.getLogger("t").makeRecord("t", logging.INFO, __file__, 1, "m", None, None)
    tracing.end_request(handle)
    (span,) = spans.get_finished_spans()
    assert span.context is not None
    assert rec.trace_id == format(span.context.trace_id, "032x")  # type: ignore[attr-defined]
