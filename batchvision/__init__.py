"""batchvision: queue-based batch image classification (shared code: no Flask, no TensorFlow)."""

from batchvision.settings import Settings

__all__ = ["Settings", "__version__"]
__version__ = "0.1.0"
