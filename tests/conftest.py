"""Fixtures: a real redis-server, the real demo model, real worker and API processes.

Nothing is mocked: the suite starts what it needs on free ports and stops it afterwards.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis as redis_lib

from batchvision.cli.local import wait_for_workers
from batchvision.cli.redis_server import RedisServer, free_port
from batchvision.cli.runner import Service, Supervisor
from batchvision.core.settings import Settings

ROOT = Path(__file__).resolve().parents[1]
ARTIFACTS = ROOT / "tests" / "artifacts"


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture()
def redis_client(redis_server: RedisServer) -> redis_lib.Redis:
    return redis_lib.Redis.from_url(redis_server.url)


@pytest.fixture(scope="session")
def demo_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model `make test` built (models/demo.keras), or one trained now."""
    built = ROOT / "models" / "demo.keras"
    if built.exists():
        return built
    out = tmp_path_factory.mktemp("model") / "demo.keras"
    subprocess.run([sys.executable, "-m", "batchvision.cli", "demo-model", "--out", str(out)], check=True)
    return out


@pytest.fixture(scope="session")
def settings(redis_server: RedisServer, demo_model: Path) -> Settings:
    return Settings.from_env(
        {},
        redis_url=redis_server.url,
        model=str(demo_model),
        api_port=free_port(),
        worker_metrics_port=free_port(),
        flower_port=free_port(),
        flower_user="admin",
        flower_password="s3cret-test",
        chunk_size=8,
        max_image_pixels=4_000_000,
    )


def start_stack(settings: Settings, names: tuple[str, ...] = ("api", "worker")) -> Supervisor:
    """Start the services `batchvision up` and compose run, and wait until they serve."""
    from batchvision.cli.local import stack

    services = [s for s in stack(settings, None) if s.name in names]
    sup = Supervisor(services)
    sup.start()
    sup.wait_healthy(timeout=120)
    if "worker" in names:
        wait_worker(settings)
    return sup


def wait_worker(settings: Settings, timeout: float = 120.0) -> None:
    wait_for_workers(settings, timeout=timeout)


@pytest.fixture(scope="session")
def stack(settings: Settings) -> Iterator[Supervisor]:
    sup = start_stack(settings)
    yield sup
    sup.stop()


@pytest.fixture(scope="session")
def api_url(stack: Supervisor, settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.api_port}"


def worker_service(settings: Settings, **env: str) -> Service:
    """A separate worker process (for fault tests), sharing the session's Redis."""
    from batchvision.cli.runner import cli_argv

    return Service(
        "worker", cli_argv("worker", "--name", f"w{free_port()}@test"), {**settings.to_env(), **env}
    )


@pytest.fixture(scope="session", autouse=True)
def _artifacts() -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
