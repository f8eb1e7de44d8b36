"""What every test daemon harness does with its process and its log file."""

from __future__ import annotations

import subprocess
from pathlib import Path


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
