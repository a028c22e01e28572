"""Submitting images: the one use case behind every upload route.

Every file is checked from its header before anything is queued; a bad file becomes a
per-image error in the job, and the rest is processed. A request in which no file is usable
is refused whole. Accepted images are stored as blobs and queued by task name.
"""

from __future__ import annotations

import hashlib
import logging
import time
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import redis

from batchvision.core.allow_list import AllowList
from batchvision.core.errors import BatchvisionError, ImageTooLarge, InvalidImage, ServiceUnavailable
from batchvision.core.imaging import inspect_images
from batchvision.core.manifest import MAX_FILENAME_LENGTH, UrlEntry
from batchvision.core.model_refs import JobOptions, resolve_options
from batchvision.core.results import Failure, Passthrough, error_result
from batchvision.core.s3_scope import S3Scope
from batchvision.core.settings import Settings
from batchvision.server import failpoints
from batchvision.server.blobs import BlobStore
from batchvision.server.fetch import FetchError, url_blob, url_problem
from batchvision.server.idempotency import Claim, commit
from batchvision.server.keys import EXPORTS, LISTINGS, JobKeys
from batchvision.server.listing import read_page
from batchvision.server.messages import Chunk, split
from batchvision.server.outputs import output_fields
from batchvision.server.queue import Enqueuer
from batchvision.server.quotas import NO_HOLD, Hold, Quotas
from batchvision.server.recovery import confirm_part, ledger_add, ledger_failed, unconfirm_part
from batchvision.server.registry import ModelRegistry
from batchvision.server.routing import default_model
from batchvision.server.s3 import S3, S3Config, S3Error, S3Url, is_s3_url, shared
from batchvision.server.sources import IMAGE_SUFFIXES, listing_fields, too_many
from batchvision.server.store import JobStore
from batchvision.server.telemetry import Telemetry
from batchvision.server.webhooks import callback_fields

log = logging.getLogger(__name__)

#: Why a prefix job skips a key.
NOT_AN_IMAGE = "not an image file name (" + ", ".join(IMAGE_SUFFIXES) + ")"


class TooManyObjects(BatchvisionError):
    """A prefix with more images than ``BATCHVISION_MAX_OBJECTS_PER_JOB`` (``413``)."""

    status = 413
    code = "too_many_objects"


class OutputNotWritable(BatchvisionError):
    """The output prefix refused a test write (``422``); ``details`` has the S3 code."""

    status = 422
    code = "output_not_writable"


class S3NotAllowed(BatchvisionError):
    """An ``s3://`` location outside ``BATCHVISION_S3_ALLOW``, or the service's own (``403``)."""

    status = 403
    code = "s3_not_allowed"


def parse_field(url: str, field: str, scope: S3Scope, *, listed: bool = False) -> S3Url:
    """:meth:`S3Url.parse` of the body's ``field``, checked against ``scope`` (``listed``: a
    prefix whose objects are all read or written): a bad URL's ``422 bad_url`` and a location
    the job may not name (``403 s3_not_allowed``) name the field."""
    try:
        parsed = S3Url.parse(url)
    except S3Error as exc:
        raise S3Error(
            f"{field}: {exc.message}",
            code=exc.code,
            details=[{"in": "body", "field": field, "reason": exc.code}],
        ) from exc
    problem = scope.problem(parsed.bucket, parsed.folder.key if listed else parsed.key, listed=listed)
    if problem is not None:
        raise S3NotAllowed(
            f"{field}: {problem}", details=[{"in": "body", "field": field, "reason": S3NotAllowed.code}]
        )
    return parsed


def entry_problem(url: str, allow: AllowList, scope: S3Scope) -> BatchvisionError | None:
    """What the API can tell about an image URL without fetching it: an ``s3://`` URL's
    syntax and whether the job may name it (``scope``), or an ``http(s)://`` URL's
    (:func:`~batchvision.server.fetch.url_problem`)."""
    if is_s3_url(url):
        try:
            parsed = S3Url.parse(url)
        except S3Error as exc:
            return exc
        problem = scope.problem(parsed.bucket, parsed.key)
        return None if problem is None else S3NotAllowed(problem)
    # s3:// is named only where jobs may name a bucket (BATCHVISION_S3_ALLOW).
    schemes = "http, https and s3" if scope else "http and https"
    return url_problem(url, allow, "BATCHVISION_FETCH_ALLOW", schemes=schemes)


#: Where a job's status URL puts its id, in the template :meth:`Intake.callback` takes.
JOB_ID_SLOT = "{job_id}"


def new_job_id() -> str:
    """A random, unguessable job id."""
    return uuid.uuid4().hex


@dataclass(frozen=True)
class Upload:
    """One file of a request: ``key`` identifies it within the job (its relative path)."""

    key: str
    filename: str
    data: bytes
    #: Why the file is refused before its bytes are looked at (a name over the limit).
    refused: BatchvisionError | None = None


@dataclass(frozen=True)
class Rejection:
    """A file refused at upload (it still gets a result row: this error)."""

    index: int
    filename: str
    code: str
    message: str


@dataclass(frozen=True)
class Skipped:
    """An archive member that is not an image: listed, never classified."""

    filename: str
    reason: str


@dataclass(frozen=True)
class Submitted:
    """What one submit did to its job."""

    job_id: str
    #: New images queued for a result by this request.
    accepted: int
    #: Images handed to the queue (also re-sent files that never got a result).
    queued: int
    rejected: tuple[Rejection, ...] = ()
    #: Files the job already had (re-sent parts).
    duplicates: int = 0
    skipped: tuple[Skipped, ...] = ()

    @property
    def files(self) -> int:
        """The files of the request that now have a place in the job (accepted or refused)."""
        return self.accepted + len(self.rejected)


def unique_keys(raw: list[tuple[str, bytes]]) -> list[Upload]:
    # Within one request, two files may share a name (two 'image.jpg' from different
    # folders); they are different images, so they get distinct keys. Across requests the
    # same key means a re-sent file (idempotent bulk parts).
    used: set[str] = set()
    seen: Counter[str] = Counter()
    out = []
    for given, data in raw:
        name, refused = given, None
        if len(given) > MAX_FILENAME_LENGTH:
            # Stored twice per file for as long as the job lives, and counted by no quota: kept
            # short, and the file refused (its row names it by the name's beginning). The digest
            # keeps two long names apart across a job's parts (else one looks like a re-send).
            digest = hashlib.sha256(given.encode("utf-8", "surrogatepass")).hexdigest()[:16]
            name = f"{given[: MAX_FILENAME_LENGTH - 18]}…~{digest}"
            refused = InvalidImage(
                f"the file name is {len(given)} characters long; the limit is {MAX_FILENAME_LENGTH}",
                code="bad_filename",
            )
        key = name
        while key in used:
            seen[name] += 1
            key = f"{name}#{seen[name] + 1}"
        used.add(key)
        out.append(Upload(key, name, data, refused))
    return out


def check(s: Settings, uploads: list[Upload]) -> list[BatchvisionError | None]:
    """Validate each upload from its header (one pixel budget for the request); ``None`` where
    it is fine."""
    problems = inspect_images(
        [b"" if up.refused else up.data for up in uploads],
        max_bytes=s.max_image_bytes,
        max_pixels=s.max_image_pixels,
        max_frames=s.max_image_frames,
        max_total_pixels=s.max_request_pixels,
    )
    return [up.refused or problem for up, problem in zip(uploads, problems, strict=True)]


def rejection(up: Upload, err: BatchvisionError) -> dict[str, str]:
    """A refused file as it is listed in an error's details."""
    return {"filename": up.filename, "code": err.code, "message": err.message}


def skipped_members(skipped: Sequence[Mapping[str, str]]) -> tuple[Skipped, ...]:
    """Archive members skipped as not images (from :mod:`batchvision.core.archive`)."""
    return tuple(Skipped(s["filename"], s["reason"]) for s in skipped)


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


def ensure_nonempty(uploads: list[Upload], skipped: Sequence[Mapping[str, str]]) -> None:
    if not uploads:
        details = {"skipped": list(skipped)} if skipped else None
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
    #: The worker registry: the models a submit may name; ``None``: the default only.
    models: ModelRegistry | None = None

    def s3(self) -> S3:
        """The process' S3 client (``s3://`` sources, manifests and output prefixes)."""
        return shared(S3Config.from_settings(self.settings))

    # -- object storage: sources, manifests in buckets, output prefixes ---------------------------

    def output(self, url: str | None) -> dict[str, str] | None:
        """The job-hash fields of an ``output_url``, after a test write under it (an object
        ``.batchvision-write-check``, deleted again): ``422 output_not_writable`` naming the
        S3 code when the prefix cannot be written (bucket missing, access denied), so a job
        never runs to an output that cannot be stored; a throttled or unreachable store is
        ``503`` (:class:`~batchvision.server.s3.S3Error`, with ``Retry-After``)."""
        if url is None:
            return None
        prefix = parse_field(url, "output_url", self.settings.s3_scope(), listed=True).folder
        try:
            probe = prefix.child(".batchvision-write-check")
            self.s3().put(probe, b"", "text/plain")
            self.s3().delete([probe])
        except S3Error as exc:
            if exc.transient:  # the store is busy or down, not the prefix unwritable: 503, retry
                raise S3Error(
                    f"output_url {url[:200]!r} cannot be checked now: {exc.message}",
                    code=exc.code,
                    details=[{"in": "body", "field": "output_url", "reason": exc.code}],
                ) from exc
            raise OutputNotWritable(
                f"output_url {url[:200]!r} cannot be written: {exc.message}",
                details=[{"in": "body", "field": "output_url", "reason": exc.code}],
            ) from exc
        return output_fields(str(prefix))

    def read_manifest(self, url: str) -> bytes:
        """The bytes of a manifest stored at an ``s3://`` URL (at most 64 MiB); the errors of
        :class:`~batchvision.server.s3.S3Error` name the bucket or key."""
        return self.s3().get(
            parse_field(url, "manifest", self.settings.s3_scope()), max_bytes=64 * 1024 * 1024
        )

    def submit_prefix(
        self,
        owner: str,
        source: str,
        *,
        callback: Mapping[str, str] | None = None,
        output: Mapping[str, str] | None = None,
        options: JobOptions | None = None,
        claim: Claim | None = None,
    ) -> Submitted:
        """A new job of every image under an ``s3://bucket/prefix/`` (recursively; the key
        relative to the prefix is the filename). The request lists, stores and queues the first
        page (``BATCHVISION_LIST_PAGE_SIZE`` images); a prefix with more is listed on by the
        workers, a page at a time (:mod:`batchvision.server.listing`), and the job is sealed
        after its last page. A prefix within one page is a sealed job at once.

        Refused before any job exists: a bucket that does not exist, access denied
        (``S3Error``, 422; a throttled or unreachable store: 503), a first page without
        images and nothing after it (``422 no_images``), a first page past
        ``MAX_OBJECTS_PER_JOB`` (``413``). Later pages' failures cancel the job and say why in
        its ``listing``."""
        url = parse_field(source, "source", self.settings.s3_scope(), listed=True)
        page = read_page(self.s3(), url, "", self.settings.listing_page())
        skipped = tuple(Skipped(url.relative(key), NOT_AN_IMAGE) for key in page.skipped)
        if not page.images and not page.more:
            raise InvalidImage(
                f"no images under {url} ({page.skipped_count} other objects)",
                code="no_images",
                details=[{"filename": s.filename, "code": "skipped", "message": s.reason} for s in skipped],
            )
        if len(page.images) > self.settings.max_objects_per_job:
            raise TooManyObjects(too_many(str(url), self.settings.max_objects_per_job))
        parts = bool(output) and self.settings.output_part_rows > 0
        if parts:  # its results are written in parts while it runs (exports.py)
            output = {**(output or {}), "part_rows": str(self.settings.output_part_rows)}
        job_id = self.new_job(owner, callback, options, claim=claim, fields=output)
        try:
            accepted = self.add_listed(job_id, owner, url, page.images) if page.images else 0
            pipe: Any = self.redis.pipeline()
            pipe.hset(JobKeys.of(job_id).job, mapping=listing_fields(str(url), page))
            now_ms = int(time.time() * 1000)
            if page.more:  # the workers list the rest
                pipe.zadd(LISTINGS, {job_id: now_ms})
            if parts:  # and write its parts as they fill
                pipe.zadd(EXPORTS, {job_id: now_ms})
            pipe.execute()
            if not page.more:
                self.store.seal(job_id)
        except BaseException:
            self.store.cancel(job_id)
            if claim is not None:
                # The request fails: a retry with the same key must make a new job, not get
                # this canceled, partial one back as a replay.
                claim.release(self.redis, job_id)
            raise
        return Submitted(job_id, accepted, accepted, (), 0, skipped)

    def add_listed(self, job_id: str, owner: str, url: S3Url, keys: Sequence[str]) -> int:
        """Add the objects ``keys`` of the prefix ``url`` to the open job ``job_id`` of
        ``owner`` and queue them; returns how many were new to the job (a key it has is
        neither added nor queued twice). Raises as :meth:`backpressure` does when they do not
        fit the queue, ``PermissionError`` for a sealed or canceled job, ``LookupError`` for
        one that is gone."""
        uploads = [Upload(key, url.relative(key), url_blob(f"s3://{url.bucket}/{key}")) for key in keys]
        with self.backpressure(owner, len(uploads), sum(len(u.data) for u in uploads)) as held:
            return self._add(job_id, uploads, [None] * len(uploads), held=held).accepted

    def __post_init__(self) -> None:
        self.quotas = Quotas(self.redis, self.settings, self.telemetry, redis_blobs=self.blobs.pipelined)

    def backpressure(self, owner: str, images: int = 0, nbytes: int = 0) -> Hold:
        """Refuse new work when ``images`` images of ``nbytes`` bytes from ``owner`` do not fit
        the queue now (``429``, with ``Retry-After``) or ever (``413``); else hold them (a
        context manager) until the writes that count them: see
        :class:`~batchvision.server.quotas.Quotas`."""
        return self.quotas.admit(owner, images, nbytes)

    def options(
        self,
        model: str | None = None,
        top_k: int | None = None,
        min_score: float | None = None,
        *,
        priority: int | None = None,
        owner: str = "",
    ) -> JobOptions:
        """A job's options checked against the models the workers announced, and its
        ``priority`` against the range and ``owner``'s maximum
        (``BATCHVISION_MAX_PRIORITY``, ``BATCHVISION_KEY_MAX_PRIORITY``): a ``422`` names what
        is wrong (:class:`~batchvision.core.model_refs.InvalidOption`,
        :class:`~batchvision.core.priorities.PriorityNotAllowed`)."""
        return resolve_options(
            model=model,
            top_k=top_k,
            min_score=min_score,
            default_model=default_model(self.settings),
            default_top_k=self.settings.top_k,
            known=self.models.facts() if self.models is not None else {},
            priority=priority,
            max_priority=self.settings.max_priority_of(owner),
        )

    def new_job(
        self,
        owner: str,
        callback: Mapping[str, str] | None = None,
        options: JobOptions | None = None,
        *,
        claim: Claim | None = None,
        fields: Mapping[str, str] | None = None,
    ) -> str:
        """Open an empty job for ``owner``; raises ``TooManyRequests`` under backpressure.
        ``callback``: :meth:`callback` fields, written with the job; ``options``: :meth:`options`;
        ``claim``: the request's ``Idempotency-Key``, written with the job; ``fields``: more
        job-hash fields (an :meth:`output`'s)."""
        self.backpressure(owner)
        job_id = new_job_id()
        opts = options or self.options()

        def writes(pipe: Any) -> None:
            self._callback_on(pipe, job_id, {**(callback or {}), **(fields or {})})
            self.store.create(job_id, model=opts.model, owner=owner, pipe=pipe, options=opts.to_hash())

        commit(self.redis, claim, job_id, writes)
        return job_id

    # -- completion webhooks and images by URL -----------------------------------------------------

    def callback(self, url: str | None, status_url: str = "") -> dict[str, str] | None:
        """The job-hash fields of a ``callback_url`` (``status_url``: the API's status URL of
        the job, with :data:`JOB_ID_SLOT` where the id goes), checked by the fetch rules as far as they
        go without the network (syntax; an address literal against the address rules); the
        deliverer checks the resolved address at each attempt. ``FetchError`` (422
        ``bad_callback_url``) when refused."""
        if url is None:
            return None
        problem = url_problem(url, AllowList.parse(self.settings.webhook_allow), "BATCHVISION_WEBHOOK_ALLOW")
        if problem is not None:
            raise FetchError(
                f"callback_url: {problem.message}",
                code="bad_callback_url",
                details=[{"in": "body", "field": "callback_url", "reason": problem.code}],
            )
        return callback_fields(url, status_url or None)

    @staticmethod
    def _callback_on(pipe: Any, job_id: str, callback: Mapping[str, str] | None) -> None:
        # Before the job's own fields, in the same MULTI: HSET merges, and a job that finishes
        # within this MULTI (every file refused) already has its callback when the seal runs.
        if callback:
            fields = dict(callback)
            if "cb_status_url" in fields:
                fields["cb_status_url"] = fields["cb_status_url"].replace(JOB_ID_SLOT, job_id)
            pipe.hset(JobKeys.of(job_id).job, mapping=fields)

    def submit_urls(
        self,
        owner: str,
        entries: list[UrlEntry],
        *,
        callback: Mapping[str, str] | None = None,
        options: JobOptions | None = None,
        claim: Claim | None = None,
        output: Mapping[str, str] | None = None,
    ) -> Submitted:
        """A new, sealed job of images named by URL (``http(s)://`` or ``s3://``): the same
        single MULTI as an upload, where an image's blob is its URL (``BV-URL\\n<url>``) and
        the worker fetches it. A URL the API can already refuse (syntax, a blocked address
        literal) is a per-image error; a request in which every URL is refused gets 422. What
        entries pass through (ids, columns) and the ``output`` fields are written with the job."""
        allow = AllowList.parse(self.settings.fetch_allow)
        uploads = unique_keys([(e.name, url_blob(e.url)) for e in entries])
        scope = self.settings.s3_scope()
        problems: list[BatchvisionError | None] = [entry_problem(e.url, allow, scope) for e in entries]
        passed = [(i, Passthrough(e.id, e.columns)) for i, e in enumerate(entries) if e.passthrough]
        columns = list(dict.fromkeys(name for e in entries for name, _ in e.columns))
        if uploads and all(p is not None for p in problems):
            details = [rejection(u, p) for u, p in zip(uploads, problems, strict=True) if p]
            raise InvalidImage(
                f"none of the {len(uploads)} URLs can be fetched", code="no_valid_urls", details=details
            )
        interactive = len(uploads) <= self.settings.interactive_max_images

        def more(pipe: Any, job_id: str) -> None:
            self.store.passthrough_on(pipe, job_id, passed, columns)

        fields = {**(callback or {}), **(output or {})}
        with self.backpressure(owner, len(uploads), sum(len(u.data) for u in uploads)) as held:
            return self._create(
                owner, uploads, problems, True, interactive, fields, options, claim, more, held=held
            )

    def submit(
        self,
        job_id: str | None,
        owner: str,
        uploads: list[Upload],
        skipped: Sequence[Mapping[str, str]],
        *,
        seal: bool,
        interactive: bool = False,
        callback: Mapping[str, str] | None = None,
        options: JobOptions | None = None,
        claim: Claim | None = None,
        reply_to: str | None = None,
    ) -> Submitted:
        """Validate ``uploads`` and add them to ``job_id`` (a new job if ``None``, with the
        ``callback`` fields of :meth:`callback` and the ``options`` of :meth:`options` if given;
        ``claim``: the request's ``Idempotency-Key``, written with the new job; ``reply_to``:
        the channel of the waiter of a request that answers with the new job's rows). A new job
        none of whose files is usable is refused whole (:func:`require_some_valid`); a part of an
        open job records each unusable file as its row's error instead.

        Raises ``LookupError`` for an unknown job and ``PermissionError`` for a sealed or
        canceled one.
        """
        ensure_nonempty(uploads, skipped)
        problems = check(self.settings, uploads)
        if job_id is None:
            # A part of an open job is never refused for its files: each bad one becomes its
            # row's error, so a folder upload whose last part holds one broken image still
            # ends, and its re-send (a resumed upload) finds the files already there.
            require_some_valid(uploads, problems)
        valid = [u for u, p in zip(uploads, problems, strict=True) if p is None]
        # A part of only bad files queues nothing: never a 429 (a new job has some).
        held = self.backpressure(owner, len(valid), sum(len(u.data) for u in valid)) if valid else NO_HOLD
        # A small job sent whole is someone waiting: it goes ahead of bulk work. A large one
        # waits its turn among bulk work even when its client waits (POST /v1/classify): the
        # interactive lane is served first, and must not be a way around everyone's queue.
        interactive = (interactive or seal) and len(uploads) <= self.settings.interactive_max_images
        with held:
            if job_id is None:
                done = self._create(
                    owner,
                    uploads,
                    problems,
                    seal,
                    interactive,
                    callback,
                    options,
                    claim,
                    held=held,
                    reply_to=reply_to,
                )
            else:
                done = self._add(job_id, uploads, problems, interactive, held=held)
        if job_id is not None and seal:
            self.store.seal(job_id)
        return Submitted(
            done.job_id, done.accepted, done.queued, done.rejected, done.duplicates, skipped_members(skipped)
        )

    def _create(
        self,
        owner: str,
        uploads: list[Upload],
        problems: list[BatchvisionError | None],
        seal: bool,
        interactive: bool,
        callback: Mapping[str, str] | None = None,
        options: JobOptions | None = None,
        claim: Claim | None = None,
        more: Callable[[Any, str], None] | None = None,
        *,
        held: Hold = NO_HOLD,
        reply_to: str | None = None,
    ) -> Submitted:
        """A new job with all its files: job, files, blobs, refusals, seal, chunk ledger (and
        the ``Idempotency-Key``'s job) in one ``MULTI`` round trip, then the messages. (Keys are
        unique within a request, so file ``i`` is index ``i``.) ``more(pipe, job_id)``: more
        writes of the same ``MULTI``, before the job's own; ``held``: the admission's hold,
        removed by the same ``MULTI`` that counts the images; ``reply_to``: as for :meth:`submit`."""
        job_id = new_job_id()
        blobs: dict[int, bytes] = {}
        errors: list[tuple[int, Failure]] = []
        rejected: list[Rejection] = []
        for index, (up, err) in enumerate(zip(uploads, problems, strict=True)):
            if err is None:
                blobs[index] = up.data
            else:
                errors.append((index, error_result(err.code, err.message)))
                rejected.append(Rejection(index, up.filename, err.code, err.message))
        chunks = split(job_id, sorted(blobs), self.settings.chunk_size)
        now = round(time.time(), 3)
        opts = options or self.options()
        if not self.blobs.pipelined:  # files on a volume: written before the job that names them
            self.blobs.put_many(job_id, blobs)

        def writes(pipe: Any) -> None:
            self._callback_on(pipe, job_id, callback)
            if more is not None:
                more(pipe, job_id)
            if self.blobs.pipelined:
                self.blobs.put_many(job_id, blobs, pipe=pipe)
            self.store.create_whole(
                pipe,
                job_id,
                model=opts.model,
                owner=owner,
                files=[(u.key, u.filename) for u in uploads],
                errors=errors,
                seal=seal,
                options=opts.to_hash(),
                sizes=[len(blobs[i]) if i in blobs else 0 for i in range(len(uploads))],
                reply_to=reply_to,
            )
            ledger_add(pipe, chunks, now)
            held.release_on(pipe)

        try:
            commit(self.redis, claim, job_id, writes)
            held.released()
        except BaseException:
            if not self.blobs.pipelined:
                self._drop_uploads_of_no_job(job_id, sorted(blobs))
            raise
        failpoints.after_store()
        self.send(chunks, now, interactive, model=opts.model, priority=opts.priority)
        return Submitted(job_id, len(blobs), len(blobs), tuple(rejected))

    def send(
        self, chunks: Sequence[Chunk], now: float, interactive: bool, *, model: str | None, priority: int
    ) -> None:
        """Publish ``chunks`` (stored, and in the ledger). When the publish fails (the broker
        down or slow, the request answered ``503``), they are marked failed, so that a worker
        sends them after a pause: otherwise only the sweep would, once their model's queues are
        empty, and until then their images held their owner's quota and the queue's budget."""
        try:
            self.enqueuer.send(chunks, now, interactive, model=model, priority=priority)
        except Exception as exc:
            try:
                ledger_failed(self.redis, chunks)
            except Exception:  # noqa: BLE001 - Redis away too: the sweep is left
                log.warning("could not mark %d unpublished chunks for a resend", len(chunks), exc_info=True)
                raise exc from None
            # Stored, and queued later: the caller learns which job, so that it need not make
            # another (without an Idempotency-Key a retry would).
            job_id = chunks[0].job_id
            raise ServiceUnavailable(
                f"the broker did not take the images ({exc}): job {job_id} is stored and a worker "
                "queues them once the broker is back; GET its status_url, or send the request again "
                "with the same Idempotency-Key to get it",
                details=[{"job_id": job_id, "status_url": f"/v1/jobs/{job_id}"}],
            ) from exc

    def _drop_uploads_of_no_job(self, job_id: str, indexes: Sequence[int]) -> None:
        """Delete the uploads written to a volume or bucket for a job whose ``MULTI`` failed,
        unless the job exists after all (its reply was lost, not its writes): nothing would
        ever delete them."""
        try:
            if not self.store.exists(job_id):
                self.blobs.delete_many(job_id, indexes)
        except Exception:  # noqa: BLE001 - Redis or the store away: the request fails as it was
            log.warning("could not delete the uploads of job %s, which was not stored", job_id, exc_info=True)

    def _add(
        self,
        job_id: str,
        uploads: list[Upload],
        problems: list[BatchvisionError | None],
        interactive: bool = False,
        *,
        held: Hold = NO_HOLD,
    ) -> Submitted:
        """Add uploads to a job: store blobs, record rejections, enqueue the rest by task name.
        ``held``: the admission's hold, removed once the job counts the new images."""
        sizes = [len(u.data) if p is None else 0 for u, p in zip(uploads, problems, strict=True)]
        # Unconfirmed until the refusals and ledger entries below are written: a request that
        # fails before leaves its new images to a worker's recover_parts, not without a result.
        indexed = self.store.add_files(
            job_id, [(u.key, u.filename) for u in uploads], sizes, unconfirmed=True
        )
        held.release()  # the script counted the new images: the hold would count them twice
        # A file the job already has but that never got a result may be the victim of a request
        # that failed half-way (before its blob was stored): store and queue it again. One whose
        # upload is stored is on its way (its chunk was recorded first): not queued twice.
        known = [index for index, new in indexed if not new]
        unresolved = self.store.unresolved(job_id, known)
        sizes_now = self.blobs.sizes(job_id, unresolved) if unresolved else []
        redo = {i for i, size in zip(unresolved, sizes_now, strict=True) if size == 0}
        blobs: dict[int, bytes] = {}
        errors: list[tuple[int, Failure]] = []
        rejected: list[Rejection] = []
        duplicates = 0
        for (index, new), up, err in zip(indexed, uploads, problems, strict=True):
            if not new:
                duplicates += 1
                if index in redo and err is None:
                    blobs[index] = up.data
                elif index in redo and err is not None:  # its error row lost with the failed request
                    errors.append((index, error_result(err.code, err.message)))
            elif err is not None:
                errors.append((index, error_result(err.code, err.message)))
                rejected.append(Rejection(index, up.filename, err.code, err.message))
            else:
                blobs[index] = up.data
        # The refusals and the ledger entries first, the blobs after: a part that fails half-way
        # (Redis full as the blobs arrive, a killed process) leaves no image without a way to a
        # result. Its re-send stores and queues them; without one, the sweeper re-sends the
        # chunks and each image whose upload never arrived ends as `upload_expired`.
        self.store.record(job_id, errors)
        chunks = split(job_id, sorted(blobs), self.settings.chunk_size)
        now = round(time.time(), 3)
        added = [index for index, is_new in indexed if is_new]
        if chunks or added:
            pipe = self.redis.pipeline()  # MULTI: the ledger entries and the confirmation together
            ledger_add(pipe, chunks, now)
            confirm_part(pipe, job_id, added)
            pipe.execute()
        try:
            self.blobs.put_many(job_id, blobs)
        except Exception:
            # A store that took some of them (a bucket's PUTs one by one) and nothing sent: a
            # re-send of the part would find those stored and take them for images on their
            # way. As an unconfirmed part they are sent once the job is sealed.
            try:
                pipe = self.redis.pipeline()
                unconfirm_part(pipe, job_id, sorted(blobs), chunks)
                pipe.execute()
            except Exception:  # noqa: BLE001 - Redis away too: the sweep sends the chunks later
                log.warning("could not mark a failed part of %s for recovery; the sweep will", job_id)
            raise
        if chunks:
            routing = self.store.routing_of(job_id)
            self.send(chunks, now, interactive, model=routing.model, priority=routing.priority)
        return Submitted(
            job_id, len(blobs) - len(redo & blobs.keys()), len(blobs), tuple(rejected), duplicates
        )
