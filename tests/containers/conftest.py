"""The container tier: the shipped Dockerfiles and compose files, built and run for real.

A private ``dockerd`` (``scripts/start-dockerd.sh``: its own data root, socket and exec root,
``--iptables=false`` so the machine's forwarding stays as it was) serves the whole session.
The images the compose files name are pulled where a registry answers, else made from Debian's
packages (``scripts/make-base-images.sh``). The stack is started once, by running the compose
quickstart of ``docs/deploy/compose.md`` as it is written, in a copy of this checkout; the tests
share it (they run in file order) and the last ones take it down. What the tier changes from a
user's run is listed in ``docs/deploy/compose.md`` ("What the tests change").

Every test here is marked ``containers`` (``tests/conftest.py``). The tier is skipped, with the
reason, only where Docker cannot run at all (not root, no overlay file system).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPTS = ROOT / "scripts"
QUICKSTART_DOC = ROOT / "docs" / "deploy" / "compose.md"
#: Images (base images, layers, build cache) are kept here between runs where the tier may
#: take the lock; a second run at the same time gets a throwaway data root instead.
CACHE = Path(os.environ.get("BATCHVISION_CONTAINER_CACHE", "/var/cache/batchvision-containers"))
DOCKER = "/usr/bin/docker"  # Debian's client; the one first on PATH may be another
COMPOSE = "docker-compose"  # Debian's Compose v1 (1.29)
PROJECT = "batchvision"  # COMPOSE_PROJECT_NAME in .env.example
COMPOSE_FILES = ["compose/docker-compose.yml", "compose/docker-compose.cpu.yml"]
TEST_OVERRIDE = "tests/containers/compose.test.yml"
#: Settings the tests give through the environment (compose prefers it to .env): a short
#: visibility timeout so a killed worker's tasks come back in seconds, and small chunks so a
#: job's tasks spread over several workers.
TEST_SETTINGS = {
    "BATCHVISION_VISIBILITY_TIMEOUT_S": "20",
    "BATCHVISION_TASK_TIME_LIMIT_S": "15",
    "BATCHVISION_CHUNK_SIZE": "8",
}
#: Figures for the summary at the end of the run (seconds, bytes).
FIGURES: dict[str, Any] = {}


def why_docker_cannot_run() -> str | None:
    """The reason the tier cannot run here, or None."""
    if os.geteuid() != 0:
        return "not root: dockerd needs root (mounts, network namespaces, cgroups)"
    if "overlay" not in Path("/proc/filesystems").read_text():
        return "the kernel has no overlay file system (dockerd's overlay2 storage driver)"
    for tool in ("/usr/sbin/dockerd", DOCKER, "debootstrap", COMPOSE):
        if shutil.which(tool) is None:
            return (
                f"{tool} is missing: `make system-deps` installs it (docker.io, debootstrap, docker-compose)"
            )
    return None


def _forward_policy() -> str:
    if shutil.which("iptables") is None:
        return "no iptables"
    out = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True, check=False)
    return out.stdout.splitlines()[0] if out.stdout else out.stderr.strip()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _unmount_below(path: Path) -> None:
    """Unmount what dockerd left mounted under ``path`` (the default network namespace's nsfs
    under its exec root stays mounted after it exits)."""
    mounts = [line.split()[4] for line in Path("/proc/self/mountinfo").read_text().splitlines()]
    for point in sorted((m for m in mounts if m.startswith(f"{path}/")), reverse=True):
        subprocess.run(["umount", "-l", point], check=False)


@dataclass
class Docker:
    """The private dockerd: its DOCKER_HOST and an environment whose `docker compose` is
    Debian's Compose v1 (a `docker` shim first on PATH hands `compose` to docker-compose)."""

    host: str
    env: dict[str, str]

    def run(
        self, *argv: str, check: bool = True, timeout: float = 600, **kw: Any
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [DOCKER, *argv], env=self.env, capture_output=True, text=True, timeout=timeout, check=False, **kw
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker {' '.join(argv)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def inspect(self, name: str) -> dict[str, Any]:
        data: list[dict[str, Any]] = json.loads(self.run("inspect", name).stdout)
        return data[0]


def _stop_leftover_dockerd(data_root: Path, wait_until: Callable[..., Any]) -> None:
    """Stop a ``dockerd`` that an earlier run left on ``data_root`` (a run killed with SIGKILL
    cannot stop its own): a second daemon on the same data root would corrupt it. Only one of
    this mount namespace (another container's daemon may use the same path for its own files);
    its containers first, so that it stops at once."""
    ours = os.readlink("/proc/self/ns/mnt")
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
            same_ns = os.readlink(proc / "ns" / "mnt") == ours
        except OSError:
            continue
        if not same_ns or Path(argv[0]).name != "dockerd" or "--data-root" not in argv[:-1]:
            continue
        if argv[argv.index("--data-root") + 1] != str(data_root):
            continue
        if "--host" in argv[:-1]:
            host = {**os.environ, "DOCKER_HOST": argv[argv.index("--host") + 1]}
            # A wedged daemon may not answer: it is killed below all the same.
            with contextlib.suppress(subprocess.TimeoutExpired, OSError):
                ids = subprocess.run(
                    [DOCKER, "ps", "-aq"], env=host, capture_output=True, text=True, timeout=60
                )
                if ids.stdout.split():
                    subprocess.run(
                        [DOCKER, "rm", "-f", *ids.stdout.split()], env=host, capture_output=True, timeout=300
                    )
        pid = int(proc.name)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
            try:
                wait_until(lambda p=proc: not p.exists(), timeout=60, interval=0.2)
            except AssertionError:
                os.kill(pid, signal.SIGKILL)
        if "--exec-root" in argv[:-1]:  # /tmp/bvd-*/exec: its mounts, then its state
            state = Path(argv[argv.index("--exec-root") + 1]).parent
            _unmount_below(state)
            shutil.rmtree(state, ignore_errors=True)


def _reset(docker: Docker) -> None:
    """No containers, volumes or networks left from an earlier run (the images stay: cache)."""
    ids = docker.run("ps", "-aq").stdout.split()
    if ids:
        docker.run("rm", "-f", "-v", *ids)
    docker.run("volume", "prune", "-f")
    docker.run("network", "prune", "-f")


@pytest.fixture(scope="module")
def docker(tmp_path_factory: pytest.TempPathFactory, wait_until: Callable[..., Any]) -> Iterator[Docker]:
    reason = why_docker_cannot_run()
    if reason:
        pytest.skip(f"container tier skipped: {reason}")
    forward_before = _forward_policy()
    CACHE.mkdir(parents=True, exist_ok=True)
    lock = (CACHE / "lock").open("w")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        data_root = CACHE / "docker"
        _stop_leftover_dockerd(data_root, wait_until)
    except BlockingIOError:  # another run holds the cache: start cold, alone
        data_root = tmp_path_factory.mktemp("docker-data")
    # A short path: a unix socket's path may not exceed 107 bytes.
    state = Path(tempfile.mkdtemp(prefix="bvd-", dir="/tmp"))
    started = time.monotonic()
    proc = subprocess.run(
        [str(SCRIPTS / "start-dockerd.sh"), str(state), str(data_root)],
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise AssertionError(f"dockerd did not start: {proc.stderr}")
    FIGURES["dockerd start s"] = round(time.monotonic() - started, 1)
    shim = state / "bin"
    shim.mkdir()
    (shim / "docker").write_text(
        f'#!/bin/sh\nif [ "$1" = compose ]; then shift; exec {COMPOSE} "$@"; fi\nexec {DOCKER} "$@"\n'
    )
    (shim / "docker").chmod(0o755)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("COMPOSE_", "DOCKER_"))}
    env.update(DOCKER_HOST=proc.stdout.strip(), PATH=f"{shim}:{env['PATH']}", DOCKER_BUILDKIT="0")
    d = Docker(env["DOCKER_HOST"], env)
    try:
        _reset(d)
        yield d
    finally:
        try:
            _reset(d)
            # Images a rebuild replaced; those of the last day stay, for the next run's cache.
            d.run("image", "prune", "-f", "--filter", "until=24h", check=False)
        finally:
            pid = int((state / "dockerd.pid").read_text())
            os.kill(pid, signal.SIGTERM)
            try:
                wait_until(lambda: not Path(f"/proc/{pid}").exists(), timeout=60, interval=0.2)
            except AssertionError:  # dockerd did not stop within a minute
                os.kill(pid, signal.SIGKILL)
            _unmount_below(state)
            shutil.rmtree(state, ignore_errors=True)
            lock.close()
    forward_after = _forward_policy()
    assert forward_after == forward_before, f"iptables FORWARD changed: {forward_before} -> {forward_after}"


@pytest.fixture(scope="module")
def base_images(docker: Docker) -> None:
    """python, redis and prometheus images under the names the files use."""
    started = time.monotonic()
    proc = subprocess.run(
        [str(SCRIPTS / "make-base-images.sh"), str(CACHE / "rootfs")],
        env=docker.env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    FIGURES["base images s"] = round(time.monotonic() - started, 1)


@pytest.fixture(scope="module")
def checkout(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A copy of this checkout (tracked and untracked files, no .env, no virtualenv) with the
    demo models that `make models` built, as a user's clone would look after `make models`."""
    out = tmp_path_factory.mktemp("checkout")
    files = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        check=True,
    ).stdout.split(b"\0")
    for name in filter(None, (f.decode() for f in files)):
        src = ROOT / name
        if name == "models" or not src.is_file() or src.is_symlink():
            continue
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, out / name)
    repo = ROOT / "models" / "repo"
    if not (repo / "shapes").is_dir():
        pytest.fail("models/repo is missing: run `make models` first (`make test` does)")
    shutil.copytree(repo, out / "models" / "repo", symlinks=False)
    return out


def quickstart_block(path: Path) -> str:
    """The shell block after the `<!-- compose-quickstart -->` marker of a Markdown file."""
    text = path.read_text()
    found = re.search(r"<!-- compose-quickstart -->\s*```sh\n(.*?)```", text, re.S)
    assert found, f"{path}: no ```sh block after <!-- compose-quickstart -->"
    return found.group(1)


@pytest.fixture(scope="session", name="quickstart_block")
def quickstart_block_fixture() -> Any:
    """:func:`quickstart_block`, for the tests."""
    return quickstart_block


def parse_env(path: Path) -> dict[str, str]:
    """KEY=VALUE lines; a later line wins, as in compose."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#") and "=" in line:
            key, _, value = line.partition("=")
            out[key.strip()] = value.strip()
    return out


@dataclass
class Stack:
    """The running compose project."""

    docker: Docker
    dir: Path
    env: dict[str, str]
    api_url: str
    api_key: str
    admin_key: str
    files: list[str] = field(default_factory=lambda: list(COMPOSE_FILES))

    def compose(
        self, *argv: str, check: bool = True, timeout: float = 900
    ) -> subprocess.CompletedProcess[str]:
        args = [COMPOSE, "--env-file", ".env"]
        for f in self.files:
            args += ["-f", f]
        proc = subprocess.run(
            [*args, *argv],
            cwd=self.dir,
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if check and proc.returncode != 0:
            raise AssertionError(
                f"docker compose {' '.join(argv)}: exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
            )
        return proc

    def build(self, service: str, profile: str | None = None) -> None:
        """``docker compose build service`` with the tier's override (builds use the host's
        network), timed in the figures."""
        started = time.monotonic()
        files, self.files = self.files, [*self.files, TEST_OVERRIDE]
        try:
            self.compose(*(("--profile", profile) if profile else ()), "build", service)
        finally:
            self.files = files
        FIGURES[f"build {service} s"] = round(time.monotonic() - started, 1)

    def figure(self, name: str, value: float) -> None:
        """Report ``name`` in the figures printed at the end of the run."""
        FIGURES[name] = round(value, 1)

    def containers(self, service: str | None = None, all_states: bool = False) -> list[str]:
        """Names of the project's containers (of one service), running ones unless all_states."""
        argv = ["ps", "--format", "{{.Names}}", "--filter", f"label=com.docker.compose.project={PROJECT}"]
        if all_states:
            argv.append("-a")
        if service:
            argv += ["--filter", f"label=com.docker.compose.service={service}"]
        return sorted(self.docker.run(*argv).stdout.split())

    def health(self, name: str) -> str:
        state = self.docker.inspect(name)["State"]
        return str(state.get("Health", {}).get("Status", state["Status"]))


@pytest.fixture(scope="module")
def stack(docker: Docker, base_images: None, checkout: Path, wait_until: Any) -> Iterator[Stack]:
    """The quickstart of docs/deploy/compose.md, run as written in the copy of the checkout."""
    # Compose prefers the environment to .env: nothing of the caller's may reach the stack
    # (`make test` exports BATCHVISION_MODEL, for one), only what the tests set on purpose.
    named = set(parse_env(checkout / ".env.example"))
    env = {k: v for k, v in docker.env.items() if k not in named and not k.startswith("BATCHVISION_")}
    ports = {name: str(_free_port()) for name in ("API", "FLOWER", "PROMETHEUS", "GRAFANA")}
    env.update({f"{name}_PUBLISH_PORT": port for name, port in ports.items()}, **TEST_SETTINGS)
    # Images first, with the host's network (the only change to the shipped files); the
    # quickstart's own `up --build` then finds every step in the build cache.
    # The model the quickstart chooses: the worker image's last steps depend on it.
    build_env = dict(
        env, REDIS_PASSWORD="build", BATCHVISION_FLOWER_PASSWORD="build", BATCHVISION_MODEL="shapes"
    )
    for service in ("api", "flower", "worker-cpu"):
        started = time.monotonic()
        args = [COMPOSE, "--env-file", ".env.example"]
        for f in [*COMPOSE_FILES, TEST_OVERRIDE]:
            args += ["-f", f]
        proc = subprocess.run(
            [*args, "build", service],
            cwd=checkout,
            env=build_env,
            capture_output=True,
            text=True,
            check=False,
        )
        assert proc.returncode == 0, f"build {service}:\n{proc.stdout[-6000:]}\n{proc.stderr[-3000:]}"
        FIGURES[f"build {service} s"] = round(time.monotonic() - started, 1)
    started = time.monotonic()
    proc = subprocess.run(
        ["bash", "-euo", "pipefail", "-c", quickstart_block(QUICKSTART_DOC)],
        cwd=checkout,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    FIGURES["quickstart s"] = round(time.monotonic() - started, 1)
    dotenv = parse_env(checkout / ".env") if (checkout / ".env").exists() else {}
    s = Stack(
        docker,
        checkout,
        env,
        api_url=f"http://127.0.0.1:{ports['API']}",
        api_key=dotenv.get("BATCHVISION_API_KEYS", ""),
        admin_key=dotenv.get("BATCHVISION_ADMIN_KEYS", ""),
    )
    try:
        assert proc.returncode == 0, (
            f"the quickstart failed (exit {proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}\n"
            + s.compose("logs", "--tail", "40", check=False).stdout[-8000:]
        )
        yield s
    finally:
        s.compose("down", "-v", "--timeout", "30", check=False)


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if FIGURES:
        terminalreporter.write_sep("-", "container tier figures")
        for key, value in FIGURES.items():
            terminalreporter.write_line(f"{key}: {value}")
