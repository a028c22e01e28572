"""Submitting images: the one use case behind every upload route.

Every file is checked from its header before anything is queued; a bad file becomes a
per-image error in the job, and the rest is processed. A request in which no file is usable
is refused whole. Accepted images are stored as blobs and queued by task name.
"""

from __future__ import annotations

import time
import uuid
from collections import Counter
from dataclasses import dataclass
from typing import Any

import redis

from batchvision.core.errors import BatchvisionError, ImageTooLarge, InvalidImage, TooManyRequests
from batchvision.core.imaging import inspect_image
from batchvision.core.schemas import error_result
from batchvision.core.settings import Settings
from batchvision.server.blobs import BlobStore
from batchvision.server.queue import Enqueuer, chunked
from batchvision.server.recovery import ledger_add
from batchvision.server.store import JobStore
from batchvision.server.telemetry import Telemetry


def new_job_id() -> str:
    """A random, unguessable job id."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Upload:
    """One file of a request: ``key`` identifies it within the job (its relative path)."""

    key: str
    filename: str
    data: bytes


def unique_keys(raw: list[tuple[str, bytes]]) -> list[Upload]:
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


def check(s: Settings, uploads: list[Upload]) -> list[BatchvisionError | None]:
    """Validate each upload from its header; ``None`` where it is fine."""
    out: list[BatchvisionError | None] = []
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


def ensure_nonempty(uploads: list[Upload], skipped: list[dict[str, str]]) -> None:
    if not uploads:
        details = {"skipped": skipped} if skipped else None
        raise InvalidImage("the request holds no image files", code="no_images", details=details)


@dataclass
class Intake:
    """Creates jobs and adds uploads to them (shared by every submit route)."""

    settings: Settings
    redis: redis.Redis
    store: JobStore
    blobs: BlobStore
    telemetry: Telemetry
    enqueuer: Enqueuer

    def backpressure(self) -> None:
        """Refuse new work (429) while too many accepted images wait for a result."""
        limit = self.settings.max_queued_images
        if limit and self.telemetry.pending_images() >= limit:
            raise TooManyRequests(f"{limit} images are already waiting; retry later", code="queue_full")

    def new_job(self, owner: str) -> str:
        """Open an empty job for ``owner``; raises ``TooManyRequests`` under backpressure."""
        self.backpressure()
        job_id = new_job_id()
        self.store.create(job_id, model=self.settings.model, owner=owner)
        return job_id

    def submit(
        self,
        job_id: str | None,
        owner: str,
        uploads: list[Upload],
        skipped: list[dict[str, str]],
        *,
        seal: bool,
        interactive: bool = False,
    ) -> tuple[str, dict[str, Any]]:
        """Validate ``uploads`` and add them to ``job_id`` (a new job if ``None``).

        Returns the job id and a summary: ``accepted``, ``queued``, ``rejected``,
        ``duplicates``, ``skipped``. Raises ``LookupError`` for an unknown job and
        ``PermissionError`` for a sealed or canceled one.
        """
        ensure_nonempty(uploads, skipped)
        problems = check(self.settings, uploads)
        require_some_valid(uploads, problems)
        self.backpressure()
        # A small job sent whole is someone waiting: it goes ahead of bulk work.
        interactive = interactive or (seal and len(uploads) <= self.settings.interactive_max_images)
        if job_id is None:
            job_id, summary = self._create(owner, uploads, problems, seal, interactive)
        else:
            summary = self._add(job_id, uploads, problems, interactive)
            if seal:
                self.store.seal(job_id)
        summary["skipped"] = skipped
        return job_id, summary

    def _create(
        self,
        owner: str,
        uploads: list[Upload],
        problems: list[BatchvisionError | None],
        seal: bool,
        interactive: bool,
    ) -> tuple[str, dict[str, Any]]:
        """A new job with all its files: job, files, blobs, refusals, seal and chunk ledger in
        one ``MULTI`` round trip, then the messages. (Keys are unique within a request, so
        file ``i`` is index ``i``.)"""
        job_id = new_job_id()
        blobs: dict[int, bytes] = {}
        errors: list[tuple[int, dict[str, Any]]] = []
        rejected: list[dict[str, Any]] = []
        for index, (up, err) in enumerate(zip(uploads, problems, strict=True)):
            if err is None:
                blobs[index] = up.data
            else:
                errors.append((index, error_result(err.code, err.message)))
                rejected.append({"index": index, **rejection(up, err)})
        chunks = [(job_id, c) for c in chunked(sorted(blobs), self.settings.chunk_size)]
        now = round(time.time(), 3)
        pipe = self.redis.pipeline(transaction=True)
        self.blobs.put_many(job_id, blobs, pipe=pipe)
        self.store.create_whole(
            pipe,
            job_id,
            model=self.settings.model,
            owner=owner,
            files=[(u.key, u.filename) for u in uploads],
            errors=errors,
            seal=seal,
        )
        ledger_add(pipe, chunks, now)
        pipe.execute()
        self.enqueuer.send(chunks, now, interactive)
        return job_id, {"accepted": len(blobs), "queued": len(blobs), "rejected": rejected, "duplicates": 0}

    def _add(
        self,
        job_id: str,
        uploads: list[Upload],
        problems: list[BatchvisionError | None],
        interactive: bool = False,
    ) -> dict[str, Any]:
        """Add uploads to a job: store blobs, record rejections, enqueue the rest by task name."""
        indexed = self.store.add_files(job_id, [(u.key, u.filename) for u in uploads])
        # A file the job already has but that never got a result may be the victim of a request
        # that failed half-way (before its blob or task was stored): store and queue it again.
        # Results are idempotent, so at worst an in-flight image is classified twice, counted once.
        known = [index for index, new in indexed if not new]
        redo = set(self.store.unresolved(job_id, known))
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
        self.blobs.put_many(job_id, blobs)
        self.store.record(job_id, errors)
        chunks = [(job_id, c) for c in chunked(sorted(blobs), self.settings.chunk_size)]
        if chunks:
            now = round(time.time(), 3)
            pipe = self.redis.pipeline(transaction=False)
            ledger_add(pipe, chunks, now)
            pipe.execute()
            self.enqueuer.send(chunks, now, interactive)
        return {
            "accepted": len(blobs) - len(redo & blobs.keys()),
            "queued": len(blobs),
            "rejected": rejected,
            "duplicates": duplicates,
        }
