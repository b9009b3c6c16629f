"""How many cores this process may use: the CPUs it may run on, bounded by a container's CPU limit.

A container's CPU limit (Kubernetes `resources.limits.cpu`, `docker run --cpus`) is a CFS quota,
not a CPU set: the process still sees every core of the node in its affinity mask. Sizing the
engine's instances and threads, or the frontend processes, from the node's cores would start far
more threads than the limit lets run, and each would be throttled. So the quota counts too, as
cgroup v2 (`cpu.max`) or v1 (`cpu.cfs_quota_us` / `cpu.cfs_period_us`) gives it.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def cgroup_cpu_limit(root: Path = CGROUP_ROOT) -> float | None:
    """The CPU limit of this process's cgroup in cores, or None where there is none (no quota,
    not Linux, cgroup files unreadable)."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # cgroup v2: "max 100000" or "400000 100000"
        return None if quota == "max" else int(quota) / int(period)
    except (OSError, ValueError):
        pass
    for folder in (root / "cpu", root / "cpu,cpuacct", root):  # cgroup v1, as mounted by Docker and Kubernetes
        try:
            quota = int((folder / "cpu.cfs_quota_us").read_text())
            period = int((folder / "cpu.cfs_period_us").read_text())
        except (OSError, ValueError):
            continue
        return quota / period if quota > 0 and period > 0 else None
    return None


def available_cores(root: Path = CGROUP_ROOT) -> int:
    """The cores this process may use: its CPU affinity, at most its cgroup's CPU limit rounded
    down (at least 1)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    limit = cgroup_cpu_limit(root)
    return max(1, min(cores, math.floor(limit))) if limit is not None else cores
