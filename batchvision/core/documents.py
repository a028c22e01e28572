"""The API's documents as typed models: what requests carry and what responses return.

One definition for the server (validation), the OpenAPI document (generated from these
models, see ``api/contract.py``) and the Python client (typed return values). Pure pydantic:
no I/O. Results rows are built as plain dicts on the hot path and described here for the
contract and the client.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from batchvision.core.model_refs import MAX_TOP_K, REF_PATTERN
from batchvision.core.priorities import DEFAULT_PRIORITY, MAX_PRIORITY, MIN_PRIORITY
from batchvision.core.results import JobStatus

#: A job id: 32 lowercase hex digits (a UUID4 without dashes).
JOB_ID_PATTERN = r"^[0-9a-f]{32}$"
JOB_ID_RE = re.compile(JOB_ID_PATTERN)
#: ``Idempotency-Key``: 1 to 255 visible ASCII characters.
IDEMPOTENCY_KEY_PATTERN = r"^[\x21-\x7e]{1,255}$"
IDEMPOTENCY_KEY_RE = re.compile(IDEMPOTENCY_KEY_PATTERN)

JobId = Annotated[str, Field(pattern=JOB_ID_PATTERN, description="32 lowercase hex digits")]


def whole_number(value: Any) -> Any:
    """A JSON number with no fraction (``192.0``) as the integer it is: JSON Schema counts it as
    an integer, so a strict model must too. ``192.5`` (and ``true``) pass unchanged, and the
    integer check then refuses them, naming the field."""
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


class Document(BaseModel):
    """Base of every response document: unknown fields are kept (forward compatible)."""

    model_config = ConfigDict(extra="allow")


class ErrorBody(BaseModel):
    """What went wrong: a stable ``code`` to branch on and a ``message`` for people."""

    code: str
    message: str
    details: Any | None = None


class ImageError(ErrorBody):
    """One image's error in the results (its code is listed under "Per-image errors" in the
    HTTP API guide)."""

    retryable: bool | None = Field(
        None, description="true: a retry of the job (POST /v1/jobs/{job_id}/retry) re-queues this image"
    )


class ErrorDocument(BaseModel):
    """Every 4xx and 5xx response: ``{"error": {"code", "message"[, "details"]}}``."""

    error: ErrorBody


# -- images by URL and completion webhooks -----------------------------------------

#: Longest image or callback URL (the same limit as batchvision.core.manifest.MAX_URL_LENGTH).
MAX_URL_LENGTH = 2048


class CallbackState(Document):
    """Where a job's completion webhook stands (``waiting`` until the job is final; a job with
    an output prefix stays ``pending``, not yet sent, while its output is written)."""

    url: str
    state: Literal["waiting", "pending", "retrying", "delivered", "failed"]
    attempts: int = Field(ge=0)
    last_status: int | None = Field(None, description="HTTP status of the last attempt")
    last_error: str | None = Field(
        None, description="why the last attempt failed (`http_503`, `fetch_timeout`...)"
    )
    last_attempt_at: float | None = Field(None, description="Unix time")
    delivered_at: float | None = Field(None, description="Unix time of the accepted delivery")


class OutputState(Document):
    """Where the writing of a job's results to its output prefix stands."""

    url: str = Field(description="the s3:// output prefix")
    state: Literal["pending", "written", "failed"] = Field(
        description="pending until the job is final and its files are written (also between "
        "retries of a throttled or unreachable store)"
    )
    files: dict[str, str] = Field(
        description="format (csv, jsonl, parquet, manifest) -> s3:// URL of the object, once written"
    )
    attempts: int = Field(ge=0)
    error: str | None = Field(None, description="`code: message` of the last failed attempt")
    written_at: float | None = Field(None, description="Unix time")
    part_rows: int | None = Field(
        None,
        description="rows per part file, for a job written in parts while it runs (a prefix job "
        "with more than `BATCHVISION_OUTPUT_PART_ROWS` images); null: one file per format",
    )
    parts: int = Field(
        0,
        ge=0,
        description="parts written while the job ran; their results left Redis (`/results` "
        "serves the rows after them)",
    )


class ListingState(Document):
    """How far the listing of a job made from an ``s3://`` prefix got (the request lists the
    first page, the workers the rest)."""

    url: str = Field(description="the s3:// prefix")
    state: Literal["listing", "done", "failed"] = Field(
        description="listing while workers list on (the job takes more images meanwhile); failed: "
        "the job was canceled, `error` says why"
    )
    images: int = Field(ge=0, description="images listed so far")
    skipped: int = Field(ge=0, description="keys listed that are not image files")
    error: str | None = Field(
        None, description="`code: message`: why the listing failed, or of the last retried attempt"
    )


class WebhookSecret(Document):
    """``GET /v1/webhook-secret``: the secret that signs this API key's webhooks."""

    secret: str
    header: str = Field(description="the header that carries the signature")
    scheme: str = Field(description="how the signature is made")


class Job(Document):
    """A job's status and progress (``GET /v1/jobs/{job_id}``)."""

    job_id: JobId
    status: JobStatus
    total: int = Field(ge=0, description="images in the job")
    done: int = Field(ge=0, description="images with a prediction")
    failed: int = Field(ge=0, description="images with a per-image error")
    canceled: int = Field(ge=0, description="images the cancellation reached first")
    created_at: float = Field(description="Unix time")
    finished_at: float | None = Field(description="Unix time, once every image has a result")
    model: str
    model_version: int | None = Field(
        None, description="the version the job is pinned to (null: the live one)"
    )
    top_k: int | None = Field(None, description="classes each result lists (at most the model's)")
    min_score: float | None = Field(None, description="classes scoring below it are left out of top_k")
    priority: int = Field(
        DEFAULT_PRIORITY,
        description=f"{MIN_PRIORITY} (lowest) to {MAX_PRIORITY} (highest): the job's priority",
    )
    status_url: str
    results_url: str
    callback: CallbackState | None = Field(
        None, description="the completion webhook's delivery, for a job created with a callback_url"
    )
    output: OutputState | None = Field(
        None, description="the results written to the job's output_url, for a job created with one"
    )
    listing: ListingState | None = Field(
        None, description="the listing of the job's s3:// source prefix, for a job made from one"
    )

    @property
    def final(self) -> bool:
        """True once the job will not change any more."""
        return self.status in FINAL_STATUSES


FINAL_STATUSES = frozenset({JobStatus.SUCCEEDED, JobStatus.PARTIAL, JobStatus.FAILED, JobStatus.CANCELED})


class Rejection(BaseModel):
    """A file refused at upload; it still has a row (an error) in the results."""

    index: int = Field(ge=0)
    filename: str
    code: str
    message: str


class Skipped(BaseModel):
    """An archive member that is not an image (listed, never classified)."""

    filename: str
    reason: str


class JobAccepted(Job):
    """``202`` of a submit (or ``200`` of an idempotent replay): the job and what the request added."""

    accepted: int | None = Field(None, ge=0, description="new images queued by this request")
    rejected: list[Rejection] = Field(default_factory=list)
    duplicates: int = Field(0, ge=0, description="files the job already had (re-sent parts)")
    skipped: list[Skipped] = Field(default_factory=list)
    expected: int | None = Field(None, description="the announced image count of an upload in parts")
    idempotent_replay: bool = Field(False, description="true when an Idempotency-Key returned an earlier job")


class Score(BaseModel):
    label: str
    score: float


class ResultRow(Document):
    """One image's result, in upload order."""

    index: int = Field(ge=0)
    filename: str
    status: Literal["ok", "error", "pending"]
    label: str | None = None
    class_id: int | None = None
    score: float | None = None
    top_k: list[Score] | None = None
    error: ImageError | None = None
    model: str | None = Field(None, description="the model that classified the image")
    version: int | None = Field(None, description="the version of the model that classified it")
    id: str | None = Field(None, description="the input's id, as given")
    columns: dict[str, str | int | float | bool | None] | None = Field(
        None, description="the input's pass-through columns, as given"
    )


class NotRequeued(BaseModel):
    """An image with a retryable error that a retry could not re-queue."""

    index: int = Field(ge=0)
    filename: str
    code: str = Field(description="its error code (unchanged)")
    reason: Literal["input_expired"] = Field(
        description="input_expired: its uploaded bytes (or URL) are no longer held"
    )


class Retried(Job):
    """``202`` of ``POST /v1/jobs/{job_id}/retry``: the job (running again when anything was
    re-queued) and what the retry did."""

    requeued: int = Field(ge=0, description="images whose retryable errors were removed and re-queued")
    not_requeued: list[NotRequeued] = Field(
        default_factory=list, description="images with a retryable error whose input is gone"
    )


class ClassifyResult(Job):
    """``200`` of ``POST /v1/classify``: the finished job with every row."""

    results: list[ResultRow]
    skipped: list[Skipped] = Field(
        default_factory=list,
        description="members of the request's zip that are not images (no row); a replay of an "
        "Idempotency-Key lists none",
    )


class ResultsPage(Document):
    """``GET /v1/jobs/{job_id}/results?format=json``: a page of rows (``offset``, ``limit``)."""

    job_id: JobId
    status: JobStatus
    total: int
    done: int
    failed: int
    canceled: int
    offset: int
    results: list[ResultRow]


class FileList(Document):
    """The relative paths a job has (to resume an upload)."""

    job_id: JobId
    files: list[str]


class Health(Document):
    status: Literal["ok"]


class Ready(Document):
    status: Literal["ready"]
    pending_images: int


# -- requests ---------------------------------------------------------------------------------

#: Most images a job in parts may announce (far above any real folder; a typo guard).
MAX_EXPECTED = 100_000_000


class OpenJob(BaseModel):
    """``POST /v1/jobs`` with a JSON body: open a job for an upload in parts."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # (The constraints before the validator, so the schema keeps them as minimum and maximum.)
    expected: Annotated[int, Field(ge=0, le=MAX_EXPECTED), BeforeValidator(whole_number)] | None = Field(
        None, description="how many images will follow (for progress); optional"
    )
    callback_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL that gets one signed POST when the job is final",
    )


class UrlItem(BaseModel):
    """One image of a URL job, with the name its result row shows (default: the URL)."""

    model_config = ConfigDict(extra="forbid", strict=True)

    # No max_length: a URL over MAX_URL_LENGTH is its image's `bad_url`, the rest of the job runs.
    url: str = Field(min_length=1)
    filename: str | None = Field(None, min_length=1, max_length=1024)
    id: str | int | None = Field(None, description="returned beside the prediction")
    columns: dict[str, str | int | float | bool | None] | None = Field(
        None, description="pass-through columns (at most 32), returned beside the prediction"
    )


class UrlJob(BaseModel):
    """``POST /v1/jobs`` with a JSON body that names images by URL; the workers fetch them."""

    model_config = ConfigDict(extra="forbid", strict=True)

    urls: list[Annotated[str, Field(min_length=1)] | UrlItem] = Field(
        min_length=1,
        description="http(s):// or s3:// URLs, or {url, filename, id, columns} objects; at most "
        f"BATCHVISION_MAX_URLS_PER_JOB; a URL that cannot be fetched (longer than {MAX_URL_LENGTH} "
        "characters, say) is its own image's error",
    )
    callback_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL that gets one signed POST when the job is final",
    )
    output_url: str | None = Field(
        None,
        pattern=r"^s3://",
        max_length=MAX_URL_LENGTH,
        description="s3:// prefix the results are written to (CSV, JSON Lines, Parquet, _SUCCESS)",
    )


class BucketJob(BaseModel):
    """``POST /v1/jobs`` with a JSON body that names a bucket prefix or a manifest in a bucket;
    the API lists its first page (or reads the manifest), the workers list the rest and fetch
    the images."""

    model_config = ConfigDict(extra="forbid", strict=True)

    source: str | None = Field(
        None,
        pattern=r"^s3://",
        max_length=MAX_URL_LENGTH,
        description="s3://bucket/prefix/: every image under it (recursively; the key relative to "
        "the prefix is the filename)",
    )
    manifest: str | None = Field(
        None,
        pattern=r"^s3://",
        max_length=MAX_URL_LENGTH,
        description="s3:// URL of a manifest (.csv, .jsonl, .txt), entries http(s):// or s3://",
    )
    output_url: str | None = Field(
        None,
        pattern=r"^s3://",
        max_length=MAX_URL_LENGTH,
        description="s3:// prefix the results are written to (CSV, JSON Lines, Parquet, _SUCCESS)",
    )
    callback_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL that gets one signed POST when the job is final",
    )


class ResultsQuery(BaseModel):
    """Query of ``GET /v1/jobs/{job_id}/results``."""

    model_config = ConfigDict(extra="forbid")

    format: Literal["json", "jsonl", "csv"] = "json"
    offset: int = Field(0, ge=0, le=MAX_EXPECTED)
    limit: int | None = Field(None, ge=1, le=MAX_EXPECTED)


class OptionsQuery(BaseModel):
    """Per-job options, in the query of every route that creates a job. Their
    ranges are checked against the model at submit time: ``422 invalid_option`` names the
    option and what is allowed."""

    model_config = ConfigDict(extra="forbid")

    model: str | None = Field(
        None,
        description="model name, or NAME:VERSION to pin a version (default: the configured default "
        "model); GET /v1/models lists them",
        json_schema_extra={"pattern": REF_PATTERN, "maxLength": 74},
    )
    top_k: int | None = Field(
        None,
        description="classes each result lists, 1 to the model's number of classes (default "
        "BATCHVISION_TOP_K, at most the model's classes)",
        json_schema_extra={"minimum": 1, "maximum": MAX_TOP_K},
    )
    min_score: float | None = Field(
        None,
        description="classes scoring below it are left out of top_k (0 to 1; default 0)",
        json_schema_extra={"minimum": 0, "maximum": 1},
    )
    priority: int | None = Field(
        None,
        description=f"{MIN_PRIORITY} (lowest) to {MAX_PRIORITY} (highest), default {DEFAULT_PRIORITY}: "
        "bulk work of higher priorities is served first, in weighted turns that keep lower ones "
        "moving; at most the API key's maximum (`priority_not_allowed`)",
        json_schema_extra={"minimum": MIN_PRIORITY, "maximum": MAX_PRIORITY},
    )


#: What ``?filename=`` means on the routes that take uploads.
RAW_BODY_NAME = (
    "name of a raw image body (refused with a multipart or zip body, whose files carry their own names)"
)


class SubmitQuery(OptionsQuery):
    """Query of ``POST /v1/jobs``."""

    model_config = ConfigDict(extra="forbid")

    seal: bool = Field(True, description="false: open a job for an upload in parts with this first part")
    filename: str | None = Field(None, min_length=1, max_length=1024, description=RAW_BODY_NAME)
    callback_url: str | None = Field(
        None,
        min_length=1,
        max_length=MAX_URL_LENGTH,
        description="http(s) URL that gets one signed POST when the job is final (a JSON body "
        "carries it in the body instead)",
    )
    output_url: str | None = Field(
        None,
        pattern=r"^s3://",
        max_length=MAX_URL_LENGTH,
        description="s3:// prefix the results of a manifest body are written to (a JSON body "
        "carries it in the body instead; an upload or an open job has none: 400 bad_parameter)",
    )


class AddFilesQuery(BaseModel):
    """Query of ``POST /v1/jobs/{job_id}/files``."""

    model_config = ConfigDict(extra="forbid")

    filename: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description=f"{RAW_BODY_NAME}; required then, as the relative path",
    )


class ClassifyQuery(OptionsQuery):
    """Query of ``POST /v1/classify``."""

    model_config = ConfigDict(extra="forbid")

    timeout: float = Field(
        30.0, ge=0, le=3600, description="seconds to wait, 0 to 3600 (capped by SYNC_TIMEOUT_S)"
    )
    filename: str | None = Field(None, min_length=1, max_length=1024, description=RAW_BODY_NAME)


class DeleteQuery(BaseModel):
    """Query of ``DELETE /v1/jobs/{job_id}``."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["delete", "cancel"] = Field(
        "delete",
        description="delete: remove the job, its results and uploads; cancel (deprecated, as "
        "before version 0.2): only cancel, like POST /v1/jobs/{job_id}/cancel",
    )


class JobQuery(BaseModel):
    """Query of ``GET /v1/jobs/{job_id}``."""

    model_config = ConfigDict(extra="forbid")

    wait: float = Field(
        0.0,
        ge=0,
        le=3600,
        description="seconds to hold the answer until the job is final (a long poll, capped by "
        "SYNC_TIMEOUT_S); the job as it stands then. 0: answer at once",
    )


class NoQuery(BaseModel):
    """Routes that take no query parameters refuse unknown ones."""

    model_config = ConfigDict(extra="forbid")
