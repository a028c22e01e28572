"""Secure by default, with the real command: ``batchvision api --host 0.0.0.0`` (what the
container runs) refuses to serve without API keys unless anonymous access is allowed
explicitly, and says which variable to set; with either, it serves. Names in ``Host`` and the
scheme from a listed proxy's ``X-Forwarded-Proto`` decide what it answers and the links it writes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
import requests

from batchvision.cli.redis_server import free_port
from batchvision.core.synthetic import labelled_files
from batchvision.server import keys, webhooks
from batchvision.testing.servers import RedisServer

pytestmark = pytest.mark.integration

JOB_ID = "0" * 32


class Api:
    def __init__(self, tmp_path: Path, env: dict[str, str]) -> None:
        self.port = free_port()
        self.log = tmp_path / f"api-{self.port}.log"
        base = {k: v for k, v in os.environ.items() if not k.startswith("BATCHVISION_")}
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "batchvision.cli", "api", "--host", "0.0.0.0"],
                env={**base, "BATCHVISION_API_PORT": str(self.port), "BATCHVISION_API_WORKERS": "1", **env},
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # gunicorn and its worker: one group to stop
            )
        self.url = f"http://127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def serves(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"api exited with {self.proc.returncode}:\n{self.output()[-3000:]}")
        try:
            return requests.get(f"{self.url}/healthz", timeout=5).status_code == 200
        except (requests.ConnectionError, requests.Timeout):
            return False  # not listening yet, or its worker still booting

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()


@pytest.fixture()
def start_api(redis_server: RedisServer, tmp_path: Path) -> Iterator[Callable[..., Api]]:
    started: list[Api] = []

    def start(**env: str) -> Api:
        api = Api(tmp_path, {"BATCHVISION_REDIS_URL": redis_server.url, **env})
        started.append(api)
        return api

    yield start
    for api in started:
        api.stop()


def test_no_keys_on_a_public_address_is_refused_with_what_to_set(start_api: Callable[..., Api]) -> None:
    api = start_api()
    assert api.proc.wait(60) == 2
    out = api.output()
    assert f"refusing to serve the API without authentication on 0.0.0.0:{api.port}" in out
    assert "BATCHVISION_API_KEYS" in out and "BATCHVISION_ALLOW_ANONYMOUS=true" in out
    assert "Listening at" not in out  # gunicorn never started


def test_anonymous_access_allowed_explicitly_serves_and_warns(
    start_api: Callable[..., Api], wait_until: Callable[..., Any]
) -> None:
    api = start_api(BATCHVISION_ALLOW_ANONYMOUS="true")
    wait_until(api.serves, timeout=60, interval=0.2, message="the API answers /healthz")
    assert "WARNING" in api.output() and "the API serves without authentication on 0.0.0.0" in api.output()
    assert requests.get(f"{api.url}/v1/jobs/{JOB_ID}", timeout=10).status_code == 404  # no key needed


def test_with_api_keys_it_serves_and_asks_for_a_key(
    start_api: Callable[..., Api], wait_until: Callable[..., Any]
) -> None:
    api = start_api(BATCHVISION_API_KEYS="s3cret-key")
    wait_until(api.serves, timeout=60, interval=0.2, message="the API answers /healthz")
    assert "without authentication" not in api.output()
    assert requests.get(f"{api.url}/v1/jobs/{JOB_ID}", timeout=10).status_code == 401
    with_key = requests.get(
        f"{api.url}/v1/jobs/{JOB_ID}", headers={"Authorization": "Bearer s3cret-key"}, timeout=10
    )
    assert with_key.status_code == 404
    # A doubled slash is no route: a JSON answer (the /v2 shape there), not an HTML redirect
    # that skipped the key check.
    for path, status in (("/v2//models/x", 404), ("/v1//models", 401)):
        resp = requests.get(f"{api.url}{path}", allow_redirects=False, timeout=10)
        assert (resp.status_code, resp.headers["Content-Type"]) == (status, "application/json"), path
        assert "error" in resp.json(), path


def test_without_keys_the_webhook_secret_stays_on_the_server(
    start_api: Callable[..., Api], redis_server: RedisServer, wait_until: Callable[..., Any]
) -> None:
    api = start_api(BATCHVISION_ALLOW_ANONYMOUS="true")
    wait_until(api.serves, timeout=60, interval=0.2, message="the API answers /healthz")
    resp = requests.get(f"{api.url}/v1/webhook-secret", timeout=10)
    assert resp.status_code == 403, resp.text
    error = resp.json()["error"]
    assert error["code"] == "webhook_secret_needs_keys" and "batchvision webhook-secret" in error["message"]
    # On the server, the CLI prints the per-installation secret (made once, atomically, in Redis).
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHVISION_")}
    printed = [
        subprocess.run(
            [sys.executable, "-m", "batchvision.cli", "webhook-secret"],
            env={**env, "BATCHVISION_REDIS_URL": redis_server.url},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for _ in range(2)
    ]
    client = redis_lib.Redis.from_url(redis_server.url)
    stored = client.get(keys.WEBHOOK_SECRET)
    assert stored and printed[0] == printed[1] == webhooks.signing_secret(stored, "")


def test_webhook_secret_at_the_default_redis_url_makes_no_secret_there(
    scratch_server: RedisServer,
    scratch_redis: redis_lib.Redis,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """Without BATCHVISION_REDIS_URL the command reads the default URL's Redis, which may be
    another one (``batchvision up`` runs its own): it says so instead of making a secret there."""
    from batchvision.cli.main import main

    for name in [n for n in os.environ if n.startswith("BATCHVISION_")]:
        monkeypatch.delenv(name)
    real = redis_lib.Redis.from_url
    # The default URL's Redis, played by the scratch server.
    monkeypatch.setattr(redis_lib.Redis, "from_url", lambda url, **kw: real(scratch_server.url, **kw))
    assert main(["webhook-secret"]) == 2
    assert "BATCHVISION_REDIS_URL is not set" in capsys.readouterr().err
    assert not scratch_redis.exists(keys.WEBHOOK_SECRET)
    # Once the installation has its secret there, the command prints it.
    scratch_redis.set(keys.WEBHOOK_SECRET, "0" * 64)
    assert main(["webhook-secret"]) == 0
    assert capsys.readouterr().out.strip() == webhooks.signing_secret(b"0" * 64, "")


def test_the_host_allow_list_refuses_other_names(
    start_api: Callable[..., Api], wait_until: Callable[..., Any]
) -> None:
    api = start_api(BATCHVISION_API_KEYS="s3cret-key", BATCHVISION_ALLOWED_HOSTS="api.example.com,127.0.0.1")
    wait_until(api.serves, timeout=60, interval=0.2, message="the API answers /healthz")
    key = {"Authorization": "Bearer s3cret-key"}
    job = f"{api.url}/v1/jobs/{JOB_ID}"
    assert requests.get(job, headers=key, timeout=10).status_code == 404
    assert requests.get(job, headers={**key, "Host": "api.example.com"}, timeout=10).status_code == 404
    evil = requests.get(job, headers={**key, "Host": "evil.example"}, timeout=10)
    assert evil.status_code == 400 and evil.json()["error"]["code"] == "bad_host"
    # The orchestrator's probes and Prometheus' scrapes use the pod's address.
    for path in ("/healthz", "/v2/health/live", "/metrics"):
        probe = requests.get(f"{api.url}{path}", headers={"Host": "10.0.0.7:8000"}, timeout=10)
        assert probe.status_code == 200, (path, probe.text)


@pytest.mark.parametrize(
    ("allowed", "scheme"),
    [
        ("", "https"),  # the default: a proxy on the same host (this test's 127.0.0.1) is believed
        ("10.0.0.0/8", "http"),  # this peer is not the listed proxy: its header is ignored
    ],
)
def test_links_follow_x_forwarded_proto_from_the_proxies_listed(
    start_api: Callable[..., Api],
    scratch_server: RedisServer,
    wait_until: Callable[..., Any],
    allowed: str,
    scheme: str,
) -> None:
    # The job goes to the private Redis no worker reads: on the session's, its model's queue
    # (no session worker serves the default model) would hold it for the rest of the run.
    env = {"BATCHVISION_ALLOW_ANONYMOUS": "true", "BATCHVISION_REDIS_URL": scratch_server.url}
    if allowed:
        env["BATCHVISION_FORWARDED_ALLOW_IPS"] = allowed
    api = start_api(**env)
    wait_until(api.serves, timeout=60, interval=0.2, message="the API answers /healthz")
    name, data, _ = next(labelled_files(1, seed=3))
    resp = requests.post(
        f"{api.url}/v1/jobs",
        files=[("files", (name, data))],
        headers={"X-Forwarded-Proto": "https", "Host": "batchvision.example.com"},
        timeout=30,
    )
    assert resp.status_code == 202, resp.text
    job = resp.json()
    expected = f"{scheme}://batchvision.example.com/v1/jobs/{job['job_id']}"
    assert resp.headers["Location"] == job["status_url"] == expected
    assert job["results_url"].startswith(f"{expected}/results")
