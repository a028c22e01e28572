"""Turn an HTTP request into uploads: multipart files, a zip archive, or a raw image body.

What happens to the uploads (checks, blobs, queueing) is :mod:`batchvision.server.intake`.
"""

from __future__ import annotations

import threading
import time
from io import BytesIO
from typing import IO, Any

from flask import Flask, Request, current_app, request

from batchvision.core import manifest
from batchvision.core.archive import ArchiveContents, read_zip
from batchvision.core.errors import BadRequest, ServiceUnavailable, UnsupportedMediaType
from batchvision.core.manifest import scan_json
from batchvision.core.settings import Settings
from batchvision.server.intake import Upload, unique_keys


class UploadRequest(Request):
    """Keeps multipart file parts in memory: werkzeug would write every part of a large
    request to a temporary file, only for us to read it back and store it in Redis. The
    request size is bounded by ``MAX_CONTENT_LENGTH``."""

    def _get_file_stream(
        self,
        total_content_length: int | None,
        content_type: str | None,
        filename: str | None = None,
        content_length: int | None = None,
    ) -> IO[bytes]:
        return BytesIO()

    def get_json(self, force: bool = False, silent: bool = False, cache: bool = True) -> Any | None:
        """The JSON body, scanned before it is parsed (:func:`~batchvision.core.manifest.scan_json`):
        a body nested too deep is a ``400``, and a body over the URL limit a ``413``, before
        the parser's recursion or its objects are reached."""
        if (force or self.is_json) and self._cached_json[silent] is Ellipsis:
            settings: Settings = current_app.extensions["batchvision"].settings
            scan_json(self.get_data(cache=cache), max_entries=settings.max_urls_per_job)
        return super().get_json(force=force, silent=silent, cache=cache)

    def release_body(self) -> None:
        """Drop the body and everything parsed from it, for a request that goes on waiting
        (``POST /v1/classify``): what it waits for is in Redis, not in its memory."""
        for part in self.__dict__.get("files", {}).values():
            part.close()
        for cached in ("files", "form", "values", "_cached_data"):
            self.__dict__.pop(cached, None)
        self._cached_json = (Ellipsis, Ellipsis)
        if self.environ.get(_TAKEN):  # the expanded members went with the body
            archive_memory().give_back(self.environ)


#: Where a request notes the archive bytes it holds (its own WSGI environ: one per request).
_TAKEN = "batchvision.archive_bytes"


class ArchiveMemory:
    """The bytes of zip members this API process holds expanded at once, at most ``limit``
    (``BATCHVISION_ARCHIVE_MEMORY_BYTES``): a few small archives that expand a hundredfold
    would otherwise take the process' memory together. An archive waits up to ``wait_s`` for
    room, then is refused for the moment (``503 archives_busy`` with ``Retry-After``); what a
    request took is given back when it ends."""

    def __init__(self, limit: int, wait_s: float = 10.0) -> None:
        self.limit = limit
        self.wait_s = wait_s
        self.used = 0
        self._cond = threading.Condition()

    def take(self, n: int) -> None:
        """Hold ``n`` bytes for the current request (given back by :meth:`give_back`)."""
        deadline = time.monotonic() + self.wait_s
        with self._cond:
            while self.used + n > self.limit:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise ServiceUnavailable(
                        f"this API process is expanding other zip archives ({self.used} of "
                        f"BATCHVISION_ARCHIVE_MEMORY_BYTES={self.limit} bytes in use; this one "
                        f"needs {n}): send it again shortly",
                        code="archives_busy",
                    )
                self._cond.wait(left)
            self.used += n
        request.environ[_TAKEN] = request.environ.get(_TAKEN, 0) + n

    def give_back(self, environ: dict[str, Any]) -> None:
        """Give back what the request of ``environ`` took."""
        n = environ.pop(_TAKEN, 0)
        if n:
            with self._cond:
                self.used -= n
                self._cond.notify_all()

    def init_app(self, app: Flask) -> None:
        app.extensions["batchvision.archives"] = self
        app.teardown_request(lambda _exc: self.give_back(request.environ))


def archive_memory() -> ArchiveMemory:
    """The current app's :class:`ArchiveMemory`."""
    memory: ArchiveMemory = current_app.extensions["batchvision.archives"]
    return memory


#: The Content-Types of a raw zip body.
_ZIP_TYPES = ("application/zip", "application/x-zip-compressed")


def read_uploads(
    request: Request, settings: Settings, filename: str | None = None, adding: bool = False
) -> tuple[list[Upload], list[dict[str, str]]]:
    """Files of a request, and archive members skipped as not images.

    Accepts a multipart form (parts named ``files``, or a zip in a part named ``archive``),
    a raw ``image/*`` body, or a raw ``application/zip`` body.
    """
    ctype = request.mimetype or ""
    skipped: list[dict[str, str]] = []
    if filename is not None and ctype in ("multipart/form-data", *_ZIP_TYPES):
        # Silently ignored, the name a client meant for its file would be lost.
        raise BadRequest(
            f"query parameter 'filename' names a raw image body; a {ctype} body's files carry "
            "their own names (each part's filename, each archive member's path)",
            code="bad_parameter",
            details=[{"in": "query parameter", "field": "filename", "value": filename[:300]}],
        )
    if ctype == "multipart/form-data":
        unknown = sorted((set(request.files) | set(request.form)) - {"files", "archive"})
        if unknown:
            raise BadRequest(
                f"multipart part {unknown[0]!r} is not allowed: send file parts named 'files' "
                "(and at most one 'archive')",
                code="bad_body",
                details=[{"in": "body", "field": part} for part in unknown],
            )
        if request.form:
            field = next(iter(request.form))
            raise BadRequest(
                f"multipart part {field!r} must be a file (with a filename), not a text field",
                code="bad_body",
                details=[{"in": "body", "field": field}],
            )
        parts = request.files.getlist("files")
        archives = request.files.getlist("archive")
        if not parts and not archives:
            # werkzeug drops a whole form it cannot read (a part header that is not UTF-8, a
            # boundary that does not match): a body with bytes in it says so.
            why = " it can read (part headers, file names among them, must be UTF-8)"
            why = why if request.content_length else ""
            raise BadRequest(
                f"multipart upload has no parts named 'files' or 'archive'{why}", code="no_files"
            )
        if len(parts) > settings.max_files_per_request:
            raise BadRequest(
                f"{len(parts)} files in one request; the limit is {settings.max_files_per_request}",
                code="too_many_files",
            )
        nameless = [n for n, p in enumerate(parts) if not p.filename]
        if adding and nameless:
            # As for a raw image: in a job built from parts the name is the file's identity,
            # and every nameless part would be `file0`, a re-send of the last one.
            raise BadRequest(
                f"the 'files' part at index {nameless[0]} has no filename: a file added to a job "
                "needs one (its relative path)",
                code="filename_required",
                details=[{"in": "body", "field": "files", "index": n} for n in nameless],
            )
        raw = [(p.filename or f"file{n}", p.read()) for n, p in enumerate(parts)]
        if len(archives) > 1:
            # One archive per request: each is expanded in memory up to the archive budget.
            raise BadRequest("send one 'archive' part per request", code="too_many_archives")
        for arc in archives:
            contents = _unzip(arc.read(), settings)
            raw += contents.images
            skipped += contents.skipped
    elif ctype in _ZIP_TYPES:
        contents = _unzip(request.get_data(), settings)
        raw, skipped = contents.images, contents.skipped
    elif ctype.startswith("image/") or ctype == "application/octet-stream":
        name = filename
        if adding and not name:
            # In a job built from parts the name is the file's identity: without one, every
            # raw part would look like a re-send of the first.
            raise BadRequest(
                "a raw image added to a job needs ?filename=<relative path>", code="filename_required"
            )
        raw = [(name or "image", request.get_data())]
    else:
        # A JSON body or a manifest here is an URL job sent to a route that takes uploads only.
        by_url = ctype == "application/json" or ctype in manifest.MEDIA_TYPES
        raise UnsupportedMediaType(
            f"unsupported Content-Type {ctype or '(none)'!r}: send multipart/form-data with "
            "'files' parts (or an 'archive' part), a raw image/* or application/octet-stream "
            "body, or an application/zip (application/x-zip-compressed) body"
            + ("; images by URL (a JSON body or a manifest) go to POST /v1/jobs" if by_url else "")
        )
    return unique_keys(raw), skipped


def _unzip(data: bytes, settings: Settings) -> ArchiveContents:
    return read_zip(
        data,
        max_members=settings.max_archive_members,
        max_total_bytes=settings.max_archive_bytes,
        max_ratio=settings.max_compression_ratio,
        max_pixels=settings.max_image_pixels,
        max_total_pixels=settings.max_archive_pixels,
        reserve=archive_memory().take,
    )
