"""Several hosts for real: Redis, the API and two workers each in a network namespace of its
own (:mod:`batchvision.testing.netns`), on a private subnet, started with the compose file's
commands and environment (services resolve ``redis`` and ``api`` by name); this process is the
client, in the root namespace. Faults are network faults: a link cut and healed, a host
removed for good.

Every scenario keeps a job of 640 images in flight through the fault and ends with exactly one
result per image (none lost, none counted twice, by the job store and by the workers' own
counters) and a measured recovery time, printed and written to
``tests/artifacts/multihost/report.json`` (the README's Reliability table comes from it).

Workers run the benchmark's ``sleeping`` stand-in model (a fixed time per batch, no
TensorFlow compute): the tests are about the network, and the 2-core machine stays free.
Skipped where namespaces cannot be made (not root, no iproute2).
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import redis as redis_lib
import requests
from prometheus_client.parser import text_string_to_metric_families

from batchvision.core.settings import Settings
from batchvision.core.synthetic import CLASSES, encode, render
from batchvision.server.connect import SOCKET_TIMEOUT_S, connect_redis
from batchvision.server.keys import JobKeys
from batchvision.server.queue import create_celery
from batchvision.testing import netns
from batchvision.testing.netns import Host, HostStack, Network

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
N = 640  # images per job: 40 chunks of 16
VISIBILITY_S = 10
SLEEP_S = 0.25  # per batch of 16: about 64 images/s per worker
#: The API's longest answer while Redis is unreachable. A request that needs Redis fails on
#: its first command, after one reply or connect timeout (SOCKET_TIMEOUT_S); a submission
#: whose job was stored just before the cut fails in its publish, which the API retries
#: twice (up to three timeouts); a small one waits for the shared publisher (coalescer.py) at
#: most 30 s. Clients wait 60 s (batchvision.Client's default, the API's gunicorn timeout).
API_BOUND_S = 30 + 2 * SOCKET_TIMEOUT_S
CLIENT_TIMEOUT_S = 60


def _images(n: int, seed: int) -> list[tuple[str, bytes]]:
    """Small JPEGs (64x64): cheap to send and decode, the model does not care."""
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        label = CLASSES[i % len(CLASSES)]
        out.append((f"{label}_{i:04d}.jpg", encode(render(label, (64, 64), rng), "JPEG", quality=80)))
    return out


@dataclass
class Cluster:
    net: Network
    stack: HostStack
    redis: redis_lib.Redis
    files: list[tuple[str, bytes]]
    wait_until: Callable[..., Any]
    report: list[dict[str, Any]] = field(default_factory=list)
    http: requests.Session = field(default_factory=requests.Session)

    @property
    def api(self) -> str:
        return self.stack.api_url

    # -- jobs ---------------------------------------------------------------------------

    def submit(self, n: int = N) -> str:
        resp = self.http.post(f"{self.api}/v1/jobs", files=[("files", f) for f in self.files[:n]], timeout=60)
        assert resp.status_code == 202, resp.text
        return str(resp.json()["job_id"])

    def status(self, job_id: str) -> dict[str, Any]:
        resp = self.http.get(f"{self.api}/v1/jobs/{job_id}", timeout=30)
        resp.raise_for_status()
        return dict(resp.json())

    def wait_finished(self, job_id: str, timeout: float = 120.0) -> dict[str, Any]:
        def finished() -> dict[str, Any] | None:
            try:
                st = self.status(job_id)
            except requests.RequestException:
                return None  # 503 while Redis is away: ask again
            return st if st["status"] not in ("queued", "running") else None

        try:
            st: dict[str, Any] = self.wait_until(finished, timeout=timeout, interval=0.1)
        except AssertionError:
            raise AssertionError(
                f"job {job_id} not finished after {timeout:.0f}s: {self.debug(job_id)}"
            ) from None
        return st

    def debug(self, job_id: str) -> dict[str, Any]:
        r = self.redis
        s = self.stack.settings
        return {
            "status": r.hgetall(JobKeys.of(job_id).job),
            "results": r.hlen(JobKeys.of(job_id).results),
            "queue": r.llen(s.queue),
            "unacked": r.hlen("unacked"),
            "ledger": r.zcard("bv:chunks"),
            "now": time.time(),
        }

    def assert_exactly_once(self, job_id: str, n: int = N, timeout: float = 120.0) -> dict[str, Any]:
        """The job finished with one stored classification per image. Returns its status, with
        ``lost`` (images without a classification: no result, or an error result, which would
        be a loss dressed up as an answer) and ``duplicated`` (results counted beyond the ones
        stored: an image counted twice), both 0 by then."""
        st = self.wait_finished(job_id, timeout)
        stored = self.redis.hlen(JobKeys.of(job_id).results)
        resp = self.http.get(f"{self.api}/v1/jobs/{job_id}/results", params={"format": "jsonl"}, timeout=60)
        rows = [json.loads(line) for line in resp.text.splitlines() if line.strip()]
        ok = {r["index"] for r in rows if r["status"] == "ok"}
        st["lost"] = n - len(ok & set(range(n)))
        st["duplicated"] = st["done"] + st["failed"] - stored + len(rows) - len({r["index"] for r in rows})
        assert (st["lost"], st["duplicated"]) == (0, 0), (
            st,
            [r.get("error") for r in rows if "error" in r][:3],
        )
        assert (st["total"], st["done"], st["failed"], stored) == (n, n, 0, n), (st, stored)
        assert [r["index"] for r in rows] == list(range(n))
        return st

    def redelivered_chunks(self, job_id: str) -> int:
        """Chunks of the job delivered more than once (duplicate deliveries absorbed)."""
        count = 0
        for key, value in self.redis.hgetall(JobKeys.of(job_id).tries).items():
            name = key.decode() if isinstance(key, bytes) else str(key)
            count += name.startswith("chunk:") and int(value) > 1
        return count

    def pending(self) -> int:
        return int(self.redis.get("bv:pending") or 0)

    # -- workers ------------------------------------------------------------------------

    def classified(self, worker: Host) -> int | None:
        """Results this worker newly stored (its own counter), or None if unreachable."""
        try:
            text = requests.get(self.stack.metrics_url(worker), timeout=2).text
        except requests.RequestException:
            return None
        return int(
            sum(
                sample.value
                for family in text_string_to_metric_families(text)
                for sample in family.samples
                if sample.name == "batchvision_images_classified_total"
                and sample.labels.get("outcome") == "ok"
            )
        )

    def wait_classified(self, worker: Host, more_than: int, timeout: float = 60.0, job_id: str = "") -> float:
        """Block until ``worker`` stored more than ``more_than`` results; returns when. On a
        timeout the error says what the worker was doing (its counter or that its metrics did not
        answer, the queues, its log's last lines): a stalled consumer and an unreachable host
        read differently."""
        try:
            self.wait_until(
                lambda: (self.classified(worker) or 0) > more_than,
                timeout=timeout,
                message=f"{worker.name} stores more than {more_than} results",
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.explain(worker, job_id)}") from None
        return time.time()

    def commands_of(self, worker: Host, seconds: float) -> list[str]:
        """The commands ``worker`` sends to Redis for ``seconds`` (``MONITOR``), deduplicated."""
        seen: dict[str, None] = {}
        monitor = self.redis.monitor()

        def listen() -> None:
            with contextlib.suppress(Exception):  # ends when the connection is closed below
                for cmd in monitor.listen():
                    if str(cmd.get("client_address")) == worker.address:
                        seen.setdefault(str(cmd.get("command"))[:300])

        thread = threading.Thread(target=listen, daemon=True)
        with monitor:
            thread.start()
            time.sleep(seconds)  # a sample of what it does, not a wait for a condition
        thread.join(timeout=5)
        return list(seen)

    def explain(self, worker: Host, job_id: str = "") -> str:
        """What is known of ``worker`` and the job now, for an assertion message."""
        svc = worker.services[0]
        alive = svc.proc is not None and svc.proc.poll() is None
        lines = Path(svc.log_path).read_text(errors="replace").splitlines() if svc.log_path else []
        # The per-chunk lines say only that work went on; the rest says what went wrong.
        quiet = ("] task ", "] batch of ", "succeeded in", "] Task batchvision.classify[")
        tail = [line for line in lines if not any(q in line for q in quiet)][-40:]
        counters = {w.name: self.classified(w) for w in self.stack.workers.values()}
        # Its connections as Redis sees them: a consumer waits in a BRPOP (cmd=brpop, flags=b).
        clients = [
            {k: c.get(k) for k in ("id", "age", "idle", "flags", "cmd")}
            for c in self.redis.client_list()
            if str(c.get("addr", "")).startswith(f"{worker.address}:")
        ]
        return "\n".join(
            [
                f"{worker.name}'s commands over 3 s: {self.commands_of(worker, 3.0)}",
                f"{worker.name}: process alive {alive}, counters (None: metrics unreachable) {counters}, "
                f"answers ping {self.answers_ping(worker)}",
                f"job: {self.debug(job_id) if job_id else '-'}",
                f"{worker.name}'s Redis connections: {clients}",
                f"{worker.name} log, last lines other than per-chunk ones:",
                *tail,
            ]
        )

    def consuming(self, worker: Host) -> bool:
        """Whether ``worker`` waits in a ``BRPOP`` right now (Redis sees it blocked there). Its
        consumer sends one every second; after a cut, the one in flight is noticed lost only
        by TCP's retransmissions or kombu's health check (up to ~11 s), and until then another
        worker takes every message. A ping answers sooner: it travels over pub/sub."""
        return any(
            str(c.get("addr", "")).startswith(f"{worker.address}:")
            and c.get("cmd") == "brpop"
            and "b" in str(c.get("flags", ""))
            for c in self.redis.client_list()
        )

    def wait_consuming(self, worker: Host) -> None:
        self.wait_until(lambda: self.consuming(worker), timeout=60, message=f"{worker.name} waits in a BRPOP")

    def answers_ping(self, worker: Host) -> bool:
        app = create_celery(self.stack.client_settings())
        try:
            replies = app.control.ping(destination=[f"worker@{worker.name}"], timeout=2.0)
        finally:
            app.close()
        return bool(replies)

    def record(self, scenario: str, recovery_s: float, lost: int, duplicated: int, **more: Any) -> None:
        row = {"scenario": scenario, "recovery_s": round(recovery_s, 1), "lost": lost}
        row.update(duplicated=duplicated, **more)
        self.report.append(row)
        print(f"\n[multihost] {json.dumps(row)}")


@pytest.fixture(scope="module")
def cluster(artifacts: Path, wait_until: Callable[..., Any]) -> Iterator[Cluster]:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    logs = artifacts / "multihost"
    settings = Settings.from_env(
        {},
        model="py:standins:sleeping",  # bench/standins.py, on PYTHONPATH below
        visibility_timeout_s=VISIBILITY_S,
        task_time_limit_s=VISIBILITY_S - 2,
        chunk_size=16,
        max_batch_size=16,
        result_ttl_s=900,
    )
    env = {"PYTHONPATH": str(ROOT / "bench"), "BENCH_SLEEP_S": str(SLEEP_S)}
    with Network() as net:
        stack = HostStack(net, settings, logs, env)
        try:
            stack.start_redis()
            stack.start_api()
            client = connect_redis(stack.redis_url)  # reconnects after the Redis cut
            c = Cluster(net, stack, client, _images(N, seed=17), wait_until)
            c.http.headers.update(stack.headers)
            yield c
        finally:
            stack.close()
    (logs / "report.json").write_text(json.dumps(c.report, indent=2))
    print("\n[multihost] scenario | recovery s | lost | duplicated")
    for row in c.report:
        print(f"[multihost] {row['scenario']} | {row['recovery_s']} | {row['lost']} | {row['duplicated']}")


@pytest.fixture()
def two_workers(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[tuple[Host, Host]]:
    """Two fresh worker hosts, serving; removed (with whatever the test left) afterwards.
    Named after the test (``test_worker_link_cut...`` -> ``wlc-1``, ``wlc-2``), each its own log."""
    prefix = "".join(word[0] for word in request.node.name.removeprefix("test_").split("_")[:3])
    w1 = cluster.stack.add_worker(f"{prefix}-1")
    w2 = cluster.stack.add_worker(f"{prefix}-2")
    cluster.stack.wait_workers(2)
    yield w1, w2
    for w in (w1, w2):
        if w.is_cut and w.name in cluster.stack.workers:
            cluster.net.heal(w)
    cluster.stack.stop_workers()


def _mid_batch(cluster: Cluster, job_id: str, worker: Host, before: int) -> None:
    """Return once ``worker`` stored some of the job and the job is far from done."""
    cluster.wait_classified(worker, before + 16, job_id=job_id)
    done = cluster.status(job_id)["done"]
    assert done < N // 2, f"the job is nearly done before the fault ({done}/{N}): not mid-batch"


def test_worker_link_cut_5s_then_past_visibility_timeout(
    cluster: Cluster, two_workers: tuple[Host, Host]
) -> None:
    cut, steady = two_workers
    net = cluster.net
    start_total = {w.name: cluster.classified(w) or 0 for w in two_workers}

    # 1. Cut for 5 s, shorter than the visibility timeout: the worker keeps its messages and
    #    carries on by itself when the link returns.
    job_a = cluster.submit()
    _mid_batch(cluster, job_a, cut, start_total[cut.name])
    held = cluster.classified(cut) or 0  # nothing more is stored while the link is down
    net.cut(cut)
    assert cluster.classified(cut) is None  # really unreachable
    time.sleep(5)  # the cut lasts 5 s
    healed = time.time()
    net.heal(cut)
    resumed = cluster.wait_classified(cut, held, job_id=job_a) - healed  # its next stored result
    st = cluster.assert_exactly_once(job_a)
    cluster.wait_consuming(cut)
    consuming = time.time() - healed
    cluster.record(
        "worker link cut 5 s mid-batch",
        st["finished_at"] - healed,
        lost=st["lost"],
        duplicated=st["duplicated"],
        worker_resumed_after_heal_s=round(resumed, 1),
        worker_consuming_after_heal_s=round(consuming, 1),
        redelivered_chunks=cluster.redelivered_chunks(job_a),
    )

    # 2. Cut for longer than the visibility timeout: the other worker restores the cut one's
    #    unacknowledged messages and finishes them; the cut worker comes back by itself.
    long_cut = VISIBILITY_S + 6
    cluster.wait_consuming(cut)  # or the other worker may take all of the next job
    job_b = cluster.submit()
    _mid_batch(cluster, job_b, cut, cluster.classified(cut) or 0)
    t_cut = time.time()
    net.cut(cut)
    time.sleep(long_cut)
    healed = time.time()
    done_at_heal = cluster.status(job_b)["done"]
    net.heal(cut)
    st_b = cluster.assert_exactly_once(job_b)
    cluster.wait_until(lambda: cluster.answers_ping(cut), timeout=60, interval=0.2, message="a ping answered")
    cluster.wait_consuming(cut)
    reconnect = time.time() - healed
    # ... and takes work again: the next job is shared by both workers.
    seen = cluster.classified(cut) or 0
    job_c = cluster.submit()
    cluster.wait_classified(cut, seen, job_id=job_c)
    cluster.assert_exactly_once(job_c)
    cluster.record(
        f"worker link cut {long_cut} s (visibility timeout {VISIBILITY_S} s) mid-batch",
        st_b["finished_at"] - t_cut,
        lost=st_b["lost"],
        duplicated=st_b["duplicated"],
        job_done_after_heal_s=round(st_b["finished_at"] - healed, 1),
        done_at_heal=done_at_heal,
        worker_reconnected_after_heal_s=round(reconnect, 1),
        redelivered_chunks=cluster.redelivered_chunks(job_b),
    )

    # Each worker counts the results its store call reported as newly stored: never more than
    # one per image across both. (Fewer when a reply was lost in a cut: stored, unreported.)
    counted = sum((cluster.classified(w) or 0) - start_total[w.name] for w in two_workers)
    assert counted <= 3 * N, f"workers stored {counted} results for {3 * N} images"
    print(f"\n[multihost] worker counters: {counted} of {3 * N} (replies lost in cuts: {3 * N - counted})")
    assert cluster.pending() == 0


#: The API's publish retries (api/services.py): a broker that is away fails a request fast.
PUBLISH_RETRIES = {"max_retries": 2, "interval_start": 0, "interval_step": 0.2, "interval_max": 0.5}
SMALL = 3  # images of a probe's small job (interactive: at most INTERACTIVE_MAX_IMAGES)
BULK = 24  # images of a probe's bulk job


@dataclass
class Probe:
    kind: str
    started: float
    took: float
    code: int  # 0: no HTTP answer (timeout, connection error)
    retry_after: str | None
    detail: str = ""  # the job id of a 202, the exception of a request that got no answer


def _probe_loop(cluster: Cluster, kind: str, job_id: str, stop: threading.Event, out: list[Probe]) -> None:
    """One client, asking again every 0.5 s: submit, poll, readiness or liveness."""
    # A small job goes to the interactive queue through the shared publisher, a bigger one
    # is published by the request itself: both paths are probed.
    files = cluster.files[: SMALL if kind == "submit" else BULK]
    while not stop.is_set():
        t0 = time.time()
        try:
            if kind.startswith("submit"):
                parts = [("files", f) for f in files]
                r = cluster.http.post(f"{cluster.api}/v1/jobs", files=parts, timeout=CLIENT_TIMEOUT_S)
            elif kind == "poll":
                r = cluster.http.get(f"{cluster.api}/v1/jobs/{job_id}", timeout=CLIENT_TIMEOUT_S)
            else:
                r = cluster.http.get(f"{cluster.api}/{kind}", timeout=CLIENT_TIMEOUT_S)
            job = r.json().get("job_id", "") if r.status_code == 202 else ""
            out.append(Probe(kind, t0, time.time() - t0, r.status_code, r.headers.get("Retry-After"), job))
        except requests.RequestException as exc:
            out.append(Probe(kind, t0, time.time() - t0, 0, None, repr(exc)))
        stop.wait(0.5)


def test_redis_host_cut_off_20s_api_answers_503_and_everything_resumes(
    cluster: Cluster, two_workers: tuple[Host, Host]
) -> None:
    net = cluster.net
    redis_host = cluster.stack.redis
    assert redis_host is not None
    job = cluster.submit()
    _mid_batch(cluster, job, two_workers[0], cluster.classified(two_workers[0]) or 0)

    probes: list[Probe] = []
    stop = threading.Event()
    kinds = ("submit", "submit-bulk", "poll", "readyz", "healthz")
    threads = [
        threading.Thread(target=_probe_loop, args=(cluster, k, job, stop, probes), daemon=True) for k in kinds
    ]
    # A publisher whose broker connection was open before the cut, configured as the API's
    # (celery_config, the API's publish retries): its publish must fail in bounded time.
    publisher = create_celery(cluster.stack.client_settings())
    publisher.conf.task_publish_retry_policy = PUBLISH_RETRIES
    publisher.send_task("multihost.noop", queue="multihost-probe")
    published: list[tuple[float, str]] = []

    def publish_during_cut() -> None:
        t0 = time.monotonic()
        try:
            publisher.send_task("multihost.noop", queue="multihost-probe")
            published.append((time.monotonic() - t0, "published"))
        except Exception as exc:  # noqa: BLE001 - what it raised is the finding
            published.append((time.monotonic() - t0, type(exc).__name__))

    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        net.cut(redis_host)  # cut off from everything: API, workers and this client
        t_cut = time.time()  # after: a request that started before the cut may still succeed
        threading.Thread(target=publish_during_cut, daemon=True).start()
        time.sleep(20)
        # Longer when a request caught by the cut held its client past that (it may take up to
        # API_BOUND_S; one started within the cut fails on its first Redis command, after
        # SOCKET_TIMEOUT_S): until a request of each kind has started and been answered in it.
        cluster.wait_until(
            lambda: all(any(p.kind == k and p.started >= t_cut for p in probes) for k in kinds),
            timeout=API_BOUND_S + 2 * SOCKET_TIMEOUT_S,
            interval=0.2,
            message="a request of each kind started and was answered within the cut",
        )
        t_heal = time.time()
        net.heal(redis_host)
        cluster.wait_until(
            lambda: any(p.kind == "readyz" and p.code == 200 and p.started >= t_heal for p in probes),
            timeout=60,
            interval=0.2,
            message="/readyz answers 200 again",
        )
        ready_at = time.time()
        cluster.wait_until(
            lambda: any(p.kind == "submit" and p.code == 202 and p.started >= t_heal for p in probes),
            timeout=60,
            interval=0.2,
            message="a submission is accepted again",
        )
    finally:
        stop.set()
        for t in threads:
            t.join(60)

    publisher.close()
    # A publish on a connection the partition left open fails (503 in the API), never hangs.
    assert published and published[0][1] != "published", published
    assert published[0][0] <= API_BOUND_S, published
    # Never a 500, never a hang: every request got an HTTP answer within the bound.
    odd = [p for p in probes if p.code not in (200, 202, 503)]
    assert not odd, odd
    slowest = max(probes, key=lambda p: p.took)
    assert slowest.took <= API_BOUND_S, slowest
    # While Redis was away: 503 with Retry-After from everything that needs Redis, and liveness.
    during = [p for p in probes if p.started >= t_cut and p.started + p.took < t_heal]
    for kind in ("submit", "submit-bulk", "poll", "readyz"):
        answers = [p for p in during if p.kind == kind]
        assert answers, f"no {kind} request ran during the cut"
        assert all(p.code == 503 and p.retry_after for p in answers), answers
    assert all(p.code == 200 for p in during if p.kind == "healthz")

    # Everything resumes: the big job and every accepted submission, each exactly once.
    st = cluster.assert_exactly_once(job, timeout=120)
    accepted = [(p.detail, SMALL if p.kind == "submit" else BULK) for p in probes if p.code == 202]
    for job_id, n in accepted:
        cluster.assert_exactly_once(job_id, n=n, timeout=120)
    cluster.wait_until(
        lambda: cluster.pending() == 0, timeout=90, interval=0.2, message="no image left pending"
    )
    cluster.record(
        "Redis host cut off from everything for 20 s mid-batch",
        st["finished_at"] - t_heal,
        lost=st["lost"],
        duplicated=st["duplicated"],
        cut_s=round(t_heal - t_cut, 1),
        ready_after_heal_s=round(ready_at - t_heal, 1),
        answers_503_during_cut=sum(1 for p in during if p.code == 503),
        slowest_answer_s=round(slowest.took, 1),
        publish_failed_after_s=round(published[0][0], 1),
        publish_error=published[0][1],
        submissions_accepted=len(accepted),
        redelivered_chunks=cluster.redelivered_chunks(job),
    )


def test_worker_host_removed_for_good_the_other_finishes(
    cluster: Cluster, two_workers: tuple[Host, Host]
) -> None:
    gone, survivor = two_workers
    job = cluster.submit()
    _mid_batch(cluster, job, gone, cluster.classified(gone) or 0)
    t_gone = time.time()
    # The host disappears without a goodbye: its link goes first (no FIN or RST reaches
    # Redis), then its processes (SIGKILL) and its namespace.
    cluster.net.cut(gone)
    cluster.stack.remove_worker(gone)
    assert gone.netns not in netns.namespaces()
    st = cluster.assert_exactly_once(job, timeout=150)
    cluster.wait_until(
        lambda: cluster.pending() == 0, timeout=90, interval=0.2, message="no image left pending"
    )
    assert cluster.answers_ping(survivor)
    cluster.record(
        "one of two worker hosts removed for good (namespace deleted) mid-batch",
        st["finished_at"] - t_gone,
        lost=st["lost"],
        duplicated=st["duplicated"],
        redelivered_chunks=cluster.redelivered_chunks(job),
    )


def _crashed_run(action: str) -> tuple[str, str]:
    """A child process makes a network with one host, then ``action`` ends it: returns its
    namespace and bridge (which must be gone once the harness cleaned up)."""
    code = (
        "import sys, time\n"
        "from batchvision.testing.netns import Network\n"
        "net = Network().create()\n"
        "host = net.add_host('probe')\n"
        "print(host.netns, net.bridge, flush=True)\n"
        "time.sleep(120)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    ns, bridge = proc.stdout.readline().split()
    assert ns in netns.namespaces() and netns.link_exists(bridge)
    if action == "kill":
        proc.kill()
    else:
        proc.terminate()
    proc.wait(30)
    proc.stdout.close()
    return ns, bridge


def test_harness_cleans_up_on_sigterm_and_after_a_crashed_run() -> None:
    reason = netns.unavailable()
    if reason:
        pytest.skip(f"multi-host tests need network namespaces: {reason}")
    # SIGTERM: the guard deletes the run's namespaces, links and hosts files on the way out.
    ns, bridge = _crashed_run("terminate")
    assert ns not in netns.namespaces() and not netns.link_exists(bridge)
    assert not (netns.NETNS_ETC / ns).exists()
    # SIGKILL leaves them behind; the next run deletes them before it starts.
    ns, bridge = _crashed_run("kill")
    assert ns in netns.namespaces()
    with Network() as net:
        assert ns not in netns.namespaces() and not netns.link_exists(bridge)
        host = net.add_host("probe")
        assert host.netns in netns.namespaces()
    # A normal exit (here after an exception in the block) deletes everything too.
    with pytest.raises(RuntimeError), Network() as net:
        host = net.add_host("probe")
        raise RuntimeError("a failing test")
    assert host.netns not in netns.namespaces() and not netns.link_exists(net.bridge)
