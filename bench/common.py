"""Shared helpers of the benchmarks: the image set, the stack, timing."""

from __future__ import annotations

import os
import statistics
import sys
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent))
# Workers the benchmarks start load the stand-in models (bench/standins.py) from here.
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(BENCH), os.environ.get("PYTHONPATH")]))

from batchvision.cli.local import stack, wait_for_workers  # noqa: E402
from batchvision.cli.redis_server import free_port  # noqa: E402, F401
from batchvision.cli.runner import Supervisor  # noqa: E402
from batchvision.core.settings import Settings  # noqa: E402
from batchvision.core.synthetic import photo_like  # noqa: E402
from batchvision.testing.servers import RedisServer  # noqa: E402, F401

OUT = Path(__file__).resolve().parent / "out"


def photo_set(n: int, folder: Path | None = None) -> Path:
    """``n`` photo-like JPEGs, alternating 640x480 and 1440x1080 (cached on disk)."""
    folder = folder or OUT / f"photos-{n}"
    if folder.exists() and len(list(folder.glob("*.jpg"))) == n:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        size = (640, 480) if i % 2 == 0 else (1440, 1080)
        (folder / f"img_{i:05d}.jpg").write_bytes(photo_like(size, seed=i))
    return folder


@dataclass
class Stack:
    """A running benchmark stack: its settings and the processes behind it."""

    settings: Settings
    redis: RedisServer
    supervisor: Supervisor

    def pids(self) -> dict[str, int]:
        """Pid of each running process by name: ``redis`` and the started services.

        ``api`` is the gunicorn master (``batchvision api`` execs into it; its workers are its
        children), ``worker`` the Celery worker process (``batchvision worker`` execs into it).
        """
        out = {"redis": self.redis.proc.pid} if self.redis.proc is not None else {}
        for svc in self.supervisor.services:
            if svc.proc is not None and svc.proc.poll() is None:
                out[svc.name] = svc.proc.pid
        return out


@contextmanager
def stack_processes(
    settings: Settings, names: tuple[str, ...] = ("api", "worker"), log_dir: Path | None = None
) -> Iterator[Stack]:
    """Redis plus the named services of `batchvision up`, on free ports, with their processes.

    With ``log_dir``, each service's output (gunicorn's access log among it) goes to
    ``<log_dir>/<name>.log`` instead of this process's terminal.
    """
    with RedisServer() as redis:
        ports = {"worker_metrics_port": free_port()} if settings.worker_metrics_port else {}
        s = settings.replace(redis_url=redis.url, api_port=free_port(), **ports)
        sup = Supervisor([svc for svc in stack(s, None, flower=False) if svc.name in names])
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            for svc in sup.services:
                svc.log_path = str(log_dir / f"{svc.name}.log")
        sup.start()
        try:
            sup.wait_healthy(timeout=300)
            if "worker" in names:
                wait_for_workers(s)
            yield Stack(s, redis, sup)
        finally:
            sup.stop()


@contextmanager
def running_stack(settings: Settings, names: tuple[str, ...] = ("api", "worker")) -> Iterator[Settings]:
    """Redis plus the named services of `batchvision up`, on free ports."""
    with stack_processes(settings, names) as st:
        yield st.settings


def pct(values: list[float], p: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(round(p / 100 * (len(values) - 1))))]


def table(rows: Sequence[Sequence[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    return "\n".join(lines)


def median(values: list[float]) -> float:
    return statistics.median(values)


_TICKS = os.sysconf("SC_CLK_TCK")


def _stat_fields(pid: int) -> list[str]:
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    raw = Path(f"/proc/{pid}/stat").read_text()
    return raw[raw.rindex(")") + 2 :].split()


def _children(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if int(_stat_fields(int(entry))[1]) == pid:
                    out.append(int(entry))
            except (OSError, ValueError, IndexError):
                continue  # exited meanwhile
    return out


def cpu_seconds(pid: int, children: bool = True) -> float:
    """CPU seconds (user + system) of ``pid`` from ``/proc/<pid>/stat``.

    With ``children``: plus its reaped children (``cutime + cstime``) and, recursively, its
    live descendants (a gunicorn master's workers are live children: the kernel adds their time
    to ``cutime`` only once they exit).
    """
    fields = _stat_fields(pid)
    # After the name: state, ppid, ...; utime, stime, cutime, cstime are fields 14-17 of the line.
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    total = utime + stime
    if children:
        total += cutime + cstime
        for child in _children(pid):
            try:
                total += round(cpu_seconds(child) * _TICKS)
            except OSError:
                continue
    return total / _TICKS
