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
