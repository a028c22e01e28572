"""How many CPUs this process may use: its CPU affinity, bounded by its cgroup's CPU quota.

A container's CPU limit (Kubernetes ``resources.limits.cpu``, ``docker run --cpus``) is a
quota, not an affinity: a worker limited to 4 CPUs on a 64-core node sees 64 in
``os.sched_getaffinity``, and a thread pool sized to that is throttled by the kernel. The quota
is read from cgroup v2 (``cpu.max`` of the process's cgroup and of each one above it) or v1
(``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def available_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process can keep busy: its affinity, at most its cgroup quota (rounded up)."""
    cpus = len(os.sched_getaffinity(0))
    quota = cgroup_quota(root, proc_cgroup)
    return cpus if quota is None else max(1, min(cpus, math.ceil(quota)))


def limited_cpus(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> int | None:
    """The cgroup quota in whole CPUs where it is below the affinity (a container's CPU limit),
    else ``None``: what a runtime's own thread pools (sized to every core they see) should use."""
    cpus = available_cpus(root, proc_cgroup)
    return cpus if cpus < len(os.sched_getaffinity(0)) else None


def cgroup_quota(root: Path = CGROUP_ROOT, proc_cgroup: Path = Path("/proc/self/cgroup")) -> float | None:
    """The CPU quota of this process's cgroup in CPUs (the smallest along its path), or ``None``
    where there is none (or no cgroup file system to read)."""
    quotas = [q for d in _cgroup_dirs(root, proc_cgroup) if (q := _quota_of(d)) is not None]
    return min(quotas) if quotas else None


def _cgroup_dirs(root: Path, proc_cgroup: Path) -> list[Path]:
    """The process's cgroup directories, its own first, then each one above it up to ``root``:
    for v2 (``0::/path``) under ``root``, for v1 under ``root/cpu``."""
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    dirs: list[Path] = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2, the unified hierarchy
            base = root
        elif "cpu" in controllers.split(","):
            base = root / "cpu"
        else:
            continue
        here = base / path.lstrip("/")
        while True:
            dirs.append(here)
            if here == base or base not in here.parents:
                break
            here = here.parent
    return dirs or [root, root / "cpu"]


def _quota_of(directory: Path) -> float | None:
    try:  # v2: "max 100000" or "<quota> <period>"
        quota, period = (directory / "cpu.max").read_text().split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    try:  # v1: -1 for none
        quota_us = int((directory / "cpu.cfs_quota_us").read_text())
        period_us = int((directory / "cpu.cfs_period_us").read_text())
        return None if quota_us <= 0 or period_us <= 0 else quota_us / period_us
    except (OSError, ValueError):
        return None
