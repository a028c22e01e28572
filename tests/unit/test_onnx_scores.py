"""ONNX models' scores: probabilities or logits is decided once per model, never per batch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from batchvision.core.classifier import probe_images
from workers.keras_model import ModelMismatch, check_outputs
from workers.onnx_model import OnnxClassifier

CLASSES = 1000


def _model(path: Path, *, tail: str) -> Path:
    """[N, 8, 8, 3] -> mean colour -> 1000 scores: ``tail`` "bf16-softmax" (probabilities that
    went through bfloat16: rows sum to 1 only within a few thousandths), "logits", or
    "batch-of-one" (a Reshape to [1, -1]: works for one image only)."""
    rng = np.random.default_rng(1)
    weights = numpy_helper.from_array(rng.normal(0, 20, (3, CLASSES)).astype(np.float32), "w")
    shape = numpy_helper.from_array(np.array([1, -1], np.int64), "shape")
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], axes=[1, 2], keepdims=0)]
    if tail == "batch-of-one":
        nodes.append(helper.make_node("Reshape", ["mean", "shape"], ["flat"]))
        nodes.append(helper.make_node("MatMul", ["flat", "w"], ["y"]))
    else:
        nodes.append(helper.make_node("MatMul", ["mean", "w"], ["logits"]))
    if tail == "bf16-softmax":
        nodes += [
            helper.make_node("Softmax", ["logits"], ["p"], axis=1),
            helper.make_node("Cast", ["p"], ["p16"], to=TensorProto.BFLOAT16),
            helper.make_node("Cast", ["p16"], ["y"], to=TensorProto.FLOAT),
        ]
    elif tail == "logits":
        nodes.append(helper.make_node("Identity", ["logits"], ["y"]))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
        [weights, shape],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(model, path / "model.onnx")
    return path / "model.onnx"


def _classifier(path: Path) -> OnnxClassifier:
    clf = OnnxClassifier(path, [f"c{i}" for i in range(CLASSES)], "unit", "m", threads=1)
    check_outputs(clf)  # as the worker loads every version
    return clf


def _images(n: int) -> list[np.ndarray]:
    rng = np.random.default_rng(2)
    return [rng.integers(0, 256, (8, 8, 3), dtype=np.uint8) for _ in range(n)]


@pytest.mark.parametrize("tail", ["bf16-softmax", "logits"])
def test_an_images_scores_do_not_depend_on_its_batch(tmp_path: Path, tail: str) -> None:
    clf = _classifier(_model(tmp_path, tail=tail))
    images = _images(32)
    together = clf.predict(images)
    for image, scores in zip(images, together, strict=True):
        (alone,) = clf.predict([image])
        np.testing.assert_allclose(alone, scores, atol=1e-4)
        assert abs(float(scores.sum()) - 1.0) < 1e-2


def test_probabilities_in_half_precision_are_not_softmaxed_again(tmp_path: Path) -> None:
    clf = _classifier(_model(tmp_path, tail="bf16-softmax"))
    best = max(float(s.max()) for s in clf.predict(_images(32)))
    # A second softmax over 1,000 classes would flatten every score to about 1/1000.
    assert best > 0.1


def test_a_model_that_takes_one_image_at_a_time_is_refused_at_load(tmp_path: Path) -> None:
    clf = OnnxClassifier(_model(tmp_path, tail="batch-of-one"), ["a"] * CLASSES, "unit", "m", threads=1)
    (one,) = clf.predict(probe_images(clf.input_size)[:1])
    assert one.shape == (CLASSES,)
    with pytest.raises(ModelMismatch, match="batch of 4 images"):
        check_outputs(clf)


def test_a_uint8_model_with_a_preprocess_it_cannot_have_is_refused(tmp_path: Path) -> None:
    from workers.onnx_model import OnnxModelError

    nodes = [helper.make_node("Cast", ["x"], ["f"], to=TensorProto.FLOAT)]
    nodes.append(helper.make_node("ReduceMean", ["f"], ["y"], axes=[1, 2], keepdims=0))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.UINT8, ["N", 8, 8, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    with pytest.raises(OnnxModelError, match='preprocess "caffe" cannot apply'):
        OnnxClassifier(tmp_path / "m.onnx", ["r", "g", "b"], "caffe", "m", threads=1)
    assert OnnxClassifier(tmp_path / "m.onnx", ["r", "g", "b"], "none", "m", threads=1).input_size == (8, 8)


def test_padded_batches_run_the_few_sizes_and_give_the_same_scores(tmp_path: Path) -> None:
    # On a GPU (pad=True here) batches are padded to the buckets, as the Keras runner pads them.
    path = _model(tmp_path, tail="logits")
    labels = [f"c{i}" for i in range(CLASSES)]
    plain = OnnxClassifier(path, labels, "unit", "m", threads=1, pad=False)
    padded = OnnxClassifier(path, labels, "unit", "m", threads=1, pad=True, max_batch_size=32)
    assert padded.buckets == (1, 2, 4, 8, 12, 16, 20, 24, 28, 32) and plain.buckets == ()
    seen: list[int] = []
    run = padded._session.run

    def recording(outputs: Any, feeds: dict[str, np.ndarray]) -> Any:
        seen.append(len(next(iter(feeds.values()))))
        return run(outputs, feeds)

    padded._session = type("Recording", (), {"run": staticmethod(recording)})()
    images = _images(13)
    got = padded.predict(images)
    assert seen == [16] and len(got) == 13
    np.testing.assert_allclose(np.stack(got), np.stack(plain.predict(images)), atol=1e-4)
    seen.clear()
    padded.warm_up()
    assert seen == list(padded.buckets)


def test_a_model_for_batches_of_one_passes_where_batches_are_one(tmp_path: Path) -> None:
    clf = OnnxClassifier(_model(tmp_path, tail="batch-of-one"), ["a"] * CLASSES, "unit", "m", threads=1)
    check_outputs(clf, max_batch_size=1)  # BATCHVISION_MAX_BATCH_SIZE=1: it never sees more


def test_a_batch_that_fails_for_the_moment_is_not_held_against_the_model(tmp_path: Path) -> None:
    from workers.manager import _passing

    class ResourceExhaustedError(Exception):  # TensorFlow's, by name
        pass

    clf = _classifier(_model(tmp_path, tail="logits"))
    one_at_a_time = clf.predict

    def tight(images: list[np.ndarray]) -> list[np.ndarray]:
        if len(images) > 1:
            raise ResourceExhaustedError("OOM when allocating tensor with shape[4,8,8,3]")
        return one_at_a_time(images)

    clf.predict = tight  # type: ignore[method-assign]
    with pytest.raises(ModelMismatch) as info:
        check_outputs(clf)
    assert _passing(info.value)  # the load is tried again later, the version not marked failed


def test_the_scores_decision_waits_for_rows_of_numbers() -> None:
    from batchvision.core.classifier import Scores

    scores = Scores()
    probabilities = np.array([[0.2, 0.8], [np.nan, np.nan]], np.float32)
    np.testing.assert_array_equal(scores(probabilities)[0], probabilities[0])
    assert scores.probabilities is True
    undecided = Scores()
    undecided(np.full((2, 2), np.nan, np.float32))
    assert undecided.probabilities is None
