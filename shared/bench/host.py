"""The machine and its processes: cores, CPU seconds and RSS of a process and its descendants, read from /proc,
and the share of the machine other processes used."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from shared.cpus import usable_cpus


def host_info() -> dict:
    import torch
    info = {"cpus": usable_cpus(), "cpu_model": platform.processor() or platform.machine(),
            "ram_gb": None, "loadavg": [round(x, 2) for x in os.getloadavg()],
            "python": platform.python_version(), "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "gpu": None}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["ram_gb"] = round(int(line.split()[1]) / 1024**2, 1)
                break
    except OSError:
        pass
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def _busy_cpu_s() -> float | None:
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    except (OSError, ValueError, IndexError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    """CPU seconds of this process and its children (reaped ones, and live ones such as milvus-lite)."""
    t = os.times()
    total = t.user + t.system + t.children_user + t.children_system
    try:
        import psutil
        for child in psutil.Process().children(recursive=True):
            try:
                times = child.cpu_times()
                total += times.user + times.system
            except psutil.Error:
                continue
    except ImportError:
        pass
    return total


class CpuAccount:
    """How much of the machine other processes used during a run: a shared machine makes figures noisy,
    and the JSON says so instead of hiding it. PostgreSQL's and Redis's work for the bench counts as
    'other' (they are not our children), so a few percent is expected."""

    def __init__(self) -> None:
        self._wall, self._busy, self._own = time.monotonic(), _busy_cpu_s(), _own_cpu_s()

    def other_share(self) -> float | None:
        busy = _busy_cpu_s()
        if busy is None or self._busy is None:
            return None
        wall = time.monotonic() - self._wall
        other = (busy - self._busy) - (_own_cpu_s() - self._own)
        # /proc/stat sums every core of the machine, not only those this process may use.
        return round(max(0.0, other) / (wall * (os.cpu_count() or 1)), 3) if wall > 0 else None


def rss_mb(pid: int, members: list[int] | None = None) -> float | None:
    """RSS of a process and all its descendants (the worker and its decode processes), in MB; ``members``,
    when given, are those descendants as the caller last read them (one that has ended counts as none)."""
    total = 0.0
    for member in [pid, *(descendants(pid) if members is None else members)]:
        mb = _own_rss_mb(member)
        if mb is None and member == pid:
            return None  # the process is gone
        total += mb or 0.0
    return round(total, 1)


def _own_rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


def cpu_s(pid: int) -> tuple[float, float] | None:
    """CPU seconds (user + system) of a process's own threads, and of its live descendants (the worker's
    decode forkserver and processes); None when the process is gone. From /proc (Linux)."""
    own = _own_cpu_seconds(pid)
    if own is None:
        return None
    return own, sum(_own_cpu_seconds(child) or 0.0 for child in descendants(pid))


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/PID/stat after the command name (which may hold spaces): [0] is the state, [1] the
    parent's pid; None when the process is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()


def _own_cpu_seconds(pid: int) -> float | None:
    fields = _stat_fields(pid)
    return None if fields is None else (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime, stime


def minor_faults(pid: int) -> int | None:
    """Pages a process's own threads faulted in without reading a disk (minflt in /proc/PID/stat): memory
    mapped afresh and touched, as a forward pass's activations were at every batch with glibc's defaults."""
    fields = _stat_fields(pid)
    return None if fields is None else int(fields[7])


# Whose is a process that a run gave no role, by its command line: the first name found in it.
_SERVICES = (("postgres", "postgres"), ("redis-server", "redis"), ("milvus_lite", "milvus"))


def process_cpu() -> dict[int, tuple[str, float]]:
    """{pid: (command line, or [name] for a kernel thread; CPU seconds)} of every process, from /proc."""
    found = {}
    for entry in (e for e in _proc_entries() if e.isdigit()):
        seconds = _own_cpu_seconds(int(entry))
        try:
            command = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            if not command:
                command = "[" + Path(f"/proc/{entry}/comm").read_text().strip() + "]"
        except OSError:
            continue
        if seconds is not None:
            found[int(entry)] = (command, seconds)
    return found


def cpu_by_role(before: dict[int, tuple[str, float]], after: dict[int, tuple[str, float]],
                roles: dict[int, str]) -> dict[str, float]:
    """CPU seconds spent between two process_cpu() snapshots, by role: a pid in ``roles`` under its role, any
    other under the service its command line names (postgres, redis, milvus), else `host`. A process started
    in between counts from zero; one that ended is lost."""
    spent: dict[str, float] = {}
    for pid, (command, seconds) in after.items():
        role = roles.get(pid) or next((name for key, name in _SERVICES if key in command), "host")
        spent[role] = spent.get(role, 0.0) + seconds - before.get(pid, (command, 0.0))[1]
    return spent


def _proc_entries() -> list[str]:
    try:
        return os.listdir("/proc")
    except OSError:
        return []


def descendants(pid: int) -> list[int]:
    """From /proc (Linux); empty elsewhere."""
    parents: dict[int, list[int]] = {}
    for entry in (e for e in _proc_entries() if e.isdigit()):
        fields = _stat_fields(int(entry))
        if fields is not None:
            parents.setdefault(int(fields[1]), []).append(int(entry))
    found, todo = [], [pid]
    while todo:
        children = parents.get(todo.pop(), [])
        found += children
        todo += children
    return found


@contextmanager
def whole_machine_threads() -> Iterator[int]:
    """torch gets one intra-op thread per core while a stage is measured alone: the bound is what the
    machine can do, though the worker itself may run its forward pass on fewer (shared/runtime)."""
    with torch_threads(usable_cpus()) as threads:
        yield threads


@contextmanager
def torch_threads(threads: int) -> Iterator[int]:
    """The calling thread's torch ops run on ``threads`` intra-op threads meanwhile."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)
