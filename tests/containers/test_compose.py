"""The compose stack, built from the shipped files and run: the quickstart, the CLI from the
host, scaling, killed and stopped workers, a Redis restart, volumes across `down`/`up`.

The tests share one stack (the ``stack`` fixture) and run in file order: each leaves it
running and healthy for the next; the last ones take it down and up again.
"""

from __future__ import annotations

import csv
import re
import secrets
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import boto3
import requests

from batchvision.cli.redis_server import free_port
from batchvision.client.http import Client
from batchvision.core.synthetic import labelled_files

ROOT = Path(__file__).resolve().parents[2]
SERVICES = {"redis", "api", "flower", "worker-cpu"}
WORKER = "worker-cpu"


def _client(stack: Any) -> Client:
    return Client(stack.api_url, api_key=stack.api_key)


def _files(n: int, seed: int) -> list[tuple[str, bytes]]:
    return [(name, data) for name, data, _ in labelled_files(n, seed=seed)]


def _wait_healthy(stack: Any, wait_until: Any, services: set[str], timeout: float = 300) -> None:
    def healthy() -> bool:
        names = stack.containers()
        found = {stack.docker.inspect(n)["Config"]["Labels"]["com.docker.compose.service"] for n in names}
        return services <= found and all(
            stack.health(n) == "healthy"
            for n in names
            if stack.docker.inspect(n)["Config"]["Labels"]["com.docker.compose.service"] in services
        )

    wait_until(healthy, timeout=timeout, interval=2, message=f"every container of {sorted(services)} healthy")


def _assert_exactly_once(client: Client, job_id: str, n: int) -> None:
    """Every image of the job has one stored result, a classification."""
    # Generous: on a loaded 2-core machine, three TensorFlow workers share the cores.
    status = client.wait(job_id, timeout=600, poll_s=0.5)
    assert (status.total, status.done, status.failed) == (n, n, 0), status
    rows = client.results(job_id)
    assert [r.index for r in rows] == list(range(n))
    assert [r.status for r in rows] == ["ok"] * n, [r.error for r in rows if r.error is not None]


def _worker_images(stack: Any, name: str) -> float:
    """batchvision_images_classified_total of one worker container (its own metrics port)."""
    code = (
        "import urllib.request; print(urllib.request.urlopen('http://127.0.0.1:9808/metrics', timeout=5)"
        ".read().decode())"
    )
    text = stack.docker.run("exec", name, "python", "-c", code).stdout
    return sum(
        float(m.group(1))
        for m in re.finditer(r"^batchvision_images_classified_total\{[^}]*\} (\S+)$", text, re.M)
    )


def _progress(client: Client, job_id: str, at_least: int) -> Any:
    def moved() -> Any:
        status = client.status(job_id)
        return status if status.done >= at_least else None

    return moved


def test_the_readme_quickstart_is_the_one_that_ran(stack: Any, quickstart_block: Any) -> None:
    """The README's compose quickstart is the block the stack ran (docs/deploy/compose.md)."""
    ran = quickstart_block(ROOT / "docs" / "deploy" / "compose.md")
    assert quickstart_block(ROOT / "README.md") == ran


def test_every_service_healthy_and_non_root(stack: Any, wait_until: Any) -> None:
    _wait_healthy(stack, wait_until, SERVICES)
    redis = stack.containers("redis")
    for name in stack.containers():
        uids = stack.docker.run(
            "exec", name, "sh", "-c", "cat /proc/[0-9]*/status 2>/dev/null | sed -n 's/^Uid:\\s*//p'"
        ).stdout.split("\n")
        real = {line.split()[0] for line in uids if line.strip()}
        assert real and "0" not in real, f"{name}: processes run as uids {real}"
        # Read-only root file systems (even root may not write there); ours have a /tmp.
        probe = stack.docker.run("exec", "-u", "0", name, "touch", "/ro-probe", check=False)
        assert probe.returncode != 0 and "Read-only file system" in probe.stderr, (name, probe.stderr)
        if name not in redis:
            stack.docker.run("exec", name, "touch", "/tmp/probe")
            # A tmpfs (memory) of a bounded size, as the compose file says.
            tmpfs = stack.docker.inspect(name)["HostConfig"]["Tmpfs"]
            assert set(tmpfs) == {"/tmp"} and tmpfs["/tmp"].startswith("size="), (name, tmpfs)
    # Flower's health check is its image's (the `flower` target), run by compose as it is.
    (flower,) = stack.containers("flower")
    assert "/healthcheck" in " ".join(stack.docker.inspect(flower)["Config"]["Healthcheck"]["Test"])
    # No secret on a command line, where any process of the host can read it (`ps`).
    env = dict(line.split("=", 1) for line in (stack.dir / ".env").read_text().splitlines() if "=" in line)
    secrets = [v for k, v in env.items() if k.endswith(("PASSWORD", "KEYS", "SECRET")) and len(v) > 8]
    assert secrets, "the quickstart's .env holds the secrets"
    for name in stack.containers():
        argv = stack.docker.run("exec", name, "sh", "-c", "cat /proc/[0-9]*/cmdline | tr '\\0' ' '").stdout
        assert argv and not [k for k, v in env.items() if v in secrets and v in argv], name


def test_settings_reach_the_services(stack: Any) -> None:
    """Admin keys, the webhook secret, fetch allow-list and log format reach API and workers."""
    for service, names in {
        "api": [
            "BATCHVISION_ADMIN_KEYS",
            "BATCHVISION_WEBHOOK_SECRET",
            "BATCHVISION_FETCH_ALLOW",
            "BATCHVISION_LOG_FORMAT",
        ],
        WORKER: ["BATCHVISION_WEBHOOK_SECRET", "BATCHVISION_FETCH_ALLOW", "BATCHVISION_LOG_FORMAT"],
    }.items():
        name = stack.containers(service)[0]
        env = dict(e.split("=", 1) for e in stack.docker.inspect(name)["Config"]["Env"])
        assert set(names) <= set(env), (service, sorted(set(names) - set(env)))
    # The admin key reloads a model; the plain API key may not.
    url = f"{stack.api_url}/v1/models/shapes/reload"
    assert requests.post(url, headers={"X-API-Key": stack.api_key}, timeout=10).status_code == 403
    answer = requests.post(url, headers={"X-API-Key": stack.admin_key}, timeout=10)
    assert answer.status_code in (200, 202), answer.text


def test_api_refuses_to_start_without_keys(stack: Any) -> None:
    proc = stack.compose(
        "run", "--rm", "--no-deps", "-T", "-e", "BATCHVISION_API_KEYS=", "api", check=False, timeout=120
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "refusing to serve the API without authentication on 0.0.0.0:8000" in proc.stdout + proc.stderr


def test_cli_submit_from_the_host_writes_one_row_per_image(stack: Any, tmp_path: Path) -> None:
    folder = tmp_path / "images"
    folder.mkdir()
    files = labelled_files(24, seed=7)
    labels = {}
    for name, data, label in files:
        (folder / name).write_bytes(data)
        labels[name] = label
    out = tmp_path / "results.csv"
    env = dict(stack.env, BATCHVISION_API_URL=stack.api_url, BATCHVISION_API_KEY=stack.api_key)
    proc = subprocess.run(
        [
            str(Path(sys.executable).with_name("batchvision")),
            "submit",
            str(folder),
            "--wait",
            "-o",
            str(out),
            "--no-progress",
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    with out.open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 24, rows
    assert sorted(Path(r["filename"]).name for r in rows) == sorted(labels), rows[:2]
    assert all(r["label"] and not r["error"] for r in rows), rows


def test_three_workers_share_one_job(stack: Any, wait_until: Any) -> None:
    stack.compose("up", "-d", "--scale", f"{WORKER}=3")
    _wait_healthy(stack, wait_until, {WORKER})
    workers = stack.containers(WORKER)
    assert len(workers) == 3, workers
    before = {w: _worker_images(stack, w) for w in workers}
    client = _client(stack)
    job = client.submit_files(_files(240, seed=11))
    _assert_exactly_once(client, job.job_id, 240)
    share = {w: _worker_images(stack, w) - before[w] for w in workers}
    assert sum(share.values()) == 240, share
    assert all(v > 0 for v in share.values()), f"a worker took no share: {share}"


def test_docker_kill_of_a_worker_mid_job_loses_nothing(stack: Any, wait_until: Any) -> None:
    workers = stack.containers(WORKER)
    client = _client(stack)
    assert len(workers) > 1, "another worker finishes what the killed one held"
    # An upload in parts, the rest sent only after the kill: the kill always lands mid-job,
    # however fast the workers keep up with the upload.
    files = _files(480, seed=12)
    job_id = client.open_job(len(files)).job_id
    client.add_part(job_id, files[:96])
    wait_until(_progress(client, job_id, 16), timeout=120, interval=0.1, message="the job started")
    try:
        stack.docker.run("kill", workers[0])
        client.add_part(job_id, files[96:])
        client.seal(job_id)
        _assert_exactly_once(client, job_id, 480)
    finally:  # the next tests find every worker running, whatever happened here
        stack.compose("up", "-d", "--scale", f"{WORKER}=3")


def test_compose_stop_of_the_workers_finishes_or_requeues(stack: Any, wait_until: Any) -> None:
    _wait_healthy(stack, wait_until, {WORKER})
    client = _client(stack)
    job = client.submit_files(_files(960, seed=13))
    started = wait_until(
        _progress(client, job.job_id, 8), timeout=120, interval=0.05, message="the job started"
    )
    assert started.done < 960, "the job ended before the stop"
    try:
        stack.compose("stop", WORKER)
        for name in stack.containers(WORKER, all_states=True):
            state = stack.docker.inspect(name)["State"]
            assert (state["Running"], state["ExitCode"]) == (False, 0), (name, state)
    finally:
        stack.compose("start", WORKER)
    _assert_exactly_once(client, job.job_id, 960)


def test_redis_restart_mid_job_loses_nothing(stack: Any, wait_until: Any) -> None:
    client = _client(stack)
    job = client.submit_files(_files(480, seed=14))
    wait_until(_progress(client, job.job_id, 16), timeout=120, interval=0.1, message="the job started")
    stack.compose("restart", "redis")
    _wait_healthy(stack, wait_until, {"redis"})
    _assert_exactly_once(client, job.job_id, 480)


def test_prometheus_scrapes_api_and_workers_with_every_rule(stack: Any, wait_until: Any) -> None:
    stack.compose("--profile", "monitoring", "up", "-d", "prometheus")
    url = f"http://127.0.0.1:{stack.env['PROMETHEUS_PUBLISH_PORT']}"
    workers = len(stack.containers(WORKER))

    def targets() -> Any:
        try:
            active = requests.get(f"{url}/api/v1/targets", timeout=5).json()["data"]["activeTargets"]
        except (requests.RequestException, ValueError):
            return None
        up = {}
        for t in active:
            up.setdefault(t["labels"]["job"], []).append(t["health"])
        ok = up.get("batchvision-api") == ["up"] and up.get("batchvision-worker", []).count("up") == workers
        return up if ok else None

    wait_until(targets, timeout=120, interval=2, message=f"api and the {workers} workers scraped")
    groups = requests.get(f"{url}/api/v1/rules", timeout=5).json()["data"]["groups"]
    loaded = {r["name"] for g in groups for r in g["rules"]}
    import yaml

    shipped = yaml.safe_load((ROOT / "compose" / "prometheus" / "alerts.yml").read_text())
    expected = {r["alert"] for g in shipped["groups"] for r in g["rules"]}
    assert loaded == expected


def test_down_keeps_results_and_down_v_removes_them(stack: Any, wait_until: Any) -> None:
    client = _client(stack)
    job = client.submit_files(_files(16, seed=15))
    _assert_exactly_once(client, job.job_id, 16)
    before = [(r.index, r.status) for r in client.results(job.job_id)]
    # Only the API (and Redis, which it depends on) comes back up: it serves the results from
    # Redis's volume, and three TensorFlow workers starting twice would only slow the tier.
    stack.compose("down", "--timeout", "60")
    stack.compose("up", "-d", "api")
    _wait_healthy(stack, wait_until, {"api"})
    assert [(r.index, r.status) for r in client.results(job.job_id)] == before
    stack.compose("down", "-v", "--timeout", "60")
    stack.compose("up", "-d", "api")
    _wait_healthy(stack, wait_until, {"api"})
    gone = requests.get(
        f"{stack.api_url}/v1/jobs/{job.job_id}", headers={"X-API-Key": stack.api_key}, timeout=10
    )
    assert gone.status_code == 404, gone.text


def test_s3_profile_reads_a_prefix_writes_results_and_keeps_uploads_in_the_bucket(
    stack: Any, wait_until: Any
) -> None:
    # The docs' recipe: the `s3` service, uploads waiting in its bucket, jobs scoped to in/ and out/.
    port = free_port()
    settings = {
        "S3_PUBLISH_PORT": str(port),
        "BATCHVISION_S3_ENDPOINT_URL": "http://s3:9000",
        "BATCHVISION_BLOB_URL": "s3://batchvision/blobs/",
        "BATCHVISION_S3_ALLOW": "s3://batchvision/in/,s3://batchvision/out/",
        "AWS_ACCESS_KEY_ID": "compose-test",
        "AWS_SECRET_ACCESS_KEY": "compose-test",
    }
    stack.env.update(settings)
    try:
        stack.build("s3", profile="s3")
        started = time.monotonic()
        stack.compose("--profile", "s3", "up", "-d", "--scale", f"{WORKER}=1")
        _wait_healthy(stack, wait_until, {"s3", "api", WORKER})
        stack.figure("s3 profile up s", time.monotonic() - started)
        bucket = boto3.client(
            "s3",
            endpoint_url=f"http://127.0.0.1:{port}",
            aws_access_key_id="compose-test",
            aws_secret_access_key="compose-test",
            region_name="us-east-1",
        )
        files = _files(24, seed=17)
        for i, (name, data) in enumerate(files):
            bucket.put_object(Bucket="batchvision", Key=f"in/set{i % 2}/{name}", Body=data)
        bucket.put_object(Bucket="batchvision", Key="in/notes.txt", Body=b"not an image")
        headers = {"X-API-Key": stack.api_key}

        def post(body: dict[str, str]) -> requests.Response:
            return requests.post(f"{stack.api_url}/v1/jobs", json=body, headers=headers, timeout=120)

        started = time.monotonic()
        resp = post({"source": "s3://batchvision/in/", "output_url": "s3://batchvision/out/run-1/"})
        assert resp.status_code == 202, resp.text
        stack.figure("s3 prefix job accepted s", time.monotonic() - started)

        def written() -> Any:
            doc = requests.get(
                f"{stack.api_url}/v1/jobs/{resp.json()['job_id']}", headers=headers, timeout=10
            ).json()
            return doc if doc["status"] == "succeeded" and doc["output"]["state"] == "written" else None

        job = wait_until(written, timeout=600, interval=1, message="the prefix job and its output")
        stack.figure("s3 prefix job written s", time.monotonic() - started)
        assert (job["total"], job["done"], job["failed"]) == (24, 24, 0), job
        key = job["output"]["files"]["csv"].removeprefix("s3://batchvision/")
        rows = list(
            csv.DictReader(
                bucket.get_object(Bucket="batchvision", Key=key)["Body"].read().decode().splitlines()
            )
        )
        assert sorted(r["filename"] for r in rows) == sorted(
            f"set{i % 2}/{name}" for i, (name, _) in enumerate(files)
        )
        assert all(r["label"] and not r["error"] for r in rows), rows

        # An upload from the host: its images wait in the bucket (the API and the worker share
        # no volume and Redis holds no image), and it is classified like any other.
        client = _client(stack)
        started = time.monotonic()
        upload = client.submit_files(_files(8, seed=18))
        _assert_exactly_once(client, upload.job_id, 8)
        stack.figure("s3 blob upload job s", time.monotonic() - started)

        # Outside the allowed locations, and the blob store itself: refused, naming the field.
        for body, field in [
            ({"source": "s3://batchvision/blobs/"}, "source"),
            ({"source": "s3://batchvision/in/", "output_url": "s3://batchvision/elsewhere/"}, "output_url"),
        ]:
            refused = post(body)
            assert (refused.status_code, refused.json()["error"]["code"]) == (403, "s3_not_allowed"), (
                refused.text
            )
            assert refused.json()["error"]["details"][0]["field"] == field
    finally:
        for name in settings:
            stack.env.pop(name, None)


def test_rabbitmq_profile_is_the_broker(stack: Any, wait_until: Any) -> None:
    password = secrets.token_hex(16)
    stack.env.update(
        RABBITMQ_PASSWORD=password,
        BATCHVISION_BROKER_URL=f"amqp://batchvision:{password}@rabbitmq:5672/",
    )
    stack.compose("--profile", "rabbitmq", "up", "-d", "--scale", f"{WORKER}=1")
    _wait_healthy(stack, wait_until, {"rabbitmq", "api", WORKER})
    client = _client(stack)
    job = client.submit_files(_files(32, seed=16))
    _assert_exactly_once(client, job.job_id, 32)
    # The tasks went through RabbitMQ: the workers declared their quorum queue there.
    (node,) = stack.containers("rabbitmq")
    queues = stack.docker.run("exec", node, "rabbitmqctl", "-q", "list_queues", "name", "type").stdout
    assert re.search(r"^batchvision\s+quorum$", queues, re.M), queues
