"""The ONNX lane against the Keras lane, in one run (``python bench/onnx_lanes.py``).

One worker serves the demo model twice: ``shapes`` (the Keras file, TensorFlow) and
``shapes-onnx`` (its ONNX export, ONNX Runtime). Two figures per lane:

- **model**: images/s of the classifier's ``predict`` alone on batches of ``--batch`` decoded
  images, in this process (no queue, no decode);
- **service**: images/s of whole jobs of ``--images`` JPEGs through the API, the queue, the
  worker's decode threads, the model's batcher and lane, from submit to the last result. The two
  lanes take turns (``--rounds`` each, alternating) so load on the machine hits both alike.

Prints a table; never part of ``make test``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from batchvision.cli.local import wait_for_workers  # noqa: E402
from batchvision.cli.redis_server import free_port  # noqa: E402
from batchvision.cli.runner import Service, Supervisor, cli_argv  # noqa: E402
from batchvision.client import Client  # noqa: E402
from batchvision.core.imaging import decode_image  # noqa: E402
from batchvision.core.settings import Settings  # noqa: E402
from batchvision.core.synthetic import labelled_files  # noqa: E402
from batchvision.server.repository import scan  # noqa: E402
from batchvision.testing.servers import RedisServer  # noqa: E402

LANES = ("shapes", "shapes-onnx")


def build_repo(keras_file: Path, root: Path) -> Path:
    repo = root / "repo"
    (repo / "shapes" / "1").mkdir(parents=True)
    shutil.copy(keras_file, repo / "shapes" / "1" / "model.keras")
    shutil.copy(keras_file.with_name(keras_file.stem + ".labels.txt"), repo / "shapes" / "1" / "labels.txt")
    out = repo / "shapes-onnx" / "1" / "model.onnx"
    subprocess.run([sys.executable, "-m", "workers.onnx_export", str(keras_file), str(out)], check=True)
    return repo


def model_only(repo: Path, images: int, batch: int) -> dict[str, float]:
    """images/s of predict() alone, per lane."""
    from workers.keras_model import load_version

    entries = scan(repo)
    out = {}
    settings = Settings()
    for name in LANES:
        clf = load_version(entries[name].versions[1], settings)
        clf.warm_up()
        x = [decode_image(d, clf.input_size, max_pixels=10**7) for _, d, _ in labelled_files(batch, seed=3)]
        runs = max(1, images // batch)
        start = time.perf_counter()
        for _ in range(runs):
            clf.predict(x)
        out[name] = runs * batch / (time.perf_counter() - start)
    return out


def service(repo: Path, images: int, rounds: int, workdir: Path) -> dict[str, list[float]]:
    """images/s of whole jobs through the API and one worker serving both lanes."""
    files = [(n, d) for n, d, _ in labelled_files(images, seed=1)]
    with RedisServer() as redis:
        settings = Settings.from_env(
            {},
            redis_url=redis.url,
            models_dir=str(repo),
            model="shapes",
            api_port=free_port(),
            worker_metrics_port=free_port(),
            model_poll_s=0,
        )
        env = settings.to_env(include_secrets=True)
        api = Service("api", cli_argv("api", "--host", "127.0.0.1"), env)
        api.health_url = f"http://127.0.0.1:{settings.api_port}/healthz"
        worker = Service("worker", cli_argv("worker"), env, log_path=str(workdir / "worker.log"))
        sup = Supervisor([api, worker])
        sup.start()
        try:
            sup.wait_healthy(timeout=120)
            wait_for_workers(settings, timeout=300)
            client = Client(f"http://127.0.0.1:{settings.api_port}")
            deadline = time.monotonic() + 120
            while {m.name for m in client.models().models if m.live_version} != set(LANES):
                if time.monotonic() > deadline:
                    raise RuntimeError("the worker did not announce both models")
                time.sleep(0.2)
            # One small job per lane first: nothing measured pays for a first call.
            for name in LANES:
                job = client.submit_files(files[:16], model=name)
                client.wait(job.job_id, timeout=120, poll_s=0.1)
            out: dict[str, list[float]] = {name: [] for name in LANES}
            for _ in range(rounds):
                for name in LANES:
                    start = time.perf_counter()
                    job = client.submit_files(files, model=name)
                    done = client.wait(job.job_id, timeout=900, poll_s=0.05)
                    elapsed = time.perf_counter() - start
                    if done.done != images:
                        raise RuntimeError(f"{name}: {done.done} of {images} images classified")
                    out[name].append(images / elapsed)
            return out
        finally:
            sup.stop()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=1000, help="images a job (service figure)")
    parser.add_argument("--rounds", type=int, default=3, help="jobs per lane, alternating")
    parser.add_argument("--batch", type=int, default=32, help="batch size of the model figure")
    parser.add_argument("--model", type=Path, default=ROOT / "models" / "demo.keras")
    args = parser.parse_args()
    if not args.model.exists():
        print(f"{args.model} is missing: run `make models` first", file=sys.stderr)
        return 1
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    tmp = Path(tempfile.mkdtemp(prefix="bench-onnx-"))
    try:
        repo = build_repo(args.model, tmp)
        alone = model_only(repo, args.images, args.batch)
        jobs = service(repo, args.images, args.rounds, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\n{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f}; {args.images} images a job")
    print(f"{'lane':<13} {'model img/s':>12} {'service img/s (median, runs)':>40}")
    for name in LANES:
        runs = ", ".join(f"{v:.0f}" for v in jobs[name])
        print(f"{name:<13} {alone[name]:>12.0f} {statistics.median(jobs[name]):>12.0f}   ({runs})")
    ratio = statistics.median(jobs["shapes-onnx"]) / statistics.median(jobs["shapes"])
    print(f"ONNX / Keras: model {alone['shapes-onnx'] / alone['shapes']:.2f}x, service {ratio:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
