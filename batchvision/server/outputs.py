"""A job's output prefix: the job-hash fields that say where its results go and how far the
writing got, and their public document.

Fields (all ``out_``-prefixed): ``out_url`` (the ``s3://`` prefix the caller named),
``out_state`` (``pending`` until the job finishes and while the files are written, then
``written`` or ``failed``), ``out_error`` (``code: message`` of the last failure),
``out_attempts``, ``out_files`` (JSON: format -> object URL, the ``_SUCCESS`` manifest
included), ``out_written_at``. The writing itself: :mod:`batchvision.server.exports`.
"""

from __future__ import annotations

import json
from typing import Any

#: The job-hash fields of an output prefix.
FIELDS = ("out_url", "out_state", "out_error", "out_attempts", "out_files", "out_written_at")
#: The marker object written last, listing every file: its presence means the output is whole.
SUCCESS = "_SUCCESS"


def output_fields(url: str) -> dict[str, str]:
    """The fields a new job with the output prefix ``url`` starts with."""
    return {"out_url": url, "out_state": "pending"}


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
    }
