"""Fixtures that start real things: redis-servers, the demo model, worker and API processes.

Nothing is mocked: the suite starts what it needs on free ports and stops it afterwards.
The servers come from :mod:`batchvision.testing.servers` (test support, not in the wheel).
The fixture API below is stable; other modules' rigs belong here once two modules need them.

- ``redis_server``, ``redis_client``, ``scratch_server``, ``scratch_redis``, ``store``: below.
- ``settings``, ``stack``, ``api_url``: the session's API and worker (``batchvision up``'s
  commands) on ``redis_server``; ``wait_worker(settings)``: until a worker answers a ping.
- ``broker``, ``start_rabbitmq()``: below.
- ``start_private_stack(logs, broker="redis", **overrides)``: a :class:`PrivateStack` of the
  module's own (Redis, the broker, the API; workers on demand) for tests that kill, stop and
  restart things; closed when the module ends.
- ``demo_model``, ``reference_labels(model, files)``, ``artifacts``: below.
- ``s3_server`` (moto in server mode: a real S3 HTTP endpoint), ``s3_bucket`` (a fresh bucket).

Two Redis servers: ``redis_server`` is the one the session's stack (API + worker) uses;
``scratch_redis`` is a private one, flushed before each test, for the in-process tests of the
store, the chunk processor and the recovery sweeper (no worker reads it, so its global keys,
the pending counter, the chunk ledger, the sweep lock, are the test's alone).

Brokers: ``broker`` is ``"redis"`` unless a test is parametrised over it
(``@pytest.mark.parametrize("broker", [...], indirect=True, scope="module")``, the RabbitMQ
variant marked ``rabbitmq``); ``start_rabbitmq()`` starts a private ``rabbitmq-server`` on free
ports, stopped after the module. Without Debian's ``rabbitmq-server`` (which `make test`
installs) the RabbitMQ variants skip, saying so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import subprocess
import sys
import threading
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import numpy as np
import pytest
import redis as redis_lib
from PIL import Image

from batchvision.cli.local import stack as local_stack
from batchvision.cli.local import wait_for_workers
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.batching import BatchInfo, DynamicBatcher
from batchvision.core.errors import BatchvisionError
from batchvision.core.imaging import decode_image
from batchvision.core.model_refs import JobOptions
from batchvision.core.results import Prediction, prediction
from batchvision.core.settings import Settings
from batchvision.core.synthetic import encode
from batchvision.server import keys
from batchvision.server.blobs import RedisBlobs
from batchvision.server.claims import Claims
from batchvision.server.connect import connect_redis
from batchvision.server.messages import Chunk, ClassifyMessage
from batchvision.server.pipeline import ChunkProcessor, ProcessorLimits
from batchvision.server.recovery import chunk_member, ledger_add
from batchvision.server.store import Counts, JobStore
from batchvision.testing.s3server import CREDENTIALS, MotoServer
from batchvision.testing.servers import RabbitMQServer, RedisServer, have_rabbitmq

ROOT = Path(__file__).resolve().parents[2]

# Before anything imports TensorFlow (test_model imports it at collection) or starts a worker.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


@pytest.fixture(scope="session")
def artifacts() -> Path:
    """Where worker logs and reports go (``tests/artifacts/``, ignored by git)."""
    path = ROOT / "tests" / "artifacts"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _require_rabbitmq() -> None:
    if not have_rabbitmq():
        # Listed by -ra in the summary: a machine without it runs only the Redis variants.
        pytest.skip("rabbitmq-server is not installed (apt-get install rabbitmq-server; make test does)")


@pytest.fixture(scope="module")
def broker(request: pytest.FixtureRequest) -> str:
    """The Celery broker of the module's stack: ``"redis"`` (default) or ``"rabbitmq"`` when
    the test is parametrised over it (indirectly, with module scope)."""
    name = str(getattr(request, "param", "redis"))
    if name == "rabbitmq":
        _require_rabbitmq()
    return name


@pytest.fixture(scope="module")
def start_rabbitmq(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[], RabbitMQServer]]:
    """``start_rabbitmq()``: a private, started rabbitmq-server (own node, free ports, own data
    directory); every one is stopped when the module ends."""
    started: list[RabbitMQServer] = []

    def start() -> RabbitMQServer:
        _require_rabbitmq()
        server = RabbitMQServer(data_dir=tmp_path_factory.mktemp("rabbitmq"))
        started.append(server)
        return server.start()

    yield start
    for server in started:
        server.close()


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoServer]:
    """A private S3-compatible endpoint (moto in server mode, its own process, a free port);
    the test credentials are in this process' environment, the SDK's way, for as long as it runs
    (and in every process started with ``s3_env``)."""
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)
    try:
        with MotoServer() as server:
            yield server
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture()
def s3_bucket(s3_server: MotoServer, request: pytest.FixtureRequest) -> str:
    """A new, empty bucket of ``s3_server`` named after the test."""
    name = "t-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:40].strip("-")
    name = f"{name}-{os.urandom(3).hex()}"
    s3_server.client().create_bucket(Bucket=name)
    return name


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture()
def redis_client(redis_server: RedisServer) -> Iterator[redis_lib.Redis]:
    client = redis_lib.Redis.from_url(redis_server.url)
    yield client
    client.close()


@pytest.fixture()
def redis_commands(
    redis_client: redis_lib.Redis,
) -> Callable[[], AbstractContextManager[list[dict[str, Any]]]]:
    """``with redis_commands() as seen:``: every command the session's Redis runs in the block
    (``MONITOR``: scripts' commands too, as ``client_type`` ``lua``) is in ``seen`` after it."""

    @contextlib.contextmanager
    def watching() -> Iterator[list[dict[str, Any]]]:
        token, seen, ready = uuid.uuid4().hex, [], threading.Event()

        def watch() -> None:
            with redis_client.monitor() as monitor:
                ready.set()
                for command in monitor.listen():
                    if token in command["command"]:
                        return
                    seen.append(command)

        thread = threading.Thread(target=watch, daemon=True)
        thread.start()
        assert ready.wait(30), "MONITOR did not start"
        yield seen
        redis_client.echo(token)  # the block's end, as MONITOR sees it
        thread.join(30)
        assert not thread.is_alive(), "MONITOR did not see the end of the block"

    return watching


@pytest.fixture(scope="session")
def scratch_server() -> Iterator[RedisServer]:
    with RedisServer() as server:
        yield server


@pytest.fixture()
def scratch_redis(scratch_server: RedisServer) -> Iterator[redis_lib.Redis]:
    """A client of the private Redis, emptied before the test."""
    client = redis_lib.Redis.from_url(scratch_server.url)
    client.flushall()
    yield client
    client.close()


@pytest.fixture()
def store(scratch_redis: redis_lib.Redis) -> JobStore:
    """A job store on the private Redis: results kept 600 s, open uploads 300 s."""
    return JobStore(scratch_redis, result_ttl_s=600, blob_ttl_s=300)


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


@pytest.fixture(scope="session")
def wait_worker() -> Callable[[Settings], None]:
    """``wait_worker(settings)``: block until a worker of ``settings``' broker answers a ping
    (its model is loaded)."""

    def wait(settings: Settings, timeout: float = 120.0) -> None:
        wait_for_workers(settings, timeout=timeout)

    return wait


@pytest.fixture(scope="session")
def stack(settings: Settings, wait_worker: Callable[[Settings], None]) -> Iterator[Supervisor]:
    """The API and one worker, as `batchvision up` and compose run them, serving."""
    sup = Supervisor([s for s in local_stack(settings, None) if s.name in ("api", "worker")])
    sup.start()
    try:
        sup.wait_healthy(timeout=120)
        wait_worker(settings)
        yield sup
    finally:
        sup.stop()


@pytest.fixture(scope="session")
def api_url(stack: Supervisor, settings: Settings) -> str:
    return f"http://127.0.0.1:{settings.api_port}"


class ReferenceLabels(Protocol):
    def __call__(self, model: Path, files: Sequence[tuple[str, bytes]]) -> list[str]: ...


@pytest.fixture(scope="session")
def reference_labels() -> ReferenceLabels:
    """``reference_labels(model_file, [(name, data), ...])``: the labels the same model file gives
    in this process, one image at a time, through the worker's own loader and decoder.

    Service results are checked against the model itself, never against how well it happened to
    train: the trained weights depend on the machine's numerics, the pipeline must not."""
    model_mod = importlib.import_module("workers.keras_model")
    loaded: dict[Path, Any] = {}

    def labels(model: Path, files: Sequence[tuple[str, bytes]]) -> list[str]:
        if model not in loaded:
            # A repository version keeps its labels beside the model as labels.txt.
            beside = model.parent / "labels.txt"
            labels_file = str(beside) if beside.exists() else ""
            loaded[model] = model_mod.load_classifier(Settings(model=str(model), labels=labels_file))
        clf = loaded[model]
        out = []
        for _, data in files:
            (probs,) = clf.predict([decode_image(data, clf.input_size, max_pixels=50_000_000)])
            out.append(clf.labels[int(np.argmax(probs))])
        return out

    return labels


# -- the chunk processor in-process (test_chunk_processor, test_model_lanes, test_redis_full) ---

#: Two stand-in models: the mean colour of an image decides its class, under each model's own
#: class names (the model is not what those tests test).
COLOUR_MODELS = {"colours": ("red", "green", "blue"), "rgb": ("R", "G", "B")}
COLOUR_RGB = {"red": (230, 20, 20), "green": (20, 230, 20), "blue": (20, 20, 230)}


def colour_model(images: list[np.ndarray]) -> list[np.ndarray]:
    """Class probabilities from each image's mean colour: red, green or blue."""
    out = []
    for img in images:
        means = img.reshape(-1, 3).astype(np.float64).mean(axis=0) + 1.0
        out.append((means / means.sum()).astype(np.float32))
    return out


class ColourLane:
    """One stand-in model behind its own batcher (a :class:`~batchvision.server.lanes.Lane`)."""

    def __init__(
        self,
        name: str,
        labels: Sequence[str],
        on_batch: Callable[[BatchInfo], None],
        model: Callable[[list[np.ndarray]], list[np.ndarray]] = colour_model,
    ) -> None:
        self.name = name
        self.labels = labels
        self.input_size = (16, 16)
        self.batcher: DynamicBatcher[np.ndarray, Any] = DynamicBatcher(
            model, max_batch_size=8, max_delay_s=5.0, on_batch=on_batch
        )

    def result(self, output: Any, options: JobOptions) -> Prediction:
        doc = prediction(np.asarray(output), self.labels, options.top_k, options.min_score)
        return doc.with_model(self.name, 7)


class ColourLanes:
    """The lanes of :data:`COLOUR_MODELS`; version 99 of any model cannot be loaded."""

    def __init__(
        self,
        on_batch: Callable[[BatchInfo], None],
        model: Callable[[list[np.ndarray]], list[np.ndarray]] = colour_model,
    ) -> None:
        self.served = {
            name: ColourLane(name, labels, on_batch, model) for name, labels in COLOUR_MODELS.items()
        }

    def lane(self, options: JobOptions) -> ColourLane | None:
        if options.version == 99:
            raise BatchvisionError(
                f"model {options.model} version 99 cannot be loaded", code="model_version_unavailable"
            )
        return self.served.get(options.model)


@dataclasses.dataclass
class ProcessorRig:
    """A :class:`ChunkProcessor` over a private redis-server, with what the API would do
    (:meth:`job`) and what the tests look at."""

    r: redis_lib.Redis
    store: JobStore
    claims: Claims
    blobs: RedisBlobs
    processor: ChunkProcessor
    batches: list[BatchInfo]
    recorded: list[tuple[Counts, str]]
    handed: list[tuple[Chunk, str, bool]]
    #: the ``enqueued_at`` of each chunk handed on
    handed_at: list[float | None]

    @staticmethod
    def jpeg(colour: str) -> bytes:
        return encode(Image.new("RGB", (40, 30), COLOUR_RGB[colour]), "JPEG", quality=90)

    def job(
        self, job_id: str, images: Sequence[bytes], seal: bool = True, options: JobOptions | None = None
    ) -> list[int]:
        """What the API does: the job, its files, their blobs, the chunk in the ledger."""
        if options is None:
            self.store.create(job_id, model="colours")  # the processor's own defaults
        else:
            self.store.create(job_id, model=options.model, options=options.to_hash())
        indexed = self.store.add_files(job_id, [(f"{i}.jpg", f"{i}.jpg") for i in range(len(images))])
        indexes = [i for i, _ in indexed]
        self.blobs.put_many(job_id, dict(zip(indexes, images, strict=True)))
        pipe = self.r.pipeline()
        ledger_add(pipe, [Chunk.of(job_id, indexes)], 0.0)
        pipe.execute()
        if seal:
            self.store.seal(job_id)
        return indexes

    def process(
        self,
        *chunks: tuple[str, Sequence[int]],
        enqueued_at: float | None = None,
        urgent: bool = False,
        retries: int = 0,
    ) -> dict[str, Any]:
        message = ClassifyMessage(tuple(Chunk.of(j, ix) for j, ix in chunks), enqueued_at, urgent)
        return self.processor.process(message, retries=retries).summary()

    def rows(self, job_id: str) -> list[dict[str, Any]]:
        return [row.document() for row in self.store.iter_results(job_id)]

    def labels(self, job_id: str) -> list[str]:
        return [row.get("label") or row["error"]["code"] for row in self.rows(job_id)]

    def blobs_left(self, job_id: str) -> list[bytes]:
        return sorted(self.r.scan_iter(match=keys.blob_pattern(job_id)))

    def in_ledger(self, job_id: str, indexes: Sequence[int]) -> bool:
        return self.r.zscore(keys.CHUNKS, chunk_member(Chunk.of(job_id, indexes))) is not None

    def model_calls(self) -> list[int]:
        return [b.size for b in self.batches]


def processor_rig(
    client: redis_lib.Redis,
    model: Callable[[list[np.ndarray]], list[np.ndarray]] = colour_model,
    blobs: Any = None,
    **limits: Any,
) -> Iterator[ProcessorRig]:
    """A :class:`ProcessorRig` on ``client`` (``model``: the stand-in every lane runs;
    ``blobs``: the blob store, Redis' by default; ``limits``: :class:`ProcessorLimits` fields)."""
    batches: list[BatchInfo] = []
    recorded: list[tuple[Counts, str]] = []
    handed: list[tuple[Chunk, str, bool]] = []
    handed_at: list[float | None] = []
    lanes = ColourLanes(batches.append, model)
    store = JobStore(client, result_ttl_s=3600, blob_ttl_s=3600)
    claims = Claims(client, ttl_s=300)
    blobs = blobs if blobs is not None else RedisBlobs(client, ttl_s=300)
    processor = ChunkProcessor(
        store=store,
        claims=claims,
        blobs=blobs,
        lanes=lanes,
        default_model="colours",
        limits=ProcessorLimits(**{"top_k": 2, "max_attempts": 2, "model_timeout_s": 30.0, **limits}),
        hand_on=lambda chunk, model, urgent, priority, enqueued_at: (
            handed.append((chunk, model, urgent)),
            handed_at.append(enqueued_at),
        ),
        on_recorded=lambda counts, model: recorded.append((counts, model)),
    )
    yield ProcessorRig(client, store, claims, blobs, processor, batches, recorded, handed, handed_at)
    processor.close()
    for lane in lanes.served.values():
        lane.batcher.close()


@pytest.fixture()
def rig(scratch_redis: redis_lib.Redis) -> Iterator[ProcessorRig]:
    """The chunk processor over the scratch redis-server, serving :data:`COLOUR_MODELS`."""
    yield from processor_rig(scratch_redis)


@pytest.fixture()
def rig_on() -> Iterator[Callable[..., ProcessorRig]]:
    """``rig_on(client, **options)``: the ``rig`` over another redis-server, or with other
    :func:`processor_rig` options (closed after the test)."""
    with contextlib.ExitStack() as stack:
        yield lambda client, **options: stack.enter_context(
            contextlib.contextmanager(processor_rig)(client, **options)
        )


class PrivateStack:
    """A stack of a module's own, for tests that kill, stop and restart its parts: a private
    Redis (AOF in its own data directory: ``restart()`` keeps the data), a private RabbitMQ
    node as the broker when asked, the API, and workers started on demand.

    ``settings`` (what every process runs with, secrets included), ``redis`` (a
    :class:`~batchvision.testing.servers.RedisServer`), ``rabbitmq`` (a
    :class:`~batchvision.testing.servers.RabbitMQServer` or ``None``), ``api`` (its
    :class:`~batchvision.cli.runner.Supervisor`), ``url``, ``client``, ``store`` (a job store on
    its Redis), ``logs`` (the folder of the process logs), ``workers`` (running ones).
    """

    def __init__(
        self,
        settings: Settings,
        redis: RedisServer,
        rabbitmq: RabbitMQServer | None,
        api: Supervisor,
        logs: Path,
        wait_worker: Callable[[Settings], None],
        wait_until: Callable[..., Any],
    ) -> None:
        self.settings = settings
        self.redis = redis
        self.rabbitmq = rabbitmq
        self.api = api
        self.logs = logs
        self.url = f"http://127.0.0.1:{settings.api_port}"
        self.client = Client(self.url)
        self.store = JobStore(connect_redis(redis.url), result_ttl_s=600, blob_ttl_s=600)
        self.workers: list[Service] = []
        self._started = 0
        self._wait_worker = wait_worker
        self._wait_until = wait_until

    def log(self, name: str) -> Path:
        """A fresh log file for a process of this run (what an earlier run wrote is gone)."""
        path = self.logs / f"{name}.log"
        path.unlink(missing_ok=True)
        return path

    def worker(self, name: str = "", failpoints: str = "", wait: bool = True, **env: str) -> Service:
        """Start a worker (``name``: its log file, default ``worker-<n>`` counting from 1;
        ``failpoints``: ``BV_FAILPOINTS``; ``env``: more variables, e.g.
        ``BATCHVISION_BROKER_URL``); with ``wait``, return once a worker answers a ping."""
        self._started += 1
        name = name or f"worker-{self._started}"
        svc = Service(
            "worker",
            cli_argv("worker", "--name", f"{name}@{free_port()}"),
            {**self.settings.to_env(include_secrets=True), "BV_FAILPOINTS": failpoints, **env},
            log_path=str(self.log(name)),
        )
        svc.start()
        self.workers.append(svc)
        if wait:
            self._wait_worker(self.settings)
        return svc

    def wait_ready(self, svc: Service, timeout: float = 120) -> None:
        """Until the worker ``svc`` logs that it is ready (it may reach the broker by another
        route than ``settings``, e.g. a proxy, so a ping would not tell)."""

        def ready() -> bool:
            text = Path(svc.log_path).read_text(errors="replace")
            assert svc.proc is not None and svc.proc.poll() is None, text[-3000:]
            return "ready." in text

        self._wait_until(ready, timeout=timeout, interval=0.2, message=f"{svc.log_path}: ready.")

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop(timeout=30)
        self.workers = []

    def close(self) -> None:
        self.stop_workers()
        self.api.stop()
        self.store.redis.close()
        self.redis.close()


class StartPrivateStack(Protocol):
    def __call__(self, logs: str, broker: str = ..., **overrides: Any) -> PrivateStack: ...


@pytest.fixture(scope="module")
def start_private_stack(
    settings: Settings,
    start_rabbitmq: Callable[[], RabbitMQServer],
    tmp_path_factory: pytest.TempPathFactory,
    artifacts: Path,
    wait_worker: Callable[[Settings], None],
    wait_until: Callable[..., Any],
) -> Iterator[StartPrivateStack]:
    """``start_private_stack(logs, broker="redis", **overrides)``: a started
    :class:`PrivateStack`, its process logs in ``tests/artifacts/<logs>/``, its settings the
    session's with ``overrides`` (and its own Redis, broker and ports: ``worker_metrics_port=0``
    since several workers share the machine); ``broker="rabbitmq"``: a private RabbitMQ node as
    the broker. Each is closed when the module ends."""
    started: list[PrivateStack] = []

    def start(logs: str, broker: str = "redis", **overrides: Any) -> PrivateStack:
        rabbitmq = start_rabbitmq() if broker == "rabbitmq" else None
        redis = RedisServer(data_dir=tmp_path_factory.mktemp(f"redis-{logs}")).start()
        s = settings.replace(
            **{
                "broker_url": rabbitmq.url if rabbitmq is not None else "",
                "worker_metrics_port": 0,
                **overrides,
                "redis_url": redis.url,
                "api_port": free_port(),
            }
        )
        api = Supervisor(
            [
                Service(
                    "api",
                    cli_argv("api", "--host", "127.0.0.1"),
                    s.to_env(include_secrets=True),
                    health_url=f"http://127.0.0.1:{s.api_port}/healthz",
                )
            ]
        )
        (artifacts / logs).mkdir(exist_ok=True)
        stack = PrivateStack(s, redis, rabbitmq, api, artifacts / logs, wait_worker, wait_until)
        started.append(stack)
        api.start()
        api.wait_healthy(60)
        return stack

    yield start
    for stack in started:
        stack.close()


class StartSleepingStack(Protocol):
    def __call__(self, logs: str, broker: str, sleep_s: float, **overrides: Any) -> PrivateStack: ...


@pytest.fixture(scope="module")
def start_sleeping_stack(start_private_stack: StartPrivateStack) -> Iterator[StartSleepingStack]:
    """``start_sleeping_stack(logs, broker, sleep_s, **overrides)``: a private stack (as
    ``start_private_stack``) serving the sleeping stand-in model of ``bench/standins.py``, whose
    batches of up to 8 images each take ``sleep_s``; the module's workers inherit the setting."""
    with pytest.MonkeyPatch.context() as mp:

        def start(logs: str, broker: str, sleep_s: float, **overrides: Any) -> PrivateStack:
            # The children import this tree and the stand-in models.
            paths = [str(ROOT / "bench"), os.environ.get("PYTHONPATH", str(ROOT))]
            mp.setenv("PYTHONPATH", os.pathsep.join(paths))
            mp.setenv("BENCH_SLEEP_S", str(sleep_s))
            settings = {"model": "py:standins:sleeping", "max_batch_size": 8, "chunk_size": 8, **overrides}
            return start_private_stack(logs, broker=broker, **settings)

        yield start


class ApiAlone(NamedTuple):
    """An API process without a worker: its URL and its private Redis' URL."""

    url: str
    redis_url: str


@contextlib.contextmanager
def _api_alone(**overrides: Any) -> Iterator[ApiAlone]:
    with RedisServer() as server:
        settings = Settings.from_env({}, redis_url=server.url, api_port=free_port(), **overrides)
        api = Service(
            "api",
            cli_argv("api", "--host", "127.0.0.1"),
            settings.to_env(include_secrets=True),
            health_url=f"http://127.0.0.1:{settings.api_port}/healthz",
        )
        sup = Supervisor([api])
        sup.start()
        try:
            sup.wait_healthy(timeout=120)
            yield ApiAlone(f"http://127.0.0.1:{settings.api_port}", server.url)
        finally:
            sup.stop()


@pytest.fixture(scope="session")
def api_alone() -> Callable[..., contextlib.AbstractContextManager[ApiAlone]]:
    """``with api_alone(**overrides) as api:`` an API process and no worker, on a private
    redis-server, its settings the defaults with ``overrides``: ``api.url``, ``api.redis_url``.
    Usable from fixtures of any scope."""
    return _api_alone
