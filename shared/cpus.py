"""How many CPUs this process may use: what the decode pool, torch's threads and the supervisor's split size
themselves to. os.cpu_count() counts the node's cores, so a pod on a 192-thread GPU node would start 192
decode processes whatever its CPU limit."""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path | None = None) -> int:
    """The CPUs this process may run on (its affinity: a cpuset, taskset, Kubernetes' static CPU manager),
    at most its CPU limit (the quota of the cgroup at ``cgroup_root``, default CGROUP_ROOT, rounded up);
    at least 1."""
    cpus = _affinity()
    quota = cgroup_cpu_limit(cgroup_root or CGROUP_ROOT)
    return max(1, min(cpus, quota) if quota is not None else cpus)


def _affinity() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def cgroup_cpu_limit(cgroup_root: Path) -> int | None:
    """The CPU limit of the cgroup at ``cgroup_root`` in whole CPUs (a quota of 1.5 CPUs is 2), or None when
    there is none or it cannot be read: cgroup v2's cpu.max ("max 100000", "400000 100000"), else cgroup v1's
    cpu.cfs_quota_us and cpu.cfs_period_us (quota -1: none)."""
    v2 = _read(cgroup_root / "cpu.max")
    if v2 is not None:
        fields = v2.split()
        return _whole_cpus(fields[0], fields[1]) if len(fields) == 2 else None
    v1 = cgroup_root / "cpu"
    quota, period = _read(v1 / "cpu.cfs_quota_us"), _read(v1 / "cpu.cfs_period_us")
    return _whole_cpus(quota, period) if quota is not None and period is not None else None


def _whole_cpus(quota: str, period: str) -> int | None:
    try:
        quota_us, period_us = int(quota), int(period)
    except ValueError:  # "max": no limit
        return None
    if quota_us <= 0 or period_us <= 0:  # v1 writes -1 for no limit
        return None
    return max(1, math.ceil(quota_us / period_us))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None
