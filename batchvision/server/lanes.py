"""Where a job's images go in a worker: one lane per model (and per pinned version), each with
its own batcher, so a batch never mixes models or versions.

The worker's model manager (``workers/manager.py``) provides the lanes; the chunk processor
only asks for the lane of a job's options and turns each output into the stored result.
"""

from __future__ import annotations

from typing import Any, Protocol

import numpy as np

from batchvision.core.batching import DynamicBatcher
from batchvision.core.model_refs import JobOptions
from batchvision.core.results import ImageResult


class Lane(Protocol):
    """One model (one version, or the live one) behind one batcher."""

    @property
    def batcher(self) -> DynamicBatcher[np.ndarray, Any]: ...

    @property
    def input_size(self) -> tuple[int, int]:
        """``(width, height)`` the images are decoded to."""
        ...

    def result(self, output: Any, options: JobOptions) -> ImageResult:
        """The stored result of one image from its batcher output."""
        ...


class Lanes(Protocol):
    """The lanes of a worker."""

    def lane(self, options: JobOptions) -> Lane | None:
        """The lane for a job's options; ``None`` when this worker does not serve the model.
        Raises :class:`~batchvision.core.errors.BatchvisionError` for a version it cannot load."""
        ...
