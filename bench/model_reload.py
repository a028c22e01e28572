"""Several models: a worker's memory with one and with two models loaded, and the
time a reload takes (``python bench/model_reload.py``; needs ``make models``).

For each configuration it starts Redis, the API and one worker on a copy of models/repo,
classifies 500 images per model served, reads the worker's RSS, then adds a version 2 of
``shapes`` and asks for a reload: the reload time is from the request to the new version
serving (as ``GET /v1/models`` reports it), and the load + warm-up + check time the worker
measured. Prints a table; never part of ``make test``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import requests

from batchvision.cli.local import wait_for_workers
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import colour_files, labelled_files
from batchvision.testing.servers import RedisServer

ROOT = Path(__file__).resolve().parents[1]
ADMIN = "bench-admin"


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def run(models: list[str], images: int) -> dict[str, float]:
    tmp = Path(tempfile.mkdtemp(prefix="bench-models-"))
    repo = tmp / "repo"
    shutil.copytree(ROOT / "models" / "repo", repo)
    with RedisServer() as redis:
        settings = Settings.from_env(
            {},
            redis_url=redis.url,
            models_dir=str(repo),
            model="shapes",
            worker_models=",".join(models),
            api_port=free_port(),
            worker_metrics_port=free_port(),
            admin_keys=ADMIN,
            model_poll_s=0,
        )
        env = settings.to_env(include_secrets=True)
        api = Service("api", cli_argv("api", "--host", "127.0.0.1"), env)
        api.health_url = f"http://127.0.0.1:{settings.api_port}/healthz"
        worker = Service("worker", cli_argv("worker"), env, log_path=str(tmp / "worker.log"))
        sup = Supervisor([api, worker])
        sup.start()
        try:
            sup.wait_healthy(timeout=120)
            wait_for_workers(settings, timeout=300)
            assert worker.proc is not None
            ready_mb = rss_mb(worker.proc.pid)
            url = f"http://127.0.0.1:{settings.api_port}"
            client = Client(url)
            for model in models:
                files = labelled_files(images, seed=1) if model == "shapes" else colour_files(images, seed=2)
                job = client.submit_files([(n, d) for n, d, _ in files], model=model)
                client.wait(job.job_id, timeout=600, poll_s=0.2)
            busy_mb = rss_mb(worker.proc.pid)
            out = {"rss_ready_mb": ready_mb, "rss_after_jobs_mb": busy_mb}
            if "shapes" in models:
                shutil.copytree(repo / "shapes" / "1", repo / "shapes" / ".2.tmp")
                os.rename(repo / "shapes" / ".2.tmp", repo / "shapes" / "2")
                start = time.monotonic()
                resp = requests.post(
                    f"{url}/v1/models/shapes/reload", headers={"Authorization": f"Bearer {ADMIN}"}, timeout=10
                )
                resp.raise_for_status()
                while True:
                    shapes = next(m for m in client.models().models if m.name == "shapes")
                    if shapes.live_version == 2:
                        break
                    time.sleep(0.02)
                out["reload_wall_s"] = time.monotonic() - start
                out["reload_load_s"] = next(v.load_s or 0.0 for v in shapes.versions if v.version == 2)
                out["rss_after_reload_mb"] = rss_mb(worker.proc.pid)
            return out
        finally:
            sup.stop()
            shutil.rmtree(tmp, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=500, help="images classified per model")
    args = parser.parse_args()
    if not (ROOT / "models" / "repo" / "colours" / "1").is_dir():
        print("models/repo is missing: run `make models` first", file=sys.stderr)
        return 1
    rows = [(", ".join(m), run(m, args.images)) for m in (["shapes"], ["shapes", "colours"])]
    print("\n| worker serves | RSS when ready | RSS after jobs | reload: request -> live | load + check |")
    print("|---|---|---|---|---|")
    for name, r in rows:
        print(
            f"| {name} | {r['rss_ready_mb']:.0f} MB | {r['rss_after_jobs_mb']:.0f} MB | "
            f"{r.get('reload_wall_s', 0):.2f} s | {r.get('reload_load_s', 0):.2f} s |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
