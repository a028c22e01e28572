"""The local runner: supervision (restart what dies, stop everything) and `batchvision up`."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest

from batchvision.cli.runner import Service, ServiceFailed, Supervisor
from batchvision.core.settings import Settings
from batchvision.core.synthetic import labelled_files


def test_supervisor_restarts_a_dead_process_and_stops_all(wait_until: Callable[..., Any]) -> None:
    crashy = Service("crashy", [sys.executable, "-c", "import time; time.sleep(0.2)"], {})
    steady = Service("steady", [sys.executable, "-c", "import time; time.sleep(60)"], {})
    sup = Supervisor([crashy, steady], max_backoff_s=0.1)
    sup.start()

    def restarted_twice() -> bool:
        sup.check_once()
        return crashy.restarts >= 2

    wait_until(restarted_twice, timeout=10, message="crashy restarted twice")
    assert steady.restarts == 0
    sup.stop()
    assert steady.proc is not None and steady.proc.poll() is not None
    assert crashy.proc is not None and crashy.proc.poll() is not None


def _left_in_sessions(sessions: set[int]) -> list[str]:
    """Live processes in any of ``sessions`` (each service is its own session, and whatever
    it started stays in it unless it calls setsid itself)."""
    left = []
    for p in psutil.process_iter(["pid", "name", "status"]):
        try:
            if os.getsid(p.pid) in sessions and p.info["status"] != psutil.STATUS_ZOMBIE:
                left.append(f"{p.pid} {p.info['name']} (session {os.getsid(p.pid)})")
        except (ProcessLookupError, PermissionError, psutil.Error):
            continue  # gone meanwhile
    return left


def test_session_check_sees_a_running_service() -> None:
    # The check below would pass for nothing if it could not see a live service.
    svc = Service("steady", [sys.executable, "-c", "import time; time.sleep(60)"], {})
    svc.start()
    assert svc.proc is not None
    try:
        assert _left_in_sessions({svc.proc.pid})
    finally:
        svc.stop()
    assert _left_in_sessions({svc.proc.pid}) == []


def test_a_service_that_exits_before_it_is_ready_fails_at_once_with_its_output(tmp_path: Path) -> None:
    # Not a 60 s wait for a readiness that cannot come, and the reason in the error.
    script = "import sys; print('port 6399 is already in use'); sys.exit(1)"
    svc = Service("redis", [sys.executable, "-c", script], {}, ready=lambda: False)
    svc.log_path = str(tmp_path / "redis.log")
    sup = Supervisor([svc])
    try:
        with pytest.raises(ServiceFailed, match="port 6399 is already in use"):
            sup.start(ready_timeout=120)
    finally:
        sup.stop()


def test_a_service_that_crashed_thousands_of_times_is_still_restarted(wait_until: Callable[..., Any]) -> None:
    crashy = Service("crashy", [sys.executable, "-c", "pass"], {})
    sup = Supervisor([crashy], max_backoff_s=0.01)
    sup.start()
    crashy.restarts = 5000  # the backoff's exponent must not overflow
    try:
        wait_until(lambda: (sup.check_once(), crashy.restarts > 5000)[1], timeout=10, message="restarted")
    finally:
        sup.stop()


@contextmanager
def _supervisor_process(
    tmp_path: Path, wait_until: Callable[..., Any], *, ignore_hangups: bool = False
) -> Iterator[tuple[subprocess.Popen[bytes], Path, int]]:
    """A process that supervises one long-running service (optionally with hangups ignored,
    as under nohup), once it started it: (the process, its output file, the service's pid).
    It prints "stopped by N" when a signal stopped it."""
    script = (
        "import signal, sys\n"
        + ("signal.signal(signal.SIGHUP, signal.SIG_IGN)\n" if ignore_hangups else "")
        + "from batchvision.cli.runner import Service, Supervisor, Stopped\n"
        "svc = Service('steady', [sys.executable, '-c', 'import time; time.sleep(120)'], {})\n"
        "sup = Supervisor([svc], stop_grace_s=1.0)\n"
        "sup.install_signal_handlers()\n"
        "try:\n"
        "    with sup.interruptible():\n"
        "        sup.start()\n"
        "        print('started', svc.proc.pid, flush=True)\n"
        "        sup.run_forever()\n"
        "except Stopped as stop:\n"
        "    print('stopped by', stop.signum, flush=True)\n"
        "finally:\n"
        "    sup.stop()\n"
    )
    out = tmp_path / "out"
    with out.open("w") as fh:
        proc = subprocess.Popen([sys.executable, "-c", script], stdout=fh, start_new_session=True)
    try:
        wait_until(lambda: "started" in out.read_text(), timeout=30, message="the supervisor started")
        yield proc, out, int(out.read_text().split()[1])
    finally:
        if proc.poll() is None:
            proc.kill()
        if _left_in_sessions({proc.pid}):
            os.killpg(proc.pid, signal.SIGKILL)


def test_sighup_stops_the_supervisor_and_its_services(tmp_path: Path, wait_until: Callable[..., Any]) -> None:
    # The terminal of `batchvision up` closes: its services, in sessions of their own, must
    # not outlive it.
    with _supervisor_process(tmp_path, wait_until) as (proc, out, child):
        proc.send_signal(signal.SIGHUP)
        assert proc.wait(30) == 0
        assert f"stopped by {int(signal.SIGHUP)}" in out.read_text()
        wait_until(lambda: not _left_in_sessions({child}), timeout=15, message="the service stopped")


def test_under_nohup_sighup_leaves_the_stack_running(tmp_path: Path, wait_until: Callable[..., Any]) -> None:
    # `nohup batchvision up &`: hangups are ignored on purpose. A SIGHUP then a SIGTERM: the
    # SIGTERM is what stops it (pending together, SIGHUP would be delivered first).
    with _supervisor_process(tmp_path, wait_until, ignore_hangups=True) as (proc, out, _):
        proc.send_signal(signal.SIGHUP)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
        assert f"stopped by {int(signal.SIGTERM)}" in out.read_text(), out.read_text()


def test_up_refuses_a_sample_folder_that_is_not_there_before_starting_anything(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    from batchvision.cli.main import main

    assert main(["up", "--sample", str(tmp_path / "nope")]) == 2
    assert "no such folder" in capsys.readouterr().err


def test_the_local_redis_data_goes_with_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    # Its append-only file holds every image uploaded in the run.
    from batchvision.cli.local import local_settings

    monkeypatch.delenv("BATCHVISION_REDIS_URL", raising=False)
    _, redis, _ = local_settings()
    assert redis is not None and redis.data_dir.is_dir()
    redis.close()
    assert not redis.data_dir.exists()


@dataclass
class UpRun:
    """One `batchvision up ... --exit-after-demo` run: its exit code, output, and the pid of
    each service it started (each is its own session)."""

    returncode: int
    stdout: str
    stderr: str
    started: dict[str, int]


@contextmanager
def up_run(tmp_path: Path, env: dict[str, str], *args: str) -> Iterator[UpRun]:
    """Run `batchvision up *args` to its end; afterwards kill whatever a failed run leaked."""
    # Output to files, not pipes: a process left behind would hold a pipe open and hang the
    # test instead of failing it.
    out_path, err_path = tmp_path / "up.out", tmp_path / "up.err"
    with out_path.open("w") as out, err_path.open("w") as err:
        proc = subprocess.run(
            [sys.executable, "-m", "batchvision.cli", "up", *args],
            cwd=tmp_path,
            env=env,
            stdout=out,
            stderr=err,
            timeout=600,
        )
    stderr = err_path.read_text()
    # The runner reports the pid of each service it starts.
    started = {name: int(pid) for name, pid in re.findall(r"started (\w+) \(pid (\d+)\)", stderr)}
    try:
        yield UpRun(proc.returncode, out_path.read_text(), stderr, started)
    finally:
        for sid in started.values():  # do not leave what a failed run leaked running
            if _left_in_sessions({sid}):
                os.killpg(sid, signal.SIGKILL)


def _up_env(demo_model: Path, **settings: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("BATCHVISION_")}
    return {**env, "BATCHVISION_MODEL": str(demo_model), **settings}


@pytest.mark.slow
def test_up_starts_the_stack_classifies_and_stops(
    demo_model: Path, tmp_path: Path, wait_until: Callable[..., Any]
) -> None:
    temp = tmp_path / "tmp"  # what the services leave in the temp directory
    temp.mkdir()
    with up_run(tmp_path, _up_env(demo_model, TMPDIR=str(temp)), "--demo", "--exit-after-demo") as run:
        assert run.returncode == 0, run.stderr[-3000:]
        for name in ("redis", "api", "worker", "flower"):
            assert re.search(rf"^  {name}\s+(redis|http)://127\.0\.0\.1:\d+", run.stdout, re.M), run.stdout
        assert "succeeded, 12 classified, 0 failed" in run.stdout
        # Without API keys, the secret its webhooks are signed with (its Redis is this run's own).
        assert re.search(r"^  webhook signing secret: whsec_\S{20,}$", run.stdout, re.M), run.stdout
        rows = re.findall(r"^  (\w+)_\d+\.jpg\s+(\w+)\s+[0-9.]+$", run.stdout, re.M)
        assert len(rows) == 12
        assert sum(expected == got for expected, got in rows) >= 11
        assert set(run.started) == {"redis", "api", "worker", "flower"}, run.stderr[-3000:]
        # The API's metrics directory (made for that one server) went with it.
        assert not list(temp.glob("batchvision-*")), list(temp.iterdir())
        # Every process `up` started, and everything those started, is gone.
        sessions = set(run.started.values())
        try:
            wait_until(lambda: not _left_in_sessions(sessions), timeout=15)
        except AssertionError:
            raise AssertionError(f"left running after up stopped: {_left_in_sessions(sessions)}") from None


def test_up_classifies_a_sample_through_api_keys_in_parts(demo_model: Path, tmp_path: Path) -> None:
    # The API wants keys, the shell has no BATCHVISION_API_KEY: the sample goes with the first
    # key the API has, as an upload in parts (a folder of any size), and its non-image is skipped.
    # One image is cut short: the job is partial, and --exit-after-demo says so (exit 3), as
    # `submit --wait` would, so a CI check on the demo fails.
    sample = tmp_path / "sample"
    sample.mkdir()
    for name, data, _ in labelled_files(5, seed=91):
        (sample / name).write_bytes(data)
    (sample / "cut.jpg").write_bytes(data[: len(data) // 2])
    (sample / "notes.txt").write_text("not an image")
    env = _up_env(demo_model, BATCHVISION_API_KEYS="first-key,second-key")
    with up_run(tmp_path, env, "--sample", str(sample), "--exit-after-demo") as run:
        assert run.returncode == 3, (run.returncode, run.stderr[-3000:])
        assert "partial, 5 classified, 1 failed" in run.stdout, run.stdout
        assert re.search(r"^  cut\.jpg\s+error: ", run.stdout, re.M), run.stdout
        assert "skipped (not an image): notes.txt" in run.stdout
        assert "webhook signing secret" not in run.stdout  # each key reads its own over HTTP


def test_a_local_run_keeps_a_port_whose_last_connections_linger_and_says_when_it_moves(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from batchvision.cli.local import _moved_api_port, _port_or_free

    # A port the last stack served on: its connections, closed by the server first, linger in
    # TIME_WAIT. A server with SO_REUSEADDR (gunicorn) can listen there: it stays the port.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server side closes first: its end waits in TIME_WAIT
    client.close()
    listener.close()
    assert _port_or_free(port) == port
    # A port a program listens on is taken: another one, and the user is told where to look.
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = taken.getsockname()[1]
        assert _port_or_free(busy) != busy
    monkeypatch.delenv("BATCHVISION_API_PORT", raising=False)
    moved = _moved_api_port(Settings.from_env({}, api_port=24754))
    assert moved is not None and "BATCHVISION_API_URL=http://127.0.0.1:24754" in moved
    assert _moved_api_port(Settings.from_env({}, api_port=8000)) is None


def test_a_flower_password_without_a_user_is_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    from batchvision.cli.local import local_settings

    monkeypatch.setenv("BATCHVISION_FLOWER_PASSWORD", "chosen-by-the-operator")
    monkeypatch.delenv("BATCHVISION_FLOWER_USER", raising=False)
    settings, redis, _ = local_settings()
    if redis is not None:
        redis.close()
    assert settings.flower_user == "admin"
    assert settings.flower_password.get_secret_value() == "chosen-by-the-operator"
