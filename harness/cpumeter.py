"""CPU time and peak memory of a process tree, for the benchmarks.

A cgroup of the tree's own (v2 ``cpu.stat``, or v1 ``cpuacct.usage``) counts every
thread and child, ended or not, to the microsecond.  ``/proc/PID/stat`` counts clock
ticks (10 ms): over a few dozen messages that rounds by tenths of a millisecond per
message, and threads or children that ended without being waited for are lost.  So
:class:`CpuMeter` makes a cgroup where it can (root, a cgroup file system) and falls back
to the ticks of the live tree.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

__all__ = ["CpuMeter", "peak_rss_mb", "process_tree", "seconds_by_name", "tree_ticks"]

_CLK = os.sysconf("SC_CLK_TCK")


def _processes() -> dict[int, tuple[int, int]]:
    """Every live process: pid -> (parent pid, CPU ticks: user + system + children waited for)."""
    table: dict[int, tuple[int, int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                # After the command name, which may hold spaces and parentheses.
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                table[int(entry.name)] = (int(fields[1]), sum(int(fields[i]) for i in (11, 12, 13, 14)))
            except (OSError, IndexError, ValueError):  # ended meanwhile
                continue
    return table


def _tree(pid: int, table: dict[int, tuple[int, int]]) -> list[int]:
    tree = [pid]
    for member in tree:
        tree.extend(child for child, (parent, _) in table.items() if parent == member)
    return tree


def process_tree(pid: int) -> list[int]:
    """``pid`` and its live descendants (spamd's pre-forked children, a pool's workers)."""
    return _tree(pid, _processes())


def tree_ticks(pid: int) -> float:
    """CPU seconds (user + system, and children waited for) of the live tree, in ticks."""
    table = _processes()
    return sum(table[member][1] for member in _tree(pid, table) if member in table) / _CLK


def seconds_by_name(pid: int) -> dict[str, float]:
    """CPU seconds of the live tree in clock ticks, summed by process name (Dovecot's
    lmtp, auth, log, ...)."""
    table = _processes()
    out: dict[str, float] = {}
    for member in _tree(pid, table):
        try:
            name = Path(f"/proc/{member}/comm").read_text().strip()
        except OSError:  # ended meanwhile
            continue
        if member in table:
            out[name] = out.get(name, 0.0) + table[member][1] / _CLK
    return out


def peak_rss_mb(pid: int) -> float:
    """The peak resident set size (VmHWM) of one process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return 0.0


class CpuMeter:
    """The CPU time of a process tree from now on, exact where the kernel allows."""

    _ROOTS = (("/sys/fs/cgroup/unified", "cpu.stat"), ("/sys/fs/cgroup", "cpu.stat"),
              ("/sys/fs/cgroup/cpuacct", "cpuacct.usage"))

    def __init__(self, name: str, pid: int, *, roots: tuple[tuple[str, str], ...] | None = None) -> None:
        self.pid = pid
        self.group: Path | None = None
        self.counter = ""
        for root, counter in self._ROOTS if roots is None else roots:
            if not (Path(root) / "cgroup.procs").exists():
                continue
            group = Path(root) / f"mailwarden-bench-{os.getpid()}-{name}"
            try:
                group.mkdir(exist_ok=True)
                if not (group / counter).exists():
                    group.rmdir()
                    continue
                for member in process_tree(pid):
                    (group / "cgroup.procs").write_text(str(member))
            except OSError:
                continue
            self.group, self.counter = group, counter
            break

    @property
    def exact(self) -> bool:
        """Whether a cgroup counts (else clock ticks of the live tree)."""
        return self.group is not None

    def seconds(self) -> float:
        """CPU seconds of the tree so far (compare two readings)."""
        if self.group is None:
            return tree_ticks(self.pid)
        text = (self.group / self.counter).read_text()
        if self.counter == "cpuacct.usage":
            return int(text) / 1e9
        usage = next(line for line in text.splitlines() if line.startswith("usage_usec "))
        return int(usage.split()[1]) / 1e6

    def close(self) -> None:
        """Hand any process left back to the parent group and remove ours."""
        if self.group is None:
            return
        try:
            for member in (self.group / "cgroup.procs").read_text().split():
                (self.group.parent / "cgroup.procs").write_text(member)
            self.group.rmdir()
        except OSError as exc:
            print(f"cgroup {self.group} not removed: {exc}", file=sys.stderr)
        self.group = None

    def __enter__(self) -> CpuMeter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
