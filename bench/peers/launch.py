"""Start and stop the peers (bench/peers/ray_serve_app.py, bench/peers/bentoml_service.py) as
subprocesses of the benchmark, each from its own virtualenv, on a free loopback port.

Used by bench/small_jobs.py (run from bench/, so ``loadgen`` and ``common`` import as modules)::

    with running_peer(RAY, sample_jpeg) as peer:
        peer.request(jpeg)      # (method, path, body, headers) of one classification
        peer.stats()            # {"batches", "images"} from the peer's model
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from loadgen import Conn, multipart

from batchvision.cli.redis_server import free_port

HERE = Path(__file__).resolve().parent
INSTALL_HINT = "not installed: run make bench-peers"


@dataclass(frozen=True)
class PeerSpec:
    """How to run one peer and how to send it one image."""

    name: str
    title: str
    #: the classify route, and whether it takes the raw JPEG body or a one-file multipart upload
    path: str
    body: str

    @property
    def venv(self) -> Path:
        return HERE / f".venv-{self.name}"

    def installed(self) -> bool:
        return (self.venv / "bin" / "python").exists()

    def command(self, port: int) -> list[str]:
        py = str(self.venv / "bin" / "python")
        if self.name == "ray":
            return [py, str(HERE / "ray_serve_app.py"), "--port", str(port)]
        if self.name == "bentoml":
            return [py, "-m", "bentoml", "serve", "bentoml_service:Classifier", "--host", "127.0.0.1",
                    "--port", str(port)]  # fmt: skip
        raise ValueError(self.name)

    def request(self, jpeg: bytes) -> tuple[str, str, bytes, dict[str, str]]:
        """(method, path, body, headers) of one single-image classification."""
        if self.body == "raw":
            return "POST", self.path, jpeg, {"Content-Type": "image/jpeg"}
        body, ctype = multipart("images", [("image.jpg", jpeg)])
        return "POST", self.path, body, {"Content-Type": ctype}


RAY = PeerSpec("ray", "Ray Serve", "/", "raw")
BENTOML = PeerSpec("bentoml", "BentoML", "/classify", "multipart")
PEERS = (RAY, BENTOML)


@dataclass
class RunningPeer:
    spec: PeerSpec
    port: int
    proc: subprocess.Popen[bytes]

    @property
    def host(self) -> str:
        return "127.0.0.1"

    def stats(self) -> dict[str, int]:
        """Model calls and images so far, from the peer's own counter."""
        url = f"http://{self.host}:{self.port}/stats"
        if self.spec.name == "ray":
            req = urllib.request.Request(url)
        else:
            req = urllib.request.Request(url, data=b"{}", headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            return {k: int(v) for k, v in json.loads(resp.read()).items()}


@contextmanager
def running_peer(
    spec: PeerSpec, sample: bytes, log_dir: Path, timeout: float = 300.0, env: dict[str, str] | None = None
) -> Iterator[RunningPeer]:
    """Run ``spec`` until the block ends; ready once it classified ``sample`` (model loaded).

    ``env``: extra environment (``BENCH_RAY_MAX_ONGOING_REQUESTS`` for the Ray Serve app).
    """
    if not spec.installed():
        raise FileNotFoundError(f"{spec.title}: {INSTALL_HINT}")
    port = free_port()
    log_dir.mkdir(parents=True, exist_ok=True)
    child_env = {
        **{
            k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "VIRTUAL_ENV", "BATCHVISION_"))
        },
        "PYTHONPATH": str(HERE),
        "TF_CPP_MIN_LOG_LEVEL": "2",
        "RAY_USAGE_STATS_ENABLED": "0",
        "BENTOML_DO_NOT_TRACK": "true",
        **(env or {}),
    }
    log_path = log_dir / f"peer-{spec.name}.log"
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(
            spec.command(port),
            cwd=HERE,
            env=child_env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    peer = RunningPeer(spec, port, proc)
    try:
        _wait_ready(peer, sample, timeout, log_path)
        yield peer
    finally:
        _stop(proc)


def _wait_ready(peer: RunningPeer, sample: bytes, timeout: float, log_path: Path) -> None:
    method, path, body, headers = peer.spec.request(sample)
    deadline = time.monotonic() + timeout
    while True:
        if peer.proc.poll() is not None:
            tail = log_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(
                f"{peer.spec.title} exited with {peer.proc.returncode}; log {log_path}:\n{tail}"
            )
        conn = Conn(peer.host, peer.port, timeout=60)
        try:
            if conn.request(method, path, body, headers).status == 200:
                return
        except OSError:
            pass
        finally:
            conn.close()
        if time.monotonic() > deadline:
            raise TimeoutError(f"{peer.spec.title} did not answer within {timeout:.0f}s; see {log_path}")
        time.sleep(1.0)


def _stop(proc: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    """SIGTERM (each peer then shuts its own processes down), SIGKILL its group if it hangs."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
