"""The client's one retry policy, against a real HTTP server in a thread that misbehaves on cue:
``503``/``429`` with ``Retry-After``, ``502``/``504``, connections dropped before the answer,
bodies and result streams cut off mid-way, a port nobody listens on yet.

Every call must come through a blip with the same request semantics (one ``Idempotency-Key``
per logical create, re-sent unchanged), give up within its time budget, and never retry an
answer that retrying cannot change (``400``, ``404``, ``409 job_sealed``).
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest
import requests
from pydantic import ValidationError

from batchvision.client import ApiError, Client, NoImages
from batchvision.client.bulk import submit_folder
from batchvision.client.retry import Budget, RetryPolicy
from batchvision.core.documents import ClassifyResult, JobAccepted, ResultRow
from batchvision.testing.faultproxy import FaultProxy

JOB_ID = "0123456789abcdef0123456789abcdef"
#: Fast retries for tests: the waits are real, only short.
FAST = RetryPolicy(retry_for_s=5.0, backoff_s=0.01, backoff_max_s=0.05)


@dataclass
class Call:
    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: bytes


Action = Callable[["Handler", Call], None]


@dataclass
class FakeApi:
    """Scripted answers per (method, path): each request takes the next action of its route;
    the last one repeats."""

    url: str = ""
    calls: list[Call] = field(default_factory=list)
    script: dict[tuple[str, str], list[Action]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def on(self, method: str, path: str, *actions: Action) -> None:
        self.script[(method, path)] = list(actions)

    def take(self, call: Call) -> Action:
        with self.lock:
            self.calls.append(call)
            actions = self.script.get((call.method, call.path))
            if not actions:
                return reply(404, {"error": {"code": "not_found", "message": "no route"}})
            return actions.pop(0) if len(actions) > 1 else actions[0]

    def called(self, method: str, path: str) -> list[Call]:
        return [c for c in self.calls if (c.method, c.path) == (method, path)]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, as gunicorn: the client reuses connections
    api: FakeApi

    def _handle(self) -> None:
        url = urlsplit(self.path)
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else b""
        call = Call(self.command, url.path, parse_qs(url.query), dict(self.headers.items()), body)
        self.api.take(call)(self, call)

    do_GET = do_POST = do_DELETE = _handle

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def send(
        self, status: int, body: bytes, headers: dict[str, str] | None = None, send_bytes: int = -1
    ) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if send_bytes < 0:
            self.wfile.write(body)
            return
        self.wfile.write(body[:send_bytes])  # then hang up: the body is cut off
        self.wfile.flush()
        self.close_connection = True


def reply(status: int, doc: Any, headers: dict[str, str] | None = None) -> Action:
    return lambda h, _call: h.send(status, json.dumps(doc).encode(), headers)


def unavailable(retry_after: str | None = None, status: int = 503) -> Action:
    headers = {"Retry-After": retry_after} if retry_after is not None else {}
    return reply(status, {"error": {"code": "unavailable", "message": "Redis is restarting"}}, headers)


def drop() -> Action:
    """Read the whole request, then close the connection without an answer (the server may
    have done the work: the client cannot know)."""

    def act(h: Handler, _call: Call) -> None:
        h.close_connection = True
        h.connection.shutdown(socket.SHUT_RDWR)

    return act


def cut(status: int, doc: Any, send_bytes: int) -> Action:
    return lambda h, _call: h.send(status, json.dumps(doc).encode(), send_bytes=send_bytes)


class Server(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that hung up (the faults under test): nothing to report


def cut_headers() -> Action:
    """A status line and some headers, then the connection ends: no framing, an empty body."""

    def act(h: Handler, _call: Call) -> None:
        h.wfile.write(b"HTTP/1.1 200 OK\r\nContent-Type: application/x-ndjson\r\n")
        h.wfile.flush()
        h.close_connection = True

    return act


@pytest.fixture()
def api() -> Iterator[FakeApi]:
    fake = FakeApi()
    handler = type("BoundHandler", (Handler,), {"api": fake})
    server = Server(("127.0.0.1", 0), handler)
    fake.url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield fake
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.fixture()
def client(api: FakeApi) -> Iterator[Client]:
    with Client(api.url, api_key="", policy=FAST) as c:
        yield c


def job(**extra: Any) -> dict[str, Any]:
    return {
        "job_id": JOB_ID,
        "status": "running",
        "total": 3,
        "done": 1,
        "failed": 0,
        "canceled": 0,
        "created_at": 1.0,
        "finished_at": None,
        "model": "m",
        "status_url": f"/v1/jobs/{JOB_ID}",
        "results_url": f"/v1/jobs/{JOB_ID}/results",
        **extra,
    }


def test_503_with_retry_after_is_waited_out_then_answered(api: FakeApi, client: Client) -> None:
    api.on("GET", f"/v1/jobs/{JOB_ID}", unavailable("1"), unavailable("1"), reply(200, job()))
    start = time.monotonic()
    assert client.status(JOB_ID).job_id == JOB_ID
    elapsed = time.monotonic() - start
    assert len(api.called("GET", f"/v1/jobs/{JOB_ID}")) == 3
    assert 2.0 <= elapsed < 4.0, "waited what Retry-After asked, twice, and not much more"


def test_each_retry_is_one_log_line_saying_why_and_when_the_next_try_is(
    api: FakeApi, client: Client, caplog: pytest.LogCaptureFixture
) -> None:
    api.on("GET", f"/v1/jobs/{JOB_ID}", unavailable("0", status=502), reply(200, job()))
    with caplog.at_level(logging.INFO, logger="batchvision.client.retry"):
        assert client.status(JOB_ID).job_id == JOB_ID
    (line,) = [r.getMessage() for r in caplog.records if r.name == "batchvision.client.retry"]
    assert line.startswith(f"retrying GET /v1/jobs/{JOB_ID} after HTTP 502: next try in "), line


def test_the_cli_names_where_and_why_the_api_could_not_be_reached(capsys: pytest.CaptureFixture[str]) -> None:
    from batchvision.cli.commands import ExitCode
    from batchvision.cli.main import main

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert main(["status", JOB_ID, "--api-url", url, "--retry-for", "1"]) == ExitCode.REQUEST_FAILED
    err = capsys.readouterr().err  # the CLI logs on stderr
    assert f"error: cannot reach the API: {url}/v1/jobs/{JOB_ID}: NewConnectionError (" in err, err
    assert "HTTPConnectionPool" not in err and "Max retries" not in err
    # urllib3's own retry warnings (a screenful each) are left to the client's one-line log.
    assert f"retrying GET /v1/jobs/{JOB_ID} after NewConnectionError (" in err, err
    assert "urllib3" not in err and "Retrying (" not in err, err


@pytest.mark.parametrize("status", [408, 429, 502, 503, 504])
def test_each_retryable_status_is_retried(api: FakeApi, client: Client, status: int) -> None:
    path = f"/v1/jobs/{JOB_ID}/cancel"
    api.on("POST", path, unavailable(status=status), reply(200, job(status="canceled")))
    assert client.cancel(JOB_ID).status == "canceled"
    assert len(api.called("POST", path)) == 2


@pytest.mark.parametrize(
    ("status", "code"),
    [(400, "bad_request"), (404, "job_not_found"), (409, "job_sealed"), (500, "internal_error")],
)
def test_an_answer_a_retry_cannot_change_is_not_retried(
    api: FakeApi, client: Client, status: int, code: str
) -> None:
    api.on("POST", f"/v1/jobs/{JOB_ID}/seal", reply(status, {"error": {"code": code, "message": "no"}}))
    with pytest.raises(ApiError) as err:
        client.seal(JOB_ID)
    assert (err.value.status, err.value.code) == (status, code)
    assert len(api.called("POST", f"/v1/jobs/{JOB_ID}/seal")) == 1


def test_job_creation_survives_a_dropped_connection_with_one_idempotency_key(
    api: FakeApi, client: Client
) -> None:
    # The first try reaches the server, which creates the job, but the answer is lost: the
    # retry must carry the same key so the API can answer with that job, not a second one.
    api.on(
        "POST",
        "/v1/jobs",
        drop(),
        unavailable("0"),
        reply(200, job(idempotent_replay=True, expected=3)),
    )
    opened = client.open_job(3)
    assert opened.job_id == JOB_ID
    tries = api.called("POST", "/v1/jobs")
    assert len(tries) == 3
    keys = {c.headers.get("Idempotency-Key") for c in tries}
    assert len(keys) == 1 and None not in keys
    assert all(json.loads(c.body) == {"expected": 3} for c in tries)
    # A second logical create gets a key of its own.
    api.on("POST", "/v1/jobs", reply(202, job()))
    client.open_job(3)
    assert api.called("POST", "/v1/jobs")[-1].headers["Idempotency-Key"] not in keys


def test_a_multipart_upload_is_resent_whole_after_a_drop(api: FakeApi, client: Client) -> None:
    api.on("POST", f"/v1/jobs/{JOB_ID}/files", drop(), drop(), reply(202, job(accepted=2)))
    files = [("a/x.jpg", b"\xff\xd8\xff" + b"x" * 5000), ("b/y.jpg", b"\xff\xd8\xff" + b"y" * 7000)]
    assert client.add_part(JOB_ID, files).accepted == 2
    bodies = [c.body for c in api.called("POST", f"/v1/jobs/{JOB_ID}/files")]
    assert len(bodies) == 3
    for body in bodies:
        assert b"a/x.jpg" in body and b"b/y.jpg" in body and b"y" * 7000 in body


def test_idempotency_conflict_means_the_first_try_is_still_running(api: FakeApi, client: Client) -> None:
    conflict = {"error": {"code": "idempotency_conflict", "message": "still in progress"}}
    api.on("POST", "/v1/jobs", drop(), reply(409, conflict), reply(409, conflict), reply(200, job()))
    assert client.submit_files([("a.jpg", b"\xff\xd8\xff")]).job_id == JOB_ID
    tries = api.called("POST", "/v1/jobs")
    assert len(tries) == 4
    assert len({c.headers["Idempotency-Key"] for c in tries}) == 1


def test_a_body_cut_off_after_the_headers_is_fetched_again(api: FakeApi, client: Client) -> None:
    api.on("GET", f"/v1/jobs/{JOB_ID}", cut(200, job(), send_bytes=20), reply(200, job(done=3)))
    assert client.status(JOB_ID).done == 3
    assert len(api.called("GET", f"/v1/jobs/{JOB_ID}")) == 2


def test_nobody_listening_yet_is_retried_until_the_server_comes(
    tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    fake = FakeApi(url=f"http://127.0.0.1:{port}")
    fake.on("GET", f"/v1/jobs/{JOB_ID}", reply(200, job()))
    handler = type("BoundHandler", (Handler,), {"api": fake})
    servers: list[Server] = []

    def serve_later() -> None:
        time.sleep(0.5)
        server = Server(("127.0.0.1", port), handler)
        servers.append(server)
        server.serve_forever(0.05)

    thread = threading.Thread(target=serve_later, daemon=True)
    thread.start()
    try:
        with Client(fake.url, api_key="", policy=FAST) as c:
            assert c.status(JOB_ID).job_id == JOB_ID
    finally:
        wait_until(lambda: servers, timeout=10, interval=0.01, message="the late server is up")
        servers[0].shutdown()
        servers[0].server_close()
        thread.join(5)


def test_the_budget_bounds_the_retries(api: FakeApi) -> None:
    api.on("GET", f"/v1/jobs/{JOB_ID}", unavailable())
    with Client(
        api.url, api_key="", policy=RetryPolicy(retry_for_s=1.0, backoff_s=0.05, backoff_max_s=0.2)
    ) as c:
        start = time.monotonic()
        with pytest.raises(ApiError) as err:
            c.status(JOB_ID)
        elapsed = time.monotonic() - start
    assert err.value.status == 503  # the last answer, as the server gave it
    assert elapsed < 1.5
    assert len(api.called("GET", f"/v1/jobs/{JOB_ID}")) >= 4


def test_a_retry_after_beyond_the_budget_is_not_slept(api: FakeApi) -> None:
    api.on("POST", "/v1/jobs", unavailable("60", status=429))
    with Client(api.url, api_key="", policy=RetryPolicy(retry_for_s=2.0)) as c:
        start = time.monotonic()
        with pytest.raises(ApiError) as err:
            c.open_job()
        assert time.monotonic() - start < 1.0
    assert err.value.status == 429 and err.value.retry_after == "60"
    assert len(api.called("POST", "/v1/jobs")) == 1


def test_a_dead_server_fails_within_the_budget(tmp_path: Path) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with Client(
        f"http://127.0.0.1:{port}", api_key="", policy=RetryPolicy(retry_for_s=1.0, backoff_s=0.05)
    ) as c:
        start = time.monotonic()
        with pytest.raises(requests.ConnectionError):
            c.status(JOB_ID)
        assert time.monotonic() - start < 2.0


def test_wait_polls_through_an_outage(api: FakeApi, client: Client) -> None:
    api.on(
        "GET",
        f"/v1/jobs/{JOB_ID}",
        reply(200, job()),
        unavailable("0"),
        drop(),
        unavailable("0", status=502),
        reply(200, job(done=2)),
        reply(200, job(status="succeeded", done=3, finished_at=2.0)),
    )
    seen: list[int] = []
    final = client.wait(JOB_ID, timeout=10, poll_s=0.01, on_progress=lambda st: seen.append(st.done))
    assert final.status == "succeeded"
    assert seen == [1, 2, 3]


def test_wait_long_polls(api: FakeApi, client: Client) -> None:
    api.on(
        "GET",
        f"/v1/jobs/{JOB_ID}",
        reply(200, job()),
        reply(200, job(status="succeeded", done=3, finished_at=2.0)),
    )
    # Each poll asks the API to hold it up to poll_s (the fake answers at once).
    final = client.wait(JOB_ID, timeout=600, poll_s=0.05)
    assert final.status == "succeeded"
    polls = api.called("GET", f"/v1/jobs/{JOB_ID}")
    assert [c.query["wait"] for c in polls] == [["0.05"], ["0.05"]]


def test_wait_sleeps_what_a_poll_answered_early_did_not_hold(api: FakeApi, client: Client) -> None:
    # An API that answers at once (its SYNC_TIMEOUT_S caps the wait at 0): no busy loop.
    api.on(
        "GET",
        f"/v1/jobs/{JOB_ID}",
        reply(200, job()),
        reply(200, job()),
        reply(200, job(status="succeeded", done=3, finished_at=2.0)),
    )
    started = time.monotonic()
    assert client.wait(JOB_ID, timeout=30, poll_s=0.3).status == "succeeded"
    assert time.monotonic() - started >= 0.55  # two polls answered early, each slept out
    assert len(api.called("GET", f"/v1/jobs/{JOB_ID}")) == 3


@pytest.mark.parametrize("with_details", [True, False])
def test_wait_polls_plainly_an_api_without_long_polls(
    api: FakeApi, client: Client, with_details: bool
) -> None:
    refused: dict[str, Any] = {
        "error": {
            "code": "bad_parameter",
            "message": "query parameter 'wait': extra inputs are not permitted; this route takes: none",
        }
    }
    if with_details:  # as the API's contract writes it; without: only the message names it
        refused["error"]["details"] = [
            {"in": "query parameter", "field": "wait", "message": "Extra inputs are forbidden"}
        ]

    def older_api(h: Handler, call: Call) -> None:
        if "wait" in call.query:
            h.send(400, json.dumps(refused).encode())
        elif len(api.called("GET", call.path)) < 3:
            h.send(200, json.dumps(job()).encode())
        else:
            h.send(200, json.dumps(job(status="succeeded", done=3, finished_at=2.0)).encode())

    api.on("GET", f"/v1/jobs/{JOB_ID}", older_api)
    assert client.wait(JOB_ID, timeout=30, poll_s=0.01).status == "succeeded"
    asked = [bool(c.query.get("wait")) for c in api.called("GET", f"/v1/jobs/{JOB_ID}")]
    assert asked == [True, False, False]  # asked once, then polled without


def test_wait_raises_a_refusal_that_is_not_about_long_polls(api: FakeApi, client: Client) -> None:
    # Only a 400 naming `wait` means "an older API"; any other one is the caller's problem,
    # not a reason to poll without long polls.
    refused = {
        "error": {
            "code": "bad_parameter",
            "message": "query parameter 'offset': input should be a valid integer (got 'x')",
            "details": [{"in": "query parameter", "field": "offset", "message": "not an integer"}],
        }
    }
    api.on("GET", f"/v1/jobs/{JOB_ID}", lambda h, call: h.send(400, json.dumps(refused).encode()))
    with pytest.raises(ApiError) as err:
        client.wait(JOB_ID, timeout=30, poll_s=0.01)
    assert err.value.status == 400 and "offset" in str(err.value)
    assert len(api.called("GET", f"/v1/jobs/{JOB_ID}")) == 1


def _plain(rows: Iterable[ResultRow]) -> list[dict[str, Any]]:
    """Typed rows back as the documents the server sent."""
    return [row.model_dump(exclude_unset=True) for row in rows]


def _rows(n: int) -> list[dict[str, Any]]:
    return [
        {"index": i, "filename": f"d/{i}.jpg", "status": "ok", "label": "circle", "score": 0.9}
        for i in range(n)
    ]


def results_stream(rows: list[dict[str, Any]], cut_at_rows: list[int]) -> Action:
    """JSON Lines from ``?offset=``; the first answers are cut off after that many rows (plus
    half of the next one), the last is whole."""
    cuts = list(cut_at_rows)

    def act(h: Handler, call: Call) -> None:
        offset = int(call.query.get("offset", ["0"])[0])
        lines = [json.dumps(r).encode() + b"\n" for r in rows[offset:]]
        body = b"".join(lines)
        if cuts:
            n = cuts.pop(0)
            send = sum(len(x) for x in lines[:n]) + len(lines[n]) // 2
            h.send(200, body, send_bytes=send)
        else:
            h.send(200, body)

    return act


def test_results_stream_resumes_after_the_last_complete_row(api: FakeApi, client: Client) -> None:
    rows = _rows(50)
    api.on("GET", f"/v1/jobs/{JOB_ID}/results", results_stream(rows, [7, 20]))
    assert _plain(client.iter_results(JOB_ID)) == rows  # every row once, in order
    offsets = [int(c.query["offset"][0]) for c in api.called("GET", f"/v1/jobs/{JOB_ID}/results")]
    # Resumed twice, each time after the rows it had whole (a row in a half-read chunk is
    # asked for again, never yielded twice).
    assert len(offsets) == 3 and offsets[0] == 0
    assert 0 < offsets[1] <= 7 and offsets[1] < offsets[2] <= offsets[1] + 20


def test_a_stream_cut_after_its_retry_budget_is_still_resumed(api: FakeApi) -> None:
    # The consumer is slow: each cut comes after the call's first retry budget (1 s) ran out.
    # Rows came since, so the stream is resumed with a fresh budget.
    # Rows of 2 KB: the client reads in blocks of 512 bytes, so rows before a cut are yielded
    # (a cut inside the first block would fail before any row).
    rows = [{**r, "filename": f"{'d' * 2000}/{r['index']}.jpg"} for r in _rows(6)]
    api.on("GET", f"/v1/jobs/{JOB_ID}/results", results_stream(rows, [2, 2]))
    policy = RetryPolicy(retry_for_s=1.0, backoff_s=0.01, backoff_max_s=0.05)
    got = []
    with Client(api.url, api_key="", policy=policy) as slow:
        for row in slow.iter_results(JOB_ID):
            got.append(row)
            time.sleep(0.6)  # the consumer's own work, not a wait for the test
    assert _plain(got) == rows
    offsets = [int(c.query["offset"][0]) for c in api.called("GET", f"/v1/jobs/{JOB_ID}/results")]
    assert len(offsets) == 3 and 0 < offsets[1] < offsets[2]  # resumed twice, each after rows


def test_download_cut_off_is_fetched_again_whole(api: FakeApi, client: Client, tmp_path: Path) -> None:
    rows = _rows(40)
    api.on("GET", f"/v1/jobs/{JOB_ID}/results", unavailable("0"), results_stream(rows, [10]))
    out = tmp_path / "results.jsonl"
    n = client.download(JOB_ID, out, "jsonl")
    assert [json.loads(line) for line in out.read_text().splitlines()] == rows
    assert n == out.stat().st_size
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.jsonl"]  # no partial file left


def test_a_download_that_ends_in_an_error_leaves_no_partial_file(
    api: FakeApi, client: Client, tmp_path: Path
) -> None:
    gone = reply(404, {"error": {"code": "job_not_found", "message": "deleted meanwhile"}})
    api.on("GET", f"/v1/jobs/{JOB_ID}/results", results_stream(_rows(40), [10]), gone)
    with pytest.raises(ApiError):
        client.download(JOB_ID, tmp_path / "results.jsonl", "jsonl")
    assert list(tmp_path.iterdir()) == []


def test_an_answer_cut_in_its_headers_is_not_taken_for_an_empty_one(
    api: FakeApi, client: Client, tmp_path: Path
) -> None:
    rows = _rows(5)
    api.on("GET", f"/v1/jobs/{JOB_ID}/results", cut_headers(), results_stream(rows, []))
    assert _plain(client.results(JOB_ID)) == rows
    api.on("GET", f"/v1/jobs/{JOB_ID}/results", cut_headers(), results_stream(rows, []))
    out = tmp_path / "r.jsonl"
    client.download(JOB_ID, out, "jsonl")
    assert len(out.read_text().splitlines()) == 5
    api.on("GET", f"/v1/jobs/{JOB_ID}", cut_headers(), reply(200, job()))
    assert client.status(JOB_ID).job_id == JOB_ID


def test_submit_folder_through_a_flaky_api_opens_one_job(
    api: FakeApi, client: Client, tmp_path: Path
) -> None:
    for i in range(5):
        (tmp_path / f"sub{i % 2}").mkdir(exist_ok=True)
        (tmp_path / f"sub{i % 2}" / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes([i]) * 100)
    api.on("POST", "/v1/jobs", drop(), reply(200, job(idempotent_replay=True)))
    api.on(
        "POST",
        f"/v1/jobs/{JOB_ID}/files",
        unavailable("0"),
        reply(202, job(accepted=2)),
        drop(),
        reply(202, job(accepted=2)),
        reply(202, job(accepted=1)),
    )
    api.on("POST", f"/v1/jobs/{JOB_ID}/seal", unavailable("0", status=504), reply(200, job()))
    summary = submit_folder(client, [tmp_path], part_files=2)
    assert summary.job_id == JOB_ID and summary.sent == 5
    assert len({c.headers["Idempotency-Key"] for c in api.called("POST", "/v1/jobs")}) == 1
    sent = [c.body for c in api.called("POST", f"/v1/jobs/{JOB_ID}/files")]
    assert len(sent) == 5
    assert len(api.called("POST", f"/v1/jobs/{JOB_ID}/seal")) == 2


def test_submit_folder_without_images_creates_nothing(api: FakeApi, client: Client, tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("not an image")
    with pytest.raises(NoImages, match="no image files in") as err:
        submit_folder(client, [tmp_path])
    assert err.value.code == "no_images" and err.value.details == ["notes.txt"]
    assert not api.called("POST", "/v1/jobs")


def test_every_call_survives_a_proxy_that_breaks_every_third_request(api: FakeApi) -> None:
    # The TCP fault proxy of the integration test, in front of the scripted server: truncated
    # requests, lost answers and answers cut mid-way, in turn, on kept-alive connections too.
    rows = _rows(300)
    api.on("GET", f"/v1/jobs/{JOB_ID}", reply(200, job()))
    api.on("POST", "/v1/jobs", reply(202, job()))
    api.on("POST", f"/v1/jobs/{JOB_ID}/files", reply(202, job(accepted=1)))
    api.on("GET", f"/v1/jobs/{JOB_ID}/results", results_stream(rows, []))
    host, port = urlsplit(api.url).hostname, urlsplit(api.url).port
    assert host is not None and port is not None
    with FaultProxy((host, port), every=3, midway_max=3000) as proxy, Client(proxy.url, policy=FAST) as c:
        for _ in range(10):
            assert c.status(JOB_ID).job_id == JOB_ID
            assert c.open_job(1).job_id == JOB_ID
            assert c.add_part(JOB_ID, [("a/b.jpg", b"\xff\xd8\xff" + b"z" * 4000)]).accepted == 1
            assert _plain(c.iter_results(JOB_ID)) == rows
        assert set(proxy.faults) == {"request", "response", "midway"}, proxy.faults
    # One key per open_job (a request the proxy cut inside its headers may lack the key).
    keys = {call.headers.get("Idempotency-Key") for call in api.called("POST", "/v1/jobs")}
    assert len(keys - {None}) == 10


def test_answers_are_the_typed_documents_of_the_contract(api: FakeApi, client: Client) -> None:
    ok = {"index": 0, "filename": "a.jpg", "status": "ok", "label": "circle", "class_id": 0, "score": 0.9}
    bad = {
        "index": 1,
        "filename": "b.jpg",
        "status": "error",
        "error": {"code": "invalid_image", "message": "x"},
    }
    done = job(status="succeeded", total=2, done=1, failed=1, finished_at=2.0)
    api.on("POST", "/v1/classify", reply(200, {**done, "results": [ok, bad]}), reply(202, job(accepted=2)))
    finished = client.classify([("a.jpg", b"\xff\xd8\xff"), ("b.jpg", b"\xff\xd8\xff")])
    assert isinstance(finished, ClassifyResult) and finished.final
    assert [r.label for r in finished.results] == ["circle", None]
    assert finished.results[1].error is not None and finished.results[1].error.code == "invalid_image"
    pending = client.classify([("a.jpg", b"\xff\xd8\xff")], timeout=0)
    assert isinstance(pending, JobAccepted) and pending.accepted == 2 and not pending.final
    api.on("GET", f"/v1/jobs/{JOB_ID}/files", reply(200, {"job_id": JOB_ID, "files": ["a/x.jpg"]}))
    assert client.files(JOB_ID).files == ["a/x.jpg"]
    api.on("GET", f"/v1/jobs/{JOB_ID}/results", lambda h, _c: h.send(200, (json.dumps(bad) + "\n").encode()))
    (row,) = client.results(JOB_ID)
    assert isinstance(row, ResultRow) and row.status == "error" and row.error is not None


def test_an_answer_outside_the_contract_is_an_error_not_a_retry(api: FakeApi, client: Client) -> None:
    api.on("GET", f"/v1/jobs/{JOB_ID}", reply(200, {"job_id": JOB_ID, "status": "exploded"}))
    with pytest.raises(ValidationError):
        client.status(JOB_ID)
    assert len(api.called("GET", f"/v1/jobs/{JOB_ID}")) == 1


def test_a_delete_whose_answer_was_lost_is_not_an_error_when_its_repeat_finds_no_job(
    api: FakeApi, client: Client
) -> None:
    path = f"/v1/jobs/{JOB_ID}"
    gone = reply(404, {"error": {"code": "job_not_found", "message": "no such job"}})
    api.on("DELETE", path, drop(), gone)
    client.delete(JOB_ID)  # the first try deleted the job; its answer was lost
    assert len(api.called("DELETE", path)) == 2


def test_a_forget_model_whose_answer_was_lost_is_not_an_error_when_its_repeat_finds_no_model(
    api: FakeApi, client: Client
) -> None:
    path = "/v1/models/old"
    gone = reply(404, {"error": {"code": "model_not_found", "message": "no model 'old'"}})
    api.on("DELETE", path, drop(), gone)
    assert client.forget_model("old").model == "old"  # the first try forgot it; its answer was lost
    assert len(api.called("DELETE", path)) == 2
    # Without an earlier try that may have arrived, the 404 is the answer.
    api.on("DELETE", "/v1/models/never", gone)
    with pytest.raises(ApiError) as err:
        client.forget_model("never")
    assert (err.value.status, err.value.code) == (404, "model_not_found")


@pytest.mark.parametrize("first", ["none", "503"])
def test_a_delete_of_a_job_that_never_was_is_still_404(api: FakeApi, client: Client, first: str) -> None:
    # No earlier try, or one the API answered "not now" before doing anything: the 404 is true.
    path = f"/v1/jobs/{JOB_ID}"
    gone = reply(404, {"error": {"code": "job_not_found", "message": "no such job"}})
    api.on("DELETE", path, *([unavailable("0")] if first == "503" else []), gone)
    with pytest.raises(ApiError) as err:
        client.delete(JOB_ID)
    assert (err.value.status, err.value.code) == (404, "job_not_found")


@pytest.mark.parametrize(
    "lost",
    [drop(), cut(200, job(requeued=2, not_requeued=[]), 5), unavailable(status=502)],
    ids=["dropped", "body-cut", "gateway-502"],
)
def test_a_retry_that_may_have_arrived_is_not_sent_again(api: FakeApi, client: Client, lost: Action) -> None:
    # A repeat would find the job running again (409 job_running) after the first try queued it.
    path = f"/v1/jobs/{JOB_ID}/retry"
    api.on("POST", path, lost, reply(200, job(requeued=2, not_requeued=[])))
    with pytest.raises((requests.RequestException, ApiError)):
        client.retry(JOB_ID)
    assert len(api.called("POST", path)) == 1


@pytest.mark.parametrize("status", [429, 503])
def test_a_retry_refused_before_it_acted_is_sent_again(api: FakeApi, client: Client, status: int) -> None:
    path = f"/v1/jobs/{JOB_ID}/retry"
    api.on(
        "POST",
        path,
        unavailable("0", status=status),
        reply(200, job(requeued=2, not_requeued=[])),
    )
    assert client.retry(JOB_ID).requeued == 2
    assert len(api.called("POST", path)) == 2


def test_an_upload_slower_than_the_connect_timeout_is_sent_whole() -> None:
    # A reader that takes about 2 s for a 32 MB part, behind small socket buffers: the
    # client's connect timeout (min(10 s, timeout) = 1 s) must bound each stall of the
    # upload, not the whole of it. One sendall of the body would fail after 1 s.
    size = 32 * 1024 * 1024
    received: list[int] = []
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 64 * 1024)  # inherited when accepted
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)

    def serve() -> None:
        conn, _ = listener.accept()
        with conn, conn.makefile("rb") as reader:
            headers = list(iter(reader.readline, b"\r\n"))
            length = next(int(h.split(b":")[1]) for h in headers if h.lower().startswith(b"content-length:"))
            got = 0
            for start in range(0, length, 65536):  # 64 KB at a time, about 16 MB/s
                got += len(reader.read(min(65536, length - start)))
                time.sleep(0.004)
            received.append(got)
            body = json.dumps(job(accepted=1)).encode()
            conn.sendall(
                b"HTTP/1.1 202 Accepted\r\nContent-Type: application/json\r\n"
                b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
            )

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    try:
        with Client(url, api_key="", timeout=1.0, policy=RetryPolicy(retry_for_s=0.0)) as client:
            started = time.monotonic()
            assert client.add_part(JOB_ID, [("big.jpg", b"\xff\xd8\xff" + b"x" * size)]).accepted == 1
            took = time.monotonic() - started
        assert received and received[0] > size
        assert took > 1.0, f"the upload took {took:.2f} s: the reader was not slow enough to test anything"
    finally:
        thread.join(10)
        listener.close()


def test_cli_submit_prints_the_job_id_before_the_upload_and_how_to_resume_it(
    api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchvision.cli.commands import ExitCode
    from batchvision.cli.main import main

    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(b"\xff\xd8\xff" + bytes([i]) * 100)
    api.on("POST", "/v1/jobs", reply(202, job(total=0, done=0)))
    refusal = {"error": {"code": "bad_request", "message": "refused by the test"}}
    api.on("POST", f"/v1/jobs/{JOB_ID}/files", reply(202, job(accepted=2)), reply(400, refusal))
    argv = ["submit", str(tmp_path), "--part-files", "2", "--no-progress", "--api-url", api.url]
    assert main([*argv, "--retry-for", "0"]) == ExitCode.SUBMIT_FAILED
    out, err = capsys.readouterr()
    assert out.split() == [JOB_ID]  # printed when the job was opened, though its upload failed
    assert f"--resume {JOB_ID}" in err and "refused by the test" in err
    assert len(api.called("POST", f"/v1/jobs/{JOB_ID}/files")) == 2
    assert not api.called("POST", f"/v1/jobs/{JOB_ID}/seal")


def test_an_error_body_that_is_not_the_apis_is_still_an_api_error(api: FakeApi, client: Client) -> None:
    # A proxy in front of the API answering with a document of its own.
    api.on("GET", f"/v1/jobs/{JOB_ID}", reply(403, {"error": "denied by the proxy"}))
    with pytest.raises(ApiError) as refused:
        client.status(JOB_ID)
    assert refused.value.status == 403 and refused.value.code == "http_error"
    assert "denied by the proxy" in refused.value.message


def test_a_tls_handshake_refused_is_not_retried(api: FakeApi, monkeypatch: pytest.MonkeyPatch) -> None:
    # https:// against a plain HTTP port: no retry can mend it, so the call fails at once
    # instead of trying again for its whole budget.
    pauses: list[float | None] = []
    monkeypatch.setattr(Budget, "pause", lambda self, retry_after=None: bool(pauses.append(retry_after)))
    with Client(api.url.replace("http://", "https://"), api_key="", retry_for_s=5.0) as wrong:
        with pytest.raises(requests.exceptions.SSLError):
            wrong.status(JOB_ID)
    assert pauses == []


def test_cli_names_a_local_file_it_cannot_write_instead_of_blaming_the_api(
    api: FakeApi, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from batchvision.cli.commands import ExitCode
    from batchvision.cli.main import main

    api.on("GET", f"/v1/jobs/{JOB_ID}/results", results_stream(_rows(3), []))
    out = tmp_path / "no-such-folder" / "results.csv"
    # A bad argument, found before anything is asked of the API.
    assert main(["results", JOB_ID, "-o", str(out), "--api-url", api.url]) == ExitCode.USAGE
    err = capsys.readouterr().err
    assert "no-such-folder does not exist" in err and "cannot reach the API" not in err
    assert api.called("GET", f"/v1/jobs/{JOB_ID}/results") == []


def html_page() -> Action:
    """What a login proxy or captive portal answers: a 200 that is not the API's."""

    def act(h: Handler, _call: Call) -> None:
        body = b"<html><body>Please sign in</body></html>"
        h.wfile.write(
            b"HTTP/1.1 200 OK\r\nContent-Type: text/html; charset=utf-8\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )

    return act


def test_a_page_that_is_not_the_apis_is_refused_and_never_written(api: FakeApi, tmp_path: Path) -> None:
    api.on("GET", f"/v1/jobs/{JOB_ID}", html_page())
    api.on("GET", f"/v1/jobs/{JOB_ID}/results", html_page())
    client = Client(api.url, retry_for_s=30)
    with pytest.raises(ApiError) as info:
        client.status(JOB_ID)
    assert info.value.code == "not_the_api" and "text/html" in info.value.message
    out = tmp_path / "results.csv"
    with pytest.raises(ApiError):
        client.download(JOB_ID, out, "csv")
    assert not out.exists() and list(tmp_path.iterdir()) == []
    # Neither was retried: a page like this does not turn into the API by asking again.
    assert len(api.called("GET", f"/v1/jobs/{JOB_ID}")) == 1
    assert len(api.called("GET", f"/v1/jobs/{JOB_ID}/results")) == 1
