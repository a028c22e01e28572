"""What one ``POST /v1/classify`` costs the API in CPU, in-process, with and without the request
path's own shortcuts: multipart bodies decoded without compiling patterns per request
(``api/multipart.py``), Redis commands packed by hiredis without redis-py's per-argument
encoding (``HiredisPacker`` in ``batchvision/server/connect.py``), and the answer's rows taken
from the news of the job's finish instead of read from Redis (``reply`` in
``batchvision/server/store.py``).

One process starts a real Redis and a worker with the null model (its answers cost nothing) and
runs the Flask app itself (its test client in place of gunicorn, so the figure is the app's own
work): ``--requests`` single-image requests of a 224x224 JPEG, and the CPU time of the
requesting thread (``time.thread_time``) per request, for a raw image body and for a one-file
multipart body (a new random boundary each, as clients send). "shipped" is the code as it is;
"answer read" reads the answer from Redis after the finish; "without" also puts werkzeug's
decoder and redis-py's own packer back. Each round measures each, one after the other in the
same process (each round starting with the next), so the machine's state moves all alike.

    python bench/request_path.py [--rounds 3] [--requests 500]
"""

from __future__ import annotations

import argparse
import io
import time

from common import OUT, median, stack_processes, table
from null_model import small_jpegs
from standins import NULL_MODEL
from werkzeug import formparser
from werkzeug.sansio.multipart import MultipartDecoder

from api import create_app
from api.multipart import BoundaryDecoder
from batchvision.core.settings import Settings
from batchvision.server import store
from batchvision.server.connect import HiredisPacker

VARIANTS = ("shipped", "answer read", "without")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--requests", type=int, default=500)
    args = ap.parse_args()
    images = [p.read_bytes() for p in sorted(small_jpegs(64).iterdir())]
    settings = Settings.from_env(model=NULL_MODEL, worker_metrics_port=0)
    # The worker's log lines (one per job) go to a file, not between the figures.
    with stack_processes(settings, names=("worker",), log_dir=OUT / "request_path") as stack:
        app = create_app(stack.settings)
        pool = app.extensions["batchvision"].redis.connection_pool
        client = app.test_client()

        def use(variant: str) -> None:
            store.REPLY_MAX_ROWS = 64 if variant == "shipped" else 0  # 0: no job replies
            shipped = variant != "without"
            formparser.MultipartDecoder = BoundaryDecoder if shipped else MultipartDecoder  # type: ignore[misc]
            if shipped:
                pool.connection_kwargs["command_packer"] = HiredisPacker()
            else:
                pool.connection_kwargs.pop("command_packer", None)
            pool.reset()  # connections made from now on pack the variant's way

        def raw(i: int) -> None:
            r = client.post("/v1/classify?filename=a.jpg", data=images[i % 64], content_type="image/jpeg")
            assert r.status_code == 200, r.data

        def multipart(i: int) -> None:
            body = {"files": (io.BytesIO(images[i % 64]), f"a{i}.jpg")}
            r = client.post("/v1/classify", data=body, content_type="multipart/form-data")
            assert r.status_code == 200, r.data

        figures: dict[tuple[str, str], list[float]] = {}
        for round_ in range(args.rounds):
            first = round_ % len(VARIANTS)
            for variant in VARIANTS[first:] + VARIANTS[:first]:
                use(variant)
                for kind, send in (("raw", raw), ("multipart", multipart)):
                    for i in range(50):
                        send(i)
                    start = time.thread_time()
                    for i in range(args.requests):
                        send(i)
                    ms = (time.thread_time() - start) / args.requests * 1e3
                    figures.setdefault((kind, variant), []).append(ms)
    rows = [["thread CPU ms per request", *(f"round {i + 1}" for i in range(args.rounds)), "median"]]
    for (kind, variant), values in figures.items():
        rows.append([f"{kind} body, {variant}", *(f"{v:.3f}" for v in values), f"{median(values):.3f}"])
    print(table([rows[0], *sorted(rows[1:], key=lambda r: r[0])]))


if __name__ == "__main__":
    main()
