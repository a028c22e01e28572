"""Model loading: every supported form loads and predicts the same, with the right labels."""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

from batchvision.core.settings import Settings
from batchvision.core.synthetic import CLASSES, dataset


@pytest.fixture(scope="module")
def model_mod() -> ModuleType:
    """``workers.keras_model``, imported by the first test that needs it: TensorFlow takes seconds to
    import, which collecting the suite (``-m "not integration"`` included) must not pay."""
    return importlib.import_module("workers.keras_model")


def _predict(model_mod: ModuleType, settings: Settings) -> tuple[Any, np.ndarray]:
    clf = model_mod.load_classifier(settings)
    x, _ = dataset(12, clf.input_size, seed=5)
    return clf, np.stack(clf.predict(list(x)))


def test_demo_model_keras_file(model_mod: ModuleType, demo_model: Path) -> None:
    clf, probs = _predict(model_mod, Settings(model=str(demo_model)))
    assert clf.input_size == (48, 48)
    assert clf.labels == list(CLASSES)
    assert probs.shape == (12, len(CLASSES))
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    # The model against itself: a padded batch gives each image what it gets alone.
    x, _ = dataset(20, clf.input_size, seed=6)
    batched = np.stack(clf.predict(list(x)))
    alone = np.stack([clf.predict([image])[0] for image in x])
    assert np.allclose(batched, alone, atol=1e-4)
    assert (batched.argmax(axis=1) == alone.argmax(axis=1)).all()


def test_h5_and_savedmodel_give_the_same_predictions(
    model_mod: ModuleType, demo_model: Path, tmp_path: Path
) -> None:
    keras = importlib.import_module("keras")
    labels = tmp_path / "labels.txt"
    labels.write_text("\n".join(CLASSES) + "\n")
    _, expected = _predict(model_mod, Settings(model=str(demo_model)))
    model = keras.models.load_model(demo_model)
    h5 = tmp_path / "demo.h5"
    model.save(h5)
    _, from_h5 = _predict(model_mod, Settings(model=str(h5), labels=str(labels)))
    saved = tmp_path / "savedmodel"
    model.export(str(saved))
    clf, from_saved = _predict(model_mod, Settings(model=str(saved), labels=str(labels)))
    assert clf.labels == list(CLASSES)
    assert np.allclose(from_h5, expected, atol=1e-5)
    assert np.allclose(from_saved, expected, atol=1e-5)


def test_keras_application_by_name_with_imagenet_labels(model_mod: ModuleType) -> None:
    # weights=None: the real constructor and preprocessing, without a download
    clf = model_mod.load_classifier(Settings(model="mobilenet_v2", weights="none"))
    assert clf.input_size == (224, 224)
    assert clf.preprocess == "tf"
    assert len(clf.labels) == 1000 and clf.labels[0] == "tench" and clf.labels[999] == "toilet_tissue"
    out = clf.predict([np.zeros((224, 224, 3), np.uint8)] * 3)
    assert len(out) == 3 and out[0].shape == (1000,)


def test_unknown_model_is_a_clear_error(model_mod: ModuleType) -> None:
    with pytest.raises(FileNotFoundError, match="neither a known application"):
        model_mod.load_classifier(Settings(model="no_such_model"))
    with pytest.raises(FileNotFoundError, match="BATCHVISION_LABELS"):
        model_mod.load_classifier(Settings(model=__file__))


class _Download(Exception):
    """Raised where Keras would fetch weights over the network."""


def _no_download(fname: str, *args: Any, **kw: Any) -> str:
    raise _Download(fname)


# MobileNetV3 warns that its default input shape is assumed, as it does in the worker.
@pytest.mark.filterwarnings("ignore:`input_shape` is undefined:UserWarning")
@pytest.mark.parametrize(
    "name",
    ["mobilenet_v2", "mobilenet_v3_large", "resnet50", "efficientnet_b0", "inception_v3", "convnext_tiny"],
)
def test_each_applications_weights_file_is_the_one_keras_caches(
    model_mod: ModuleType, name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    from keras.src.utils import file_utils

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # an empty cache: Keras asks for its file
    monkeypatch.setattr(file_utils, "get_file", _no_download)
    app = model_mod.APPLICATIONS[name]
    with pytest.raises(_Download) as asked:
        model_mod.build_application(app, "imagenet")
    assert str(asked.value) == app.weights_file


@pytest.mark.parametrize("name", ["mobilenet_v2", "efficientnet_b0"])
def test_cached_imagenet_weights_build_the_network_keras_builds_without_a_download(
    model_mod: ModuleType, name: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The images bake the weights into KERAS_HOME and run with a read-only root: Keras' own
    lookup would find the cache not writable and download them again. The network must be the
    one Keras builds for ``"imagenet"`` (EfficientNet adds a layer only then)."""
    import h5py
    import keras
    from keras.src.legacy.saving import legacy_h5_format
    from keras.src.utils import file_utils

    app = model_mod.APPLICATIONS[name]
    constructor = getattr(keras.applications, app.constructor)
    cached = tmp_path / "models" / app.weights_file
    cached.parent.mkdir()
    with h5py.File(cached, "w") as f:  # random weights stand in for ImageNet's
        legacy_h5_format.save_weights_to_hdf5_group(f, constructor(weights=None))
    monkeypatch.setenv("KERAS_HOME", str(tmp_path))
    monkeypatch.setattr(file_utils, "get_file", _no_download)
    ours = model_mod.build_application(app, "imagenet")
    assert file_utils.get_file is _no_download  # Keras' download step is itself again
    # Keras' own path, where its cache is writable: get_file answers with the cached file.
    monkeypatch.setattr(file_utils, "get_file", lambda fname, *a, **kw: str(cached))
    theirs = constructor(weights="imagenet")
    assert [type(layer).__name__ for layer in ours.layers] == [
        type(layer).__name__ for layer in theirs.layers
    ]
    x = np.random.default_rng(0).uniform(0, 255, (2, app.size, app.size, 3)).astype(np.float32)
    np.testing.assert_allclose(ours.predict(x, verbose=0), theirs.predict(x, verbose=0), rtol=1e-5, atol=1e-6)
