"""A job's output prefix: the job-hash fields that say where its results go and how far the
writing got, and their public document.

Fields (all ``out_``-prefixed): ``out_url`` (the ``s3://`` prefix the caller named),
``out_state`` (``pending`` until the job finishes and while the files are written, then
``written`` or ``failed``), ``out_error`` (``code: message`` of the last failure),
``out_attempts``, ``out_files`` (JSON: format -> object URL, the ``_SUCCESS`` manifest
included), ``out_written_at``. A job written in parts also has ``part_rows`` (rows per part),
``spilled`` (parts written while it ran, whose results left Redis), ``op:<part>`` (JSON: the
bytes of each format's file of that part) and ``p:<part>`` (results stored of a part not yet
written). The writing itself: :mod:`batchvision.server.exports`.
"""

from __future__ import annotations

import json
from typing import Any

#: The job-hash fields of an output prefix.
FIELDS = ("out_url", "out_state", "out_error", "out_attempts", "out_files", "out_written_at")
#: The marker object written last, listing every file: its presence means the output is whole.
SUCCESS = "_SUCCESS"


def output_fields(url: str, part_rows: int = 0) -> dict[str, str]:
    """The fields a new job with the output prefix ``url`` starts with (``part_rows``: written
    in parts of that many rows while it runs; 0: at the end only)."""
    fields = {"out_url": url, "out_state": "pending"}
    if part_rows:
        fields["part_rows"] = str(part_rows)
    return fields


def output_document(h: dict[str, str]) -> dict[str, Any] | None:
    """The ``output`` member of the job document, ``None`` for a job without an output prefix."""
    if "out_url" not in h:
        return None
    error = h.get("out_error") or None
    return {
        "url": h["out_url"],
        "state": h.get("out_state", "pending"),
        "files": json.loads(h["out_files"]) if h.get("out_files") else {},
        "attempts": int(h.get("out_attempts") or 0),
        "error": error,
        "written_at": float(h["out_written_at"]) if h.get("out_written_at") else None,
        "part_rows": int(h["part_rows"]) if h.get("part_rows") else None,
        "parts": int(h.get("spilled") or 0),
    }
