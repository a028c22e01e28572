"""batchvision: queue-based batch image classification (shared code: no Flask, no TensorFlow).

Sub-packages by role: ``core`` (pure: settings, documents, imaging, batching; no I/O),
``server`` (Redis key space, job store, blobs, queue, per-chunk pipeline, recovery),
``client`` (the Python client library) and ``cli`` (the ``batchvision`` command).
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
