"""The GPU path, measured in one run on Keras' JAX backend (``bench/gpu.sh`` runs it on a lent
GPU machine that has JAX but no TensorFlow; here it runs on the CPU):

1. **Raw model**: the worker's own model runner (``load_classifier``: padding to the batch
   buckets, scaling, host-to-device copy, the compiled forward pass, scores back) on
   pre-decoded images, at batch sizes ``--batches`` (default 1, 32, 128, 256); images/s.
   Also the in-process ceiling of bench/ceiling.py: sequential JPEG decode + batches of the
   stack's largest batch, as the small-jobs benchmark takes it.
2. **Full stack** (Redis, API, one worker on the GPU, the same model): one bulk job of the image
   set (``Client.submit_folder``) and 32 concurrent single-image ``POST /v1/classify`` clients;
   images/s, mean batch size, and the ratio to the raw figure at the stack's largest batch
   (``BATCHVISION_MAX_BATCH_SIZE``) and to the decode ceiling, all of this run.
3. **Orchestration capacity**: the null model (answers at once), single-image classify jobs/s
   with ``--capacity-clients`` clients, one API with ``--api-workers`` gunicorn workers and
   1, 2, ... worker processes (``--capacity-workers``), decode threads at their default (every
   core); CPU ms per job of each process.

Every part is a child process or a stack of its own; the figures go to stdout as tables and, with
``--json``, as JSON. No timed assertions: it reports.

    python bench/gpu.py [--quick] [--model mobilenet_v2] [--images 512] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from common import OUT, cpu_seconds, photo_set, stack_processes, table
from loadgen import run_load
from null_model import small_jpegs
from small_jobs import batch_counter, bulk_job, classify_unit, measured
from standins import NULL_MODEL

from batchvision.cli.local import wait_for_workers
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.core.settings import Settings

HERE = Path(__file__).resolve().parent
Figures = dict[str, Any]


def raw_model(model: str, batches: list[int], seconds: float) -> Figures:
    """Images/s of the worker's model runner per batch size (run in a child process: ``raw``)."""
    import numpy as np

    from workers.keras_model import load_classifier

    settings = Settings.from_env(model=model, weights="none", max_batch_size=max(batches))
    begin = time.perf_counter()
    clf = load_classifier(settings)
    load_s = time.perf_counter() - begin
    warm_s = clf.warm_up()  # every padded size compiled once
    w, h = clf.input_size
    rng = np.random.default_rng(0)
    out: Figures = {"device": clf.device, "load_s": load_s, "warm_up_s": warm_s, "images_per_s": {}}
    for b in batches:
        images = list(rng.integers(0, 256, (b, h, w, 3), dtype=np.uint8))
        clf.predict(images)
        calls, start = 0, time.perf_counter()
        while calls < 3 or time.perf_counter() - start < seconds:
            clf.predict(images)  # scores come back to the host: the call is complete
            calls += 1
        out["images_per_s"][str(b)] = b * calls / (time.perf_counter() - start)
    return out


def child(args: list[str]) -> Figures:
    """Run a part in a child process (the benchmark process itself never loads the model)."""
    proc = subprocess.run([sys.executable, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args[:2])} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    result: Figures = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def stack_part(model: str, folder: Path, clients: int, timeout_s: float) -> Figures:
    """The bulk job and ``clients`` single-image clients through Redis, API and one worker."""
    images = [(f.name, f.read_bytes()) for f in sorted(folder.glob("*.jpg"))]
    settings = Settings.from_env(model=model, weights="none", sync_timeout_s=timeout_s)
    with stack_processes(settings, log_dir=OUT / "logs" / "gpu" / "stack") as st:
        s = st.settings
        host, port, url = "127.0.0.1", s.api_port, f"http://127.0.0.1:{s.api_port}"

        def counter() -> tuple[float, float]:
            return batch_counter(s.worker_metrics_port)

        classify = classify_unit(images, timeout_s)
        run_load(host, port, classify, min(len(images), 64), clients, timeout_s)  # warm: paths, sizes
        bulk_job(url, folder, timeout_s)
        return {
            "max_batch_size": s.max_batch_size,
            "bulk": measured(lambda: bulk_job(url, folder, timeout_s), counter, 0.0),
            "clients": measured(
                lambda: run_load(host, port, classify, len(images), clients, timeout_s), counter, 0.0
            ),
        }


def capacity(workers: int, api_workers: int, clients: int, requests: int, timeout_s: float) -> Figures:
    """Null-model single-image jobs/s and CPU ms per job with ``workers`` worker processes."""
    images = [(f.name, f.read_bytes()) for f in sorted(small_jpegs(64).glob("*.jpg"))]
    settings = Settings.from_env(
        model=NULL_MODEL, sync_timeout_s=timeout_s, api_workers=api_workers, worker_metrics_port=0
    )
    with stack_processes(settings, log_dir=OUT / "logs" / "gpu" / f"capacity-{workers}") as st:
        s = st.settings
        extra = Supervisor(
            [
                Service("worker", cli_argv("worker", "--name", f"extra{i}@{free_port()}"), s.to_env())
                for i in range(workers - 1)
            ]
        )
        extra.start()
        try:
            wait_for_workers(s, count=workers)
            unit = classify_unit(images, timeout_s)
            run_load("127.0.0.1", s.api_port, unit, min(requests, 200), clients, timeout_s)  # warm
            pids = st.pids()
            worker_pids = [pids["worker"], *(svc.proc.pid for svc in extra.services if svc.proc is not None)]

            def sample() -> dict[str, float]:
                usage = resource.getrusage(resource.RUSAGE_SELF)
                return {
                    "api": cpu_seconds(pids["api"]),
                    "redis": cpu_seconds(pids["redis"]),
                    "workers": sum(cpu_seconds(p) for p in worker_pids),
                    "client": usage.ru_utime + usage.ru_stime,
                }

            before = sample()
            res = run_load("127.0.0.1", s.api_port, unit, requests, clients, timeout_s)
            after = sample()
        finally:
            extra.stop()
    jobs = res.statuses[200]
    return {
        "workers": workers,
        "api_workers": api_workers,
        "jobs_per_s": res.units_per_s,
        "cpu_ms_per_job": {k: (after[k] - before[k]) * 1000 / jobs if jobs else None for k in before},
        "statuses": {str(k): v for k, v in sorted(res.statuses.items())},
    }


def report(fig: Figures) -> str:
    raw, ceiling, stack = fig["raw"], fig["ceiling"], fig["stack"]
    per_batch = raw["images_per_s"]
    top = str(stack["max_batch_size"])
    ref = per_batch.get(top)
    rows: list[tuple[str, ...]] = [("raw model runner (pre-decoded images)", "img/s", "")]
    rows += [(f"batch {b}", f"{v:.0f}", "") for b, v in per_batch.items()]
    rows.append((f"in-process ceiling: sequential decode + batches of {top}", f"{ceiling:.0f}", ""))
    device = f"device: {raw['device']}; model load {raw['load_s']:.1f} s"
    out = [f"{device}, warm-up (compile) {raw['warm_up_s']:.1f} s", table(rows)]
    srows: list[tuple[str, ...]] = [
        ("full stack (API, Redis, 1 worker)", "img/s", f"vs raw batch {top}", "vs decode ceiling",
         "mean batch", "errors")
    ]  # fmt: skip
    titles = {"bulk": f"one {fig['images']}-image bulk job", "clients": f"{fig['clients']} clients x 1-image"}
    for key, title in titles.items():
        f = stack[key]
        errors = {k: v for k, v in f["statuses"].items() if k != "200"}
        srows.append((
            title,
            f"{f['images_per_s']:.0f}",
            f"{f['images_per_s'] / ref:.3f}" if ref else "-",
            f"{f['images_per_s'] / ceiling:.2f}",
            f"{f['mean_batch']:.1f}" if f["mean_batch"] else "-",
            ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0",
        ))  # fmt: skip
    out.append(table(srows))
    crows: list[tuple[str, ...]] = [
        ("null model capacity", "jobs/s", "API ms/job", "worker(s) ms/job", "redis ms/job", "client ms/job",
         "errors")
    ]  # fmt: skip
    for c in fig["capacity"]:
        ms = c["cpu_ms_per_job"]
        errors = {k: v for k, v in c["statuses"].items() if k != "200"}
        crows.append((
            f"1 API ({c['api_workers']} gunicorn workers) + {c['workers']} worker process(es)",
            f"{c['jobs_per_s']:.0f}",
            *(f"{ms[k]:.2f}" if ms[k] is not None else "-" for k in ("api", "workers", "redis", "client")),
            ", ".join(f"{k}: {v}" for k, v in errors.items()) or "0",
        ))  # fmt: skip
    out.append(table(crows))
    return "\n\n".join(out)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "raw":  # the child process of part 1
        model, batches, seconds = sys.argv[2], [int(b) for b in sys.argv[3].split(",")], float(sys.argv[4])
        print(json.dumps(raw_model(model, batches, seconds)))
        return
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument(
        "--model",
        help="keras.applications name (random weights) or a .keras file; default mobilenet_v2, with "
        "--quick the demo model (models/demo.keras) where it is built",
    )
    ap.add_argument("--images", type=int, default=512, help="photo-like JPEGs, half 640x480, half 1440x1080")
    ap.add_argument("--batches", default="1,32,128,256")
    ap.add_argument("--seconds", type=float, default=5.0, help="timed seconds per raw batch size")
    ap.add_argument("--clients", type=int, default=32)
    ap.add_argument("--capacity-clients", type=int, default=64)
    ap.add_argument("--capacity-requests", type=int, default=4000)
    ap.add_argument("--capacity-workers", default="1,2")
    ap.add_argument("--api-workers", type=int, default=max(2, (os.cpu_count() or 2) // 4))
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every part on a CPU")
    ap.add_argument("--json", type=Path, help="also write the figures here")
    args = ap.parse_args()
    demo = HERE.parent / "models" / "demo.keras"
    if args.quick:
        args.images, args.batches, args.seconds = min(args.images, 32), "1,32", 1.0
        args.capacity_requests, args.capacity_workers = 300, "1"
        args.model = args.model or (str(demo) if demo.exists() else None)
    args.model = args.model or "mobilenet_v2"
    os.environ.setdefault("BATCHVISION_KERAS_BACKEND", "jax")
    timeout_s = 120.0
    folder = photo_set(args.images)
    started = time.perf_counter()
    fig: Figures = {
        "images": args.images,
        "clients": args.clients,
        "backend": os.environ["BATCHVISION_KERAS_BACKEND"],
    }
    print("part 1: raw model", file=sys.stderr, flush=True)
    fig["raw"] = child([__file__, "raw", args.model, args.batches, str(args.seconds)])
    fig["ceiling"] = child(
        [str(HERE / "ceiling.py"), "--folder", str(folder), "--model", args.model, "--latency-images", "1",
         "--batch", str(Settings.from_env().max_batch_size)]
    )["images_per_s"]  # fmt: skip
    print("part 2: full stack", file=sys.stderr, flush=True)
    fig["stack"] = stack_part(args.model, folder, args.clients, timeout_s)
    print("part 3: null-model capacity", file=sys.stderr, flush=True)
    fig["capacity"] = [
        capacity(int(n), args.api_workers, args.capacity_clients, args.capacity_requests, timeout_s)
        for n in args.capacity_workers.split(",")
    ]
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}; "
        f"Keras backend {fig['backend']}; model {args.model} (random weights); {args.images} photo-like "
        f"JPEGs (half 640x480, half 1440x1080); {time.perf_counter() - started:.0f} s in all"
    )
    print(report(fig))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=2))
        print(f"\nraw figures: {args.json}")


if __name__ == "__main__":
    main()
