"""Monitoring proved on a real stack: a real Prometheus, traces and JSON logs of one job.

One API and one worker run here with ``BATCHVISION_LOG_FORMAT=json`` and a trace file
(``BATCHVISION_TRACE_FILE``: the SDK's JSON of every span the processes end), on a Redis of
their own, and each model call slowed by 0.25 s (``BV_FAILPOINTS=slow-batch``, batches of 8)
so that one job of 96 images is in the queue for a few seconds. A real Prometheus (Debian's
``prometheus``) scrapes them every second with the scrape configuration generated from
``compose/prometheus/prometheus.yml`` (same jobs, paths and relabelling; only the targets
become local addresses) and evaluates ``compose/prometheus/alerts.yml``. Then:

- every query of the Grafana dashboard returns data, the queue-depth and throughput panels
  show the job, and every alert rule is loaded, evaluated and healthy, the series its
  expression selects existing (a wrong label or metric name would select nothing);
- a screenshot of Prometheus' graph of the job's throughput (headless Chromium) goes to
  ``tests/artifacts/prometheus-throughput.png`` (the README shows a copy from docs/);
- the spans of the job form one trace (request -> enqueue -> task) that every model batch
  serving it links to;
- every line the API and the worker wrote is a JSON object, and the job's id, its tasks' ids,
  batch sizes and timings are fields of them; the runner's and Flower's lines are JSON too.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from batchvision.cli.local import stack as local_stack
from batchvision.cli.local import wait_for_workers
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.testing.servers import RedisServer

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "compose" / "prometheus"
DASHBOARD = ROOT / "compose" / "grafana" / "dashboards" / "batchvision.json"
IMAGES = 96  # below the 100 of BatchvisionQueueGrowing: no alert may even be pending
API_KEY = "observability-test-key"
# Grafana's variables, as the dashboard would be evaluated over a short range.
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "5s", "$__range": "5m"}
THROUGHPUT = 'sum(rate(batchvision_images_classified_total{outcome!="canceled"}[1m]))'
QUEUE_DEPTH = "max(batchvision_queue_depth_images)"


@dataclasses.dataclass
class Stack:
    settings: Settings
    api_url: str
    worker_metrics: str
    logs: dict[str, Path]
    trace_file: Path


@dataclasses.dataclass
class Job:
    job_id: str
    submitted: float  # wall clock, for Prometheus
    finished: float


@pytest.fixture(scope="module")
def obs_stack(
    tmp_path_factory: pytest.TempPathFactory, demo_model: Path, wait_until: Callable[..., Any]
) -> Iterator[Stack]:
    tmp = tmp_path_factory.mktemp("observability")
    trace_file = tmp / "spans.jsonl"
    with RedisServer() as redis:
        settings = Settings.from_env(
            {},
            redis_url=redis.url,
            model=str(demo_model),
            api_port=free_port(),
            worker_metrics_port=free_port(),
            flower_port=free_port(),
            api_keys=API_KEY,
            chunk_size=8,
            max_batch_size=8,
            log_format="json",
            trace_file=str(trace_file),
        )
        logs = {name: tmp / f"{name}.log" for name in ("api", "worker")}
        services = [
            dataclasses.replace(
                svc, env={**svc.env, "BV_FAILPOINTS": "slow-batch=0.25"}, log_path=str(logs[svc.name])
            )
            for svc in local_stack(settings, None, flower=False)
            if svc.name in logs
        ]
        sup = Supervisor(services, stop_grace_s=10.0)
        sup.start()
        try:
            sup.wait_healthy(timeout=120)
            wait_for_workers(settings, timeout=120)
            yield Stack(
                settings,
                f"http://127.0.0.1:{settings.api_port}",
                f"127.0.0.1:{settings.worker_metrics_port}",
                logs,
                trace_file,
            )
        finally:
            sup.stop()


# -- Prometheus ---------------------------------------------------------------------------------


def scrape_config(shipped: dict[str, Any], addresses: dict[str, str], rules: Path) -> dict[str, Any]:
    """The shipped configuration with its targets replaced by local addresses (``addresses``:
    shipped host -> host:port); jobs whose targets do not run here are left out."""
    config = json.loads(json.dumps(shipped))
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config["rule_files"] = [str(rules)]
    jobs = []
    for job in config["scrape_configs"]:
        hosts = [t.rpartition(":")[0] for sc in job.get("static_configs", []) for t in sc["targets"]]
        hosts += [name for sd in job.get("dns_sd_configs", []) for name in sd["names"]]
        if not all(h in addresses for h in hosts):
            continue
        for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
            del job[key]
        job["static_configs"] = [{"targets": sorted({addresses[h] for h in hosts})}]
        job["scrape_interval"] = "1s"
        jobs.append(job)
    config["scrape_configs"] = jobs
    return config


@pytest.fixture(scope="module")
def prometheus(
    obs_stack: Stack, tmp_path_factory: pytest.TempPathFactory, wait_until: Callable[..., Any]
) -> Iterator[str]:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus is not installed: apt-get install prometheus (`make test` installs it)")
    tmp = tmp_path_factory.mktemp("prometheus")
    port = free_port()
    shipped = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    addresses = {
        "api": f"127.0.0.1:{obs_stack.settings.api_port}",
        "worker": obs_stack.worker_metrics,
        "localhost": f"127.0.0.1:{port}",
    }
    config = scrape_config(shipped, addresses, PROMETHEUS_DIR / "alerts.yml")
    jobs = {j["job_name"] for j in config["scrape_configs"]}
    assert jobs == {j["job_name"] for j in shipped["scrape_configs"]} - {"batchvision-flower"}
    (tmp / "prometheus.yml").write_text(yaml.safe_dump(config))
    log = open(tmp / "prometheus.log", "wb")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            binary,
            f"--config.file={tmp / 'prometheus.yml'}",
            f"--storage.tsdb.path={tmp / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=log,
        stderr=log,
    )
    url = f"http://127.0.0.1:{port}"
    try:

        def all_up() -> bool:
            try:
                targets = requests.get(f"{url}/api/v1/targets", timeout=2).json()["data"]["activeTargets"]
            except (requests.ConnectionError, ValueError):
                assert proc.poll() is None, (tmp / "prometheus.log").read_text()
                return False
            return len(targets) == len(jobs) and all(t["health"] == "up" for t in targets)

        wait_until(all_up, timeout=60, interval=0.3, message="every target up in Prometheus")
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def query(prom: str, expr: str, at: float | None = None) -> list[dict[str, Any]]:
    params: dict[str, Any] = {"query": expr}
    if at is not None:
        params["time"] = at
    body = requests.get(f"{prom}/api/v1/query", params=params, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    result: list[dict[str, Any]] = body["data"]["result"]
    return result


def query_range(prom: str, expr: str, start: float, end: float) -> list[tuple[float, float]]:
    """The values of ``expr`` (one series expected) every second from ``start`` to ``end``."""
    params = {"query": expr, "start": start, "end": end, "step": 1}
    body = requests.get(f"{prom}/api/v1/query_range", params=params, timeout=10).json()
    assert body["status"] == "success", (expr, body)
    series = body["data"]["result"]
    assert len(series) == 1, (expr, series)
    return [(float(t), float(v)) for t, v in series[0]["values"]]


@pytest.fixture(scope="module")
def job(obs_stack: Stack, prometheus: str, wait_until: Callable[..., Any]) -> Job:
    """One job of 96 images, submitted once Prometheus has seen the idle stack, seen through
    to the end by Prometheus too."""
    wait_until(
        lambda: query(prometheus, "count_over_time(batchvision_queue_depth_images[1m]) >= 3"),
        timeout=30,
        message="a few scrapes of the idle queue",
    )
    client = Client(obs_stack.api_url, api_key=API_KEY)
    submitted = time.time()
    created = client.submit_files([(n, d) for n, d, _ in labelled_files(IMAGES, seed=18)])
    status = client.wait(created.job_id, timeout=180)
    assert status.status == "succeeded" and status.done == IMAGES
    finished = time.time()
    # Two more scrapes: the last results and the empty queue are in Prometheus.
    wait_until(
        lambda: query(prometheus, "max_over_time(batchvision_queue_depth_images[2s]) == 0", at=time.time()),
        timeout=30,
        message="Prometheus sees the queue empty again",
    )
    return Job(created.job_id, submitted, finished)


def dashboard_queries() -> list[tuple[str, str]]:
    dashboard = json.loads(DASHBOARD.read_text())
    out = []
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown Grafana variable in {expr}"
            out.append((panel["title"], expr))
    return out


def test_prometheus_scrapes_the_shipped_jobs(prometheus: str) -> None:
    targets = requests.get(f"{prometheus}/api/v1/targets", timeout=10).json()["data"]["activeTargets"]
    by_job = {t["labels"]["job"]: t for t in targets}
    assert {"batchvision-api", "batchvision-worker", "prometheus"} == by_job.keys()
    for name, target in by_job.items():
        assert target["health"] == "up", (name, target["lastError"])
        assert target["scrapeUrl"].endswith("/metrics"), target["scrapeUrl"]


def test_every_dashboard_query_returns_data(prometheus: str, job: Job) -> None:
    queries = dashboard_queries()
    assert len(queries) >= 8
    # query() fails on a query Prometheus refuses; the GPU panels have no series on this CPU stack.
    gpu_only = [(title, expr) for title, expr in queries if "(GPU workers only)" in title]
    assert gpu_only and not [q for q in gpu_only if query(prometheus, q[1])]
    empty = [
        (title, expr)
        for title, expr in queries
        if (title, expr) not in gpu_only and not query(prometheus, expr)
    ]
    assert not empty, f"panels without data after a job: {empty}"


def test_queue_depth_and_throughput_panels_show_the_job(prometheus: str, job: Job) -> None:
    titles = dict(dashboard_queries())
    assert titles["Throughput (images/s)"] == THROUGHPUT and titles["Queue depth (images)"] == QUEUE_DEPTH
    start, end = job.submitted - 3, time.time()
    depth = query_range(prometheus, QUEUE_DEPTH, start, end)
    assert depth[0][1] == 0, "idle before the job"
    assert 0 < max(v for _, v in depth) <= IMAGES, "the queue held the job's images"
    assert depth[-1][1] == 0, "and drained"
    # `or vector(0)`: a labelled series (per model) may only appear with its first sample.
    throughput = query_range(prometheus, f"{THROUGHPUT} or vector(0)", start, end)
    assert throughput[0][1] == 0 and max(v for _, v in throughput) > 0
    # Counted exactly: the ok counter grew by the job's images over the job.
    ok = 'sum(batchvision_images_classified_total{outcome="ok"}) or vector(0)'
    grown = query_range(prometheus, ok, start, end)
    assert grown[-1][1] - grown[0][1] == IMAGES
    # ... and batched: about IMAGES / 8 model calls.
    batches = query_range(prometheus, "sum(batchvision_batch_size_count) or vector(0)", start, end)
    assert IMAGES / 8 <= batches[-1][1] - batches[0][1] < IMAGES


def alert_rules() -> list[dict[str, Any]]:
    doc = yaml.safe_load((PROMETHEUS_DIR / "alerts.yml").read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def selectors(expr: str) -> set[str]:
    """The series selectors of a PromQL expression: ``name`` or ``name{matchers}``."""
    words = set()
    for match in re.finditer(r"\b([a-zA-Z_:][a-zA-Z0-9_:]*)\s*(\{[^}]*\})?", expr):
        name, matchers = match.group(1), match.group(2) or ""
        after = expr[match.end() :].lstrip()
        if after.startswith("(") or name in {"by", "and", "or", "on", "le", "without", "unless"}:
            continue  # a function, a keyword or a grouping label
        if not (name.startswith("batchvision_") or name == "up"):
            continue
        words.add(name + matchers)
    return words


def test_alert_rules_are_loaded_evaluated_and_select_real_series(prometheus: str, job: Job) -> None:
    rules = alert_rules()
    groups = requests.get(f"{prometheus}/api/v1/rules", timeout=10).json()["data"]["groups"]
    loaded = {r["name"]: r for g in groups for r in g["rules"]}
    assert set(loaded) == {r["alert"] for r in rules}
    for rule in rules:
        got = loaded[rule["alert"]]
        assert got["health"] == "ok", (rule["alert"], got.get("lastError"))
        assert got["lastEvaluation"] and not got["lastEvaluation"].startswith("0001"), rule["alert"]
        assert got["state"] == "inactive", f"{rule['alert']} is {got['state']} on a healthy stack"
        query(prometheus, rule["expr"])  # evaluates (empty on a healthy stack)
        # Each series the expression selects exists: a wrong label or name selects nothing.
        # (absent() is the one meant to be empty: its argument is the worker's `up`.)
        found = selectors(rule["expr"])
        assert found, rule["expr"]
        for selector in found:
            assert query(prometheus, f"count({selector})"), f"{rule['alert']}: {selector} selects nothing"


def test_screenshot_of_the_jobs_throughput(
    prometheus: str, job: Job, artifacts: Path, wait_until: Callable[..., Any]
) -> None:
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make system-deps installs it)")
    from playwright.sync_api import sync_playwright

    # The job's images per second over 10 s windows: wait until the window has passed the job.
    wait_until(lambda: time.time() > job.finished + 11, timeout=30, interval=0.2, message="the window passed")
    expr = "sum(rate(batchvision_images_classified_total[10s]))"
    assert query(prometheus, expr, at=job.finished - 1)[0]["value"][1] != "0"
    params = {"g0.expr": expr, "g0.tab": "0", "g0.range_input": "30s", "g0.stacked": "0"}
    url = f"{prometheus}/graph?" + "&".join(f"{k}={requests.utils.quote(v)}" for k, v in params.items())
    shot = artifacts / "prometheus-throughput.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        page = browser.new_page(viewport={"width": 1200, "height": 900})
        page.goto(url)
        try:
            page.wait_for_selector(".graph svg path, .graph_area svg path", timeout=20000)
            page.wait_for_timeout(500)
        finally:
            page.screenshot(path=str(shot))
        browser.close()
    assert shot.stat().st_size > 10_000


# -- traces -------------------------------------------------------------------------------------


def read_spans(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_the_spans_of_one_job_form_one_trace(
    obs_stack: Stack, job: Job, wait_until: Callable[..., Any]
) -> None:
    def mine(span: dict[str, Any]) -> bool:
        attrs = span["attributes"]
        return attrs.get("batchvision.job_id") == job.job_id or job.job_id in attrs.get(
            "batchvision.job_ids", []
        )

    def collected() -> list[dict[str, Any]] | None:
        spans = read_spans(obs_stack.trace_file)
        tasks = [s for s in spans if s["name"] == "batchvision.classify" and mine(s)]
        return spans if sum(t["attributes"]["batchvision.images"] for t in tasks) == IMAGES else None

    spans = wait_until(collected, timeout=30, message="the spans of every task of the job")
    by_id = {s["context"]["span_id"]: s for s in spans}
    service = {s["context"]["span_id"]: s["resource"]["attributes"]["service.name"] for s in spans}

    (request,) = [s for s in spans if s["name"] == "POST /v1/jobs" and mine(s)]
    assert request["kind"] == "SpanKind.SERVER" and request["attributes"]["http.response.status_code"] == 202
    assert request["attributes"]["batchvision.images"] == IMAGES
    trace_id = request["context"]["trace_id"]
    enqueues = [s for s in spans if s["name"].startswith("enqueue ") and mine(s)]
    tasks = [s for s in spans if s["name"] == "batchvision.classify" and mine(s)]
    assert len(enqueues) == len(tasks) == IMAGES // 8  # one message per chunk of 8
    for span in enqueues + tasks:
        assert span["context"]["trace_id"] == trace_id, "one trace"
    for enqueue in enqueues:
        assert enqueue["parent_id"] == request["context"]["span_id"]
        assert service[enqueue["context"]["span_id"]] == "batchvision-api"
    assert {t["parent_id"] for t in tasks} == {e["context"]["span_id"] for e in enqueues}
    for task in tasks:
        assert service[task["context"]["span_id"]] == "batchvision-worker"
        assert (
            task["attributes"]["batchvision.task_id"]
            == by_id[task["parent_id"]]["attributes"]["batchvision.task_id"]
        )
        assert task["attributes"]["batchvision.model"], "the model serving the task"

    # The model batches: traces of their own, linked to the task spans of their images.
    task_ids = {t["context"]["span_id"] for t in tasks}
    linked = 0
    batches = [s for s in spans if s["name"] == "model batch" and mine(s)]
    assert batches
    for batch in batches:
        assert batch["parent_id"] is None and batch["context"]["trace_id"] != trace_id
        assert batch["attributes"]["batchvision.batch_size"] <= 8
        assert batch["attributes"]["batchvision.model"] == tasks[0]["attributes"]["batchvision.model"]
        for link in batch["links"]:
            if link["attributes"]["batchvision.job_id"] == job.job_id:
                assert link["context"]["span_id"] in task_ids and link["context"]["trace_id"] == trace_id
                linked += link["attributes"]["batchvision.images"]
    assert linked == IMAGES, "every image's batch links to the job's trace"


# -- logs ---------------------------------------------------------------------------------------


def json_lines(path: Path) -> list[dict[str, Any]]:
    lines = path.read_text().splitlines()
    assert lines, f"{path.name} is empty"
    docs = []
    for n, line in enumerate(lines, 1):
        try:
            doc = json.loads(line)
        except json.JSONDecodeError:
            pytest.fail(f"{path.name} line {n} is not JSON: {line[:300]!r}")
        assert isinstance(doc, dict), line
        assert {"ts", "level", "logger", "message"} <= doc.keys(), line
        docs.append(doc)
    return docs


def about(doc: dict[str, Any], job_id: str) -> bool:
    return doc.get("job_id") == job_id or job_id in doc.get("job_ids", [])


def test_api_and_worker_write_json_lines_with_the_jobs_ids(
    obs_stack: Stack, job: Job, wait_until: Callable[..., Any]
) -> None:
    def worker_done() -> list[dict[str, Any]] | None:
        docs = json_lines(obs_stack.logs["worker"])
        done = [d for d in docs if d["logger"] == "workers.tasks" and about(d, job.job_id)]
        return docs if sum(d["images"] for d in done) == IMAGES else None

    worker = wait_until(worker_done, timeout=30, message="a log line per task of the job")
    api = json_lines(obs_stack.logs["api"])
    assert {d["service"] for d in api} == {"api"} and {d["service"] for d in worker} == {"worker"}

    # API: gunicorn's own lines, the queued messages (job and task ids) and the access log.
    assert any(d["logger"] == "gunicorn.error" and "Listening at" in d["message"] for d in api)
    queued = [d for d in api if d["logger"] == "batchvision.server.queue" and about(d, job.job_id)]
    assert sum(d["images"] for d in queued) == IMAGES
    access = [d for d in api if d["logger"] == "gunicorn.access"]
    assert any(d["method"] == "POST" and d["path"] == "/v1/jobs" and d["status"] == 202 for d in access)
    assert any(d.get("job_id") == job.job_id and isinstance(d["duration_ms"], int) for d in access)

    # Worker: one line per task (task id, its job, timing), per batch (size, timings), and
    # Celery's own task lines with the same task ids.
    tasks = [d for d in worker if d["logger"] == "workers.tasks" and about(d, job.job_id)]
    task_ids = {d["task_id"] for d in tasks}
    assert task_ids == {d["task_id"] for d in queued}, "the API's task ids are the worker's"
    assert all(d["duration_ms"] > 0 and d["classified"] == d["images"] for d in tasks)
    batches = [d for d in worker if "batch_size" in d and about(d, job.job_id)]
    assert sum(d["batch_size"] for d in batches) >= IMAGES
    assert all(d["model_ms"] >= 250 and d["wait_ms"] >= 0 for d in batches)  # slow-batch=0.25
    celery = {d["task_id"] for d in worker if d["logger"] == "celery.app.trace"}
    assert task_ids <= celery
    # Log lines inside a task carry its trace: logs and traces meet on trace_id.
    spans = read_spans(obs_stack.trace_file)
    task_traces = {
        s["attributes"]["batchvision.task_id"]: s["context"]["trace_id"][2:]
        for s in spans
        if s["name"] == "batchvision.classify"
    }
    assert all(d["trace_id"] == task_traces[d["task_id"]] for d in tasks)


def test_flower_writes_json_lines_too(
    obs_stack: Stack, tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    """`batchvision up` also runs Flower: in JSON mode its (tornado's) lines are JSON as well."""
    env = {
        **os.environ,
        **obs_stack.settings.to_env(include_secrets=True),
        "BATCHVISION_FLOWER_PORT": str(free_port()),
        "BATCHVISION_FLOWER_USER": "admin",
        "BATCHVISION_FLOWER_PASSWORD": "observability-flower",
    }
    out = tmp_path / "flower.log"
    with open(out, "wb") as f:
        proc = subprocess.Popen(cli_argv("flower"), env=env, stdout=f, stderr=f)
    try:
        wait_until(lambda: "Visit me at" in out.read_text() or proc.poll() is not None, timeout=60)
    finally:
        proc.terminate()
        proc.wait(15)
    docs = json_lines(out)
    assert {d["service"] for d in docs} == {"flower"}
    assert any(d["logger"] == "flower.command" and "Visit me at" in d["message"] for d in docs)


RUNNER = textwrap.dedent(
    """
    import sys, time
    from batchvision.cli.main import setup_logging
    from batchvision.cli.runner import Service, Supervisor

    setup_logging("up")
    sup = Supervisor([Service("blip", [sys.executable, "-c", "pass"], {})], max_backoff_s=0.1)
    sup.start()
    deadline = time.monotonic() + 20
    while sup.services[0].restarts < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
        sup.check_once()
    sup.stop()
    """
)


@pytest.mark.parametrize("fmt", ["json", "text"])
def test_the_runner_writes_json_lines_or_text(fmt: str) -> None:
    env = {"BATCHVISION_LOG_FORMAT": fmt, "PATH": "/usr/bin:/bin"}
    proc = subprocess.run(
        [sys.executable, "-c", RUNNER], env=env, capture_output=True, text=True, timeout=60, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) >= 3, proc.stderr
    if fmt == "text":
        assert not any(line.startswith("{") for line in lines)
        assert any("started blip" in line for line in lines)
        return
    docs = [json.loads(line) for line in lines]
    assert all(d["service"] == "up" for d in docs)
    started = [d for d in docs if d["message"].startswith("started blip")]
    assert started and all(d["service_name"] == "blip" and isinstance(d["child_pid"], int) for d in started)
    restarts = [d for d in docs if d["level"] == "WARNING" and d.get("exit_code") == 0]
    assert len(restarts) >= 2 and all(d["service_name"] == "blip" for d in restarts)


@pytest.mark.parametrize(("fmt", "access"), [("text", True), ("text", False), ("json", False)])
def test_the_api_access_log_is_one_line_per_request_or_none(
    fmt: str, access: bool, tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    """``BATCHVISION_API_ACCESS_LOG=false`` leaves the access line out, also in JSON mode
    (where gunicorn's logging configuration alone would still write it)."""
    log = tmp_path / "api.log"
    with RedisServer() as redis:
        s = Settings.from_env(
            {}, redis_url=redis.url, api_port=free_port(), log_format=fmt, api_access_log=access
        )
        url = f"http://127.0.0.1:{s.api_port}"
        argv = cli_argv("api", "--host", "127.0.0.1")
        api = Service("api", argv, s.to_env(), health_url=f"{url}/healthz", log_path=str(log))
        sup = Supervisor([api])
        sup.start()
        try:
            sup.wait_healthy(timeout=120)
            for _ in range(3):
                assert (
                    requests.get(f"{url}/v1/jobs/0123456789abcdef0123456789abcdef", timeout=10).status_code
                    == 404
                )
            if access:  # (the line is written just after the answer)
                wait_until(
                    lambda: '"GET /v1/jobs/0123456789abcdef0123456789abcdef' in log.read_text(), timeout=20
                )
        finally:
            sup.stop()  # every line is written once the API has stopped
    text = log.read_text()
    if fmt == "json":
        docs = json_lines(log)
        assert any(d["logger"] == "gunicorn.error" and "Listening at" in d["message"] for d in docs)
        assert not [d for d in docs if d["logger"] == "gunicorn.access"]
        return
    assert "Listening at" in text
    assert text.count('"GET /v1/jobs/0123456789abcdef0123456789abcdef HTTP/1.1" 404') == (
        3 if access else 0
    ), text[-2000:]
