"""The ``batchvision`` command: run the services, make the demo model, talk to the API."""

from __future__ import annotations

import argparse
import logging
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from batchvision.core.settings import Settings
from batchvision.server.checks import ConfigError, check_worker_settings
from batchvision.server.queue import interactive_queue

DEFAULT_DEMO_MODEL = Path("models/demo.keras")


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the API under gunicorn (as the API container does)."""
    s = Settings.from_env()
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        # Metrics of all gunicorn workers are aggregated through files in this directory;
        # it must start empty, so it belongs to this one server.
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="batchvision-metrics-")
    argv = [
        sys.executable,
        "-m",
        "gunicorn",
        "api:create_app()",
        "--config",
        "python:api.gunicorn_conf",
        "--bind",
        f"{args.host}:{s.api_port}",
        "--workers",
        str(s.api_workers),
        # gevent: a request waiting in POST /v1/classify is a greenlet, not a thread, so
        # thousands of clients may wait at once (the job waiter wakes them over pub/sub).
        "--worker-class",
        "gevent",
        "--worker-connections",
        "2000",
        "--timeout",
        str(int(s.sync_timeout_s) + 30),
        "--graceful-timeout",
        "30",
        "--access-logfile",
        "-",
    ]
    os.execv(sys.executable, argv)


def cmd_worker(args: argparse.Namespace) -> int:
    """One Celery worker process with a threads pool (TensorFlow is never forked)."""
    s = Settings.from_env()
    try:
        check_worker_settings(s)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.gpu is not None:
        os.environ["CUDA_VISIBLE_DEVICES"] = args.gpu
    # glibc gives each decoding thread its own malloc arena; their fragmentation shows up as
    # RSS that creeps up over hours. Two arenas keep it flat at no measurable cost here.
    os.environ.setdefault("MALLOC_ARENA_MAX", "2")
    name = args.name or f"worker@{socket.gethostname()}"
    argv = [
        sys.executable,
        "-m",
        "celery",
        "-A",
        "workers.celery_app",
        "worker",
        "--pool",
        "threads",
        "--concurrency",
        str(s.worker_threads),
        "--queues",
        f"{interactive_queue(s)},{s.queue}",
        "--hostname",
        name,
        "--task-events",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        args.loglevel,
    ]
    os.execv(sys.executable, argv)


def cmd_worker_health(args: argparse.Namespace) -> int:
    """Exit 0 if the worker answers a ping over the broker: it still consumes."""
    from batchvision.server.queue import create_celery

    app = create_celery(Settings.from_env())
    name = args.name or f"worker@{socket.gethostname()}"
    replies = app.control.ping(destination=[name], timeout=args.timeout)
    ok = any(name in r for r in replies)
    print(f"{name}: {'ok' if ok else 'no reply'}")
    return 0 if ok else 1


def cmd_flower(args: argparse.Namespace) -> int:
    """Flower, with basic auth; refuses to start without credentials unless --insecure."""
    s = Settings.from_env()
    argv = [sys.executable, "-m", "celery", "--broker", s.redis_url, "flower", f"--port={s.flower_port}"]
    if s.flower_user and s.flower_password:
        argv.append(f"--basic-auth={s.flower_user}:{s.flower_password}")
    elif not args.insecure:
        print(
            "refusing to start Flower without authentication: set BATCHVISION_FLOWER_USER and "
            "BATCHVISION_FLOWER_PASSWORD (or pass --insecure on a trusted network)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "false")
    os.execv(sys.executable, argv)


def cmd_fetch_weights(args: argparse.Namespace) -> int:
    """Download the ImageNet weights of ``BATCHVISION_MODEL`` into the Keras cache."""
    return _worker_tool("fetch-weights")


def cmd_demo_model(args: argparse.Namespace) -> int:
    """Train the small demo CNN on synthetic shapes (about a minute on a CPU)."""
    out = Path(args.out)
    if out.exists() and not args.force:
        print(f"{out} exists (use --force to retrain)")
        return 0
    return _worker_tool(
        "demo-model",
        "--out",
        str(out),
        "--epochs",
        str(args.epochs),
        "--min-accuracy",
        str(args.min_accuracy),
    )


def _worker_tool(*argv: str) -> int:
    # TensorFlow lives in the workers' package only: run its tools in a child interpreter.
    return subprocess.run([sys.executable, "-m", "workers", *argv], check=False).returncode


def cmd_up(args: argparse.Namespace) -> int:
    """Start the whole stack locally; see :mod:`batchvision.cli.local`."""
    from batchvision.cli.local import up

    return up(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="batchvision", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    def add(name: str, fn: Callable[[argparse.Namespace], int], help_: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=fn.__doc__)
        p.set_defaults(fn=fn)
        return p

    p = add("api", cmd_api, "serve the HTTP API (gunicorn)")
    p.add_argument("--host", default="0.0.0.0")
    p = add("worker", cmd_worker, "run one classification worker")
    p.add_argument("--gpu", help="pin to this GPU (sets CUDA_VISIBLE_DEVICES)")
    p.add_argument("--name", help="Celery node name (default worker@HOSTNAME)")
    p.add_argument("--loglevel", default="INFO")
    p = add("worker-health", cmd_worker_health, "probe: does the local worker still consume?")
    p.add_argument("--name")
    p.add_argument("--timeout", type=float, default=5.0)
    p = add("flower", cmd_flower, "run Flower (task monitor) with basic auth")
    p.add_argument("--insecure", action="store_true", help="allow running without credentials")
    add("fetch-weights", cmd_fetch_weights, "download the model's ImageNet weights")
    p = add("demo-model", cmd_demo_model, "train the demo model on synthetic shapes")
    p.add_argument("--out", default=str(DEFAULT_DEMO_MODEL))
    p.add_argument("--epochs", type=int, default=18)
    p.add_argument("--min-accuracy", type=float, default=0.95)
    p.add_argument("--force", action="store_true")
    p = add("up", cmd_up, "run Redis, API, worker and Flower locally, supervised")
    p.add_argument("--sample", help="classify this folder once the stack is up")
    p.add_argument("--demo", action="store_true", help="classify generated sample images once up")
    p.add_argument("--exit-after-demo", action="store_true", help="stop after the demo (CI)")
    from batchvision.cli import commands

    commands.register(sub, add)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    args = build_parser().parse_args(argv)
    return int(args.fn(args) or 0)


def _commands() -> tuple[str, ...]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return tuple(action.choices)
    return ()


#: Every subcommand, for the parity tests of Dockerfiles, compose and k8s.
COMMANDS = _commands()

if __name__ == "__main__":
    sys.exit(main())
