"""usable_cpus: the affinity mask capped by a cgroup CPU quota (a pod's `limits.cpu`), read from fake cgroup trees."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from kubetune.cpus import cgroup_cpu_quota, usable_cpus

AFFINITY = len(os.sched_getaffinity(0))


def write(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.mark.parametrize(("files", "quota"), [
    ({"cpu.max": "max 100000\n"}, None),                                      # v2, no limit
    ({"cpu.max": "400000 100000\n"}, 4.0),                                    # v2, limits.cpu: 4
    ({"cpu.max": "150000 100000\n"}, 1.5),                                    # v2, 1500m
    ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),             # v1, no limit
    ({"cpu,cpuacct/cpu.cfs_quota_us": "200000\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, 2.0),  # v1
    ({"cpu.max": "garbage"}, None),
    ({}, None),                                                               # no cgroup files at all
])
def test_quota_is_read_from_v2_or_v1_files(tmp_path: Path, files: dict[str, str], quota: float | None) -> None:
    assert cgroup_cpu_quota(write(tmp_path, files)) == quota


def test_a_quota_caps_the_threads_and_never_raises_them(tmp_path: Path) -> None:
    assert usable_cpus(write(tmp_path / "one", {"cpu.max": "100000 100000"})) == 1
    assert usable_cpus(write(tmp_path / "part", {"cpu.max": "50000 100000"})) == 1  # 500m still gets a thread
    assert usable_cpus(write(tmp_path / "many", {"cpu.max": "6400000 100000"})) == AFFINITY  # 64 > this machine
    assert usable_cpus(write(tmp_path / "none", {"cpu.max": "max 100000"})) == AFFINITY

