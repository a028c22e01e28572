"""Result schemas and job status derivation."""

from __future__ import annotations

import json

import numpy as np
import pytest

from batchvision.core.results import (
    CSV_COLUMNS,
    Failure,
    JobStatus,
    Passthrough,
    Prediction,
    Row,
    TopScore,
    canceled_result,
    csv_lines,
    decode,
    encode,
    error_result,
    job_status,
    jsonl_lines,
    prediction,
)
from batchvision.server.queue import chunked


def test_prediction_top_k_sorted() -> None:
    probs = np.array([0.1, 0.6, 0.05, 0.25], np.float32)
    p = prediction(probs, ["a", "b", "c", "d"], 3)
    assert (p.label, p.class_id) == ("b", 1)
    assert [s.label for s in p.top_k] == ["b", "d", "a"]
    assert p.score == p.top_k[0].score == pytest.approx(0.6)
    assert [s.score for s in p.top_k] == pytest.approx([0.6, 0.25, 0.1])
    assert len(prediction(probs, ["a", "b", "c", "d"], 99).top_k) == 4


#: Results as they are stored in Redis (written before the results were typed, and now).
STORED = [
    '{"label":"cat","class_id":0,"score":0.9,"top_k":[{"label":"cat","score":0.9},'
    '{"label":"dog","score":0.1}],"model":"shapes","version":2}',
    '{"label":"cat","class_id":0,"score":1.0,"top_k":[]}',
    '{"error":{"code":"truncated","message":"JPEG is truncated"}}',
    '{"error":{"code":"canceled","message":"the job was canceled before this image was classified"}}',
]


@pytest.mark.parametrize("text", STORED)
def test_the_codec_reads_stored_results_and_writes_the_same_bytes(text: str) -> None:
    result = decode(text.encode())
    assert encode(result) == text
    assert decode(encode(result)) == result


def test_a_kept_score_vector_is_stored_exactly_and_never_served() -> None:
    probs = np.array([0.1, 0.6000001, 0.05, 0.2499999], np.float32)
    kept = prediction(probs, ["a", "b", "c", "d"], 1, scores=True).with_model("m", 3)
    text = encode(kept)
    many = np.full(1000, 0.001, np.float32)
    labels = [f"class {i}" for i in range(1000)]
    # 1000 classes: 4000 bytes of base64 (5336 characters), not a list of every class
    assert len(encode(prediction(many, labels, 1, scores=True))) < 5500
    back = decode(text)
    assert back == kept and back.outcome == "done"
    assert isinstance(back, Prediction) and back.score_vector() is not None
    assert back.score_vector().tolist() == probs.tolist()  # float32 exactly, not rounded
    served = Row(0, "x.jpg", back).document()
    assert "scores" not in served and [t["label"] for t in served["top_k"]] == ["b"]
    assert prediction(probs, ["a", "b", "c", "d"], 1).scores is None


def test_decoded_results_are_typed_and_count_as_their_outcome() -> None:
    tagged, plain, bad, canceled = (decode(t) for t in STORED)
    assert tagged == Prediction("cat", 0, 0.9, (TopScore("cat", 0.9), TopScore("dog", 0.1)), "shapes", 2)
    assert plain == Prediction("cat", 0, 1.0, ())
    assert bad == error_result("truncated", "JPEG is truncated") == Failure("truncated", "JPEG is truncated")
    assert canceled == canceled_result()
    assert [r.outcome for r in (tagged, plain, bad, canceled)] == ["done", "done", "failed", "canceled"]


def test_rows_become_the_same_json_lines_as_before() -> None:
    rows = [Row(0, "a.jpg", decode(STORED[0])), Row(1, "b.png", decode(STORED[2])), Row(2, "c.png", None)]
    assert "".join(jsonl_lines(rows)).splitlines() == [
        '{"index":0,"filename":"a.jpg","status":"ok",' + STORED[0][1:],
        # A served error also says whether a retry of the job would queue the image again.
        '{"index":1,"filename":"b.png","status":"error",' + STORED[2][1:-2] + ',"retryable":false}}',
        '{"index":2,"filename":"c.png","status":"pending"}',
    ]


TOP_2 = (TopScore("cat", 0.8125), TopScore("dog", 0.1))


@pytest.mark.parametrize(
    "row",
    [
        Row(0, "a.jpg", Prediction("cat", 3, 0.8125, TOP_2, "m", 2)),
        Row(1, "b.jpg", Prediction("cat", 3, 0.5, ())),
        Row(2, "c.jpg", Failure("not_an_image", "cannot identify image file")),
        Row(3, "d.jpg", None),
        Row(4, "e.jpg", Failure("http_503", "x"), Passthrough("id-4", (("site", "n"), ("n", 2)))),
        Row(5, "f.jpg", None, Passthrough(None, (("site", "s"),))),
    ],
)
def test_a_served_row_reads_back_as_the_same_row(row: Row) -> None:
    # A job's written parts are read back for /results from their JSON Lines.
    line = next(jsonl_lines([row]))
    assert Row.from_document(json.loads(line)) == row


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
        Row(0, "a/x.jpg", prediction(np.array([0.9, 0.1]), ["cat", "dog"], 2)),
        Row(1, "b.png", error_result("truncated", "JPEG is truncated")),
        Row(2, "c.png", None),
    ]
    text = "".join(csv_lines(rows)).splitlines()
    assert text[0] == ",".join(CSV_COLUMNS)
    assert text[1].startswith("a/x.jpg,cat,0.9,0,cat:0.9;dog:0.1,")
    assert text[2] == "b.png,,,,,truncated: JPEG is truncated,,"
    assert text[3] == "c.png,,,,,pending,,"


def test_csv_rows_carry_model_id_and_passthrough_columns() -> None:
    pred = prediction(np.array([0.9, 0.1]), ["cat", "dog"], 1).with_model("pets", 3)
    rows = [
        Row(0, "a.jpg", pred, Passthrough("sku-1", (("shop", "=evil"), ("n", 7)))),
        Row(1, "b.jpg", error_result("not_an_image", "no"), Passthrough("sku-2", (("shop", "x"),))),
        Row(2, "c.jpg", pred, None),
    ]
    text = "".join(csv_lines(rows, with_id=True, columns=["shop", "n"])).splitlines()
    assert text[0] == "filename,id,label,score,class_id,top_k,error,model,version,shop,n"
    assert text[1] == "a.jpg,sku-1,cat,0.9,0,cat:0.9,,pets,3,'=evil,7"
    assert text[2] == "b.jpg,sku-2,,,,,not_an_image: no,,,x,"
    assert text[3] == "c.jpg,,cat,0.9,0,cat:0.9,,pets,3,,"
    doc = rows[0].document()
    assert doc["id"] == "sku-1" and doc["columns"] == {"shop": "=evil", "n": 7}  # JSON keeps raw values
    assert "id" not in rows[2].document()


def test_chunking_keeps_order() -> None:
    assert chunked(list(range(7)), 3) == [[0, 1, 2], [3, 4, 5], [6]]
    assert chunked([], 3) == []


@pytest.mark.parametrize(
    ("code", "retryable"),
    [
        ("fetch_timeout", True),
        ("connection_failed", True),
        ("http_503", True),
        ("http_500", True),
        ("http_599", True),
        ("http_429", True),
        ("http_408", True),
        ("poison_image", True),
        ("delivery_limit", True),
        ("store_full", True),
        ("s3_throttled", True),
        ("s3_unavailable", True),
        ("incomplete_download", True),
        ("access_denied", False),
        ("http_404", False),
        ("http_403", False),
        ("http_600", False),
        ("http_5xx", False),
        ("not_an_image", False),
        ("truncated", False),
        ("too_many_pixels", False),
        ("blocked_address", False),
        ("upload_expired", False),
        ("canceled", False),
    ],
)
def test_which_errors_are_retryable(code: str, retryable: bool) -> None:
    assert Failure(code, "m").retryable is retryable
    row = Row(0, "a.jpg", Failure(code, "m")).document()
    assert row["error"] == {"code": code, "message": "m", "retryable": retryable}
    # What is stored stays {code, message}: the catalogue is applied when a row is served.
    assert encode(Failure(code, "m")) == f'{{"error":{{"code":"{code}","message":"m"}}}}'


def test_a_whole_number_is_an_integer_in_strict_bodies() -> None:
    from pydantic import ValidationError

    from batchvision.core.documents import OpenJob
    from batchvision.core.model_documents import ReloadRequest

    assert ReloadRequest.model_validate({"version": 192.0}).version == 192
    assert OpenJob.model_validate({"expected": 5.0}).expected == 5
    for bad in (192.5, True, "192", 0.0):
        with pytest.raises(ValidationError):
            ReloadRequest.model_validate({"version": bad})
    # The schema keeps the bounds as JSON Schema's minimum and maximum.
    version = ReloadRequest.model_json_schema()["properties"]["version"]["anyOf"][0]
    assert (version["type"], version["minimum"], version["maximum"]) == ("integer", 1, 999_999_999)
    expected = OpenJob.model_json_schema()["properties"]["expected"]["anyOf"][0]
    assert (expected["minimum"], expected["maximum"]) == (0, 100_000_000)


def test_each_end_of_a_retried_job_is_its_own_webhook_delivery() -> None:
    from batchvision.server.webhooks import delivery_id

    assert delivery_id("j" * 32, {}) == "j" * 32
    assert delivery_id("j" * 32, {"retries": "2"}) == "j" * 32 + ".2"
