"""Run a program in a private network namespace whose only resolver is a stub DNS.

For peers that read /etc/resolv.conf and cannot be pointed at another port (OpenDKIM's
``opendkim-testmsg``): ``unshare --net --mount`` gives the child only loopback and
mounts of its own; there the stub answers on 127.0.0.1:53 and /etc/resolv.conf is
bind-mounted to name it.  Nothing reaches the machine's resolver or network.  Needs
root (unshare); :func:`available` says whether it can run here.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

from harness.dnsstub import Records, StubDns

REPO = Path(__file__).resolve().parents[1]


def available() -> bool:
    """Whether namespaces can be made here (root and util-linux's unshare)."""
    return os.geteuid() == 0 and shutil.which("unshare") is not None and shutil.which("ip") is not None


def run_with_stub_dns(records: Records, argv: Sequence[str], stdin: bytes = b"",
                      timeout: float = 60.0) -> subprocess.CompletedProcess[bytes]:
    """``argv`` with ``stdin``, resolving only ``records`` (as :class:`StubDns` serves them)."""
    spec = json.dumps({"records": {n: {t: list(v) for t, v in rr.items()} for n, rr in records.items()},
                       "argv": list(argv)})
    return subprocess.run(["unshare", "--net", "--mount", sys.executable, "-m", "harness.netns", spec],
                          input=stdin, capture_output=True, timeout=timeout, cwd=REPO, check=False)


def _inside(spec: str) -> int:
    wanted = json.loads(spec)
    subprocess.run(["ip", "link", "set", "lo", "up"], check=True)
    resolv = Path(tempfile.mkdtemp(prefix="mw-netns-")) / "resolv.conf"
    resolv.write_text("nameserver 127.0.0.1\n")
    subprocess.run(["mount", "--bind", str(resolv), "/etc/resolv.conf"], check=True)
    # A regular file, not the pipe: opendkim-testmsg cannot parse a message from a pipe.
    with tempfile.TemporaryFile() as data:
        shutil.copyfileobj(sys.stdin.buffer, data)
        data.seek(0)
        with StubDns(wanted["records"], port=53):
            done = subprocess.run(wanted["argv"], stdin=data, capture_output=True, check=False, timeout=50)
    sys.stdout.buffer.write(done.stdout)
    sys.stderr.buffer.write(done.stderr)
    return done.returncode


if __name__ == "__main__":
    sys.exit(_inside(sys.argv[1]))
