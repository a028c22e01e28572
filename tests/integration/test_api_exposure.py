"""Secure by default, with the real command: ``batchvision api --host 0.0.0.0`` (what the
container runs) refuses to serve without API keys unless anonymous access is allowed
explicitly, and says which variable to set; with either, it serves."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from batchvision.cli.redis_server import free_port
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
