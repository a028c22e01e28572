"""Recognise files by content (magic bytes), not by extension."""

from __future__ import annotations

from pathlib import PurePosixPath

#: How many first bytes of a file :func:`looks_like_image` and :func:`is_archive` need (tar's
#: magic is at offset 257).
HEAD_BYTES = 512

_IMAGE_MAGIC = (
    b"\xff\xd8\xff",  # JPEG
    b"\x89PNG\r\n\x1a\n",
    b"GIF87a",
    b"GIF89a",
    b"BM",
)


#: File name extensions of the formats the API reads. A file so named is sent (the CLI) or kept
#: (a zip's member) even when its content is none (empty, cut short, misnamed), so that its row
#: in the results says what is wrong. Files of other formats (TIFF, HEIC, ...) are skipped, not
#: uploaded only to be refused.
IMAGE_NAME_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".apng", ".webp", ".bmp", ".dib", ".gif"}
)


def named_as_image(name: str) -> bool:
    """True if the file name ``name`` ends in one of :data:`IMAGE_NAME_SUFFIXES` (any case)."""
    return PurePosixPath(name).suffix.lower() in IMAGE_NAME_SUFFIXES


def looks_like_image(head: bytes) -> bool:
    """True if ``head`` (the first bytes of a file) starts like an accepted image format."""
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return True
    return any(head.startswith(m) for m in _IMAGE_MAGIC)


def is_archive(head: bytes) -> bool:
    """Zip, gzip, 7z, rar, bzip2, xz or tar: archives we never expand inside an archive."""
    return (
        head[:4] in (b"PK\x03\x04", b"PK\x05\x06")
        or head[:2] == b"\x1f\x8b"
        or head[:6] == b"7z\xbc\xaf\x27\x1c"
        or head[:4] == b"Rar!"
        or head[:3] == b"BZh"
        or head[:6] == b"\xfd7zXZ\x00"
        or head[257:262] == b"ustar"
    )
