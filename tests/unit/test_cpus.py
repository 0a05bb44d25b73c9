"""`usable_cpus`: the CPU affinity, capped by a cgroup CPU quota (v2 cpu.max, v1 CFS files), on
fake cgroup trees and a fake /proc/self/cgroup in a temporary folder."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from service.cpus import cgroup_cpu_limit, usable_cpus


def tree(tmp_path: Path, proc: str | None, files: dict[str, str]) -> dict[str, Path]:
    root = tmp_path / "cgroup"
    root.mkdir()
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    proc_cgroup = tmp_path / "proc-self-cgroup"
    if proc is not None:
        proc_cgroup.write_text(proc)
    return {"cgroup_root": root, "proc_cgroup": proc_cgroup}


@pytest.mark.parametrize(
    ("cpu_max", "cpus"),
    [
        ("max 100000\n", None),  # no limit
        ("200000 100000\n", 2),  # a pod's `limits.cpu: 2`
        ("150000 100000\n", 2),  # 1.5 CPUs: rounded up
        ("50000 100000\n", 1),  # half a CPU: still one
        ("400000 50000\n", 8),  # another period
        ("300000\n", 3),  # the period left out: the kernel's 100000
        ("garbage here\n", None),
        ("0 100000\n", None),
        ("", None),
    ],
)
def test_cgroup_v2_cpu_max_in_a_container(tmp_path: Path, cpu_max: str, cpus: int | None) -> None:
    assert cgroup_cpu_limit(**tree(tmp_path, "0::/\n", {"cpu.max": cpu_max})) == cpus


def test_cgroup_v2_the_tightest_quota_of_the_cgroup_and_its_ancestors(tmp_path: Path) -> None:
    """On a host: a systemd slice's CPUQuota= holds for the unit inside it."""
    files = {
        "system.slice/cpu.max": "300000 100000\n",
        "system.slice/lungserve.service/cpu.max": "max 100000\n",
        "other.slice/cpu.max": "100000 100000\n",  # not this process's: ignored
    }
    found = tree(tmp_path, "0::/system.slice/lungserve.service\n", files)
    assert cgroup_cpu_limit(**found) == 3
    (found["cgroup_root"] / "system.slice/lungserve.service/cpu.max").write_text("200000 100000\n")
    assert cgroup_cpu_limit(**found) == 2


@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpu"])
def test_cgroup_v1_cfs_quota(tmp_path: Path, mount: str) -> None:
    proc = "12:memory:/x\n4:cpu,cpuacct:/\n2:cpuacct:/\n0::/\n"
    files = {f"{mount}/cpu.cfs_quota_us": "250000\n", f"{mount}/cpu.cfs_period_us": "100000\n"}
    assert cgroup_cpu_limit(**tree(tmp_path, proc, files)) == 3


def test_cgroup_v1_without_a_quota(tmp_path: Path) -> None:
    files = {"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}
    assert cgroup_cpu_limit(**tree(tmp_path, "1:cpu:/\n0::/\n", files)) is None


def test_no_cgroup_files_and_no_proc_file_mean_no_quota(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert cgroup_cpu_limit(**tree(tmp_path / "a", "0::/\n", {})) is None
    assert cgroup_cpu_limit(**tree(tmp_path / "b", None, {})) is None


def test_without_proc_self_cgroup_the_mounts_are_read(tmp_path: Path) -> None:
    assert cgroup_cpu_limit(**tree(tmp_path, None, {"cpu.max": "200000 100000\n"})) == 2


@pytest.mark.parametrize(
    ("affinity", "cpu_max", "cpus"),
    [
        (64, "200000 100000", 2),  # a 2-CPU pod on a 64-core node
        (64, "max 100000", 64),
        (2, "800000 100000", 2),  # a quota above the cores it may run on
        (1, "max 100000", 1),
    ],
)
def test_usable_cpus_is_the_affinity_capped_by_the_quota(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, affinity: int, cpu_max: str, cpus: int
) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(affinity)))
    assert usable_cpus(**tree(tmp_path, "0::/\n", {"cpu.max": cpu_max})) == cpus


def test_usable_cpus_on_this_machine() -> None:
    assert 1 <= usable_cpus() <= len(os.sched_getaffinity(0))
