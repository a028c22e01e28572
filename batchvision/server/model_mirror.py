"""A model repository in a bucket: ``BATCHVISION_MODELS_DIR=s3://bucket/models/`` in the layout
of a local one (``<name>/<version>/...``, see :mod:`batchvision.server.repository`), copied into
a local cache (``BATCHVISION_MODELS_CACHE_DIR``) that the repository is then read from like any
folder, so versions, reload requests and the watcher work as they do on disk.

Each look (a worker's start, a reload request, each tick of the watcher) lists the prefix once
and brings the cache in line with it:

- a version whose objects (keys, sizes, ETags) are the ones the cache copied last is left alone;
- a new or changed version is copied whole into a temporary folder (``.<version>.partial-*``,
  not a version name), each object checked by :meth:`~batchvision.server.s3.S3.download` (read
  on condition of the listed ETag, the listed size, the MD5 where the ETag is one) and given the
  object's modification time (so the watcher's settling delay applies as on disk), then renamed
  into place: a worker never loads half a version;
- a copy that fails keeps the cache's earlier copy of that version, if it has one (tried again
  at the next look), else the version is refused with the reason: the live version stays;
- versions and models gone from the bucket are removed from the cache.

What the cache holds is recorded in ``.batchvision-state/<model>.json``; an exclusive ``flock``
on ``.batchvision-lock`` keeps two processes (or threads) of a host from syncing one cache at once.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import uuid
from collections.abc import Collection, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from batchvision.core.model_refs import NAME_RE, RESERVED_NAMES
from batchvision.core.settings import Settings
from batchvision.server.s3 import S3, S3Error, S3Object, S3Url

log = logging.getLogger(__name__)

STATE_DIR = ".batchvision-state"
LOCK_FILE = ".batchvision-lock"
#: The files a model folder may hold beside its versions (shared by every version).
MODEL_FILES = ("labels.txt", "config.json")


def cache_dir(settings: Settings) -> Path:
    """The cache of ``settings.models_dir``: a folder per repository URL under
    ``MODELS_CACHE_DIR`` (default: the system's temporary directory)."""
    base = Path(settings.models_cache_dir or Path(tempfile.gettempdir()) / "batchvision-models")
    return base / hashlib.sha256(settings.models_dir.encode()).hexdigest()[:16]


@dataclass
class _Model:
    """One model's objects in the bucket: its shared files and its versions' files (by path
    relative to the version folder)."""

    files: dict[str, S3Object] = field(default_factory=dict)
    versions: dict[int, dict[str, S3Object]] = field(default_factory=dict)


def _signature(objects: dict[str, S3Object]) -> list[list[Any]]:
    return sorted([rel, o.size, o.etag] for rel, o in objects.items())


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    with open(path, "a+b") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


class ModelMirror:
    """The copy of the repository at ``source`` (an ``s3://`` folder) in the folder ``root``."""

    def __init__(self, source: S3Url, root: Path, s3: S3) -> None:
        self.source = source.folder
        self.root = root
        self.s3 = s3

    def sync(self, only: Collection[str] = ()) -> dict[str, dict[int, str]]:
        """Bring the cache in line with the bucket (``only``: these models, and only these are
        removed from the cache when the bucket no longer has them; every one when empty).
        Returns the versions that could not be copied and have no earlier copy, with the
        reason. Raises :class:`~batchvision.server.s3.S3Error` when the listing fails."""
        (self.root / STATE_DIR).mkdir(parents=True, exist_ok=True)
        with _locked(self.root / LOCK_FILE):
            remote = self._listing(only)
            problems: dict[str, dict[int, str]] = {}
            for name, model in remote.items():
                (self.root / name).mkdir(exist_ok=True)
                state = self._state(name)
                self._sync_files(name, model.files, state)
                for version, objects in sorted(model.versions.items()):
                    why = self._sync_version(name, version, objects, state)
                    if why is not None:
                        problems.setdefault(name, {})[version] = why
                self._prune_versions(name, set(model.versions), state)
                self._save_state(name, state)
            # Workers serving different WORKER_MODELS share one cache: a sync of some models
            # removes only those of them that left the bucket, never another worker's.
            wanted = set(only)
            for child in self.root.iterdir():
                if wanted and child.name not in wanted:
                    continue
                if child.is_dir() and not child.name.startswith(".") and child.name not in remote:
                    log.info("model %s is gone from %s: removed from the cache", child.name, self.source)
                    shutil.rmtree(child, ignore_errors=True)
                    (self.root / STATE_DIR / f"{child.name}.json").unlink(missing_ok=True)
            return problems

    # -- the bucket ----------------------------------------------------------------------------

    def _listing(self, only: Collection[str]) -> dict[str, _Model]:
        prefixes = [self.source.child(f"{name}/") for name in sorted(only)] or [self.source]
        out: dict[str, _Model] = {}
        for prefix in prefixes:
            for obj in self.s3.list(prefix):
                parts = obj.key[len(self.source.key) :].split("/")
                if len(parts) < 2 or any(p in ("", ".", "..") for p in parts):
                    continue  # a file beside the models, or a key no folder can hold
                name = parts[0]
                if not NAME_RE.match(name) or name in RESERVED_NAMES:
                    continue
                if len(parts) == 2 and parts[1] in MODEL_FILES:
                    out.setdefault(name, _Model()).files[parts[1]] = obj
                elif len(parts) > 2 and parts[1].isdigit() and int(parts[1]) >= 1:
                    versions = out.setdefault(name, _Model()).versions
                    versions.setdefault(int(parts[1]), {})["/".join(parts[2:])] = obj
                # anything else (a version being written under a temporary name...) is not copied
        return out

    def _copy(self, obj: S3Object, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.s3.download(S3Url(self.source.bucket, obj.key), path, obj)
        if obj.modified:
            os.utime(path, (obj.modified, obj.modified))

    # -- the cache -----------------------------------------------------------------------------

    def _state(self, name: str) -> dict[str, Any]:
        try:
            state = json.loads((self.root / STATE_DIR / f"{name}.json").read_text())
        except (OSError, ValueError):
            state = {}
        return {"files": state.get("files", {}), "versions": state.get("versions", {})}

    def _save_state(self, name: str, state: dict[str, Any]) -> None:
        path = self.root / STATE_DIR / f"{name}.json"
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, path)

    def _sync_files(self, name: str, files: dict[str, S3Object], state: dict[str, Any]) -> None:
        """The model folder's shared files, each replaced atomically (``os.replace``)."""
        for fname in MODEL_FILES:
            path = self.root / name / fname
            obj = files.get(fname)
            if obj is None:
                path.unlink(missing_ok=True)
                state["files"].pop(fname, None)
                continue
            if state["files"].get(fname) == [obj.size, obj.etag] and path.is_file():
                continue
            tmp = path.with_name(f".{fname}.partial-{uuid.uuid4().hex}")
            try:
                self._copy(obj, tmp)
            except (S3Error, OSError) as exc:
                tmp.unlink(missing_ok=True)
                log.warning("model %s: %s not copied (%s); the earlier copy stays", name, fname, exc)
                continue
            os.replace(tmp, path)
            state["files"][fname] = [obj.size, obj.etag]

    def _sync_version(
        self, name: str, version: int, objects: dict[str, S3Object], state: dict[str, Any]
    ) -> str | None:
        want = _signature(objects)
        final = self.root / name / str(version)
        had = state["versions"].get(str(version))
        if had == want and final.is_dir():
            return None
        tmp = final.with_name(f".{version}.partial-{uuid.uuid4().hex}")
        try:
            for rel, obj in objects.items():
                self._copy(obj, tmp / rel)
        except (S3Error, OSError) as exc:
            shutil.rmtree(tmp, ignore_errors=True)
            code = exc.code if isinstance(exc, S3Error) else "cache_write_failed"
            why = f"copying it from {self.source}{name}/{version}/ failed: {code}: {exc}"
            if had is not None and final.is_dir():
                log.warning("model %s version %d: %s; the earlier copy stays", name, version, why)
                return None
            shutil.rmtree(final, ignore_errors=True)  # a copy no state vouches for
            log.warning("model %s version %d refused: %s", name, version, why)
            return why
        old = final.with_name(f".{version}.old-{uuid.uuid4().hex}")
        if final.exists():
            os.rename(final, old)
        os.rename(tmp, final)
        state["versions"][str(version)] = want
        shutil.rmtree(old, ignore_errors=True)
        log.info(
            "model %s version %d copied from %s%s/%d/ (%d files, %d bytes)",
            name,
            version,
            self.source,
            name,
            version,
            len(objects),
            sum(o.size for o in objects.values()),
        )
        return None

    def _prune_versions(self, name: str, remote: set[int], state: dict[str, Any]) -> None:
        """Versions gone from the bucket, and what an interrupted sync left behind."""
        for child in (self.root / name).iterdir():
            if not child.is_dir():
                continue
            gone = child.name.isdigit() and int(child.name) not in remote
            if gone or ".partial-" in child.name or ".old-" in child.name:
                shutil.rmtree(child, ignore_errors=True)
        state["versions"] = {v: sig for v, sig in state["versions"].items() if int(v) in remote}
