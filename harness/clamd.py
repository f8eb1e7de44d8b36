"""clamd for tests: the real daemon with local test signatures, and a fake socket server.

:class:`ClamdServer` runs ``/usr/sbin/clamd`` in a temp directory with three
local signatures (EICAR by hash and by body pattern, and ClamAV's own
``clam.exe`` test file by hash, which also catches the clamav-testfiles
archives) and no freshclam, listening on a private unix socket and a free
loopback port.  It is stopped by its own PID and can be stopped and started
again mid-test ("clamd died").

:class:`FakeClamd` is a tiny INSTREAM server (rspamd's dummy_clam idea) that can
answer, answer late, never answer or answer nonsense.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import os
import shutil
import socket
import socketserver
import struct
import tempfile
import time
from pathlib import Path

from harness.ports import free_port
from harness.process import TestDaemon, ThreadedFake, file_tail

__all__ = ["CLAM_EXE", "EICAR", "ClamdServer", "ClamdServerError", "FakeClamd"]

EICAR = rb"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*"
CLAM_EXE = Path("/usr/share/clamav-testfiles/clam.exe")
CLAMD = shutil.which("clamd", path="/usr/sbin:/usr/bin:" + os.environ.get("PATH", ""))


class ClamdServerError(RuntimeError):
    """clamd could not be started."""


def signatures() -> dict[str, str]:
    """The local signature files (name -> content): no download needed."""
    files = {
        "custom-eicar.hdb": f"{hashlib.md5(EICAR).hexdigest()}:{len(EICAR)}:Custom.Test.EICAR-HDB\n",  # noqa: S324
        "custom-eicar.ndb": f"Custom.Test.EICAR-NDB:0:*:{EICAR.hex()}\n",
    }
    if CLAM_EXE.is_file():
        data = CLAM_EXE.read_bytes()
        files["custom-clamtest.hdb"] = (
            f"{hashlib.md5(data).hexdigest()}:{len(data)}:Custom.Test.ClamAV-TestFile-HDB\n"  # noqa: S324
        )
    return files


class ClamdServer(TestDaemon):
    """A private clamd on a unix socket and 127.0.0.1:port; start()/stop() by PID."""

    name = "clamd"

    def __init__(self, *, startup_timeout: float = 60.0, stream_max: str = "25M",
                 read_timeout: int = 120) -> None:
        if CLAMD is None:
            raise ClamdServerError("clamd not installed (apt-get install clamav-daemon)")
        self.dir = Path(tempfile.mkdtemp(prefix="mw-clamd-"))
        self.socket_path = self.dir / "clamd.sock"
        self.port = free_port()
        self.startup_timeout = startup_timeout
        self.stream_max = stream_max
        self.read_timeout = read_timeout
        self._write_config()

    @property
    def unix_address(self) -> str:
        """``unix:/path`` for the milter config."""
        return f"unix:{self.socket_path}"

    @property
    def inet_address(self) -> str:
        """``inet:127.0.0.1:port`` for the milter config."""
        return f"inet:127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        db = self.dir / "db"
        db.mkdir()
        (self.dir / "tmp").mkdir()
        for name, content in signatures().items():
            (db / name).write_text(content)
        (self.dir / "clamd.conf").write_text(
            f"DatabaseDirectory {db}\nTemporaryDirectory {self.dir / 'tmp'}\n"
            f"LocalSocket {self.socket_path}\nLocalSocketMode 660\n"
            f"TCPSocket {self.port}\nTCPAddr 127.0.0.1\nForeground yes\n"
            f"LogFile {self.dir / 'clamd.log'}\nLogTime yes\nPidFile {self.dir / 'clamd.pid'}\n"
            f"StreamMaxLength {self.stream_max}\nReadTimeout {self.read_timeout}\n"
            "MaxThreads 4\nScanMail yes\nScanArchive yes\n"
            "ScanPE yes\nScanOLE2 yes\nScanPDF yes\nScanHTML yes\nBytecode no\n"
        )

    def log_tail(self, lines: int = 20) -> str:
        """The end of clamd's log."""
        return file_tail(self.dir / "clamd.log", lines)

    def ping(self) -> bool:
        """Whether clamd answers PONG on its unix socket."""
        try:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
                sock.settimeout(1.0)
                sock.connect(str(self.socket_path))
                sock.sendall(b"zPING\0")
                return sock.recv(64).startswith(b"PONG")
        except OSError:
            return False

    def start(self) -> ClamdServer:
        """Start clamd and wait until it answers."""
        if self.pid is not None:
            return self
        assert CLAMD is not None
        self.launch([CLAMD, f"--config-file={self.dir / 'clamd.conf'}"], self.dir / "console.log",
                    self.ping, timeout=self.startup_timeout, error=ClamdServerError)
        return self

    def stop(self) -> None:
        """Stop our clamd (SIGTERM, then SIGKILL) and remove its socket."""
        super().stop()
        with contextlib.suppress(FileNotFoundError):
            self.socket_path.unlink()


def _read_command(reader: io.BufferedReader) -> tuple[bytes, bytes]:
    """One ``n``- or ``z``-prefixed command (or an old bare one) and its terminator."""
    command = bytearray()
    while len(command) < 64:
        byte = reader.read(1)
        if not byte or byte in (b"\n", b"\0"):
            return bytes(command).lstrip(b"nz"), byte or b"\n"
        command += byte
    return bytes(command), b"\n"


class FakeClamd(ThreadedFake):
    """A fake clamd on a unix socket: ``mode`` is ok, slow, hang or garbage (changeable live).

    Answers ``stream: Eicar-Test-Signature FOUND`` when the stream holds EICAR,
    else ``stream: OK``; ``scans`` counts INSTREAM requests and ``sessions`` the
    ``IDSESSION`` connections.  With ``end_sessions`` a session is closed, unanswered,
    when its second command arrives: as when clamd's ``ReadTimeout`` ends an idle
    session just as the client sends.
    """

    def __init__(self, mode: str = "ok", delay: float = 2.0) -> None:
        self.mode = mode
        self.delay = delay
        self.scans = 0
        self.sessions = 0
        self.end_sessions = False
        self.dir = Path(tempfile.mkdtemp(prefix="mw-fakeclamd-"))
        self.socket_path = self.dir / "clamd.sock"
        super().__init__()
        fake = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                fake._serve(self.request)

        class Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
            daemon_threads = True

        self.server = Server(str(self.socket_path), Handler)

    @property
    def address(self) -> str:
        """``unix:/path``."""
        return f"unix:{self.socket_path}"

    def _serve(self, sock: socket.socket) -> None:
        reader = sock.makefile("rb")
        command, end = _read_command(reader)
        if not command.endswith(b"IDSESSION"):
            self._answer(sock, reader, command, b"", end)
            return
        self.sessions += 1
        number = 0
        while True:
            command, end = _read_command(reader)
            if not command or command.endswith(b"END") or (number and self.end_sessions):
                return
            number += 1
            if not self._answer(sock, reader, command, b"%d: " % number, end):
                return

    def _answer(self, sock: socket.socket, reader: io.BufferedReader, command: bytes, prefix: bytes,
                end: bytes) -> bool:
        """Answer one command; False when the connection is to be closed."""
        if command.endswith(b"PING"):
            sock.sendall(prefix + b"PONG" + end)
            return True
        if not command.endswith(b"INSTREAM"):
            return False
        data = bytearray()
        while True:
            head = reader.read(4)
            if len(head) < 4:
                return False
            (size,) = struct.unpack("!L", head)
            if size == 0:
                break
            data += reader.read(size)
        self.scans += 1
        if self.mode == "hang":
            self._stop.wait(60)
            return False
        if self.mode == "slow":
            time.sleep(self.delay)
        if self.mode == "garbage":
            sock.sendall(b"what?\n")
            return False
        verdict = b"Eicar-Test-Signature FOUND" if EICAR in data else b"OK"
        try:
            sock.sendall(prefix + b"stream: " + verdict + end)
        except OSError:
            return False
        return True

    def stop(self) -> None:
        """Stop serving and remove the socket."""
        super().stop()
        shutil.rmtree(self.dir, ignore_errors=True)
