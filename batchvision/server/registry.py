"""The model registry in Redis: what the workers serve, written by the workers, read by the API.

Workers announce each model they serve and each version they find, load or refuse (with the
reason), and send a heartbeat per model with the version they have live. The API reads it to
list the models (``GET /v1/models``) and to check a submit's options (an unknown model, version
or ``top_k`` is refused at submit time, not discovered by a worker). A reload request
(``POST /v1/models/<name>/reload``) moves the operator's live pointer, if it names a version,
and is published to the workers on :data:`~batchvision.server.keys.MODELS_CONTROL`.

Layout (keys in :mod:`batchvision.server.keys`): ``bv:models`` is one hash, so the API reads
everything in one round trip; its field ``<name>`` holds the model's JSON (``live``: the version
the workers switched to last, ``updated_at``) and ``<name>:<version>`` each version's
(``status`` ``found`` / ``ready`` / ``failed``, ``error``, ``classes``, ``input_size``,
``labels``, ``load_s``; ``replacement_error`` for a ready version whose new files were refused).
Each worker writes only the fields it knows about, so workers of one model never overwrite each
other's news.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import Any

import redis

from batchvision.core.model_refs import ModelFacts
from batchvision.server import keys
from batchvision.server.text import as_text

#: A worker whose heartbeat is older than this no longer counts as serving a model.
HEARTBEAT_TTL_S = 30.0
READY, FAILED, FOUND = "ready", "failed", "found"


#: HSET the version document ARGV[2] at field ARGV[1] unless one is there whose status is not
#: ``failed`` (a refusal is replaced; what another worker learnt is kept).
_WRITE_OVER_FAILED = """
local old = redis.call('HGET', KEYS[1], ARGV[1])
if old then
  local ok, doc = pcall(cjson.decode, old)
  if ok and type(doc) == 'table' and doc['status'] ~= 'failed' then return 0 end
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class ModelRegistry:
    """Reads and writes of the registry; safe to share between threads."""

    def __init__(self, client: redis.Redis, cache_s: float = 1.0) -> None:
        self.redis = client
        self.cache_s = cache_s
        self._lock = threading.Lock()
        self._cached: tuple[float, dict[str, Any]] | None = None

    # -- workers -------------------------------------------------------------------------------

    def announce_model(self, name: str, live: int | None) -> None:
        """The model exists and ``live`` is the version the workers serve now."""
        doc = {"name": name, "live": live, "updated_at": round(time.time(), 3)}
        self.redis.hset(keys.MODELS, name, json.dumps(doc))

    def announce_version(
        self,
        name: str,
        version: int,
        status: str,
        only_new: bool = False,
        over_failed: bool = False,
        **facts: Any,
    ) -> None:
        """A version's state: ``found`` (on disk), ``ready`` (loaded and checked: ``classes``,
        ``input_size``, ``labels``, ``load_s``) or ``failed`` (``error``). ``only_new``: write
        it only if the registry knows nothing of this version yet; with ``over_failed``, also
        over a refusal (not over what another worker learnt since: ``ready``)."""
        doc = json.dumps({"version": version, "status": status, **facts, "updated_at": round(time.time(), 3)})
        field = f"{name}:{version}"
        if over_failed:
            self.redis.eval(_WRITE_OVER_FAILED, 1, keys.MODELS, field, doc)
        elif only_new:
            self.redis.hsetnx(keys.MODELS, field, doc)
        else:
            self.redis.hset(keys.MODELS, field, doc)

    def forget_versions(self, name: str, versions: Iterable[int]) -> None:
        """Versions removed from disk."""
        fields = [f"{name}:{v}" for v in versions]
        if fields:
            self.redis.hdel(keys.MODELS, *fields)

    def heartbeat(self, worker: str, served: Mapping[str, int | None]) -> None:
        """``worker`` serves these models, each with this version live. Workers silent for
        long (gone without a clean stop) are forgotten on the way."""
        now = time.time()
        names = list(served)
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zrangebyscore(keys.model_workers(name), 0, now - 10 * HEARTBEAT_TTL_S)
        gone = [[as_text(w) for w in ws] for ws in pipe.execute()]
        for name, stale in zip(names, gone, strict=True):
            if stale:
                pipe.zrem(keys.model_workers(name), *stale)
                pipe.hdel(keys.model_served(name), *stale)
            version = served[name]
            pipe.zadd(keys.model_workers(name), {worker: now})
            pipe.hset(keys.model_served(name), worker, "" if version is None else str(version))
        pipe.execute()

    def leave(self, worker: str, models: Iterable[str]) -> None:
        """``worker`` stops (a clean shutdown): it no longer counts as serving ``models``."""
        pipe = self.redis.pipeline(transaction=False)
        for name in models:
            pipe.zrem(keys.model_workers(name), worker)
            pipe.hdel(keys.model_served(name), worker)
        pipe.execute()

    def live_pointer(self, name: str) -> int | None:
        """The live version an operator chose, if any."""
        raw = self.redis.get(keys.model_live(name))
        return int(raw) if raw else None

    def subscribe(self) -> Any:
        """A pub/sub subscription to reload requests (``get_message()`` on it)."""
        pubsub = self.redis.pubsub(ignore_subscribe_messages=True)  # type: ignore[no-untyped-call, unused-ignore]
        pubsub.subscribe(keys.MODELS_CONTROL)
        return pubsub

    # -- API -----------------------------------------------------------------------------------

    def raw(self, fresh: bool = False) -> dict[str, Any]:
        """``{name: {"model": doc, "versions": {version: doc}}}``, cached ``cache_s`` seconds."""
        with self._lock:
            if not fresh and self._cached is not None and time.monotonic() - self._cached[0] < self.cache_s:
                return self._cached[1]
        out: dict[str, Any] = {}
        for field, value in self.redis.hgetall(keys.MODELS).items():
            name, _, version = as_text(field).partition(":")
            try:
                doc = json.loads(value)
            except ValueError:
                continue
            entry = out.setdefault(name, {"model": None, "versions": {}})
            if version:
                entry["versions"][int(version)] = doc
            else:
                entry["model"] = doc
        out = {n: e for n, e in out.items() if e["model"] is not None}
        with self._lock:
            self._cached = (time.monotonic(), out)
        return out

    def facts(self) -> dict[str, ModelFacts]:
        """What submit checks need: each model's live version and usable versions' classes."""
        out = {}
        for name, entry in self.raw().items():
            versions = {
                v: (doc.get("classes") if doc.get("status") == READY else None)
                for v, doc in entry["versions"].items()
                if doc.get("status") != FAILED
            }
            out[name] = ModelFacts(name, entry["model"].get("live"), versions)
        return out

    def listing(self, default: str) -> list[dict[str, Any]]:
        """``GET /v1/models``: every model with its versions, live version, input size,
        classes, and the workers serving it (by the version they have live)."""
        entries = self.raw(fresh=True)
        names = sorted(entries)
        now = time.time()
        pipe = self.redis.pipeline(transaction=False)
        for name in names:
            pipe.zrangebyscore(keys.model_workers(name), now - HEARTBEAT_TTL_S, "+inf")
            pipe.hgetall(keys.model_served(name))
            pipe.get(keys.model_live(name))
        replies = pipe.execute()
        out = []
        for n, name in enumerate(names):
            alive_raw, served_raw, pointer = replies[3 * n : 3 * n + 3]
            alive = {as_text(w) for w in alive_raw}
            served = {as_text(w): as_text(v) for w, v in served_raw.items() if as_text(w) in alive}
            by_version: dict[str, int] = {}
            for version in served.values():
                by_version[version or "none"] = by_version.get(version or "none", 0) + 1
            model = entries[name]["model"]
            live = model.get("live")
            versions = [_version_doc(v, doc) for v, doc in sorted(entries[name]["versions"].items())]
            current = entries[name]["versions"].get(live, {}) if live is not None else {}
            out.append(
                {
                    "name": name,
                    "default": name == default,
                    "live_version": live,
                    "pinned_live_version": int(pointer) if pointer else None,
                    "input_size": current.get("input_size"),
                    "classes": current.get("classes"),
                    "labels": current.get("labels"),
                    "versions": versions,
                    "workers": len(served),
                    "workers_by_version": by_version,
                    "updated_at": model.get("updated_at"),
                }
            )
        return out

    def request_reload(self, name: str, version: int | None, latest: bool) -> dict[str, Any]:
        """Point the live version at ``version`` (or back at the newest with ``latest``) and ask
        the workers serving ``name`` to look again; returns the request."""
        pipe = self.redis.pipeline(transaction=True)
        if version is not None:
            pipe.set(keys.model_live(name), str(version))
        elif latest:
            pipe.delete(keys.model_live(name))
        request = {"id": uuid.uuid4().hex, "model": name, "version": version, "latest": latest}
        pipe.publish(keys.MODELS_CONTROL, json.dumps(request))
        receivers = pipe.execute()[-1]
        with self._lock:
            self._cached = None
        return {**request, "receivers": int(receivers)}

    def serving(self, name: str) -> int:
        """How many workers serve ``name`` now (a heartbeat within :data:`HEARTBEAT_TTL_S`)."""
        return int(self.redis.zcount(keys.model_workers(name), time.time() - HEARTBEAT_TTL_S, "+inf"))

    def forget(self, name: str) -> None:
        """Remove ``name`` from the registry: the model, its versions, its live pointer and its
        workers' heartbeats (a worker serving it announces it again when it starts)."""
        names = (as_text(k) for k in self.redis.hkeys(keys.MODELS))
        fields = [f for f in names if f.partition(":")[0] == name]
        pipe = self.redis.pipeline(transaction=True)
        if fields:
            pipe.hdel(keys.MODELS, *fields)
        pipe.delete(keys.model_live(name), keys.model_workers(name), keys.model_served(name))
        pipe.execute()
        with self._lock:
            self._cached = None

    def model_names(self, fresh: bool = False) -> list[str]:
        """The models the workers have announced."""
        return sorted(self.raw(fresh))


def _version_doc(version: int, doc: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "version": version,
        "status": doc.get("status", FOUND),
        "error": doc.get("error"),
        "replacement_error": doc.get("replacement_error"),
        "input_size": doc.get("input_size"),
        "classes": doc.get("classes"),
        "load_s": doc.get("load_s"),
    }
