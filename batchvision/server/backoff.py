"""Waits between the server's own retries of outbound calls (webhooks, image URLs): exponential
backoff with jitter, and what an answer's ``Retry-After`` asks for."""

from __future__ import annotations

import random
from collections.abc import Mapping

from urllib3.exceptions import InvalidHeader
from urllib3.util import Retry


def retry_after(headers: Mapping[str, str]) -> float | None:
    """The seconds a ``Retry-After`` header asks to wait (delta-seconds or an HTTP date);
    ``None`` without one, or for one that is neither."""
    value = headers.get("Retry-After")
    if value is None:
        return None
    try:
        return max(0.0, float(Retry().parse_retry_after(value)))
    except (InvalidHeader, ValueError, OverflowError):
        return None


def backoff(attempt: int, first_s: float, cap_s: float) -> float:
    """Seconds before retry number ``attempt`` (1, 2, ...): doubling from ``first_s`` up to
    ``cap_s``, with "equal jitter" (between half and all of it) so retries of many jobs
    spread out."""
    ceiling = min(cap_s, first_s * 2.0 ** max(0, attempt - 1))
    return ceiling / 2 + random.uniform(0, ceiling / 2)
