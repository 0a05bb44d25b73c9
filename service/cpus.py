"""The CPUs this process may use: its CPU affinity, capped by a cgroup CPU quota.

`os.sched_getaffinity` names the cores the scheduler may run this process on. In a container
with a CPU limit (Kubernetes `resources.limits.cpu`, `docker run --cpus`) that is still every
core of the node, while the CFS quota lets the container use only `quota / period` of them: a
pod limited to 2 CPUs on a 64-core node must not start 64 processes. So the quota caps the count,
rounded up (1.5 CPUs -> 2), as gunicorn/uvicorn users size workers by the limit.

Quotas are read from the cgroup files, v2 (`cpu.max`: "max 100000" or "200000 100000") and v1
(`cpu.cfs_quota_us` / `cpu.cfs_period_us`, -1: none), in this process's own cgroup (from
/proc/self/cgroup) and every ancestor up to the mount, the tightest winning: inside a container
that is the mount itself; on a host, a systemd unit's `CPUQuota=` sits on the way. Files that are
missing, unreadable or malformed are no quota. Standard library only; called when `Settings` are
built (LUNGSERVE_WORKERS unset), never at import.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from pathlib import Path

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_SELF_CGROUP = Path("/proc/self/cgroup")


def usable_cpus(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int:
    """CPUs this process may use: its affinity, capped by the tightest cgroup CPU quota; >= 1."""
    cpus = _affinity()
    quota = cgroup_cpu_limit(cgroup_root=cgroup_root, proc_cgroup=proc_cgroup)
    if quota is not None:
        cpus = min(cpus, quota)
    return max(1, cpus)


def cgroup_cpu_limit(*, cgroup_root: Path = CGROUP_ROOT, proc_cgroup: Path = PROC_SELF_CGROUP) -> int | None:
    """ceil(quota / period) of the tightest CPU quota on this process's cgroups; None: no quota."""
    limits = [n for folder in _cgroup_folders(cgroup_root, proc_cgroup) if (n := _quota(folder)) is not None]
    return min(limits, default=None)


def _affinity() -> int:
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1  # no affinity outside Linux (a developer's macOS)


def _cgroup_folders(root: Path, proc_cgroup: Path) -> Iterator[Path]:
    """This process's cgroup folders (v2, and v1's cpu controller) and their ancestors."""
    mounts: list[tuple[Path, str]] = []
    try:
        lines = proc_cgroup.read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        _, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if controllers == "":  # v2: "0::/path"
            mounts.append((root, path))
        elif "cpu" in controllers.split(","):  # v1: "N:cpu,cpuacct:/path"
            # Mounted as cpu, cpu,cpuacct (usually both, one a symlink) or the list as written.
            mounts += [(root / name, path) for name in dict.fromkeys(("cpu", "cpu,cpuacct", controllers))]
    if not mounts:
        mounts = [(root, "/"), (root / "cpu", "/")]  # no /proc/self/cgroup: the mounts alone
    seen: set[Path] = set()
    for mount, path in mounts:
        folder = mount.joinpath(*[part for part in path.split("/") if part not in ("", ".", "..")])
        while True:
            if folder not in seen:
                seen.add(folder)
                yield folder
            if folder == mount:
                break
            folder = folder.parent


def _quota(folder: Path) -> int | None:
    """The CPUs one cgroup folder's quota allows (rounded up), or None."""
    v2 = _read(folder / "cpu.max")
    if v2 is not None:
        fields = v2.split()
        if len(fields) == 2:
            return _cpus(fields[0], fields[1])
        if len(fields) == 1:
            return _cpus(fields[0], "100000")  # the period may be left out: the kernel's default
        return None
    quota = _read(folder / "cpu.cfs_quota_us")
    period = _read(folder / "cpu.cfs_period_us")
    if quota is None or period is None:
        return None
    return _cpus(quota, period)


def _cpus(quota: str, period: str) -> int | None:
    try:
        q, p = int(quota), int(period)  # "max" (v2) is no quota, as -1 (v1) is
    except ValueError:
        return None
    if q <= 0 or p <= 0:
        return None
    return max(1, math.ceil(q / p))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
