"""The Open Inference Protocol's request parsing and output tensors
(:mod:`batchvision.server.inference`), without a server."""

from __future__ import annotations

import json
import tracemalloc
from typing import Any

import numpy as np
import pytest

from batchvision.core.imaging import decode_image
from batchvision.core.results import Prediction, TopScore, prediction
from batchvision.server import inference as v2

MODEL = v2.ModelShape("shapes", 3, (4, 2), ["a", "b", "c"])


def _parse(doc: dict[str, Any], binary: bytes = b"") -> v2.InferRequest:
    return v2.parse_request(json.dumps(doc).encode(), binary, MODEL, max_batch=8)


def _pixels(values: Any, shape: list[int]) -> dict[str, Any]:
    return {"inputs": [{"name": "pixels", "datatype": "FP32", "shape": shape, "data": values}]}


def test_bytes_round_trip_and_binary_images() -> None:
    items = [b"\x89PNG...", b"", b"x" * 300]
    assert v2.deserialize_bytes(v2.serialize_bytes(items)) == items
    raw = v2.serialize_bytes(items[:2])
    tensor = {
        "name": "images",
        "datatype": "BYTES",
        "shape": [2],
        "parameters": {"binary_data_size": len(raw)},
    }
    req = _parse({"inputs": [tensor], "parameters": {"top_k": 2}}, raw)
    assert (req.images, req.top_k, req.outputs) == (items[:2], 2, {"scores": False, "labels": False})


def test_binary_bytes_beyond_the_shape_are_refused_before_they_are_read() -> None:
    # 4-byte length + 1 byte, a million times: reading them all first held ~80 MB of objects.
    raw = v2.serialize_bytes([b"x"]) * 1_000_000
    tensor = {
        "name": "images",
        "datatype": "BYTES",
        "shape": [1],
        "parameters": {"binary_data_size": len(raw)},
    }
    tracemalloc.start()
    try:
        with pytest.raises(v2.ProtocolError) as err:
            _parse({"inputs": [tensor]}, raw)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert "more than the 1 elements its shape says" in err.value.message
    assert peak < 1_000_000, peak


def test_pixels_become_lossless_pngs_of_the_same_values() -> None:
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 256, size=(2, 2, 4, 3)).astype(np.float32)
    req = _parse(_pixels(arr.tolist(), [2, 2, 4, 3]))
    for img, png in zip(arr, req.images, strict=True):
        assert np.array_equal(decode_image(png, (4, 2), max_pixels=100), img.astype(np.uint8))


@pytest.mark.parametrize(
    ("doc", "binary", "text"),
    [
        (_pixels([0] * 24, [1, 2, 4]), b"", "shape must be [N, 2, 4, 3]"),
        (_pixels([0] * 24, [1, 4, 2, 3]), b"", "shape must be [N, 2, 4, 3]"),
        (_pixels([0.25] + [0] * 23, [1, 2, 4, 3]), b"", "element [0, 0, 0, 0] is 0.25"),
        (_pixels([256] + [0] * 23, [1, 2, 4, 3]), b"", "whole numbers from 0 to 255"),
        (_pixels([0] * 23, [1, 2, 4, 3]), b"", "says 24 values"),
        (
            {"inputs": [{"name": "pixels", "datatype": "INT8", "shape": [1, 2, 4, 3], "data": []}]},
            b"",
            "FP32",
        ),
        ({"inputs": [{"name": "images", "datatype": "FP32", "shape": [1], "data": [1]}]}, b"", "BYTES"),
        ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [2], "data": ["AA=="]}]}, b"", "has 1"),
        ({"inputs": [{"name": "images", "datatype": "BYTES", "shape": [9], "data": []}]}, b"", "1 to 8"),
        (
            {"inputs": [{"name": "x", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}]},
            b"",
            "unknown input",
        ),
        ({"inputs": []}, b"", "exactly one tensor"),
        (
            {
                "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
                "outputs": [{"name": "z"}],
            },
            b"",
            "unknown output 'z'",
        ),
        (
            {
                "inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["AA=="]}],
                "parameters": {"top_k": 4},
            },
            b"",
            "1 to 3",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 9},
                    }
                ]
            },
            b"\0\0\0\0",
            "does not match",
        ),
        (
            {
                "inputs": [
                    {
                        "name": "images",
                        "datatype": "BYTES",
                        "shape": [1],
                        "parameters": {"binary_data_size": 4},
                    }
                ]
            },
            b"\x09\x00\x00\x00",
            "ends inside",
        ),
    ],
)
def test_bad_requests_name_the_problem(doc: dict[str, Any], binary: bytes, text: str) -> None:
    with pytest.raises(v2.ProtocolError, match=None) as err:
        _parse(doc, binary)
    assert text in err.value.message and err.value.status == 400


def test_json_too_deep_or_too_large_for_any_request_is_refused_before_it_is_parsed() -> None:
    # 4x2 pixels x 3 channels x 8 images at most: a request cannot need many more tokens.
    for header, text in (
        (b"[" * 10_000, "nested deeper than 16"),  # json.loads: RecursionError, a 500
        (b'{"inputs": [' + b"0," * 3_000 + b"0]}", "larger than an infer request of up to 8"),
    ):
        with pytest.raises(v2.ProtocolError) as err:
            v2.parse_request(header, b"", MODEL, max_batch=8)
        assert text in err.value.message and err.value.status == 400
    # The largest request there can be, nested per its shape, passes the check.
    biggest = [[[[255.0] * 3] * 4] * 2] * 8
    assert len(_parse(_pixels(biggest, [8, 2, 4, 3])).images) == 8


def _kept(probs: list[float], top_k: int = 2) -> Prediction:
    """The result a worker stores for a ``/v2`` job: the request's top_k, every class's score
    kept as a vector."""
    return prediction(np.array(probs, dtype=np.float32), MODEL.labels, top_k, scores=True)


def test_outputs_from_score_vectors_in_label_order_json_and_binary() -> None:
    probs = [0.2000001, 0.1, 0.6999999]
    req = v2.InferRequest(
        id="r1", input="images", images=[b"", b""], top_k=2, outputs={"scores": False, "labels": True}
    )
    head, tail = v2.response(req, MODEL, 3, [_kept(probs), _kept([0.1, 0.8, 0.1])], "j" * 32)
    assert head["id"] == "r1" and head["model_version"] == "3"
    scores, labels = head["outputs"]
    # The worker's float32 values, not the 6-decimal scores of /v1 rows.
    assert scores["data"][:3] == np.array(probs, dtype=np.float32).tolist()
    assert scores["shape"] == [2, 3]
    assert labels["parameters"]["binary_data_size"] == len(tail)
    assert v2.deserialize_bytes(tail) == [b"c", b"a", b"b", b"a"]


def test_binary_scores_are_the_stored_vectors() -> None:
    req = v2.InferRequest(id=None, input="images", images=[b""], top_k=1, outputs={"scores": True})
    head, tail = v2.response(req, MODEL, 1, [_kept([0.25, 0.5, 0.25], 1)], "j" * 32)
    assert head["outputs"][0]["parameters"]["binary_data_size"] == 12
    assert np.frombuffer(tail, dtype="<f4").tolist() == [0.25, 0.5, 0.25]


def test_a_result_without_its_vector_is_a_503_not_a_guess() -> None:
    # An older worker (a rolling upgrade) stores its top_k alone.
    old = Prediction("c", 2, 0.7, (TopScore("c", 0.7), TopScore("a", 0.2)))
    req = v2.InferRequest(id=None, input="images", images=[b""], top_k=2, outputs={"scores": False})
    for stored in (old, prediction(np.array([0.5, 0.5], np.float32), ["a", "b"], 1, scores=True)):
        with pytest.raises(v2.MissingScores) as err:
            v2.response(req, MODEL, 3, [stored], "j" * 32)
        assert err.value.status == 503 and "element 0" in err.value.message


def test_more_classes_than_the_published_labels() -> None:
    # Workers publish the first 1,000 labels and the number of classes.
    big = v2.ModelShape("big", 1, (4, 2), [f"c{i}" for i in range(1000)], classes=1001)
    assert big.outputs()[0]["shape"] == [-1, 1001]
    probs = np.full(1001, 0.5 / 1000, np.float32)
    probs[1000] = 0.5
    stored = prediction(probs, [f"c{i}" for i in range(1001)], 2, scores=True)
    req = v2.InferRequest(id=None, input="images", images=[b""], top_k=2, outputs={"scores": True})
    head, tail = v2.response(req, big, 1, [stored], "j" * 32)
    scores = np.frombuffer(tail, dtype="<f4")
    assert head["outputs"][0]["shape"] == [1, 1001] and scores[1000] == 0.5
    doc = {"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["aGk="]}]}
    with pytest.raises(v2.ProtocolError, match="from 1 to 1000"):
        v2.parse_request(json.dumps({**doc, "parameters": {"top_k": 1001}}).encode(), b"", big, max_batch=8)
