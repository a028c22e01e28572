"""The ``batchvision`` command: run the services, make the demo model, talk to the API."""

from __future__ import annotations

import argparse
import importlib.util
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from batchvision.core.settings import (
    PREFIX,
    SECRETS,
    Settings,
    SettingsError,
    env_table,
    mask_url,
    masked,
    unknown_variables,
)
from batchvision.server.checks import ConfigError, check_worker_settings
from batchvision.server.gpus import GpuNotVisible, GpuReader
from batchvision.server.repository import RepositoryError
from batchvision.server.routing import worker_queues

DEFAULT_DEMO_MODEL = Path("models/demo.keras")
#: Exit status of a command refused by its configuration (invalid or unsafe settings).
EXIT_CONFIG = 2
#: Commands that run a service (and read the service settings).
SERVICE_COMMANDS = frozenset({"api", "worker", "flower", "up"})


def is_loopback(host: str) -> bool:
    """``localhost``, ``127.0.0.0/8`` or ``::1`` (with or without brackets)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def exposure_check(host: str, port: int, api_keys: str, anonymous_allowed: bool) -> tuple[bool, str]:
    """May the API listen on ``host`` with these settings, and what to say about it.

    Secure by default: without API keys the API serves only on loopback, unless anonymous
    access is allowed explicitly. Returns ``(may_start, message)``; the message goes to stderr.
    """
    if any(k.strip() for k in api_keys.split(",")):
        return True, ""
    where = f"{host}:{port}"
    if is_loopback(host):
        return True, (
            f"the API serves without authentication (BATCHVISION_API_KEYS is empty) "
            f"on {where}, a loopback address: only this machine can reach it."
        )
    if anonymous_allowed:
        return True, (
            f"the API serves without authentication on {where} because "
            f"BATCHVISION_ALLOW_ANONYMOUS=true: anyone who can reach it can submit jobs and read "
            f"every result. Set BATCHVISION_API_KEYS unless this network is trusted."
        )
    return False, (
        f"refusing to serve the API without authentication on {where}: anyone who can "
        f"reach it could submit jobs and read every result. Set BATCHVISION_API_KEYS "
        f"(comma-separated keys or their SHA-256 digests), or set BATCHVISION_ALLOW_ANONYMOUS=true "
        f"to serve without keys on a trusted network, or listen on loopback (--host 127.0.0.1)."
    )


def cmd_api(args: argparse.Namespace) -> int:
    """Serve the API under gunicorn (as the API container does).

    Without BATCHVISION_API_KEYS it serves on loopback only, unless
    BATCHVISION_ALLOW_ANONYMOUS=true (exit code 2 otherwise).
    """
    s = Settings.from_env()
    may_start, message = exposure_check(
        args.host, s.api_port, s.api_keys.get_secret_value(), s.allow_anonymous
    )
    if message:
        # Through logging: one line in the configured format (JSON lines too), on stderr.
        log = logging.getLogger("batchvision.api")
        (log.warning if may_start else log.error)(message)
    if not may_start:
        return EXIT_CONFIG
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
        # Long relative paths travel in ?filename=: allow gunicorn's largest request line.
        "--limit-request-line",
        "8190",
        # gunicorn's control socket (one path per user) is not used, and two APIs on one host
        # would fight over it.
        "--no-control-socket",
        "--timeout",
        str(int(s.sync_timeout_s) + 30),
        "--graceful-timeout",
        "30",
    ]
    # Without the access log, no line is built either (JSON logging would still make one).
    argv += (
        ["--access-logfile", "-"] if s.api_access_log else ["--logger-class", "api.gunicorn_conf.NoAccessLog"]
    )
    # Whose X-Forwarded-Proto makes the links the API writes https:// (behind a TLS proxy).
    # gunicorn's own FORWARDED_ALLOW_IPS still counts where ours is not set.
    if "BATCHVISION_FORWARDED_ALLOW_IPS" in os.environ or "FORWARDED_ALLOW_IPS" not in os.environ:
        argv += ["--forwarded-allow-ips", s.forwarded_allow_ips]
    if s.log_format == "json":  # api.gunicorn_conf reads it: JSON lines from gunicorn too
        from batchvision.core.logs import ACCESS_FORMAT

        os.environ["BATCHVISION_LOG_FORMAT"] = "json"
        argv += ["--access-logformat", ACCESS_FORMAT]
    os.execv(sys.executable, argv)


# -- log format ----------------------------------------------------------------------------------


def _log_format() -> str:
    """``BATCHVISION_LOG_FORMAT`` (read alone: the client commands need no other setting)."""
    from batchvision.core.logs import check_format

    return check_format(os.environ.get("BATCHVISION_LOG_FORMAT") or "text")


def setup_logging(service: str = "up") -> None:
    """This process's log lines: readable text, or JSON lines with BATCHVISION_LOG_FORMAT=json."""
    from batchvision.core.logs import configure_logging

    configure_logging(_log_format(), logging.INFO, service=service)


def cmd_worker(args: argparse.Namespace) -> int:
    """One Celery worker process with a threads pool (TensorFlow is never forked)."""
    s = Settings.from_env()
    try:
        check_worker_settings(s)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # The GPU first: a worker pinned to a device it cannot see fails before it reads models.
    # BATCHVISION_GPU alone (a container's environment) pins as --gpu does.
    gpu = args.gpu if args.gpu is not None else s.gpu
    if gpu:
        try:
            pin_gpu(s, gpu)
        except (SettingsError, GpuNotVisible) as exc:
            given = "--gpu" if args.gpu is not None else "BATCHVISION_GPU"
            print(f"error: {given} {gpu}: {exc}", file=sys.stderr)
            return 2
    # The models this worker serves (--models, else BATCHVISION_WORKER_MODELS, else
    # every model of the repository) decide the queues it consumes; the worker process reads
    # BATCHVISION_WORKER_MODELS to load the same ones.
    try:
        models = worker_models(s, args.models)
    except (RepositoryError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    os.environ["BATCHVISION_WORKER_MODELS"] = ",".join(models)
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
        ",".join(worker_queues(s, models)),
        "--hostname",
        name,
        "--task-events",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        args.loglevel,
    ]
    if s.log_format == "json":
        # No banner on stdout (every line is a JSON log record; native output of
        # TensorFlow is turned into records by workers.logs).
        argv.insert(argv.index("worker"), "--quiet")
    os.execv(sys.executable, argv)


def pin_gpu(s: Settings, gpu: str, reader: GpuReader | None = None) -> None:
    """Pin the worker to ``gpu`` (``--gpu``, else ``BATCHVISION_GPU``; an index counts within a
    ``CUDA_VISIBLE_DEVICES`` set already) if NVML shows it:
    ``CUDA_VISIBLE_DEVICES`` for the frameworks, ``BATCHVISION_GPU`` for the worker's own check
    that its models run there. Raises :class:`GpuNotVisible` (naming the GPUs that are visible)
    rather than run on the CPU. ``reader``: NVML unless given (tests)."""
    from batchvision.server.gpus import require_gpu

    s.replace(gpu=gpu)  # its form: an index or a UUID
    # A CUDA_VISIBLE_DEVICES set already is a scheduler's share of the host: --gpu picks within it.
    found = require_gpu(gpu, reader, allotted=os.environ.get("CUDA_VISIBLE_DEVICES"))
    # By its UUID, for the frameworks and for the worker's own check: an index means NVML's
    # order (PCI bus) to us, and CUDA's own order (fastest first) to the frameworks; on a host
    # of mixed GPUs the two differ.
    os.environ["CUDA_VISIBLE_DEVICES"] = found.uuid
    os.environ["BATCHVISION_GPU"] = found.uuid


def worker_models(s: Settings, given: str | None) -> list[str]:
    """The models a worker serves: ``given`` (``--models``), else ``BATCHVISION_WORKER_MODELS``,
    else every model of the repository; each checked against the repository (no TensorFlow:
    the folders are read, not loaded)."""
    from batchvision.server.repository import parse_model_list, repository, select

    wanted = parse_model_list(given if given is not None else s.worker_models)
    # (An s3:// repository copies only these models to the local cache.)
    return sorted(select(repository(s.replace(worker_models=",".join(wanted))), wanted))


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
    """Flower, with basic auth; refuses to start without credentials unless --insecure.

    The broker URL (with its password) and the login travel in the environment Celery and
    Flower read (``CELERY_BROKER_URL``, ``FLOWER_BASIC_AUTH``), never on the command line,
    where every user of the machine could read them (``ps``, ``/proc/<pid>/cmdline``).
    """
    if importlib.util.find_spec("flower") is None:
        # Else Celery's own message, "No such command 'flower'", would be all the user sees.
        print(
            "Flower is not installed: install the `flower` extra (pip install 'batchvision[flower]'); "
            "its image is Dockerfile.api built with --build-arg EXTRAS=api,flower --target flower",
            file=sys.stderr,
        )
        return 2
    s = Settings.from_env()
    from batchvision.server.queue import broker_url

    argv = [sys.executable, "-m", "celery", "flower", f"--port={s.flower_port}", f"--address={args.host}"]
    os.environ["CELERY_BROKER_URL"] = broker_url(s)
    password = s.flower_password.get_secret_value()
    if s.flower_user and password:
        os.environ["FLOWER_BASIC_AUTH"] = f"{s.flower_user}:{password}"
    elif not args.insecure:
        print(
            "refusing to start Flower without authentication: set BATCHVISION_FLOWER_USER and "
            "BATCHVISION_FLOWER_PASSWORD (or pass --insecure on a trusted network)",
            file=sys.stderr,
        )
        return 2
    os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "false")
    if s.log_format == "json":  # Flower's (tornado's) log lines as JSON too
        argv[1:3] = ["-m", "batchvision.cli.logexec", "flower", "celery"]
    os.execv(sys.executable, argv)


def cmd_webhook_secret(args: argparse.Namespace) -> int:
    """Print the webhook signing secret of the installation without API keys (the API does not
    serve it over HTTP then); with ``--owner``, that of one API key's owner id."""
    import redis

    from batchvision.server import keys
    from batchvision.server.webhooks import owner_secret

    s = Settings.from_env()
    client = redis.Redis.from_url(s.redis_url)
    unset = f"{PREFIX}REDIS_URL" not in os.environ
    try:
        missing = not s.webhook_secret.get_secret_value() and not client.exists(keys.WEBHOOK_SECRET)
    except redis.RedisError as exc:
        print(f"cannot read the webhook secret from {mask_url(s.redis_url)}: {exc}", file=sys.stderr)
        return 1
    if unset and missing:
        # Else a secret would be made in whatever Redis answers at the default URL, and every
        # signature checked with it would fail.
        print(
            f"{PREFIX}REDIS_URL is not set and the Redis at {mask_url(s.redis_url)} holds no webhook "
            f"secret: set {PREFIX}REDIS_URL to your installation's Redis (`batchvision up` prints "
            "its secret when it starts)",
            file=sys.stderr,
        )
        return 2
    print(owner_secret(client, s, args.owner))
    return 0


def cmd_settings(args: argparse.Namespace) -> int:
    """Check this environment's settings as a service's start would (exit 2 naming each bad
    value), then print every variable: the value it has here (secrets and URL passwords
    masked; ``*`` where it is set) and what it means, or with ``--changed`` only those set."""
    s = Settings.from_env()
    for variable in unknown_variables(os.environ):
        print(f"{variable}: unknown setting (a typo?)", file=sys.stderr)
    for (variable, _, meaning), name in zip(env_table(), Settings.model_fields, strict=True):
        given = variable in os.environ and os.environ[variable] != ""
        if args.changed and not given:
            continue
        value = getattr(s, name)
        shown = "**********" if name in SECRETS and str(value) else masked(value)
        print(f"{'*' if given else ' '} {variable}={shown}")
        if not args.changed:
            print(f"      {meaning}")
    return 0


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
        "--kind",
        args.kind,
        *(["--epochs", str(args.epochs)] if args.epochs is not None else []),
        "--min-accuracy",
        str(args.min_accuracy),
    )


def _worker_tool(*argv: str) -> int:
    # TensorFlow lives in the workers' package only: run its tools in a child interpreter.
    return subprocess.run([sys.executable, "-m", "workers", *argv], check=False).returncode


def cmd_up(args: argparse.Namespace) -> int:
    """Run Redis, the API, a worker and Flower locally, supervised: a service that dies is
    restarted, one that exits with a fatal error stops the stack (exit code 1), Ctrl-C stops
    everything."""
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
    p.add_argument(
        "--host",
        default="0.0.0.0",
        help="address to listen on (default 0.0.0.0, as in a container: then API keys or "
        "BATCHVISION_ALLOW_ANONYMOUS=true are required)",
    )
    p = add("worker", cmd_worker, "run one classification worker")
    p.add_argument(
        "--gpu",
        help="pin to this GPU, an index or a UUID (sets CUDA_VISIBLE_DEVICES); exit 2 if it is not visible",
    )
    p.add_argument(
        "--models",
        help="comma-separated models this worker serves and whose queues it consumes (default: "
        "BATCHVISION_WORKER_MODELS, else every model of BATCHVISION_MODELS_DIR and BATCHVISION_MODEL)",
    )
    p.add_argument("--name", help="Celery node name (default worker@HOSTNAME)")
    p.add_argument("--loglevel", default="INFO", help="Celery's log level (default INFO)")
    p = add("worker-health", cmd_worker_health, "probe: does the local worker still consume?")
    p.add_argument("--name", help="the worker's Celery node name (default worker@HOSTNAME)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds to wait for the reply (default 5)")
    p = add("flower", cmd_flower, "run Flower (task monitor) with basic auth")
    p.add_argument("--insecure", action="store_true", help="allow running without credentials")
    p.add_argument(
        "--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0, as in a container)"
    )
    p = add("webhook-secret", cmd_webhook_secret, "print the webhook signing secret (read from Redis)")
    p.add_argument("--owner", default="", help="an API key's owner id (default: the anonymous installation)")
    add("fetch-weights", cmd_fetch_weights, "download the model's ImageNet weights")
    p = add("settings", cmd_settings, "check this environment's settings and print them")
    p.add_argument("--changed", action="store_true", help="only the variables set here")
    p = add("demo-model", cmd_demo_model, "train the demo model on synthetic shapes")
    p.add_argument("--out", default=str(DEFAULT_DEMO_MODEL), help="the .keras file to write")
    p.add_argument(
        "--kind",
        choices=("shapes", "colours"),
        default="shapes",
        help="shapes (the demo model) or colours (the second demo model of the repository)",
    )
    p.add_argument("--epochs", type=int, default=None, help="default: 18 for shapes, 8 for colours")
    p.add_argument(
        "--min-accuracy", type=float, default=0.95, help="fail unless a fresh held-out set reaches it"
    )
    p.add_argument("--force", action="store_true", help="train again even if the file exists")
    p = add("up", cmd_up, "run Redis, API, worker and Flower locally, supervised")
    p.add_argument("--sample", help="classify this folder once the stack is up")
    p.add_argument("--demo", action="store_true", help="classify generated sample images once up")
    p.add_argument("--exit-after-demo", action="store_true", help="stop after the demo (CI)")
    p.add_argument(
        "--broker",
        choices=("redis", "rabbitmq"),
        default=None,
        help="Celery broker: redis (default) or rabbitmq (our own rabbitmq-server, unless "
        "BATCHVISION_BROKER_URL names one)",
    )
    from batchvision.cli import commands, model_commands

    commands.register(sub, add)
    model_commands.register(sub, add)  # models, reload
    return parser


class Terminated(KeyboardInterrupt):
    """SIGTERM or SIGHUP to a client command: unwound like Ctrl-C, so that what it leaves
    behind is cleaned up (a partial download) or said (how to resume an upload)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signum)
        self.signum = signum


def _terminate(signum: int, _frame: object) -> None:
    raise Terminated(signum)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command in SERVICE_COMMANDS:  # their own signal handling
        return _run(args)
    wanted = [signal.SIGTERM] + ([signal.SIGHUP] if hasattr(signal, "SIGHUP") else [])
    # Not a hangup under nohup (or a supervisor that asked for hangups to be ignored).
    mine = [s for s in wanted if signal.getsignal(s) is not signal.SIG_IGN]
    before = {s: signal.signal(s, _terminate) for s in mine}
    code: int | None = None
    try:
        code = _run(args)
        return code
    finally:
        for s, handler in before.items():  # main() may be called in a process that goes on (tests)
            signal.signal(s, handler)
        for s, handler in before.items():
            if code == 128 + s and callable(handler):
                # The caller's own handler (a test run stopping) hears the signal this command took.
                handler(s, None)


def _run(args: argparse.Namespace) -> int:
    try:
        setup_logging(args.command)  # text, or JSON lines with BATCHVISION_LOG_FORMAT=json
    except ValueError as exc:  # the message names the variable and the formats allowed
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    try:
        if args.command in SERVICE_COMMANDS:
            if os.environ.get("CELERY_BROKER_URL"):
                # Celery reads it before any setting: the services would quietly use that
                # broker instead of BATCHVISION_BROKER_URL / BATCHVISION_REDIS_URL.
                raise SettingsError(
                    "CELERY_BROKER_URL is set in the environment and would override the broker "
                    "of BATCHVISION_BROKER_URL (or BATCHVISION_REDIS_URL): unset it, and name the "
                    "broker with BATCHVISION_BROKER_URL"
                )
            unknown = unknown_variables(os.environ)
            if unknown:
                logging.getLogger("batchvision").warning(
                    "ignoring unknown variables (typo?): %s; see docs/reference/configuration.md",
                    ", ".join(unknown),
                )
        return int(args.fn(args) or 0)
    except SettingsError as exc:
        # A bad setting is the operator's to fix: say which and why, no traceback.
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt as exc:
        # Ctrl-C (or SIGTERM, SIGHUP) in a client command: no traceback, the shell's exit code.
        signum = exc.signum if isinstance(exc, Terminated) else signal.SIGINT
        print("interrupted" if signum == signal.SIGINT else "terminated", file=sys.stderr)
        return 128 + signum


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
