"""Callers and inputs that must be refused: API keys, job ownership, per-key rate limits
shared across replicas, idempotent submits, backpressure, upload limits, and fuzzing of the
whole API (schemathesis, in test_contract.py)."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests

from api import create_app
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server.queue import create_celery
from batchvision.server.telemetry import Telemetry


def api_replicas(settings: Settings, n: int) -> tuple[Supervisor, list[str]]:
    ports = [free_port() for _ in range(n)]
    services = [
        Service(
            f"api{i}",
            cli_argv("api", "--host", "127.0.0.1"),
            settings.replace(api_port=port).to_env(include_secrets=True),
            health_url=f"http://127.0.0.1:{port}/healthz",
        )
        for i, port in enumerate(ports)
    ]
    sup = Supervisor(services)
    try:
        sup.start()
        sup.wait_healthy(60)
    except BaseException:
        sup.stop()  # what started must not outlive a failed start
        raise
    return sup, [f"http://127.0.0.1:{p}" for p in ports]


@pytest.fixture(scope="module")
def keyed(stack: Supervisor, settings: Settings) -> Iterator[list[str]]:
    beta_digest = hashlib.sha256(b"beta-key").hexdigest()  # keys may be configured hashed
    s = settings.replace(api_keys=f"alpha-key,{beta_digest}", rate_limit_per_minute=25)
    sup, urls = api_replicas(s, 2)
    yield urls
    sup.stop()


def _image() -> list[tuple[str, tuple[str, bytes]]]:
    name, data, _ = next(labelled_files(1, seed=12))
    return [("files", (name, data))]


def test_keys_are_required_and_jobs_are_private(keyed: list[str]) -> None:
    url = keyed[0]
    assert requests.get(f"{url}/healthz", timeout=10).status_code == 200  # probes stay open
    resp = requests.post(f"{url}/v1/jobs", files=_image(), timeout=30)
    assert resp.status_code == 401 and resp.json()["error"]["code"] == "unauthorized"
    assert resp.headers["WWW-Authenticate"].startswith("Bearer")
    bad = requests.get(f"{url}/v1/jobs/x", headers={"Authorization": "Bearer nope"}, timeout=10)
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "invalid_api_key"

    alpha = Client(url, api_key="alpha-key")
    job = alpha.submit_files([(n, d) for _, (n, d) in _image()])
    assert alpha.wait(job.job_id, timeout=60).status == "succeeded"
    # beta (configured by digest) authenticates, but alpha's job does not exist for it
    beta = requests.get(f"{keyed[1]}/v1/jobs/{job.job_id}", headers={"X-API-Key": "beta-key"}, timeout=10)
    assert beta.status_code == 404
    assert (
        requests.get(
            f"{keyed[1]}/v1/jobs/{job.job_id}/results", headers={"X-API-Key": "beta-key"}, timeout=10
        ).status_code
        == 404
    )
    assert (
        requests.delete(
            f"{keyed[1]}/v1/jobs/{job.job_id}", headers={"X-API-Key": "beta-key"}, timeout=10
        ).status_code
        == 404
    )


def test_rate_limit_is_shared_across_replicas(keyed: list[str]) -> None:
    headers = {"X-API-Key": "beta-key"}
    # wait for a fresh minute window if this one is almost over, so the count is exact
    if time.time() % 60 > 50:
        time.sleep(61 - time.time() % 60)
    codes = [requests.get(f"{keyed[i % 2]}/v1/jobs/none", headers=headers, timeout=10) for i in range(30)]
    statuses = [r.status_code for r in codes]
    assert statuses.count(429) >= 1
    first = statuses.index(429)
    assert first >= 20  # 25 per minute, minus what the other test used of beta's window
    limited = codes[first]
    assert int(limited.headers["Retry-After"]) >= 1
    assert limited.json()["error"]["code"] == "rate_limited"


def test_idempotency_key_returns_the_same_job(api_url: str) -> None:
    headers = {"Idempotency-Key": f"upload-{time.time()}"}
    first = requests.post(f"{api_url}/v1/jobs", files=_image(), headers=headers, timeout=30)
    again = requests.post(f"{api_url}/v1/jobs", files=_image(), headers=headers, timeout=30)
    assert first.status_code == 202 and again.status_code == 200
    assert first.json()["job_id"] == again.json()["job_id"]
    assert again.json()["idempotent_replay"] is True
    other = requests.post(
        f"{api_url}/v1/jobs", files=_image(), headers={"Idempotency-Key": "other"}, timeout=30
    )
    assert other.json()["job_id"] != first.json()["job_id"]
    # The same key and body on another route is another request: refused, not replayed.
    elsewhere = requests.post(f"{api_url}/v1/classify", files=_image(), headers=headers, timeout=30)
    assert elsewhere.status_code == 409, elsewhere.text


def test_backpressure_429_and_the_client_waits_it_out(
    stack: Supervisor,
    settings: Settings,
    tmp_path: Path,
    redis_client: redis_lib.Redis,
    wait_until: Callable[..., Any],
) -> None:
    # Images that earlier tests left waiting would count against the limit: start from none.
    telemetry = Telemetry(redis_client)
    wait_until(lambda: telemetry.pending_images() == 0, timeout=120, message="the session's queue drains")
    s = settings.replace(max_queued_images=10)
    sup, (url,) = api_replicas(s, 1)
    control = create_celery(settings).control
    resumed = threading.Timer(3.0, lambda: control.add_consumer(settings.queue, reply=True))
    try:
        control.cancel_consumer(settings.queue, reply=True)
        files = [("files", (n, d)) for n, d, _ in labelled_files(10, seed=13)]
        assert requests.post(f"{url}/v1/jobs", files=files, timeout=30).status_code == 202
        full = requests.post(f"{url}/v1/jobs", files=_image(), timeout=30)
        assert full.status_code == 429
        assert full.json()["error"]["code"] == "queue_full" and int(full.headers["Retry-After"]) > 0
        for name, data, _ in labelled_files(6, seed=14):
            (tmp_path / name).write_bytes(data)
        resumed.start()  # the queue drains in 3 s; the client retries after Retry-After
        start = time.monotonic()
        summary = Client(url).submit_folder(tmp_path)
        assert time.monotonic() - start >= 1.0
        assert Client(url).wait(summary.job_id, timeout=60).done == 6
    finally:
        resumed.cancel()
        control.add_consumer(settings.queue, reply=True)
        sup.stop()


def test_request_size_limit_is_a_json_413(settings: Settings) -> None:
    app = create_app(settings.replace(max_request_bytes=100_000))
    client = app.test_client()
    resp = client.post("/v1/jobs", data=b"\xff\xd8\xff" + b"0" * 200_000, content_type="image/jpeg")
    assert resp.status_code == 413
    body = resp.get_json()
    assert body["error"]["code"] == "request_entity_too_large"
    assert "100000 bytes" in body["error"]["message"]


def test_png_claiming_20000x20000_is_refused_from_its_header(
    settings: Settings, png_header_only: Callable[[int, int], bytes]
) -> None:
    app = create_app(settings)
    resp = app.test_client().post("/v1/jobs", data=png_header_only(20000, 20000), content_type="image/png")
    assert resp.status_code == 413
    assert resp.get_json()["error"]["details"][0]["code"] == "too_many_pixels"


def test_readyz_names_the_dependency_but_not_its_address(caplog: pytest.LogCaptureFixture) -> None:
    # /readyz answers without a key: the error's text (an internal host and port) goes to the
    # log, for the operator, and not to whoever asks. Redis here is a port nobody listens on.
    app = create_app(Settings.from_env({}, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    resp = app.test_client().get("/readyz")
    assert resp.status_code == 503 and resp.headers["Retry-After"]
    err = resp.get_json()["error"]
    assert err["code"] == "redis_unreachable" and "ConnectionError" in err["message"], err
    assert "127.0.0.1" not in err["message"]
    assert any("127.0.0.1" in r.getMessage() for r in caplog.records)
