"""One ``Settings`` object, read from ``BATCHVISION_*`` environment variables (pydantic-settings).

Every field is documented here; the configuration reference of the docs site is generated from
these fields (docs/reference/configuration.md).
"""

from __future__ import annotations

import functools
import hashlib
import ipaddress
import os
import re
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Annotated, Any, Literal, Self
from urllib.parse import urlparse

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from batchvision.core.allow_list import AllowList
from batchvision.core.manifest import bucket_problem
from batchvision.core.s3_scope import S3Scope

PREFIX = "BATCHVISION_"


def _field(default: Any, doc: str) -> Any:
    return Field(default, description=doc)


#: The longest time a duration setting may name: ten years (Redis refuses an expiry far past it).
MAX_TTL_S = 10 * 365 * 86400


class Settings(BaseSettings):
    """Service configuration. Build it with :meth:`from_env`; tests pass overrides.

    Every value is validated when the settings are built (types, ranges, choices), and a bad one
    stops the process with a :class:`SettingsError` that names the variable, its value and what
    is allowed. Secrets are :class:`~pydantic.SecretStr`: ``repr`` and logs show ``**********``.
    """

    # No float setting means anything at infinity or NaN (a ratio guard of `inf` is no guard).
    model_config = SettingsConfigDict(
        env_prefix=PREFIX,
        frozen=True,
        extra="forbid",
        env_ignore_empty=True,
        validate_default=True,
        allow_inf_nan=False,
    )

    redis_url: str = _field(
        "redis://127.0.0.1:6379/0",
        "Redis for broker, job store and blobs. `batchvision up` and the tests start "
        "their own `redis-server` when this is unset.",
    )
    blob_url: str = _field(
        "redis",
        "Where uploads wait for a worker: `redis` (keys with a TTL), `file:///shared/dir`, or "
        "`s3://bucket/prefix/` (objects in a bucket: API and workers share no volume, Redis holds "
        "only metadata; give the bucket a lifecycle rule that expires the prefix).",
    )
    # -- object storage (s3:// URLs: inputs, outputs, blobs, the model repository) ----------
    s3_endpoint_url: str = _field(
        "",
        "Endpoint of an S3-compatible store (MinIO, Ceph, R2, GCS interoperability), e.g. "
        "`http://minio:9000`; empty: the SDK's own `AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL`, "
        "else AWS. Credentials are read the SDK's way (environment, `~/.aws`, pod or instance roles).",
    )
    s3_region: str = _field("", "Region of the buckets; empty: the SDK's (`AWS_REGION`, `~/.aws/config`).")
    s3_addressing_style: Literal["auto", "path", "virtual"] = _field(
        "auto",
        "How bucket names go into requests: `auto` (path style when an endpoint URL is set, "
        "virtual hosts on AWS), `path` or `virtual`.",
    )
    s3_allow: str = _field(
        "",
        "The `s3://` locations a job may name as its source, manifest, image URLs or output "
        "prefix, comma-separated: `s3://bucket`, `s3://bucket/prefix/` or `*` (any bucket the "
        "service's role can reach: single-tenant deployments). Empty: jobs may name no bucket "
        "(`403 s3_not_allowed`). The blob store of `BLOB_URL` and the model repository of "
        "`MODELS_DIR` are refused even under `*`.",
    )
    s3_max_attempts: Annotated[int, Field(ge=1, le=50)] = _field(
        8,
        "Calls per S3 request before giving up: throttling (`SlowDown`, 503), 5xx answers and "
        "connection errors are retried with exponential backoff and jitter.",
    )
    max_objects_per_job: Annotated[int, Field(ge=1, le=100_000_000)] = _field(
        1_000_000,
        "Most images a job made from an `s3://` prefix may have (`too_many_objects` past it).",
    )
    list_page_size: Annotated[int, Field(ge=1, le=100_000)] = _field(
        1000,
        "Images of an `s3://` prefix job listed, stored and queued together: the request lists the "
        "first page, workers the rest, a page at a time (at most `MAX_QUEUED_IMAGES_PER_KEY`).",
    )
    list_ahead: Annotated[int, Field(ge=1, le=100_000_000)] = _field(
        10_000,
        "Images of an `s3://` prefix job queued and not yet classified before its listing waits "
        "for the workers: what one job holds in Redis and the queue stays bounded, whatever the "
        "size of the prefix.",
    )
    # A part is read whole into the worker's memory and leaves Redis in one script, which blocks
    # Redis while it runs (two arguments a row): the bound keeps both small.
    output_part_rows: Annotated[int, Field(ge=0, le=100_000)] = _field(
        10_000,
        "A job made from an `s3://` prefix with an `output_url` writes its results in parts of "
        "this many rows while it runs (`<format>/part-NNNNN.<ext>` under the output prefix) when it "
        "has more, and each part's results then leave Redis; 0: one file per format at the end. "
        "At most 100,000.",
    )
    output_formats: str = _field(
        "csv,jsonl,parquet",
        "Files a job with an `output_url` gets, comma-separated, from `csv`, `jsonl`, `parquet` "
        "(Parquet needs pyarrow, installed in the worker image).",
    )
    models_cache_dir: str = _field(
        "",
        "Local folder a worker copies an `s3://` model repository into (each object checked "
        "against its listed size and ETag, a version renamed into place once whole); empty: a "
        "folder under the system's temporary directory.",
    )
    queue: Annotated[str, Field(pattern=r"^[A-Za-z0-9._:-]{1,200}$")] = _field(
        "batchvision", "Celery queue the API publishes to and workers consume."
    )
    model: Annotated[str, Field(min_length=1)] = _field(
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
    preprocess: Literal["auto", "none", "tf", "caffe", "torch", "unit"] = _field(
        "auto",
        "Input scaling: `auto` (from the model family), `none` (0..255 floats), `tf` (-1..1), "
        "`caffe`, `torch`, `unit` (0..1).",
    )
    top_k: Annotated[int, Field(ge=1, le=1000)] = _field(5, "How many classes each result lists in `top_k`.")
    # -- several models, versions, live reload --------------------------------------
    models_dir: str = _field(
        "",
        "Model repository: `<dir>/<name>/<version>/` with a `.keras`/`.h5` file or a SavedModel, "
        "`labels.txt` and an optional `config.json` (see docs/guides/models.md); a folder, or "
        "`s3://bucket/prefix/` in the same layout, copied to `BATCHVISION_MODELS_CACHE_DIR` and "
        "checked before use. `BATCHVISION_MODEL` names the default model; empty: "
        "`BATCHVISION_MODEL` is the only model.",
    )
    worker_models: str = _field(
        "",
        "Models a worker serves, comma-separated (`batchvision worker --models` sets it); empty: "
        "every model of the repository.",
    )
    model_poll_s: Annotated[float, Field(ge=0, le=3600)] = _field(
        5.0,
        "How often a worker looks for new versions in `MODELS_DIR` (0: only when "
        "`POST /v1/models/<name>/reload` asks).",
    )
    admin_keys: SecretStr = _field(
        "",
        "Comma-separated admin keys (or SHA-256 hex digests) for `POST /v1/models/<name>/reload`; "
        "empty: reloads come from new version folders only. Admin keys are API keys too.",
    )
    max_batch_size: Annotated[int, Field(ge=1, le=4096)] = _field(
        32, "Largest batch one model call takes, across jobs."
    )
    max_batch_delay_ms: Annotated[float, Field(ge=0, le=10_000)] = _field(
        10.0, "Longest a batch waits to fill when more images are on their way."
    )
    adaptive_batch_wait_ms: Annotated[float, Field(ge=0, le=10_000)] = _field(
        50.0,
        "Longest a batch waits for images nobody announced yet (closed-loop clients), while the "
        "arrival rate says they are about to come; at most half the model's time for the batch. "
        "0: never.",
    )
    chunk_size: Annotated[int, Field(ge=1, le=10_000)] = _field(
        16, "Images per Celery task; a job is split into such chunks."
    )
    interactive_max_images: Annotated[int, Field(ge=0, le=10_000)] = _field(
        8,
        "Jobs of at most this many images, sent whole (`POST /v1/classify`, `/v2` infer, or a "
        "sealed upload), go to the interactive queue `<QUEUE>.interactive`, which workers serve "
        "ahead of bulk work; larger ones wait in their priority's bulk queue, also when their "
        "client waits for them.",
    )
    worker_threads: Annotated[int, Field(ge=1, le=1024)] = _field(
        32,
        "Task threads per worker process: how many messages a worker holds at once. Waiting "
        "threads cost nothing; `MAX_INFLIGHT_IMAGES` and `DECODE_THREADS` bound the work.",
    )
    max_inflight_images: Annotated[int, Field(ge=0, le=1_000_000)] = _field(
        0,
        "Images a worker decodes or holds for the model at once, interactive chunks first "
        "(0: four batches, `4 * MAX_BATCH_SIZE`). Bounds memory and keeps bulk chunks queued. "
        "An image URL holds no place while it is fetched; fetched, it waits at most 50 ms for one, "
        "then goes over the limit.",
    )
    decode_threads: Annotated[int, Field(ge=0, le=256)] = _field(
        0,
        "Images decoded at the same time in a worker (0: the CPUs the process may use: its "
        "affinity, at most its container's CPU limit).",
    )
    enqueue_linger_ms: Annotated[float, Field(ge=0, le=1000)] = _field(
        5.0,
        "Under load, how long the API collects small jobs from concurrent requests into one "
        "Celery message (an idle service sends at once; 0: one message per request).",
    )
    intra_op_threads: Annotated[int, Field(ge=0, le=1024)] = _field(
        0,
        "TensorFlow (and ONNX Runtime) intra-op threads (0: the container's CPU limit where one "
        "is set, else their default; not used by `jax`).",
    )
    inter_op_threads: Annotated[int, Field(ge=0, le=1024)] = _field(
        0,
        "TensorFlow inter-op threads (0: the container's CPU limit where one is set, else "
        "TensorFlow's default; not used by `jax`).",
    )
    # -- the model runtime: Keras backend, precision, compilation, GPU --------------------
    keras_backend: Literal["tensorflow", "jax"] = _field(
        "tensorflow",
        "The Keras 3 backend a worker runs Keras models on: `tensorflow`, or `jax` (the `jax` "
        "install extra; TensorFlow is then not imported for inference, though a SavedModel "
        "directory still needs `tensorflow`). Chosen once per worker process, before Keras is imported.",
    )
    precision: Literal["float32", "mixed_float16", "mixed_bfloat16"] = _field(
        "float32",
        "Keras models compute in `float32`, or in float16 / bfloat16 with float32 weights "
        "(`mixed_float16` for GPUs with tensor cores, `mixed_bfloat16` for recent GPUs and CPUs); "
        "the last layer stays `float32`. Scores then differ from `float32` by about 0.003 (float16) "
        "to 0.04 (bfloat16) on the demo models; the labels stayed the same.",
    )
    xla: bool = _field(
        False,
        "Compile each Keras model with XLA on the `tensorflow` backend (`jit_compile`): one compile "
        "per padded batch size at warm-up. The `jax` backend always compiles with XLA.",
    )
    gpu: Annotated[str, Field(pattern=r"^(|[0-9]{1,3}|(GPU|MIG)-[0-9A-Za-z/-]{1,120})$")] = _field(
        "",
        "The GPU a worker runs on, an index or a `GPU-<uuid>` as `CUDA_VISIBLE_DEVICES` takes it "
        "(`batchvision worker --gpu N` sets it): the worker stops at start when that GPU is not "
        "visible or its models would run on the CPU. Empty: whatever the process sees.",
    )
    task_time_limit_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] = _field(
        600,
        "Longest one chunk may take: bounds the wait on the model (Celery's threads pool enforces "
        "no hard limit) and must stay below the visibility timeout.",
    )
    visibility_timeout_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] = _field(
        3600,
        "Redis visibility timeout: an unacknowledged task is redelivered after this; "
        "must exceed `TASK_TIME_LIMIT_S`.",
    )
    worker_heartbeat_s: Annotated[float, Field(ge=0.5, le=300)] = _field(
        10.0,
        "How often a worker renews its liveness key in Redis. On the Redis broker, the chunks a "
        "worker was running when it died (`kill -9`, out of memory) are sent again about four and "
        "a half beats later (47 s by default), instead of after `VISIBILITY_TIMEOUT_S`. Short "
        "beats recover sooner; a worker whose beats stall longer than a lapse (three beats: a "
        "frozen host, a long cut from Redis) has its chunks sent a second time.",
    )
    max_attempts: Annotated[int, Field(ge=1, le=100)] = _field(
        3, "Deliveries of one image before it is recorded as a per-image error (poison image)."
    )
    result_ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] = _field(
        86400, "How long a finished job and its results are kept."
    )
    blob_ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] = _field(
        172800,
        "How long an upload waits for classification before it expires (in Redis); also how long "
        "the blob of an image that failed for a retryable reason is kept for a retry (in a file "
        "or S3 blob store: from its error on).",
    )
    max_image_bytes: Annotated[int, Field(ge=1)] = _field(
        25 * 1024 * 1024, "Largest accepted image file, in bytes."
    )
    max_image_pixels: Annotated[int, Field(ge=1)] = _field(
        50_000_000, "Largest accepted image, width x height (checked from the header)."
    )
    max_request_bytes: Annotated[int, Field(ge=1)] = _field(
        512 * 1024 * 1024, "Largest HTTP request body (Flask `MAX_CONTENT_LENGTH`)."
    )
    max_files_per_request: Annotated[int, Field(ge=1)] = _field(1000, "Most files in one upload request.")
    max_archive_members: Annotated[int, Field(ge=1)] = _field(
        20000, "Most members in an uploaded zip archive."
    )
    max_archive_bytes: Annotated[int, Field(ge=1)] = _field(
        512 * 1024 * 1024, "Most uncompressed bytes in an uploaded zip (read in memory, never to disk)."
    )
    archive_memory_bytes: Annotated[int, Field(ge=0)] = _field(
        0,
        "Most bytes of zip members one API process holds expanded at once (over all its "
        "requests; at least MAX_ARCHIVE_BYTES; 0: MAX_ARCHIVE_BYTES, one largest zip at a time): "
        "a zip that would go over waits up to 10 s, then gets 503 `archives_busy` with Retry-After.",
    )
    max_compression_ratio: Annotated[float, Field(gt=1)] = _field(
        200.0, "Highest compression ratio of a zip member (zip-bomb guard)."
    )
    sync_timeout_s: Annotated[float, Field(ge=0, le=3600)] = _field(
        30.0,
        "Longest `POST /v1/classify` (`?timeout=`), a long poll (`GET /v1/jobs/{id}?wait=`) or a "
        "`/v2` inference may wait for its answer.",
    )
    api_port: Annotated[int, Field(ge=0, le=65535)] = _field(
        8000, "Port of the API (gunicorn) for `batchvision api` and `up`."
    )
    api_workers: Annotated[int, Field(ge=1, le=256)] = _field(2, "gunicorn worker processes of the API.")
    api_access_log: bool = _field(
        True,
        "One log line per request (gunicorn's access log, in `LOG_FORMAT`); false where a proxy "
        "or ingress logs the requests already (the line is then not even formatted).",
    )
    api_body_timeout_s: Annotated[float, Field(gt=0, le=3600)] = _field(
        60.0,
        "Longest the API waits for the next bytes of a request's body, like nginx's "
        "`client_body_timeout`: a stalled upload gets `408 body_timeout` and its connection is "
        "closed; a slow but steady one is not cut.",
    )
    worker_metrics_port: Annotated[int, Field(ge=0, le=65535)] = _field(
        9808, "Port of a worker's Prometheus `/metrics`."
    )
    flower_port: Annotated[int, Field(ge=0, le=65535)] = _field(5555, "Port of Flower.")
    flower_user: str = _field("", "Flower basic-auth user.")
    flower_password: SecretStr = _field("", "Flower basic-auth password.")
    api_keys: SecretStr = _field(
        "",
        "Comma-separated API keys (or their SHA-256 hex digests). Empty: no key is asked for, "
        "and so `batchvision api` serves only on loopback unless `BATCHVISION_ALLOW_ANONYMOUS=true`.",
    )
    max_queued_images: Annotated[int, Field(ge=0)] = _field(
        0, "Images waiting above which new jobs get `429` (0: no limit)."
    )
    max_queued_bytes: Annotated[int, Field(ge=0, le=1 << 50)] = _field(
        0,
        "Bytes of uploads waiting for a worker above which new uploads get `429` with "
        "`Retry-After` (0: `QUEUED_BYTES_SHARE` of Redis `maxmemory` when Redis has one, else no "
        "limit), so Redis never fills up and refuses writes.",
    )
    queued_bytes_share: Annotated[float, Field(gt=0, le=0.9)] = _field(
        0.5, "The share of Redis `maxmemory` waiting uploads may use when `MAX_QUEUED_BYTES` is 0."
    )
    max_queued_images_per_key: Annotated[int, Field(ge=0, le=100_000_000)] = _field(
        0, "Images one API key may have waiting; more get `429` (0: no limit)."
    )
    max_queued_bytes_per_key: Annotated[int, Field(ge=0, le=1 << 50)] = _field(
        0, "Bytes of uploads one API key may have waiting; more get `429` (0: no limit)."
    )
    # -- per-job priorities (batchvision.core.priorities) ------------------------------
    max_priority: Annotated[int, Field(ge=0, le=9)] = _field(
        9,
        "Highest `priority` (0 to 9) a job may ask for, for API keys not listed in "
        "`KEY_MAX_PRIORITY`; above it: `422 priority_not_allowed`. A job that names no priority "
        "gets 5, or this maximum if it is lower. On a shared service set it to 5 (callers may "
        "only lower their own work) and raise it for some keys.",
    )
    key_max_priority: SecretStr = _field(
        "",
        "Per-key maximum priority, comma-separated `KEY=MAX` (the key, or its SHA-256 hex digest "
        "as in `API_KEYS`); it overrides `MAX_PRIORITY` for that key.",
    )
    priority_ratio: Annotated[int, Field(ge=1, le=100)] = _field(
        3,
        "Where bulk work of several priority tiers waits (low 0-3, normal 4-6, high 7-9), each "
        "tier gets this many times the turns of the tier below (3: of every 13 chunks, 9 high, "
        "3 normal, 1 low), so lower priorities slow down but never stop; 1: equal turns.",
    )
    rate_limit_per_minute: Annotated[int, Field(ge=0)] = _field(
        0, "Requests per minute per API key, shared by all API replicas through Redis (0: off)."
    )
    idempotency_ttl_s: Annotated[int, Field(ge=1, le=MAX_TTL_S)] = _field(
        86400, "How long an `Idempotency-Key` maps to its job."
    )
    # -- observability (logs, traces) -------------------------------------------------------
    log_format: Literal["text", "json"] = _field(
        "text",
        "Log lines of API, worker and `batchvision up`: `text` (readable) or `json` (one JSON "
        "object per line, with `job_id`, `task_id`, batch size and timings where they apply).",
    )
    otlp_endpoint: str = _field(
        "",
        "OpenTelemetry collector (OTLP over HTTP, e.g. `http://otel-collector:4318`) that API and "
        "workers send traces to; empty: no tracing unless `OTEL_EXPORTER_OTLP_ENDPOINT` is set. "
        "Needs the `otel` extra.",
    )
    trace_file: str = _field(
        "",
        "Also append every finished span to this file as a JSON line (tests, debugging; needs the "
        "`otel` extra); empty: off.",
    )
    allow_anonymous: bool = _field(
        False,
        "Let the API serve without API keys on a non-loopback address (anyone who can reach it "
        "can submit and read jobs). Without keys and without this, `batchvision api` refuses to "
        "listen beyond loopback.",
    )
    # -- images by URL and completion webhooks -----------------------------------
    fetch_allow: str = _field(
        "",
        "Hosts and networks that image URLs may reach although the address rules "
        "refuse them (loopback, private, link-local, multicast, reserved): comma-separated CIDRs "
        "or addresses (`10.1.0.0/16`, `127.0.0.1`) and host names (`images.internal`, "
        "`*.corp.example`). Cloud metadata addresses stay refused. Empty: public addresses only.",
    )
    max_urls_per_job: Annotated[int, Field(ge=1, le=1_000_000)] = _field(
        10000, "Most URLs in one job (a JSON body or an uploaded CSV / JSON Lines manifest)."
    )
    fetch_timeout_s: Annotated[float, Field(gt=0, le=3600)] = _field(
        30.0,
        "Longest the fetch of one image URL may take in all: name resolution, connections, "
        "redirects and the body (`fetch_timeout`).",
    )
    fetch_connect_timeout_s: Annotated[float, Field(gt=0, le=600)] = _field(
        5.0, "Longest one connection to an image or callback host may take to open."
    )
    fetch_max_redirects: Annotated[int, Field(ge=0, le=20)] = _field(
        5, "Redirects followed per image URL, each checked like the first URL (`too_many_redirects`)."
    )
    fetch_threads: Annotated[int, Field(ge=1, le=1024)] = _field(
        16, "Image URLs a worker process fetches at the same time (connections are kept per host)."
    )
    webhook_secret: SecretStr = _field(
        "",
        "Server secret from which each API key's webhook signing secret is derived "
        "(`GET /v1/webhook-secret`); empty: a random one is made once and kept in Redis.",
    )
    webhook_timeout_s: Annotated[float, Field(gt=0, le=300)] = _field(
        10.0, "Longest one webhook delivery may take (connect, send, answer)."
    )
    webhook_retry_for_s: Annotated[int, Field(ge=0, le=30 * 86400)] = _field(
        3600,
        "How long a webhook is retried (exponential backoff with jitter, on connection errors, "
        "timeouts, `429` and `5xx`) after its job finished; capped by `RESULT_TTL_S`.",
    )

    # -- decoding budgets, per-key fairness of fetches and webhooks, exposure ----------------
    max_image_frames: Annotated[int, Field(ge=1, le=1_000_000)] = _field(
        1000,
        "Most frames of an animated image (GIF, WebP, APNG; counted from the header, only the "
        "first frame is classified); more: `too_many_frames`.",
    )
    max_request_pixels: Annotated[int, Field(ge=1)] = _field(
        20_000_000_000,
        "Most pixels (width x height, from the headers) the accepted images of one upload "
        "request may add up to; files past it get their own `pixel_budget` error.",
    )
    max_archive_pixels: Annotated[int, Field(ge=1)] = _field(
        20_000_000_000,
        "Most pixels (from the headers) the image members of one zip archive may add up to; "
        "more refuses the archive (`413 archive_too_large`) before any member is checked.",
    )
    fetch_per_key: Annotated[int, Field(ge=1, le=1024)] = _field(
        4,
        "Image URLs of one API key that a worker process fetches at the same time, and messages "
        "with URLs of one key it runs at once (more wait parked, holding no task thread); the "
        "key's other URLs wait, so slow servers of one key never hold every fetch thread or "
        "task thread (without API keys there is one tenant and no limit).",
    )
    webhook_per_key: Annotated[int, Field(ge=1, le=1024)] = _field(
        2,
        "Webhook deliveries of one API key that a worker process makes at the same time (of its "
        "4 slots); callbacks that hang hold no more than this (without API keys: no limit).",
    )
    webhook_allow: str = _field(
        "",
        "Hosts and networks that callback URLs (webhook POSTs) may reach although the address "
        "rules refuse them; the same syntax as `FETCH_ALLOW`, which covers image URLs only. "
        "Cloud metadata addresses stay refused. Empty: public addresses only.",
    )
    allowed_hosts: str = _field(
        "",
        "Host header names the API answers (comma-separated, `name` or `name:port`; `*.example.com` "
        "for subdomains); any other gets `400 bad_host` (against DNS rebinding). Empty: any. "
        "`batchvision up` sets loopback names (`localhost`, `127.0.0.1`, `[::1]`).",
    )
    forwarded_allow_ips: str = _field(
        "127.0.0.1,::1",
        "Reverse proxies (an Ingress controller, a load balancer) whose `X-Forwarded-Proto` the API "
        "believes when it writes its own links (`status_url`, `results_url`, `Location`, webhook "
        "bodies): comma-separated addresses or networks (`10.0.0.0/8`), or `*` for any peer, only "
        "where nothing but the proxy can reach the API (the Kubernetes manifests' NetworkPolicy). "
        "Others' header is ignored. Behind a TLS proxy not listed here, links say `http://`.",
    )
    worker_metrics_host: str = _field(
        "0.0.0.0",
        "Address a worker's Prometheus `/metrics` listens on (`batchvision up`: `127.0.0.1`).",
    )

    # -- broker ------------------------------------------------------------------
    broker_url: str = _field(
        "",
        "Celery broker: empty for the Redis of `REDIS_URL`, or `amqp://user:password@host:5672/vhost` "
        'for RabbitMQ (quorum queues; see "Choosing a broker"). Redis stays the job store and '
        "blob store either way. `batchvision up --broker rabbitmq` starts its own "
        "`rabbitmq-server` when this is unset.",
    )

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        if urlparse(value).scheme not in ("redis", "rediss", "unix"):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return value

    @field_validator("broker_url")
    @classmethod
    def _broker_url(cls, value: str) -> str:
        if value == "":
            return value
        parsed = urlparse(value)
        if parsed.scheme not in ("redis", "rediss", "unix", "amqp", "amqps"):
            raise ValueError("must be empty (the Redis URL), or a redis:// or amqp:// (amqps://) URL")
        if parsed.scheme.startswith("amqp") and not parsed.hostname:
            raise ValueError("an amqp:// URL must name its host: amqp://user:password@host:5672/vhost")
        return value

    @field_validator("blob_url")
    @classmethod
    def _blob_url(cls, value: str) -> str:
        if value in ("", "redis"):
            return value
        if value.startswith("s3://") and len(value) > len("s3://"):
            problem = bucket_problem(value.removeprefix("s3://").partition("/")[0])
            if problem is not None:
                raise ValueError(f"{problem}; must be an s3://bucket/prefix/ URL")
            return value
        if not (value.startswith("file://") and len(value) > len("file://")):
            raise ValueError("must be `redis`, a file:///directory URL or an s3://bucket/prefix/ URL")
        return value

    @field_validator("s3_endpoint_url", "otlp_endpoint")
    @classmethod
    def _http_endpoint(cls, value: str) -> str:
        if value == "":
            return value
        parsed = urlparse(value)
        if parsed.scheme not in ("http", "https") or not parsed.hostname:
            raise ValueError("must be empty or an http:// or https:// URL naming a host")
        return value

    @field_validator("fetch_allow", "webhook_allow")
    @classmethod
    def _allow_list(cls, value: str) -> str:
        AllowList.parse(value)  # raises ValueError naming the bad entry and the forms allowed
        return value

    @field_validator("forwarded_allow_ips")
    @classmethod
    def _forwarded_allow_ips(cls, value: str) -> str:
        entries = [e.strip() for e in value.split(",") if e.strip()]
        if entries == ["*"]:
            return "*"
        for entry in entries:
            try:
                ipaddress.ip_network(entry)  # strict, as gunicorn reads it: 10.0.0.5/8 is refused
            except ValueError as exc:
                raise ValueError(
                    f"{entry!r} is not an IP address or network ({exc}); must be addresses and "
                    "networks (`10.0.0.5,10.1.0.0/16`), `*` alone, or empty (no proxy)"
                ) from None
        return ",".join(entries)

    @field_validator("s3_allow")
    @classmethod
    def _s3_allow(cls, value: str) -> str:
        S3Scope.parse(value)  # raises ValueError naming the bad entry
        return value

    def s3_scope(self) -> S3Scope:
        """Where jobs may read and write (``S3_ALLOW``), less the service's own prefixes."""
        return _s3_scope(self.s3_allow, self.blob_url, self.models_dir)

    def listing_page(self) -> int:
        """Images of an ``s3://`` prefix listed and queued together: ``LIST_PAGE_SIZE``, or an
        API key's whole quota of waiting images when that is smaller (a larger page would be
        refused for good, ``413``, whatever waits)."""
        quota = self.max_queued_images_per_key
        return min(self.list_page_size, quota) if quota else self.list_page_size

    @field_validator("queue")
    @classmethod
    def _queue(cls, value: str) -> str:
        # The suffixes name a model's interactive queue and its priority tiers.
        if value.endswith((".interactive", ".high", ".low")):
            raise ValueError("must not end with .interactive, .high or .low (the names of its lanes)")
        return value

    @field_validator("key_max_priority")
    @classmethod
    def _key_max_priority(cls, value: SecretStr) -> SecretStr:
        key_max_priorities(value.get_secret_value())  # raises ValueError saying what is wrong
        return value

    def max_priority_of(self, owner: str) -> int:
        """The highest priority the API key ``owner`` (:func:`owner_of`) may ask for."""
        return _key_limits(self.key_max_priority.get_secret_value()).get(owner, self.max_priority)

    @field_validator("output_formats")
    @classmethod
    def _output_formats(cls, value: str) -> str:
        names = [v.strip() for v in value.split(",") if v.strip()]
        unknown = sorted(set(names) - {"csv", "jsonl", "parquet"})
        if not names or unknown:
            raise ValueError(f"must list some of csv, jsonl, parquet (not {unknown or 'nothing'})")
        return ",".join(dict.fromkeys(names))

    @model_validator(mode="after")
    def _quotas(self) -> Self:
        # A key's share of the queue above the whole queue would never bind: a typo, not a choice.
        pairs = (
            ("max_queued_images_per_key", "max_queued_images"),
            ("max_queued_bytes_per_key", "max_queued_bytes"),
        )
        for per_key, whole in pairs:
            mine, total = getattr(self, per_key), getattr(self, whole)
            if mine and total and mine > total:
                raise ValueError(
                    f"{PREFIX}{per_key.upper()} ({mine}) is above {PREFIX}{whole.upper()} ({total}): "
                    "a key's quota must be at most the whole queue's"
                )
        if 0 < self.archive_memory_bytes < self.max_archive_bytes:  # the largest zip could never expand
            raise ValueError(
                f"{PREFIX}ARCHIVE_MEMORY_BYTES ({self.archive_memory_bytes}) is below "
                f"{PREFIX}MAX_ARCHIVE_BYTES ({self.max_archive_bytes}): it must be at least that"
            )
        return self

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        # The Redis and broker URLs may carry a password: show them masked, like the secret fields.
        for name, value in super().__repr_args__():
            yield name, (mask_url(value) if name in ("redis_url", "broker_url") else value)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # ``Settings()`` is the defaults (plus keyword arguments); the environment is read only
        # by :meth:`from_env`, explicitly, so a library caller never picks up stray variables.
        return (init_settings,)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read every field from ``BATCHVISION_<FIELD>`` (of ``environ``, default the process
        environment); ``overrides`` win. Raises :class:`SettingsError` naming each bad variable."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for name in cls.model_fields:
            raw = env.get(PREFIX + name.upper())
            if raw is not None and raw != "":
                values[name] = raw
        try:
            # model_validate, not the constructor: only ``environ`` and the overrides count.
            return cls.model_validate({**values, **overrides})
        except ValidationError as exc:
            raise SettingsError.from_validation(exc, values) from None

    def replace(self, **changes: Any) -> Settings:
        """A copy with some fields changed (validated like the original)."""
        try:
            return type(self).model_validate({**self.model_dump(), **changes})
        except ValidationError as exc:
            raise SettingsError.from_validation(exc, changes) from None

    def to_env(self, *, include_secrets: bool = False) -> dict[str, str]:
        """The environment that reproduces these settings in a child process. Secrets are left
        out unless ``include_secrets`` (then the child's environment holds them: never log it)."""
        out = {}
        for name in type(self).model_fields:
            value = getattr(self, name)
            if isinstance(value, SecretStr):
                if not include_secrets:
                    continue
                value = value.get_secret_value()
            out[PREFIX + name.upper()] = str(value).lower() if isinstance(value, bool) else str(value)
        return out


_HEX64 = re.compile(r"[0-9a-f]{64}")
#: Hex digits of a key's SHA-256 digest that name its owner (jobs, quotas, limits).
OWNER_CHARS = 16


def key_digest(entry: str) -> str:
    """The SHA-256 hex digest of a configured key (an entry of 64 hex digits is one already)."""
    return entry if _HEX64.fullmatch(entry) else hashlib.sha256(entry.encode()).hexdigest()


def owner_of(digest: str) -> str:
    """The owner id of an API key with SHA-256 hex ``digest``: what its jobs are stored under."""
    return digest[:OWNER_CHARS]


def key_max_priorities(raw: str) -> dict[str, int]:
    """``KEY=MAX,...`` (``BATCHVISION_KEY_MAX_PRIORITY``) as ``{owner id: max}``; ``ValueError``
    naming the entry when one is not ``KEY=MAX`` with ``MAX`` 0 to 9. (The message never
    shows a key.)"""
    out = {}
    for n, item in enumerate((i.strip() for i in raw.split(",")), start=1):
        if not item:
            continue
        key, sep, value = item.rpartition("=")
        if not sep or not key.strip() or not value.strip().isdigit() or not 0 <= int(value) <= 9:
            raise ValueError(f"entry {n} must be KEY=MAX with MAX from 0 to 9")
        out[owner_of(key_digest(key.strip()))] = int(value)
    return out


@functools.lru_cache(maxsize=8)
def _key_limits(raw: str) -> Mapping[str, int]:
    """:func:`key_max_priorities` of ``raw``, read-only and parsed once per value: the API asks
    on every request that makes a job, and each entry costs a SHA-256. (Keyed by the value, not
    held on the frozen :class:`Settings`, so a copy with another value cannot see a stale one.)"""
    return MappingProxyType(key_max_priorities(raw))


@functools.lru_cache(maxsize=8)
def _s3_scope(allow: str, blob_url: str, models_dir: str) -> S3Scope:
    """:meth:`Settings.s3_scope`, parsed once per value (asked on every job that names a bucket)."""
    return S3Scope.parse(
        allow, {blob_url: "the blob store of BLOB_URL", models_dir: "the model repository of MODELS_DIR"}
    )


class SettingsError(ValueError):
    """Bad configuration: names every offending variable, its value and what is allowed."""

    @classmethod
    def from_validation(cls, exc: ValidationError, given: Mapping[str, Any]) -> SettingsError:
        problems = []
        for err in exc.errors(include_url=False):
            if not err["loc"]:  # a rule across fields: its message names them
                problems.append(err["msg"].removeprefix("Value error, "))
                continue
            name = str(err["loc"][0])
            variable = PREFIX + name.upper()
            if err["type"] == "extra_forbidden":
                problems.append(f"{variable}: unknown setting")
                continue
            value = given.get(name, err.get("input"))
            # A URL may carry a password (the Redis, broker or S3 endpoint URL): masked.
            shown = "(secret)" if name in SECRETS else repr(masked(value))
            problems.append(f"{variable}={shown}: {err['msg'].removeprefix('Value error, ')}")
        return cls("invalid configuration: " + "; ".join(problems))


#: Fields whose values are never shown.
SECRETS = ("api_keys", "flower_password", "webhook_secret", "admin_keys", "key_max_priority")


def mask_url(url: Any) -> Any:
    """``url`` with its password (if any) masked, for messages and logs."""
    parsed = urlparse(str(url))
    if not parsed.password:
        return url
    return parsed._replace(netloc=parsed.netloc.replace(f":{parsed.password}@", ":**********@")).geturl()


def masked(value: Any) -> Any:
    """``value`` with a URL's password masked (other values unchanged)."""
    if not isinstance(value, str):
        return value
    try:
        return mask_url(value)
    except ValueError:  # not parseable as a URL (an unclosed IPv6 bracket...): nothing to mask
        return value


def unknown_variables(environ: Mapping[str, str]) -> list[str]:
    """``BATCHVISION_*`` variables that are no setting (a typo is otherwise silently ignored);
    the client's own variables are known."""
    known = {PREFIX + name.upper() for name in Settings.model_fields} | CLIENT_VARIABLES
    return sorted(k for k in environ if k.startswith(PREFIX) and k not in known)


#: Variables the client and CLI read (not service settings).
CLIENT_VARIABLES = frozenset({PREFIX + "API_URL", PREFIX + "API_KEY"})


def env_table() -> list[tuple[str, str, str]]:
    """(variable, default, description) for each setting: the configuration reference's table."""
    out = []
    for name, info in Settings.model_fields.items():
        default = info.default
        shown = default.get_secret_value() if isinstance(default, SecretStr) else default
        out.append((PREFIX + name.upper(), str(shown), str(info.description)))
    return out
