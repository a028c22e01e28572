"""The Open Inference Protocol (KServe v2, as Triton, KServe, TorchServe and Seldon speak it)
over HTTP: an ``infer`` request parsed into encoded images, and a job's result rows turned into
output tensors. Protocol handling only: the API's ``/v2`` routes submit the images as one small
job through the same intake, queue, batcher and workers as ``POST /v1/classify``.

Every model takes one of two inputs, one tensor per request:

- ``images``, ``BYTES`` ``[N]``: encoded images (JPEG, PNG, WebP, BMP, GIF), one per element;
- ``pixels``, ``FP32`` ``[N, H, W, 3]``: RGB pixel values 0 to 255 at the model's input size,
  for clients that decode and resize themselves. Every value must be a whole number: the tensor
  is stored as lossless PNGs, so it takes exactly the path (and gives exactly the result) of an
  image of that size, and the model's own scaling is applied by the worker as for any image.

and answers ``scores`` (``FP32 [N, classes]``, the class probabilities in label order) and
``labels`` (``BYTES [N, top_k]``, best first; ``top_k`` is a request parameter, default 1).
Tensors travel as JSON ``data`` (``BYTES`` as base64 strings in JSON) or with the binary tensor
extension (``binary_data_size``, ``Inference-Header-Content-Length``), as ``tritonclient`` sends.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

from batchvision.core.errors import BadRequest, ServiceUnavailable
from batchvision.core.manifest import json_tokens
from batchvision.core.model_refs import MAX_TOP_K
from batchvision.core.results import Prediction

IMAGES = "images"
PIXELS = "pixels"
SCORES = "scores"
LABELS = "labels"
OUTPUTS = (SCORES, LABELS)
#: The header that says how long the JSON part of a binary-extension body is.
HEADER_LENGTH = "Inference-Header-Content-Length"


class ProtocolError(BadRequest):
    """A v2 request that does not fit the model (``400``, the protocol's ``{"error": ...}``)."""

    code = "bad_inference_request"


@dataclass(frozen=True)
class ModelShape:
    """What the protocol needs of a model version: its name, input size, labels (the workers
    publish the first 1,000) and number of classes (``None``: as many as labels)."""

    name: str
    version: int
    input_size: tuple[int, int]  # (width, height)
    labels: Sequence[str]
    classes: int | None = None

    @property
    def width(self) -> int:
        """The number of classes: the scores tensor's second dimension."""
        return self.classes if self.classes is not None else len(self.labels)

    def inputs(self) -> list[dict[str, Any]]:
        """The model metadata's ``inputs``."""
        w, h = self.input_size
        return [
            {"name": IMAGES, "datatype": "BYTES", "shape": [-1]},
            {"name": PIXELS, "datatype": "FP32", "shape": [-1, h, w, 3]},
        ]

    def outputs(self) -> list[dict[str, Any]]:
        """The model metadata's ``outputs``."""
        return [
            {"name": SCORES, "datatype": "FP32", "shape": [-1, self.width]},
            {"name": LABELS, "datatype": "BYTES", "shape": [-1, -1]},
        ]

    def metadata(self, versions: Sequence[int]) -> dict[str, Any]:
        """``GET /v2/models/{name}[/versions/{v}]``."""
        return {
            "name": self.name,
            "versions": [str(v) for v in versions],
            "platform": "batchvision",
            "inputs": self.inputs(),
            "outputs": self.outputs(),
        }


@dataclass
class InferRequest:
    """A parsed ``infer`` request."""

    id: str | None
    input: str
    images: list[bytes]
    top_k: int
    #: The outputs to answer, each with whether it goes as binary data.
    outputs: dict[str, bool] = field(default_factory=dict)


def split_body(body: bytes, header_length: str | None) -> tuple[bytes, bytes]:
    """The JSON part and the binary part of a request body."""
    if header_length is None:
        return body, b""
    try:
        n = int(header_length)
    except ValueError:
        raise ProtocolError(f"header {HEADER_LENGTH} must be a whole number, got {header_length!r}") from None
    if not 0 <= n <= len(body):
        raise ProtocolError(f"header {HEADER_LENGTH}={n} does not fit the body of {len(body)} bytes")
    return body[:n], body[n:]


def parse_request(header: bytes, binary: bytes, model: ModelShape, *, max_batch: int) -> InferRequest:
    """Check an ``infer`` request against ``model``; :class:`ProtocolError` names what is wrong
    and what is allowed."""
    _check_json_size(header, model, max_batch)
    try:
        doc = json.loads(header)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError(f"the request is not valid JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("the request must be a JSON object with 'inputs'")
    inputs = doc.get("inputs")
    if not isinstance(inputs, list) or len(inputs) != 1 or not isinstance(inputs[0], dict):
        raise ProtocolError(
            f"'inputs' must list exactly one tensor: {IMAGES!r} (BYTES, encoded images) or {PIXELS!r} "
            f"(FP32 {model.inputs()[1]['shape']})"
        )
    params = _object(doc.get("parameters"), "parameters")
    tensor = inputs[0]
    name = tensor.get("name")
    shape = _shape(tensor.get("shape"), name)
    datatype = tensor.get("datatype")
    data = _tensor_bytes(tensor, binary, name)
    if name == IMAGES:
        images = _images(shape, datatype, tensor, data, max_batch)
    elif name == PIXELS:
        images = _pixels(shape, datatype, tensor, data, model, max_batch)
    else:
        raise ProtocolError(
            f"unknown input {str(name)[:80]!r}: model {model.name!r} takes {IMAGES!r} (BYTES, encoded "
            f"images) or {PIXELS!r} (FP32 {model.inputs()[1]['shape']})"
        )
    top_k = params.get("top_k", 1)
    classes = min(model.width, MAX_TOP_K)
    if not isinstance(top_k, int) or isinstance(top_k, bool) or not 1 <= top_k <= classes:
        raise ProtocolError(f"parameter top_k must be a whole number from 1 to {classes}, got {top_k!r}")
    binary_default = params.get("binary_data_output") is True
    outputs = _requested(doc.get("outputs"), binary_default)
    request_id = doc.get("id")
    return InferRequest(
        id=request_id if isinstance(request_id, str) else None,
        input=name,
        images=images,
        top_k=top_k,
        outputs=outputs,
    )


def _object(value: Any, where: str) -> dict[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ProtocolError(f"'{where}' must be a JSON object")
    return value


def _shape(value: Any, name: Any) -> list[int]:
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value)
    ):
        raise ProtocolError(f"input {str(name)[:80]!r}: 'shape' must be a list of whole numbers >= 0")
    return value


#: How deep an infer request's JSON may nest (a pixel tensor as nested lists is 5 levels in it).
MAX_JSON_DEPTH = 16


def _check_json_size(header: bytes, model: ModelShape, max_batch: int) -> None:
    """Refuse a JSON header nested deeper than :data:`MAX_JSON_DEPTH` or with more tokens than
    the largest request can have (``max_batch`` images as FP32 pixels, nested, two tokens an
    element at most), before the parser's recursion or its objects (a float in JSON becomes
    a Python object of about five times its text) are reached."""
    w, h = model.input_size
    budget = 2 * max_batch * h * w * 3 + 1024
    for count, (depth, _) in enumerate(json_tokens(header)):
        if depth > MAX_JSON_DEPTH:
            raise ProtocolError(f"the request's JSON is nested deeper than {MAX_JSON_DEPTH} levels")
        if count > budget:
            raise ProtocolError(
                f"the request's JSON is larger than an infer request of up to {max_batch} images can "
                f"be (send {PIXELS!r} or {IMAGES!r} as binary data: the binary tensor extension)"
            )


def _tensor_bytes(tensor: Mapping[str, Any], binary: bytes, name: Any) -> bytes | None:
    """The tensor's binary data (the binary extension), or ``None`` when it is in JSON ``data``."""
    params = _object(tensor.get("parameters"), "inputs[0].parameters")
    size = params.get("binary_data_size")
    if size is None:
        if binary:
            raise ProtocolError(f"the body has {len(binary)} bytes of binary data but no input claims them")
        return None
    if not isinstance(size, int) or isinstance(size, bool) or size != len(binary):
        raise ProtocolError(
            f"input {str(name)[:80]!r}: binary_data_size {size!r} does not match the {len(binary)} "
            "bytes after the JSON header"
        )
    return binary


def _batch(shape: Sequence[int], name: str, max_batch: int) -> int:
    n = shape[0]
    if not 1 <= n <= max_batch:
        raise ProtocolError(f"input {name!r}: batch size (shape[0]) must be 1 to {max_batch}, got {n}")
    return n


def _images(
    shape: list[int], datatype: Any, tensor: Mapping[str, Any], data: bytes | None, max_batch: int
) -> list[bytes]:
    if datatype != "BYTES":
        raise ProtocolError(f"input {IMAGES!r} must have datatype BYTES (encoded images), got {datatype!r}")
    if len(shape) not in (1, 2) or (len(shape) == 2 and shape[1] != 1):
        raise ProtocolError(
            f"input {IMAGES!r}: shape must be [N] (or [N, 1]), one image an element, got {shape}"
        )
    n = _batch(shape, IMAGES, max_batch)
    if data is not None:
        items = deserialize_bytes(data, expected=n)
    else:
        items = [_base64(v, i) for i, v in enumerate(_flat(tensor.get("data"), IMAGES))]
    if len(items) != n:
        raise ProtocolError(f"input {IMAGES!r}: shape {shape} says {n} elements, the data has {len(items)}")
    return items


def _base64(value: Any, index: int) -> bytes:
    if not isinstance(value, str):
        raise ProtocolError(f"input {IMAGES!r}: element {index} must be a base64 string in JSON data")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise ProtocolError(f"input {IMAGES!r}: element {index} is not valid base64") from None


def _pixels(
    shape: list[int],
    datatype: Any,
    tensor: Mapping[str, Any],
    data: bytes | None,
    model: ModelShape,
    max_batch: int,
) -> list[bytes]:
    w, h = model.input_size
    if datatype != "FP32":
        raise ProtocolError(f"input {PIXELS!r} must have datatype FP32, got {datatype!r}")
    if len(shape) != 4 or shape[1:] != [h, w, 3]:
        raise ProtocolError(
            f"input {PIXELS!r}: shape must be [N, {h}, {w}, 3] (RGB at model {model.name!r}'s input "
            f"size, height {h}, width {w}), got {shape}"
        )
    n = _batch(shape, PIXELS, max_batch)
    count = n * h * w * 3
    if data is not None:
        if len(data) != count * 4:
            raise ProtocolError(
                f"input {PIXELS!r}: shape {shape} needs {count * 4} bytes of FP32, got {len(data)}"
            )
        arr = np.frombuffer(data, dtype="<f4")
    else:
        try:
            arr = np.asarray(_flat(tensor.get("data"), PIXELS), dtype=np.float32).reshape(-1)
        except (TypeError, ValueError):
            raise ProtocolError(f"input {PIXELS!r}: 'data' must hold numbers") from None
        if arr.size != count:
            raise ProtocolError(
                f"input {PIXELS!r}: shape {shape} says {count} values, the data has {arr.size}"
            )
    arr = arr.reshape(n, h, w, 3)
    bad = ~np.isfinite(arr) | (arr < 0) | (arr > 255) | (arr != np.round(arr))
    if bad.any():
        where = tuple(int(i) for i in np.argwhere(bad)[0])
        raise ProtocolError(
            f"input {PIXELS!r}: values must be whole numbers from 0 to 255 (RGB pixels; the model's "
            f"own scaling is applied by the service): element {list(where)} is {float(arr[where])!r}"
        )
    return [png(img) for img in arr.astype(np.uint8)]


def png(pixels: np.ndarray) -> bytes:
    """An ``(h, w, 3)`` uint8 array as a PNG (lossless: it decodes to the same array)."""
    buf = io.BytesIO()
    Image.fromarray(pixels, "RGB").save(buf, "PNG", compress_level=1)
    return buf.getvalue()


def _flat(data: Any, name: str) -> list[Any]:
    if not isinstance(data, list):
        raise ProtocolError(f"input {name!r}: give the tensor as 'data' (a JSON list) or as binary data")
    out: list[Any] = []
    stack = [data]
    while stack:  # row-major flattening of nested lists, without recursion
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(reversed(item))
        else:
            out.append(item)
    return out


def _requested(value: Any, binary_default: bool) -> dict[str, bool]:
    if value is None:
        return dict.fromkeys(OUTPUTS, binary_default)
    if not isinstance(value, list):
        raise ProtocolError("'outputs' must be a list")
    out: dict[str, bool] = {}
    for item in value:
        name = item.get("name") if isinstance(item, dict) else None
        if name not in OUTPUTS:
            raise ProtocolError(f"unknown output {str(name)[:80]!r}: the outputs are {', '.join(OUTPUTS)}")
        params = _object(item.get("parameters"), f"outputs {name!r} parameters")
        out[name] = params.get("binary_data", binary_default) is True
    return out


def deserialize_bytes(data: bytes, expected: int | None = None) -> list[bytes]:
    """A binary ``BYTES`` tensor: each element a 4-byte little-endian length, then the bytes.
    With ``expected`` (the shape's count), data holding more elements is refused at the first
    one too many, before the rest is read: a body of tiny elements cannot cost more than it
    may hold."""
    out: list[bytes] = []
    pos = 0
    while pos < len(data):
        if expected is not None and len(out) == expected:
            raise ProtocolError(f"binary BYTES data holds more than the {expected} elements its shape says")
        if pos + 4 > len(data):
            raise ProtocolError("binary BYTES data ends inside an element's 4-byte length")
        (size,) = struct.unpack_from("<I", data, pos)
        pos += 4
        if pos + size > len(data):
            raise ProtocolError("binary BYTES data ends inside an element")
        out.append(data[pos : pos + size])
        pos += size
    return out


def serialize_bytes(items: Sequence[bytes]) -> bytes:
    """The binary form of a ``BYTES`` tensor (see :func:`deserialize_bytes`)."""
    return b"".join(struct.pack("<I", len(b)) + b for b in items)


# -- results to outputs ----------------------------------------------------------------------


class MissingScores(ServiceUnavailable):
    """A result without its score vector: a worker of an older version classified the image
    (during a rolling upgrade); another try reaches an upgraded worker."""


def score_matrix(predictions: Sequence[Prediction], classes: int) -> np.ndarray:
    """``[N, classes]`` probabilities in class order: each prediction's score vector (a ``/v2``
    job keeps one per image). Raises :class:`MissingScores` for a prediction without one, and
    for one whose vector is not ``classes`` long (a version of another size answered)."""
    out = np.zeros((len(predictions), classes), dtype=np.float32)
    for n, pred in enumerate(predictions):
        vector = pred.score_vector()
        if vector is None or len(vector) != classes:
            got = "no score vector" if vector is None else f"scores of {len(vector)} classes"
            raise MissingScores(
                f"the result of element {n} has {got}, not of the model's {classes}: a worker of an "
                "older version classified it, or the model's output does not match its labels"
            )
        out[n] = vector
    return out


def response(
    request: InferRequest, model: ModelShape, version: int, predictions: Sequence[Prediction], job_id: str
) -> tuple[dict[str, Any], bytes]:
    """The ``infer`` answer: its JSON part, and the binary part (empty when all is JSON). The
    labels are each prediction's ``top_k`` (the job asked for the request's ``top_k``)."""
    scores = score_matrix(predictions, model.width)
    labels = [[s.label for s in pred.top_k[: request.top_k]] for pred in predictions]
    k = request.top_k
    tensors: dict[str, tuple[str, list[int], Any]] = {
        SCORES: ("FP32", list(scores.shape), scores),
        LABELS: ("BYTES", [len(predictions), k], labels),
    }
    outputs, binary = [], b""
    for name, as_binary in request.outputs.items():
        datatype, shape, value = tensors[name]
        doc: dict[str, Any] = {"name": name, "datatype": datatype, "shape": shape}
        if as_binary:
            raw = (
                serialize_bytes([s.encode() for row in value for s in row])
                if datatype == "BYTES"
                else np.ascontiguousarray(value, dtype="<f4").tobytes()
            )
            doc["parameters"] = {"binary_data_size": len(raw)}
            binary += raw
        else:
            doc["data"] = (
                [s for row in value for s in row] if datatype == "BYTES" else value.reshape(-1).tolist()
            )
        outputs.append(doc)
    head: dict[str, Any] = {
        "model_name": model.name,
        "model_version": str(version),
        "outputs": outputs,
        "parameters": {"job_id": job_id},
    }
    if request.id is not None:
        head["id"] = request.id
    return head, binary
