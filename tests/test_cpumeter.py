"""The benchmarks' CPU meter: a cgroup of the tree's own, or the ticks of the live tree."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from harness.cpumeter import CpuMeter, peak_rss_mb, process_tree, seconds_by_name

# A parent that burns ~0.3 s of CPU in a child it waits for, then sleeps on.
_BURNER = """
import os, sys, time
pid = os.fork()
if pid == 0:
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    os._exit(0)
os.waitpid(pid, 0)
print("done", flush=True)
time.sleep(60)
"""

# A parent with a live child, both idle until told to burn.
_TREE = """
import os, sys, time
pid = os.fork()
if pid == 0:
    sys.stdin.readline()
    end = time.process_time() + 0.3
    while time.process_time() < end:
        pass
    time.sleep(60)
print("ready", flush=True)
time.sleep(60)
"""


@pytest.fixture
def spawn() -> Iterator[list[subprocess.Popen[str]]]:
    procs: list[subprocess.Popen[str]] = []
    yield procs
    for proc in procs:
        for member in reversed(process_tree(proc.pid)[1:]):
            os.kill(member, 9)
        proc.kill()
        proc.wait()


def _start(procs: list[subprocess.Popen[str]], code: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            text=True)
    procs.append(proc)
    return proc


def test_a_cgroup_counts_a_child_that_ended(spawn: list[subprocess.Popen[str]]) -> None:
    if os.geteuid() != 0:
        pytest.skip("a cgroup of one's own needs root")
    proc = _start(spawn, "import sys; sys.stdin.readline()\n" + _BURNER)
    with CpuMeter("test", proc.pid) as meter:
        if not meter.exact:
            pytest.skip("no cgroup file system to count in")
        group = meter.group
        assert group is not None and group.is_dir()
        before = meter.seconds()
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdin.write("go\n")
        proc.stdin.flush()
        assert proc.stdout.readline() == "done\n"
        assert meter.seconds() - before >= 0.25
    assert not group.exists()  # closed: the process went back to the parent group


def test_without_a_cgroup_the_ticks_of_the_live_tree(spawn: list[subprocess.Popen[str]]) -> None:
    proc = _start(spawn, _TREE)
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    meter = CpuMeter("test", proc.pid, roots=())
    assert not meter.exact
    assert len(process_tree(proc.pid)) == 2
    before = meter.seconds()
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 10
    while meter.seconds() - before < 0.25 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert meter.seconds() - before >= 0.25  # the child's ticks count for the tree


def test_peak_rss() -> None:
    assert 1 < peak_rss_mb(os.getpid()) < 10_000


def test_seconds_by_process_name(spawn: list[subprocess.Popen[str]]) -> None:
    """The child burns under a name of its own; its CPU is counted under that name."""
    proc = _start(spawn, _TREE.replace("    sys.stdin.readline()\n", "    sys.stdin.readline()\n"
                                       "    open('/proc/self/comm', 'w').write('burner')\n", 1))
    assert proc.stdout is not None and proc.stdout.readline() == "ready\n"
    before = seconds_by_name(proc.pid)
    assert proc.stdin is not None
    proc.stdin.write("go\n")
    proc.stdin.flush()
    deadline = time.monotonic() + 10
    while seconds_by_name(proc.pid).get("burner", 0.0) < 0.25 and time.monotonic() < deadline:
        time.sleep(0.05)
    after = seconds_by_name(proc.pid)
    assert after["burner"] >= 0.25 and "burner" not in before
    assert after.get("python", 0.0) - before.get("python", 0.0) < 0.2
