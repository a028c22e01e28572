"""Serving the models of one worker process: the live version of each model it serves, new
versions loaded in the background and switched in between two batches. What the worker tells
the registry and hears from it (announcements, heartbeat, watcher, reload requests) is
:mod:`workers.reporting`, which follows this manager through :class:`ModelEvents`.

- Each model has its own lane (:class:`ModelLane`): a batcher whose model thread takes the live
  version once, at the start of each batch, and tags every output with it. A switch is one
  assignment (``served.live = new``): the batch running keeps the version it started with, the
  next one runs on the new one, so no batch mixes versions and none is lost or run twice. A job
  pinned to a version (``model=name:3``) gets a lane of that version.
- A new version is loaded, warmed up and checked (one probability per label) in the loader
  thread before it may go live; a version that fails is refused with the reason (in the
  registry and the log) and the live one stays. It is retried only once its files change.
- Triggers: :meth:`ModelManager.request` (the watcher and reload requests of
  :mod:`workers.reporting`), and the operator's live pointer (rollback), read at each look.
- Pinned lanes are unloaded when unused: at most :data:`MAX_PINNED` per model, the least
  recently used closed first, and any idle for :data:`PINNED_IDLE_S`.
"""

from __future__ import annotations

import errno
import logging
import math
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from PIL import Image

from batchvision.core.batching import BatchInfo, DynamicBatcher
from batchvision.core.classifier import ImageClassifier
from batchvision.core.errors import BatchvisionError
from batchvision.core.model_refs import JobOptions
from batchvision.core.results import Prediction, prediction
from batchvision.core.settings import Settings
from batchvision.server import failpoints, tracing
from batchvision.server.registry import FAILED, READY
from batchvision.server.repository import (
    ModelEntry,
    RepositoryError,
    VersionDir,
    parse_model_list,
    repository,
    select,
)

log = logging.getLogger(__name__)

Loader = Callable[[VersionDir, Settings], ImageClassifier]
#: A version folder changed less than this long ago may still be being written: the watcher
#: leaves it for its next look (a reload request does not wait).
SETTLE_S = 1.0
#: A version whose load fails for the moment is tried again after this, doubled each time
#: up to RETRY_CAP_S; after RETRY_TRIES failures in a row it is refused as if for good (until
#: its files change): a version too large for the device beside the live one stays too large.
RETRY_FIRST_S = 5.0
RETRY_CAP_S = 300.0
RETRY_TRIES = 6
#: Pinned versions (``model=name:N``) kept loaded per model; the least recently used goes first.
MAX_PINNED = 2
#: A pinned version unused this long is unloaded.
PINNED_IDLE_S = 300.0
#: A pinned lane asked for less than this long ago may still be about to get images: it is
#: not unloaded to make room (a new pinned version is refused instead while all are this fresh).
PINNED_GRACE_S = 60.0


@dataclass(frozen=True)
class Loaded:
    """One loaded, checked version of a model."""

    model: str
    version: int
    classifier: ImageClassifier
    load_s: float
    #: its files when it was loaded (:attr:`VersionDir.signature`): changed in place, it loads again
    signature: tuple[Any, ...] = ()


@dataclass(frozen=True)
class Scored:
    """One image's output, with the model version that produced it."""

    probs: np.ndarray
    model: str
    version: int
    labels: Sequence[str]


def fit(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """``image`` at ``size`` (width, height): images decoded for the version live before a
    switch that changed the input size."""
    w, h = size
    if image.shape[0] == h and image.shape[1] == w:
        return image
    return np.asarray(Image.fromarray(image).resize((w, h), Image.Resampling.BILINEAR))


class ModelLane:
    """One batcher over one model: the live lane reads the live version at the start of every
    batch, a pinned lane always runs its one version."""

    def __init__(
        self,
        model: str,
        current: Callable[[], Loaded],
        settings: Settings,
        on_batch_for: Callable[[ModelLane], Callable[[BatchInfo], None]] | None = None,
        pinned: int | None = None,
    ) -> None:
        self.model = model
        self.pinned = pinned
        self._current = current
        #: The version of the batch running or run last (read by the batch hook).
        self.last: Loaded | None = None
        #: When the lane was last asked for (pinned lanes are unloaded when unused).
        self.used = time.monotonic()
        name = f"model-{model}" if pinned is None else f"model-{model}-v{pinned}"
        self.batcher: DynamicBatcher[np.ndarray, Scored] = DynamicBatcher(
            self._predict,
            max_batch_size=settings.max_batch_size,
            max_delay_s=settings.max_batch_delay_ms / 1000.0,
            adaptive_max_s=settings.adaptive_batch_wait_ms / 1000.0,
            on_batch=on_batch_for(self) if on_batch_for is not None else None,
            on_submit=tracing.submit_hook(),
            name=name,
        )

    @property
    def input_size(self) -> tuple[int, int]:
        return self._current().classifier.input_size

    @property
    def version(self) -> int:
        return self._current().version

    def _predict(self, images: list[np.ndarray]) -> list[Scored]:
        loaded = self._current()  # once per batch: the whole batch runs on this version
        self.last = loaded
        failpoints.before_batch()
        size = loaded.classifier.input_size
        probs = loaded.classifier.predict([fit(image, size) for image in images])
        labels = loaded.classifier.labels
        return [Scored(p, loaded.model, loaded.version, labels) for p in probs]

    def result(self, output: Scored, options: JobOptions) -> Prediction:
        doc = prediction(output.probs, output.labels, options.top_k, options.min_score, scores=options.scores)
        return doc.with_model(output.model, output.version)

    def close(self) -> None:
        self.batcher.close()


@dataclass
class ServedModel:
    """A model this worker serves."""

    name: str
    entry: ModelEntry
    live: Loaded
    lane: ModelLane | None = None
    #: version -> its lane, least recently used first
    pinned: OrderedDict[int, ModelLane] = field(default_factory=OrderedDict)
    #: version -> the lane of a pinned version being loaded now (outside :attr:`lock`); those
    #: who ask for it meanwhile wait for this one load
    loading: dict[int, Future[ModelLane]] = field(default_factory=dict)
    #: version -> (the files' signature when it failed, the reason)
    failed: dict[int, tuple[tuple[Any, ...], str]] = field(default_factory=dict)
    #: version -> what the registry shows of a version that loaded
    ready: dict[int, dict[str, Any]] = field(default_factory=dict)
    #: version -> (its files' signature, failures in a row, not to be tried before: monotonic
    #: seconds) of a version whose loads failed for the moment, or whose files, changed in
    #: place while it was live, were refused (never before they change again)
    retry: dict[int, tuple[tuple[Any, ...], int, float]] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)


class ModelEvents(Protocol):
    """What the serving side tells whoever reports it (:class:`workers.reporting.ModelReporter`)."""

    def versions_seen(self, served: ServedModel) -> None:
        """The model's version folders were looked at (new, changed or gone ones)."""

    def version_state(self, served: ServedModel, version: int, status: str, facts: dict[str, Any]) -> None:
        """A version loaded (``ready``, with its facts) or was refused (``failed``, ``error``)."""

    def live_changed(self, served: ServedModel) -> None:
        """Another version went live."""


def _live_of(served: ServedModel) -> Callable[[], Loaded]:
    return lambda: served.live


def _default_loader(version: VersionDir, settings: Settings) -> ImageClassifier:
    from workers.keras_model import load_version

    return load_version(version, settings)


#: Load failures of the moment (device memory taken, a file system that did not answer), by
#: type name for TensorFlow's: not remembered against the version, unlike a model that is wrong.
PASSING_LOAD_ERRORS = frozenset({"ResourceExhaustedError", "UnavailableError", "DeadlineExceededError"})


#: File system errors of the moment (an NFS server that did not answer, a busy device); a
#: missing or unreadable file (FileNotFoundError, PermissionError...) is the version's own.
PASSING_ERRNOS = frozenset(
    {errno.EIO, errno.ETIMEDOUT, errno.ESTALE, errno.EAGAIN, errno.EBUSY, errno.ENOMEM}
)


def _passing(exc: BaseException | None) -> bool:
    """A failure of the moment, or one caused by one (the load check wraps what it met)."""
    if exc is None:
        return False
    # JAX (XlaRuntimeError) and ONNX Runtime name device memory exhaustion only in the text.
    text = str(exc)
    return (
        isinstance(exc, MemoryError | TimeoutError)
        or (isinstance(exc, OSError) and exc.errno in PASSING_ERRNOS)
        or type(exc).__name__ in PASSING_LOAD_ERRORS
        or "RESOURCE_EXHAUSTED" in text
        or "out of memory" in text.lower()
        or _passing(exc.__cause__)
    )


def _reason(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"{type(exc).__name__}: {text}"[:500]


class PinnedLanes:
    """The lanes of pinned versions (``model=name:N``), kept in each model's
    :attr:`ServedModel.pinned`: made on first use, at most ``max_pinned`` per model (the least
    recently used is unloaded to make room; a new one is refused while every one was asked for
    within :data:`PINNED_GRACE_S`, as a chunk may be decoding for it), and unloaded when unused
    for ``idle_s``."""

    def __init__(
        self,
        settings: Settings,
        load: Callable[[ServedModel, int], Loaded],
        on_batch_for: Callable[[ModelLane], Callable[[BatchInfo], None]] | None,
        max_pinned: int,
        idle_s: float,
    ) -> None:
        self.settings = settings
        self._load = load
        self._on_batch_for = on_batch_for
        self.max_pinned = max(1, max_pinned)
        self.idle_s = max(idle_s, PINNED_GRACE_S)
        self.closed = False  # the worker is stopping: no new lane

    def lane(self, served: ServedModel, version: int) -> ModelLane:
        # The load runs outside the model's lock: a version that takes a minute to load must
        # not hold up the lanes of the model's other versions, nor the idle sweep.
        mine: Future[ModelLane] = Future()
        with served.lock:
            if self.closed:
                raise self._stopping(served, version)
            lane = served.pinned.get(version)
            if lane is not None:
                return self._touch(served, version, lane)
            loading = served.loading.get(version)
            if loading is None:
                self._make_room(served)
                served.loading[version] = mine
        if loading is not None:
            lane = loading.result()  # its load's error, if it fails
            with served.lock:
                return self._touch(served, version, lane)
        try:
            live = served.live
            loaded = live if live.version == version else self._load(served, version)
            lane = ModelLane(served.name, _fixed(loaded), self.settings, self._on_batch_for, pinned=version)
        except BaseException as exc:
            with served.lock:
                del served.loading[version]
            mine.set_exception(exc)  # those waiting for this load get its error
            raise
        with served.lock:
            del served.loading[version]
            kept = not self.closed
            if kept:
                served.pinned[version] = lane
                self._touch(served, version, lane)
        if not kept:  # the worker stopped while it loaded: nothing else would close this lane
            stopping = self._stopping(served, version)
            try:
                lane.close()
            finally:
                mine.set_exception(stopping)
            raise stopping
        mine.set_result(lane)
        return lane

    @staticmethod
    def _stopping(served: ServedModel, version: int) -> BatchvisionError:
        return BatchvisionError(
            f"this worker is stopping: model {served.name} version {version} is not served "
            "any more; retry these images later (POST /v1/jobs/{id}/retry)",
            code="model_busy",
        )

    @staticmethod
    def _touch(served: ServedModel, version: int, lane: ModelLane) -> ModelLane:
        """Mark ``lane`` used now (the caller holds ``served.lock``)."""
        if served.pinned.get(version) is lane:
            served.pinned.move_to_end(version)
        lane.used = time.monotonic()
        return lane

    def _make_room(self, served: ServedModel) -> None:
        now = time.monotonic()
        # A version being loaded takes its room from the start.
        while len(served.pinned) + len(served.loading) >= self.max_pinned:
            if not served.pinned:
                raise self._busy(served)
            version, lane = next(iter(served.pinned.items()))
            # In use: asked for lately, or a task is feeding it now (its decoding or fetching
            # may take longer than the grace: `used` is set when the task takes the lane).
            if now - lane.used < PINNED_GRACE_S or lane.batcher.in_use():
                raise self._busy(served)
            self._unload(served, version, "limit")

    def _busy(self, served: ServedModel) -> BatchvisionError:
        held = len(served.pinned) + len(served.loading)
        return BatchvisionError(
            f"this worker already serves {held} pinned versions of model "
            f"{served.name} in use (at most {self.max_pinned}): retry these images later "
            "(POST /v1/jobs/{id}/retry)",
            code="model_busy",
        )

    def unload_idle(self, models: Iterable[ServedModel], now: float | None = None) -> list[tuple[str, int]]:
        """Unload the lanes unused for ``idle_s``; returns ``(model, version)`` of each."""
        now = time.monotonic() if now is None else now
        gone: list[tuple[str, int]] = []
        for served in models:
            with served.lock:
                for version, lane in list(served.pinned.items()):
                    if now - lane.used >= self.idle_s and not lane.batcher.in_use():
                        self._unload(served, version, "idle")
                        gone.append((served.name, version))
        return gone

    @staticmethod
    def _unload(served: ServedModel, version: int, why: str) -> None:
        # The batcher runs what it holds before its thread ends: no queued image is lost.
        lane = served.pinned.pop(version)
        lane.close()
        log.info("model %s: pinned version %d unloaded (%s)", served.name, version, why)


def _fixed(loaded: Loaded) -> Callable[[], Loaded]:
    return lambda: loaded


class ModelManager:
    """The models of this worker, their lanes, their versions; see the module doc."""

    def __init__(
        self,
        settings: Settings,
        *,
        pointer: Callable[[str], int | None] | None = None,
        on_batch_for: Callable[[ModelLane], Callable[[BatchInfo], None]] | None = None,
        on_switch: Callable[[str, int, float | None], None] | None = None,
        loader: Loader | None = None,
        max_pinned: int = MAX_PINNED,
        pinned_idle_s: float = PINNED_IDLE_S,
        sweep_s: float = PINNED_GRACE_S / 2,
    ) -> None:
        """``pointer(name)``: the live version the operator chose (``None``: the newest);
        ``sweep_s``: how often the loader thread unloads pinned versions unused for long."""
        self.settings = settings
        self._pointer_of = pointer
        self._loader = loader or _default_loader
        self._on_batch_for = on_batch_for
        self._on_switch = on_switch
        self.pinned = PinnedLanes(settings, self._load_pinned, on_batch_for, max_pinned, pinned_idle_s)
        self.models: dict[str, ServedModel] = {}
        self.listeners: list[ModelEvents] = []
        self._cond = threading.Condition()
        self._pending: dict[str, bool] = {}  # model -> may wait for its files to settle
        self._unreadable: dict[str, str] = {}  # model -> why its repository could not be read last
        self._busy = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.sweep_s = sweep_s

    # -- start and stop --------------------------------------------------------------------------

    def start(self) -> None:
        """Load every model this worker serves (the live version; the next lower one if that
        fails) and start the loader thread. Raises if a model has no version that loads."""
        entries = select(repository(self.settings), parse_model_list(self.settings.worker_models))
        for name, entry in entries.items():
            served = self._first_load(entry)
            served.lane = ModelLane(name, _live_of(served), self.settings, self._on_batch_for)
            self.models[name] = served
        self._thread = threading.Thread(target=self._loader_loop, name="model-loader", daemon=True)
        self._thread.start()

    def close(self) -> None:
        self._stop.set()
        self.pinned.closed = True
        with self._cond:
            self._cond.notify_all()
        for served in self.models.values():
            with served.lock:  # a task thread may be adding a pinned lane
                lanes = [served.lane, *served.pinned.values()]
            for lane in lanes:
                if lane is not None:
                    lane.close()

    # -- what the pipeline asks -------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(self.models)

    def lanes(self) -> list[ModelLane]:
        return [lane for s in self.models.values() for lane in [s.lane, *s.pinned.values()] if lane]

    def lane(self, options: JobOptions) -> ModelLane | None:
        """The lane of a job's options; ``None`` for a model this worker does not serve.
        A pinned version is loaded on first use (``model_version_unavailable`` if it cannot)."""
        served = self.models.get(options.model)
        if served is None:
            return None
        if options.version is None:
            return served.lane
        return self.pinned.lane(served, options.version)

    def unload_idle(self, now: float | None = None) -> list[tuple[str, int]]:
        """Unload the pinned lanes unused for the idle limit; returns what went."""
        return self.pinned.unload_idle(self.models.values(), now)

    def _load_pinned(self, served: ServedModel, version: int) -> Loaded:
        vdir = served.entry.versions.get(version)
        if vdir is None:  # perhaps new since the last look
            entry = repository(self.settings).get(served.name)
            vdir = entry.versions.get(version) if entry is not None else None
        if vdir is None:
            raise BatchvisionError(
                f"model {served.name!r} has no version {version}", code="model_version_unavailable"
            )
        failed = served.failed.get(version)
        if failed is not None and failed[0] == vdir.signature:
            raise BatchvisionError(
                f"model {served.name} version {version} was refused: {failed[1]}",
                code="model_version_unavailable",
            )
        try:
            loaded = self._load(vdir)
        except Exception as exc:  # noqa: BLE001 - refused with the reason, per image
            reason = _reason(exc)
            if _passing(exc):  # not remembered: the next image that asks loads it again
                log.warning("model %s version %d: loading failed for now: %s", served.name, version, reason)
                raise BatchvisionError(
                    f"model {served.name} version {version} could not be loaded just now ({reason}): "
                    "retry these images later (POST /v1/jobs/{id}/retry)",
                    code="model_load_failed",
                ) from exc
            served.failed[version] = (vdir.signature, reason)
            self._emit_state(served, version, FAILED, {"error": reason})
            raise BatchvisionError(
                f"model {served.name} version {version} cannot be loaded: {reason}",
                code="model_version_unavailable",
            ) from exc
        served.ready[version] = _facts(loaded)
        self._emit_state(served, version, READY, served.ready[version])
        return loaded

    # -- events for the reporting side -------------------------------------------------------------

    def _emit_state(self, served: ServedModel, version: int, status: str, facts: dict[str, Any]) -> None:
        for listener in self.listeners:
            listener.version_state(served, version, status, facts)

    # -- loading ---------------------------------------------------------------------------------

    def _load(self, vdir: VersionDir) -> Loaded:
        start = time.perf_counter()
        classifier = self._loader(vdir, self.settings)
        classifier.warm_up()
        load_s = time.perf_counter() - start
        return Loaded(vdir.model, vdir.version, classifier, load_s, vdir.signature)

    def _first_load(self, entry: ModelEntry) -> ServedModel:
        pointer = self._pointer(entry.name)
        order = sorted(entry.versions, reverse=True)
        if pointer in entry.versions:
            order.remove(pointer)
            order.insert(0, pointer)
        failed: dict[int, tuple[tuple[Any, ...], str]] = {}
        passing: dict[int, str] = {}
        for version in order:
            vdir = entry.versions[version]
            try:
                loaded = self._load(vdir)
            except Exception as exc:  # noqa: BLE001 - refused; an older version may load
                if _passing(exc):  # an older one serves meanwhile; the watcher tries this again
                    passing[version] = _reason(exc)
                    log.warning(
                        "model %s version %d did not load for now: %s", entry.name, version, passing[version]
                    )
                    continue
                failed[version] = (vdir.signature, _reason(exc))
                log.warning("model %s version %d refused: %s", entry.name, version, failed[version][1])
                continue
            retry = {v: (entry.versions[v].signature, 1, time.monotonic() + RETRY_FIRST_S) for v in passing}
            served = ServedModel(entry.name, entry, loaded, failed=failed, retry=retry)
            served.ready[version] = _facts(loaded)
            log.info(
                "model %s version %d loaded on %s in %.2fs, input %s, %d classes",
                entry.name,
                version,
                loaded.classifier.device,
                loaded.load_s,
                loaded.classifier.input_size,
                len(loaded.classifier.labels),
            )
            if self._on_switch is not None:
                self._on_switch(entry.name, version, loaded.load_s)
            return served
        problems = {**entry.problems, **{v: why for v, (_, why) in failed.items()}, **passing}
        detail = "; ".join(f"version {v}: {why}" for v, why in sorted(problems.items())) or "no versions"
        raise RuntimeError(f"model {entry.name}: no version can be loaded ({detail})")

    def request(self, name: str, settle: bool = False) -> None:
        """Ask the loader thread to look at ``name`` again (a reload request, or the watcher
        with ``settle``); returns at once."""
        if name not in self.models:
            return
        with self._cond:
            self._pending[name] = self._pending.get(name, True) and settle
            self._cond.notify_all()

    def idle(self) -> bool:
        """Nothing to load (tests)."""
        with self._cond:
            return not self._pending and not self._busy

    def _loader_loop(self) -> None:
        sweep_at = time.monotonic() + self.sweep_s
        while not self._stop.is_set():
            with self._cond:
                while True:
                    # By the clock, not by a quiet spell: the model watcher asks to look every
                    # few seconds, and unused pinned versions must still go.
                    if time.monotonic() >= sweep_at:
                        self.unload_idle()
                        sweep_at = time.monotonic() + self.sweep_s
                    if self._pending or self._stop.is_set():
                        break
                    self._cond.wait(timeout=max(0.0, sweep_at - time.monotonic()))
                if self._stop.is_set():
                    return
                name, settle = next(iter(self._pending.items()))
                del self._pending[name]
                self._busy = True
            try:
                self.refresh(name, settle)
            except RepositoryError as exc:  # the store away for the moment: said once, not each look
                if self._unreadable.get(name) != str(exc):
                    log.warning("model %s: the repository cannot be read (%s); what is live stays", name, exc)
                self._unreadable[name] = str(exc)
            except Exception:  # noqa: BLE001 - the next look tries again
                log.exception("model %s: looking for a new version failed", name)
            else:
                if self._unreadable.pop(name, None) is not None:
                    log.info("model %s: the repository can be read again", name)
            finally:
                with self._cond:
                    self._busy = False

    def refresh(self, name: str, settle: bool = False) -> bool:
        """Look at ``name``'s versions; load and switch to the one that should be live. Returns
        whether the live version changed."""
        served = self.models[name]
        entry = repository(self.settings).get(name)
        if entry is None:
            log.warning(
                "model %s is gone from the repository; version %d stays live", name, served.live.version
            )
            return False
        served.entry = entry
        for listener in self.listeners:
            listener.versions_seen(served)
        target = self._target(served)
        if target is None:
            return False
        vdir = entry.versions[target]
        in_place = target == served.live.version  # the live version's own files changed
        if in_place and vdir.signature == served.live.signature:
            # Live, and its files are the ones it was loaded from (again, after refused ones).
            facts = served.ready.get(target, {})
            if "replacement_error" in facts:
                served.retry.pop(target, None)
                served.ready[target] = {k: v for k, v in facts.items() if k != "replacement_error"}
                self._emit_state(served, target, READY, served.ready[target])
            return False
        failed = served.failed.get(target)
        if failed is not None and failed[0] == vdir.signature:
            return False  # refused already, and its files did not change
        waiting = served.retry.get(target)
        if waiting is not None and waiting[0] != vdir.signature:
            waiting = None  # its files changed since: a fresh start
        if waiting is not None and time.monotonic() < waiting[2]:
            return False  # failed lately: tried again after its backoff
        if settle and time.time() - vdir.mtime < SETTLE_S:
            return False  # still being written: the watcher looks again
        log.info(
            "model %s: loading version %d (version %d stays live meanwhile)",
            name,
            target,
            served.live.version,
        )
        try:
            loaded = self._load(vdir)
        except Exception as exc:  # noqa: BLE001 - refused with the reason; the live one stays
            self._refused(served, target, vdir, exc, 1 + (waiting[1] if waiting else 0), in_place)
            if self._on_switch is not None:
                self._on_switch(name, target, None)
            return False
        old = served.live
        served.live = loaded  # the switch: the next batch of this model runs on it
        served.failed.pop(target, None)
        served.retry.pop(target, None)
        served.ready[target] = _facts(loaded)
        self._emit_state(served, target, READY, served.ready[target])
        for listener in self.listeners:
            listener.live_changed(served)
        log.info(
            "model %s: version %d live (was %d), loaded and checked in %.2fs",
            name,
            target,
            old.version,
            loaded.load_s,
            extra={"model": name, "model_version": target, "load_ms": round(loaded.load_s * 1000, 3)},
        )
        if self._on_switch is not None:
            self._on_switch(name, target, loaded.load_s)
        return True

    def _refused(
        self, served: ServedModel, version: int, vdir: VersionDir, exc: Exception, tries: int, in_place: bool
    ) -> None:
        """Record a load of ``version`` that failed (``tries``: in a row, this one included)."""
        reason = _reason(exc)
        live = served.live.version
        if _passing(exc) and tries < RETRY_TRIES:
            # Device memory taken (the live version is loaded beside it), a file system that did
            # not answer: not held against the version; tried again after a growing pause.
            pause = min(RETRY_CAP_S, RETRY_FIRST_S * 2 ** (tries - 1))
            served.retry[version] = (vdir.signature, tries, time.monotonic() + pause)
            log.warning(
                "model %s version %d did not load for now (try %d of %d, again in %.0fs), version %d "
                "stays live: %s",
                served.name,
                version,
                tries,
                RETRY_TRIES,
                pause,
                live,
                reason,
            )
            return
        if _passing(exc):
            reason = f"{reason} ({tries} tries in a row)"
        if in_place:
            # The live version's files were replaced by ones that do not load: its old files stay
            # live (it is not refused: that would switch to an older version), until they change.
            served.retry[version] = (vdir.signature, tries, math.inf)
            served.ready[version] = {**served.ready.get(version, {}), "replacement_error": reason}
            self._emit_state(served, version, READY, served.ready[version])
            log.warning(
                "model %s version %d: its new files were refused, its old files stay live: %s",
                served.name,
                version,
                reason,
            )
            return
        served.retry.pop(version, None)
        served.failed[version] = (vdir.signature, reason)
        self._emit_state(served, version, FAILED, {"error": reason})
        log.warning(
            "model %s version %d refused, version %d stays live: %s", served.name, version, live, reason
        )

    def _target(self, served: ServedModel) -> int | None:
        """The version that should be live: the operator's pointer, else the newest version
        not refused (with the same files)."""
        pointer = self._pointer(served.name)
        if pointer is not None:
            if pointer in served.entry.versions:
                return pointer
            log.warning(
                "model %s: live version %d is not in the repository; ignoring it", served.name, pointer
            )
        for version in sorted(served.entry.versions, reverse=True):
            failed = served.failed.get(version)
            if failed is None or failed[0] != served.entry.versions[version].signature:
                return version
        return None

    def _pointer(self, name: str) -> int | None:
        if self._pointer_of is None:
            return None
        try:
            return self._pointer_of(name)
        except Exception as exc:  # noqa: BLE001 - Redis away: keep what is live
            log.debug("live pointer of %s unreadable: %s", name, exc)
            return None


def _facts(loaded: Loaded) -> dict[str, Any]:
    clf = loaded.classifier
    return {
        "classes": len(clf.labels),
        "input_size": list(clf.input_size),
        "labels": list(clf.labels)[:1000],
        "load_s": round(loaded.load_s, 3),
        "device": clf.device,
    }
