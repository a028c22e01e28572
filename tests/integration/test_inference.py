"""The Open Inference Protocol (``/v2``) driven by the real ``tritonclient[http]`` against the
API and a worker serving the demo model: metadata, a batch of encoded images, an FP32 pixel
tensor, and the protocol's errors. Each request is a small job on the same queue and workers as
``/v1/classify``: its results agree with that route's, and the job is readable under ``/v1``."""

from __future__ import annotations

import base64
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests
import tritonclient.http as triton
from tritonclient.utils import InferenceServerException

from batchvision.core.imaging import decode_image
from batchvision.core.synthetic import labelled_files
from batchvision.server.keys import JobKeys

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def client(api_url: str) -> Iterator[triton.InferenceServerClient]:
    c = triton.InferenceServerClient(url=api_url.removeprefix("http://"), network_timeout=120.0)
    yield c
    c.close()


@pytest.fixture(scope="module")
def model(api_url: str) -> dict[str, Any]:
    """The default model's entry of ``GET /v1/models``."""
    doc = requests.get(f"{api_url}/v1/models", timeout=10).json()
    return next(m for m in doc["models"] if m["name"] == doc["default"])


@pytest.fixture(scope="module")
def files() -> list[tuple[str, bytes, str]]:
    return list(labelled_files(6, seed=41))


def _images(files: list[tuple[str, bytes, str]]) -> triton.InferInput:
    arr = np.array([data for _, data, _ in files], dtype=np.object_)
    inp = triton.InferInput("images", [len(files)], "BYTES")
    inp.set_data_from_numpy(arr)
    return inp


def _classify_v1(api_url: str, files: list[tuple[str, bytes, str]], top_k: int) -> list[dict[str, Any]]:
    rows = []
    for name, data, _ in files:  # one image a job: /v1/classify's own answer for it
        resp = requests.post(
            f"{api_url}/v1/classify?timeout=60&top_k={top_k}&filename={name}",
            data=data,
            headers={"Content-Type": "image/jpeg"},
            timeout=90,
        )
        assert resp.status_code == 200, resp.text
        rows.extend(resp.json()["results"])
    return rows


def test_health_and_model_metadata(client: triton.InferenceServerClient, model: dict[str, Any]) -> None:
    assert client.is_server_live()
    assert client.is_server_ready()
    assert client.is_model_ready(model["name"])
    assert client.is_model_ready(model["name"], str(model["live_version"]))
    assert not client.is_model_ready("no-such-model")
    meta = client.get_model_metadata(model["name"])
    w, h = model["input_size"]
    assert meta["name"] == model["name"]
    assert meta["versions"] == [str(model["live_version"])]
    assert meta["inputs"] == [
        {"name": "images", "datatype": "BYTES", "shape": [-1]},
        {"name": "pixels", "datatype": "FP32", "shape": [-1, h, w, 3]},
    ]
    assert meta["outputs"][0] == {"name": "scores", "datatype": "FP32", "shape": [-1, model["classes"]]}
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata("no-such-model")
    assert err.value.status() == "404" and "no model 'no-such-model'" in err.value.message()
    with pytest.raises(InferenceServerException) as err:
        client.get_model_metadata(model["name"], "999")
    assert err.value.status() == "404" and "no version 999" in err.value.message()


def test_the_answer_comes_with_the_news_of_the_job_s_finish(
    client: triton.InferenceServerClient,
    model: dict[str, Any],
    files: list[tuple[str, bytes, str]],
    redis_commands: Callable[[], AbstractContextManager[list[dict[str, Any]]]],
) -> None:
    with redis_commands() as seen:
        result = client.infer(model["name"], [_images(files)])
    assert result.as_numpy("scores").shape == (len(files), model["classes"])
    job = JobKeys.of(result.get_response()["parameters"]["job_id"]).job
    # Read once, by the finishing script for its news; the API reads nothing back.
    assert [c["client_type"] for c in seen if c["command"].split(" ")[:2] == ["HGETALL", job]] == ["lua"]


@pytest.mark.parametrize("binary", [True, False], ids=["binary", "json"])
def test_a_batch_of_images_gives_v1s_results(
    client: triton.InferenceServerClient,
    model: dict[str, Any],
    files: list[tuple[str, bytes, str]],
    api_url: str,
    binary: bool,
) -> None:
    inp = triton.InferInput("images", [len(files)], "BYTES")
    arr = np.array([data for _, data, _ in files], dtype=np.object_)
    if binary:
        inp.set_data_from_numpy(arr)
    else:  # JSON data: BYTES elements as base64 strings
        inp.set_data_from_numpy(
            np.array([base64.b64encode(b).decode() for b in arr], dtype=np.object_), False
        )
    outputs = [triton.InferRequestedOutput(n, binary_data=binary) for n in ("scores", "labels")]
    result = client.infer(model["name"], [inp], outputs=outputs, parameters={"top_k": 3})
    scores, labels = result.as_numpy("scores"), result.as_numpy("labels")
    assert scores.shape == (len(files), model["classes"]) and labels.shape == (len(files), 3)
    assert np.allclose(scores.sum(axis=1), 1.0, atol=1e-4)
    expected = _classify_v1(api_url, files, top_k=3)
    for n, row in enumerate(expected):
        assert [x.decode() if isinstance(x, bytes) else x for x in labels[n]] == [
            t["label"] for t in row["top_k"]
        ]
        assert model["labels"][int(np.argmax(scores[n]))] == row["label"]
        assert scores[n].max() == pytest.approx(row["score"], abs=1e-6)
    # It was a job like any other: readable under /v1 with every image done.
    job_id = result.get_response()["parameters"]["job_id"]
    job = requests.get(f"{api_url}/v1/jobs/{job_id}", timeout=10).json()
    assert (job["status"], job["total"], job["done"]) == ("succeeded", len(files), len(files))
    assert result.get_response()["model_version"] == str(model["live_version"])


def test_an_fp32_tensor_gives_what_the_same_pixels_give_as_an_image(
    client: triton.InferenceServerClient, model: dict[str, Any], files: list[tuple[str, bytes, str]]
) -> None:
    w, h = model["input_size"]
    pixels = np.stack([decode_image(data, (w, h), max_pixels=10**7) for _, data, _ in files])
    inp = triton.InferInput("pixels", list(pixels.shape), "FP32")
    inp.set_data_from_numpy(pixels.astype(np.float32))
    tensor = client.infer(model["name"], [inp], model_version=str(model["live_version"])).as_numpy("scores")
    # The same images, decoded by the worker: the pixels are exactly what it would have made.
    images = client.infer(model["name"], [_images(files)]).as_numpy("scores")
    assert tensor.shape == images.shape
    assert np.allclose(tensor, images, atol=1e-6)


def _fails(client: triton.InferenceServerClient, name: str, inp: Any, **kw: Any) -> str:
    with pytest.raises(InferenceServerException) as err:
        client.infer(name, [inp], **kw)
    assert err.value.status() == "400", err.value.message()
    return str(err.value.message())


def test_bad_requests_get_400_with_the_protocols_error_body(
    client: triton.InferenceServerClient,
    model: dict[str, Any],
    files: list[tuple[str, bytes, str]],
    api_url: str,
) -> None:
    name = model["name"]
    w, h = model["input_size"]
    wrong_shape = triton.InferInput("pixels", [1, h + 1, w, 3], "FP32")
    wrong_shape.set_data_from_numpy(np.zeros((1, h + 1, w, 3), np.float32))
    assert f"shape must be [N, {h}, {w}, 3]" in _fails(client, name, wrong_shape)

    wrong_type = triton.InferInput("images", [2], "FP32")
    wrong_type.set_data_from_numpy(np.zeros(2, np.float32))
    assert "must have datatype BYTES" in _fails(client, name, wrong_type)

    unknown = triton.InferInput("input__0", [1], "BYTES")
    unknown.set_data_from_numpy(np.array([files[0][1]], dtype=np.object_))
    assert "unknown input 'input__0'" in _fails(client, name, unknown)

    not_image = triton.InferInput("images", [2], "BYTES")
    not_image.set_data_from_numpy(np.array([files[0][1], b"just some text"], dtype=np.object_))
    message = _fails(client, name, not_image)
    assert "element 1 is not an image" in message and "not an image file" in message

    fractional = triton.InferInput("pixels", [1, h, w, 3], "FP32")
    fractional.set_data_from_numpy(np.full((1, h, w, 3), 0.5, np.float32))
    assert "whole numbers from 0 to 255" in _fails(client, name, fractional)

    assert "top_k must be a whole number from 1 to" in _fails(
        client, name, _images(files), parameters={"top_k": 0}
    )

    # Without tritonclient: the raw error document.
    resp = requests.post(f"{api_url}/v2/models/{name}/infer", data=b"{not json", timeout=10)
    assert resp.status_code == 400 and set(resp.json()) == {"error"}
    resp = requests.post(
        f"{api_url}/v2/models/{name}/infer",
        json={"inputs": [{"name": "images", "datatype": "BYTES", "shape": [1], "data": ["%%%"]}]},
        timeout=10,
    )
    assert resp.status_code == 400 and "not valid base64" in resp.json()["error"]
    # Every error under /v2 has the protocol's body: routing, the method, a version that only
    # looks like digits, and JSON nested too deep for the parser.
    for method, path, body, status in (
        ("GET", "/v2/no/such/route", None, 404),
        ("DELETE", f"/v2/models/{name}", None, 405),
        ("GET", f"/v2/models/{name}/versions/\u00b2", None, 400),
        ("GET", f"/v2/models/{name}/versions/{'9' * 5000}", None, 400),
        ("POST", f"/v2/models/{name}/infer", b"[" * 100_000, 400),
    ):
        resp = requests.request(method, f"{api_url}{path}", data=body, timeout=10)
        assert resp.status_code == status and isinstance(resp.json()["error"], str), (path[:60], resp.text)


def test_an_image_over_the_pixel_limit_is_413_as_on_v1(
    model: dict[str, Any],
    files: list[tuple[str, bytes, str]],
    api_url: str,
    png_header_only: Callable[[int, int], bytes],
) -> None:
    huge = png_header_only(20_000, 20_000)
    body = {
        "inputs": [
            {
                "name": "images",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(d).decode() for d in (files[0][1], huge)],
            }
        ]
    }
    resp = requests.post(f"{api_url}/v2/models/{model['name']}/infer", json=body, timeout=30)
    assert resp.status_code == 413 and set(resp.json()) == {"error"}, resp.text
    assert "element 1 is over a limit" in resp.json()["error"]
    v1 = requests.post(f"{api_url}/v1/classify", data=huge, headers={"Content-Type": "image/png"}, timeout=30)
    assert v1.status_code == 413, v1.text


def test_the_v2_routes_are_in_the_api_document(api_url: str, tmp_path: Path) -> None:
    paths = requests.get(f"{api_url}/openapi.json", timeout=10).json()["paths"]
    for path in (
        "/v2/health/live",
        "/v2/health/ready",
        "/v2/models/{name}",
        "/v2/models/{name}/versions/{version}/infer",
    ):
        assert path in paths


def test_without_a_worker_the_server_is_live_but_not_ready(
    api_alone: Callable[..., AbstractContextManager[Any]],
) -> None:
    with api_alone() as api:
        client = triton.InferenceServerClient(url=api.url.removeprefix("http://"))
        assert client.is_server_live()
        assert not client.is_server_ready()
        resp = requests.get(f"{api.url}/v2/health/ready", timeout=10)
        assert resp.status_code == 503 and "no model" in resp.json()["error"]
        with pytest.raises(InferenceServerException) as err:
            client.get_model_metadata("demo")
        assert err.value.status() == "404"
        client.close()
