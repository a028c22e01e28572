"""``batchvision up``: the local stack (what ``compose/docker-compose.yml`` runs), supervised.

Everything listens on loopback. Exit codes: ``0`` after ``--exit-after-demo``; ``1`` when a
service cannot start with this configuration (it exited with a fatal code, see
:class:`~batchvision.cli.runner.ServiceFailed`: the stack is stopped, not restarted forever);
``128 + N`` when signal ``N`` stopped it (130 for Ctrl-C, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import functools
import logging
import os
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import requests

from batchvision.cli.commands import ExitCode
from batchvision.cli.rabbitmq_server import RabbitMQNode, amqp_answers
from batchvision.cli.redis_server import RedisNode, free_port, redis_answers
from batchvision.cli.runner import FATAL_EXIT_CODES, Service, ServiceFailed, Stopped, Supervisor, cli_argv
from batchvision.client.bulk import scan, submit_folder
from batchvision.client.errors import ApiError
from batchvision.core.errors import BatchvisionError
from batchvision.core.settings import PREFIX, Settings

log = logging.getLogger("batchvision.up")


def stack(
    settings: Settings,
    redis: RedisNode | None,
    flower: bool = True,
    rabbitmq: RabbitMQNode | None = None,
) -> list[Service]:
    """The services of the stack, in start order; the same commands as the compose file
    (``rabbitmq``: our own RabbitMQ node as the broker, see :func:`local_broker`)."""
    env = settings.to_env(include_secrets=True)  # the children need the API keys and Flower login
    services = []
    if redis is not None:
        ready = functools.partial(redis_answers, redis.url)
        # Its own log file, so a Redis that cannot start says why (svc.tail()).
        log_path = str(redis.data_dir / "redis.log")
        services.append(
            Service(
                "redis", redis.argv(), {}, url=redis.url, infrastructure=True, ready=ready, log_path=log_path
            )
        )
    if rabbitmq is not None:
        rabbitmq.prepare()
        shown = f"amqp://{rabbitmq.user}:***@127.0.0.1:{rabbitmq.port}//"
        ready = functools.partial(amqp_answers, rabbitmq.url)
        services.append(
            Service(
                "rabbitmq",
                rabbitmq.argv(),
                rabbitmq.env(),
                url=shown,
                infrastructure=True,
                ready=ready,
                log_path=str(rabbitmq.log_file),
            )
        )
    api = f"http://127.0.0.1:{settings.api_port}"
    services.append(
        Service(
            "api",
            cli_argv("api", "--host", "127.0.0.1"),
            env,
            url=api,
            health_url=f"{api}/healthz",
            # gunicorn: 3 a worker cannot boot, 4 the app cannot load; both are the code's or
            # the settings' fault, which a restart does not change.
            fatal_exit_codes=FATAL_EXIT_CODES | {4},
        )
    )
    services.append(
        Service(
            "worker", cli_argv("worker"), env, url=f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"
        )
    )
    if flower:
        fl = f"http://127.0.0.1:{settings.flower_port}"
        services.append(
            Service(
                "flower",
                cli_argv("flower", "--host", "127.0.0.1"),
                env,
                url=fl,
                health_url=f"{fl}/healthcheck",
            )
        )
    return services


def local_settings(broker: str | None = None) -> tuple[Settings, RedisNode | None, RabbitMQNode | None]:
    """Settings for a local run: free ports, an embedded Redis unless one is configured, and
    the broker :func:`local_broker` picks."""
    overrides: dict[str, Any] = {}
    rabbitmq, broker_url = local_broker(broker, os.environ.get(PREFIX + "BROKER_URL", ""))
    if rabbitmq is not None or broker_url != os.environ.get(PREFIX + "BROKER_URL", ""):
        overrides["broker_url"] = broker_url
    redis = None
    if not os.environ.get(PREFIX + "REDIS_URL"):
        redis = RedisNode()  # its data (the uploads of the run among it) removed by close()
        overrides["redis_url"] = redis.url
    for field, default in (
        ("api_port", DEFAULT_API_PORT),
        ("worker_metrics_port", 9808),
        ("flower_port", 5555),
    ):
        if not os.environ.get(PREFIX + field.upper()):
            overrides[field] = _port_or_free(default)
    # Everything of a local run listens on loopback only, and the API answers loopback names
    # only (a web page that rebinds its own name to 127.0.0.1 gets 400 bad_host).
    if not os.environ.get(PREFIX + "WORKER_METRICS_HOST"):
        overrides["worker_metrics_host"] = "127.0.0.1"
    if not os.environ.get(PREFIX + "ALLOWED_HOSTS"):
        overrides["allowed_hosts"] = LOOPBACK_NAMES
    settings = Settings.from_env(**overrides)
    if not settings.flower_user:
        # A local run is on loopback only; still, Flower never runs without credentials (a
        # password set without a user is kept, for the user "admin").
        password = settings.flower_password.get_secret_value() or os.urandom(9).hex()
        settings = settings.replace(flower_user="admin", flower_password=password)
    return settings, redis, rabbitmq


#: The ``Host`` names a local run's API answers (any port).
LOOPBACK_NAMES = "localhost,127.0.0.1,[::1]"

#: ``BATCHVISION_BROKER_URL`` values that ask ``up`` for a RabbitMQ without naming a server.
START_RABBITMQ = ("amqp", "amqp://", "rabbitmq")


def local_broker(choice: str | None, configured: str) -> tuple[RabbitMQNode | None, str]:
    """The broker of a local run: (our own RabbitMQ node to start or ``None``, the broker URL).

    ``--broker redis``: the Redis URL, whatever ``BATCHVISION_BROKER_URL`` says; nothing: the
    same, unless ``BATCHVISION_BROKER_URL`` names a broker. ``--broker rabbitmq``, or
    ``BATCHVISION_BROKER_URL=amqp://`` without a host: the RabbitMQ that
    ``BATCHVISION_BROKER_URL`` names (the machine's own, a cluster), else a private
    ``rabbitmq-server`` on a free port (see :mod:`batchvision.cli.rabbitmq_server`)."""
    if choice == "redis":  # the flag is the last word, over the environment
        return None, ""
    if configured in START_RABBITMQ:
        choice, configured = "rabbitmq", ""
    if choice == "rabbitmq" and not configured.startswith("amqp"):
        server = RabbitMQNode()
        return server, server.url
    return None, configured


def _webhook_secret(settings: Settings) -> str:
    """The secret this stack signs callbacks with (``batchvision webhook-secret`` would need
    this stack's Redis URL to print it)."""
    import redis as redis_client

    from batchvision.server.webhooks import owner_secret

    with redis_client.Redis.from_url(settings.redis_url) as client:
        return owner_secret(client, settings, "")


def _port_or_free(port: int) -> int:
    """``port`` if a server can listen on it now, else a free one. The servers set
    ``SO_REUSEADDR`` (gunicorn does), so a port whose last connections linger in ``TIME_WAIT``
    (a stack stopped a moment ago) is theirs to take, and stays the documented one."""
    import socket

    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
            return port
        except OSError:
            return free_port()


#: The API port of a local run unless ``BATCHVISION_API_PORT`` names one (the docs' examples).
DEFAULT_API_PORT = 8000


def _moved_api_port(settings: Settings) -> str | None:
    """What to tell the user when a local run's API is not on the port the docs use."""
    if settings.api_port == DEFAULT_API_PORT or os.environ.get(PREFIX + "API_PORT"):
        return None
    url = f"http://127.0.0.1:{settings.api_port}"
    return (
        f"  note: port {DEFAULT_API_PORT} is taken, so the API listens on {settings.api_port}: "
        f"point the CLI at it with BATCHVISION_API_URL={url} (or free the port, or set "
        "BATCHVISION_API_PORT)"
    )


def up(args: argparse.Namespace) -> int:
    """Start everything, wait until healthy, optionally classify a folder, supervise."""
    if args.sample and not Path(args.sample).is_dir():
        print(f"error: --sample {args.sample}: no such folder", file=sys.stderr)
        return 2
    settings, redis, rabbitmq = local_settings(getattr(args, "broker", None))
    sup = Supervisor([], stop_grace_s=3.0)
    sup.install_signal_handlers()
    try:
        sup.services = stack(settings, redis, rabbitmq=rabbitmq)  # finds redis-server: may raise
        with sup.interruptible():
            sup.start()
            sup.wait_healthy()
            log.info("waiting for the worker to load its model")

            def between_pings() -> None:
                sup.raise_if_stopped()
                sup.check_once()

            wait_for_workers(settings, while_waiting=between_pings)
            sup.raise_if_stopped()
            print("\nbatchvision is up:")
            for svc in sup.services:
                print(f"  {svc.name:<7} {svc.url}")
            print(f"  {'page':<7} http://127.0.0.1:{settings.api_port}/   (drop a folder, watch it classify)")
            moved = _moved_api_port(settings)
            if moved:
                print(moved)
            if settings.flower_user:
                print(
                    f"  flower login: {settings.flower_user} / {settings.flower_password.get_secret_value()}"
                )
            if not settings.api_keys:  # with keys, each key reads its own: GET /v1/webhook-secret
                print(f"  webhook signing secret: {_webhook_secret(settings)}")
            sample = args.sample or (_demo_folder() if args.demo else None)
            if sample:
                try:
                    ended = _classify_folder(settings, Path(sample), between_pings)
                # ValueError: a file name that cannot be sent, an answer of another shape.
                # BatchvisionError: the API's refusal (ApiError), a folder without images (NoImages).
                except (
                    TimeoutError,
                    BatchvisionError,
                    OSError,
                    ValueError,
                    requests.RequestException,
                ) as exc:
                    # The sample is a first look, not the service: the stack stays up for the
                    # page and the API (unless it was only started for the sample).
                    print(f"\nerror: the sample was not classified: {exc}", file=sys.stderr, flush=True)
                    if args.exit_after_demo:
                        return 1
                else:
                    # A CI check: an image without a prediction fails it, as `submit --wait` does.
                    if args.exit_after_demo and ended != "succeeded":
                        return int(ExitCode.SOME_FAILED)
            if args.exit_after_demo:
                return 0
            print("\nCtrl-C stops every process.", flush=True)
            sup.run_forever()
            return 128 + sup.signum if sup.signum else 0
    except Stopped as stop:
        print(f"\nstopping (signal {stop.signum})", file=sys.stderr, flush=True)
        return 128 + stop.signum
    except ServiceFailed as exc:
        print(f"\nerror: {exc}\nstopping every service.", file=sys.stderr, flush=True)
        return 1
    except (TimeoutError, ApiError, OSError) as exc:
        # A service that never became ready or healthy, a server binary that is not installed,
        # the demo job refused or the API unreachable for good: the reason, not a traceback.
        print(f"\nerror: {exc}\nstopping every service.", file=sys.stderr, flush=True)
        return 1
    finally:
        sup.stop()
        if redis is not None:
            redis.close()
        if rabbitmq is not None:
            rabbitmq.close()


def wait_for_workers(
    settings: Settings,
    count: int = 1,
    timeout: float = 300.0,
    while_waiting: Callable[[], None] | None = None,
) -> None:
    """Block until ``count`` workers answer a ping over the broker (their model is loaded)."""
    import redis
    from kombu.exceptions import OperationalError

    from batchvision.server.queue import create_celery

    deadline = time.monotonic() + timeout
    while True:
        # A fresh app (and connection) each round: a broker that restarted leaves the pooled
        # connections of the last one broken, and a force-closed kombu pool can block forever.
        app = create_celery(settings)
        try:
            if len(app.control.ping(timeout=1.0)) >= count:
                return
        except (OSError, redis.exceptions.ConnectionError, OperationalError):
            pass  # the broker is (re)starting: ask again
        finally:
            app.close()  # its broker connections, now rather than whenever they are collected
        if while_waiting is not None:
            while_waiting()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{count} worker(s) did not answer within {timeout:.0f}s")


def _demo_folder() -> Path:
    from batchvision.core.synthetic import labelled_files

    folder = Path("samples")
    if not folder.exists():
        folder.mkdir()
        for name, data, _ in labelled_files(12, seed=2024):
            (folder / name).write_bytes(data)
    return folder


def _sample_key(settings: Settings) -> str | None:
    """The API key the sample is sent with: ``BATCHVISION_API_KEY``, else the first key the API
    is configured with (one given as its SHA-256 digest cannot be presented)."""
    if os.environ.get("BATCHVISION_API_KEY"):
        return os.environ["BATCHVISION_API_KEY"]
    keys = [k.strip() for k in settings.api_keys.get_secret_value().split(",") if k.strip()]
    return next((k for k in keys if not re.fullmatch(r"[0-9a-f]{64}", k)), None)


def _classify_folder(settings: Settings, folder: Path, supervise: Callable[[], None]) -> str:
    """Classify ``folder`` as one job and print its rows; ``supervise()`` runs between polls
    (a service that dies meanwhile is restarted, a stop signal heard). Returns the job's final
    status."""
    from batchvision.client import Client

    found = scan([folder])
    # A few minutes, and more for a large folder (a CPU classifies tens of images a second).
    deadline = time.monotonic() + 300 + len(found.images)
    # Short retries, then supervise: an API that died meanwhile is restarted by us, not waited for.
    with Client(
        f"http://127.0.0.1:{settings.api_port}", api_key=_sample_key(settings), retry_for_s=5
    ) as client:
        # In parts, as `batchvision submit` sends a folder: any size, any number of files.
        job = submit_folder(client, found)
        for rel in found.skipped:
            print(f"  skipped (not an image): {rel}")
        while True:
            try:
                left = deadline - time.monotonic()
                status = client.wait(job.job_id, timeout=max(left, 0.1), on_progress=lambda _: supervise())
                break
            except requests.RequestException:
                if time.monotonic() > deadline:
                    raise
                supervise()
        print(f"\njob {job.job_id}: {status.status}, {status.done} classified, {status.failed} failed")
        for row in client.results(job.job_id):
            if row.error is not None:
                print(f"  {row.filename:<28} error: {row.error.message}")
            else:
                print(f"  {row.filename:<28} {row.label:<12} {row.score or 0.0:.3f}")
        return str(status.status)
