"""A job made from an ``s3://`` prefix: the job-hash fields of its listing and their public
document (the listing itself: :mod:`batchvision.server.listing`).

Fields (all ``ls_``-prefixed): ``ls_url`` (the prefix), ``ls_after`` (the last key listed),
``ls_state`` (``listing``, ``done``, ``failed``), ``ls_images``, ``ls_skipped`` (keys that are
not image files), ``ls_attempts`` (failed attempts in a row), ``ls_error``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

#: Key suffixes of the objects a prefix job classifies (other keys are skipped and counted; a
#: key with one of these that is not an image is a per-image error).
IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff")
LISTING, DONE, FAILED = "listing", "done", "failed"


def too_many(url: str, limit: int) -> str:
    """Why a prefix with more than ``limit`` images is refused."""
    return f"{url} has more than {limit} images (BATCHVISION_MAX_OBJECTS_PER_JOB)"


def is_image_key(key: str) -> bool:
    """Whether a prefix job classifies the object ``key`` (by its suffix)."""
    return key.lower().endswith(IMAGE_SUFFIXES)


@dataclass(frozen=True)
class Page:
    """One step of a listing: the image keys in key order, the other keys (``skipped``, the
    first ``named`` of them), the last key looked at and whether the prefix has more after it."""

    images: tuple[str, ...]
    skipped: tuple[str, ...]
    skipped_count: int
    last_key: str
    more: bool


def listing_fields(url: str, page: Page) -> dict[str, str]:
    """The fields of a job whose first page the request listed: ``listing`` when there is
    more, else ``done``."""
    return {
        "ls_url": str(url),
        "ls_after": page.last_key,
        "ls_state": LISTING if page.more else DONE,
        "ls_images": str(len(page.images)),
        "ls_skipped": str(page.skipped_count),
        "ls_attempts": "0",
        "ls_error": "",
    }


def listing_document(h: dict[str, str]) -> dict[str, Any] | None:
    """The ``listing`` member of the job document, ``None`` for a job not made from a prefix."""
    if "ls_url" not in h:
        return None
    return {
        "url": h["ls_url"],
        "state": h.get("ls_state", LISTING),
        "images": int(h.get("ls_images") or 0),
        "skipped": int(h.get("ls_skipped") or 0),
        "error": h.get("ls_error") or None,
    }
