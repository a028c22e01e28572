"""Several models, versions and live reloads, with real processes: a model
repository of two demo models (shapes, colours), the API, and a worker that serves both.

- Jobs for both models, submitted concurrently, get each model's own labels and never share
  a batch (the worker's batch log says so); ``top_k`` and ``min_score`` shape the results, and
  invalid options are refused at submit time with a 422 that names them.
- A new version that appears in the middle of a 2,000-image job goes live between two batches:
  every image ends with exactly one result, tagged with the version that produced it, and no
  batch holds two versions. A broken version is refused with the reason while jobs go on.
- Pinning a version, rolling back, the admin key of reloads, the metrics by model, and a
  second worker that serves (and consumes the queues of) one model only.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis as redis_lib
import requests

from batchvision.cli.local import wait_for_workers
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.documents import ClassifyResult
from batchvision.core.settings import Settings
from batchvision.core.synthetic import CLASSES, COLOUR_CLASSES, colour_files, encode, labelled_files, render
from batchvision.server.telemetry import Telemetry
from batchvision.testing.servers import RedisServer

ROOT = Path(__file__).resolve().parents[2]
ADMIN = "admin-test-key"
SLOW_BATCH_S = 0.02  # widens "in the middle of a job" a little, for every batch of this module


@dataclass
class ModelsStack:
    settings: Settings
    url: str
    repo: Path
    redis: redis_lib.Redis
    worker: Service
    artifacts: Path

    def client(self, key: str | None = None) -> Client:
        return Client(self.url, key or "")

    def models(self) -> dict[str, Any]:
        return {m["name"]: m for m in requests.get(f"{self.url}/v1/models", timeout=10).json()["models"]}

    def reload(
        self, name: str, body: dict[str, Any] | None = None, key: str | None = ADMIN
    ) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(f"{self.url}/v1/models/{name}/reload", json=body, headers=headers, timeout=10)

    def batches(self) -> list[dict[str, Any]]:
        return Telemetry(self.redis).recent_batches()

    def worker_metrics(self) -> str:
        return requests.get(f"http://127.0.0.1:{self.settings.worker_metrics_port}/metrics", timeout=10).text

    def add_version(self, name: str, version: int, edit: Callable[[Path], None] | None = None) -> Path:
        """A copy of version 1 as ``version``, written under a temporary name and renamed in
        (a rename is atomic: no worker ever sees half a version)."""
        tmp = self.repo / name / f".{version}.tmp"
        shutil.copytree(self.repo / name / "1", tmp)
        if edit is not None:
            edit(tmp)
        final = self.repo / name / str(version)
        os.rename(tmp, final)
        return final


def _model_file(repo_model: Path, demo_model: Path | None, kind: str, tmp: Path) -> None:
    """Version 1 of a demo model in the repository: `make` builds models/repo; else make it."""
    built = ROOT / "models" / "repo" / kind / "1"
    target = repo_model / "1"
    if built.is_dir():
        shutil.copytree(built, target)
        return
    target.mkdir(parents=True)
    if kind == "shapes":
        assert demo_model is not None
        shutil.copy(demo_model, target / "model.keras")
        shutil.copy(demo_model.with_name(demo_model.stem + ".labels.txt"), target / "labels.txt")
        return
    subprocess.run(
        [
            sys.executable,
            "-m",
            "batchvision.cli",
            "demo-model",
            "--kind",
            kind,
            "--out",
            str(target / "model.keras"),
        ],
        check=True,
    )


@pytest.fixture(scope="module")
def models_stack(
    tmp_path_factory: pytest.TempPathFactory,
    demo_model: Path,
    artifacts: Path,
    wait_until: Callable[..., Any],
) -> Iterator[ModelsStack]:
    tmp = tmp_path_factory.mktemp("models")
    repo = tmp / "repo"
    for kind in ("shapes", "colours"):
        _model_file(repo / kind, demo_model, kind, tmp)
    with RedisServer() as server:
        settings = Settings.from_env(
            {},
            redis_url=server.url,
            models_dir=str(repo),
            model="shapes",
            api_port=free_port(),
            worker_metrics_port=free_port(),
            admin_keys=ADMIN,
            model_poll_s=0.5,
            chunk_size=16,
            max_batch_size=16,
        )
        env = settings.to_env(include_secrets=True)
        api = Service("api", cli_argv("api", "--host", "127.0.0.1"), env)
        api.health_url = f"http://127.0.0.1:{settings.api_port}/healthz"
        worker_log = artifacts / "models-worker.log"
        worker_log.unlink(missing_ok=True)
        worker = Service(
            "worker",
            cli_argv("worker"),
            {**env, "BV_FAILPOINTS": f"slow-batch={SLOW_BATCH_S}"},
            log_path=str(worker_log),
        )
        sup = Supervisor([api, worker])
        sup.start()
        client = redis_lib.Redis.from_url(server.url)
        try:
            sup.wait_healthy(timeout=120)
            wait_for_workers(settings, timeout=180)
            stack = ModelsStack(
                settings, f"http://127.0.0.1:{settings.api_port}", repo, client, worker, artifacts
            )
            wait_until(
                lambda: len(ms := stack.models()) == 2 and all(m["workers"] for m in ms.values()),
                timeout=60,
                interval=0.2,
                message="the worker announces both models",
            )
            time.sleep(1.1)  # every API process's registry cache (1 s) has seen both models
            yield stack
        finally:
            sup.stop()
            client.close()


def _shapes(n: int, seed: int, size: int = 40) -> list[tuple[str, bytes, str]]:
    """``n`` small JPEGs of the shape classes (cheap to make, decode and upload)."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        out.append((f"{label}_{i:05d}.jpg", encode(render(label, (size, size), rng), quality=90), label))
    return out


def _results(client: Client, job_id: str) -> list[dict[str, Any]]:
    client.wait(job_id, timeout=300, poll_s=0.2)
    return [row.model_dump(mode="json", exclude_unset=True) for row in client.results(job_id)]


# -- the models and the submit options ------------------------------------------------------------


def test_the_models_are_listed_with_versions_input_size_classes_and_workers(
    models_stack: ModelsStack,
) -> None:
    doc = requests.get(f"{models_stack.url}/v1/models", timeout=10).json()
    assert doc["default"] == "shapes"
    models = {m["name"]: m for m in doc["models"]}
    shapes, colours = models["shapes"], models["colours"]
    assert shapes["default"] and not colours["default"]
    assert (shapes["input_size"], shapes["classes"], shapes["labels"]) == ([48, 48], 6, list(CLASSES))
    assert (colours["input_size"], colours["classes"], colours["labels"]) == (
        [32, 32],
        6,
        list(COLOUR_CLASSES),
    )
    for m in (shapes, colours):
        assert m["live_version"] == 1 and m["workers"] == 1 and m["workers_by_version"] == {"1": 1}
        (v1,) = m["versions"]
        assert v1["version"] == 1 and v1["status"] == "ready" and v1["load_s"] > 0


def test_the_client_and_the_cli_list_the_models(models_stack: ModelsStack) -> None:
    listing = models_stack.client().models()
    assert listing.default == "shapes" and {m.name for m in listing.models} == {"shapes", "colours"}
    out = subprocess.run(
        [sys.executable, "-m", "batchvision.cli", "models", "--api-url", models_stack.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout
    assert "shapes (default): live version 1, input 48x48, 6 classes, 1 worker (1 on version 1)" in out
    assert "colours: live version 1, input 32x32, 6 classes" in out


def test_jobs_for_both_models_get_their_own_labels_and_never_share_a_batch(
    models_stack: ModelsStack, reference_labels: Callable[..., list[str]], wait_until: Callable[..., Any]
) -> None:
    client = models_stack.client()
    shapes = [(n, d, lbl) for n, d, lbl in labelled_files(48, seed=11)]
    colours = list(colour_files(48, seed=12))
    jobs: dict[str, tuple[str, dict[str, str]]] = {}
    lock = threading.Lock()

    def submit(model: str, files: list[tuple[str, bytes, str]]) -> None:
        job = client.submit_files([(n, d) for n, d, _ in files], model=model)
        with lock:
            jobs[job.job_id] = (model, {n: lbl for n, _, lbl in files})

    # Concurrently, in parts of 16 (several jobs per model, all in flight at once).
    threads = [
        threading.Thread(target=submit, args=(model, files[i : i + 16]))
        for model, files in (("shapes", shapes), ("colours", colours))
        for i in range(0, 48, 16)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(jobs) == 6
    for job_id, (model, truth) in jobs.items():
        rows = _results(client, job_id)
        assert client.status(job_id).model == model
        own = set(CLASSES if model == "shapes" else COLOUR_CLASSES)
        assert {r["label"] for r in rows} <= own, f"{model} job got another model's labels"
        assert all(r["model"] == model and r["version"] == 1 for r in rows)
        assert all({s["label"] for s in r["top_k"]} <= own for r in rows)
        names = list(truth)
        assert [r["filename"] for r in rows] == names
        sent = {n: d for n, d, _ in (shapes if model == "shapes" else colours)}
        model_file = models_stack.repo / model / "1" / "model.keras"
        assert [r["label"] for r in rows] == reference_labels(model_file, [(n, sent[n]) for n in names])
    # The batch log: every batch that ran these jobs is of one model, and holds only its jobs.
    model_of = {job_id: model for job_id, (model, _) in jobs.items()}

    def logged() -> list[dict[str, Any]]:
        return [b for b in models_stack.batches() if set(b["jobs"]) & set(model_of)]

    # (The log is written by a thread of its own, just after each batch's results are out.)
    wait_until(
        lambda: sum(b["size"] for b in logged()) == 96, timeout=60, message="the batch log has every image"
    )
    batches = logged()
    for batch in batches:
        assert {model_of[j] for j in batch["jobs"]} == {batch["model"]}, batch
        assert batch["version"] == 1
    assert {b["model"] for b in batches} == {"shapes", "colours"}
    log = Path(models_stack.worker.log_path).read_text()
    assert "model colours version 1" in log and "model shapes version 1" in log


def test_top_k_and_min_score_shape_the_results(models_stack: ModelsStack) -> None:
    client = models_stack.client()
    files = [(n, d) for n, d, _ in labelled_files(12, seed=21)]
    job = client.submit_files(files, top_k=2)
    assert (job.top_k, job.min_score, job.model_version) == (2, 0.0, None)
    rows = _results(client, job.job_id)
    assert all(len(r["top_k"]) == 2 and r["top_k"][0]["label"] == r["label"] for r in rows)
    every = _results(client, client.submit_files(files, model="shapes", top_k=6).job_id)
    assert all(len(r["top_k"]) == 6 for r in every)
    some = _results(client, client.submit_files(files, top_k=6, min_score=0.2).job_id)
    for full, cut in zip(every, some, strict=True):
        assert [s for s in full["top_k"] if s["score"] >= 0.2] == cut["top_k"]
        assert cut["label"] == full["label"]  # the best class is still the prediction
    assert sum(len(r["top_k"]) for r in some) < sum(len(r["top_k"]) for r in every)
    # POST /v1/classify takes the options too
    out = client.classify([("c.jpg", d) for _, d, _ in colour_files(1, seed=5)], model="colours", top_k=3)
    assert isinstance(out, ClassifyResult)
    (row,) = out.results
    assert row.model == "colours" and len(row.top_k or []) == 3 and row.label in COLOUR_CLASSES


@pytest.mark.parametrize(
    ("query", "status", "field", "text"),
    [
        ("top_k=7", 422, "top_k", "1 to 6"),
        ("top_k=0", 422, "top_k", "1 to 6"),
        ("model=colours&top_k=7", 422, "top_k", "1 to 6"),
        ("model=squares", 422, "model", "colours, shapes"),
        ("model=shapes:9", 422, "model", "shapes:1"),
        ("model=a.b", 422, "model", "colours, shapes"),
        ("min_score=1.5", 422, "min_score", "0 to 1"),
        ("min_score=nan", 422, "min_score", "0 to 1"),
        ("top_k=abc", 400, "top_k", "integer"),
    ],
)
def test_invalid_options_are_refused_at_submit_time(
    models_stack: ModelsStack, query: str, status: int, field: str, text: str
) -> None:
    _, data, _ = next(iter(labelled_files(1, seed=3)))
    for path in ("/v1/jobs", "/v1/classify"):
        resp = requests.post(
            f"{models_stack.url}{path}?{query}", data=data, headers={"Content-Type": "image/jpeg"}, timeout=10
        )
        assert resp.status_code == status, resp.text
        err = resp.json()["error"]
        assert err["code"] == ("invalid_option" if status == 422 else "bad_parameter")
        assert field in err["message"] and text in json.dumps(err)
    assert int(models_stack.redis.get("bv:pending") or 0) == 0, "nothing was queued"


# -- versions and reloads --------------------------------------------------------------------------


def test_a_reload_in_the_middle_of_a_2000_image_job(
    models_stack: ModelsStack,
    artifacts: Path,
    reference_labels: Callable[..., list[str]],
    wait_until: Callable[..., Any],
) -> None:
    client = models_stack.client()
    files = _shapes(2000, seed=31)
    before = _metric_values(models_stack.worker_metrics())
    job_id = client.open_job(len(files)).job_id
    for i in range(0, len(files), 500):
        client.add_part(job_id, [(n, d) for n, d, _ in files[i : i + 500]])
    client.seal(job_id)
    st = wait_until(lambda: (st := client.status(job_id)).done >= 200 and st, timeout=120)
    assert st.status != "succeeded", st
    # Version 2 appears (the watcher would find it); the reload request loads it at once.
    models_stack.add_version("shapes", 2)
    asked = time.monotonic()
    resp = models_stack.reload("shapes")
    assert resp.status_code == 202 and resp.json()["workers"] == 1, resp.text
    wait_until(lambda: models_stack.models()["shapes"]["live_version"] == 2, timeout=60, message="v2 live")
    switch_s = time.monotonic() - asked
    at_switch = client.status(job_id)
    rows = _results(client, job_id)
    # Exactly one result per image, each tagged with the version that produced it.
    assert [r["index"] for r in rows] == list(range(2000))
    assert all(r["status"] == "ok" and r["model"] == "shapes" for r in rows)
    versions = [r["version"] for r in rows]
    assert set(versions) == {1, 2}, "the switch happened in the middle of the job"
    assert at_switch.done < 2000, at_switch

    # Version 2 is a copy of version 1: the same images give the same labels under both, and
    # those are the labels the model file gives in this process.
    by_name = {n: d for n, d, _ in files}
    sample = [r for r in rows if r["version"] == 1][:64]
    again = client.submit_files([(r["filename"], by_name[r["filename"]]) for r in sample])
    rerun = _results(client, again.job_id)
    assert {r["version"] for r in rerun} == {2}
    assert [r["label"] for r in rerun] == [r["label"] for r in sample]
    model_file = models_stack.repo / "shapes" / "1" / "model.keras"
    checked = sample[:32] + [r for r in rows if r["version"] == 2][:32]
    assert [r["label"] for r in checked] == reference_labels(
        model_file, [(r["filename"], by_name[r["filename"]]) for r in checked]
    )

    # No image was classified twice: the model saw exactly the 2000 images of the job and the
    # sample of the rerun, stored once each. The rerun came after the job was final, and its
    # results are in: an image of the job classified twice would be counted by now.
    want = 2000 + len(sample)
    key = 'batchvision_batch_size_sum{model="shapes"}'
    after = wait_until(
        lambda: (m := _metric_values(models_stack.worker_metrics())) and _delta(m, before, key) >= want and m,
        timeout=60,
        message="the batch metrics count every image",
    )
    assert _delta(after, before, key) == want
    assert _delta(after, before, 'batchvision_images_classified_total{model="shapes",outcome="ok"}') == want

    # The batch log: no batch holds two versions; version 1 until the switch, then 2.
    def mine() -> list[dict[str, Any]]:
        return [b for b in reversed(models_stack.batches()) if job_id in b["jobs"]]

    wait_until(
        lambda: sum(b["size"] for b in mine()) >= 2000, timeout=60, message="the batch log has the job"
    )
    assert sum(b["size"] for b in mine()) == 2000
    order = [b["version"] for b in mine()]
    assert order == sorted(order) and set(order) == {1, 2}
    shapes = models_stack.models()["shapes"]
    v2 = next(v for v in shapes["versions"] if v["version"] == 2)
    assert v2["status"] == "ready" and shapes["workers_by_version"] == {"2": 1}
    (artifacts / "models-reload.txt").write_text(
        f"reload of shapes v2 during a 2000-image job: live {switch_s:.2f}s after the request; "
        f"load+warm-up+check {v2['load_s']:.2f}s; images by version: 1: {versions.count(1)}, "
        f"2: {versions.count(2)}\n"
    )


def test_a_broken_version_is_refused_and_the_job_goes_on(
    models_stack: ModelsStack, wait_until: Callable[..., Any]
) -> None:
    client = models_stack.client()
    files = _shapes(300, seed=41)
    job = client.submit_files([(n, d) for n, d, _ in files])

    def few_labels(path: Path) -> None:
        (path / "labels.txt").write_text("circle\nsquare\ntriangle\ncross\n")

    def garbage(path: Path) -> None:
        (path / "model.keras").write_bytes(b"this is not a Keras file")

    models_stack.add_version("shapes", 3, few_labels)
    models_stack.add_version("shapes", 4, garbage)
    assert models_stack.reload("shapes").status_code == 202

    def refused_both() -> dict[int, dict[str, Any]] | None:
        versions = {v["version"]: v for v in models_stack.models()["shapes"]["versions"]}
        return versions if all(versions.get(n, {}).get("status") == "failed" for n in (3, 4)) else None

    versions = wait_until(refused_both, timeout=60, interval=0.1, message="versions 3 and 4 refused")
    assert "outputs 6 classes but its labels file has 4 labels" in versions[3]["error"]
    assert "model.keras is there but is not a model Keras can read" in versions[4]["error"]
    assert models_stack.models()["shapes"]["live_version"] == 2, "the live version stays"
    rows = _results(client, job.job_id)
    assert len(rows) == 300 and {r["version"] for r in rows} == {2}
    log = Path(models_stack.worker.log_path).read_text()
    assert "version 3 refused" in log and "version 4 refused" in log


def test_pinning_a_version_and_rolling_back(
    models_stack: ModelsStack, wait_until: Callable[..., Any]
) -> None:
    client = models_stack.client()
    files = [(n, d) for n, d, _ in labelled_files(8, seed=51)]
    pinned = _results(client, client.submit_files(files, model="shapes:1").job_id)
    assert {r["version"] for r in pinned} == {1}
    assert client.status(client.submit_files(files, model="shapes:1").job_id).model_version == 1

    # 3 and 4 were refused (each API process reads the registry at most once a second: ask until
    # the one that answers has seen it)
    def refused() -> bool:
        resp = requests.post(
            f"{models_stack.url}/v1/jobs?model=shapes:3", files={"files": ("a.jpg", files[0][1])}, timeout=10
        )
        return resp.status_code == 422 and "shapes:1, shapes:2" in resp.text

    wait_until(refused, timeout=10, message="a refused version cannot be pinned")
    # Reloads are for admin keys only.
    assert models_stack.reload("shapes", key=None).status_code == 401
    assert models_stack.reload("shapes", key="someone-else").status_code == 403
    assert models_stack.reload("squares").status_code == 404
    bad = models_stack.reload("shapes", {"version": 9})
    assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_option"
    # A refused version may be pinned (its files may be mended meanwhile), but the answer says
    # it was refused, and why: the model stays on its live version until it loads.
    refused_one = models_stack.reload("shapes", {"version": 3})
    assert refused_one.status_code == 202, refused_one.text
    warning = refused_one.json()["warning"]
    assert "version 3 was refused when last tried (" in warning and "labels file has 4 labels" in warning
    assert models_stack.models()["shapes"]["live_version"] == 2
    # Roll back to version 1, and forward to the newest again.
    assert models_stack.reload("shapes", {"version": 1}).status_code == 202
    wait_until(
        lambda: models_stack.models()["shapes"]["live_version"] == 1, timeout=60, message="rolled back"
    )
    assert models_stack.models()["shapes"]["pinned_live_version"] == 1
    # The watcher keeps the operator's choice. It looks (and would switch) in one thread, and
    # announces each new version folder it finds: once it has announced two (empty folders,
    # refused, never loaded), the look that found the first has ended, and 1 is still live.
    for marker in (5, 6):
        (models_stack.repo / "shapes" / str(marker)).mkdir()

        def announced(marker: int = marker) -> dict[str, Any] | None:
            shapes: dict[str, Any] = models_stack.models()["shapes"]
            return shapes if any(v["version"] == marker for v in shapes["versions"]) else None

        shapes = wait_until(announced, timeout=30, message=f"the watcher finds version {marker}")
    assert shapes["live_version"] == 1, shapes
    for marker in (5, 6):
        (models_stack.repo / "shapes" / str(marker)).rmdir()
    rows = _results(client, client.submit_files(files).job_id)
    assert {r["version"] for r in rows} == {1}
    accepted = models_stack.client(ADMIN).reload_model("shapes", "latest")  # the client, typed
    assert (accepted.model, accepted.latest, accepted.workers) == ("shapes", True, 1)
    wait_until(
        lambda: models_stack.models()["shapes"]["live_version"] == 2, timeout=60, message="back to the newest"
    )
    assert models_stack.models()["shapes"]["pinned_live_version"] is None


def test_metrics_are_by_model(models_stack: ModelsStack) -> None:
    worker = _metric_values(models_stack.worker_metrics())
    for model in ("shapes", "colours"):
        assert worker[f'batchvision_batch_size_count{{model="{model}"}}'] > 0
        assert worker[f'batchvision_images_classified_total{{model="{model}",outcome="ok"}}'] > 0
        assert worker[f'batchvision_inference_seconds_count{{model="{model}"}}'] > 0
        assert any(k.startswith("batchvision_model_info{") and f'model="{model}"' in k for k in worker)
    assert worker['batchvision_model_live_version{model="shapes"}'] == 2
    assert worker['batchvision_model_reloads_total{model="shapes",outcome="failed"}'] >= 2
    api = _metric_values(requests.get(f"{models_stack.url}/metrics", timeout=10).text)
    assert api['batchvision_queue_tasks{model="shapes"}'] == 0
    assert api['batchvision_queue_tasks{model="colours"}'] == 0


def test_a_worker_serves_only_the_models_it_is_started_with(
    models_stack: ModelsStack, wait_until: Callable[..., Any]
) -> None:
    settings = models_stack.settings.replace(worker_metrics_port=free_port())
    log = models_stack.artifacts / "models-worker-colours.log"
    log.unlink(missing_ok=True)
    name = "colours-only@test"
    svc = Service(
        "worker-colours",
        cli_argv("worker", "--models", "colours", "--name", name),
        settings.to_env(include_secrets=True),
        log_path=str(log),
    )
    sup = Supervisor([svc])
    sup.start()
    try:
        wait_until(
            lambda: models_stack.models()["colours"]["workers"] == 2,
            timeout=180,
            message="a second colours worker",
        )
        assert models_stack.models()["shapes"]["workers"] == 1
        app = _celery(models_stack.settings)
        queues: dict[str, Any] = {}

        def consuming() -> bool:  # the model loads before the worker consumes: ask until it answers
            queues.update(app.control.inspect(destination=[name], timeout=2).active_queues() or {})
            return name in queues

        wait_until(consuming, timeout=120, message="the colours worker consumes")
        assert sorted(q["name"] for q in queues[name]) == [  # its bulk tiers and interactive lane
            "batchvision.colours",
            "batchvision.colours.high",
            "batchvision.colours.interactive",
            "batchvision.colours.low",
        ]
        # It holds only its model: its metrics name colours alone.
        metrics = requests.get(f"http://127.0.0.1:{settings.worker_metrics_port}/metrics", timeout=10).text
        info = [k for k in _metric_values(metrics) if k.startswith("batchvision_model_info{")]
        assert len(info) == 1 and 'model="colours"' in info[0]
        one, both = _rss_mb(svc), _rss_mb(models_stack.worker)
        (models_stack.artifacts / "models-memory.txt").write_text(
            f"worker RSS, colours only: {one:.0f} MB; colours and shapes: {both:.0f} MB\n"
        )
    finally:
        sup.stop()


# -- helpers -------------------------------------------------------------------------------------


def _metric_values(text: str) -> dict[str, float]:
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def _delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
    return after.get(key, 0.0) - before.get(key, 0.0)


def _rss_mb(svc: Service) -> float:
    assert svc.proc is not None
    for line in Path(f"/proc/{svc.proc.pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _celery(settings: Settings) -> Any:
    from batchvision.server.queue import create_celery

    return create_celery(settings)
