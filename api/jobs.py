"""``/v1``: submit jobs, poll them, read results, cancel."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Response, request, stream_with_context, url_for

from api.auth import current_owner, digest
from api.metrics import IMAGES_ACCEPTED, IMAGES_REJECTED, JOBS_CREATED
from api.services import Services, services
from api.uploads import read_uploads
from batchvision.core.errors import BadRequest, Conflict, Gone, NotFound
from batchvision.core.schemas import csv_lines, jsonl_lines

bp = Blueprint("v1", __name__, url_prefix="/v1")

PUBLIC_FIELDS = (
    "job_id",
    "status",
    "total",
    "done",
    "failed",
    "canceled",
    "created_at",
    "finished_at",
    "model",
)


def _public(job: dict[str, Any]) -> dict[str, Any]:
    doc = {k: job[k] for k in PUBLIC_FIELDS}
    doc["status_url"] = url_for("v1.get_job", job_id=job["job_id"], _external=True)
    doc["results_url"] = url_for("v1.get_results", job_id=job["job_id"], _external=True)
    return doc


def _job_or_404(svc: Services, job_id: str) -> dict[str, Any]:
    """The job, if it exists and belongs to the caller's API key (else 404, or 410 if expired)."""
    job = svc.store.get(job_id)
    if job is None or job["owner"] != current_owner():
        if job is None and svc.store.is_gone(job_id):
            raise Gone(f"job {job_id} finished and its results expired", code="job_expired")
        raise NotFound(f"no job {job_id}", code="job_not_found")
    return job


def _submit(
    svc: Services, job_id: str | None, *, seal: bool, interactive: bool = False
) -> tuple[str, dict[str, Any]]:
    """Add the request's files to ``job_id`` (a new job if ``None``)."""
    uploads, skipped = read_uploads(request, svc.settings, adding=job_id is not None)
    job_id_out, summary = svc.intake.submit(
        job_id, current_owner(), uploads, skipped, seal=seal, interactive=interactive
    )
    if job_id is None:
        JOBS_CREATED.inc()
    IMAGES_ACCEPTED.inc(summary.pop("queued"))
    for item in summary["rejected"]:
        IMAGES_REJECTED.labels(item["code"]).inc()
    return job_id_out, summary


def _new_job(svc: Services) -> str:
    job_id = svc.intake.new_job(current_owner())
    JOBS_CREATED.inc()
    return job_id


def _accepted(
    svc: Services, job_id: str, extra: dict[str, Any]
) -> tuple[dict[str, Any], int, dict[str, str]]:
    job = _public(_job_or_404(svc, job_id))
    return {**job, **extra}, 202, {"Location": job["status_url"]}


@bp.post("/jobs")
def create_job() -> tuple[dict[str, Any], int, dict[str, str]]:
    """Submit images (files, a zip, a raw image): ``202`` with the job and where to poll.

    A JSON body ``{"expected": N}``, or ``?seal=false`` with the first part, opens a job for
    a bulk upload in parts (``POST /v1/jobs/<id>/files``, then ``POST /v1/jobs/<id>/seal``).
    """
    svc = services()

    def create() -> tuple[str, dict[str, Any]]:
        if request.is_json:
            body = request.get_json(silent=True)
            if not isinstance(body, dict):
                raise BadRequest('JSON body must be an object like {"expected": 100}', code="bad_request")
            return _new_job(svc), {"expected": body.get("expected")}
        return _submit(svc, None, seal=request.args.get("seal", "true") != "false")

    key = request.headers.get("Idempotency-Key")
    if not key:
        return _accepted(svc, *create())
    # The same key (per API key) returns the same job instead of creating a second one.
    job_id, extra = svc.idempotency.run(current_owner(), digest(key), create)
    if extra is None:
        job = _public(_job_or_404(svc, job_id))
        return {**job, "idempotent_replay": True}, 200, {"Location": job["status_url"]}
    return _accepted(svc, job_id, extra)


@bp.post("/jobs/<job_id>/files")
def add_files(job_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    """Add a part to an open job; re-sending a file (same relative path) changes nothing."""
    svc = services()
    _job_or_404(svc, job_id)
    try:
        job_id, summary = _submit(svc, job_id, seal=False)
    except PermissionError as exc:
        raise Conflict(f"job {job_id} is sealed or canceled: no more files", code="job_sealed") from exc
    except LookupError as exc:  # expired between the check and the write
        raise NotFound(f"no job {job_id}", code="job_not_found") from exc
    return _accepted(svc, job_id, summary)


@bp.post("/jobs/<job_id>/seal")
def seal_job(job_id: str) -> dict[str, Any]:
    """The upload is complete: the job finishes when every image has a result."""
    svc = services()
    _job_or_404(svc, job_id)
    svc.store.seal(job_id)
    return _public(_job_or_404(svc, job_id))


@bp.get("/jobs/<job_id>/files")
def list_files(job_id: str) -> dict[str, Any]:
    """The relative paths the job already has (to resume an interrupted upload)."""
    svc = services()
    _job_or_404(svc, job_id)
    return {"job_id": job_id, "files": svc.store.file_keys(job_id)}


@bp.post("/classify")
def classify_sync() -> tuple[dict[str, Any], int] | tuple[dict[str, Any], int, dict[str, str]]:
    """Submit and wait up to ``?timeout=`` seconds; ``200`` with results or ``202`` with the job."""
    svc = services()
    timeout = max(0.0, min(_float_arg("timeout", svc.settings.sync_timeout_s), svc.settings.sync_timeout_s))
    job_id, summary = _submit(svc, None, seal=True, interactive=True)
    if not svc.waiter.wait(job_id, timeout):
        return _accepted(svc, job_id, summary)
    job, rows = svc.store.snapshot(job_id, rows=len(summary["rejected"]) + summary["accepted"])
    if job is None or job["owner"] != current_owner():  # expired within the wait: as GET would
        job = _job_or_404(svc, job_id)
    return {**_public(job), "results": rows}, 200


@bp.get("/jobs/<job_id>")
def get_job(job_id: str) -> dict[str, Any]:
    return _public(_job_or_404(services(), job_id))


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str) -> dict[str, Any]:
    """Cancel what is not classified yet; results so far are kept."""
    svc = services()
    _job_or_404(svc, job_id)
    svc.store.cancel(job_id)
    return _public(_job_or_404(svc, job_id))


@bp.get("/jobs/<job_id>/results")
def get_results(job_id: str) -> Response:
    """Per-image results in upload order, streamed: ``format=json|jsonl|csv``."""
    svc = services()
    job = _job_or_404(svc, job_id)
    fmt = request.args.get("format", "json")
    offset = _int_arg("offset", 0)
    limit = request.args.get("limit")
    rows = svc.store.iter_results(job_id, offset, _int_arg("limit", 0) if limit else None)
    if fmt == "csv":
        body, mime = csv_lines(rows), "text/csv"
    elif fmt == "jsonl":
        body, mime = jsonl_lines(rows), "application/x-ndjson"
    elif fmt == "json":
        body, mime = _json_stream(job, offset, rows), "application/json"
    else:
        raise BadRequest(f"unknown format {fmt!r}: use json, jsonl or csv", code="bad_format")
    resp = Response(stream_with_context(body), mimetype=mime)
    if fmt == "csv":
        resp.headers["Content-Disposition"] = f'attachment; filename="{job_id}.csv"'
    return resp


def _json_stream(job: dict[str, Any], offset: int, rows: Iterator[dict[str, Any]]) -> Iterator[str]:
    head = {k: job[k] for k in ("job_id", "status", "total", "done", "failed", "canceled")}
    yield json.dumps(head)[:-1] + f', "offset": {offset}, "results": ['
    for n, row in enumerate(rows):
        yield ("," if n else "") + json.dumps(row)
    yield "]}"


def _int_arg(name: str, default: int) -> int:
    try:
        value = int(request.args.get(name, default))
    except ValueError as exc:
        raise BadRequest(f"?{name}= must be an integer", code="bad_parameter") from exc
    if value < 0:
        raise BadRequest(f"?{name}= must be >= 0", code="bad_parameter")
    return value


def _float_arg(name: str, default: float) -> float:
    try:
        return float(request.args.get(name, default))
    except ValueError as exc:
        raise BadRequest(f"?{name}= must be a number", code="bad_parameter") from exc
