"""werkzeug's multipart parsing without compiling two regular expressions per request.

werkzeug's :class:`~werkzeug.sansio.multipart.MultipartDecoder` compiles two patterns from each
request's boundary. Clients choose a new random boundary for every request (urllib3, requests,
browsers), so Python's pattern cache never hits, and compiling them costs about 0.19 ms of CPU
per multipart request, a tenth of what a one-image ``POST /v1/classify`` costs the API.
:class:`BoundaryDecoder` finds the same matches with ``bytes.find`` and one pattern compiled
once; everything else is werkzeug's. A body crowded with near-boundaries (``--<boundary>``
without the line break or the end werkzeug's patterns want) would make that search step through
them one by one in Python, several times slower than a pattern; after
:data:`MAX_NEAR_MISSES` of them in one search it compiles werkzeug's pattern after all and lets
it scan. Image data holds none.
"""

from __future__ import annotations

import re

from werkzeug import formparser
from werkzeug.sansio.multipart import MultipartDecoder

_BREAK = rb"(?:\r\n|\n|\r)"
#: What follows ``--<boundary>`` in werkzeug's patterns: ``--`` (the closing boundary) or a line
#: break, after blanks other than line breaks. Group 1 is the whole of it, as in werkzeug's.
_TAIL = re.compile(rb"(--[^\S\n\r]*%s?|[^\S\n\r]*%s)" % (_BREAK, _BREAK))
#: Markers one search may reject before it hands the scan to a compiled pattern.
MAX_NEAR_MISSES = 16


class _Found:
    """The part of :class:`re.Match` werkzeug reads: ``start()``, ``end()`` and ``group(1)``."""

    __slots__ = ("_end", "_start", "_tail")

    def __init__(self, start: int, end: int, tail: bytes) -> None:
        self._start, self._end, self._tail = start, end, tail

    def start(self) -> int:
        return self._start

    def end(self) -> int:
        return self._end

    def group(self, index: int) -> bytes:
        if index != 1:
            raise IndexError(f"no such group: {index}")
        return self._tail


class BoundarySearch:
    """What ``re.compile(rb"BREAK--<boundary>(tail)").search`` finds, for one boundary; the
    line break before ``--`` is optional with ``break_required=False`` (the preamble's)."""

    def __init__(self, boundary: bytes, *, break_required: bool) -> None:
        self.boundary = boundary
        self.marker = b"--" + boundary
        self.break_required = break_required
        self._pattern: re.Pattern[bytes] | None = None

    def search(self, data: bytes | bytearray, pos: int = 0) -> _Found | re.Match[bytes] | None:
        """The leftmost match at or after ``pos``, or ``None``."""
        if self._pattern is not None:
            return self._pattern.search(data, pos)
        marker = self.marker
        at = data.find(marker, pos)
        misses = 0
        while at != -1:
            start = self._start(data, at, pos)
            if start is not None:
                tail = _TAIL.match(data, at + len(marker))
                if tail is not None:
                    return _Found(start, tail.end(), tail.group(1))
            misses += 1
            if misses > MAX_NEAR_MISSES:  # a crowd of near-boundaries: scan them in C
                return self.pattern().search(data, pos)
            at = data.find(marker, at + 1)
        return None

    def pattern(self) -> re.Pattern[bytes]:
        """werkzeug's own pattern for this boundary (compiled on first use, then kept)."""
        if self._pattern is None:
            prefix = _BREAK + (b"" if self.break_required else b"?")
            self._pattern = re.compile(
                prefix + b"--" + re.escape(self.boundary) + _TAIL.pattern, re.MULTILINE
            )
        return self._pattern

    def _start(self, data: bytes | bytearray, at: int, pos: int) -> int | None:
        # The leftmost start the pattern could take for the marker at ``at``: the line break
        # alternatives are tried longest first, and a match never starts before ``pos``.
        if at - 2 >= pos and data[at - 2 : at] == b"\r\n":
            return at - 2
        if at - 1 >= pos and data[at - 1] in b"\r\n":
            return at - 1
        return None if self.break_required else at


class BoundaryDecoder(MultipartDecoder):
    """:class:`~werkzeug.sansio.multipart.MultipartDecoder` with :class:`BoundarySearch` in
    place of its two per-boundary patterns."""

    def __init__(
        self, boundary: bytes, max_form_memory_size: int | None = None, *, max_parts: int | None = None
    ) -> None:
        # werkzeug's own set-up, with a boundary whose patterns are always the same (and so
        # compiled once, then found in Python's cache): only the boundary differs below.
        super().__init__(b"", max_form_memory_size, max_parts=max_parts)
        self.boundary = boundary
        self.preamble_re = BoundarySearch(boundary, break_required=False)  # type: ignore[assignment]
        self.boundary_re = BoundarySearch(boundary, break_required=True)  # type: ignore[assignment]


def install() -> None:
    """Make werkzeug's form parser (``request.files``) decode with :class:`BoundaryDecoder`.

    werkzeug's ``MultiPartParser.parse`` makes its decoder from its module's name
    ``MultipartDecoder`` and takes no other class, so that name is what is replaced."""
    if not issubclass(formparser.MultipartDecoder, MultipartDecoder):  # pragma: no cover - werkzeug changed
        raise RuntimeError("werkzeug.formparser.MultipartDecoder is not werkzeug's decoder")
    formparser.MultipartDecoder = BoundaryDecoder  # type: ignore[misc]
