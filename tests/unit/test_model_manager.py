"""The worker's model manager with stand-in models (no TensorFlow, no Redis): a new
version goes live between two batches while images stream through, so no batch holds two
versions and every output names its version; a version that fails is refused and the live one
stays; pinned versions, the operator's live pointer, and the fallback at start."""

from __future__ import annotations

import os
import shutil
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import numpy as np
import pytest

import workers.manager as manager_mod
from batchvision.core.batching import BatchInfo
from batchvision.core.errors import BatchvisionError
from batchvision.core.model_refs import JobOptions
from batchvision.core.results import retryable
from batchvision.core.settings import Settings
from batchvision.server.repository import VersionDir
from workers.manager import ModelLane, ModelManager, Scored

LABELS = ["a", "b", "c"]


class StandIn:
    """A 'model' whose output says which version it is (the class ``version % 3`` wins)."""

    def __init__(self, version: int, labels: list[str], delay_s: float) -> None:
        self.name = "m"
        self.labels = labels
        self.input_size = (8, 8)
        self.device = "stand-in"
        self.version = version
        self.delay_s = delay_s

    def predict(self, images: list[np.ndarray]) -> list[np.ndarray]:
        time.sleep(self.delay_s)
        out = np.full(len(self.labels), 0.1, np.float32)
        out[self.version % len(self.labels)] = 1.0
        return [out / out.sum()] * len(images)

    def warm_up(self) -> float:
        return 0.0


class Loader:
    """Loads stand-ins; a version folder holding a file named BROKEN fails to load; a version
    in ``flaky`` fails with an ``OSError`` that many times first (a file system that did not
    answer)."""

    def __init__(self, delay_s: float = 0.0, flaky: dict[int, int] | None = None) -> None:
        self.delay_s = delay_s
        self.calls: list[int] = []
        self.flaky = dict(flaky or {})

    def __call__(self, vdir: VersionDir, settings: Settings) -> StandIn:
        self.calls.append(vdir.version)
        if self.flaky.get(vdir.version, 0) > 0:
            self.flaky[vdir.version] -= 1
            raise OSError(5, "Input/output error")
        if (Path(vdir.source).parent / "BROKEN").exists():
            raise ValueError("the model outputs 6 classes but its labels file has 3 labels")
        labels = Path(str(vdir.labels)).read_text().split()
        return StandIn(vdir.version, labels, self.delay_s)


class Events:
    """What the manager tells its listeners (the worker's reporter writes it to the registry)."""

    def __init__(self) -> None:
        self.states: list[tuple[int, str, dict[str, Any]]] = []

    def version_state(self, served: Any, version: int, status: str, facts: dict[str, Any]) -> None:
        self.states.append((version, status, dict(facts)))

    def versions_seen(self, served: Any) -> None:
        pass

    def live_changed(self, served: Any) -> None:
        pass


def _version(repo: Path, version: int, broken: bool = False) -> None:
    tmp = repo / "m" / f".{version}.tmp"
    tmp.mkdir(parents=True)
    (tmp / "model.keras").write_bytes(b"stand-in")
    (tmp / "labels.txt").write_text("\n".join(LABELS) + "\n")
    if broken:
        (tmp / "BROKEN").write_text("")
    os.rename(tmp, repo / "m" / str(version))


def _manager(repo: Path, loader: Loader, **kw: Any) -> ModelManager:
    settings = Settings.from_env({}, models_dir=str(repo), model="m", model_poll_s=0, max_batch_size=8)
    manager = ModelManager(settings, loader=loader, **kw)
    manager.start()
    return manager


def test_a_new_version_goes_live_between_two_batches(tmp_path: Path) -> None:
    _version(tmp_path, 1)
    batches: list[tuple[int | None, tuple[Any, ...]]] = []

    def on_batch_for(lane: ModelLane) -> Any:
        def hook(info: BatchInfo) -> None:
            batches.append((lane.last.version if lane.last else None, info.tags))

        return hook

    manager = _manager(tmp_path, Loader(delay_s=0.002), on_batch_for=on_batch_for)
    try:
        lane = manager.lane(JobOptions("m"))
        assert lane is not None and lane.version == 1
        outputs: dict[int, Future[Scored]] = {}
        lock = threading.Lock()
        switched = threading.Event()

        def feed(start: int) -> None:
            # Images stream in until the switch, and 100 more from each thread after it.
            i, after = start, 0
            while after < 100:
                fut = lane.batcher.submit(np.zeros((8, 8, 3), np.uint8), tag=(f"img{i}", None))
                with lock:
                    outputs[i] = fut
                i += 1
                after += switched.is_set()
                time.sleep(0.0005)

        threads = [threading.Thread(target=feed, args=(n * 100_000,)) for n in range(3)]
        for t in threads:
            t.start()
        while sum(f.done() for f in list(outputs.values())) < 60:
            time.sleep(0.01)
        _version(tmp_path, 2)
        assert manager.refresh("m") is True
        switched.set()
        for t in threads:
            t.join()
        results = {i: f.result(timeout=10) for i, f in outputs.items()}
    finally:
        manager.close()
    versions = {f"img{i}": r.version for i, r in results.items()}
    assert set(versions.values()) == {1, 2}, "the switch happened while images streamed"
    for r in results.values():  # every output says which version made it, and it did
        assert r.probs.argmax() == r.version % 3 and r.model == "m"
    seen = [v for v, _ in batches]
    assert seen == sorted(seen), "version 1 until the switch, then 2"
    for version, tags in batches:
        assert {versions[t[0]] for t in tags} == {version}, "no batch holds two versions"
    assert sum(len(tags) for _, tags in batches) == len(results), "every image once"
    doc = lane.result(results[0], JobOptions("m", top_k=2))
    assert doc.model == "m" and doc.version in (1, 2) and len(doc.top_k) == 2


def test_a_broken_version_is_refused_and_retried_only_when_its_files_change(tmp_path: Path) -> None:
    _version(tmp_path, 1)
    loader = Loader()
    manager = _manager(tmp_path, loader)
    try:
        _version(tmp_path, 2, broken=True)
        assert manager.refresh("m") is False
        served = manager.models["m"]
        assert served.live.version == 1
        assert "labels file has 3 labels" in served.failed[2][1]
        calls = len(loader.calls)
        assert manager.refresh("m") is False and len(loader.calls) == calls, "not tried again"
        (tmp_path / "m" / "2" / "BROKEN").unlink()  # fixed in place: its files changed
        assert manager.refresh("m") is True and served.live.version == 2
        assert 2 not in served.failed
    finally:
        manager.close()


def test_pinned_versions_run_on_their_own_version(tmp_path: Path) -> None:
    _version(tmp_path, 1)
    _version(tmp_path, 2)
    manager = _manager(tmp_path, Loader())
    try:
        assert manager.models["m"].live.version == 2
        pinned = manager.lane(JobOptions("m", version=1))
        assert pinned is not None and pinned is manager.lane(JobOptions("m", version=1))
        out = pinned.batcher.submit(np.zeros((8, 8, 3), np.uint8)).result(timeout=10)
        assert out.version == 1
        assert manager.lane(JobOptions("other")) is None, "not served here: handed on"
        with pytest.raises(BatchvisionError) as info:
            manager.lane(JobOptions("m", version=9))
        assert info.value.code == "model_version_unavailable"
    finally:
        manager.close()


def test_pinned_versions_are_unloaded_when_unused_and_bounded_per_model(tmp_path: Path) -> None:
    for version in (1, 2, 3, 4):
        _version(tmp_path, version)
    manager = _manager(tmp_path, Loader(), max_pinned=2, pinned_idle_s=300.0)
    try:
        served = manager.models["m"]
        one = manager.lane(JobOptions("m", version=1))
        assert one is not None
        two = manager.lane(JobOptions("m", version=2))
        assert two is not None
        # A third while both were asked for just now: refused, so the bound holds and no lane a
        # chunk may be decoding for is pulled away.
        with pytest.raises(BatchvisionError, match="at most 2") as info:
            manager.lane(JobOptions("m", version=3))
        assert info.value.code == "model_busy" and retryable(info.value.code)  # for the moment
        assert sorted(served.pinned) == [1, 2]
        # Version 1 asked for long ago, but a task still feeds it (a slow decode): kept.
        one.used -= 3600
        with one.batcher.reserve(1):
            with pytest.raises(BatchvisionError, match="at most 2"):
                manager.lane(JobOptions("m", version=3))
            assert manager.unload_idle(now=time.monotonic() + 3600) == [("m", 2)]
        two = manager.lane(JobOptions("m", version=2))
        assert two is not None
        # Version 1 unused for long: the least recently used makes room for version 3.
        three = manager.lane(JobOptions("m", version=3))
        assert three is not None and sorted(served.pinned) == [2, 3]
        with pytest.raises(RuntimeError, match="closed"):
            one.batcher.submit(np.zeros((8, 8, 3), np.uint8))
        out = three.batcher.submit(np.zeros((8, 8, 3), np.uint8)).result(timeout=10)
        assert out.version == 3
        # Unused for longer than the idle limit: unloaded; a later job loads it again.
        assert manager.unload_idle(now=time.monotonic() + 3600) == [("m", 2), ("m", 3)]
        assert served.pinned == {} and served.lane is not None, "the live lane stays"
        again = manager.lane(JobOptions("m", version=3))
        assert again is not None and again is not three
    finally:
        manager.close()


class GatedLoader(Loader):
    """Loads version 1 only once ``gate`` is set (a slow load: a big model off a network disk)."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.loading = threading.Event()

    def __call__(self, vdir: VersionDir, settings: Settings) -> StandIn:
        if vdir.version == 1:  # never the live one: start loads the newest
            self.loading.set()
            assert self.gate.wait(30), "the test never let the load finish"
        return super().__call__(vdir, settings)


def test_a_slow_pinned_load_holds_up_neither_other_versions_nor_the_sweep(
    tmp_path: Path, wait_until: Any
) -> None:
    for version in (1, 2, 3):
        _version(tmp_path, version)
    loader = GatedLoader()
    manager = _manager(tmp_path, loader, max_pinned=2, pinned_idle_s=300.0)
    try:
        first: Future[ModelLane] = Future()
        second: Future[ModelLane] = Future()

        def ask(into: Future[ModelLane]) -> None:
            try:
                lane = manager.lane(JobOptions("m", version=1))
                assert lane is not None
                into.set_result(lane)
            except BaseException as exc:  # noqa: BLE001 - handed to the test thread
                into.set_exception(exc)

        threading.Thread(target=ask, args=(first,), daemon=True).start()
        assert loader.loading.wait(10), "version 1 started loading"
        threading.Thread(target=ask, args=(second,), daemon=True).start()
        # The second caller waits on the first one's load (the Future's condition has a waiter).
        loading = manager.models["m"].loading[1]
        wait_until(lambda: loading._condition._waiters, timeout=10, message="the second caller waits")  # type: ignore[attr-defined]
        # Meanwhile: another version's lane, and the idle sweep, answer at once (each call
        # here would block until the gate opens if the load held the model's lock).
        done: Future[Any] = Future()

        def meanwhile() -> None:
            lane = manager.lane(JobOptions("m", version=2))
            done.set_result((lane, manager.unload_idle()))

        threading.Thread(target=meanwhile, daemon=True).start()
        lane2, swept = done.result(timeout=10)
        assert lane2 is not None and lane2.version == 2 and swept == []
        # The room is taken: one version loading, one loaded (at most 2).
        with pytest.raises(BatchvisionError, match="at most 2") as info:
            manager.lane(JobOptions("m", version=3))
        assert info.value.code == "model_busy"
        assert not first.done() and not second.done()
        loader.gate.set()
        one = first.result(timeout=10)
        assert second.result(timeout=10) is one, "the second caller waited for the same load"
        assert loader.calls.count(1) == 1, "version 1 loaded once"
        assert sorted(manager.models["m"].pinned) == [1, 2] and manager.models["m"].loading == {}
    finally:
        loader.gate.set()
        manager.close()


def test_a_pinned_load_that_ends_after_the_worker_stopped_leaves_no_lane(tmp_path: Path) -> None:
    _version(tmp_path, 1)
    _version(tmp_path, 2)
    loader = GatedLoader()
    manager = _manager(tmp_path, loader)
    asked: Future[Any] = Future()

    def ask() -> None:
        try:
            asked.set_result(manager.lane(JobOptions("m", version=1)))
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            asked.set_exception(exc)

    threading.Thread(target=ask, daemon=True).start()
    assert loader.loading.wait(10)
    manager.close()
    loader.gate.set()
    with pytest.raises(BatchvisionError, match="stopping") as info:
        asked.result(timeout=10)
    assert info.value.code == "model_busy" and manager.models["m"].pinned == {}
    # Once stopped, no load starts at all.
    calls = len(loader.calls)
    with pytest.raises(BatchvisionError, match="stopping"):
        manager.lane(JobOptions("m", version=1))
    assert len(loader.calls) == calls and manager.models["m"].loading == {}


def test_a_pinned_version_that_fails_to_load_for_the_moment_is_tried_again(tmp_path: Path) -> None:
    _version(tmp_path, 1)
    _version(tmp_path, 2)
    manager = _manager(tmp_path, Loader(flaky={1: 1}))
    try:
        with pytest.raises(BatchvisionError) as info:
            manager.lane(JobOptions("m", version=1))
        assert info.value.code == "model_load_failed" and retryable(info.value.code)
        assert 1 not in manager.models["m"].failed  # not held against the version
        lane = manager.lane(JobOptions("m", version=1))
        assert lane is not None and lane.version == 1
    finally:
        manager.close()


def test_unused_pinned_versions_go_while_the_watcher_keeps_the_loader_busy(
    tmp_path: Path, wait_until: Any
) -> None:
    # The model watcher asks the loader to look every few seconds (every 20 ms here): the
    # sweep of unused pinned versions runs by the clock, not when the loader has been quiet.
    _version(tmp_path, 1)
    _version(tmp_path, 2)
    manager = _manager(tmp_path, Loader(), sweep_s=0.2)
    stop = threading.Event()

    def watcher() -> None:
        while not stop.wait(0.02):
            manager.request("m", settle=True)

    threading.Thread(target=watcher, daemon=True).start()
    try:
        pinned = manager.lane(JobOptions("m", version=1))
        assert pinned is not None and sorted(manager.models["m"].pinned) == [1]
        pinned.used -= 3600  # unused for an hour
        wait_until(lambda: not manager.models["m"].pinned, timeout=10, message="the idle version unloaded")
    finally:
        stop.set()
        manager.close()


def test_start_falls_back_to_an_older_version_and_follows_the_live_pointer(tmp_path: Path) -> None:
    _version(tmp_path, 1)
    _version(tmp_path, 2)
    _version(tmp_path, 3, broken=True)

    class Pointer:
        live: int | None = None

        def live_pointer(self, name: str) -> int | None:
            return self.live

    pointer = Pointer()
    settings = Settings.from_env({}, models_dir=str(tmp_path), model="m", model_poll_s=0)
    manager = ModelManager(settings, pointer=pointer.live_pointer, loader=Loader())
    manager.start()
    try:
        served = manager.models["m"]
        assert served.live.version == 2 and 3 in served.failed
        pointer.live = 1  # rollback
        assert manager.refresh("m") is True and served.live.version == 1
        pointer.live = None  # back to the newest that loads
        assert manager.refresh("m") is True and served.live.version == 2
    finally:
        manager.close()


def test_a_model_without_a_loadable_version_stops_the_worker(tmp_path: Path) -> None:
    _version(tmp_path, 1, broken=True)
    with pytest.raises(RuntimeError, match="no version can be loaded.*version 1"):
        _manager(tmp_path, Loader())


def test_the_live_lane_fits_images_decoded_for_another_input_size(tmp_path: Path) -> None:
    from workers.manager import fit

    assert fit(np.zeros((8, 8, 3), np.uint8), (8, 8)).shape == (8, 8, 3)
    assert fit(np.zeros((8, 8, 3), np.uint8), (16, 4)).shape == (4, 16, 3)
    shutil.rmtree(tmp_path)


def test_a_new_version_that_fails_to_load_for_the_moment_goes_live_on_the_next_look(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A reload holds the old and the new version at once: device memory may run out for the
    # moment. That is not the version's fault, and must not keep it out until its files change.
    monkeypatch.setattr(manager_mod, "RETRY_FIRST_S", 0.0)
    _version(tmp_path, 1)
    manager = _manager(tmp_path, Loader(flaky={2: 1}))
    try:
        _version(tmp_path, 2)
        assert manager.refresh("m") is False
        assert 2 not in manager.models["m"].failed
        assert manager.refresh("m") is True
        assert manager.models["m"].live.version == 2
    finally:
        manager.close()


def test_a_first_load_that_fails_for_the_moment_serves_the_older_version_until_it_loads(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(manager_mod, "RETRY_FIRST_S", 0.0)
    _version(tmp_path, 1)
    _version(tmp_path, 2)
    manager = _manager(tmp_path, Loader(flaky={2: 1}))
    try:
        assert manager.models["m"].live.version == 1
        assert 2 not in manager.models["m"].failed
        assert manager.refresh("m") is True
        assert manager.models["m"].live.version == 2
    finally:
        manager.close()


def test_the_live_version_loads_again_when_its_files_change_in_place(tmp_path: Path) -> None:
    # An operator uploads version 1 again (a fixed export): every worker must serve the new
    # files, not only the ones that start after.
    _version(tmp_path, 1)
    loader = Loader()
    manager = _manager(tmp_path, loader)
    try:
        assert loader.calls == [1]
        assert manager.refresh("m") is False  # nothing changed: nothing loads
        labels = tmp_path / "m" / "1" / "labels.txt"
        labels.write_text("\n".join(LABELS) + "\n")
        os.utime(labels, ns=(labels.stat().st_atime_ns, labels.stat().st_mtime_ns + 10**9))
        assert manager.refresh("m") is True
        assert loader.calls == [1, 1] and manager.models["m"].live.version == 1
        assert manager.refresh("m") is False
    finally:
        manager.close()


def test_a_version_failing_for_the_moment_is_tried_after_a_pause_and_refused_after_a_few_tries(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Too large for the device beside the live version: "for the moment" that lasts. A look
    # within the pause loads nothing; after RETRY_TRIES failures the version is refused.
    _version(tmp_path, 1)
    loader = Loader(flaky={2: 100})
    manager = _manager(tmp_path, loader)
    try:
        _version(tmp_path, 2)
        assert manager.refresh("m") is False and loader.calls == [1, 2]
        assert manager.refresh("m") is False and loader.calls == [1, 2]  # within the pause
        monkeypatch.setattr(manager_mod, "RETRY_FIRST_S", 0.0)
        manager.models["m"].retry[2] = (*manager.models["m"].retry[2][:2], 0.0)  # the pause is over
        for _ in range(manager_mod.RETRY_TRIES):
            manager.refresh("m")
        assert loader.calls.count(2) == manager_mod.RETRY_TRIES
        failed = manager.models["m"].failed[2][1]
        assert "Input/output error" in failed and f"{manager_mod.RETRY_TRIES} tries in a row" in failed
        assert manager.models["m"].live.version == 1
    finally:
        manager.close()


def test_live_files_replaced_by_broken_ones_leave_the_old_files_live(tmp_path: Path) -> None:
    # Version 2 is live; its files are replaced in place by ones that do not load. Version 2
    # (its old files) stays live: refusing it would switch this worker back to version 1.
    _version(tmp_path, 1)
    _version(tmp_path, 2)
    loader = Loader()
    manager = _manager(tmp_path, loader)
    try:
        assert manager.models["m"].live.version == 2
        events = Events()
        manager.listeners.append(events)
        (tmp_path / "m" / "2" / "BROKEN").write_text("")
        assert manager.refresh("m") is False
        assert manager.refresh("m") is False
        assert manager.refresh("m") is False
        served = manager.models["m"]
        assert served.live.version == 2 and 2 not in served.failed
        assert loader.calls == [2, 2]  # tried once: not again until its files change again
        # Said where operators look: version 2 is ready, and its new files were refused.
        status, facts = events.states[-1][1:]
        assert status == "ready" and "labels file has 3 labels" in facts["replacement_error"]
        # The old files back in place: nothing to load (they are live), and no refusal to show.
        (tmp_path / "m" / "2" / "BROKEN").unlink()
        assert manager.refresh("m") is False and loader.calls == [2, 2]
        assert events.states[-1][1:] == ("ready", served.ready[2])
        assert "replacement_error" not in served.ready[2]
        # Broken again, then mended with new files: they load, and the refusal is gone too.
        (tmp_path / "m" / "2" / "BROKEN").write_text("")
        assert manager.refresh("m") is False and "replacement_error" in events.states[-1][2]
        (tmp_path / "m" / "2" / "BROKEN").unlink()
        (tmp_path / "m" / "2" / "labels.txt").write_text("\n".join(["x", "y", "z"]) + "\n")
        assert manager.refresh("m") is True
        assert events.states[-1][1] == "ready" and "replacement_error" not in events.states[-1][2]
    finally:
        manager.close()


def test_a_worker_whose_only_version_fails_for_the_moment_says_why(tmp_path: Path) -> None:
    _version(tmp_path, 1)
    with pytest.raises(RuntimeError, match=r"version 1: OSError: \[Errno 5\] Input/output error"):
        _manager(tmp_path, Loader(flaky={1: 1}))


class Registry:
    """The registry calls a worker's reporter makes (the real one is Redis; see test_models)."""

    def __init__(self) -> None:
        #: version -> (status, written over a refusal, facts)
        self.versions: dict[int, tuple[str, bool, dict[str, Any]]] = {}
        self.models: dict[str, int | None] = {}
        self.down = False  # Redis away: every write fails

    def _write(self) -> None:
        if self.down:
            raise ConnectionError("Redis is away")

    def announce_version(
        self,
        name: str,
        version: int,
        status: str,
        only_new: bool = False,
        over_failed: bool = False,
        **facts: Any,
    ) -> None:
        self._write()
        self.versions[version] = (status, over_failed, facts)

    def announce_model(self, name: str, live: int | None) -> None:
        self._write()
        self.models[name] = live

    def forget_versions(self, name: str, versions: Any) -> None:
        self._write()
        for version in versions:
            self.versions.pop(version, None)


def test_what_the_registry_did_not_take_is_written_at_the_next_look(tmp_path: Path) -> None:
    # Redis away while the worker announces its model: nothing is lost for good, the next look
    # at the model (the repository poll) writes it, and a version gone from disk meanwhile is
    # forgotten once the registry takes it.
    from workers.reporting import ModelReporter

    _version(tmp_path, 1)
    _version(tmp_path, 2)
    manager = _manager(tmp_path, Loader())
    registry = Registry()
    reporter = ModelReporter(manager, registry)  # type: ignore[arg-type]
    manager.listeners.append(reporter)
    try:
        served = manager.models["m"]
        registry.down = True
        reporter.versions_seen(served)
        assert registry.versions == {} and registry.models == {}
        shutil.rmtree(tmp_path / "m" / "1")
        registry.down = False
        manager.refresh("m")
        assert registry.models == {"m": served.live.version}
        assert {v: status for v, (status, _, _) in registry.versions.items()} == {2: "ready"}
        # A forget that fails is asked again too.
        registry.versions[1] = ("ready", False, {})
        reporter.version_state(served, 1, "ready", {})  # this worker's own news of version 1
        registry.down = True
        manager.refresh("m")
        assert 1 in registry.versions
        registry.down = False
        manager.refresh("m")
        assert 1 not in registry.versions
    finally:
        manager.close()


def test_a_refused_version_mended_but_not_loaded_is_no_longer_reported_as_refused(tmp_path: Path) -> None:
    # Version 1 is pinned live; version 2 was refused. Its files are mended: until a worker
    # loads it, it is "found" again (written over the stale refusal), not "failed" with the
    # old reason.
    from workers.reporting import ModelReporter

    _version(tmp_path, 1)
    _version(tmp_path, 2, broken=True)
    pinned: dict[str, int | None] = {"m": None}
    manager = _manager(tmp_path, Loader(), pointer=pinned.get)
    pinned["m"] = 1  # after the start refused version 2
    registry = Registry()
    reporter = ModelReporter(manager, registry)  # type: ignore[arg-type]
    manager.listeners.append(reporter)
    try:
        served = manager.models["m"]
        reporter.versions_seen(served)
        status, only_new, facts = registry.versions[2]
        assert status == "failed" and "labels file has 3 labels" in facts["error"]
        assert manager.refresh("m") is False and registry.versions[2][0] == "failed", "same files"
        (tmp_path / "m" / "2" / "BROKEN").unlink()
        assert manager.refresh("m") is False  # version 1 stays live: pinned
        assert registry.versions[2] == ("found", True, {})  # over the refusal (not over a "ready")
        # A mended version whose "found" the registry did not take is still written over the
        # refusal at the next look.
        (tmp_path / "m" / "4").mkdir()
        (tmp_path / "m" / "4" / "labels.txt").write_text("\n".join(LABELS) + "\n")
        manager.refresh("m")
        assert registry.versions[4][0] == "failed"
        (tmp_path / "m" / "4" / "model.keras").write_bytes(b"stand-in")
        registry.down = True
        manager.refresh("m")
        registry.down = False
        manager.refresh("m")
        assert registry.versions[4] == ("found", True, {})
        # A version the scan refuses (its model file not there yet), then completed.
        (tmp_path / "m" / "3").mkdir()
        (tmp_path / "m" / "3" / "labels.txt").write_text("\n".join(LABELS) + "\n")
        assert manager.refresh("m") is False and registry.versions[3][0] == "failed"
        (tmp_path / "m" / "3" / "model.keras").write_bytes(b"stand-in")
        assert manager.refresh("m") is False
        assert registry.versions[3] == ("found", True, {})
    finally:
        manager.close()
