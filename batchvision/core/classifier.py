"""The one contract every classifier meets, so the pipeline never knows which model it runs."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ImageClassifier(Protocol):
    """A loaded model: a list of uint8 images in, a list of probability vectors out.

    ``input_size`` is ``(width, height)`` as Pillow wants it; ``predict`` returns one vector
    of ``len(labels)`` probabilities per image, in order.
    """

    name: str
    labels: list[str]
    input_size: tuple[int, int]
    device: str

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]: ...

    def warm_up(self) -> float:
        """Run the model once per batch shape it will see; returns the seconds it took."""
        ...


#: How far a row of probabilities may sum from 1: a model whose softmax ran in half precision
#: (float16, bfloat16) gives sums within a few thousandths.
SUM_TOLERANCE = 1e-2


class Scores:
    """A model's raw outputs as probabilities: as they are, or softmaxed when they are logits.

    Which one is decided once per model, from the first outputs it sees (the
    :func:`probe_images` the worker checks every model with at load), and kept: deciding per
    batch would make an image's scores depend on which other images shared its batch.
    ``probabilities``: known in advance (a Keras model that ends in a softmax)."""

    def __init__(self, probabilities: bool | None = None) -> None:
        self.probabilities = probabilities

    def __call__(self, raw: np.ndarray) -> np.ndarray:
        """``raw``: ``(images, classes)`` float32."""
        if self.probabilities is None:
            # Only from rows of numbers: an image the model gives NaN for (a uniform probe image
            # it normalises by its own spread) tells nothing; without any, decide later.
            finite = raw[np.isfinite(raw).all(axis=1)]
            if not len(finite):
                return raw if are_probabilities(raw) else softmax(raw)
            self.probabilities = are_probabilities(finite)
        return raw if self.probabilities else softmax(raw)


def are_probabilities(raw: np.ndarray) -> bool:
    """Every row non-negative and summing to 1 (within :data:`SUM_TOLERANCE`)."""
    return bool(raw.min() >= 0 and np.allclose(raw.sum(axis=1), 1.0, atol=SUM_TOLERANCE))


def softmax(raw: np.ndarray) -> np.ndarray:
    """Row-wise softmax of ``(images, classes)`` logits, float32."""
    e = np.exp(raw - raw.max(axis=1, keepdims=True))
    return np.asarray(e / e.sum(axis=1, keepdims=True), dtype=np.float32)


def probe_images(input_size: tuple[int, int]) -> list[np.ndarray]:
    """Four different images of ``input_size`` (width, height) to check a model with: black,
    white, grey and noise (the same noise every time)."""
    w, h = input_size
    noise = np.random.default_rng(0).integers(0, 256, (h, w, 3), dtype=np.uint8)
    return [np.full((h, w, 3), v, np.uint8) for v in (0, 255, 128)] + [noise]
