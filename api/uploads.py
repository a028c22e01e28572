"""Turn a request into uploads and uploads into queued images.

Every file is checked from its header before anything is queued; a bad file becomes a
per-image error in the job, and the rest is processed.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Any

from flask import Request

from api.metrics import IMAGES_ACCEPTED, IMAGES_REJECTED
from api.services import Services
from batchvision.archive import ArchiveContents, read_zip
from batchvision.errors import BadRequest, BatchvisionError, ImageTooLarge, InvalidImage
from batchvision.imaging import inspect_image
from batchvision.queue import enqueue
from batchvision.schemas import error_result
from batchvision.settings import Settings


@dataclass(frozen=True)
class Upload:
    """One file of a request: ``key`` identifies it within the job (its relative path)."""

    key: str
    filename: str
    data: bytes


def read_uploads(
    request: Request, settings: Settings, adding: bool = False
) -> tuple[list[Upload], list[dict[str, str]]]:
    """Files of a request, and archive members skipped as not images.

    Accepts a multipart form (parts named ``files``, or a zip in a part named ``archive``),
    a raw ``image/*`` body, or a raw ``application/zip`` body.
    """
    ctype = request.mimetype or ""
    skipped: list[dict[str, str]] = []
    if ctype == "multipart/form-data":
        parts = request.files.getlist("files")
        archives = request.files.getlist("archive")
        if not parts and not archives:
            raise BadRequest("multipart upload has no parts named 'files' or 'archive'", code="no_files")
        if len(parts) > settings.max_files_per_request:
            raise BadRequest(
                f"{len(parts)} files in one request; the limit is {settings.max_files_per_request}",
                code="too_many_files",
            )
        raw = [(p.filename or f"file{n}", p.read()) for n, p in enumerate(parts)]
        if len(archives) > 1:
            # One archive per request: each is expanded in memory up to the archive budget.
            raise BadRequest("send one 'archive' part per request", code="too_many_archives")
        for arc in archives:
            contents = _unzip(arc.read(), settings)
            raw += contents.images
            skipped += contents.skipped
    elif ctype in ("application/zip", "application/x-zip-compressed"):
        contents = _unzip(request.get_data(), settings)
        raw, skipped = contents.images, contents.skipped
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        name = request.args.get("filename")
        if adding and not name:
            # In a job built from parts the name is the file's identity: without one, every
            # raw part would look like a re-send of the first.
            raise BadRequest(
                "a raw image added to a job needs ?filename=<relative path>", code="filename_required"
            )
        raw = [(name or "image", request.get_data())]
    else:
        raise BadRequest(
            f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data with "
            "'files' parts or a raw image/* body",
            code="unsupported_media_type",
        )
    return _unique_keys(raw), skipped


def _unzip(data: bytes, settings: Settings) -> ArchiveContents:
    return read_zip(
        data,
        max_members=settings.max_archive_members,
        max_total_bytes=settings.max_archive_bytes,
        max_ratio=settings.max_compression_ratio,
    )


def _unique_keys(raw: list[tuple[str, bytes]]) -> list[Upload]:
    # Within one request, two files may share a name (two 'image.jpg' from different
    # folders); they are different images, so they get distinct keys. Across requests the
    # same key means a re-sent file (idempotent bulk parts).
    used: set[str] = set()
    seen: Counter[str] = Counter()
    out = []
    for name, data in raw:
        key = name
        while key in used:
            seen[name] += 1
            key = f"{name}#{seen[name] + 1}"
        used.add(key)
        out.append(Upload(key, name, data))
    return out


def check(svc: Services, uploads: list[Upload]) -> list[BatchvisionError | None]:
    """Validate each upload from its header; ``None`` where it is fine."""
    out: list[BatchvisionError | None] = []
    s = svc.settings
    for up in uploads:
        try:
            inspect_image(up.data, max_bytes=s.max_image_bytes, max_pixels=s.max_image_pixels)
            out.append(None)
        except BatchvisionError as exc:
            out.append(exc)
    return out


def rejection(up: Upload, err: BatchvisionError) -> dict[str, Any]:
    return {"filename": up.filename, "code": err.code, "message": err.message}


def require_some_valid(uploads: list[Upload], problems: list[BatchvisionError | None]) -> None:
    """A request in which no file is usable is refused whole, saying why for each file:
    413 if every file was over a limit, else 422."""
    if not uploads or any(p is None for p in problems):
        return
    details = [rejection(u, p) for u, p in zip(uploads, problems, strict=True) if p]
    message = f"none of the {len(uploads)} files is an image we can classify"
    if all(isinstance(p, ImageTooLarge) for p in problems):
        raise ImageTooLarge(message, code="no_valid_images", details=details)
    raise InvalidImage(message, code="no_valid_images", details=details)


def ingest(
    svc: Services,
    job_id: str,
    uploads: list[Upload],
    problems: list[BatchvisionError | None],
    interactive: bool = False,
) -> dict[str, Any]:
    """Add uploads to a job: store blobs, record rejections, enqueue the rest by task name."""
    indexed = svc.store.add_files(job_id, [(u.key, u.filename) for u in uploads])
    # A file the job already has but that never got a result may be the victim of a request
    # that failed half-way (before its blob or task was stored): store and queue it again.
    # Results are idempotent, so at worst an in-flight image is classified twice, counted once.
    known = [index for index, new in indexed if not new]
    redo = set(svc.store.unresolved(job_id, known))
    blobs: dict[int, bytes] = {}
    errors: list[tuple[int, dict[str, Any]]] = []
    rejected: list[dict[str, Any]] = []
    duplicates = 0
    for (index, new), up, err in zip(indexed, uploads, problems, strict=True):
        if not new:
            duplicates += 1
            if index in redo and err is None:
                blobs[index] = up.data
        elif err is not None:
            errors.append((index, error_result(err.code, err.message)))
            rejected.append({"index": index, **rejection(up, err)})
        else:
            blobs[index] = up.data
    svc.blobs.put_many(job_id, blobs)
    svc.store.record(job_id, errors)
    enqueue(svc.celery, svc.settings, svc.redis, job_id, sorted(blobs), interactive)
    IMAGES_ACCEPTED.inc(len(blobs))
    for item in rejected:
        IMAGES_REJECTED.labels(item["code"]).inc()
    return {"accepted": len(blobs) - len(redo & blobs.keys()), "rejected": rejected, "duplicates": duplicates}


def ensure_nonempty(uploads: list[Upload], skipped: list[dict[str, str]]) -> None:
    if not uploads:
        details = {"skipped": skipped} if skipped else None
        raise InvalidImage("the request holds no image files", code="no_images", details=details)
