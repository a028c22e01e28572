"""ONNX models (``workers/onnx_model.py``): the demo Keras model exported to ONNX
(``workers/onnx_export.py``) gives the same labels as the Keras model; a worker serving only an
ONNX model classifies jobs with TensorFlow unimportable in its process; an ONNX file that is not
a model, or whose input is not an image, is refused at load and the previous version stays live."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import requests

from batchvision.cli.local import wait_for_workers
from batchvision.cli.redis_server import free_port
from batchvision.cli.runner import Service, Supervisor, cli_argv
from batchvision.client import Client
from batchvision.core.imaging import decode_image
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files
from batchvision.server.repository import scan
from batchvision.testing.servers import RedisServer

pytestmark = pytest.mark.integration

NAME = "shapes-onnx"
#: The worker's interpreter, with TensorFlow and Keras made unimportable (``import tensorflow``
#: raises ImportError): the worker must load, serve and classify without them.
NO_TENSORFLOW = (
    "import sys; sys.modules['tensorflow'] = None; sys.modules['keras'] = None; "
    "from batchvision.cli.main import main; sys.exit(main(sys.argv[1:]))"
)


def _export(keras_file: Path, out: Path) -> None:
    subprocess.run([sys.executable, "-m", "workers.onnx_export", str(keras_file), str(out)], check=True)


@pytest.fixture(scope="module")
def onnx_file(demo_model: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The demo model exported to ONNX, with its labels beside it."""
    out = tmp_path_factory.mktemp("onnx") / "model.onnx"
    _export(demo_model, out)
    assert (out.parent / "labels.txt").read_text() == demo_model.with_name("demo.labels.txt").read_text()
    return out


def _version(root: Path, name: str, model_file: Path) -> None:
    target = root / name / "1"
    target.mkdir(parents=True)
    shutil.copy(model_file, target / model_file.name)
    labels = model_file.parent / "labels.txt"
    if not labels.exists():
        labels = model_file.with_name(model_file.stem + ".labels.txt")
    shutil.copy(labels, target / "labels.txt")


def test_the_onnx_export_gives_the_keras_models_labels(
    demo_model: Path, onnx_file: Path, tmp_path: Path
) -> None:
    model_mod = __import__("workers.keras_model", fromlist=["load_version"])
    _version(tmp_path, "shapes", demo_model)
    _version(tmp_path, NAME, onnx_file)
    entries = scan(tmp_path)
    assert entries[NAME].versions[1].kind == "onnx"
    keras_clf = model_mod.load_version(entries["shapes"].versions[1], Settings())
    onnx_clf = model_mod.load_version(entries[NAME].versions[1], Settings())
    assert onnx_clf.input_size == keras_clf.input_size and onnx_clf.labels == keras_clf.labels
    files = list(labelled_files(200, seed=77))
    images = [decode_image(data, keras_clf.input_size, max_pixels=10**7) for _, data, _ in files]
    keras_probs = np.concatenate([keras_clf.predict(images[i : i + 32]) for i in range(0, 200, 32)])
    onnx_probs = np.concatenate([onnx_clf.predict(images[i : i + 32]) for i in range(0, 200, 32)])
    assert [keras_clf.labels[i] for i in keras_probs.argmax(1)] == [
        onnx_clf.labels[i] for i in onnx_probs.argmax(1)
    ]
    assert np.abs(keras_probs - onnx_probs).max() < 1e-4


def _exported_model(layers: list[Any]) -> Any:
    import keras

    model = keras.Sequential([keras.Input((8, 8, 3)), *layers])
    for layer in model.layers:  # statistics of its own, so that a BatchNormalization does something
        if type(layer).__name__ == "BatchNormalization":
            layer.set_weights(
                [np.random.default_rng(1).uniform(0.5, 2.0, w.shape) for w in layer.get_weights()]
            )
    return model


@pytest.mark.parametrize(
    "layers",
    [
        pytest.param(
            lambda k, size=size: [
                k.layers.Conv2D(4, size, padding="same"),
                k.layers.Flatten(),
                k.layers.Dense(5),
            ],
            id=f"same-{size}",
        )
        for size in (2, 3, 4)
    ]
    + [
        pytest.param(
            lambda k: [
                k.layers.Flatten(),
                k.layers.Dense(6),
                k.layers.BatchNormalization(),
                k.layers.Dense(5),
            ],
            id="batchnorm-after-dense",
        ),
        pytest.param(
            lambda k: [
                k.layers.Conv2D(4, 3),
                k.layers.Dense(6),
                k.layers.GlobalAveragePooling2D(),
                k.layers.Dense(5),
            ],
            id="dense-on-feature-maps",
        ),
    ],
)
def test_the_onnx_export_computes_what_keras_does(layers: Callable[[Any], list[Any]], tmp_path: Path) -> None:
    import keras
    import onnxruntime as ort

    from workers.onnx_export import export

    model = _exported_model(layers(keras))
    export(model, tmp_path / "model.onnx")
    x = np.random.default_rng(2).uniform(0, 255, (4, 8, 8, 3)).astype(np.float32)
    session = ort.InferenceSession(str(tmp_path / "model.onnx"), providers=["CPUExecutionProvider"])
    (got,) = session.run(None, {"images": x})
    want = np.asarray(model(x, training=False))
    assert np.abs(got - want).max() < 1e-3 * max(1.0, float(np.abs(want).max()))


@dataclass
class OnnxStack:
    url: str
    repo: Path
    worker: Service

    def models(self) -> dict[str, Any]:
        return {m["name"]: m for m in requests.get(f"{self.url}/v1/models", timeout=10).json()["models"]}


@pytest.fixture(scope="module")
def onnx_stack(
    onnx_file: Path,
    tmp_path_factory: pytest.TempPathFactory,
    artifacts: Path,
    wait_until: Callable[..., Any],
) -> Iterator[OnnxStack]:
    """The API and a worker serving only the ONNX model, TensorFlow unimportable in the worker."""
    repo = tmp_path_factory.mktemp("onnx-repo")
    _version(repo, NAME, onnx_file)
    with RedisServer() as server:
        settings = Settings.from_env(
            {},
            redis_url=server.url,
            models_dir=str(repo),
            model=NAME,
            api_port=free_port(),
            worker_metrics_port=free_port(),
            model_poll_s=0.5,
        )
        env = settings.to_env(include_secrets=True)
        api = Service("api", cli_argv("api", "--host", "127.0.0.1"), env)
        api.health_url = f"http://127.0.0.1:{settings.api_port}/healthz"
        log = artifacts / "onnx-worker.log"
        log.unlink(missing_ok=True)
        worker = Service("worker", [sys.executable, "-c", NO_TENSORFLOW, "worker"], env, log_path=str(log))
        sup = Supervisor([api, worker])
        sup.start()
        try:
            sup.wait_healthy(timeout=120)
            wait_for_workers(settings, timeout=120)
            stack = OnnxStack(f"http://127.0.0.1:{settings.api_port}", repo, worker)
            wait_until(
                lambda: NAME in (ms := stack.models()) and ms[NAME]["live_version"] == 1,
                timeout=120,
                interval=0.2,
                message="the ONNX model is live",
            )
            yield stack
        finally:
            sup.stop()


def test_a_worker_serving_only_onnx_runs_without_tensorflow(
    onnx_stack: OnnxStack, demo_model: Path, reference_labels: Any
) -> None:
    files = [(name, data) for name, data, _ in labelled_files(40, seed=5)]
    client = Client(onnx_stack.url, "")
    job = client.submit_files(files)
    client.wait(job.job_id, timeout=120, poll_s=0.2)
    rows = [row.model_dump(mode="json") for row in client.results(job.job_id)]
    assert [r["status"] for r in rows] == ["ok"] * len(files)
    assert {(r["model"], r["version"]) for r in rows} == {(NAME, 1)}
    # The Keras model file it was exported from, in this process: the same labels.
    assert [r["label"] for r in rows] == reference_labels(demo_model, files)
    # The only model file it has is model.onnx, and `import tensorflow` fails in its process.
    assert "Traceback" not in Path(onnx_stack.worker.log_path or "").read_text()


def _tensor_model(path: Path) -> None:
    """A valid ONNX model that is not an image classifier: a [batch, 10] input."""
    from onnx import TensorProto, helper, numpy_helper, save

    weights = numpy_helper.from_array(np.ones((10, 6), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "w"], ["y"])],
        "not_an_image_model",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 10])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 6])],
        [weights],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    save(model, path / "model.onnx")


def test_a_bad_onnx_file_is_refused_and_the_previous_version_stays(
    onnx_stack: OnnxStack, wait_until: Callable[..., Any]
) -> None:
    def add(version: int, write: Callable[[Path], None]) -> None:
        tmp = onnx_stack.repo / NAME / f".{version}.tmp"
        shutil.copytree(onnx_stack.repo / NAME / "1", tmp)
        write(tmp)
        os.rename(tmp, onnx_stack.repo / NAME / str(version))

    add(2, lambda p: (p / "model.onnx").write_bytes(b"this is not an ONNX model"))
    add(3, _tensor_model)

    def refused() -> bool:
        versions = {v["version"]: v for v in onnx_stack.models()[NAME]["versions"]}
        return all(versions.get(v, {}).get("status") == "failed" for v in (2, 3))

    wait_until(refused, timeout=60, interval=0.2, message="versions 2 and 3 refused")
    versions = {v["version"]: v for v in onnx_stack.models()[NAME]["versions"]}
    assert "not an ONNX model ONNX Runtime can load" in versions[2]["error"]
    assert "input 'x' is tensor(float) ['batch', 10]" in versions[3]["error"]
    assert onnx_stack.models()[NAME]["live_version"] == 1, "the live version stays"
    client = Client(onnx_stack.url, "")
    job = client.submit_files([(n, d) for n, d, _ in labelled_files(5, seed=6)])
    client.wait(job.job_id, timeout=60, poll_s=0.2)
    assert {(row.status, row.version) for row in client.results(job.job_id)} == {("ok", 1)}
