"""What every test daemon harness does with its process and its log file."""

from __future__ import annotations

import shutil
import socketserver
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Self


def stop_process(proc: subprocess.Popen[bytes] | None, timeout: float) -> None:
    """End a process this harness started, by its PID: SIGTERM, then SIGKILL after ``timeout``."""
    if proc is None or proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def read_log(path: Path, since: int = 0) -> str:
    """A log file from byte offset ``since`` (empty if it does not exist yet)."""
    try:
        with path.open("rb") as fh:
            fh.seek(since)
            return fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def log_size(path: Path) -> int:
    """The current end of a log file, to pass as ``since`` later."""
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def tail(text: str, lines: int) -> str:
    """The last ``lines`` lines of ``text``, for error messages."""
    return "\n".join(text.splitlines()[-lines:])


def file_tail(path: Path, lines: int) -> str:
    """The last ``lines`` lines of a file, or "" when it cannot be read."""
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError:
        return ""


class TestDaemon:
    """The life cycle every test daemon shares: started by :meth:`start` (per daemon),
    ended by its PID; ``restart``, ``cleanup`` and use as a context manager.

    Subclasses set ``dir`` (their work directory), ``owns_dir`` (remove it on cleanup),
    ``stop_timeout`` and ``log_tail``; :meth:`launch` starts the process and waits until
    ``ready()`` says it answers.
    """

    __test__ = False  # not a pytest test class, despite the name
    dir: Path
    proc: subprocess.Popen[bytes] | None = None
    owns_dir: bool = True
    stop_timeout: float = 10.0
    name: str = "daemon"

    def start(self) -> Self:
        """Start the daemon and wait until it answers."""
        raise NotImplementedError

    @property
    def pid(self) -> int | None:
        """PID of the running process, if any."""
        return self.proc.pid if self.proc is not None and self.proc.poll() is None else None

    def log_tail(self, lines: int = 20) -> str:
        """The end of the daemon's log, for error messages."""
        return ""

    def launch(self, args: list[str], console: Path, ready: Callable[[], bool], *, timeout: float,
               error: type[Exception] = RuntimeError) -> None:
        """Start ``args`` (output to ``console``) and wait up to ``timeout`` s for ``ready()``."""
        with console.open("ab") as out:
            self.proc = subprocess.Popen(args, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + timeout
        while not ready():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                why = (f"exited with status {self.proc.returncode}" if self.proc.poll() is not None
                       else f"did not answer within {timeout:g} s")
                tail_text = self.log_tail()
                self.stop()
                raise error(f"{self.name} {why}; log tail:\n{tail_text}")
            time.sleep(0.05)

    def stop(self) -> None:
        """End the process by its PID (TERM, then KILL after ``stop_timeout``)."""
        proc, self.proc = self.proc, None
        stop_process(proc, timeout=self.stop_timeout)

    def restart(self) -> None:
        """Stop and start again with the same settings."""
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop and remove the work directory (when it was created here)."""
        self.stop()
        if self.owns_dir:
            shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.cleanup()


class ThreadedFake:
    """A fake backend served from a background thread: subclasses set ``server`` (a
    socketserver) in ``__init__``; ``start``, ``stop`` and use as a context manager."""

    server: socketserver.BaseServer

    def __init__(self) -> None:
        self._stop = threading.Event()

    def start(self) -> Self:
        """Serve in a background thread."""
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        """Stop serving (requests waiting on ``_stop`` give up)."""
        self._stop.set()
        self.server.shutdown()
        self.server.server_close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, et: type[BaseException] | None, ev: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
