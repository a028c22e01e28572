"""The one contract every classifier meets, so the pipeline never knows which model it runs."""

from __future__ import annotations

from typing import Protocol

import numpy as np


class ImageClassifier(Protocol):
    """A loaded model: a list of uint8 images in, a list of probability vectors out.

    ``input_size`` is ``(width, height)`` as Pillow wants it; ``predict`` returns one vector
    of ``len(labels)`` probabilities per image, in order.

    A classifier that pads every batch to one of a few sizes may say which in an attribute
    ``padded_sizes`` (ascending); the batcher then prefers those sizes (:func:`padded_sizes_of`).
    """

    name: str
    labels: list[str]
    input_size: tuple[int, int]
    device: str

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]: ...

    def warm_up(self) -> float:
        """Run the model once per batch shape it will see; returns the seconds it took."""
        ...


def padded_sizes_of(classifier: object) -> tuple[int, ...] | None:
    """The batch sizes ``classifier`` pads every batch to (its optional ``padded_sizes``), or
    ``None`` when it runs a batch of any size as it is."""
    sizes = getattr(classifier, "padded_sizes", None)
    return tuple(int(s) for s in sizes) if sizes else None
