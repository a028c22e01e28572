"""The multipart decoder without per-request patterns finds what werkzeug's own finds."""

from __future__ import annotations

import random
import re
import uuid

import pytest
from werkzeug import formparser
from werkzeug.sansio.multipart import Data, Epilogue, MultipartDecoder, NeedData

from api import create_app
from api.multipart import MAX_NEAR_MISSES, BoundaryDecoder, BoundarySearch
from batchvision.core.settings import Settings

_BREAK = rb"(?:\r\n|\n|\r)"


def _werkzeug_patterns(boundary: bytes) -> tuple[re.Pattern[bytes], re.Pattern[bytes]]:
    """The preamble and boundary patterns werkzeug's decoder compiles for ``boundary``."""
    decoder = MultipartDecoder(boundary)
    return decoder.preamble_re, decoder.boundary_re


def _found(m: object) -> tuple[int, int, bytes] | None:
    if m is None:
        return None
    return m.start(), m.end(), m.group(1)  # type: ignore[attr-defined]


@pytest.mark.parametrize("boundary", [b"b", b"bb", b"b-b", b"--"])
def test_the_search_finds_what_werkzeugs_patterns_find_at_every_position(boundary: bytes) -> None:
    # Short texts over the bytes that matter (line breaks, blanks, dashes, the boundary's own)
    # cover every way a marker can be preceded and followed; each text at every start position.
    preamble, between = _werkzeug_patterns(boundary)
    ours = (BoundarySearch(boundary, break_required=False), BoundarySearch(boundary, break_required=True))
    rng = random.Random(7)
    alphabet = [b"\r", b"\n", b"-", b" ", b"\t", b"\x0b", b"\x0c", b"x", b"b", b"--" + boundary, b"\r\n"]
    texts = 0
    for _ in range(4000):
        data = b"".join(rng.choice(alphabet) for _ in range(rng.randint(0, 14)))
        for pos in range(len(data) + 1):
            for theirs, mine in zip((preamble, between), ours, strict=True):
                for form in (data, bytearray(data)):
                    assert _found(mine.search(form, pos)) == _found(theirs.search(form, pos)), (data, pos)
        texts += 1
    assert texts == 4000


def test_a_crowd_of_near_boundaries_is_scanned_by_werkzeugs_own_pattern() -> None:
    # Markers with a line break but a wrong end: one Python step each until the search gives
    # the scan to the pattern werkzeug would have compiled, which then finds the same match.
    boundary = b"abc"
    preamble, between = _werkzeug_patterns(boundary)
    crowd = b"\n--abcx" * (MAX_NEAR_MISSES + 5)
    for data in (crowd + b"\r\n--abc\r\n", crowd, b"\n--abcx" * MAX_NEAR_MISSES + b"\n--abc--"):
        for theirs, required in ((preamble, False), (between, True)):
            ours = BoundarySearch(boundary, break_required=required)
            for pos in (0, 1, 7, len(data) // 2):
                assert _found(ours.search(data, pos)) == _found(theirs.search(data, pos)), (data, pos)
    few = BoundarySearch(boundary, break_required=True)
    assert _found(few.search(b"\n--abcx" * MAX_NEAR_MISSES + b"\n--abc\n")) is not None
    assert few._pattern is None  # a body with few near-boundaries compiles nothing
    many = BoundarySearch(boundary, break_required=True)
    many.search(crowd)
    assert many._pattern is not None


def _events(decoder: MultipartDecoder, body: bytes, chunk: int) -> list[object]:
    """The decoder's events for ``body`` fed ``chunk`` bytes at a time (data events merged), or
    the error it raised."""
    out: list[object] = []
    try:
        for start in range(0, len(body), chunk):
            decoder.receive_data(body[start : start + chunk])
            _drain(decoder, out)
        decoder.receive_data(None)
        _drain(decoder, out)
    except ValueError as exc:
        out.append(("error", str(exc)))
    return out


def _drain(decoder: MultipartDecoder, out: list[object]) -> None:
    while True:
        event = decoder.next_event()
        if isinstance(event, NeedData):
            return
        if isinstance(event, Data) and out and isinstance(out[-1], Data):
            out[-1] = Data(data=out[-1].data + event.data, more_data=event.more_data)
        else:
            out.append(event)
        if isinstance(event, Epilogue):
            return


def _bodies(boundary: bytes) -> list[bytes]:
    b = boundary
    part = (
        b'Content-Disposition: form-data; name="files"; filename="a.jpg"\r\nContent-Type: image/jpeg\r\n\r\n'
    )
    tricky = b"x\r\n--" + b + b"x\r\n-" + b"\r--" + b[:-1] + b"\n\r\n" + bytes(range(256))
    return [
        b"--" + b + b"\r\n" + part + b"one\r\n--" + b + b"--\r\n",
        b"preamble\r\n--"
        + b
        + b" \t\r\n"
        + part
        + tricky
        + b"\r\n--"
        + b
        + b"\r\n"
        + part
        + b"two\r\n--"
        + b
        + b"--",
        b"--" + b + b"\n" + part.replace(b"\r\n", b"\n") + b"three\n--" + b + b"--\n",
        b"--" + b + b"\r" + part.replace(b"\r\n", b"\r") + b"four\r--" + b + b"--  \r\n epilogue",
        b"--" + b + b"--\r\n",
        b"--" + b + b"\r\n" + part + b"no closing boundary",
        b"no boundary at all",
    ]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 16, 61, 1 << 16])
def test_the_decoder_gives_werkzeugs_events_for_whole_and_split_bodies(chunk: int) -> None:
    for boundary in (uuid.uuid4().hex.encode(), b"----WebKitFormBoundary7MA4YWxkTrZu0gW", b"x"):
        for body in _bodies(boundary):
            theirs = _events(MultipartDecoder(boundary), body, chunk)
            assert _events(BoundaryDecoder(boundary), body, chunk) == theirs, (boundary, body, chunk)
            assert any(isinstance(e, Data) and e.data for e in theirs) or body in (
                b"--" + boundary + b"--\r\n",
                b"no boundary at all",
            )


def test_the_app_parses_uploads_with_the_decoder_that_compiles_nothing_per_request() -> None:
    app = create_app(Settings.from_env({}, redis_url="redis://127.0.0.1:1/0"))
    assert formparser.MultipartDecoder is BoundaryDecoder
    body = (
        b"--"
        + b"q1"
        + b'\r\nContent-Disposition: form-data; name="files"; filename="a.jpg"\r\n\r\nabc\r\n--q1--\r\n'
    )
    with app.test_request_context(
        "/", method="POST", data=body, content_type="multipart/form-data; boundary=q1"
    ) as ctx:
        assert [(f.filename, f.read()) for f in ctx.request.files.getlist("files")] == [("a.jpg", b"abc")]
