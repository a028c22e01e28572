"""``batchvision up``'s supervisor and its stop signals, in a child process (signal handlers are
the process's)."""

from __future__ import annotations

import subprocess
import sys
import textwrap

_CHILD = textwrap.dedent(
    """
    import signal, time
    from batchvision.cli.runner import Supervisor

    sup = Supervisor([])
    sup.install_signal_handlers()
    # The signal lands while the main thread holds the lock of the supervisor's stop event (as
    # it does for an instant inside every wait): the handler must not need that lock.
    with sup._stop._cond:
        signal.raise_signal(signal.SIGTERM)
    start = time.monotonic()
    assert sup._wait(30), "the wait did not see the stop"
    assert time.monotonic() - start < 5, "the wait was not woken"
    assert sup.signum == signal.SIGTERM
    print("ok")
    """
)


def test_a_stop_signal_while_the_stop_event_is_locked_still_stops_the_supervisor() -> None:
    try:
        out = subprocess.run([sys.executable, "-c", _CHILD], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired as exc:
        raise AssertionError("the supervisor deadlocked in its signal handler") from exc
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


_DURING_A_WAIT = textwrap.dedent(
    """
    import os, signal, threading, time
    from batchvision.cli.runner import Supervisor

    sup = Supervisor([])
    sup.install_signal_handlers()
    threading.Timer(0.2, os.kill, (os.getpid(), signal.SIGTERM)).start()
    start = time.monotonic()
    assert sup._wait(30), "the wait did not see the stop"
    assert time.monotonic() - start < 5, "the signal did not wake the wait"
    print("ok")
    """
)


def test_a_stop_signal_during_a_wait_ends_the_wait() -> None:
    out = subprocess.run([sys.executable, "-c", _DURING_A_WAIT], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"
