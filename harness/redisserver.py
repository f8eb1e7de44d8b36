"""Run a throw-away ``redis-server`` on 127.0.0.1 for tests."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from types import TracebackType

from harness.ports import free_port
from harness.process import file_tail, stop_process

__all__ = ["RedisServer", "RedisServerError"]


class RedisServerError(RuntimeError):
    """redis-server could not be started."""


class RedisServer:
    """A ``redis-server`` subprocess without persistence, in its own temp dir.

    ``start()`` (or entering the context manager) launches it and waits until
    it answers; ``restart()`` brings it back on the same port (empty).
    """

    def __init__(
        self,
        *,
        executable: str = "redis-server",
        port: int | None = None,
        startup_timeout: float = 10.0,
        password: str = "",
        unix_socket: bool = False,
    ) -> None:
        found = shutil.which(executable)
        if found is None:
            raise RedisServerError(f"{executable!r} not found on PATH")
        self._executable = found
        self.port = port if port is not None else free_port()
        self._startup_timeout = startup_timeout
        self._proc: subprocess.Popen[bytes] | None = None
        self._dir: Path | None = None
        self.password = password
        self.unix_socket = unix_socket

    @property
    def url(self) -> str:
        """``redis://[:password@]127.0.0.1:PORT/0``."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def socket_path(self) -> Path | None:
        """The unix socket, when started with ``unix_socket=True``."""
        return self._dir / "redis.sock" if self.unix_socket and self._dir is not None else None

    @property
    def pid(self) -> int | None:
        """PID of the running server, if any."""
        return None if self._proc is None else self._proc.pid

    @property
    def running(self) -> bool:
        """Whether the server process is alive."""
        return self._proc is not None and self._proc.poll() is None

    def _log_tail(self, lines: int = 20) -> str:
        if self._dir is None:
            return ""
        return file_tail(self._dir / "redis.log", lines)

    def _answers(self) -> bool:
        """True once *our* process answers on the port (checked via INFO process_id)."""
        if self._proc is None:
            return False
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                sock.sendall(b"INFO server\r\n")
                data = b""
                while b"\r\nprocess_id:" not in data or not data.endswith(b"\r\n"):
                    chunk = sock.recv(4096)
                    if not chunk:
                        break
                    data += chunk
        except OSError:
            return False
        return f"\r\nprocess_id:{self._proc.pid}\r\n".encode() in data

    def start(self) -> RedisServer:
        """Launch the server and wait until it answers (as itself, not another server)."""
        if self.running:
            return self
        self._dir = Path(tempfile.mkdtemp(prefix="mw-redis-"))
        log = (self._dir / "redis.log").open("wb")
        try:
            self._proc = subprocess.Popen(
                [
                    self._executable,
                    "--save",
                    "",
                    "--appendonly",
                    "no",
                    "--bind",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--dir",
                    str(self._dir),
                    *(["--requirepass", self.password] if self.password else []),
                    *(["--unixsocket", str(self._dir / "redis.sock")] if self.unix_socket else []),
                ],
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        deadline = time.monotonic() + self._startup_timeout
        while not self._answers():
            if self._proc.poll() is not None or time.monotonic() > deadline:
                reason = (
                    f"exited with status {self._proc.returncode}"
                    if self._proc.poll() is not None
                    else f"did not answer within {self._startup_timeout:g}s"
                )
                tail = self._log_tail()
                self.stop()
                raise RedisServerError(
                    f"redis-server on port {self.port} {reason}; log tail:\n{tail}"
                )
            time.sleep(0.02)
        return self

    def stop(self) -> None:
        """Terminate the server (SIGTERM, then SIGKILL) and remove its temp dir."""
        proc, self._proc = self._proc, None
        stop_process(proc, timeout=5)
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def restart(self) -> RedisServer:
        """Stop the server and start a fresh, empty one on the same port."""
        self.stop()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        state = f"pid {self.pid}" if self.running else "stopped"
        return f"RedisServer(port={self.port}, {state})"
