"""The default thread count: physical cores available to this process (hyperthreads do not help a
memory-bound decode loop), on Apple silicon its performance cores, capped by OMP_NUM_THREADS and by a
cgroup CPU quota (a container's share of the machine)."""

from __future__ import annotations

import functools
import os
import sys
import warnings
from pathlib import Path


def _available_cpus() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return set(range(os.cpu_count() or 1))


def _macos_cores() -> int | None:
    """Performance cores (hw.perflevel0: the efficiency cores would hold every step back to their pace),
    else physical cores, from sysctl; None if neither can be read."""
    import ctypes
    import ctypes.util

    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
    except OSError:
        return None
    sysctlbyname = libc.sysctlbyname
    sysctlbyname.argtypes = [ctypes.c_char_p, ctypes.c_void_p, ctypes.POINTER(ctypes.c_size_t), ctypes.c_void_p,
                             ctypes.c_size_t]
    sysctlbyname.restype = ctypes.c_int
    for name in (b"hw.perflevel0.physicalcpu", b"hw.physicalcpu"):
        value = ctypes.c_int(0)
        size = ctypes.c_size_t(ctypes.sizeof(value))
        if sysctlbyname(name, ctypes.byref(value), ctypes.byref(size), None, 0) == 0 and value.value > 0:
            return value.value
    return None


def physical_cores() -> int:
    if sys.platform == "darwin":
        cores = _macos_cores()
        if cores is not None:
            return cores
    cpus = _available_cpus()
    cores: set[tuple[str, str]] = set()
    for cpu in cpus:
        topology = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology")
        try:
            package = (topology / "physical_package_id").read_text().strip()
            core = (topology / "core_id").read_text().strip()
        except OSError:
            return max(1, len(cpus))
        cores.add((package, core))
    return max(1, len(cores) or len(cpus))


@functools.lru_cache(maxsize=None)
def _has_openmp() -> bool:
    from . import _C

    return bool(_C.cpu_features()["openmp"])


def resolve_threads(threads: int | None) -> int:
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or not 1 <= threads <= 1024):
        raise ValueError(f"threads must be an integer between 1 and 1024, got {threads!r}")
    if not _has_openmp():
        if threads is not None and threads > 1:
            warnings.warn(f"this cpullm build has no OpenMP: threads={threads} runs on one thread (on macOS: "
                          "brew install libomp, then reinstall cpullm)", RuntimeWarning, stacklevel=3)
        return 1  # more would only cut the matmuls into smaller pieces for the one thread
    return default_threads() if threads is None else threads


def _quota(quota: str, period: str) -> int | None:
    try:
        q, p = int(quota), int(period)
    except ValueError:  # "max": no quota
        return None
    return max(1, -(-q // p)) if q > 0 and p > 0 else None


def _cgroup_cpu_limit(root: Path = Path("/sys/fs/cgroup"), membership: Path = Path("/proc/self/cgroup")) -> int | None:
    """CPUs the cgroup quotas over this process allow (a container's --cpus, a systemd CPUQuota=),
    rounded up: the smallest along its cgroup's path, cgroup v2 (cpu.max) or v1 (cpu.cfs_quota_us);
    None without any."""
    try:
        lines = membership.read_text().splitlines()
    except OSError:
        lines = []
    places: list[tuple[Path, str]] = [(root, "/")]  # a namespace's own root, where it has no path of its own
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if not controllers:
            places.append((root, path))  # v2
        elif "cpu" in controllers.split(","):
            places += [(root / name, path) for name in ("cpu,cpuacct", "cpuacct,cpu", "cpu")]  # v1 mounts
    limits: list[int] = []
    for base, path in places:
        directory = base / path.strip("/")
        while True:
            try:
                if (directory / "cpu.max").is_file():
                    limit = _quota(*(directory / "cpu.max").read_text().split()[:2])
                else:
                    limit = _quota((directory / "cpu.cfs_quota_us").read_text().strip(),
                                   (directory / "cpu.cfs_period_us").read_text().strip())
            except (OSError, TypeError, ValueError):
                limit = None
            if limit is not None:
                limits.append(limit)
            if directory == base or base not in directory.parents:
                break
            directory = directory.parent
    return min(limits) if limits else None


def default_threads() -> int:
    """The physical cores available, capped by OMP_NUM_THREADS (when it holds a positive integer, as
    OpenMP programs and PyTorch read it) and by a container's CPU quota: threads beyond a quota are
    descheduled in turn and hold every step's barrier back."""
    limits = [physical_cores()]
    omp = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if omp.isdigit() and int(omp) > 0:
        limits.append(int(omp))
    quota = _cgroup_cpu_limit()
    if quota is not None:
        limits.append(quota)
    return min(limits)
