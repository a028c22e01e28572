"""Loading repository versions with TensorFlow: a .keras file with its labels, a
SavedModel with the model folder's labels, a keras.applications entry, and the checks that
refuse a version (outputs that do not match the labels, an input size that contradicts the
model)."""

from __future__ import annotations

import importlib
import json
import shutil
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from batchvision.core.settings import Settings
from batchvision.core.synthetic import CLASSES, dataset
from batchvision.server.repository import scan


@pytest.fixture(scope="module")
def model_mod() -> ModuleType:
    return importlib.import_module("workers.keras_model")


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory, demo_model: Path) -> Path:
    root = tmp_path_factory.mktemp("repo")
    one = root / "shapes" / "1"
    one.mkdir(parents=True)
    shutil.copy(demo_model, one / "model.keras")
    (one / "labels.txt").write_text("\n".join(CLASSES) + "\n")
    keras = importlib.import_module("keras")
    saved = root / "shapes" / "2" / "export"
    keras.models.load_model(demo_model).export(str(saved))
    (root / "shapes" / "labels.txt").write_text("\n".join(CLASSES) + "\n")  # shared: v2 has none
    three = root / "shapes" / "3"
    shutil.copytree(one, three)
    (three / "labels.txt").write_text("circle\nsquare\n")
    four = root / "shapes" / "4"
    shutil.copytree(one, four)
    (four / "config.json").write_text(json.dumps({"input_size": [64, 64]}))
    app = root / "imagenet" / "1"
    app.mkdir(parents=True)
    (app / "config.json").write_text(json.dumps({"application": "mobilenet_v2", "weights": "none"}))
    return root


def test_file_and_savedmodel_versions_load_with_their_labels_and_agree(
    model_mod: ModuleType, repo: Path
) -> None:
    entry = scan(repo)["shapes"]
    settings = Settings()
    v1 = model_mod.load_version(entry.versions[1], settings)
    v2 = model_mod.load_version(entry.versions[2], settings)
    for clf in (v1, v2):
        assert clf.name == "shapes" and clf.labels == list(CLASSES) and clf.input_size == (48, 48)
    x, _ = dataset(8, (48, 48), seed=9)
    assert np.allclose(np.stack(v1.predict(list(x))), np.stack(v2.predict(list(x))), atol=1e-5)


def test_a_keras_application_is_a_model_entry(model_mod: ModuleType, repo: Path) -> None:
    clf = model_mod.load_version(scan(repo)["imagenet"].versions[1], Settings())
    assert clf.name == "imagenet" and clf.input_size == (224, 224) and len(clf.labels) == 1000
    assert clf.preprocess == "tf"


def test_versions_that_do_not_fit_their_labels_or_config_are_refused(
    model_mod: ModuleType, repo: Path
) -> None:
    entry = scan(repo)["shapes"]
    with pytest.raises(model_mod.ModelMismatch, match="outputs 6 classes but its labels file has 2 labels"):
        model_mod.load_version(entry.versions[3], Settings())
    with pytest.raises(ValueError, match="config input_size"):
        model_mod.load_version(entry.versions[4], Settings())
