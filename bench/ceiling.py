"""The in-process ceiling, run as a child process of bench/small_jobs.py (so the benchmark
process itself never loads TensorFlow, whose idle thread pools would cost the services under
test CPU on a 2-core machine). Prints one JSON object:

- ``images_per_s``: the project's own decoder (``decode_image``, JPEG draft mode) and classifier
  (``load_classifier``), sequential decode, predict in batches of ``--batch``, over every JPEG of
  ``--folder``: no HTTP, no queue, no Redis;
- ``single_s``: for the first ``--latency-images`` JPEGs (cycled), seconds of decode plus a
  batch-1 predict per image: what the idle single-image latency of a service cannot go below.

    python bench/ceiling.py --folder bench/out/photos-256 [--model mobilenet_v2] [--weights none]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchvision.core.imaging import decode_image  # noqa: E402
from batchvision.core.settings import Settings  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--folder", type=Path, required=True)
    ap.add_argument("--model", default="mobilenet_v2")
    ap.add_argument("--weights", default="none")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--latency-images", type=int, default=50)
    args = ap.parse_args()

    from workers.keras_model import load_classifier

    clf = load_classifier(Settings.from_env(model=args.model, weights=args.weights))
    clf.warm_up()
    data = [f.read_bytes() for f in sorted(args.folder.glob("*.jpg"))]

    def decode(d: bytes) -> np.ndarray:
        return decode_image(d, clf.input_size, max_pixels=10**8)

    clf.predict([decode(d) for d in data[: args.batch]])  # warm (decoder, largest batch)
    start = time.perf_counter()
    for i in range(0, len(data), args.batch):
        clf.predict([decode(d) for d in data[i : i + args.batch]])
    images_per_s = len(data) / (time.perf_counter() - start)

    clf.predict([decode(data[0])])
    single = []
    for i in range(args.latency_images):
        t0 = time.perf_counter()
        clf.predict([decode(data[i % len(data)])])
        single.append(time.perf_counter() - t0)
    json.dump({"images_per_s": images_per_s, "single_s": single, "images": len(data)}, sys.stdout)


if __name__ == "__main__":
    main()
