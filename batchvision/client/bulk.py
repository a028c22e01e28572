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

from batchvision.core.documents import FileList, Job, JobAccepted, Rejection
from batchvision.core.sniff import looks_like_image


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
    """Find image files by content, recursively, in a stable (sorted) order.

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
            if not looks_like_image(head):
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


def parts(images: list[tuple[str, Path]], max_files: int, max_bytes: int) -> Iterator[list[tuple[str, Path]]]:
    """Group files into upload parts bounded by count and bytes (one big file stands alone)."""
    part: list[tuple[str, Path]] = []
    size = 0
    for rel, path in images:
        n = path.stat().st_size
        if part and (len(part) >= max_files or size + n > max_bytes):
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
    caller already made) to one job and seal it; returns what it did.

    With ``resume``, files the job already has are not sent again. ``options``: the new job's
    ``model``, ``top_k``, ``min_score``, ``priority``, ``callback_url`` (a resumed job keeps its
    own).
    ``on_part(n)``: after each part (and first for the files a resumed job has);
    ``on_open(job_id)``: once the job exists, before any part is sent.
    """
    found = paths if isinstance(paths, Scan) else scan(paths)
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
    for part in parts(todo, part_files, part_bytes):
        files = [(rel, p.read_bytes()) for rel, p in part]
        rejected += client.add_part(job_id, files).rejected
        if on_part is not None:
            on_part(len(part))
    sealed = client.seal(job_id)
    return FolderUpload(job_id, len(found.images), len(todo), found.skipped, rejected, sealed)
