"""ONNX models, run by ONNX Runtime: ``MODELS_DIR/<name>/<version>/model.onnx`` with its labels.

Served in the same lanes, batching, versions and reloads as Keras models (this is only the
loader :func:`workers.keras_model.load_version` calls for them). Nothing here imports TensorFlow: a
worker that serves only ONNX models needs the ``onnx`` install extra (ONNX Runtime), not
TensorFlow. The CUDA execution provider is used where ONNX Runtime has it (the
``onnxruntime-gpu`` wheel on a GPU host), the CPU one otherwise.

A model must look like an image classifier: one input of rank 4, float or uint8, RGB with its
3 channels last (NHWC, as Keras exports) or first (NCHW, as PyTorch exports); its first output
one score per label (checked by a forward pass at load). Pixel scaling is the version's
``preprocess`` in config.json (default ``none``: the model gets 0-255 values, as the demo
models, which scale inside the graph).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np

from batchvision.core.batch_policy import padded_sizes
from batchvision.core.classifier import ImageClassifier, Scores
from batchvision.core.imaging import normalize
from batchvision.core.settings import Settings
from batchvision.server.cpus import limited_cpus
from batchvision.server.repository import VersionDir

log = logging.getLogger(__name__)

_TYPES = {"tensor(float)": np.float32, "tensor(uint8)": np.uint8}


class OnnxModelError(ValueError):
    """A file that is not an ONNX model, or not one that classifies images: refused at load."""


class OnnxClassifier:
    """A loaded ONNX model: a list of uint8 images in, a list of probability vectors out
    (:class:`batchvision.core.classifier.ImageClassifier`)."""

    def __init__(
        self,
        path: Path,
        labels: list[str],
        preprocess: str,
        name: str,
        *,
        input_size: tuple[int, int] | None = None,
        threads: int = 0,
        max_batch_size: int = 32,
        pad: bool | None = None,
    ) -> None:
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads:
            options.intra_op_num_threads = threads
        # Idle intra-op threads would spin, taking the cores the worker's decode threads need
        # (measured: 2x fewer images/s on a busy 2-core host with spinning on).
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        available = ort.get_available_providers()
        providers = [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self._session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # noqa: BLE001 - ONNX Runtime raises its own types for bad files
            text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise OnnxModelError(f"{path.name}: not an ONNX model ONNX Runtime can load ({text})") from None
        self.device = self._session.get_providers()[0].removesuffix("ExecutionProvider")
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(i.name for i in inputs)
            raise OnnxModelError(f"{path.name}: an image classifier has one input, this model has {names}")
        spec = inputs[0]
        shape = list(spec.shape)
        if spec.type not in _TYPES or len(shape) != 4:
            raise OnnxModelError(
                f"{path.name}: input {spec.name!r} is {spec.type} {shape}; an image classifier takes a "
                "float or uint8 tensor [batch, height, width, 3] or [batch, 3, height, width]"
            )
        if shape[3] == 3:
            self._channels_first, hw = False, shape[1:3]
        elif shape[1] == 3:
            self._channels_first, hw = True, shape[2:4]
        else:
            raise OnnxModelError(
                f"{path.name}: input {spec.name!r} {shape} has no axis of 3 colour channels (NHWC or NCHW)"
            )
        fixed = all(isinstance(d, int) for d in hw)
        if fixed and input_size is not None and input_size != (hw[1], hw[0]):
            raise OnnxModelError(f"model {name}: config input_size {list(input_size)}, model input {shape}")
        if not fixed and input_size is None:
            raise OnnxModelError(
                f"model {name}: its input size {shape} is open; set input_size [width, height] in its "
                "config.json"
            )
        self.input_size: tuple[int, int] = input_size or (int(hw[1]), int(hw[0]))
        self.labels = labels
        self.preprocess = preprocess
        self.name = name
        self._input = spec.name
        self._dtype = _TYPES[spec.type]
        if self._dtype == np.uint8 and preprocess != "none":
            # The pixels go in as they are decoded: no scaling, no channel order could be applied.
            raise OnnxModelError(
                f"{path.name}: input {spec.name!r} takes uint8 pixels as decoded (RGB, 0-255), so "
                f'preprocess "{preprocess}" cannot apply: set "preprocess": "none" (or "auto") in '
                "its config.json, or export the model with its preprocessing inside"
            )
        self._output = self._session.get_outputs()[0].name
        # A model exported with a fixed batch size runs in slices of that size.
        self._batch = shape[0] if isinstance(shape[0], int) and shape[0] > 0 else None
        self._scores = Scores()
        # On a GPU, batches are padded to a few sizes, as the Keras runner pads them: each new
        # shape costs the CUDA provider a search for its convolution algorithms, paid inside a
        # live batch. On a CPU that cost is small and padding would only add compute.
        pad = self.device != "CPU" if pad is None else pad
        self.buckets = padded_sizes(max_batch_size) if pad and self._batch is None else ()

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Class probabilities for each image (``(h, w, 3)`` uint8 of the input size)."""
        batch = np.stack(images)
        x = batch if self._dtype == np.uint8 else normalize(batch, self.preprocess)
        if self._channels_first:
            x = np.ascontiguousarray(x.transpose(0, 3, 1, 2))
        n_images = len(x)
        size = next((b for b in self.buckets if b >= n_images), n_images)
        if size > n_images:
            x = np.concatenate([x, np.zeros((size - n_images, *x.shape[1:]), x.dtype)])
        step = self._batch or len(x)
        parts = []
        for start in range(0, len(x), step):
            part = x[start : start + step]
            n = len(part)
            if n < step:  # a fixed batch size: pad the last slice
                part = np.concatenate([part, np.zeros((step - n, *part.shape[1:]), part.dtype)])
            (out,) = self._session.run([self._output], {self._input: part})
            parts.append(np.asarray(out, dtype=np.float32).reshape(step, -1)[:n])
        return list(self._scores(np.concatenate(parts)[:n_images]))

    def warm_up(self) -> float:
        """A batch of each padded size (one image without padding), so that no real batch pays
        for first-time setup; returns seconds."""
        start = time.perf_counter()
        w, h = self.input_size
        for size in self.buckets or (1,):
            self.predict([np.zeros((h, w, 3), np.uint8)] * size)
        return time.perf_counter() - start


def load_onnx(version: VersionDir, settings: Settings) -> ImageClassifier:
    """Load one ONNX version of a repository model; :class:`OnnxModelError` says why not."""
    if version.labels is None:
        raise OnnxModelError(f"{version.source}: no labels file")
    labels = [s.strip() for s in Path(version.labels).read_text().splitlines() if s.strip()]
    if not labels:
        raise OnnxModelError(f"{version.labels}: no labels")
    preprocess = "none" if version.preprocess == "auto" else version.preprocess
    clf = OnnxClassifier(
        Path(version.source),
        labels,
        preprocess,
        version.model,
        input_size=version.input_size,
        threads=settings.intra_op_threads or limited_cpus() or 0,
        max_batch_size=settings.max_batch_size,
    )
    log.info("model %s v%d: ONNX Runtime on %s", version.model, version.version, clf.device)
    return clf
