"""The naive baseline of the common Flask/Celery templates: one Celery task per image, the
image bytes (base64) inside the message, batch size 1, the result through Celery's backend.
Same decode and the same model as the real pipeline, so only the orchestration differs.

    celery -A naive_worker worker --pool solo   (bench/e2e.py starts it)
"""

from __future__ import annotations

import base64
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from celery import Celery  # noqa: E402

from batchvision.core.imaging import decode_image  # noqa: E402
from batchvision.core.settings import Settings  # noqa: E402

settings = Settings.from_env()
app = Celery("naive", broker=settings.redis_url, backend=settings.redis_url)
app.conf.update(task_serializer="json", accept_content=["json"], result_serializer="json")
_model: Any = None


@app.task(name="naive.classify")
def classify(image_b64: str) -> str:
    global _model
    if _model is None:
        from workers.keras_model import load_classifier

        _model = load_classifier(settings)
    image = decode_image(base64.b64decode(image_b64), _model.input_size, max_pixels=10**8)
    probs = _model.predict([image])[0]
    return str(_model.labels[int(probs.argmax())])


if __name__ == "__main__":
    os.execvp(
        sys.executable,
        [sys.executable, "-m", "celery", "-A", "naive_worker", "worker", "--pool", "solo", "-l", "WARNING"],
    )
