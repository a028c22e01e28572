"""The model and decoder the peers serve, written as a user of each framework would, and kept
equal to batchvision's (bench/small_jobs.py compares them with it):

- decode: Pillow, JPEG draft mode, EXIF orientation, RGB, bilinear resize to 224x224
  (as ``batchvision.core.imaging.decode_image``);
- model: Keras ``MobileNetV2(weights=None)`` (real compute, no download), ``tf`` input scaling
  (-1..1), called through one ``tf.function`` with a dynamic batch dimension: one model call per
  batch (as ``workers.keras_model.Classifier``, minus its padding to fixed batch sizes).

Runs inside the peers' virtualenvs (bench/peers/.venv-*), which do not have batchvision: it only
reads the ImageNet labels file that ships with the project.
"""

from __future__ import annotations

import io
import os
import threading
from pathlib import Path
from typing import Any

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from PIL import Image, ImageOps  # noqa: E402

LABELS = Path(__file__).resolve().parents[2] / "batchvision" / "data" / "imagenet_labels.txt"
SIZE = (224, 224)


def decode(data: bytes) -> np.ndarray:
    """A ``(224, 224, 3)`` uint8 RGB array, decoded like batchvision decodes."""
    img: Image.Image = Image.open(io.BytesIO(data))
    if img.format in {"JPEG", "MPO"}:
        img.draft("RGB", SIZE)
    img = ImageOps.exif_transpose(img)
    if img.mode != "RGB":
        img = img.convert("RGB")
    if img.size != SIZE:
        img = img.resize(SIZE, Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


class PeerModel:
    """MobileNetV2 with random weights; counts batches so the benchmark can read their mean size."""

    def __init__(self) -> None:
        model = keras.applications.MobileNetV2(weights=None)
        spec = tf.TensorSpec([None, SIZE[1], SIZE[0], 3], tf.float32)
        self._fn = tf.function(lambda x: model(x, training=False), input_signature=[spec])
        self.labels = LABELS.read_text().split()
        self._lock = threading.Lock()
        self.batches = 0
        self.images = 0
        self.predict([np.zeros((SIZE[1], SIZE[0], 3), np.uint8)])  # trace once

    def predict(self, arrays: list[np.ndarray]) -> np.ndarray:
        """Class probabilities, ``(len(arrays), 1000)``, from one model call."""
        x = np.stack(arrays).astype(np.float32) / 127.5 - 1.0
        return np.asarray(self._fn(tf.constant(x)))

    def classify(self, bodies: list[bytes]) -> list[dict[str, Any]]:
        """Decode each image, one model call for all of them, top-1 label per image."""
        probs = self.predict([decode(b) for b in bodies])
        with self._lock:
            self.batches += 1
            self.images += len(bodies)
        top = probs.argmax(axis=1)
        return [
            {"label": self.labels[int(i)], "class_id": int(i), "score": float(p[i])}
            for i, p in zip(top, probs, strict=True)
        ]

    def stats(self) -> dict[str, int]:
        """Model calls and images so far (the benchmark takes the delta over a workload)."""
        with self._lock:
            return {"batches": self.batches, "images": self.images}
