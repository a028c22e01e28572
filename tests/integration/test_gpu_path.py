"""The GPU path on a machine without a GPU: the demo models give the same labels and scores on
Keras' JAX backend as on TensorFlow; a worker on JAX serves jobs with TensorFlow unimportable in
its process and exports no GPU series; a worker pinned to a GPU that is not visible exits at
once with the GPU named, instead of running on the CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import cli_argv
from batchvision.client import Client
from batchvision.core.settings import Settings
from batchvision.core.synthetic import colour_files, labelled_files
from batchvision.server.gpus import Gpu, NoGpus, Nvml, describe

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]

#: Run in a child process per backend (Keras takes its backend once per process): load a
#: repository model with the worker's loader, classify the images of argv[2] (a .npy file),
#: print the probabilities and the device as JSON.
PREDICT = """
import json, sys
from pathlib import Path
import numpy as np
from batchvision.core.settings import Settings
from batchvision.server.repository import scan
from workers.keras_model import load_version
repo, name, images = Path(sys.argv[1]), sys.argv[2], np.load(sys.argv[3])
clf = load_version(scan(repo)[name].versions[1], Settings.from_env())
probs = np.concatenate([clf.predict(list(images[i : i + 16])) for i in range(0, len(images), 16)])
print(json.dumps({"probs": probs.tolist(), "device": clf.device, "tensorflow": "tensorflow" in sys.modules}))
"""


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    """A repository of the two demo models: `make` builds models/repo; else they are made here."""
    root = tmp_path_factory.mktemp("backend-repo")
    for kind in ("shapes", "colours"):
        built, target = ROOT / "models" / "repo" / kind / "1", root / kind / "1"
        if built.is_dir():
            shutil.copytree(built, target)
        elif kind == "shapes":
            target.mkdir(parents=True)
            shutil.copy(demo_model, target / "model.keras")
            shutil.copy(demo_model.with_name(demo_model.stem + ".labels.txt"), target / "labels.txt")
        else:
            argv = cli_argv("demo-model", "--kind", kind, "--out", str(target / "model.keras"))
            subprocess.run(argv, check=True)
    return root


def _predict(repo: Path, name: str, images: Path, **settings: str) -> dict[str, Any]:
    env = {**os.environ, **{f"BATCHVISION_{k.upper()}": v for k, v in settings.items()}}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", PREDICT, str(repo), name, str(images)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    result: dict[str, Any] = json.loads(out.stdout.splitlines()[-1])
    return result


@pytest.mark.parametrize("name", ["shapes", "colours"])
def test_the_jax_backend_gives_tensorflow_s_labels_and_scores(repo: Path, name: str, tmp_path: Path) -> None:
    from batchvision.core.imaging import decode_image

    size = {"shapes": (48, 48), "colours": (32, 32)}[name]
    files = labelled_files(48, seed=21) if name == "shapes" else colour_files(48, seed=21)
    images = tmp_path / "images.npy"
    np.save(images, np.stack([decode_image(data, size, max_pixels=10**7) for _, data, _ in files]))
    tf = _predict(repo, name, images, keras_backend="tensorflow")
    jax = _predict(repo, name, images, keras_backend="jax")
    assert (tf["device"], jax["device"]) == ("/device:CPU:0", "cpu:0")
    assert jax["tensorflow"] is False, "the JAX backend ran without importing TensorFlow"
    tf_probs, jax_probs = np.array(tf["probs"]), np.array(jax["probs"])
    assert tf_probs.shape == jax_probs.shape == (48, 6)
    assert (tf_probs.argmax(1) == jax_probs.argmax(1)).all()
    np.testing.assert_allclose(jax_probs, tf_probs, atol=1e-5)


def test_a_jax_worker_serves_without_tensorflow_and_exports_no_gpu_series(
    start_private_stack: Any, demo_model: Path, reference_labels: Any, tmp_path: Path
) -> None:
    # `import tensorflow` fails in the worker's process: a package of that name that refuses.
    stub = tmp_path / "stub" / "tensorflow"
    stub.mkdir(parents=True)
    (stub / "__init__.py").write_text("raise ImportError('TensorFlow is unimportable in this worker')\n")
    stack = start_private_stack("jax-worker", keras_backend="jax")
    port = free_port()
    worker = stack.worker(
        "jax-worker",
        PYTHONPATH=os.pathsep.join([str(stub.parent), str(ROOT), os.environ.get("PYTHONPATH", "")]),
        BATCHVISION_WORKER_METRICS_PORT=str(port),
    )
    files = [(name, data) for name, data, _ in labelled_files(24, seed=8)]
    client = Client(stack.url)
    job = client.submit_files(files)
    client.wait(job.job_id, timeout=120, poll_s=0.2)
    rows = list(client.results(job.job_id))
    assert [r.status for r in rows] == ["ok"] * len(files)
    assert [r.label for r in rows] == reference_labels(demo_model, files), (
        "TensorFlow's labels, in this process"
    )
    assert "Traceback" not in Path(worker.log_path or "").read_text()
    gpus = _gpus_nvml_sees()
    if gpus:
        pytest.skip(
            f"NVML sees {describe(gpus)}: the worker may run on it and export its GPU series, so "
            "the CPU device and the absence of GPU series are checked on GPU-less hosts only"
        )
    metrics = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text
    assert 'batchvision_model_info{device="cpu:0"' in metrics
    assert "batchvision_gpu_" not in metrics, "no GPU: no GPU series"


def test_a_worker_pinned_to_a_gpu_that_is_not_visible_exits_at_once(
    settings: Settings, wait_until: Callable[..., Any]
) -> None:
    # No host has a GPU 63: the pin fails on a GPU host as on one without a driver.
    proc = subprocess.Popen(
        cli_argv("worker", "--gpu", "63"),
        env={**os.environ, **settings.to_env(include_secrets=True)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: proc.poll() is not None, timeout=60, interval=0.1, message="the worker exits")
        _, err = proc.communicate(timeout=10)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 2, err
    gpus, refused = _gpus_nvml_sees(), "error: --gpu 63: GPU 63 is not visible: this host shows"
    if gpus:
        assert err.startswith(f"{refused} {describe(gpus)}"), err
    else:
        assert err.startswith(f"{refused} no GPU ("), err
        assert "NVML" in err


def _gpus_nvml_sees() -> list[Gpu]:
    """The GPUs NVML shows this process ([] without a driver or NVML library)."""
    try:
        nvml = Nvml()
    except NoGpus:
        return []
    try:
        return nvml.gpus()
    finally:
        nvml.close()
