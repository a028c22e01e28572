"""What a worker tells the model registry (:mod:`batchvision.server.registry`) about the models it
serves, and what it hears: each version's state (found, ready, failed with the reason), each
model's live version, a heartbeat of which worker serves which version (and the registry written
again if Redis lost it), the watcher of new version folders, and reload requests (pub/sub).

It follows :class:`workers.manager.ModelManager` as one of its listeners and asks it to look at
a model again (:meth:`ModelManager.request`); serving never waits on the registry.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
from collections.abc import Callable
from typing import Any

from batchvision.server.registry import FAILED, FOUND, READY, ModelRegistry
from workers.manager import ModelManager, ServedModel

log = logging.getLogger(__name__)

HEARTBEAT_S = 10.0


class ModelReporter:
    """Registry announcements, heartbeat and restore, the watcher and the reload listener."""

    def __init__(self, manager: ModelManager, registry: ModelRegistry, worker: str | None = None) -> None:
        self.manager = manager
        self.registry = registry
        self.worker = worker or f"{socket.gethostname()}:{os.getpid()}"
        #: model -> version -> (status, error) last written to the registry
        self._announced: dict[str, dict[int, tuple[Any, ...]]] = {}
        self._models_announced: set[str] = set()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        """Announce every model, then follow the manager and start the heartbeat, reload
        listener and (with ``BATCHVISION_MODEL_POLL_S``) watcher threads."""
        for served in self.manager.models.values():
            self.versions_seen(served)
        self._heartbeat()
        self.manager.listeners.append(self)
        self._spawn("model-heartbeat", self._heartbeat_loop)
        self._spawn("model-reloads", self._listen_loop)
        if self.manager.settings.model_poll_s > 0:
            self._spawn("model-watcher", self._watch_loop)

    def close(self) -> None:
        self._stop.set()
        if self in self.manager.listeners:
            self.manager.listeners.remove(self)
        try:
            self.registry.leave(self.worker, self.manager.models)
        except Exception as exc:  # noqa: BLE001 - Redis away at shutdown: heartbeats expire
            log.debug("could not leave the registry: %s", exc)

    def _spawn(self, name: str, target: Callable[[], None]) -> None:
        thread = threading.Thread(target=target, name=name, daemon=True)
        thread.start()
        self._threads.append(thread)

    # -- the manager's events ----------------------------------------------------------------------

    def versions_seen(self, served: ServedModel) -> None:
        """Tell the registry what changed about the model's versions: new ones (found), loaded
        ones (ready), refused ones (failed, with the reason); forget versions gone from disk."""
        entry = served.entry
        with self._lock:
            announced = self._announced.setdefault(served.name, {})
            for version in sorted(set(announced) - set(entry.versions) - set(entry.problems)):
                if self._call("forget_versions", served.name, [version]):
                    del announced[version]  # else asked again at the next look
            refused = {v for v, (status, *_) in announced.items() if status == FAILED}
        for version in sorted(set(entry.versions) | set(entry.problems)):
            failed = served.failed.get(version)
            if version in entry.problems:
                self.version_state(served, version, FAILED, {"error": entry.problems[version]})
            elif failed is not None and failed[0] == entry.versions[version].signature:
                self.version_state(served, version, FAILED, {"error": failed[1]})
            elif version in served.ready:
                self.version_state(served, version, READY, served.ready[version])
            else:
                # Refused before (by a load, or by the scan: a file missing), with other files
                # (mended since): that refusal is stale news.
                self.version_state(
                    served, version, FOUND, {}, replace=failed is not None or version in refused
                )
        if served.name not in self._models_announced and self._call(
            "announce_model", served.name, served.live.version
        ):
            self._models_announced.add(served.name)

    def version_state(
        self, served: ServedModel, version: int, status: str, facts: dict[str, Any], replace: bool = False
    ) -> None:
        """Write a version's state unless this worker wrote the same last. ``found`` never
        overwrites what another worker of this model learnt (ready, failed), but with
        ``replace`` a refusal (of files that changed since), unless another worker has
        announced the version ready meanwhile."""
        key = (status, facts.get("error"), facts.get("replacement_error"))
        with self._lock:
            announced = self._announced.setdefault(served.name, {})
            before = announced.get(version)
            if before == key:
                return
            announced[version] = key
        found = status == FOUND
        written = self._call(
            "announce_version",
            served.name,
            version,
            status,
            only_new=found,
            over_failed=found and replace,
            **facts,
        )
        if not written:  # not news yet: the next look at the model (or event) writes it again
            with self._lock:
                if announced.get(version) == key:
                    # What the registry still holds (a refusal that a "found" must replace).
                    if before is None:
                        del announced[version]
                    else:
                        announced[version] = before

    def live_changed(self, served: ServedModel) -> None:
        self._call("announce_model", served.name, served.live.version)
        self._heartbeat()

    # -- registry ----------------------------------------------------------------------------------

    def _call(self, method: str, *args: Any, **kwargs: Any) -> bool:
        """Call the registry's ``method``; whether it was written (Redis away: logged, and the
        caller sends it again later)."""
        try:
            getattr(self.registry, method)(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - the registry is news, not work
            log.warning("model registry not updated (%s): %s", method, exc)
            return False
        return True

    def _heartbeat(self) -> None:
        self._call("heartbeat", self.worker, {n: s.live.version for n, s in self.manager.models.items()})

    def _heartbeat_loop(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            self._heartbeat()
            self._restore_if_lost()

    def _restore_if_lost(self) -> None:
        """Write the registry again if Redis lost it (restarted without its data, flushed):
        the API refuses a model the registry does not know."""
        try:
            known = set(self.registry.model_names(fresh=True))
        except Exception as exc:  # noqa: BLE001 - Redis away: the next heartbeat tries again
            log.debug("registry unreadable: %s", exc)
            return
        for name, served in self.manager.models.items():
            if name not in known:
                log.warning("model %s is missing from the registry: announcing it again", name)
                with self._lock:
                    self._announced.pop(name, None)
                    self._models_announced.discard(name)
                self.versions_seen(served)

    def _watch_loop(self) -> None:
        while not self._stop.wait(self.manager.settings.model_poll_s):
            for name in self.manager.models:
                self.manager.request(name, settle=True)

    def _listen_loop(self) -> None:
        while not self._stop.is_set():
            try:
                pubsub = self.registry.subscribe()
                try:
                    while not self._stop.is_set():
                        message = pubsub.get_message(timeout=1.0)
                        if message is None or message.get("type") != "message":
                            continue
                        name = json.loads(message["data"]).get("model")
                        if name in self.manager.models:
                            log.info("model %s: reload requested", name)
                            self.manager.request(str(name))
                finally:
                    pubsub.close()
            except Exception as exc:  # noqa: BLE001 - Redis restarting: subscribe again
                log.debug("reload listener: %s", exc)
                self._stop.wait(2.0)
