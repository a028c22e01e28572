"""The job waiter's listener stops at interpreter exit, before logging shuts down."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from batchvision.cli.redis_server import free_port

# The listener of a waiter whose Redis is gone retries and logs; at exit, the exit functions
# (logging's shutdown among them) run, then the interpreter ends. A listener still running by
# then logs into closed handlers ("--- Logging error ---" on stderr).
SCRIPT = textwrap.dedent(
    """
    import atexit, logging, sys, threading
    import redis
    from batchvision.server.waiter import Waiter

    logged = threading.Event()

    class Seen(logging.Handler):
        def emit(self, record):
            logged.set()

    logging.getLogger("batchvision.server.waiter").addHandler(Seen())
    waiter = Waiter(redis.Redis(port=int(sys.argv[1])), lambda job_id: False, recheck_s=0.05)
    waiter.mark()  # starts the listener, which cannot connect
    assert logged.wait(30), "the listener never tried"
    atexit._run_exitfuncs()  # what the interpreter runs at exit
    waiter._thread.join(10)
    print("stopped" if not waiter._thread.is_alive() else "still running")
    """
)


def test_the_listener_stops_at_exit() -> None:
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, str(free_port())], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "stopped", out.stderr
