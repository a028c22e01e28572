"""Result schemas and job status derivation."""

from __future__ import annotations

import numpy as np
import pytest

from batchvision.core.results import (
    CSV_COLUMNS,
    JobStatus,
    csv_lines,
    entry,
    error_result,
    job_status,
    prediction,
)
from batchvision.server.queue import chunked


def test_prediction_top_k_sorted() -> None:
    probs = np.array([0.1, 0.6, 0.05, 0.25], np.float32)
    p = prediction(probs, ["a", "b", "c", "d"], 3)
    assert (p["label"], p["class_id"]) == ("b", 1)
    assert [s["label"] for s in p["top_k"]] == ["b", "d", "a"]
    assert p["score"] == p["top_k"][0]["score"] == pytest.approx(0.6)
    assert [s["score"] for s in p["top_k"]] == pytest.approx([0.6, 0.25, 0.1])
    assert len(prediction(probs, ["a", "b", "c", "d"], 99)["top_k"]) == 4


def test_job_status_derivation() -> None:
    kw = {"sealed": True, "cancel_requested": False}
    assert job_status(total=3, done=0, failed=0, canceled=0, **kw) is JobStatus.QUEUED
    assert job_status(total=3, done=1, failed=0, canceled=0, **kw) is JobStatus.RUNNING
    assert job_status(total=3, done=3, failed=0, canceled=0, **kw) is JobStatus.SUCCEEDED
    assert job_status(total=3, done=2, failed=1, canceled=0, **kw) is JobStatus.PARTIAL
    assert job_status(total=3, done=0, failed=3, canceled=0, **kw) is JobStatus.FAILED
    assert (
        job_status(total=3, done=1, failed=0, canceled=2, sealed=True, cancel_requested=True)
        is JobStatus.CANCELED
    )
    # an unsealed job is never final, even when every image so far has a result
    assert (
        job_status(total=3, done=3, failed=0, canceled=0, sealed=False, cancel_requested=False)
        is JobStatus.RUNNING
    )


def test_csv_rows() -> None:
    rows = [
        entry(0, "a/x.jpg", {**prediction(np.array([0.9, 0.1]), ["cat", "dog"], 2)}),
        entry(1, "b.png", error_result("truncated", "JPEG is truncated")),
        entry(2, "c.png", None),
    ]
    text = "".join(csv_lines(rows)).splitlines()
    assert text[0] == ",".join(CSV_COLUMNS)
    assert text[1].startswith("a/x.jpg,cat,0.9,0,cat:0.9;dog:0.1,")
    assert text[2] == "b.png,,,,,truncated: JPEG is truncated"
    assert text[3].endswith(",pending")


def test_chunking_keeps_order() -> None:
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunked([], 3) == []
