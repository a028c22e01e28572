"""The model: the only module that imports TensorFlow. Loaded once per worker process.

``BATCHVISION_MODEL`` is a ``keras.applications`` name (ImageNet weights from the Keras cache,
fetched on first use where the network allows; ``batchvision fetch-weights`` does it at image
build time) or a path to a ``.keras``/``.h5`` file or a SavedModel directory plus a labels file.

Keras 3 runs the models on the backend ``BATCHVISION_KERAS_BACKEND`` names, ``tensorflow`` (the
default) or ``jax``, chosen once per process before Keras is imported (:func:`select_backend`).
On ``jax`` nothing here imports TensorFlow, except to read a SavedModel directory. Mixed precision
(``BATCHVISION_PRECISION``) and XLA compilation (``BATCHVISION_XLA``) are settings too.
"""

from __future__ import annotations

import importlib
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from batchvision.core.batch_policy import padded_sizes
from batchvision.core.classifier import ImageClassifier, Scores, probe_images
from batchvision.core.imaging import normalize
from batchvision.core.settings import Settings
from batchvision.server.cpus import limited_cpus
from batchvision.server.repository import VersionDir

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


class _Lazy:
    """A module imported on first use: a worker that serves only ONNX models (workers.onnx_model)
    never imports TensorFlow."""

    def __init__(self, load: Any) -> None:
        self._load = load

    def __getattr__(self, name: str) -> Any:
        return getattr(self._load(), name)


def _keras() -> Any:
    import keras  # TF's log level is set above, and the backend by select_backend, before the import

    return keras


def _tf() -> Any:
    import tensorflow

    return tensorflow


def _jax() -> Any:
    import jax

    return jax


keras: Any = _Lazy(_keras)
tf: Any = _Lazy(_tf)
jax: Any = _Lazy(_jax)


def select_backend(backend: str) -> None:
    """Make Keras run on ``backend`` (``tensorflow`` or ``jax``): sets ``KERAS_BACKEND`` before
    Keras is first imported. Keras reads it once, so a process that already imported Keras with
    another backend gets a ``RuntimeError`` naming both."""
    loaded = sys.modules.get("keras")
    if loaded is not None:
        current = loaded.backend.backend()
        if current != backend:
            raise RuntimeError(
                f"BATCHVISION_KERAS_BACKEND={backend}, but this process already runs Keras on "
                f"{current}: the backend is chosen once per process, before Keras is imported"
            )
        return
    os.environ["KERAS_BACKEND"] = backend
    if backend == "jax":
        # JAX takes 75% of a GPU's memory at its first use unless told not to: take what the
        # batches need instead, as TensorFlow's memory growth does below.
        os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")


log = logging.getLogger(__name__)


@dataclass(frozen=True)
class _App:
    constructor: str
    preprocess: str
    size: int
    #: The file Keras keeps the ImageNet weights in, under ``KERAS_HOME/models/``.
    weights_file: str


#: ``keras.applications`` models by the names users give, with their input scaling.
APPLICATIONS = {
    "mobilenet_v2": _App(
        "MobileNetV2", "tf", 224, "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224.h5"
    ),
    "mobilenet_v3_large": _App(
        "MobileNetV3Large", "none", 224, "weights_mobilenet_v3_large_224_1.0_float.h5"
    ),
    "resnet50": _App("ResNet50", "caffe", 224, "resnet50_weights_tf_dim_ordering_tf_kernels.h5"),
    "efficientnet_b0": _App("EfficientNetB0", "none", 224, "efficientnetb0.h5"),
    "inception_v3": _App("InceptionV3", "tf", 299, "inception_v3_weights_tf_dim_ordering_tf_kernels.h5"),
    "convnext_tiny": _App("ConvNeXtTiny", "none", 224, "convnext_tiny.h5"),
}


#: One application built at a time while Keras' download step is wrapped (see below).
_BUILDING = threading.Lock()


def build_application(app: _App, weights: str | None) -> Any:
    """The ``keras.applications`` model with ``weights`` (``"imagenet"``, a file, or ``None``).

    Keras looks for its cached ImageNet weights only where it may write: on a read-only root
    file system (the images under compose and Kubernetes) it would download them again into
    ``/tmp``. So while the model is built, its download step answers with the cached file when
    there is one. (Handing Keras the file instead of ``"imagenet"`` would build another
    network: EfficientNet adds its input normalisation only for ``"imagenet"``.)
    """
    cached = Path(os.environ.get("KERAS_HOME") or Path.home() / ".keras") / "models" / app.weights_file
    constructor = getattr(keras.applications, app.constructor)
    if weights != "imagenet" or not cached.is_file():
        return constructor(weights=weights)
    from keras.src.utils import file_utils  # the one module every application downloads through

    download = file_utils.get_file

    def from_cache(fname: Any = None, origin: Any = None, *args: Any, **kwargs: Any) -> Any:
        if fname == app.weights_file:
            return str(cached)
        return download(fname, origin, *args, **kwargs)

    with _BUILDING:
        file_utils.get_file = from_cache
        try:
            return constructor(weights=weights)
        finally:
            file_utils.get_file = download


#: ``BATCHVISION_MODEL=py:package.module:factory`` loads a classifier written in Python:
#: ``factory(settings)`` returns an :class:`~batchvision.core.classifier.ImageClassifier`.
#: The benchmarks' stand-in models (``bench/standins.py``) come in this way.
PLUGIN_PREFIX = "py:"


class Classifier:
    """A loaded model: a list of uint8 images in, a list of probability vectors out."""

    def __init__(
        self,
        model: Any,
        labels: list[str],
        preprocess: str,
        name: str,
        max_batch_size: int = 32,
        input_size: tuple[int, int] | None = None,
        xla: bool = False,
    ) -> None:
        shape = model.inputs[0].shape
        if shape[1] is None or shape[2] is None:
            if input_size is None:
                raise ValueError(
                    f"model {name}: its input size {tuple(shape)} is open; set input_size [width, "
                    "height] in its config.json"
                )
        elif input_size is not None and input_size != (int(shape[2]), int(shape[1])):
            raise ValueError(f"model {name}: config input_size {list(input_size)}, model input {shape}")
        # (width, height), as Pillow wants
        self.input_size = input_size or (int(shape[2]), int(shape[1]))
        self.labels = labels
        self.preprocess = preprocess
        self.name = name
        self.backend = str(keras.backend.backend())
        self.device = _device(self.backend)
        self._fn = _compiled(model, self.backend, xla)
        # A wrapped SavedModel hides its last activation: then the outputs tell.
        self._scores = Scores(True if _ends_in_softmax(model) else None)
        # Batches are padded to a few fixed sizes: the kernels (and oneDNN's primitive cache)
        # see at most these shapes, instead of one set per batch size, which grows memory.
        self.buckets = padded_sizes(max_batch_size)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """Class probabilities for each image (``(h, w, 3)`` uint8 of the input size)."""
        n = len(images)
        size = next((b for b in self.buckets if b >= n), n)
        batch = np.stack(images)
        if size > n:
            batch = np.concatenate([batch, np.zeros((size - n, *batch.shape[1:]), batch.dtype)])
        out = self._fn(normalize(batch, self.preprocess))
        if isinstance(out, dict):
            out = next(iter(out.values()))
        return list(self._scores(np.asarray(out, dtype=np.float32).reshape(size, -1)[:n]))

    def warm_up(self) -> float:
        """Run every bucket size once, so no real batch pays for first-time setup; returns seconds."""
        start = time.perf_counter()
        w, h = self.input_size
        for size in self.buckets:
            self.predict([np.zeros((h, w, 3), np.uint8)] * size)
        return time.perf_counter() - start


def load_classifier(settings: Settings) -> ImageClassifier:
    """Build the :class:`Classifier` that ``settings`` name."""
    name = settings.model
    if name.startswith(PLUGIN_PREFIX):
        return _load_plugin(name[len(PLUGIN_PREFIX) :], settings)
    configure_runtime(settings)
    if name in APPLICATIONS:
        app = APPLICATIONS[name]
        weights = None if settings.weights.lower() in ("", "none") else settings.weights
        model = build_application(app, weights)
        labels = imagenet_labels()
        preprocess = app.preprocess
    else:
        path = Path(name)
        if not path.exists():
            raise FileNotFoundError(
                f"BATCHVISION_MODEL={name!r} is neither a known application "
                f"({', '.join(sorted(APPLICATIONS))}) nor an existing path"
            )
        labels_file = Path(settings.labels) if settings.labels else _default_labels(path)
        labels = [s.strip() for s in labels_file.read_text().splitlines() if s.strip()]
        model = _load_path(path)
        preprocess = "none"
    if settings.preprocess != "auto":
        preprocess = settings.preprocess
    model = with_precision(model, settings.precision)
    return Classifier(model, labels, preprocess, name, settings.max_batch_size, xla=settings.xla)


def _load_plugin(spec: str, settings: Settings) -> ImageClassifier:
    module, _, attr = spec.partition(":")
    if not module or not attr:
        raise ValueError(f"BATCHVISION_MODEL={PLUGIN_PREFIX}{spec!r}: expected py:package.module:factory")
    factory = getattr(importlib.import_module(module), attr)
    classifier: ImageClassifier = factory(settings)
    return classifier


def fetch_weights(settings: Settings) -> Path | None:
    """Download the ImageNet weights of an application model into the Keras cache; ``None``
    when ``BATCHVISION_MODEL`` is no application (a file or a repository model: nothing to fetch)."""
    if settings.model not in APPLICATIONS:
        return None
    load_classifier(settings.replace(weights="imagenet"))
    return Path(os.environ.get("KERAS_HOME", Path.home() / ".keras"))


def configure_runtime(settings: Settings) -> None:
    """The Keras backend; on TensorFlow, thread pools and GPU memory growth: must run before
    TensorFlow initialises a device."""
    select_backend(settings.keras_backend)
    if settings.keras_backend != "tensorflow":
        return
    limit = limited_cpus()  # a container's CPU limit: TensorFlow would size its pools to the node
    try:
        if intra := settings.intra_op_threads or limit:
            tf.config.threading.set_intra_op_parallelism_threads(intra)
        if inter := settings.inter_op_threads or limit:
            tf.config.threading.set_inter_op_parallelism_threads(inter)
        for gpu in tf.config.list_physical_devices("GPU"):
            tf.config.experimental.set_memory_growth(gpu, True)
    except RuntimeError as exc:  # already initialised (a second load in one process)
        log.debug("runtime already configured: %s", exc)


def imagenet_labels() -> list[str]:
    """The 1000 ImageNet class names in Keras' index order, shipped with the project."""
    text = resources.files("batchvision").joinpath("data/imagenet_labels.txt").read_text()
    return text.split()


def _load_path(path: Path) -> Any:
    if path.is_dir():
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                f"{path}: a SavedModel directory runs on the tensorflow backend only "
                f"(BATCHVISION_KERAS_BACKEND is {keras.backend.backend()}); save the model as .keras"
            )
        # A TF SavedModel: wrap its serving signature in a Keras model with a known input.
        sig = tf.saved_model.load(str(path)).signatures["serving_default"]
        spec = next(iter(sig.structured_input_signature[1].values()))
        inputs = keras.Input(shape=tuple(spec.shape[1:]))
        outputs = keras.layers.TFSMLayer(str(path), call_endpoint="serving_default")(inputs)
        if isinstance(outputs, dict):
            outputs = next(iter(outputs.values()))
        return keras.Model(inputs, outputs)
    try:
        return keras.models.load_model(path, compile=False)
    except ValueError as exc:
        if path.is_file() and "File not found" in str(exc):  # Keras' words for a file it cannot open
            raise ValueError(
                f"{path.name} is there but is not a model Keras can read (a .keras archive or an .h5 "
                f"file): {exc}"
            ) from exc
        raise


def _default_labels(path: Path) -> Path:
    candidate = path.with_name(path.stem + ".labels.txt") if path.is_file() else path / "labels.txt"
    if not candidate.exists():
        raise FileNotFoundError(f"no labels for {path}: set BATCHVISION_LABELS")
    return candidate


def _ends_in_softmax(model: Any) -> bool:
    act = getattr(model.layers[-1], "activation", None) if getattr(model, "layers", None) else None
    return getattr(act, "__name__", "") == "softmax"


def _device(backend: str) -> str:
    if backend == "jax":
        first = jax.devices()[0]  # where jax.jit places the computation
        return f"{first.platform}:{first.id}"
    gpus = tf.config.list_logical_devices("GPU")
    return gpus[0].name if gpus else "/device:CPU:0"


def _compiled(model: Any, backend: str, xla: bool) -> Callable[[np.ndarray], Any]:
    """The model's forward pass as one compiled function of a float32 batch."""
    if backend == "jax":
        # The stateless call with the variables as arguments: XLA gets them as buffers rather
        # than baking them into the program as constants. One compile per padded batch size.
        trainable = [v.value for v in model.trainable_variables]
        frozen = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def forward(trainable: Any, frozen: Any, x: Any) -> Any:
            out, _ = model.stateless_call(trainable, frozen, x, training=False)
            return out

        return lambda x: forward(trainable, frozen, x)
    shape = model.inputs[0].shape
    spec = tf.TensorSpec([None, shape[1], shape[2], 3], tf.float32)
    # One traced graph with a dynamic batch dimension: no retracing per batch size, and
    # none of predict()'s per-call overhead, which dominates small batches.
    fn = tf.function(lambda x: model(x, training=False), input_signature=[spec], jit_compile=xla)
    return lambda x: fn(tf.constant(x))


def with_precision(model: Any, precision: str) -> Any:
    """``model``, its layers set to compute in ``precision`` (a Keras dtype policy such as
    ``mixed_float16``: float16 maths, float32 weights); the last layer (the scores) stays
    float32. ``float32`` leaves the model as it is."""
    if precision == "float32":
        return model
    layers = _all_layers(model)
    for layer in layers[:-1]:
        if not isinstance(layer, keras.layers.InputLayer):
            layer.dtype_policy = precision
    return model


def _all_layers(model: Any) -> list[Any]:
    # Nested models (a backbone inside a functional model) hold layers of their own.
    out = []
    for layer in getattr(model, "layers", []):
        out.extend([layer] if not getattr(layer, "layers", None) else _all_layers(layer))
    return out


# -- several models, versions -------------------------------------------------------


class ModelMismatch(ValueError):
    """A model whose outputs do not fit its labels: refused, never served."""


def load_version(version: VersionDir, settings: Settings) -> ImageClassifier:
    """Load one version of a repository model (:mod:`batchvision.server.repository`) and check
    it: one forward pass must give one probability per label. Raises with the reason."""
    if version.kind == "onnx":  # ONNX Runtime, without TensorFlow
        from workers.onnx_model import load_onnx

        classifier = load_onnx(version, settings)
    elif version.kind == "shortcut":
        classifier = load_classifier(settings)  # BATCHVISION_MODEL, as it always loaded
    else:
        configure_runtime(settings)
        if version.kind == "application":
            if version.source not in APPLICATIONS:
                raise ValueError(
                    f"unknown application {version.source!r}: known are {', '.join(sorted(APPLICATIONS))}"
                )
            app = APPLICATIONS[version.source]
            wanted = version.weights or settings.weights
            weights = None if wanted.lower() in ("", "none") else wanted
            model = build_application(app, weights)
            labels = _read_labels(Path(version.labels)) if version.labels else imagenet_labels()
            family = app.preprocess
        else:
            if version.labels is None:
                raise ValueError(f"{version.source}: no labels file")
            labels = _read_labels(Path(version.labels))
            model = _load_path(Path(version.source))
            family = "none"
        preprocess = family if version.preprocess == "auto" else version.preprocess
        classifier = Classifier(
            with_precision(model, settings.precision),
            labels,
            preprocess,
            version.model,
            settings.max_batch_size,
            input_size=version.input_size,
            xla=settings.xla,
        )
    classifier.name = version.model
    check_outputs(classifier, settings.max_batch_size)
    return classifier


def check_outputs(classifier: ImageClassifier, max_batch_size: int = 4) -> None:
    """A batch of different images (:func:`probe_images`, at most ``max_batch_size``) through
    the model: one output per image, one value per label. The first outputs a model gives also
    decide whether its scores are probabilities or logits
    (:class:`~batchvision.core.classifier.Scores`)."""
    # No larger than the batches the worker will run (a model made for batches of one).
    probe = probe_images(classifier.input_size)[: max(1, min(4, max_batch_size))]
    try:
        together = classifier.predict(probe)
    except Exception as exc:
        classifier.predict(probe[:1])  # fails too: the model's own error, as it is
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ModelMismatch(
            f"the model runs one image but fails on a batch of {len(probe)} images ({first})"
        ) from exc
    if len(together) != len(probe):
        raise ModelMismatch(f"the model gives {len(together)} outputs for a batch of {len(probe)} images")
    classes = {int(np.asarray(out).reshape(-1).shape[0]) for out in together}
    if classes != {len(classifier.labels)}:
        raise ModelMismatch(
            f"the model outputs {min(classes)} classes but its labels file has "
            f"{len(classifier.labels)} labels"
        )


def _read_labels(path: Path) -> list[str]:
    labels = [s.strip() for s in path.read_text().splitlines() if s.strip()]
    if not labels:
        raise ValueError(f"{path}: no labels")
    return labels
