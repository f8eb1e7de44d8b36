"""spamd for tests: the real daemon offline, and a fake socket server.

:class:`SpamdServer` runs Debian's spamd with the shipped rules and every
network test off (``dns_available no``, no RBL/Razor/Pyzor, no Bayes) on a free
loopback port, with its own site config, home and pid file in a temp
directory; it is stopped by its PID.  GTUBE scores 1000.

:class:`FakeSpamd` answers SYMBOLS with a chosen score, or late, or never.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import socket
import socketserver
import tempfile
import time
from pathlib import Path

from harness.ports import free_port
from harness.process import TestDaemon, ThreadedFake

__all__ = ["GTUBE", "FakeSpamd", "SpamdServer", "SpamdServerError"]

GTUBE = "XJS*C4JDBQADN1.NSBN3*2IDNEN*GTUBE-STANDARD-ANTI-UBE-TEST-EMAIL*C.34X"
SPAMD = shutil.which("spamd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))
SITE_CONFIG = Path("/etc/spamassassin")
LOCAL_CF = """\
dns_available no
skip_rbl_checks 1
use_razor2 0
use_pyzor 0
use_bayes 0
bayes_auto_learn 0
report_safe 0
"""


class SpamdServerError(RuntimeError):
    """spamd could not be started."""


class SpamdServer(TestDaemon):
    """A private spamd on 127.0.0.1:port and on a unix socket, with network tests off."""

    name = "spamd"
    stop_timeout = 15.0

    def __init__(self, *, children: int = 2, min_children: int = 1, startup_timeout: float = 60.0) -> None:
        if SPAMD is None:
            raise SpamdServerError("spamd not installed (apt-get install spamd spamassassin)")
        self.dir = Path(tempfile.mkdtemp(prefix="mw-spamd-"))
        self.dir.chmod(0o755)
        self.port = free_port()
        self.socket_path = self.dir / "spamd.sock"
        self.children = children
        self.min_children = min_children
        self.startup_timeout = startup_timeout
        self._write_config()

    @property
    def address(self) -> str:
        """``inet:127.0.0.1:port`` for the milter config."""
        return f"inet:127.0.0.1:{self.port}"

    @property
    def unix_address(self) -> str:
        """``unix:/path`` for the milter config (no TCP handshake per message)."""
        return f"unix:{self.socket_path}"

    def _write_config(self) -> None:
        etc = self.dir / "etc"
        etc.mkdir()
        for pattern in ("*.pre", "65_debian.cf"):
            for src in SITE_CONFIG.glob(pattern):
                shutil.copy(src, etc / src.name)
        (etc / "local.cf").write_text(LOCAL_CF)
        home = self.dir / "home"
        home.mkdir()
        shutil.chown(home, "nobody")

    def log_tail(self, lines: int = 20) -> str:
        """The end of spamd's log."""
        try:
            return "\n".join((self.dir / "spamd.log").read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def ping(self) -> bool:
        """Whether spamd answers PONG."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1.0) as sock:
                sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                return b"PONG" in sock.recv(256)
        except OSError:
            return False

    def start(self) -> SpamdServer:
        """Start spamd and wait until it answers PING."""
        if self.pid is not None:
            return self
        assert SPAMD is not None
        args = [
            SPAMD, "-L", "-x", "-u", "nobody", f"--listen=127.0.0.1:{self.port}",
            f"--listen={self.socket_path}", "--socketmode=0666",
            "--allowed-ips=127.0.0.1", f"--siteconfigpath={self.dir / 'etc'}",
            f"--helper-home-dir={self.dir / 'home'}", "-m", str(self.children),
            f"--min-children={self.min_children}", f"--min-spare={self.min_children}",
            f"--max-spare={self.children}", f"--pidfile={self.dir / 'spamd.pid'}",
            "-s", str(self.dir / "spamd.log"),
        ]
        self.launch(args, self.dir / "console.log", self.ping, timeout=self.startup_timeout,
                    error=SpamdServerError)
        return self


class FakeSpamd(ThreadedFake):
    """A fake spamd on 127.0.0.1: ``score`` for every message (1000 for GTUBE); ``mode``
    is ok, slow, hang or error (changeable live); ``checks`` counts requests."""

    server: socketserver.TCPServer

    def __init__(self, score: float = 0.0, mode: str = "ok", delay: float = 2.0) -> None:
        self.score = score
        self.mode = mode
        self.delay = delay
        self.checks = 0
        super().__init__()
        fake = self

        class Handler(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                fake._serve(self.rfile, self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.TCPServer):
            daemon_threads = True
            allow_reuse_address = True

        self.server = Server(("127.0.0.1", free_port()), Handler)

    @property
    def address(self) -> str:
        """``inet:127.0.0.1:port``."""
        return f"inet:127.0.0.1:{self.server.server_address[1]}"

    def _serve(self, reader: io.BufferedIOBase, sock: socket.socket) -> None:
        length = 0
        while True:
            line = reader.readline(1024)
            if not line or line in (b"\r\n", b"\n"):
                break
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":", 1)[1])
        body = reader.read(length) if length else b""
        self.checks += 1
        if self.mode == "hang":
            self._stop.wait(60)
            return
        if self.mode == "slow":
            time.sleep(self.delay)
        if self.mode == "error":
            sock.sendall(b"SPAMD/1.1 76 Bad header line\r\n\r\n")
            return
        score = 1000.0 if GTUBE.encode() in body else self.score
        symbols = b"GTUBE" if score >= 1000 else b"FAKE_RULE"
        with contextlib.suppress(OSError):
            sock.sendall(b"SPAMD/1.1 0 EX_OK\r\nContent-length: %d\r\nSpam: %s ; %.1f / 5.0\r\n\r\n%s"
                         % (len(symbols), b"True" if score >= 5 else b"False", score, symbols))

