"""Bulk folder uploads: walk a tree, upload in bounded parts to one job, resume, retry.

Classification starts as soon as the first part lands; re-sending a part is idempotent on the
service side (files are keyed by relative path), so retries and resumes never duplicate. Every
request is retried by the client's one policy (:mod:`batchvision.client.retry`).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from batchvision.client.errors import ApiError, NoImages
from batchvision.core.documents import FileList, Job, JobAccepted, Rejection
from batchvision.core.sniff import looks_like_image, named_as_image


class PartUploader(Protocol):
    """The calls :func:`submit_folder` makes (:class:`~batchvision.client.http.Client` has
    them): described here so that this module does not depend on the HTTP client, which
    calls into it."""

    def open_job(
        self, expected: int | None = None, callback_url: str | None = None, **options: Any
    ) -> JobAccepted:
        """Open a job for an upload in parts."""
        ...

    def files(self, job_id: str) -> FileList:
        """Relative paths the service already has for ``job_id``."""
        ...

    def add_part(self, job_id: str, files: list[tuple[str, bytes]]) -> JobAccepted:
        """Upload one part."""
        ...

    def seal(self, job_id: str) -> Job:
        """The upload is complete."""
        ...


@dataclass(frozen=True)
class FolderUpload:
    """What :func:`submit_folder` did: the job, and what was sent, skipped and refused."""

    job_id: str
    images: int  #: image files found
    sent: int  #: files uploaded by this call (a resumed job had the others)
    skipped: list[str]  #: files that are not images (relative paths), never sent
    rejected: list[Rejection]  #: images the API refused (each also has an error row)
    sealed: Job | None = None  #: the job as the seal answered (its progress by then)


@dataclass
class Scan:
    """Image files of a folder tree (relative POSIX path, absolute path), and the rest."""

    images: list[tuple[str, Path]] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


#: What a multipart file name loses on the way (werkzeug drops a backslash, decodes ``%22``
#: and escapes control characters).
_UNSENDABLE = re.compile(r"[\\\x00-\x1f\x7f]|%22")


def _utf8(name: str) -> bool:
    """A name the upload can carry (Linux hands over undecodable bytes as surrogates)."""
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def scan(paths: list[Path]) -> Scan:
    """Find image files, recursively, in a stable (sorted) order: by content (an image without
    an extension is found), or by an image extension
    (:func:`~batchvision.core.sniff.named_as_image`: sent whatever it holds, and the API's row
    says what is wrong with it). Other files are listed as skipped.

    Raises ``ValueError``, naming the files, when an image's name would not arrive as it is:
    two images that would get the same name in the job (two folders of the same name, or two
    files of the same name given alone; the second would be taken for a re-send of the first
    and never classified), or a name with a backslash, a control character or ``%22``, which
    multipart uploads change on the way (a resumed upload would then send the file again)."""
    out = Scan()
    seen: dict[str, Path] = {}
    problems: list[str] = []
    for root in paths:
        files = sorted(p for p in root.rglob("*") if p.is_file()) if root.is_dir() else [root]
        # With several roots, paths keep the root's name so `a/x.jpg` and `b/x.jpg` differ.
        prefix = f"{root.name}/" if len(paths) > 1 and root.is_dir() else ""
        for path in files:
            rel = prefix + path.relative_to(root).as_posix() if root.is_dir() else path.name
            with open(path, "rb") as fh:
                head = fh.read(16)
            if not looks_like_image(head) and not named_as_image(path.name):
                out.skipped.append(rel)
                continue
            if rel in seen and seen[rel].resolve() == path.resolve():
                continue  # the same file named twice (a.jpg a.jpg, overlapping globs): once
            if rel in seen:
                problems.append(f"{rel!r} is both {seen[rel]} and {path}")
            elif not _utf8(rel):
                problems.append(f"{rel!r} is not UTF-8")
            elif _UNSENDABLE.search(rel):
                problems.append(f"{rel!r} has a backslash, a control character or %22")
            seen[rel] = path
            out.images.append((rel, path))
    if problems:
        raise ValueError(
            f"{len(problems)} image names would not arrive as they are: {'; '.join(problems[:5])}"
            f"{' ...' if len(problems) > 5 else ''}. Rename them, upload folders of different "
            "names, or each as its own job"
        )
    return out


@dataclass
class PartLimit:
    """How many files and bytes an upload part may hold. Lowered when the API, or a proxy in
    front of it, refuses a part as too large (``413``): the rest of the upload is then sent in
    parts that fit, instead of each being refused first."""

    files: int
    bytes: int

    def refused(self, files: int, size: int) -> None:
        """A part of ``files`` files and ``size`` bytes was refused as too large: at most half."""
        self.files = max(1, min(self.files, files // 2))
        self.bytes = max(1, min(self.bytes, size // 2))


def parts(images: list[tuple[str, Path]], limit: PartLimit) -> Iterator[list[tuple[str, Path]]]:
    """Group files into upload parts bounded by count and bytes (one big file stands alone),
    each by the ``limit`` as it is when the part is formed."""
    part: list[tuple[str, Path]] = []
    size = 0
    for rel, path in images:
        n = path.stat().st_size
        if part and (len(part) >= limit.files or size + n > limit.bytes):
            yield part
            part, size = [], 0
        part.append((rel, path))
        size += n
    if part:
        yield part


def submit_folder(
    client: PartUploader,
    paths: list[Path] | Scan,
    *,
    part_files: int = 64,
    part_bytes: int = 32 * 1024 * 1024,
    resume: str | None = None,
    on_part: Callable[[int], None] | None = None,
    options: Mapping[str, Any] | None = None,
    on_open: Callable[[str], None] | None = None,
) -> FolderUpload:
    """Upload every image under ``paths`` (folders and files, or the :func:`scan` of them the
    caller already made) to one job and seal it; returns what it did. Raises
    :class:`~batchvision.client.errors.NoImages`, creating nothing, when there is no image.

    With ``resume``, files the job already has are not sent again. ``options``: the new job's
    ``model``, ``top_k``, ``min_score``, ``priority``, ``callback_url`` (a resumed job keeps its
    own).
    ``on_part(n)``: after each part (and first for the files a resumed job has);
    ``on_open(job_id)``: once the job exists, before any part is sent.
    """
    found = paths if isinstance(paths, Scan) else scan(paths)
    if not found.images and not resume:  # as the API refuses a request without images
        where = ", ".join(map(str, paths)) if isinstance(paths, list) else "the scanned folders"
        raise NoImages(f"no image files in {where}", details=list(found.skipped))
    if resume:
        have = set(client.files(resume).files)
        job_id = resume
    else:
        have = set()
        job_id = client.open_job(len(found.images), **(options or {})).job_id
    if on_open is not None:
        on_open(job_id)
    todo = [(rel, p) for rel, p in found.images if rel not in have]
    if on_part is not None and have:
        on_part(len(found.images) - len(todo))
    rejected: list[Rejection] = []
    limit = PartLimit(part_files, part_bytes)
    for part in parts(todo, limit):
        rejected += _send_part(client, job_id, part, limit)
        if on_part is not None:
            on_part(len(part))
    sealed = client.seal(job_id)
    return FolderUpload(job_id, len(found.images), len(todo), found.skipped, rejected, sealed)


def _send_part(
    client: PartUploader, job_id: str, part: list[tuple[str, Path]], limit: PartLimit
) -> list[Rejection]:
    """Send one part. One refused as too large (``413``: the request size, the files per
    request or the key's quota) lowers ``limit`` to half of it and goes again in parts within
    the limit, as does a part formed before the limit fell; so an upload meets about one refusal
    per halving. A single file that is too large raises."""
    size = sum(p.stat().st_size for _, p in part)
    if len(part) > 1 and (len(part) > limit.files or size > limit.bytes):
        rejected: list[Rejection] = []
        for piece in parts(part, limit):
            rejected += _send_part(client, job_id, piece, limit)
        return rejected
    files = [(rel, p.read_bytes()) for rel, p in part]
    try:
        return list(client.add_part(job_id, files).rejected)
    except ApiError as exc:
        if exc.status != 413 or len(part) < 2:
            raise
    limit.refused(len(part), size)
    return _send_part(client, job_id, part, limit)
