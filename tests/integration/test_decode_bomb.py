"""Decode bombs against a real API process: a zip of small files that each claim the pixel limit
(lossless WebP, GIF and RLE-compressed BMP of 4000x4000, 0.7 to 13 KB each, which the
API used to decode while checking them: about 0.4 s and 60 MB each), plus files just over the
limit. The API decodes nothing: each file gets its own error (the pixel budget of the request,
or the per-image limit), and ``/healthz``, polled from another thread on the same (single)
gunicorn worker throughout, keeps answering.
"""

from __future__ import annotations

import io
import struct
import threading
import time
import zipfile
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from typing import Any

import pytest
import requests
from PIL import Image

pytestmark = [pytest.mark.integration]

SIDE = 4000
LIMIT = SIDE * SIDE  # each file claims exactly the per-image limit
ACCEPTED = 4  # the request's pixel budget holds this many of them
PER_FORMAT = 100


def _webp(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (width, height)).save(buf, "WEBP", lossless=True)
    return buf.getvalue()


def _gif(width: int, height: int) -> bytes:
    buf = io.BytesIO()
    Image.new("P", (width, height)).save(buf, "GIF")
    return buf.getvalue()


def _rle_bmp(width: int, height: int) -> bytes:
    """An 8-bit RLE BMP: headers, a palette and one end-of-bitmap code (a decoder fills the rest)."""
    palette = bytes(4 * 256)
    pixels = b"\x00\x01"
    offset = 14 + 40 + len(palette)
    info = struct.pack("<IiiHHIIiiII", 40, width, height, 1, 8, 1, len(pixels), 2835, 2835, 256, 0)
    return b"BM" + struct.pack("<IHHI", offset + len(pixels), 0, 0, offset) + info + palette + pixels


def _archive() -> tuple[bytes, dict[str, str]]:
    """The zip, and the error code each member should get (``""``: accepted)."""
    members: list[tuple[str, bytes]] = []
    for make, ext in ((_webp, "webp"), (_gif, "gif"), (_rle_bmp, "bmp")):
        at_limit, over = make(SIDE, SIDE), make(SIDE + 1, SIDE)
        members += [(f"{ext}/at-limit-{n:03d}.{ext}", at_limit) for n in range(PER_FORMAT)]
        members += [(f"{ext}/over-{n:03d}.{ext}", over) for n in range(PER_FORMAT // 4)]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for name, data in members:
            zf.writestr(name, data)
    expected = {}
    accepted = 0
    for name, _ in members:
        if "/over-" in name:
            expected[name] = "too_many_pixels"
        elif accepted < ACCEPTED:
            expected[name], accepted = "", accepted + 1
        else:
            expected[name] = "pixel_budget"
    return buf.getvalue(), expected


@pytest.fixture(scope="module")
def api(api_alone: Callable[..., AbstractContextManager[Any]]) -> Iterator[str]:
    # One gunicorn worker: the health checks share the event loop of the bomb's request.
    with api_alone(api_workers=1, max_image_pixels=LIMIT, max_request_pixels=ACCEPTED * LIMIT) as alone:
        yield alone.url


class Poller:
    """``GET /healthz`` in a loop on its own connection; the slowest answer, and how many."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.stop = threading.Event()
        self.latencies: list[float] = []
        self.failures: list[str] = []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with requests.Session() as http:
            while not self.stop.is_set():
                start = time.perf_counter()
                try:
                    ok = http.get(f"{self.url}/healthz", timeout=10).status_code == 200
                except requests.RequestException as exc:
                    ok = False
                    self.failures.append(repr(exc))
                self.latencies.append(time.perf_counter() - start)
                if not ok and not self.failures:
                    self.failures.append("not 200")
                self.stop.wait(0.005)


def test_small_files_claiming_the_pixel_limit_each_get_their_error_and_health_answers(
    api: str, wait_until: Any
) -> None:
    data, expected = _archive()
    assert len(data) < 5_000_000  # 375 files of 0.7 to 13 KB
    poller = Poller(api)
    poller.thread.start()
    wait_until(lambda: len(poller.latencies) >= 20, message="the poller runs")
    before = len(poller.latencies)
    start = time.perf_counter()
    zipped = {"Content-Type": "application/zip"}
    resp = requests.post(f"{api}/v1/jobs", data=data, headers=zipped, timeout=120)
    took = time.perf_counter() - start
    wait_until(lambda: len(poller.latencies) >= before + 20, message="polls after the request")
    poller.stop.set()
    poller.thread.join(15)
    assert resp.status_code == 202, resp.text
    body = resp.json()
    got = {r["filename"]: r["code"] for r in body["rejected"]}
    assert {name: code for name, code in expected.items() if code} == got
    assert body["total"] == len(expected) and len(got) == len(expected) - ACCEPTED
    for r in body["rejected"]:  # every message says what is wrong and what is allowed
        assert str(LIMIT) in r["message"] or str(ACCEPTED * LIMIT) in r["message"], r
    during = poller.latencies[before:]
    slowest = max(during)
    print(
        f"\ndecode bomb: {len(expected)} files in {len(data)} bytes, answered in {took * 1000:.0f} ms; "
        f"/healthz {len(during)} polls during and after, slowest {slowest * 1000:.1f} ms, "
        f"before {max(poller.latencies[:before]) * 1000:.1f} ms"
    )
    assert not poller.failures
    # Each file used to cost ~0.4 s of decoding in the event loop: 375 of them, minutes. The
    # figure the issue asks for (100 ms) is printed above; the assertion is a bound that a
    # loaded 2-core machine cannot miss unless something is decoded again.
    assert slowest < 2.0
