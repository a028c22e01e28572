"""``/v1``: submit jobs, poll them, read results, cancel, retry and delete them."""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from dataclasses import asdict
from typing import Any

from flask import Blueprint, Response, request, stream_with_context, url_for

from api import contract as c
from api.auth import current_owner, digest
from api.metrics import JOBS_CREATED, count_submitted
from api.services import Services, services
from api.uploads import UploadRequest, read_uploads
from batchvision.core import documents as d
from batchvision.core import manifest
from batchvision.core.errors import BadRequest, Conflict, Gone, NotFound
from batchvision.core.model_refs import JobOptions
from batchvision.core.results import Row, csv_lines, jsonl_lines
from batchvision.server import job_actions, served, webhooks
from batchvision.server.idempotency import Claim
from batchvision.server.intake import JOB_ID_SLOT, Submitted

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
    "model_version",
    "top_k",
    "min_score",
    "priority",
)


def _public(job: dict[str, Any]) -> dict[str, Any]:
    doc = {k: job[k] for k in PUBLIC_FIELDS}
    doc["status_url"] = url_for("v1.get_job", job_id=job["job_id"], _external=True)
    doc["results_url"] = url_for("v1.get_results", job_id=job["job_id"], _external=True)
    return doc


def _job_or_404(svc: Services, job_id: str) -> dict[str, Any]:
    """The job, if it exists and belongs to the caller's API key (else 404, or 410 if expired)."""
    job = svc.store.get(c.job_id(job_id))
    if job is None or job["owner"] != current_owner():
        if job is None and svc.store.is_gone(job_id, current_owner()):
            raise Gone(f"job {job_id} finished and its results expired", code="job_expired")
        raise NotFound(f"no job {job_id}", code="job_not_found")
    return job


def _submit(
    svc: Services,
    job_id: str | None,
    filename: str | None,
    *,
    seal: bool,
    interactive: bool = False,
    callback: str | None = None,
    options: JobOptions | None = None,
    claim: Claim | None = None,
    reply_to: str | None = None,
) -> Submitted:
    """Add the request's files to ``job_id`` (a new job if ``None``, with ``callback``, the
    per-job ``options`` and the ``Idempotency-Key`` ``claim``; ``reply_to``: the channel of the
    waiter of a request that answers with the job's rows)."""
    fields = _callback(svc, callback)
    uploads, skipped = read_uploads(request, svc.settings, filename, adding=job_id is not None)
    submitted = svc.intake.submit(
        job_id,
        current_owner(),
        uploads,
        skipped,
        seal=seal,
        interactive=interactive,
        callback=fields,
        options=options,
        claim=claim,
        reply_to=reply_to,
    )
    count_submitted(submitted, created=job_id is None)
    return submitted


def _added(submitted: Submitted) -> dict[str, Any]:
    """What a submit did, as the fields of the public ``JobAccepted`` document."""
    return {
        "accepted": submitted.accepted,
        "rejected": [d.Rejection.model_validate(asdict(r)).model_dump() for r in submitted.rejected],
        "duplicates": submitted.duplicates,
        "skipped": [d.Skipped.model_validate(asdict(s)).model_dump() for s in submitted.skipped],
    }


def _options(svc: Services, params: d.OptionsQuery) -> JobOptions:
    """The per-job options of the query, checked against the models the workers serve and
    the caller's maximum priority: ``422 invalid_option`` (or ``priority_not_allowed``) names
    the option and what is allowed."""
    return svc.intake.options(
        params.model, params.top_k, params.min_score, priority=params.priority, owner=current_owner()
    )


def _new_job(
    svc: Services,
    callback: dict[str, str] | None = None,
    options: JobOptions | None = None,
    claim: Claim | None = None,
) -> str:
    job_id = svc.intake.new_job(current_owner(), callback, options, claim=claim)
    JOBS_CREATED.inc()
    return job_id


# -- images by URL (a JSON body or a manifest) and completion webhooks ----------------

#: A placeholder job id: its status URL, with the id's place marked, is what the webhook shows.
_SLOT_ID = "0" * 32


def _callback(svc: Services, url: str | None) -> dict[str, str] | None:
    """A ``callback_url`` checked (422 ``bad_callback_url``) as job-hash fields."""
    if url is None:
        return None
    status_url = url_for("v1.get_job", job_id=_SLOT_ID, _external=True).replace(_SLOT_ID, JOB_ID_SLOT)
    return svc.intake.callback(url, status_url)


def _submit_urls(
    svc: Services,
    entries: list[manifest.UrlEntry],
    callback: dict[str, str] | None,
    options: JobOptions | None = None,
    claim: Claim | None = None,
    output: str | None = None,
) -> Submitted:
    fields = svc.intake.output(output)
    submitted = svc.intake.submit_urls(
        current_owner(), entries, callback=callback, options=options, claim=claim, output=fields
    )
    count_submitted(submitted, created=True)
    return submitted


def _url_job(svc: Services, params: d.SubmitQuery, claim: Claim | None) -> Submitted | None:
    """A URL job from a JSON body with ``urls`` or a manifest body; ``None`` for other bodies."""
    kind = manifest.kind_of_media_type(request.mimetype or "")
    limit = svc.settings.max_urls_per_job
    if kind is not None:
        if not params.seal or params.filename is not None:
            raise BadRequest(
                "a manifest makes a whole job: it takes neither seal=false nor filename",
                code="bad_parameter",
            )
        entries = manifest.parse(request.get_data(), kind, max_entries=limit)
        callback = _callback(svc, params.callback_url)
        return _submit_urls(svc, entries, callback, _options(svc, params), claim, params.output_url)
    raw = request.get_json(silent=True) if request.mimetype == "application/json" else None
    if isinstance(raw, dict) and "urls" in raw:
        body = c.json_body(d.UrlJob)
        items = [i if isinstance(i, str) else i.model_dump(exclude_none=True) for i in body.urls]
        entries = manifest.entries_from_json(items, max_entries=limit)
        callback = _callback(svc, _one_callback(body.callback_url, params))
        output = _one_output(body.output_url, params)
        return _submit_urls(svc, entries, callback, _options(svc, params), claim, output)
    if isinstance(raw, dict) and ("source" in raw or "manifest" in raw):
        return _bucket_job(svc, params, claim, c.json_body(d.BucketJob))
    return None


def _bucket_job(svc: Services, params: d.SubmitQuery, claim: Claim | None, body: d.BucketJob) -> Submitted:
    """A job from an ``s3://`` prefix (listed page by page) or a manifest in a bucket."""
    if (body.source is None) == (body.manifest is None):
        raise BadRequest("give exactly one of source and manifest", code="bad_body")
    callback = _callback(svc, _one_callback(body.callback_url, params))
    options = _options(svc, params)
    output = _one_output(body.output_url, params)
    if body.manifest is not None:
        kind = manifest.kind_of_path(body.manifest)
        if kind is None:
            raise BadRequest(
                "manifest: unknown type; name it .csv, .jsonl/.ndjson or .txt/.uris", code="bad_manifest"
            )
        data = svc.intake.read_manifest(body.manifest)
        entries = manifest.parse(data, kind, max_entries=svc.settings.max_urls_per_job)
        return _submit_urls(svc, entries, callback, options, claim, output)
    assert body.source is not None
    submitted = svc.intake.submit_prefix(
        current_owner(),
        body.source,
        callback=callback,
        output=svc.intake.output(output),
        options=options,
        claim=claim,
    )
    count_submitted(submitted, created=True)
    return submitted


def _no_output(params: d.SubmitQuery) -> None:
    """Uploads and open jobs have no output prefix: a given ``output_url`` would be ignored."""
    if params.output_url is not None:
        raise BadRequest(
            "query parameter 'output_url' is only taken by a job of URLs (a JSON body with urls, "
            "or a manifest body) or from a bucket (source, manifest); uploads and open jobs have "
            "no output prefix",
            code="bad_parameter",
            details=[
                {"in": "query", "field": "output_url", "message": "not allowed on uploads and open jobs"}
            ],
        )


def _one_output(in_body: str | None, params: d.SubmitQuery) -> str | None:
    if in_body is not None and params.output_url is not None:
        raise BadRequest(
            "output_url is given twice (body and query): send it in the body", code="bad_parameter"
        )
    return in_body if in_body is not None else params.output_url


def _one_callback(in_body: str | None, params: d.SubmitQuery) -> str | None:
    if in_body is not None and params.callback_url is not None:
        raise BadRequest(
            "callback_url is given twice (body and query): send it in the body", code="bad_parameter"
        )
    return in_body if in_body is not None else params.callback_url


def _accepted(
    svc: Services, job_id: str, extra: dict[str, Any]
) -> tuple[dict[str, Any], int, dict[str, str]]:
    job = _public(_job_or_404(svc, job_id))
    return {**job, **extra}, 202, {"Location": job["status_url"]}


_JOB_ERRORS = {
    404: c.Response("No such job (or another API key's)", d.ErrorDocument),
    410: c.Response("The job finished and its results expired", d.ErrorDocument),
}
_UPLOAD_ERRORS = {
    409: c.Response(
        "The job is sealed or canceled (`job_sealed`), or lists an `s3://` prefix (`job_is_listed`): "
        "no more files",
        d.ErrorDocument,
    ),
    413: c.Response("Request, file or archive over a limit", d.ErrorDocument),
    415: c.Response("Unsupported Content-Type", d.ErrorDocument),
    422: c.Response("No file of the request is an image we can classify (reason per file)", d.ErrorDocument),
}
#: A part of an open job is not refused for its files: each unusable one gets its error row.
_PART_ERRORS = {
    **_UPLOAD_ERRORS,
    422: c.Response(
        "The part holds no file (`no_images`; its non-image members are listed as `skipped`), or its "
        "zip is refused (`archive_rejected`). A part whose files are all unusable is accepted: each "
        "gets its error row and is listed in `rejected`",
        d.ErrorDocument,
    ),
}
_ACCEPTED = c.Response("Accepted: the job and what this request added", d.JobAccepted, links=c.JOB_LINKS)
#: A replay of an ``Idempotency-Key`` whose job is gone (and a classify whose job went while it
#: waited).
_REPLAY_GONE = {
    404: c.Response("The job this Idempotency-Key created earlier was deleted", d.ErrorDocument),
    410: c.Response("The job this Idempotency-Key created earlier finished and expired", d.ErrorDocument),
}

# The submit body: the upload forms, plus a JSON body naming images by URL (either
# JSON document: `urls` makes it a UrlJob) and manifests (CSV, JSON Lines, URI list).
_SUBMIT_BODY = c.upload_body(archive=True, json_model=d.OpenJob)
_SUBMIT_BODY["application/json"] = {
    "schema": {
        "anyOf": [{"$ref": f"#/components/schemas/{m.__name__}"} for m in (d.OpenJob, d.UrlJob, d.BucketJob)]
    }
}
_SUBMIT_BODY.update({t: {"schema": {"type": "string"}} for t in manifest.MEDIA_TYPES})


#: What the other JSON bodies of ``POST /v1/jobs`` hold, for an error about an open job's body.
_OTHER_JSON_JOBS = (
    '; or {"urls": [...]} for images by URL, {"source": "s3://bucket/prefix/"} or '
    '{"manifest": "s3://bucket/list.csv"} for images in a bucket'
)


@bp.post("/jobs")
@c.contract(
    summary="Submit images as a job, or open a job for an upload in parts",
    description="Multipart parts named `files` (or one zip in a part named `archive`), a raw "
    '`image/*` body, a raw `application/zip` body, or a JSON body `{"expected": N}` that opens '
    "a job for an upload in parts (as does `?seal=false` with a first part). Images by URL: a "
    'JSON body `{"urls": [...]}` (`UrlJob`) or a manifest body: `text/csv` with a `url` and an '
    "optional `filename` column, JSON Lines (`application/x-ndjson`) of URL strings or "
    "`{url, filename, id, columns}` objects, or `text/uri-list`; URLs are http(s):// or s3://, "
    'and the workers fetch them. From a bucket: a JSON body `{"source": "s3://bucket/prefix/"}` '
    '(every image under it) or `{"manifest": "s3://bucket/list.csv"}` (`BucketJob`). Any new '
    "job may carry a `callback_url` that gets one signed POST when the job is final, and an "
    "`output_url` (s3://) its results are written to (in the JSON body, else in the query).",
    query=d.SubmitQuery,
    body=_SUBMIT_BODY,
    body_required=True,
    headers=(c.IDEMPOTENCY_HEADER,),
    schema_refs=(d.OpenJob, d.UrlJob, d.BucketJob),
    responses={
        202: _ACCEPTED,
        200: c.Response(
            "Idempotent replay: the job created earlier with this Idempotency-Key", d.JobAccepted
        ),
        409: c.Response(
            "A request with this Idempotency-Key is still in progress, or the key was used for a "
            "different request",
            d.ErrorDocument,
        ),
        **{k: v for k, v in _UPLOAD_ERRORS.items() if k not in (409, 413, 422)},
        **_REPLAY_GONE,
        403: c.Response(
            "The `source`, `manifest` or `output_url` names an s3:// location outside "
            "`BATCHVISION_S3_ALLOW`, or the service's own blob store or model repository "
            "(`s3_not_allowed`, naming the field); an s3:// image URL there is a per-image error",
            d.ErrorDocument,
        ),
        413: c.Response("Request, file, archive or URL list over a limit", d.ErrorDocument),
        422: c.Response(
            "No file (or URL) of the request is an image we can classify (reason per file), "
            "the callback_url is refused, or a per-job option (model, top_k, min_score, priority) "
            "is invalid (`invalid_option`, naming the option and what is allowed; "
            "`priority_not_allowed` above the API key's maximum priority)",
            d.ErrorDocument,
        ),
    },
    tags=("jobs",),
)
def create_job() -> tuple[dict[str, Any], int, dict[str, str]]:
    svc = services()
    params = c.query(d.SubmitQuery)
    key = c.idempotency_key()

    def create(claim: Claim | None = None) -> tuple[str, dict[str, Any]]:
        by_url = _url_job(svc, params, claim)
        if by_url is not None:
            return by_url.job_id, _added(by_url)
        _no_output(params)
        if request.mimetype == "application/json":
            body = c.json_body(d.OpenJob, _OTHER_JSON_JOBS)
            callback = _callback(svc, _one_callback(body.callback_url, params))
            return _new_job(svc, callback, _options(svc, params), claim), {"expected": body.expected}
        options = _options(svc, params)
        submitted = _submit(
            svc,
            None,
            params.filename,
            seal=params.seal,
            callback=params.callback_url,
            options=options,
            claim=claim,
        )
        return submitted.job_id, _added(submitted)

    if key is None:
        return _accepted(svc, *create())
    # The same key (per API key) returns the same job instead of creating a second one.
    job_id, extra = svc.idempotency.run(current_owner(), digest(key), c.fingerprint(), create)
    if extra is None:
        job = _public(_job_or_404(svc, job_id))
        return {**job, "idempotent_replay": True}, 200, {"Location": job["status_url"]}
    return _accepted(svc, job_id, extra)


@bp.post("/jobs/<job_id>/files")
@c.contract(
    summary="Add a part to an open job",
    description="Re-sending a file (same relative path) changes nothing, so a part may be retried. "
    "Files that are not images we can classify are accepted as failed rows (listed in `rejected`), "
    "even when no file of the part is usable.",
    query=d.AddFilesQuery,
    body=c.upload_body(archive=True),
    body_required=True,
    responses={202: _ACCEPTED, **_JOB_ERRORS, **_PART_ERRORS},
    tags=("jobs",),
)
def add_files(job_id: str) -> tuple[dict[str, Any], int, dict[str, str]]:
    svc = services()
    params = c.query(d.AddFilesQuery)
    _not_listed(job_id, _job_or_404(svc, job_id))
    try:
        submitted = _submit(svc, job_id, params.filename, seal=False)
    except PermissionError as exc:
        raise Conflict(f"job {job_id} is sealed or canceled: no more files", code="job_sealed") from exc
    except LookupError as exc:  # expired between the check and the write
        raise NotFound(f"no job {job_id}", code="job_not_found") from exc
    return _accepted(svc, job_id, _added(submitted))


def _not_listed(job_id: str, job: dict[str, Any]) -> None:
    """A job whose images come from listing an ``s3://`` prefix takes neither files nor a seal:
    its lister adds every object and seals it after the last page (a seal before would end
    the job with the rest of the prefix never classified)."""
    if job["listing"] is not None:
        raise Conflict(
            f"job {job_id} takes its images from listing its source: it is sealed when the listing "
            "ends, and files cannot be added to it",
            code="job_is_listed",
        )


@bp.post("/jobs/<job_id>/seal")
@c.contract(
    summary="The upload is complete: the job finishes when every image has a result",
    query=d.NoQuery,
    responses={
        200: c.Response("The job", d.Job),
        409: c.Response("`job_is_listed`: the job lists an `s3://` prefix and seals itself", d.ErrorDocument),
        **_JOB_ERRORS,
    },
    tags=("jobs",),
)
def seal_job(job_id: str) -> dict[str, Any]:
    svc = services()
    c.query(d.NoQuery)
    _not_listed(job_id, _job_or_404(svc, job_id))
    svc.store.seal(job_id)
    return _public(_job_or_404(svc, job_id))


@bp.get("/jobs/<job_id>/files")
@c.contract(
    summary="The relative paths the job already has (to resume an interrupted upload)",
    query=d.NoQuery,
    responses={200: c.Response("The job's file keys", d.FileList), **_JOB_ERRORS},
    tags=("jobs",),
)
def list_files(job_id: str) -> dict[str, Any]:
    svc = services()
    c.query(d.NoQuery)
    _job_or_404(svc, job_id)
    return {"job_id": job_id, "files": svc.store.file_keys(job_id)}


@bp.post("/classify")
@c.contract(
    summary="Submit and wait: 200 with the results, or 202 with the job when `timeout` passes",
    query=d.ClassifyQuery,
    body=c.upload_body(archive=True),
    body_required=True,
    headers=(c.IDEMPOTENCY_HEADER,),
    responses={
        200: c.Response("Every image has a result", d.ClassifyResult),
        202: _ACCEPTED,
        409: c.Response(
            "A request with this Idempotency-Key is still in progress, or the key was used for a "
            "different request",
            d.ErrorDocument,
        ),
        **{k: v for k, v in _UPLOAD_ERRORS.items() if k != 409},
        404: c.Response(
            "The job this Idempotency-Key created earlier, or the one this request made, was deleted",
            d.ErrorDocument,
        ),
        410: _REPLAY_GONE[410],
        422: c.Response(
            "No file of the request is an image we can classify (reason per file), or a per-job "
            "option (model, top_k, min_score, priority) is invalid (`invalid_option`; "
            "`priority_not_allowed` above the API key's maximum priority)",
            d.ErrorDocument,
        ),
    },
    tags=("jobs",),
)
def classify_sync() -> tuple[dict[str, Any], int] | tuple[dict[str, Any], int, dict[str, str]]:
    svc = services()
    params = c.query(d.ClassifyQuery)
    timeout = min(params.timeout, svc.settings.sync_timeout_s)
    options = _options(svc, params)
    key = c.idempotency_key()
    since = svc.waiter.mark()  # before the job exists: its finish cannot be missed

    def create(claim: Claim | None = None) -> tuple[str, Submitted]:
        submitted = _submit(
            svc,
            None,
            params.filename,
            seal=True,
            interactive=True,
            options=options,
            claim=claim,
            reply_to=svc.waiter.channel,
        )
        return submitted.job_id, submitted

    first: Submitted | None
    if key is None:
        job_id, first = create()
    else:  # a retried classify waits for the job its first try created instead of a second one
        job_id, first = svc.idempotency.run(current_owner(), digest(key), c.fingerprint(), create)
    summary: dict[str, Any] = _added(first) if first is not None else {"idempotent_replay": True}
    count = first.files if first is not None else None
    if isinstance(request, UploadRequest):  # the images are in Redis now; the wait needs none
        request.release_body()
    # A replayed key names an older job: its wait asks Redis first.
    finished = svc.waiter.wait(job_id, timeout, since if first is not None else None)
    if finished is None:
        return _accepted(svc, job_id, summary)
    if count is None:
        count = int(_job_or_404(svc, job_id)["total"])
    job, rows = svc.store.snapshot(job_id, rows=count, reply=finished.reply)
    if job is None or job["owner"] != current_owner():  # expired within the wait: as GET would
        job = _job_or_404(svc, job_id)
    # A replay's request is not read again: its skipped members are not known.
    skipped = summary.get("skipped", [])
    return {**_public(job), "results": [row.document() for row in rows], "skipped": skipped}, 200


@bp.get("/jobs/<job_id>")
@c.contract(
    summary="A job's status and progress; with `wait`, once it is final or `wait` seconds passed",
    query=d.JobQuery,
    responses={200: c.Response("The job", d.Job), **_JOB_ERRORS},
    tags=("jobs",),
)
def get_job(job_id: str) -> dict[str, Any]:
    params = c.query(d.JobQuery)
    svc = services()
    job = _job_or_404(svc, job_id)
    if params.wait > 0 and job["finished_at"] is None:  # a long poll: no client sleeps past the end
        svc.waiter.wait(job_id, min(params.wait, svc.settings.sync_timeout_s))
        job = _job_or_404(svc, job_id)
    doc = _public(job)
    if job["callback"] is not None:  # the webhook's delivery state, read with the job
        doc["callback"] = job["callback"]
    for member in ("output", "listing"):  # the output prefix's writing, the source's listing
        if job[member] is not None:
            doc[member] = job[member]
    return doc


@bp.get("/webhook-secret")
@c.contract(
    summary="The secret that signs this API key's completion webhooks",
    description="Each webhook POST carries `Batchvision-Signature: t=<unix seconds>,v1=<hex>` "
    "where `v1` is HMAC-SHA256 under this secret of `<t>.` followed by the raw body. The secret "
    "is per API key (derived from the server's `BATCHVISION_WEBHOOK_SECRET`).",
    query=d.NoQuery,
    responses={
        200: c.Response("The signing secret", d.WebhookSecret),
        403: c.Response("No API keys configured: the secret is not served over HTTP", d.ErrorDocument),
    },
    tags=("webhooks",),
)
def webhook_secret() -> dict[str, Any]:
    svc = services()
    c.query(d.NoQuery)
    return {
        "secret": webhooks.owner_secret(svc.redis, svc.settings, current_owner()),
        "header": webhooks.SIGNATURE_HEADER,
        "scheme": "t=<unix seconds>,v1=<hex HMAC-SHA256(secret, '<t>.' + body)>",
    }


@bp.post("/jobs/<job_id>/cancel")
@c.contract(
    summary="Cancel what is not classified yet; results so far are kept and the job stays readable",
    query=d.NoQuery,
    responses={200: c.Response("The job (status canceled once nothing is left)", d.Job), **_JOB_ERRORS},
    tags=("jobs",),
)
def cancel_job(job_id: str) -> dict[str, Any]:
    svc = services()
    c.query(d.NoQuery)
    return _cancel(svc, job_id)


def _cancel(svc: Services, job_id: str) -> dict[str, Any]:
    _job_or_404(svc, job_id)
    svc.store.cancel(job_id)
    return _public(_job_or_404(svc, job_id))


#: ``DELETE ?mode=cancel``, the meaning ``DELETE`` had before: deprecated since (RFC 9745's
#: ``@<Unix time>``) and gone after (RFC 8594's HTTP date) these.
CANCEL_BY_DELETE_DEPRECATED = "@1796342400"  # 2026-12-04
CANCEL_BY_DELETE_SUNSET = "Wed, 30 Jun 2027 00:00:00 GMT"
_DEPRECATION_HEADERS = ("Deprecation", "Sunset", "Link")


@bp.delete("/jobs/<job_id>")
@c.contract(
    summary="Delete the job: cancel what is queued, then remove it, its results and its uploads",
    description="Afterwards every route of the job answers 404. `?mode=cancel` keeps the meaning "
    "`DELETE` had before version 0.2 (cancel only, the job stays readable) until the `Sunset` "
    "date, answered with `Deprecation`, `Sunset` and a `Link` to `POST /v1/jobs/{job_id}/cancel`.",
    query=d.DeleteQuery,
    responses={
        204: c.Response("Deleted: the job, its results and its uploads are gone"),
        200: c.Response("`mode=cancel` (deprecated): the job, canceled", d.Job, headers=_DEPRECATION_HEADERS),
        **_JOB_ERRORS,
    },
    tags=("jobs",),
)
def delete_job(job_id: str) -> tuple[Any, int] | tuple[dict[str, Any], int, dict[str, str]]:
    svc = services()
    params = c.query(d.DeleteQuery)
    if params.mode == "cancel":
        successor = url_for("v1.cancel_job", job_id=job_id)
        return (
            _cancel(svc, job_id),
            200,
            {
                "Deprecation": CANCEL_BY_DELETE_DEPRECATED,
                "Sunset": CANCEL_BY_DELETE_SUNSET,
                "Link": f'<{successor}>; rel="successor-version"',
            },
        )
    _job_or_404(svc, job_id)
    job_actions.delete(svc.intake, job_id, current_owner())
    return "", 204


@bp.post("/jobs/<job_id>/retry")
@c.contract(
    summary="Queue again the images of a finished job whose errors are retryable",
    description="Each image whose stored error is retryable (`retryable: true` in its result "
    "row: fetch timeouts, unreachable hosts, `http_5xx`, workers lost past the delivery "
    "limit, ...) loses that result and is classified again, exactly once however many retries "
    "race. The job runs again, then finishes again (its webhook, if any, is sent again). An "
    "image whose input is no longer held (its upload expired) keeps its error and is listed "
    "in `not_requeued`.",
    query=d.NoQuery,
    responses={
        202: c.Response("Images were queued again: the job, running", d.Retried),
        200: c.Response("Nothing to queue again: the job, unchanged", d.Retried),
        409: c.Response(
            "The job is still running or open for uploads (`job_running`), was canceled "
            "(`job_canceled`), or its model was removed from the registry (`model_forgotten`)",
            d.ErrorDocument,
        ),
        **_JOB_ERRORS,
    },
    tags=("jobs",),
)
def retry_job(job_id: str) -> tuple[dict[str, Any], int]:
    svc = services()
    c.query(d.NoQuery)
    _job_or_404(svc, job_id)
    try:
        done = job_actions.retry(svc.intake, job_id)
    except LookupError as exc:  # deleted or expired between the check and the retry
        raise NotFound(f"no job {job_id}", code="job_not_found") from exc
    names = svc.store.filenames(job_id, [n.index for n in done.not_requeued])
    doc = {
        **_public(_job_or_404(svc, job_id)),
        "requeued": done.requeued,
        "not_requeued": [
            {"index": n.index, "filename": name, "code": n.code, "reason": n.reason}
            for n, name in zip(done.not_requeued, names, strict=True)
        ],
    }
    return doc, 202 if done.requeued else 200


@bp.get("/jobs/<job_id>/results")
@c.contract(
    summary="Per-image results in upload order, streamed",
    query=d.ResultsQuery,
    responses={
        200: c.Response(
            "A page of rows: JSON (`ResultsPage`), JSON Lines (one `ResultRow` per line) or CSV "
            "(`filename,label,score,class_id,top_k,error`; a manifest job's `id` after `filename` "
            "and its pass-through columns at the end)",
            d.ResultsPage,
            alternatives={"application/x-ndjson": {"type": "string"}, "text/csv": {"type": "string"}},
        ),
        409: c.Response(
            "`results_in_output`: rows of a job written to its output prefix in parts are served "
            "from the parts' JSON Lines files, and one of those is missing from the bucket, cut "
            "short or not JSON Lines; `details` names the first row after that part and the prefix",
            d.ErrorDocument,
        ),
        **_JOB_ERRORS,
    },
    schema_refs=(d.ResultRow,),
    tags=("jobs",),
)
def get_results(job_id: str) -> Response:
    svc = services()
    params = c.query(d.ResultsQuery)
    job = _job_or_404(svc, job_id)
    # The first row is read now: a part that cannot be read is an error answer, not a cut stream.
    rows: Iterator[Row] = served.iter_rows(svc.store, svc.intake.s3, job_id, params.offset, params.limit)
    rows = itertools.chain(list(itertools.islice(rows, 1)), rows)
    if params.format == "csv":
        with_id, columns = job["passthrough"] or (False, ())
        body, mime = csv_lines(rows, with_id, columns), "text/csv"
    elif params.format == "jsonl":
        body, mime = jsonl_lines(rows), "application/x-ndjson"
    else:
        body, mime = _json_stream(job, params.offset, rows), "application/json"
    resp = Response(stream_with_context(body), mimetype=mime)
    if params.format == "csv":
        resp.headers["Content-Disposition"] = f'attachment; filename="{job_id}.csv"'
    return resp


def _json_stream(job: dict[str, Any], offset: int, rows: Iterator[Row]) -> Iterator[str]:
    head = {k: job[k] for k in ("job_id", "status", "total", "done", "failed", "canceled")}
    yield json.dumps(head)[:-1] + f', "offset": {offset}, "results": ['
    for n, row in enumerate(rows):
        yield ("," if n else "") + json.dumps(row.document())
    yield "]}"
