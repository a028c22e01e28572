"""Benchmark stand-in models, loaded by workers through the plugin hook
(``BATCHVISION_MODEL=py:standins:null``, with this folder on ``PYTHONPATH``).

``null`` answers at once; ``sleeping`` takes ``BENCH_SLEEP_S`` seconds per batch
(an accelerator whose time does not depend on the host CPU). They measure the orchestration's
own capacity and are never for real use.
"""

from __future__ import annotations

import os
import time
from importlib import resources

import numpy as np

from batchvision.core.settings import Settings

NULL_MODEL = "py:standins:null"
SLEEPING_MODEL = "py:standins:sleeping"


class StandIn:
    """Uniform probabilities over the ImageNet labels, after an optional fixed delay."""

    def __init__(self, name: str, delay_s: float) -> None:
        self.name = name
        self.labels = resources.files("batchvision").joinpath("data/imagenet_labels.txt").read_text().split()
        self.input_size = (224, 224)
        self.device = "null"
        self.delay_s = delay_s
        self._probs = np.full(len(self.labels), 1.0 / len(self.labels), np.float32)

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        if self.delay_s:
            time.sleep(self.delay_s)
        return [self._probs] * len(images)

    def warm_up(self) -> float:
        return 0.0


def null(settings: Settings) -> StandIn:
    return StandIn("null", 0.0)


def sleeping(settings: Settings) -> StandIn:
    delay = float(os.environ.get("BENCH_SLEEP_S", "0.25"))
    return StandIn(f"sleep:{delay}", delay)
