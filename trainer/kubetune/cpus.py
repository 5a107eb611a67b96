"""How many CPUs this process may really use: its affinity mask, capped by a cgroup CPU quota.

Why: in a pod with `limits.cpu: 4` on a 64-core node, os.cpu_count() and torch's default thread count
both say 64. Sixty-four busy threads on a 4-CPU quota are throttled by the kernel for most of each
scheduling period; a training step then runs several times slower than with 4 threads (measured in
docs/benchmarks.md). JVMs and Go runtimes read the same files for the same reason.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")


def usable_cpus(cgroup_root: Path = CGROUP_ROOT) -> int:
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    quota = cgroup_cpu_quota(cgroup_root)
    if quota is None:
        return max(1, affinity)
    return max(1, min(affinity, math.ceil(quota)))  # 2500m -> 3: the half CPU is usable, as the JVM counts it


def cgroup_cpu_quota(root: Path = CGROUP_ROOT) -> float | None:
    """CPUs' worth of time per period the cgroup allows (cgroup v2 cpu.max, else v1 CFS files); None: no limit."""
    try:
        quota, period = (root / "cpu.max").read_text().split()[:2]  # v2: "max 100000" or "400000 100000"
    except (OSError, ValueError):
        quota, period = _cgroup_v1(root)
    if quota in ("max", "-1", "") or not period:
        return None
    try:
        value = int(quota) / int(period)
    except (ValueError, ZeroDivisionError):
        return None
    return value if value > 0 else None


def _cgroup_v1(root: Path) -> tuple[str, str]:
    for folder in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        try:
            quota = (root / folder / "cpu.cfs_quota_us").read_text().strip()
            period = (root / folder / "cpu.cfs_period_us").read_text().strip()
        except OSError:
            continue
        return quota, period
    return "", ""
