"""One ``Settings`` object, read from ``BATCHVISION_*`` environment variables.

Every field is documented here and in the README table (a test keeps the two equal).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from typing import Any

PREFIX = "BATCHVISION_"


def _field(default: Any, doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"doc": doc})


@dataclasses.dataclass(frozen=True)
class Settings:
    """Service configuration. Build it with :meth:`from_env`; tests pass overrides."""

    redis_url: str = _field(
        "redis://127.0.0.1:6379/0",
        "Redis for broker, job store and blobs. `batchvision up` and the tests start "
        "their own `redis-server` when this is unset.",
    )
    blob_url: str = _field(
        "redis",
        "Where uploads wait for a worker: `redis` (keys with a TTL) or `file:///shared/dir`.",
    )
    queue: str = _field("batchvision", "Celery queue the API publishes to and workers consume.")
    model: str = _field(
        "mobilenet_v2",
        "A `keras.applications` name (`mobilenet_v2`, `resnet50`, `efficientnet_b0`) or a path "
        "to a `.keras`/`.h5` file or SavedModel directory.",
    )
    weights: str = _field(
        "imagenet",
        "Weights for a `keras.applications` model: `imagenet`, or `none` for random weights (benchmarks).",
    )
    labels: str = _field(
        "", "Labels file (one per line) for a model path; ImageNet labels ship with the project."
    )
    preprocess: str = _field(
        "auto",
        "Input scaling: `auto` (from the model family), `none` (0..255 floats), `tf` (-1..1), "
        "`caffe`, `torch`, `unit` (0..1).",
    )
    top_k: int = _field(5, "How many classes each result lists in `top_k`.")
    max_batch_size: int = _field(32, "Largest batch one model call takes, across jobs.")
    max_batch_delay_ms: float = _field(
        10.0, "Longest a batch waits to fill when more images are on their way."
    )
    chunk_size: int = _field(16, "Images per Celery task; a job is split into such chunks.")
    interactive_max_images: int = _field(
        8,
        "Jobs of at most this many images (and every `POST /v1/classify`) go to the interactive "
        "queue `<QUEUE>.interactive`, which workers serve ahead of bulk work.",
    )
    worker_threads: int = _field(
        32,
        "Task threads per worker process: how many messages a worker holds at once. Waiting "
        "threads cost nothing; `MAX_INFLIGHT_IMAGES` and `DECODE_THREADS` bound the work.",
    )
    max_inflight_images: int = _field(
        0,
        "Images a worker decodes or holds for the model at once, interactive chunks first "
        "(0: four batches, `4 * MAX_BATCH_SIZE`). Bounds memory and keeps bulk chunks queued.",
    )
    decode_threads: int = _field(
        0, "Images decoded at the same time in a worker (0: the CPUs the process may use)."
    )
    enqueue_linger_ms: float = _field(
        5.0,
        "Under load, how long the API collects small jobs from concurrent requests into one "
        "Celery message (an idle service sends at once; 0: one message per request).",
    )
    intra_op_threads: int = _field(0, "TensorFlow intra-op threads (0: TensorFlow's default).")
    inter_op_threads: int = _field(0, "TensorFlow inter-op threads (0: TensorFlow's default).")
    task_time_limit_s: int = _field(
        600,
        "Longest one chunk may take: bounds the wait on the model (Celery's threads pool enforces "
        "no hard limit) and must stay below the visibility timeout.",
    )
    visibility_timeout_s: int = _field(
        3600,
        "Redis visibility timeout: an unacknowledged task is redelivered after this; "
        "must exceed `TASK_TIME_LIMIT_S`.",
    )
    max_attempts: int = _field(
        3, "Deliveries of one image before it is recorded as a per-image error (poison image)."
    )
    result_ttl_s: int = _field(86400, "How long a finished job and its results are kept.")
    blob_ttl_s: int = _field(172800, "How long an upload waits for classification before it expires.")
    max_image_bytes: int = _field(25 * 1024 * 1024, "Largest accepted image file, in bytes.")
    max_image_pixels: int = _field(
        50_000_000, "Largest accepted image, width x height (checked from the header)."
    )
    max_request_bytes: int = _field(
        512 * 1024 * 1024, "Largest HTTP request body (Flask `MAX_CONTENT_LENGTH`)."
    )
    max_files_per_request: int = _field(1000, "Most files in one upload request.")
    max_archive_members: int = _field(20000, "Most members in an uploaded zip archive.")
    max_archive_bytes: int = _field(
        512 * 1024 * 1024, "Most uncompressed bytes in an uploaded zip (read in memory, never to disk)."
    )
    max_compression_ratio: float = _field(
        200.0, "Highest compression ratio of a zip member (zip-bomb guard)."
    )
    sync_timeout_s: float = _field(30.0, "Longest `POST /v1/classify` may wait (`?timeout=`).")
    api_port: int = _field(8000, "Port of the API (gunicorn) for `batchvision api` and `up`.")
    api_workers: int = _field(2, "gunicorn worker processes of the API.")
    worker_metrics_port: int = _field(9808, "Port of a worker's Prometheus `/metrics`.")
    flower_port: int = _field(5555, "Port of Flower.")
    flower_user: str = _field("", "Flower basic-auth user.")
    flower_password: str = _field("", "Flower basic-auth password.")
    api_keys: str = _field("", "Comma-separated API keys (or their SHA-256 hex digests); empty: no auth.")
    max_queued_images: int = _field(0, "Images waiting above which new jobs get `429` (0: no limit).")
    rate_limit_per_minute: int = _field(
        0, "Requests per minute per API key, shared by all API replicas through Redis (0: off)."
    )
    idempotency_ttl_s: int = _field(86400, "How long an `Idempotency-Key` maps to its job.")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from ``BATCHVISION_<FIELD>``; ``overrides`` win over the env."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            raw = env.get(PREFIX + f.name.upper())
            if raw is not None and raw != "":
                values[f.name] = _coerce(f.name, raw, type(f.default))
        values.update(overrides)
        return cls(**values)

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    def to_env(self) -> dict[str, str]:
        """The environment that reproduces these settings in a child process."""
        return {PREFIX + f.name.upper(): str(getattr(self, f.name)) for f in dataclasses.fields(self)}


def _coerce(name: str, raw: str, kind: type) -> Any:
    try:
        if kind is bool:
            return raw.strip().lower() in {"1", "true", "yes", "on"}
        return kind(raw)
    except ValueError as exc:
        raise ValueError(f"{PREFIX}{name.upper()}={raw!r} is not a valid {kind.__name__}") from exc


def env_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for each setting: the README's table."""
    return [
        (PREFIX + f.name.upper(), str(f.default), f.metadata["doc"]) for f in dataclasses.fields(Settings)
    ]
