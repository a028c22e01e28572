"""Small jobs: what the service delivers to many clients sending one or a few images each,
against what the same model and decoder do in-process, and against two peers, all in one run
(ratios compare within the same machine state), over ``--rounds`` rounds (median, min-max).

Each round measures, one after the other (nothing else of the benchmark runs meanwhile):

1. **In-process ceiling** (a child process: bench/ceiling.py): the project's own decoder and
   classifier, sequential decode, predict in batches of 32, over the image set; images/s.
   Also decode + batch-1 predict per image (p50): the floor of the idle latency.
2. **Our full stack** (Redis, API under gunicorn, one worker; ``--model``, random weights):
   (a) 32 concurrent clients, each sending single-image ``POST /v1/classify`` (raw JPEG body,
       ``?timeout=60``), one request per image of the set;
   (b) the same with 256 concurrent clients;
   (c) 32 concurrent clients, each submitting 4-image jobs (``POST /v1/jobs``, multipart parts
       ``files``), polling ``GET /v1/jobs/<id>`` every ``--poll-s`` until final, then fetching
       ``GET /v1/jobs/<id>/results``;
   (l) as (c), each poll a long poll (``?wait=<--poll-s>``: the API answers once the job is
       final), as ``Client.wait`` polls;
   (d) one bulk job of the whole set: ``Client.submit_folder`` then ``wait``;
   (f) as (a) with 8 clients (how full batches get with few closed-loop clients);
   (t) 32 concurrent ``tritonclient[http]`` clients, each sending single-image
       ``POST /v2/models/<default model>/infer`` (the Open Inference Protocol, the image as one
       BYTES element, the scores back as binary data).
   For each: images/s with a prediction, the ratio to this round's ceiling, failed units by
   HTTP status (429s apart: backpressure is intended), the mean batch size the worker ran
   (``batchvision_batch_size_sum / _count`` from its Prometheus metrics, delta over the
   workload), per-unit latency p50/p95.
   Idle latency: ``--latency-requests`` sequential single-image ``POST /v1/classify``, p50/p95.
3. **The orchestration's own capacity**: a second stack, one API and one worker, with the null
   model (bench/standins.py: answers at once), so the model costs nothing: single-image
   ``POST /v1/classify`` jobs/s end to end with 64 concurrent clients (224x224 JPEGs), and the
   CPU milliseconds per job of each process (from ``/proc/<pid>/stat``: gunicorn master plus its
   workers, redis-server, the worker process, and this load generator).
4. **Peers** (``make bench-peers``): Ray Serve and BentoML serving the same decode and model
   with their own batching (bench/peers/): workloads (a) and (b) and the idle latency, same
   images, ratio to the same ceiling; mean batch size from the peer's own counter.

The load generator is bench/loadgen.py: one keep-alive connection per client thread, bodies in
memory. No timed assertions: it reports, it does not judge. The machine is shared and noisy:
compare within one run.

    python bench/small_jobs.py [--images 256] [--rounds 3] [--model mobilenet_v2]
                               [--skip-peers] [--quick] [--json bench/out/small_jobs.json]
                               [--part ours --part capacity --part peers] [--workloads fabcldt]
                               [--broker redis --broker rabbitmq]

``--broker`` (repeatable): parts 2 and 3 run once per broker in each round, side by
side; with RabbitMQ (a private ``rabbitmq-server``) part 3 also counts its CPU per job.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import OUT, cpu_seconds, median, pct, photo_set, stack_processes, table
from loadgen import (
    NO_PREDICTION,
    NO_RESPONSE,
    NOT_FINISHED,
    Conn,
    LoadResult,
    Outcome,
    Unit,
    multipart,
    run_load,
    sequential_latencies,
    status_label,
)
from null_model import small_jpegs
from peers.launch import INSTALL_HINT, PEERS, PeerSpec, running_peer
from standins import NULL_MODEL

from batchvision.client import Client
from batchvision.client.errors import ApiError
from batchvision.core.settings import Settings
from batchvision.testing.servers import RabbitMQServer

FINAL = {"succeeded", "partial", "failed", "canceled"}
PARTS = ("ours", "capacity", "peers")
WORKLOADS = ("f", "a", "b", "c", "l", "d", "t")
HERE = Path(__file__).resolve().parent

Images = list[tuple[str, bytes]]
Figures = dict[str, Any]


@dataclass(frozen=True)
class Config:
    images: int
    rounds: int
    model: str
    clients_few: int
    clients_small: int
    clients_many: int
    job_images: int
    job_clients: int
    poll_s: float
    latency_requests: int
    capacity_requests: int
    capacity_clients: int
    request_timeout_s: float
    skip_peers: bool
    ray_max_ongoing: int
    brokers: tuple[str, ...] = ("redis",)
    parts: tuple[str, ...] = ("ours", "capacity", "peers")
    workloads: tuple[str, ...] = WORKLOADS


# --- units of work --------------------------------------------------------------------------


def classify_unit(images: Images, timeout_s: float) -> Unit:
    """One single-image ``POST /v1/classify`` with the raw JPEG body; image ``i`` of the set."""
    path = f"/v1/classify?timeout={timeout_s:g}"
    headers = {"Content-Type": "image/jpeg"}

    def unit(conn: Conn, i: int) -> Outcome:
        resp = conn.request("POST", path, images[i % len(images)][1], headers)
        if resp.status != 200:
            return Outcome(resp.status)
        ok = sum(1 for row in resp.json().get("results", []) if row.get("status") == "ok")
        return Outcome(200, ok) if ok else Outcome(NO_PREDICTION)

    return unit


def job_unit(
    images: Images, per_job: int, jobs: int, poll_s: float, timeout_s: float, long_poll: bool = False
) -> Unit:
    """Submit a ``per_job``-image job (multipart), poll it until final, fetch its results
    (``long_poll``: each poll held by the API up to ``poll_s``, as ``Client.wait`` polls)."""
    status = "/v1/jobs/{}" + (f"?wait={poll_s:g}" if long_poll else "")
    bodies = [
        multipart("files", [images[(j * per_job + k) % len(images)] for k in range(per_job)])
        for j in range(jobs)
    ]

    def unit(conn: Conn, i: int) -> Outcome:
        body, ctype = bodies[i]
        resp = conn.request("POST", "/v1/jobs", body, {"Content-Type": ctype})
        if resp.status != 202:
            return Outcome(resp.status)
        job_id = resp.json()["job_id"]
        deadline = time.monotonic() + timeout_s
        while True:
            st = conn.request("GET", status.format(job_id))
            if st.status != 200:
                return Outcome(st.status)
            if st.json()["status"] in FINAL:
                break
            if time.monotonic() > deadline:
                return Outcome(NOT_FINISHED)
            if not long_poll:
                time.sleep(poll_s)
        res = conn.request("GET", f"/v1/jobs/{job_id}/results")
        if res.status != 200:
            return Outcome(res.status)
        ok = sum(1 for row in res.json()["results"] if row.get("status") == "ok")
        return Outcome(200 if ok == per_job else NO_PREDICTION, ok)

    return unit


def default_model(host: str, port: int) -> str:
    """The name the stack serves its default model under (``GET /v1/models``)."""
    with urllib.request.urlopen(f"http://{host}:{port}/v1/models", timeout=10) as resp:
        return str(json.loads(resp.read())["default"])


def triton_unit(host: str, port: int, model: str, images: Images, timeout_s: float) -> Unit:
    """One single-image ``POST /v2/models/<model>/infer`` through ``tritonclient[http]`` (the
    Open Inference Protocol client as a Triton user runs it: the image as one BYTES element,
    the scores back as binary data); one client object per load thread."""
    import numpy as np
    import tritonclient.http as triton
    from tritonclient.utils import InferenceServerException

    local = threading.local()
    scores = [triton.InferRequestedOutput("scores", binary_data=True)]

    def unit(conn: Conn, i: int) -> Outcome:
        client = getattr(local, "client", None)
        if client is None:
            client = local.client = triton.InferenceServerClient(
                url=f"{host}:{port}", connection_timeout=timeout_s, network_timeout=timeout_s
            )
        inp = triton.InferInput("images", [1], "BYTES")
        inp.set_data_from_numpy(np.array([images[i % len(images)][1]], dtype=np.object_))
        try:
            result = client.infer(model, [inp], outputs=scores)
        except InferenceServerException as exc:
            status = exc.status() or ""  # the HTTP status as text; none when nothing answered
            return Outcome(int(status) if status.isdigit() else NO_RESPONSE)
        return Outcome(200, 1) if result.as_numpy("scores") is not None else Outcome(NO_PREDICTION)

    return unit


def peer_unit(spec: PeerSpec, images: Images) -> Unit:
    """One single-image classification by a peer (its own route and body format)."""
    requests = [spec.request(data) for _, data in images]

    def unit(conn: Conn, i: int) -> Outcome:
        method, path, body, headers = requests[i % len(requests)]
        resp = conn.request(method, path, body, headers)
        return Outcome(resp.status, 1 if resp.status == 200 else 0)

    return unit


# --- measuring --------------------------------------------------------------------------------


def batch_counter(port: int) -> tuple[float, float]:
    """(images, model calls) so far from the worker's ``batchvision_batch_size`` histogram."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    total = count = 0.0
    for line in text.splitlines():  # summed over the model label (one series per model)
        if line.startswith(("batchvision_batch_size_sum ", "batchvision_batch_size_sum{")):
            total += float(line.split()[-1])
        elif line.startswith(("batchvision_batch_size_count ", "batchvision_batch_size_count{")):
            count += float(line.split()[-1])
    return total, count


def measured(
    run: Callable[[], LoadResult], counter: Callable[[], tuple[float, float]], ceiling: float
) -> Figures:
    """Run a workload and return its figures, with the mean batch size over it."""
    before = counter()
    res = run()
    after = counter()
    calls = after[1] - before[1]
    return {
        "images_per_s": res.images_per_s,
        "vs_ceiling": res.images_per_s / ceiling if ceiling else None,
        "mean_batch": (after[0] - before[0]) / calls if calls else None,
        "statuses": {str(k): v for k, v in sorted(res.statuses.items())},
        "units": res.units,
        "images": res.images,
        "clients": res.concurrency,
        "elapsed_s": res.elapsed_s,
        "latency_p50_s": pct(res.latencies_s, 50) if res.latencies_s else None,
        "latency_p95_s": pct(res.latencies_s, 95) if res.latencies_s else None,
    }


def latency_figures(res: LoadResult) -> Figures:
    return {
        "p50_s": pct(res.latencies_s, 50),
        "p95_s": pct(res.latencies_s, 95),
        "statuses": {str(k): v for k, v in sorted(res.statuses.items())},
    }


def bulk_job(url: str, folder: Path, timeout_s: float) -> LoadResult:
    """One job of the whole folder through the Python client, upload to every result stored."""
    client = Client(url)
    start = time.perf_counter()
    statuses: Counter[int] = Counter()
    images = 0
    try:
        job = client.submit_folder(folder)
        st = client.wait(job.job_id, timeout=timeout_s, poll_s=0.1)
        images = st.done
        statuses[200 if images == job.images else NO_PREDICTION] += 1
    except ApiError as exc:
        statuses[exc.status] += 1
    except TimeoutError:
        statuses[NOT_FINISHED] += 1
    except OSError:
        statuses[NO_RESPONSE] += 1
    elapsed = time.perf_counter() - start
    return LoadResult(elapsed, 1, [elapsed], statuses, images)


def ceiling_round(folder: Path, cfg: Config) -> Figures:
    """The in-process ceiling and decode + batch-1 latency, in a child process."""
    out = subprocess.run(
        [sys.executable, str(HERE / "ceiling.py"), "--folder", str(folder), "--model", cfg.model,
         "--latency-images", str(cfg.latency_requests)],
        capture_output=True, text=True,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(f"bench/ceiling.py failed ({out.returncode}):\n{out.stderr[-3000:]}")
    raw = json.loads(out.stdout)
    return {"images_per_s": raw["images_per_s"], "single_p50_s": pct(raw["single_s"], 50)}


@contextmanager
def with_broker(settings: Settings, broker: str) -> Iterator[tuple[Settings, RabbitMQServer | None]]:
    """``settings`` for ``broker``: Redis as is, or a private RabbitMQ node started for it."""
    if broker != "rabbitmq":
        yield settings, None
        return
    with RabbitMQServer() as rabbitmq:
        yield settings.replace(broker_url=rabbitmq.url), rabbitmq


def key_of(part: str, broker: str) -> str:
    """Figures of ``part`` with ``broker``: the Redis ones keep their names (``ours``)."""
    return part if broker == "redis" else f"{part}-{broker}"


def ours_round(
    folder: Path, images: Images, ceiling: float, cfg: Config, log_dir: Path, broker: str = "redis"
) -> Figures:
    """Workloads (a)-(d) and the idle latency against our stack."""
    plain = Settings.from_env(model=cfg.model, weights="none", sync_timeout_s=cfg.request_timeout_s)
    with (
        with_broker(plain, broker) as (settings, _),
        stack_processes(settings, log_dir=log_dir / key_of("ours", broker)) as st,
    ):
        s = st.settings
        host, port = "127.0.0.1", s.api_port

        def counter() -> tuple[float, float]:
            return batch_counter(s.worker_metrics_port)

        classify = classify_unit(images, cfg.request_timeout_s)
        n = len(images)
        # Warm-up: every padded batch size traced, connections and the interactive path used.
        run_load(host, port, classify, min(n, 64), cfg.clients_small, cfg.request_timeout_s)
        bulk_job(f"http://{host}:{port}", folder, 600)
        jobs = max(1, n // cfg.job_images)
        timeout = cfg.request_timeout_s
        v2 = triton_unit(host, port, default_model(host, port), images, timeout)
        loads: dict[str, Callable[[], LoadResult]] = {
            "f": lambda: run_load(host, port, classify, n, cfg.clients_few, timeout),
            "a": lambda: run_load(host, port, classify, n, cfg.clients_small, timeout),
            "b": lambda: run_load(host, port, classify, n, cfg.clients_many, timeout),
            "c": lambda: run_load(
                host,
                port,
                job_unit(images, cfg.job_images, jobs, cfg.poll_s, timeout),
                jobs,
                cfg.job_clients,
                timeout,
            ),
            "l": lambda: run_load(
                host,
                port,
                job_unit(images, cfg.job_images, jobs, cfg.poll_s, timeout, long_poll=True),
                jobs,
                cfg.job_clients,
                timeout,
            ),
            "d": lambda: bulk_job(f"http://{host}:{port}", folder, 600),
            "t": lambda: run_load(host, port, v2, n, cfg.clients_small, timeout),
        }
        fig: Figures = {w: measured(loads[w], counter, ceiling) for w in cfg.workloads}
        fig["latency"] = latency_figures(
            sequential_latencies(host, port, classify, cfg.latency_requests, cfg.request_timeout_s)
        )
        return fig


def capacity_round(cfg: Config, log_dir: Path, broker: str = "redis") -> Figures:
    """Jobs/s and CPU per job of each process with the null model (the orchestration alone)."""
    folder = small_jpegs(64)
    images = [(f.name, f.read_bytes()) for f in sorted(folder.glob("*.jpg"))]
    plain = Settings.from_env(model=NULL_MODEL, sync_timeout_s=cfg.request_timeout_s)
    with (
        with_broker(plain, broker) as (settings, rabbitmq),
        stack_processes(settings, log_dir=log_dir / key_of("null", broker)) as st,
    ):
        s = st.settings
        unit = classify_unit(images, cfg.request_timeout_s)
        run_load("127.0.0.1", s.api_port, unit, 100, cfg.capacity_clients, cfg.request_timeout_s)  # warm
        pids = st.pids()
        components = {"api": pids["api"], "redis": pids["redis"], "worker": pids["worker"]}
        if rabbitmq is not None and rabbitmq.pid() is not None:
            components["rabbitmq"] = int(rabbitmq.pid() or 0)

        def sample() -> dict[str, float]:
            usage = resource.getrusage(resource.RUSAGE_SELF)
            cpu = {name: cpu_seconds(pid) for name, pid in components.items()}
            cpu["client"] = usage.ru_utime + usage.ru_stime
            return cpu

        before = sample()
        res = run_load(
            "127.0.0.1", s.api_port, unit, cfg.capacity_requests, cfg.capacity_clients, cfg.request_timeout_s
        )
        after = sample()
    jobs = res.statuses[200]
    cpu_ms = {k: (after[k] - before[k]) * 1000 / jobs if jobs else None for k in before}
    return {
        "jobs_per_s": res.units_per_s,
        "cpu_ms_per_job": cpu_ms,
        "cpu_ms_per_job_total": sum(v for v in cpu_ms.values() if v is not None) if jobs else None,
        "statuses": {str(k): v for k, v in sorted(res.statuses.items())},
        "latency_p50_s": pct(res.latencies_s, 50),
        "latency_p95_s": pct(res.latencies_s, 95),
        "elapsed_s": res.elapsed_s,
        "pids": components,
    }


def peer_round(spec: PeerSpec, images: Images, ceiling: float, cfg: Config, log_dir: Path) -> Figures:
    """Workloads (a) and (b) and the idle latency against one peer."""
    if not spec.installed():
        return {"error": INSTALL_HINT}
    try:
        env = {"BENCH_RAY_MAX_ONGOING_REQUESTS": str(cfg.ray_max_ongoing)}
        with running_peer(spec, images[0][1], log_dir, env=env) as peer:

            def counter() -> tuple[float, float]:
                stats = peer.stats()
                return float(stats["images"]), float(stats["batches"])

            unit = peer_unit(spec, images)
            n = len(images)
            run_load(peer.host, peer.port, unit, min(n, 64), cfg.clients_small, cfg.request_timeout_s)
            return {
                "a": measured(
                    lambda: run_load(peer.host, peer.port, unit, n, cfg.clients_small, cfg.request_timeout_s),
                    counter,
                    ceiling,
                ),
                "b": measured(
                    lambda: run_load(peer.host, peer.port, unit, n, cfg.clients_many, cfg.request_timeout_s),
                    counter,
                    ceiling,
                ),
                "latency": latency_figures(
                    sequential_latencies(
                        peer.host, peer.port, unit, cfg.latency_requests, cfg.request_timeout_s
                    )
                ),
            }
    except (OSError, RuntimeError, TimeoutError) as exc:
        return {"error": f"failed: {str(exc).splitlines()[0]}"}


# --- report -----------------------------------------------------------------------------------


def spread(values: list[float | None], scale: float = 1.0, digits: int = 1) -> str:
    """``median`` or ``median [min-max]`` of the values present."""
    got = [v * scale for v in values if v is not None]
    if not got:
        return "-"
    mid = f"{median(got):.{digits}f}"
    if len(got) == 1:
        return mid
    return f"{mid} [{min(got):.{digits}f}-{max(got):.{digits}f}]"


def failures(figs: list[Figures]) -> tuple[str, str]:
    """(failed units by status except 429, 429s) summed over the rounds."""
    total: Counter[str] = Counter()
    for f in figs:
        total.update({k: v for k, v in f["statuses"].items() if k != "200"})
    limited = total.pop("429", 0)
    errors = ", ".join(f"{status_label(int(k))}: {v}" for k, v in sorted(total.items())) or "0"
    return errors, str(limited)


def report(rounds: list[Figures], cfg: Config) -> str:
    def col(path: list[str]) -> list[Any]:
        out = []
        for r in rounds:
            node: Any = r
            for key in path:
                node = node.get(key) if isinstance(node, dict) else None
            out.append(node)
        return out

    n = cfg.images
    a_clients = min(cfg.clients_small, n)
    b_clients = min(cfg.clients_many, n)
    jobs = max(1, n // cfg.job_images)
    workloads = {
        "f": f"(f) {min(cfg.clients_few, n)} clients x 1-image classify",
        "a": f"(a) {a_clients} clients x 1-image classify",
        "b": f"(b) {b_clients} clients x 1-image classify",
        "c": f"(c) {min(cfg.job_clients, jobs)} clients x {cfg.job_images}-image jobs (poll)",
        "l": f"(l) {min(cfg.job_clients, jobs)} clients x {cfg.job_images}-image jobs (long poll)",
        "d": f"(d) one {n}-image bulk job (Client)",
        "t": f"(t) {a_clients} tritonclient[http] clients x 1-image /v2 infer",
    }
    lines = []
    thr: list[tuple[str, ...]] = [
        ("throughput", "img/s", "vs ceiling", "mean batch", "p50/p95 ms", "errors", "429 (intended)")
    ]
    thr.append(("in-process ceiling (decode, batches of 32)", spread(col(["ceiling", "images_per_s"])),
                "1.00", "32", "", "", ""))  # fmt: skip

    def titled(broker: str) -> str:
        return "ours" if cfg.brokers == ("redis",) else f"ours ({broker})"

    targets: list[tuple[str, str, tuple[str, ...]]] = []
    if "ours" in cfg.parts:
        targets += [(key_of("ours", b), titled(b), cfg.workloads) for b in cfg.brokers]
    if not cfg.skip_peers and "peers" in cfg.parts:
        targets += [(spec.name, spec.title, ("a", "b")) for spec in PEERS]
    for key, title, names in targets:
        err = next((r[key]["error"] for r in rounds if "error" in r.get(key, {})), None)
        if err:
            thr.append((f"{title}: {err}", "", "", "", "", "", ""))
            continue
        for w in names:
            figs = col([key, w])
            p50 = spread(col([key, w, "latency_p50_s"]), 1000, 0).split(" ")[0]
            p95 = spread(col([key, w, "latency_p95_s"]), 1000, 0).split(" ")[0]
            errors, limited = failures(figs)
            thr.append((
                f"{title} {workloads[w]}",
                spread(col([key, w, "images_per_s"])),
                spread(col([key, w, "vs_ceiling"]), digits=2),
                spread(col([key, w, "mean_batch"])),
                f"{p50}/{p95}",
                errors,
                limited,
            ))  # fmt: skip
    if targets:
        lines.append(table(thr))

    lat: list[tuple[str, ...]] = [("idle single-image latency", "p50 ms", "p95 ms", "errors")]
    lat.append(
        ("in-process: decode + batch-1 predict", spread(col(["ceiling", "single_p50_s"]), 1000), "", "")
    )
    for key, title, _ in targets:
        if any("error" in r.get(key, {}) for r in rounds):
            continue
        errors, limited = failures(col([key, "latency"]))
        lat.append((
            f"{title}: {cfg.latency_requests} sequential requests",
            spread(col([key, "latency", "p50_s"]), 1000),
            spread(col([key, "latency", "p95_s"]), 1000),
            errors if limited == "0" else f"{errors}; 429: {limited}",
        ))  # fmt: skip
    if targets:
        lines.append(table(lat))
    if "capacity" not in cfg.parts:
        return "\n\n".join(lines)

    caps = [key_of("capacity", b) for b in cfg.brokers]
    cap: list[tuple[str, ...]] = [
        (
            f"orchestration capacity: null model, 1 API + 1 worker, {cfg.capacity_clients} clients",
            *(f"broker: {b}" for b in cfg.brokers),
        )
    ]
    cap.append(
        ("single-image classify jobs/s (224x224 JPEGs)", *(spread(col([k, "jobs_per_s"])) for k in caps))
    )
    components = [
        ("api", "API: gunicorn master + workers"),
        ("redis", "redis-server"),
        ("worker", "worker process (Celery, decode, batcher)"),
        ("client", "load generator (this process)"),
    ]
    if "rabbitmq" in cfg.brokers:
        components.insert(2, ("rabbitmq", "rabbitmq-server (Erlang VM)"))
    for comp, what in components:
        cap.append(
            (f"CPU ms per job: {what}", *(spread(col([k, "cpu_ms_per_job", comp]), digits=2) for k in caps))
        )
    cap.append(
        (
            "CPU ms per job: all of the above",
            *(spread(col([k, "cpu_ms_per_job_total"]), digits=2) for k in caps),
        )
    )
    cap.append(("errors / 429 (intended)", *("{} / {}".format(*failures(col([k]))) for k in caps)))
    lines.append(table(cap))
    return "\n\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=256, help="photo-like JPEGs, half 640x480, half 1440x1080")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--model", default="mobilenet_v2", help="keras.applications name (random weights)")
    ap.add_argument("--skip-peers", action="store_true")
    ap.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of every part")
    ap.add_argument("--poll-s", type=float, default=0.2, help="status poll interval of workload (c)")
    ap.add_argument("--latency-requests", type=int, default=50)
    ap.add_argument("--capacity-requests", type=int, default=2000)
    ap.add_argument(
        "--ray-max-ongoing",
        type=int,
        default=64,
        help="Ray Serve max_ongoing_requests (Ray's advice: at least the batch size; its default is 5)",
    )
    ap.add_argument(
        "--part",
        action="append",
        choices=PARTS,
        help="run only these parts (repeatable; default: all): ours (workloads a-d and idle "
        "latency), capacity (null model), peers",
    )
    ap.add_argument(
        "--workloads",
        help="which workloads of our stack to run, as letters (default: all, fabcldt): f/a/b = 8/32/256 "
        "clients x single-image /v1/classify, c / l = 4-image jobs polled / long-polled, d = bulk, "
        "t = 32 tritonclient clients",
    )
    ap.add_argument("--json", type=Path, help="also write the raw figures of every round here")
    ap.add_argument(
        "--broker", action="append", choices=("redis", "rabbitmq"), help="repeat to compare (default: redis)"
    )
    args = ap.parse_args()
    if args.quick:
        args.images, args.rounds = min(args.images, 32), 1
        args.latency_requests, args.capacity_requests = min(args.latency_requests, 10), 300
    cfg = Config(
        images=args.images,
        rounds=args.rounds,
        model=args.model,
        clients_few=8,
        clients_small=32,
        clients_many=256,
        job_images=4,
        job_clients=32,
        poll_s=args.poll_s,
        latency_requests=args.latency_requests,
        capacity_requests=args.capacity_requests,
        capacity_clients=64,
        request_timeout_s=60.0,
        skip_peers=args.skip_peers,
        ray_max_ongoing=args.ray_max_ongoing,
        brokers=tuple(dict.fromkeys(args.broker or ["redis"])),
        parts=tuple(dict.fromkeys(args.part or PARTS)),
        workloads=tuple(w for w in WORKLOADS if w in (args.workloads or "".join(WORKLOADS))),
    )
    folder = photo_set(cfg.images)
    images = [(f.name, f.read_bytes()) for f in sorted(folder.glob("*.jpg"))]
    log_dir = OUT / "logs" / f"small_jobs-{time.strftime('%Y%m%d-%H%M%S')}"
    rounds: list[Figures] = []
    for r in range(cfg.rounds):
        fig: Figures = {}
        ceiling = 0.0
        if "ours" in cfg.parts or "peers" in cfg.parts:
            print(f"round {r + 1}/{cfg.rounds}: in-process ceiling", file=sys.stderr, flush=True)
            fig["ceiling"] = ceiling_round(folder, cfg)
            ceiling = fig["ceiling"]["images_per_s"]
        for broker in cfg.brokers:
            if "ours" in cfg.parts:
                print(f"round {r + 1}/{cfg.rounds}: our stack ({broker})", file=sys.stderr, flush=True)
                fig[key_of("ours", broker)] = ours_round(
                    folder, images, ceiling, cfg, log_dir / f"round{r + 1}", broker
                )
            if "capacity" in cfg.parts:
                what = f"round {r + 1}/{cfg.rounds}: null-model capacity ({broker})"
                print(what, file=sys.stderr, flush=True)
                fig[key_of("capacity", broker)] = capacity_round(cfg, log_dir / f"round{r + 1}", broker)
        if not cfg.skip_peers and "peers" in cfg.parts:
            for spec in PEERS:
                print(f"round {r + 1}/{cfg.rounds}: {spec.title}", file=sys.stderr, flush=True)
                fig[spec.name] = peer_round(spec, images, ceiling, cfg, log_dir / f"round{r + 1}")
        rounds.append(fig)
    mix = f"{cfg.images} photo-like JPEGs (half 640x480, half 1440x1080)"
    print(
        f"\nmachine: {platform.machine()}, {os.cpu_count()} cores; model {cfg.model} (random weights); "
        f"{mix}; {cfg.rounds} round(s), median [min-max]; logs in {log_dir}"
    )
    if not cfg.skip_peers:
        print(
            "peers: Ray Serve @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.02), "
            f"max_ongoing_requests={cfg.ray_max_ongoing}; BentoML batchable max_batch_size=32, "
            "max_latency_ms=1000 (it answers 503 to requests it cannot serve within that)"
        )
        if cfg.model != "mobilenet_v2":
            print("note: the peers always serve MobileNetV2: their ratios compare a different model")
    print(report(rounds, cfg))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"config": cfg.__dict__, "rounds": rounds}, indent=2))
        print(f"\nraw figures: {args.json}")


if __name__ == "__main__":
    main()
