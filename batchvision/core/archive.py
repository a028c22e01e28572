"""Zip archives of a folder, read in memory with limits: nothing is extracted to disk.

Hostile members (absolute paths, ``..`` parts, symlinks, encryption) refuse the whole
archive; zip bombs are stopped by limits on member count, total uncompressed size and
compression ratio, checked from the directory first and enforced again while reading
(a forged header cannot make us read more than the limit). Nested archives are listed as
skipped, never expanded, as are members that are no image, unless named as one: such a member
is kept with its first bytes only, so that its row says what is wrong with it. The pixels the
image members claim in their headers (nothing is decoded) may add up to at most
``max_total_pixels``.
"""

from __future__ import annotations

import io
import stat
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import PurePosixPath

from batchvision.core.errors import ImageTooLarge, InvalidImage
from batchvision.core.imaging import YIELD_EVERY, header_pixels, pause
from batchvision.core.sniff import HEAD_BYTES, is_archive, looks_like_image, named_as_image


class ArchiveRejected(InvalidImage):
    code = "archive_rejected"


class ArchiveTooLarge(ImageTooLarge):
    code = "archive_too_large"


#: Why a member that is no image (and not named as one) is skipped.
NOT_AN_IMAGE = "not an image"


@dataclass
class ArchiveContents:
    """Image members (relative path, bytes) in archive order, and what was skipped."""

    images: list[tuple[str, bytes]] = field(default_factory=list)
    skipped: list[dict[str, str]] = field(default_factory=list)


def read_zip(
    data: bytes,
    *,
    max_members: int,
    max_total_bytes: int,
    max_ratio: float,
    max_pixels: int | None = None,
    max_total_pixels: int | None = None,
    reserve: Callable[[int], None] | None = None,
) -> ArchiveContents:
    """Read image members of a zip archive held in memory.

    With ``max_total_pixels``, the members' header sizes (those within ``max_pixels``, the
    per-image limit: the others are refused on their own and never decoded) may add up to at
    most that, else the archive is refused (:class:`ArchiveTooLarge`). ``reserve(n)``: called
    with the bytes the members declare before any is expanded (it may raise, to refuse the
    expansion for now: a few small archives must not take a process' memory together).
    """
    entries = _directory_entries(data)
    if entries > 2 * max_members:
        # Before zipfile builds an object per entry (folders too): a body of a million tiny
        # entries would cost the API gigabytes for nothing but this refusal.
        raise ArchiveTooLarge(
            f"archive has {entries} entries (members and folders); the limit is {max_members} members"
        )
    try:
        zf = zipfile.ZipFile(io.BytesIO(data))
    except Exception as exc:  # noqa: BLE001 - any way a hostile directory breaks the parser
        raise ArchiveRejected(f"not a readable zip archive: {type(exc).__name__}: {exc}") from exc
    # Not is_dir(): it fails on an empty name, which _check_member refuses by name.
    infos = [i for i in zf.infolist() if not i.filename.endswith("/")]
    if len(infos) > max_members:
        raise ArchiveTooLarge(f"archive has {len(infos)} members; the limit is {max_members}")
    declared = sum(i.file_size for i in infos)
    if declared > max_total_bytes:
        raise ArchiveTooLarge(f"archive expands to {declared} bytes; the limit is {max_total_bytes}")
    names = [member_name(info) for info in infos]
    for info, name in zip(infos, names, strict=True):
        _check_member(info, name, max_ratio)
    if reserve is not None:
        reserve(declared)
    out = ArchiveContents()
    budget = max_total_bytes
    for n, (info, name) in enumerate(zip(infos, names, strict=True)):
        if n % YIELD_EVERY == YIELD_EVERY - 1:
            pause()  # a zip of 20,000 members: other requests run in between
        try:
            with zf.open(info) as fh:
                # Its first bytes say what it is: a member skipped is never expanded whole.
                head = fh.read(HEAD_BYTES)
                skip = _skipped(head)
                if skip == NOT_AN_IMAGE and named_as_image(name):
                    # Kept for its row (the upload's check names what it is): not read further.
                    out.images.append((name, head))
                    continue
                rest = max(0, min(budget, info.file_size) + 1 - len(head))  # (read(-1) reads all)
                blob = head if skip else head + fh.read(rest)
        except Exception as exc:  # noqa: BLE001 - a forged offset, a name that is not UTF-8...
            raise ArchiveRejected(
                f"member {name!r} is corrupt or uses an unsupported method: {type(exc).__name__}: {exc}"
            ) from exc
        if skip:
            out.skipped.append({"filename": name, "reason": skip})
            continue
        if len(blob) > info.file_size or len(blob) > budget:
            raise ArchiveTooLarge(f"member {name!r} expands beyond its declared size or the archive limit")
        budget -= len(blob)
        out.images.append((name, blob))
    if max_total_pixels is not None:
        _check_pixels(out.images, max_pixels, max_total_pixels)
    return out


def _skipped(head: bytes) -> str | None:
    """Why a member whose content begins with ``head`` is skipped (``None``: it is kept)."""
    if is_archive(head):
        return "nested archive (not expanded)"
    if not looks_like_image(head):
        return NOT_AN_IMAGE
    return None


def _check_pixels(images: list[tuple[str, bytes]], max_pixels: int | None, limit: int) -> None:
    total = 0
    for n, (_, blob) in enumerate(images):
        if n % YIELD_EVERY == YIELD_EVERY - 1:
            pause()
        pixels = header_pixels(blob)
        if pixels is not None and (max_pixels is None or pixels <= max_pixels):
            total += pixels
    if total > limit:
        raise ArchiveTooLarge(
            f"the archive's images add up to {total} pixels; the limit is {limit} per archive "
            "(send them in several archives)"
        )


def _directory_entries(data: bytes) -> int:
    """At most how many entries zipfile will build objects for: it checks the signature of
    each central-directory header it reads, so there are no more than the body holds (one pass
    in C; the counts an archive declares can be forged)."""
    return data.count(b"PK\x01\x02")


#: The Info-ZIP Unicode Path extra field: version 1, the CRC-32 of the name in the header, the
#: name in UTF-8.
_UNICODE_PATH = 0x7075


def member_name(info: zipfile.ZipInfo) -> str:
    """A member's name as its writer meant it.

    Without the UTF-8 flag, ``zipfile`` reads a name as CP437, the format's old default. Most
    tools that leave the flag off (Info-ZIP's ``zip``, macOS' Archive Utility) wrote UTF-8 all
    the same, some with the name again in a Unicode Path extra field: ``ünï.jpg`` would come
    back as ``├╝n├».jpg``. So: the flag, else that field (if its CRC matches the header's name),
    else the header's bytes if they are valid UTF-8, else CP437.
    """
    if info.flag_bits & 0x800:
        return info.filename
    raw = info.orig_filename.encode("cp437")
    extra = info.extra
    while len(extra) >= 4:
        kind, size = int.from_bytes(extra[:2], "little"), int.from_bytes(extra[2:4], "little")
        body, extra = extra[4 : 4 + size], extra[4 + size :]
        if kind == _UNICODE_PATH and len(body) > 5 and body[0] == 1:
            if int.from_bytes(body[1:5], "little") == zlib.crc32(raw):
                try:
                    return body[5:].decode("utf-8")
                except UnicodeDecodeError:
                    break
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return info.filename


def _check_member(info: zipfile.ZipInfo, name: str, max_ratio: float) -> None:
    if not name:
        raise ArchiveRejected("a member has an empty name")
    path = PurePosixPath(name.replace("\\", "/"))
    if path.is_absolute() or (len(name) > 1 and name[1] == ":"):
        raise ArchiveRejected(f"member {name!r} has an absolute path")
    if ".." in path.parts:
        raise ArchiveRejected(f"member {name!r} escapes the archive with '..'")
    mode = info.external_attr >> 16
    if stat.S_ISLNK(mode):
        raise ArchiveRejected(f"member {name!r} is a symbolic link")
    if info.flag_bits & 0x1:
        raise ArchiveRejected(f"member {name!r} is encrypted")
    if info.compress_size and info.file_size / info.compress_size > max_ratio:
        raise ArchiveTooLarge(
            f"member {name!r} compresses {info.file_size / info.compress_size:.0f}:1; "
            f"the limit is {max_ratio:.0f}:1 (zip bomb?)"
        )
