"""Run a program in a private network namespace whose only resolver is a stub DNS.

For peers that read /etc/resolv.conf or take resolver addresses without a port
(OpenDKIM's ``opendkim-testmsg``, the OpenDKIM and OpenDMARC milters):
``unshare --net --mount`` gives the child only loopback and mounts of its own; there
the stub answers on 127.0.0.1:53 and /etc/resolv.conf is bind-mounted to name it.
Nothing reaches the machine's resolver or network.  A daemon started so
(:func:`spawn_with_stub_dns`) still serves a unix socket that processes outside
reach, the file system being shared.  Needs root (unshare); :func:`available` says
whether it can run here.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from harness.dnsstub import Records, StubDns

REPO = Path(__file__).resolve().parents[1]


def available() -> bool:
    """Whether namespaces can be made here (root and util-linux's unshare)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None


def _spec(records: Records, argv: Sequence[str], daemon: bool = False) -> list[str]:
    spec = json.dumps({"records": {n: {t: list(v) for t, v in rr.items()} for n, rr in records.items()},
                       "argv": list(argv), "daemon": daemon})
    return ["unshare", "--net", "--mount", sys.executable, "-m", "harness.netns", spec]


def run_with_stub_dns(records: Records, argv: Sequence[str], stdin: bytes = b"",
                      timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """``argv`` with ``stdin``, resolving only ``records`` (as :class:`StubDns` serves them)."""
    return subprocess.run(_spec(records, argv), input=stdin, capture_output=True, timeout=timeout, cwd=REPO,
                          check=False)


def spawn_with_stub_dns(records: Records, argv: Sequence[str], output: IO[bytes]) -> subprocess.Popen[bytes]:
    """Start the daemon ``argv`` (in the foreground) resolving only ``records``.

    The process returned is the namespace's keeper; SIGTERM to it is passed on to the
    daemon, and its exit status is the daemon's (128 + N when signal N ended it).
    :func:`daemon_pid` finds the daemon itself, to measure its CPU time.
    """
    return subprocess.Popen(_spec(records, argv, daemon=True), stdin=subprocess.DEVNULL, stdout=output,
                            stderr=output, cwd=REPO)


def daemon_pid(keeper: subprocess.Popen[bytes], name: str, timeout: float = 10.0) -> int:
    """The PID of the daemon (command ``name``) a :func:`spawn_with_stub_dns` keeper runs."""
    deadline = time.monotonic() + timeout
    while keeper.poll() is None:
        try:
            # unshare execs the keeper in place: the daemon is the keeper's child.
            for child in Path(f"/proc/{keeper.pid}/task/{keeper.pid}/children").read_text().split():
                if Path(f"/proc/{child}/comm").read_text().strip() == name[:15]:
                    return int(child)
        except OSError:
            pass
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    raise RuntimeError(f"no daemon under namespace keeper {keeper.pid} (exit {keeper.poll()})")


def _enter(scratch: Path) -> None:
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = scratch / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)


def _keep(records: Records, argv: Sequence[str]) -> int:
    """Serve the stub while the daemon runs; pass SIGTERM on; return its status."""
    with StubDns(records, port=53):
        child = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL)
        signal.signal(signal.SIGTERM, lambda *_: child.terminate())
        status = child.wait()
    return 128 - status if status < 0 else status


def _inside(spec: str) -> int:
    wanted = json.loads(spec)
    with tempfile.TemporaryDirectory(prefix="mw-netns-") as scratch:
        _enter(Path(scratch))
        if wanted["daemon"]:
            return _keep(wanted["records"], wanted["argv"])
        return _run(wanted["records"], wanted["argv"])


def _run(records: Records, argv: Sequence[str]) -> int:
    """Run ``argv`` on this process's stdin while the stub serves; pass its output on."""
    # A regular file, not the pipe: opendkim-testmsg cannot parse a message from a pipe.
    with tempfile.TemporaryFile() as data:
        shutil.copyfileobj(sys.stdin.buffer, data)
        data.seek(0)
        with StubDns(records, port=53):
            done = subprocess.run(list(argv), stdin=data, capture_output=True, check=False, timeout=50)
    sys.stdout.buffer.write(done.stdout)
    sys.stderr.buffer.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(_inside(sys.argv[1]))
