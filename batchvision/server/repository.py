"""The model repository on disk, in the layout Triton and TorchServe users know (files only:
nothing here imports TensorFlow; the workers load what it finds, the CLI reads its names)::

    MODELS_DIR/
      shapes/
        labels.txt             optional: labels shared by every version
        config.json            optional: settings shared by every version
        1/
          model.keras          one .keras / .h5 / .onnx file, or a SavedModel (saved_model.pb here or
          labels.txt           in one subfolder), or a config.json naming an application
        2/ ...
      mobilenet_v2/
        1/config.json          {"application": "mobilenet_v2"}: a keras.applications model

Versions are positive integers; the highest one that loads is live unless an operator points
the live version elsewhere (``POST /v1/models/<name>/reload`` with a version). ``config.json``
may set ``preprocess`` (the input scaling family), ``input_size`` (``[width, height]``, for a
model whose input size cannot be read from it), ``application`` and ``weights``. Labels: one per
line, in ``labels.txt`` or ``<model file stem>.labels.txt`` beside the model file, else the
model folder's ``labels.txt``; an application defaults to the ImageNet labels.

``BATCHVISION_MODEL`` keeps working as a one-model shortcut: a ``keras.applications`` name or a
path (or a ``py:`` plugin) is served as version 1 of a model named after it
(:func:`batchvision.core.model_refs.model_name_of`). When it is the name of a repository model, it
only says which model is the default.

To add a version without a worker ever seeing half of it, copy it under a temporary name (say
``.3.tmp``, which is not a version) and rename it to ``3`` (a rename is atomic).

``BATCHVISION_MODELS_DIR`` may be an ``s3://bucket/prefix/`` of the same layout: each look copies
what changed into a local cache first (:mod:`batchvision.server.model_mirror`), then reads the
cache; a version that could not be copied is refused with the reason.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchvision.core.model_refs import NAME_RE, RESERVED_NAMES, model_name_of
from batchvision.core.settings import Settings
from batchvision.server.model_mirror import ModelMirror, cache_dir
from batchvision.server.s3 import S3Config, S3Error, S3Url, is_s3_url, shared

MODEL_SUFFIXES = (".keras", ".h5", ".hdf5", ".onnx")
PREPROCESS = ("auto", "none", "tf", "caffe", "torch", "unit")
CONFIG_KEYS = frozenset({"preprocess", "input_size", "application", "weights"})


@dataclass(frozen=True)
class VersionDir:
    """One version of a model, as found on disk (not loaded)."""

    model: str
    version: int
    #: ``file`` (.keras/.h5), ``onnx`` (model.onnx, run by ONNX Runtime), ``savedmodel``,
    #: ``application`` (keras.applications), or
    #: ``shortcut`` (``BATCHVISION_MODEL``, loaded as the one-model setting always was).
    kind: str
    #: What the loader opens: a file or folder path, an application name, a ``py:`` spec.
    source: str
    labels: str | None = None
    preprocess: str = "auto"
    input_size: tuple[int, int] | None = None
    weights: str | None = None
    #: Changes when any file of the version changes (a failed version is retried then).
    signature: tuple[Any, ...] = ()
    #: Newest modification time of the version's files (a version still being written is left
    #: alone until it settles).
    mtime: float = 0.0


@dataclass
class ModelEntry:
    """A model of the repository: its usable versions, and why the others are not."""

    name: str
    versions: dict[int, VersionDir] = field(default_factory=dict)
    problems: dict[int, str] = field(default_factory=dict)
    #: The ``BATCHVISION_MODEL`` shortcut (one version, not in MODELS_DIR).
    shortcut: bool = False

    @property
    def latest(self) -> int | None:
        return max(self.versions) if self.versions else None


class RepositoryError(ValueError):
    """The repository cannot be used as configured (missing folder, name clash)."""


def repository(settings: Settings) -> dict[str, ModelEntry]:
    """Every model the configuration names: MODELS_DIR's models, plus ``BATCHVISION_MODEL`` as
    a one-model entry unless it is the name of one of them."""
    entries: dict[str, ModelEntry] = {}
    if is_s3_url(settings.models_dir):
        root, problems = _mirrored(settings)
        entries = scan(root)
        # A refusal names the bucket's location, which the operator knows, not the local copy.
        local, remote = f"{root}/", settings.models_dir.rstrip("/") + "/"
        for entry in entries.values():
            entry.problems = {v: why.replace(local, remote) for v, why in entry.problems.items()}
        for name, refused in problems.items():
            entries.setdefault(name, ModelEntry(name)).problems.update(refused)
    elif settings.models_dir:
        root = Path(settings.models_dir)
        if not root.is_dir():
            raise RepositoryError(f"BATCHVISION_MODELS_DIR={settings.models_dir!r} is not a folder")
        entries = scan(root)
    if settings.model in entries:
        return entries
    shortcut = shortcut_entry(settings)
    if shortcut.name in entries:
        raise RepositoryError(
            f"BATCHVISION_MODEL={settings.model!r} would be served as {shortcut.name!r}, a name the "
            f"repository {settings.models_dir!r} already has: set BATCHVISION_MODEL={shortcut.name}"
        )
    entries[shortcut.name] = shortcut
    return entries


def _mirrored(settings: Settings) -> tuple[Path, dict[str, dict[int, str]]]:
    """The local copy of an ``s3://`` repository, brought up to date (only the models
    ``BATCHVISION_WORKER_MODELS`` names, when it names some), and the versions it could not copy."""
    only = [n for n in parse_model_list(settings.worker_models) if NAME_RE.match(n)]
    try:
        s3 = shared(S3Config.from_settings(settings))
        mirror = ModelMirror(S3Url.parse(settings.models_dir), cache_dir(settings), s3)
        return mirror.root, mirror.sync(only)
    except S3Error as exc:
        raise RepositoryError(f"BATCHVISION_MODELS_DIR={settings.models_dir!r}: {exc.message}") from exc


def shortcut_entry(settings: Settings) -> ModelEntry:
    """``BATCHVISION_MODEL`` as a model of one version (version 1)."""
    spec = settings.model
    name = model_name_of(spec)
    path = Path(spec)
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    # Loaded exactly as before the repository existed (workers.keras_model.load_classifier(settings)).
    version = VersionDir(
        model=name,
        version=1,
        kind="shortcut",
        source=spec,
        labels=settings.labels or None,
        preprocess=settings.preprocess,
        weights=settings.weights,
        signature=_signature(files),
        mtime=max((_mtime(f) for f in files), default=0.0),
    )
    return ModelEntry(name, {1: version}, shortcut=True)


def scan(root: Path) -> dict[str, ModelEntry]:
    """The models under ``root`` (folders with a valid name; anything else is ignored)."""
    out: dict[str, ModelEntry] = {}
    for model_dir in sorted(p for p in root.iterdir() if p.is_dir()):
        name = model_dir.name
        if not NAME_RE.match(name) or name in RESERVED_NAMES:
            continue
        entry = ModelEntry(name)
        try:
            shared, shared_error = _read_config(model_dir / "config.json"), ""
        except ValueError as exc:
            shared, shared_error = {}, str(exc)
        for version_dir in sorted(p for p in model_dir.iterdir() if p.is_dir()):
            if not version_dir.name.isdigit() or int(version_dir.name) < 1:
                continue  # not a version: a temporary copy, notes, ...
            version = int(version_dir.name)
            try:
                if shared_error:
                    raise ValueError(shared_error)
                entry.versions[version] = _version(name, version, version_dir, shared)
            except (OSError, ValueError) as exc:
                entry.problems[version] = str(exc)
        out[name] = entry
    return out


def select(entries: Mapping[str, ModelEntry], wanted: Iterable[str]) -> dict[str, ModelEntry]:
    """The entries a worker serves: ``wanted`` names (all when empty); an unknown name is a
    :class:`RepositoryError` that lists the known ones."""
    # A name, or what BATCHVISION_MODEL says (a path, an application): the model it is served as.
    names = [w if w in entries else model_name_of(w) for w in wanted if w]
    if not names:
        return dict(entries)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise RepositoryError(
            f"no model {', '.join(map(repr, unknown))} in the repository: it has {', '.join(sorted(entries))}"
        )
    return {n: entries[n] for n in names}


def parse_model_list(text: str) -> list[str]:
    """``a,b`` -> ``["a", "b"]`` (``BATCHVISION_WORKER_MODELS``, ``--models``)."""
    return [n.strip() for n in text.split(",") if n.strip()]


def _version(name: str, version: int, path: Path, shared: dict[str, Any]) -> VersionDir:
    config = {**shared, **_read_config(path / "config.json")}
    files = sorted(p for p in path.rglob("*") if p.is_file())
    common = {
        "model": name,
        "version": version,
        "preprocess": config.get("preprocess", "auto"),
        "input_size": _input_size(config.get("input_size")),
        "weights": config.get("weights"),
        "signature": _signature(files),
        "mtime": max((_mtime(f) for f in files), default=_mtime(path)),
    }
    if "application" in config:
        labels = _labels(path, None)
        return VersionDir(kind="application", source=str(config["application"]), labels=labels, **common)
    model_files = [p for p in path.iterdir() if p.is_file() and p.suffix in MODEL_SUFFIXES]
    saved = [p.parent for p in (path / "saved_model.pb", *path.glob("*/saved_model.pb")) if p.is_file()]
    if len(model_files) + len(saved) != 1:
        found = ", ".join(p.name for p in [*model_files, *saved]) or "none"
        raise ValueError(
            f"{path}: expected exactly one model (a .keras/.h5/.onnx file, a SavedModel folder, or a "
            f"config.json with an application); found {found}"
        )
    if model_files:
        source, kind = model_files[0], "onnx" if model_files[0].suffix == ".onnx" else "file"
    else:
        source, kind = saved[0], "savedmodel"
    labels = _labels(path, source if kind != "savedmodel" else None)
    if labels is None:
        beside = f" or {source.stem}.labels.txt beside {source.name}" if kind != "savedmodel" else ""
        raise ValueError(
            f"{path}: no labels.txt{beside} (one label per line) for this version, "
            "nor a labels.txt for its model"
        )
    return VersionDir(kind=kind, source=str(source), labels=labels, **common)


def _labels(version_dir: Path, model_file: Path | None) -> str | None:
    candidates = [version_dir / "labels.txt"]
    if model_file is not None:
        candidates.append(model_file.with_name(model_file.stem + ".labels.txt"))
    candidates.append(version_dir.parent / "labels.txt")
    return next((str(c) for c in candidates if c.is_file()), None)


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{path}: must hold a JSON object")
    unknown = set(config) - CONFIG_KEYS
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(CONFIG_KEYS)}")
    if config.get("preprocess", "auto") not in PREPROCESS:
        raise ValueError(f"{path}: preprocess must be one of {', '.join(PREPROCESS)}")
    _input_size(config.get("input_size"), path)
    return config


def _input_size(value: Any, where: Path | None = None) -> tuple[int, int] | None:
    if value is None:
        return None
    if (
        isinstance(value, list)
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 8192 for v in value)
    ):
        return (value[0], value[1])
    raise ValueError(f"{where or 'config.json'}: input_size must be [width, height] (1 to 8192)")


def _signature(files: list[Path]) -> tuple[Any, ...]:
    out = []
    for f in files:
        try:
            st = f.stat()
        except OSError:
            continue
        out.append((str(f), st.st_size, st.st_mtime_ns))
    return tuple(out)


def _mtime(path: Path) -> float:
    try:
        return path.stat().st_mtime
    except OSError:
        return 0.0
