"""Text out of what Redis (or NVML) hands back: ``bytes`` without ``decode_responses``, ``str``
with it, numbers as given."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any


def as_text(value: Any) -> str:
    """``value`` as text: bytes decoded (UTF-8), anything else through ``str``."""
    return value.decode() if isinstance(value, bytes) else str(value)


def as_text_or_none(value: Any) -> str | None:
    """:func:`as_text`, except that ``None`` (a field that is not there) stays ``None``."""
    return None if value is None else as_text(value)


def hash_fields(client: Any, key: str, fields: Sequence[str]) -> dict[str, str | None]:
    """The hash ``key``'s ``fields`` (one ``HMGET``) as text by name, ``None`` where absent."""
    return {f: as_text_or_none(v) for f, v in zip(fields, client.hmget(key, list(fields)), strict=True)}
