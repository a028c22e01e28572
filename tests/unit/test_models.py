"""Several models, without processes: names and references, per-job options and
their checks, the repository on disk, the per-model queues, the client's and CLI's options."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from batchvision.core.model_refs import (
    InvalidOption,
    JobOptions,
    ModelFacts,
    ModelRef,
    check_name,
    model_name_of,
    resolve_options,
)
from batchvision.core.results import prediction
from batchvision.core.settings import Settings
from batchvision.server.repository import RepositoryError, parse_model_list, repository, scan, select
from batchvision.server.routing import bulk_queue, interactive_queue, model_queues, worker_queues

KNOWN = {
    "shapes": ModelFacts("shapes", live=2, versions={1: 6, 2: 6, 3: None}),
    "colours": ModelFacts("colours", live=1, versions={1: 6}),
}


def resolve(**kw: object) -> JobOptions:
    args: dict[str, object] = {"model": None, "top_k": None, "min_score": None}
    args.update(kw)
    return resolve_options(default_model="shapes", default_top_k=5, known=KNOWN, **args)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("spec", "name"),
    [
        ("mobilenet_v2", "mobilenet_v2"),
        ("models/demo.keras", "demo"),
        ("/srv/m/my.model.h5", "my-model"),
        ("/srv/exported/resnet_sm/", "resnet_sm"),
        ("py:standins:null", "null"),
        ("interactive", "interactive-model"),
    ],
)
def test_the_one_model_shortcut_is_named_after_its_spec(spec: str, name: str) -> None:
    assert model_name_of(spec) == name
    check_name(name)


def test_model_references_and_names() -> None:
    assert ModelRef.parse("shapes") == ModelRef("shapes", None)
    assert ModelRef.parse("shapes:12") == ModelRef("shapes", 12)
    assert str(ModelRef("shapes", 3)) == "shapes:3"
    for bad in ("", "a.b", "shapes:0", "shapes:x", "-x", "interactive", "a" * 65):
        with pytest.raises(ValueError):
            ModelRef.parse(bad)


def test_options_default_to_the_default_model_and_settings() -> None:
    assert resolve() == JobOptions("shapes", None, 5, 0.0)
    assert resolve(model="colours", top_k=6, min_score=0.25) == JobOptions("colours", None, 6, 0.25)
    assert resolve(model="shapes:1") == JobOptions("shapes", 1, 5, 0.0)
    # a version found on disk but not loaded yet may be pinned; its classes are unknown
    assert resolve(model="shapes:3", top_k=50).top_k == 50


def test_default_top_k_is_capped_at_the_models_classes() -> None:
    few = {"tiny": ModelFacts("tiny", live=1, versions={1: 3})}
    opts = resolve_options(
        model="tiny", top_k=None, min_score=None, default_model="tiny", default_top_k=5, known=few
    )
    assert opts.top_k == 3


@pytest.mark.parametrize(
    ("kw", "option", "allowed"),
    [
        ({"model": "nope"}, "model", ["colours", "shapes"]),
        ({"model": "bad name!"}, "model", ["colours", "shapes"]),
        ({"model": "shapes:9"}, "model", ["shapes:1", "shapes:2", "shapes:3"]),
        ({"top_k": 7}, "top_k", "1 to 6"),
        ({"top_k": 0}, "top_k", "1 to 6"),
        ({"model": "colours", "top_k": 7}, "top_k", "1 to 6"),
        ({"min_score": 1.5}, "min_score", "0 to 1"),
        ({"min_score": -0.1}, "min_score", "0 to 1"),
        ({"min_score": float("nan")}, "min_score", "0 to 1"),
    ],
)
def test_invalid_options_are_refused_naming_the_option_and_the_allowed_values(
    kw: dict[str, object], option: str, allowed: object
) -> None:
    with pytest.raises(InvalidOption) as info:
        resolve(**kw)
    err = info.value
    assert err.status == 422 and err.code == "invalid_option"
    (detail,) = err.details
    assert detail["field"] == option and detail["allowed"] == allowed
    assert option in err.message
    json.dumps(err.details, allow_nan=False)  # the error document is valid JSON


def test_the_default_model_is_accepted_before_any_worker_announced_it() -> None:
    opts = resolve_options(
        model=None, top_k=3, min_score=None, default_model="demo", default_top_k=5, known={}
    )
    assert opts == JobOptions("demo", None, 3, 0.0)
    with pytest.raises(InvalidOption, match="unknown model 'other'"):
        resolve_options(
            model="other", top_k=None, min_score=None, default_model="demo", default_top_k=5, known={}
        )


def test_options_round_trip_through_the_job_hash() -> None:
    opts = JobOptions("colours", 2, 3, 0.125)
    raw = {k.encode(): v.encode() for k, v in opts.to_hash().items()}
    assert JobOptions.from_hash(raw, "shapes", 5) == opts
    assert "scores" not in raw  # kept only where asked for
    kept = JobOptions("colours", None, 1, 0.0, scores=True)
    assert JobOptions.from_hash(kept.to_hash(), "shapes", 5) == kept
    # a job stored before options existed: its model was BATCHVISION_MODEL itself
    assert JobOptions.from_hash({"model": "/x/models/demo.keras"}, "demo", 5) == JobOptions(
        "demo", None, 5, 0.0
    )
    assert JobOptions.from_hash({}, "shapes", 4) == JobOptions("shapes", None, 4, 0.0)


def test_min_score_drops_classes_from_top_k_but_not_the_best() -> None:
    probs = np.array([0.05, 0.6, 0.3, 0.05], np.float32)
    labels = ["a", "b", "c", "d"]
    assert [s.label for s in prediction(probs, labels, 3).top_k] == ["b", "c", "a"]
    doc = prediction(probs, labels, 3, min_score=0.25)
    assert [s.label for s in doc.top_k] == ["b", "c"]
    doc = prediction(probs, labels, 3, min_score=0.9)
    assert doc.label == "b" and doc.top_k == ()
    assert len(prediction(probs, labels, 10).top_k) == 4  # never more than the classes


# -- the repository on disk ----------------------------------------------------------------------


def _version(root: Path, name: str, version: int | str, labels: int = 3, model: str = "model.keras") -> Path:
    d = root / name / str(version)
    d.mkdir(parents=True)
    if model:
        (d / model).write_bytes(b"not really a model")
    if labels:
        (d / "labels.txt").write_text("\n".join(f"c{i}" for i in range(labels)) + "\n")
    return d


def test_scan_finds_models_versions_labels_and_config(tmp_path: Path) -> None:
    _version(tmp_path, "shapes", 1)
    two = _version(tmp_path, "shapes", 2, labels=0, model="net.h5")
    (two / "net.labels.txt").write_text("x\ny\n")
    (tmp_path / "shapes" / "notes").mkdir()  # not a version
    (tmp_path / "shapes" / ".3.tmp").mkdir()  # a version being copied: not yet one
    saved = tmp_path / "colours" / "4" / "export"
    saved.mkdir(parents=True)
    (saved / "saved_model.pb").write_bytes(b"")
    (tmp_path / "colours" / "labels.txt").write_text("red\ngreen\n")  # shared by versions
    (tmp_path / "colours" / "config.json").write_text(
        json.dumps({"preprocess": "unit", "input_size": [32, 24]})
    )
    app = tmp_path / "imagenet" / "1"
    app.mkdir(parents=True)
    (app / "config.json").write_text(json.dumps({"application": "mobilenet_v2", "weights": "none"}))
    (tmp_path / "bad.name").mkdir()  # not a model name: ignored

    found = scan(tmp_path)
    assert sorted(found) == ["colours", "imagenet", "shapes"]
    shapes = found["shapes"]
    assert sorted(shapes.versions) == [1, 2] and shapes.latest == 2
    assert shapes.versions[1].kind == "file" and shapes.versions[1].labels.endswith("shapes/1/labels.txt")
    assert shapes.versions[2].labels.endswith("net.labels.txt")
    colours = found["colours"].versions[4]
    assert colours.kind == "savedmodel" and colours.source.endswith("export")
    assert colours.labels.endswith("colours/labels.txt")
    assert colours.preprocess == "unit" and colours.input_size == (32, 24)
    imagenet = found["imagenet"].versions[1]
    assert (imagenet.kind, imagenet.source, imagenet.weights, imagenet.labels) == (
        "application",
        "mobilenet_v2",
        "none",
        None,
    )


def test_scan_records_why_a_version_is_unusable(tmp_path: Path) -> None:
    _version(tmp_path, "m", 1)
    _version(tmp_path, "m", 2, labels=0)
    _version(tmp_path, "m", 3, model="")
    four = _version(tmp_path, "m", 4)
    (four / "other.keras").write_bytes(b"")
    five = _version(tmp_path, "m", 5)
    (five / "config.json").write_text("{not json")
    six = _version(tmp_path, "m", 6)
    (six / "config.json").write_text(json.dumps({"preprocess": "magic"}))
    entry = scan(tmp_path)["m"]
    assert sorted(entry.versions) == [1]
    assert "no labels.txt or model.labels.txt beside model.keras" in entry.problems[2]
    assert "expected exactly one model" in entry.problems[3] and "none" in entry.problems[3]
    assert "model.keras, other.keras" in entry.problems[4] or "other.keras, model.keras" in entry.problems[4]
    assert "not valid JSON" in entry.problems[5]
    assert "preprocess must be one of" in entry.problems[6]


def test_signature_changes_with_the_files(tmp_path: Path) -> None:
    d = _version(tmp_path, "m", 1)
    before = scan(tmp_path)["m"].versions[1].signature
    (d / "labels.txt").write_text("a\nb\nc\nd\n")
    assert scan(tmp_path)["m"].versions[1].signature != before


def test_batchvision_model_is_a_one_model_shortcut_or_names_the_default(tmp_path: Path) -> None:
    _version(tmp_path, "shapes", 1)
    alone = repository(Settings.from_env({}, model="models/demo.keras"))
    assert list(alone) == ["demo"] and alone["demo"].shortcut and alone["demo"].versions[1].kind == "shortcut"
    both = repository(Settings.from_env({}, models_dir=str(tmp_path), model="mobilenet_v2"))
    assert sorted(both) == ["mobilenet_v2", "shapes"] and both["mobilenet_v2"].shortcut
    named = repository(Settings.from_env({}, models_dir=str(tmp_path), model="shapes"))
    assert list(named) == ["shapes"] and not named["shapes"].shortcut
    with pytest.raises(RepositoryError, match="already has"):
        repository(Settings.from_env({}, models_dir=str(tmp_path), model="/elsewhere/shapes.keras"))
    with pytest.raises(RepositoryError, match="is not a folder"):
        repository(Settings.from_env({}, models_dir=str(tmp_path / "missing")))


def test_a_worker_selects_its_models(tmp_path: Path) -> None:
    _version(tmp_path, "shapes", 1)
    _version(tmp_path, "colours", 1)
    entries = repository(Settings.from_env({}, models_dir=str(tmp_path), model="shapes"))
    assert sorted(select(entries, [])) == ["colours", "shapes"]
    assert list(select(entries, parse_model_list(" colours, "))) == ["colours"]
    alone = repository(Settings.from_env({}, model="/srv/models/demo.keras"))
    assert list(select(alone, ["/srv/models/demo.keras"])) == ["demo"], "BATCHVISION_MODEL's spec names it"
    with pytest.raises(RepositoryError, match="no model 'squares'.*colours, shapes"):
        select(entries, ["squares"])


# -- queues ----------------------------------------------------------------------------------


def test_the_default_model_keeps_the_queue_names_and_others_get_their_own() -> None:
    s = Settings.from_env({}, model="shapes")
    assert (bulk_queue(s), interactive_queue(s)) == ("batchvision", "batchvision.interactive")
    assert (bulk_queue(s, "shapes"), interactive_queue(s, "shapes")) == (
        "batchvision",
        "batchvision.interactive",
    )
    assert (bulk_queue(s, "colours"), interactive_queue(s, "colours")) == (
        "batchvision.colours",
        "batchvision.colours.interactive",
    )
    # interactive queues first: a free worker thread takes a waiting small job of any model;
    # then the bulk queues by priority tier, highest first (the normal tier keeps the old name)
    assert worker_queues(s, ["shapes", "colours"]) == [
        "batchvision.interactive",
        "batchvision.colours.interactive",
        "batchvision.high",
        "batchvision.colours.high",
        "batchvision",
        "batchvision.colours",
        "batchvision.low",
        "batchvision.colours.low",
    ]
    queues = [q for pair in model_queues(s, ["shapes", "colours", "a", "b_c"]).values() for q in pair]
    assert len(set(queues)) == len(queues), "no two models share a queue"


def test_the_cli_computes_a_workers_models_from_the_repository(tmp_path: Path) -> None:
    from batchvision.cli.main import build_parser, worker_models

    _version(tmp_path, "shapes", 1)
    _version(tmp_path, "colours", 1)
    s = Settings.from_env({}, models_dir=str(tmp_path), model="shapes")
    assert worker_models(s, None) == ["colours", "shapes"]
    assert worker_models(s, "colours") == ["colours"]
    assert worker_models(s.replace(worker_models="shapes"), None) == ["shapes"]
    with pytest.raises(RepositoryError):
        worker_models(s, "squares")
    args = build_parser().parse_args(["worker", "--models", "colours,shapes"])
    assert args.models == "colours,shapes"
    args = build_parser().parse_args(
        ["submit", "x", "--model", "colours:2", "--top-k", "3", "--min-score", "0.5"]
    )
    assert (args.model, args.top_k, args.min_score) == ("colours:2", 3, 0.5)


def test_the_client_sends_options_as_query_parameters() -> None:
    from batchvision.client.http import job_options

    assert job_options() == {}
    assert job_options(model="colours", top_k=2, min_score=0.0) == {
        "model": "colours",
        "top_k": 2,
        "min_score": 0.0,
    }
    with pytest.raises(TypeError):
        job_options(modle="colours")  # type: ignore[call-arg]


def test_the_models_command_says_pinned_and_workers_by_version_in_words() -> None:
    from batchvision.cli.model_commands import describe
    from batchvision.core.model_documents import ModelInfo

    doc = {
        "name": "shapes",
        "default": True,
        "live_version": 1,
        "pinned_live_version": 1,
        "input_size": [64, 64],
        "classes": 4,
        "versions": [],
        "workers": 3,
        "workers_by_version": {"2": 1, "1": 2},
    }
    line = describe(ModelInfo.model_validate(doc))
    assert line == (
        "shapes (default): live version 1 (pinned: `reload --version latest` unpins), input 64x64, "
        "4 classes, 3 workers (2 on version 1, 1 on version 2)"
    )
    waiting = describe(ModelInfo.model_validate({**doc, "pinned_live_version": 3}))
    assert "live version 1 (pinned to 3, not live yet: `reload --version latest` unpins)" in waiting
    idle = describe(
        ModelInfo.model_validate({**doc, "pinned_live_version": None, "workers": 1, "workers_by_version": {}})
    )
    assert idle == "shapes (default): live version 1, input 64x64, 4 classes, 1 worker"
