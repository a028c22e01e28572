"""What both tiers share: the tier markers, a deadline-bound polling helper, small helpers.

``tests/unit/`` runs in seconds without processes or Redis; ``tests/integration/`` starts a
real redis-server, worker and API processes (its fixtures are in ``integration/conftest.py``).
Every test under ``tests/integration/`` is marked ``integration`` here, by its place, so
``-m "not integration"`` is exactly the unit tier. Test modules never import each other:
shared helpers are fixtures.
"""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Protocol, TypeVar

import pytest

TESTS = Path(__file__).resolve().parent
T = TypeVar("T")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    integration = TESTS / "integration"
    for item in items:
        if integration in item.path.parents:
            item.add_marker(pytest.mark.integration)
        if TESTS / "containers" in item.path.parents:
            item.add_marker(pytest.mark.containers)


class WaitUntil(Protocol):
    def __call__(
        self, condition: Callable[[], T], timeout: float = ..., interval: float = ..., message: str = ...
    ) -> T: ...


def _wait_until(
    condition: Callable[[], T], timeout: float = 30.0, interval: float = 0.05, message: str = ""
) -> T:
    """Poll ``condition`` until it returns something truthy (returned) or ``timeout`` passes
    (``AssertionError``). Use it instead of a fixed sleep: a slow machine only waits longer."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true after {timeout:.1f}s: {message or condition}; last: {value!r}")
        time.sleep(interval)


@pytest.fixture(scope="session")
def wait_until() -> WaitUntil:
    """``wait_until(condition, timeout=30, interval=0.05, message="")``: see :func:`_wait_until`."""
    return _wait_until


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that claims ``width`` x ``height``: an IHDR and a tiny IDAT, no real pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\0" * 10))
        + chunk(b"IEND", b"")
    )


@pytest.fixture(scope="session")
def png_header_only() -> Callable[[int, int], bytes]:
    """``png_header_only(width, height)``: a tiny PNG claiming that size (decompression bombs)."""
    return _png_header_only
