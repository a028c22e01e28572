"""The CPUs a worker sizes its pools to: its affinity, at most its cgroup's CPU quota (a
container's CPU limit), read from cgroup v2 or v1 file trees made here."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from batchvision.server.cpus import available_cpus, cgroup_quota, limited_cpus

AFFINITY = len(os.sched_getaffinity(0))


def _tree(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "cgroup"
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    (tmp_path / "proc-cgroup").write_text(proc)
    return root, tmp_path / "proc-cgroup"


@pytest.mark.parametrize(
    ("proc", "files", "quota"),
    [
        # v2: the pod's limit of 1.5 CPUs on its own cgroup, none above it.
        (
            "0::/kubepods/pod1/ctr\n",
            {"kubepods/pod1/ctr/cpu.max": "150000 100000\n", "cpu.max": "max 100000"},
            1.5,
        ),
        # v2: the tighter limit is the parent's.
        ("0::/a/b\n", {"a/b/cpu.max": "max 100000", "a/cpu.max": "50000 100000"}, 0.5),
        # v2 without any limit, and a container whose cgroup is the root of its namespace.
        ("0::/a\n", {"a/cpu.max": "max 100000"}, None),
        ("0::/\n", {"cpu.max": "200000 100000"}, 2.0),
        # v1: the cpu controller's quota and period.
        (
            "4:cpu,cpuacct:/docker/x\n",
            {"cpu/docker/x/cpu.cfs_quota_us": "300000", "cpu/docker/x/cpu.cfs_period_us": "100000"},
            3.0,
        ),
        (
            "4:cpu,cpuacct:/docker/x\n",
            {"cpu/docker/x/cpu.cfs_quota_us": "-1", "cpu/docker/x/cpu.cfs_period_us": "100000"},
            None,
        ),
        # No cgroup file system at all.
        ("", {}, None),
    ],
)
def test_the_quota_is_read_from_v2_and_v1_trees(
    tmp_path: Path, proc: str, files: dict[str, str], quota: float | None
) -> None:
    root, proc_file = _tree(tmp_path, proc, files)
    assert cgroup_quota(root, proc_file) == quota
    expected = AFFINITY if quota is None else max(1, min(AFFINITY, -(-quota // 1)))
    assert available_cpus(root, proc_file) == expected


def test_a_limit_below_the_affinity_sizes_the_runtimes_pools(tmp_path: Path) -> None:
    root, proc_file = _tree(tmp_path, "0::/\n", {"cpu.max": "50000 100000"})  # half a CPU
    assert available_cpus(root, proc_file) == 1
    assert limited_cpus(root, proc_file) == (1 if AFFINITY > 1 else None)
    unlimited, proc_file = _tree(tmp_path / "free", "0::/\n", {"cpu.max": "max 100000"})
    assert limited_cpus(unlimited, proc_file) is None  # the runtimes keep their own default
