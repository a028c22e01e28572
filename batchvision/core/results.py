"""Result and job schemas: what is stored per image and what the API returns.

Pure functions over plain dicts, so API, workers, client and tests share one definition.
"""

from __future__ import annotations

import csv
import enum
import io
import json
from collections.abc import Iterable, Iterator, Sequence
from typing import Any, TypedDict

import numpy as np


class JobStatus(enum.StrEnum):
    """Lifecycle of a job; the last four are final."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    PARTIAL = "partial"
    FAILED = "failed"
    CANCELED = "canceled"


class Score(TypedDict):
    label: str
    score: float


def prediction(probs: np.ndarray, labels: Sequence[str], k: int, min_score: float = 0.0) -> dict[str, Any]:
    """The stored result for one image from its class probabilities: the best class, and the
    ``k`` best (at most the number of classes) that score at least ``min_score``."""
    k = max(1, min(k, probs.shape[-1]))
    top = np.argpartition(-probs, k - 1)[:k] if k < probs.shape[-1] else np.arange(probs.shape[-1])
    top = top[np.argsort(-probs[top], kind="stable")]
    best = int(top[0])
    return {
        "label": label_of(labels, best),
        "class_id": best,
        "score": round(float(probs[best]), 6),
        "top_k": [
            {"label": label_of(labels, int(i)), "score": round(float(probs[i]), 6)}
            for i in top
            if min_score <= 0 or probs[i] >= min_score
        ],
    }


def error_result(code: str, message: str) -> dict[str, Any]:
    """The stored result for an image that could not be classified."""
    return {"error": {"code": code, "message": message}}


def canceled_result() -> dict[str, Any]:
    """The stored result of an image its job's cancellation reached first."""
    return error_result("canceled", "the job was canceled before this image was classified")


def label_of(labels: Sequence[str], class_id: int) -> str:
    return labels[class_id] if 0 <= class_id < len(labels) else str(class_id)


def job_status(
    *, total: int, done: int, failed: int, canceled: int, sealed: bool, cancel_requested: bool
) -> JobStatus:
    """Derive the status from counts, so it can never disagree with the stored results."""
    finished = sealed and done + failed + canceled >= total
    if cancel_requested and (canceled or not finished or total == 0):
        return JobStatus.CANCELED
    if not finished:
        return JobStatus.RUNNING if done + failed + canceled else JobStatus.QUEUED
    if failed == 0 and canceled == 0:
        return JobStatus.SUCCEEDED
    return JobStatus.FAILED if done == 0 else JobStatus.PARTIAL


def status_of(fields: dict[str, str]) -> tuple[JobStatus, dict[str, int]]:
    """The status and counts of a job hash's fields (``cancel`` is ``1``, or ``open`` when the
    job was canceled during its upload: that job is canceled even if every image it received
    had a result, since the rest of the upload never came)."""
    counts = {k: int(fields.get(k, 0) or 0) for k in ("total", "done", "failed", "canceled")}
    if fields.get("cancel") == "open":
        return JobStatus.CANCELED, counts
    status = job_status(
        **counts, sealed=fields.get("sealed") == "1", cancel_requested=fields.get("cancel") == "1"
    )
    return status, counts


def entry(index: int, filename: str, stored: dict[str, Any] | None) -> dict[str, Any]:
    """One row of ``/results``: the stored result with its index and filename."""
    row: dict[str, Any] = {"index": index, "filename": filename}
    if stored is None:
        row["status"] = "pending"
    else:
        row["status"] = "error" if "error" in stored else "ok"
        row.update(stored)
    return row


CSV_COLUMNS = ("filename", "label", "score", "class_id", "top_k", "error")


#: First characters that make a spreadsheet read a cell as a formula (or hide one behind them).
FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r")


def csv_cell(value: Any) -> Any:
    """A text cell that a spreadsheet would run as a formula (it starts with ``=``, ``+``,
    ``-``, ``@``, a tab or a carriage return) gets a leading ``'``, which spreadsheets show as
    text; numbers and other text pass unchanged. JSON and JSON Lines keep the raw value."""
    if isinstance(value, str) and value.startswith(FORMULA_STARTS):
        return "'" + value
    return value


def csv_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Stream ``/results`` rows as CSV, header first; top_k as ``label:score;...``. Text cells
    that would start a formula are neutralised (:func:`csv_cell`)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(CSV_COLUMNS)
    yield _drain(buf)
    for row in rows:
        err = row.get("error")
        cells = [
            row["filename"],
            row.get("label", ""),
            row.get("score", ""),
            row.get("class_id", ""),
            ";".join(f"{s['label']}:{s['score']}" for s in row.get("top_k", [])),
            f"{err['code']}: {err['message']}"
            if err
            else ("pending" if row.get("status") == "pending" else ""),
        ]
        writer.writerow([csv_cell(c) for c in cells])
        yield _drain(buf)


def jsonl_lines(rows: Iterable[dict[str, Any]]) -> Iterator[str]:
    """Stream rows as JSON Lines."""
    for row in rows:
        yield json.dumps(row, separators=(",", ":")) + "\n"


def _drain(buf: io.StringIO) -> str:
    text = buf.getvalue()
    buf.seek(0)
    buf.truncate()
    return text
