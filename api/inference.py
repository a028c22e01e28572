"""``/v2``: the Open Inference Protocol (KServe v2) over HTTP, for every model the workers serve.

An ``infer`` request is a small job: its images go through the same intake, queue, batcher and
workers as ``POST /v1/classify`` (interactive lane), and the answer waits for the job like it.
The protocol itself (inputs, outputs, the binary tensor extension) is
:mod:`batchvision.server.inference`. Errors are the protocol's ``{"error": "<message>"}``.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import orjson
from flask import Blueprint, Response, request
from pydantic import BaseModel, ConfigDict

from api import contract as c
from api.auth import current_owner
from api.metrics import count_submitted
from api.services import Services, services
from batchvision import __version__
from batchvision.core.errors import BatchvisionError, ImageTooLarge, NotFound, ServiceUnavailable
from batchvision.core.results import Failure, Prediction
from batchvision.server import inference as v2
from batchvision.server.intake import Upload, check
from batchvision.server.registry import READY
from batchvision.server.routing import default_model

bp = Blueprint("v2", __name__, url_prefix="/v2")


class InferenceError(BaseModel):
    """The Open Inference Protocol's error document."""

    model_config = ConfigDict(extra="forbid")
    error: str


_OBJECT = {"type": "object"}
_TENSOR = {
    "type": "object",
    "required": ["name", "shape", "datatype"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer", "minimum": 0}},
        "datatype": {"type": "string"},
        "parameters": {"type": "object"},
        "data": {"type": "array"},
    },
}
_INFER_BODY = {
    "application/json": {
        "schema": {
            "type": "object",
            "required": ["inputs"],
            "properties": {
                "id": {"type": "string"},
                "parameters": {"type": "object"},
                "inputs": {"type": "array", "items": _TENSOR},
                "outputs": {"type": "array", "items": {"type": "object"}},
            },
        }
    },
    # The binary tensor extension: the JSON header (its length in Inference-Header-Content-Length),
    # then the tensors' bytes.
    "application/octet-stream": {"schema": {"type": "string", "format": "binary"}},
}


def _error(text: str) -> c.Response:
    return c.Response(text, InferenceError)


_MODEL_ERRORS = {
    400: _error("A version that is not a whole number, or the model is not ready"),
    401: _error("API key missing or invalid (when keys are configured)"),
    404: _error("No such model or version"),
    503: _error("Redis or the broker is unreachable"),
}


# -- server ----------------------------------------------------------------------------------


@bp.get("")
@c.contract(
    summary="Server metadata (Open Inference Protocol)",
    responses={200: c.Response("Name, version, extensions", schema=_OBJECT)},
    v1=False,
    tags=("v2",),
)
def server_metadata() -> dict[str, Any]:
    return {"name": "batchvision", "version": __version__, "extensions": ["binary_tensor_data"]}


@bp.get("/health/live")
@c.contract(
    summary="Liveness (Open Inference Protocol): the process answers",
    responses={200: c.Response("Alive", schema=_OBJECT)},
    v1=False,
    tags=("v2",),
)
def live() -> dict[str, Any]:
    return {"live": True}


@bp.get("/health/ready")
@c.contract(
    summary="Readiness (Open Inference Protocol): Redis answers and the default model has a ready version",
    responses={
        200: c.Response("Ready", schema=_OBJECT),
        503: _error("Redis is unreachable, or no worker has the default model ready"),
    },
    v1=False,
    tags=("v2",),
)
def ready() -> dict[str, Any]:
    svc = services()
    name = default_model(svc.settings)
    try:
        _ready_version(svc, name, None, unavailable=True)
    except NotFound as exc:  # no worker has announced it yet
        raise ServiceUnavailable(exc.message) from exc
    return {"ready": True}


# -- models ----------------------------------------------------------------------------------


def _entry(svc: Services, name: str) -> dict[str, Any]:
    entry: dict[str, Any] | None = svc.models.raw().get(name)
    if entry is None:
        known = ", ".join(sorted(svc.models.raw())) or "none yet"
        raise NotFound(f"no model {name[:80]!r}: the workers serve {known}")
    return entry


def _ready_version(
    svc: Services, name: str, version: str | None, *, unavailable: bool = False
) -> tuple[v2.ModelShape, list[int]]:
    """The model's version ``version`` (the live one when ``None``), loaded by a worker; and
    the versions ready. ``404`` for an unknown model or version, ``400`` when not ready (``503``
    with ``unavailable``, for the server's readiness)."""
    entry = _entry(svc, name)
    versions = entry["versions"]
    ready = sorted(v for v, doc in versions.items() if doc.get("status") == READY)
    if version is None:
        number = entry["model"].get("live")
    elif version.isascii() and version.isdigit() and len(version) <= 9:
        number = int(version)
        if number not in versions:
            have = ", ".join(str(v) for v in sorted(versions)) or "none"
            raise NotFound(f"model {name!r} has no version {version}: it has {have}")
    else:
        raise v2.ProtocolError(
            f"version {version[:40]!r} is not a version: versions are whole numbers (at most 9 digits)"
        )
    doc = versions.get(number) if number is not None else None
    if doc is None or doc.get("status") != READY:
        why = f"model {name!r} version {number} is not ready ({(doc or {}).get('status', 'not loaded')})"
        if unavailable:
            raise ServiceUnavailable(why)
        raise v2.ProtocolError(why)
    width, height = doc["input_size"]
    labels = list(doc["labels"])
    shape = v2.ModelShape(name, int(number), (int(width), int(height)), labels, doc.get("classes"))
    return shape, ready


_METADATA = {
    200: c.Response("Name, versions, platform, inputs and outputs with datatypes and shapes", schema=_OBJECT),
    **_MODEL_ERRORS,
}


@bp.get("/models/<name>")
@c.contract(summary="Model metadata (live version)", responses=_METADATA, v1=False, tags=("v2",))
def model_metadata(name: str) -> dict[str, Any]:
    shape, ready = _ready_version(services(), name, None)
    return shape.metadata(ready)


@bp.get("/models/<name>/versions/<version>")
@c.contract(summary="Model metadata (one version)", responses=_METADATA, v1=False, tags=("v2",))
def version_metadata(name: str, version: str) -> dict[str, Any]:
    shape, _ = _ready_version(services(), name, version)
    return shape.metadata([shape.version])


_READY = {200: c.Response("Ready", schema=_OBJECT), **_MODEL_ERRORS}


@bp.get("/models/<name>/ready")
@c.contract(
    summary="Model readiness (live version): 200 when ready", responses=_READY, v1=False, tags=("v2",)
)
def model_ready(name: str) -> dict[str, Any]:
    shape, _ = _ready_version(services(), name, None)
    return {"name": name, "version": str(shape.version), "ready": True}


@bp.get("/models/<name>/versions/<version>/ready")
@c.contract(summary="Model readiness (one version): 200 when ready", responses=_READY, v1=False, tags=("v2",))
def version_ready(name: str, version: str) -> dict[str, Any]:
    shape, _ = _ready_version(services(), name, version)
    return {"name": name, "version": str(shape.version), "ready": True}


# -- infer -----------------------------------------------------------------------------------

_INFER = {
    "summary": "Classify a batch (Open Inference Protocol): BYTES images or an FP32 pixel tensor",
    "description": "One input: `images` (BYTES `[N]`, encoded images) or `pixels` (FP32 `[N, H, W, "
    "3]`, whole RGB values 0-255 at the model's input size). Outputs `scores` (FP32 `[N, classes]`) "
    "and `labels` (BYTES `[N, top_k]`); parameter `top_k` (default 1). JSON tensors, or the binary "
    "tensor extension (`Inference-Header-Content-Length`).",
    "body": _INFER_BODY,
    "body_required": True,
    "responses": {
        200: c.Response(
            "The outputs (JSON, or the JSON header followed by binary tensors)",
            schema=_OBJECT,
            headers=(v2.HEADER_LENGTH,),
            alternatives={"application/octet-stream": {"type": "string", "format": "binary"}},
        ),
        **_MODEL_ERRORS,
        400: _error(
            "A wrong input name, datatype or shape, an element that is not an image, top_k out of "
            "range, or the model is not ready",
        ),
        408: _error(c.BODY_TIMEOUT),
        413: _error("The request, or one of its images, is over a size or pixel limit"),
        429: _error("Queue limit reached; retry after `Retry-After` seconds"),
        500: _error("The model failed on an image"),
    },
    "v1": False,
    "tags": ("v2",),
}


@bp.post("/models/<name>/infer")
@c.contract(**_INFER)
def infer(name: str) -> Response:
    return _infer(name, None)


@bp.post("/models/<name>/versions/<version>/infer")
@c.contract(**_INFER)
def infer_version(name: str, version: str) -> Response:
    return _infer(name, version)


def _infer(name: str, version: str | None) -> Response:
    svc = services()
    shape, _ = _ready_version(svc, name, version)
    header, binary = v2.split_body(request.get_data(cache=False), request.headers.get(v2.HEADER_LENGTH))
    req = v2.parse_request(header, binary, shape, max_batch=svc.settings.max_files_per_request)
    uploads = [Upload(str(i), f"{req.input}[{i}]", data) for i, data in enumerate(req.images)]
    for i, problem in enumerate(check(svc.settings, uploads)):
        if isinstance(problem, ImageTooLarge):  # 413, as /v1 answers an image over a limit
            raise ImageTooLarge(f"input {req.input!r} element {i} is over a limit: {problem.message}")
        if problem is not None:
            raise v2.ProtocolError(
                f"input {req.input!r} element {i} is not an image we can classify: {problem.message}"
            )
    # Each result keeps every class's score as a vector (the scores tensor) and the request's
    # top_k best classes, named by the worker (the labels tensor).
    ref = name if version is None else f"{name}:{shape.version}"
    options = svc.intake.options(ref, top_k=req.top_k, owner=current_owner())
    options = replace(options, scores=True)
    since = svc.waiter.mark()  # before the job exists: its finish cannot be missed
    submitted = svc.intake.submit(
        None,
        current_owner(),
        uploads,
        [],
        seal=True,
        interactive=True,
        options=options,
        reply_to=svc.waiter.channel,
    )
    count_submitted(submitted, created=True)
    job_id = submitted.job_id
    finished = svc.waiter.wait(job_id, svc.settings.sync_timeout_s, since)
    if finished is None:
        svc.store.cancel(job_id)  # nobody will ask for it: free the workers
        raise ServiceUnavailable(f"no result within {svc.settings.sync_timeout_s:g} s; retry later")
    _, stored = svc.store.snapshot(job_id, rows=len(uploads), reply=finished.reply)
    predictions = []
    for row in stored:
        if not isinstance(row.result, Prediction):
            err = row.result or Failure("pending", "pending")
            text = f"input {req.input!r} element {row.index}: {err.message}"
            if err.code == "too_many_pixels":
                raise ImageTooLarge(text)
            if err.code in ("corrupt_image", "not_an_image", "truncated"):
                raise v2.ProtocolError(text)
            raise BatchvisionError(text, code=err.code)
        predictions.append(row.result)
    served = predictions[0].version or shape.version
    if served != shape.version:  # a reload between the lookup and the batch: that version's labels
        shape, _ = _ready_version(svc, name, str(served))
    head, tail = v2.response(req, shape, served, predictions, job_id)
    body = orjson.dumps(head, option=orjson.OPT_SERIALIZE_NUMPY)
    if not tail:
        return Response(body, mimetype="application/json")
    resp = Response(body + tail, mimetype="application/octet-stream")
    resp.headers[v2.HEADER_LENGTH] = str(len(body))
    return resp
