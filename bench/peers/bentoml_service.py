"""BentoML 1.4 peer for bench/small_jobs.py: one service, one worker process, with a
``batchable=True`` API (``max_batch_size=32``, ``max_latency_ms=1000``): BentoML's adaptive
batching groups concurrent requests and each batch is classified with one model call
(bench/peers/peer_model.py: the same decode and model as batchvision).

    POST /classify   multipart, one part named ``images`` holding the JPEG
                     ->  [{"label", "class_id", "score"}]
    POST /stats      {"batches", "images"} so far (mean batch size = images / batches)

A batchable BentoML API takes a list per request (the requests' lists are concatenated into a
batch), and BentoML binds a raw request body only to a single non-list input, so the image comes
as a one-file multipart upload (what BentoML's own client sends for a ``Path`` input).

Run in bench/peers/.venv-bentoml (``make bench-peers``), from bench/peers:

    bentoml serve bentoml_service:Classifier --host 127.0.0.1 --port 8200
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import bentoml


@bentoml.service(workers=1, traffic={"timeout": 120})
class Classifier:
    def __init__(self) -> None:
        import peer_model  # TensorFlow in the serving worker only

        self.model = peer_model.PeerModel()

    @bentoml.api(batchable=True, max_batch_size=32, max_latency_ms=1000)
    def classify(self, images: list[Path]) -> list[dict[str, Any]]:
        """One call per batch: decode every image, then one model call."""
        return self.model.classify([p.read_bytes() for p in images])

    @bentoml.api
    def stats(self) -> dict[str, int]:
        return self.model.stats()
