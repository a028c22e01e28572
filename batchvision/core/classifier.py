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
