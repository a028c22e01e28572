"""Monitoring for real: worker and API Prometheus metrics after a job of known size, and
Flower (with auth) listing the job's tasks, with a screenshot taken in headless Chromium."""

from __future__ import annotations

import base64
import re
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files


def scrape(url: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}."""
    out: dict[str, float] = {}
    for line in requests.get(url, timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            key, _, value = line.rpartition(" ")
            out[key] = float(value)
    return out


def series(scraped: dict[str, float], key: str) -> float:
    """The sum of the series ``key`` names, ``name`` or ``name{label="value",...}``, whatever
    other labels they have."""
    name, _, wanted = key.partition("{")
    labels = set(wanted.rstrip("}").split(",")) - {""}
    total = 0.0
    for k, v in scraped.items():
        kname, _, have = k.partition("{")
        if kname == name and labels <= set(have.rstrip("}").split(",")):
            total += v
    return total


def test_metrics_move_by_exactly_the_job(
    api_url: str, settings: Settings, wait_until: Callable[..., Any]
) -> None:
    worker_url = f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"

    def wait_idle() -> None:
        wait_until(
            lambda: scrape(f"{api_url}/metrics").get("batchvision_queue_depth_images", 1) == 0,
            timeout=60,
            interval=0.2,
            message="the queue drains",
        )

    wait_idle()
    before_w, before_a = scrape(worker_url), scrape(f"{api_url}/metrics")
    files = [(n, d) for n, d, _ in labelled_files(40, seed=77)] + [("bad.jpg", b"not an image")]
    client = Client(api_url)
    job = client.submit_files(files)
    assert client.wait(job.job_id, timeout=120).status == "partial"
    wait_idle()

    def delta(after: dict[str, float], before: dict[str, float], key: str) -> float:
        # Summed over the series of other labels too (worker metrics are by model).
        return series(after, key) - series(before, key)

    # The worker counts the results it stored after storing them: the job can be final a
    # moment before its counter has moved.
    classified = 'batchvision_images_classified_total{outcome="ok"}'

    def counted() -> dict[str, float] | None:
        scraped = scrape(worker_url)
        return scraped if delta(scraped, before_w, classified) >= 40 else None

    after_w = wait_until(counted, timeout=30, interval=0.2, message="the worker counts the job's images")
    after_a = scrape(f"{api_url}/metrics")
    assert delta(after_w, before_w, classified) == 40
    assert delta(after_w, before_w, "batchvision_batch_size_sum") == 40  # every image in one batch
    batches = delta(after_w, before_w, "batchvision_batch_size_count")
    assert 1 <= batches < 40  # batched, not one call per image
    assert delta(after_w, before_w, "batchvision_inference_seconds_count") == batches
    assert delta(after_w, before_w, "batchvision_decode_seconds_count") == 40
    assert delta(after_w, before_w, "batchvision_queue_wait_seconds_count") == 40
    assert any(k.startswith("batchvision_model_info{") and 'model="' in k for k in after_w)
    assert after_w["batchvision_model_load_seconds"] > 0

    assert delta(after_a, before_a, "batchvision_jobs_created_total") == 1
    assert delta(after_a, before_a, "batchvision_images_accepted_total") == 40
    assert delta(after_a, before_a, 'batchvision_images_rejected_total{reason="not_an_image"}') == 1
    assert after_a["batchvision_queue_depth_images"] == 0
    route = 'batchvision_http_request_duration_seconds_count{method="POST",route="/v1/jobs",status="202"}'
    assert delta(after_a, before_a, route) == 1


#: What Prometheus 3 sends; it fails a scrape whose Content-Type does not parse.
PROMETHEUS_3_ACCEPT = (
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8;q=0.5,"
    "application/openmetrics-text;version=0.0.1;q=0.4,text/plain;version=1.0.0;escaping=allow-utf-8;q=0.3,"
    "text/plain;version=0.0.4;q=0.2,*/*;q=0.1"
)


def test_both_metrics_endpoints_declare_one_format_prometheus_parses(
    api_url: str, settings: Settings
) -> None:
    from prometheus_client.parser import text_string_to_metric_families

    for url in (f"{api_url}/metrics", f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"):
        resp = requests.get(url, headers={"Accept": PROMETHEUS_3_ACCEPT}, timeout=10)
        media, *params = [p.strip() for p in resp.headers["Content-Type"].split(";")]
        names = [p.partition("=")[0].lower() for p in params]
        # Go's mime.ParseMediaType (Prometheus) refuses a parameter given twice.
        assert len(names) == len(set(names)), (url, resp.headers["Content-Type"])
        assert media in ("text/plain", "application/openmetrics-text"), (url, media)
        if media == "text/plain":
            families = {f.name for f in text_string_to_metric_families(resp.text)}
            assert "batchvision_images_classified" in families or "batchvision_jobs_created" in families, url


def test_api_counters_count_each_image_once_whatever_the_route(
    api_url: str, settings: Settings, wait_until: Callable[..., Any]
) -> None:
    metrics = f"{api_url}/metrics"
    before = scrape(metrics)
    client = Client(api_url)
    # An upload in parts whose second part is sent twice (its answer was lost, say).
    images = [(n, d) for n, d, _ in labelled_files(5, seed=78)]
    job = client.open_job(5)
    client.add_part(job.job_id, images[:3])
    client.add_part(job.job_id, images[3:])
    client.add_part(job.job_id, images[3:])
    client.seal(job.job_id)
    # An Open Inference Protocol request of two images makes a job too.
    body = {
        "inputs": [
            {
                "name": "images",
                "datatype": "BYTES",
                "shape": [2],
                "data": [base64.b64encode(d).decode() for _, d in images[:2]],
            }
        ]
    }
    name = requests.get(f"{api_url}/v1/models", timeout=10).json()["default"]
    resp = requests.post(f"{api_url}/v2/models/{name}/infer", json=body, timeout=60)
    assert resp.status_code == 200, resp.text
    assert client.wait(job.job_id, timeout=120).status == "succeeded"
    after = scrape(metrics)

    def delta(key: str) -> float:
        return series(after, key) - series(before, key)

    assert delta("batchvision_jobs_created_total") == 2
    assert delta("batchvision_images_accepted_total") == 5 + 2


def test_metric_names_follow_conventions(api_url: str, settings: Settings) -> None:
    names = set()
    for url in (f"{api_url}/metrics", f"http://127.0.0.1:{settings.worker_metrics_port}/metrics"):
        text = requests.get(url, timeout=10).text
        for line in text.splitlines():
            if line.startswith("# TYPE batchvision_"):
                _, _, name, kind = line.split()
                base = name.removesuffix("_total")
                names.add(base)
                assert re.fullmatch(r"batchvision_[a-z_]+", name)
                if kind == "counter":
                    assert f"\n{base}_total" in text  # counters are exposed as _total
                if kind == "histogram":
                    assert base.endswith(("_seconds", "_size"))  # base units
    assert {
        "batchvision_images_classified",
        "batchvision_batch_size",
        "batchvision_queue_depth_images",
    } <= names


@pytest.fixture(scope="module")
def flower(stack: Supervisor, settings: Settings, wait_until: Callable[..., Any]) -> Iterator[str]:
    svc = Service("flower", cli_argv("flower"), settings.to_env(include_secrets=True))
    sup = Supervisor([svc])
    sup.start()
    url = f"http://127.0.0.1:{settings.flower_port}"

    def answers() -> bool:
        try:
            requests.get(f"{url}/healthcheck", timeout=2)
        except requests.ConnectionError:
            return False
        return True

    wait_until(answers, timeout=60, interval=0.3, message="flower starts")
    yield url
    sup.stop()


def test_flower_refuses_to_start_without_credentials(settings: Settings) -> None:
    import subprocess

    env = {**settings.to_env(), "BATCHVISION_FLOWER_USER": "", "BATCHVISION_FLOWER_PASSWORD": ""}
    proc = subprocess.run(cli_argv("flower"), env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "refusing to start Flower without authentication" in proc.stderr


def test_flower_requires_auth_and_lists_the_jobs_tasks(
    flower: str, api_url: str, settings: Settings, artifacts: Path, wait_until: Callable[..., Any]
) -> None:
    assert requests.get(f"{flower}/api/tasks", timeout=10).status_code == 401
    assert requests.get(f"{flower}/", timeout=10).status_code == 401
    auth = (settings.flower_user, settings.flower_password.get_secret_value())
    client = Client(api_url)
    job = client.submit_files([(n, d) for n, d, _ in labelled_files(20, seed=5)])
    client.wait(job.job_id, timeout=120)

    def listed() -> list[dict[str, Any]] | None:
        tasks = requests.get(f"{flower}/api/tasks", auth=auth, timeout=10).json()
        mine = [t for t in tasks.values() if job.job_id in str(t.get("args"))]
        done = len(mine) == 3 and all(t["state"] == "SUCCESS" for t in mine)  # 20 images, chunks of 8
        return mine if done else None

    mine = wait_until(listed, timeout=30, interval=0.5, message="flower lists the job's 3 tasks, done")
    for t in mine:
        assert t["name"] == "batchvision.classify"
        assert re.fullmatch(rf"job={job.job_id} images=\d+\.\.\d+ n=\d+", t["args"])
        assert len(t["args"]) < 200  # identifiers only, never image bytes

    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.skip("Debian's chromium is not installed (make system-deps installs it)")
    from playwright.sync_api import sync_playwright

    # Into tests/artifacts: a test run never rewrites tracked files (copy them to docs/ by hand).
    shot = artifacts / "flower-tasks.png"
    with sync_playwright() as p:
        browser = p.chromium.launch(
            executable_path=chromium,
            args=["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking"],
        )
        context = browser.new_context(
            http_credentials={"username": auth[0], "password": auth[1]},
            viewport={"width": 1400, "height": 800},
        )
        page = context.new_page()
        page.goto(f"{flower}/tasks")
        try:
            page.wait_for_selector("td:has-text('batchvision.classify')", timeout=20000)
        finally:
            page.screenshot(path=str(shot))
        text = page.content()
        # The task's own page shows the arguments that identify the job and the images.
        page.goto(f"{flower}/task/{mine[0]['uuid']}")
        page.wait_for_selector(f"text=job={job.job_id}", timeout=20000)
        page.screenshot(path=str(artifacts / "flower-task.png"))
        browser.close()
    assert text.count("batchvision.classify") >= 3
    assert shot.stat().st_size > 10_000
