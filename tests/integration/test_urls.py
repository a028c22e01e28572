"""Images by URL, end to end with real processes: a hostile HTTP server on loopback
serves 300 images and every kind of bad answer; a private stack (Redis, API, worker) whose
allow-list lets it reach 127.0.0.1 and nothing else private fetches them. Every URL must end with
exactly one result: a classification, or the error code its hostility deserves."""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import redis as redis_lib
import requests

from batchvision.cli.local import stack as local_stack
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Supervisor, cli_argv
from batchvision.client import ApiError, Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server.fetch import FETCH_ATTEMPTS
from batchvision.server.keys import JobKeys
from batchvision.testing.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

IMAGES = [(name, data, label) for name, data, label in labelled_files(300, seed=15)]
FETCH_TIMEOUT_S = 2.0
MAX_BYTES = 1_000_000


@pytest.fixture(scope="module")
def hostile(hostile_origin: Callable[..., Any]) -> Any:
    """The hostile server (``tests/conftest.py``), serving :data:`IMAGES` as ``/img/<n>.jpg``."""
    return hostile_origin([data for _, data, _ in IMAGES])


@pytest.fixture(scope="module")
def origin(hostile: Any) -> str:
    return str(hostile.url)


@pytest.fixture(scope="module")
def url_stack(settings: Settings, wait_worker: Any) -> Iterator[tuple[Settings, str]]:
    """Redis, the API and one worker that may fetch from 127.0.0.1 (the allow-list) only."""
    with RedisServer() as redis:  # stopped however the rest starts
        s = settings.replace(
            redis_url=redis.url,
            api_port=free_port(),
            worker_metrics_port=0,
            fetch_allow="127.0.0.1/32",
            fetch_timeout_s=FETCH_TIMEOUT_S,
            fetch_connect_timeout_s=1.0,
            max_image_bytes=MAX_BYTES,
            max_urls_per_job=400,
            chunk_size=16,
        )
        sup = Supervisor([svc for svc in local_stack(s, None) if svc.name in ("api", "worker")])
        try:
            sup.start()
            sup.wait_healthy(timeout=120)
            wait_worker(s)
            yield s, f"http://127.0.0.1:{s.api_port}"
        finally:
            sup.stop()


def _cases(origin: str) -> dict[str, str]:
    """Every hostile URL and the result it must end with (``ok`` or an error code)."""
    port = urlsplit(origin).port
    r = f"{origin}/redirect?to="
    return {
        # Timeouts, size caps (both while streaming and from the declared length), content.
        f"{origin}/slow?s={FETCH_TIMEOUT_S * 3}": "fetch_timeout",
        f"{origin}/drip": "fetch_timeout",
        f"{origin}/huge-declared": "too_large",
        f"{origin}/huge-stream": "too_large",
        f"{origin}/page.jpg": "not_an_image",
        f"{origin}/text": "not_an_image",
        f"{origin}/truncated.jpg": "truncated",
        f"{origin}/missing.jpg": "http_404",
        f"{origin}/status/500": "http_500",
        f"{origin}/status/403": "http_403",
        f"{origin}/loop": "too_many_redirects",
        # Redirects: each hop is checked like the first URL.
        r + "http://169.254.169.254/latest/meta-data/": "blocked_address",
        r + "http://10.0.0.1/x.jpg": "blocked_address",
        r + f"http://[::1]:{port}/img/0.jpg": "blocked_address",
        r + "file:///etc/passwd": "bad_url",
        r + "/img/7.jpg": "ok",
        # Names resolved by the worker (glibc reads these as addresses): every resolved address
        # is checked, and the allow-list holds 127.0.0.1 only.
        "http://2852039166/latest/meta-data/": "blocked_address",  # 169.254.169.254
        f"http://2130706434:{port}/img/0.jpg": "blocked_address",  # 127.0.0.2
        f"http://0177.0.0.2:{port}/img/0.jpg": "blocked_address",  # 127.0.0.2, octal
        f"http://localhost:{port}/img/8.jpg": "ok",  # resolves to 127.0.0.1: allowed
        "http://no-such-host.invalid/x.jpg": "dns_error",
        # Refused by the API already (syntax, or an address literal the rules refuse).
        f"http://127.0.0.2:{port}/img/0.jpg": "blocked_address",
        f"http://[::ffff:169.254.169.254]:{port}/": "blocked_address",
        "http://0.0.0.0/": "blocked_address",
        "http://192.168.1.1/router.jpg": "blocked_address",
        "file:///etc/passwd": "bad_url",
        "gopher://127.0.0.1:6379/_FLUSHALL": "bad_url",
        f"http://user:pw@127.0.0.1:{port}/img/0.jpg": "bad_url",
        "not a url": "bad_url",
        # Transport failures.
        f"https://127.0.0.1:{port}/img/0.jpg": "tls_error",  # TLS to a plain HTTP server
        f"http://127.0.0.1:{free_port()}/x.jpg": "connection_failed",
    }


def test_a_url_over_the_length_limit_is_one_images_error_whatever_the_body(
    url_stack: tuple[Settings, str], origin: str
) -> None:
    _, api = url_stack
    good, long = f"{origin}/img/0.jpg", f"{origin}/img/" + "a" * 2100
    bodies = [
        {"json": {"urls": [good, {"url": long, "id": "too-long"}]}},
        {"data": f"url\n{good}\n{long}\n", "headers": {"Content-Type": "text/csv"}},
    ]
    client = Client(api)
    for body in bodies:
        resp = requests.post(f"{api}/v1/jobs", timeout=30, **body)  # type: ignore[arg-type]
        assert resp.status_code == 202, resp.text
        (refused,) = resp.json()["rejected"]
        assert (refused["index"], refused["code"]) == (1, "bad_url") and "longer than 2048" in refused[
            "message"
        ]
        assert len(resp.text) < 10_000  # the long URL is not echoed back whole
        job_id = resp.json()["job_id"]
        assert client.wait(job_id, timeout=120).status == "partial"
        rows = client.results(job_id)
        assert [r.status for r in rows] == ["ok", "error"] and rows[1].error.code == "bad_url"


def test_300_images_and_every_hostile_url_end_with_exactly_one_result(
    url_stack: tuple[Settings, str],
    origin: str,
    hostile: Any,
    artifacts: Path,
    reference_labels: Callable[..., list[str]],
) -> None:
    s, api = url_stack
    cases = _cases(origin)
    good = {f"{origin}/img/{n}.jpg": label for n, (_, _, label) in enumerate(IMAGES)}
    urls = list(good) + list(cases)
    client = Client(api)
    start = time.monotonic()
    job = client.submit_urls(urls)
    assert job.total == len(urls)
    refused = {r.filename: r.code for r in job.rejected}
    assert set(refused.values()) == {"blocked_address", "bad_url"}
    status = client.wait(job.job_id, timeout=180, poll_s=0.2)
    took = time.monotonic() - start
    rows = client.results(job.job_id)
    assert [r.index for r in rows] == list(range(len(urls)))  # one row per URL, in order
    assert redis_lib.Redis.from_url(s.redis_url).hlen(JobKeys.of(job.job_id).results) == len(urls)
    outcome = {r.filename: ("ok" if r.status == "ok" else r.error.code) for r in rows}
    report = "\n".join(f"{outcome[u]:<20} {u}" for u in cases)
    (artifacts / "hostile-urls.txt").write_text(report + "\n")
    assert {u: outcome[u] for u in cases} == cases, report
    assert all(refused[u] == cases[u] for u in refused)
    labels = {r.filename: r.label for r in rows}
    assert [outcome[u] for u in good] == ["ok"] * len(good), {
        u: outcome[u] for u in good if outcome[u] != "ok"
    }
    # The labels are the demo model's own, image by image (never how well it happened to train).
    by_url = {f"{origin}/img/{n}.jpg": (name, data) for n, (name, data, _) in enumerate(IMAGES)}
    assert [labels[u] for u in good] == reference_labels(Path(s.model), [by_url[u] for u in good])
    failed = sum(want != "ok" for want in cases.values())
    assert (status.done, status.failed) == (len(urls) - failed, failed)
    assert status.status == "partial"
    # Fetching overlapped: 300 images plus several multi-second stalls in far less than serial.
    print(f"{len(urls)} URLs in {took:.1f}s\n{report}")
    # Private targets behind the redirects were never reached; each good image was fetched once.
    assert all(hostile.hits(f"/img/{n}.jpg") >= 1 for n in range(300))


def test_manifests_csv_jsonl_and_the_cli(
    url_stack: tuple[Settings, str], origin: str, tmp_path: Path
) -> None:
    _, api = url_stack
    rows = "".join(f"{origin}/img/{n}.jpg,photo-{n}.jpg,item-{n},A{n}\n" for n in range(10))
    resp = requests.post(
        f"{api}/v1/jobs",
        data="url,filename,id,shelf\n" + rows,
        headers={"Content-Type": "text/csv"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    client = Client(api)
    assert client.wait(job["job_id"], timeout=60).status == "succeeded"
    assert [r.filename for r in client.results(job["job_id"])] == [f"photo-{n}.jpg" for n in range(10)]
    # The ids and pass-through columns come back in every format, CSV too.
    got = requests.get(f"{api}/v1/jobs/{job['job_id']}/results?format=csv", timeout=30)
    table = list(csv.DictReader(io.StringIO(got.text)))
    assert [(r["filename"], r["id"], r["shelf"]) for r in table] == [
        (f"photo-{n}.jpg", f"item-{n}", f"A{n}") for n in range(10)
    ]
    assert all(r["label"] for r in table)
    lines = [json.dumps(f"{origin}/img/20.jpg"), json.dumps({"url": f"{origin}/nope", "filename": "x"})]
    resp = requests.post(
        f"{api}/v1/jobs",
        data="\n".join(lines),
        headers={"Content-Type": "application/x-ndjson"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    done = client.wait(resp.json()["job_id"], timeout=60)
    assert (done.status, done.done, done.failed) == ("partial", 1, 1)
    # Limits and malformed manifests are refused whole, by name.
    too_many = "url\n" + "".join(f"{origin}/img/{n % 300}.jpg\n" for n in range(401))
    resp = requests.post(f"{api}/v1/jobs", data=too_many, headers={"Content-Type": "text/csv"}, timeout=30)
    assert resp.status_code == 413 and resp.json()["error"]["code"] == "too_many_urls"
    resp = requests.post(f"{api}/v1/jobs", data="link\nx\n", headers={"Content-Type": "text/csv"}, timeout=30)
    assert resp.status_code == 400 and resp.json()["error"]["code"] == "bad_manifest"
    resp = requests.post(f"{api}/v1/jobs", json={"urls": ["http://10.0.0.1/a.jpg", "ftp://x/y"]}, timeout=30)
    assert resp.status_code == 422 and resp.json()["error"]["code"] == "no_valid_urls"
    # The CLI: `batchvision submit --urls manifest.csv --wait -o results.csv`.
    manifest = tmp_path / "manifest.csv"
    manifest.write_text(
        "url,filename,id,shop\n"
        + "".join(f"{origin}/img/{n}.jpg,cli-{n}.jpg,{n},s{n % 2}\n" for n in range(30, 42))
    )
    out = tmp_path / "results.csv"
    proc = subprocess.run(
        [*cli_argv("submit"), "--urls", str(manifest), "--wait", "-o", str(out), "--no-progress"],
        env={"BATCHVISION_API_URL": api, "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    with out.open() as fh:
        written = list(csv.DictReader(fh))
    assert [r["filename"] for r in written] == [f"cli-{n}.jpg" for n in range(30, 42)]
    assert all(r["label"] and not r["error"] for r in written)
    # The manifest's ids and pass-through columns came along, as they do with a manifest body.
    assert [(r["id"], r["shop"]) for r in written] == [(str(n), f"s{n % 2}") for n in range(30, 42)]


def test_a_retry_fetches_again_what_failed_for_a_transient_reason_once(
    url_stack: tuple[Settings, str],
    origin: str,
    hostile: Any,
    reference_labels: Callable[..., list[str]],
) -> None:
    s, api = url_stack
    client = Client(api)
    # A host down for a while: longer than a fetch's own tries (FETCH_ATTEMPTS), back for the retry.
    down = f"/fail/{FETCH_ATTEMPTS}/503"
    flaky = [f"{origin}{down}/{n}.jpg" for n in (50, 51, 52)]
    urls = [f"{origin}/img/53.jpg", *flaky, f"{origin}/page.jpg", f"{origin}/fail/1/404/54.jpg"]
    job = client.submit_urls(urls)
    first = client.wait(job.job_id, timeout=120, poll_s=0.2)
    assert (first.status, first.done, first.failed) == ("partial", 1, 5)
    errors = [(r.error.code, r.error.retryable) for r in client.results(job.job_id)[1:] if r.error]
    assert errors == [("http_503", True)] * 3 + [("not_an_image", False), ("http_404", False)]

    # Two retries at once: each flaky image is queued again once (the other retry finds the
    # job running, or, were the worker that fast, finished with nothing retryable left).
    def retry(_: int) -> int | str:
        try:
            return client.retry(job.job_id).requeued
        except ApiError as exc:
            return exc.code

    with ThreadPoolExecutor(2) as pool:
        outcomes = sorted(pool.map(retry, range(2)), key=str)
    assert outcomes in ([0, 3], [3, "job_running"]), outcomes
    again = client.wait(job.job_id, timeout=120, poll_s=0.2)
    assert (again.status, again.done, again.failed) == ("partial", 4, 2)
    rows = client.results(job.job_id)
    by_url = {f"{origin}{down}/{n}.jpg": IMAGES[n][:2] for n in (50, 51, 52)}
    assert [r.label for r in rows[1:4]] == reference_labels(Path(s.model), [by_url[u] for u in flaky])
    # Fetched once more than the first run's tries; a 404 and an HTML page are never asked again.
    assert all(hostile.hits(f"{down}/{n}.jpg") == FETCH_ATTEMPTS + 1 for n in (50, 51, 52))
    assert hostile.hits("/fail/1/404/54.jpg") == 1 and hostile.hits("/page.jpg") >= 1
    assert [r.error.code for r in rows[4:] if r.error] == ["not_an_image", "http_404"]

    # `batchvision retry`: nothing retryable is left.
    proc = subprocess.run(
        [*cli_argv("retry"), job.job_id],
        env={**os.environ, "BATCHVISION_API_URL": api},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["requeued"] == 0
