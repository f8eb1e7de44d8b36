"""What the archive's small protocol clients (LMTP, IMAP) share: one connection on the
event loop that opened it, closed politely or abruptly."""

from __future__ import annotations

import asyncio
import contextlib


class StreamSession:
    """A client session over an asyncio stream pair, usable only on the loop that opened it."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.loop = asyncio.get_running_loop()

    @property
    def usable(self) -> bool:
        """Open, and on the running loop (a session opened on an ended loop is not)."""
        try:
            running = asyncio.get_running_loop()
        except RuntimeError:
            return False
        return running is self.loop and not self.writer.is_closing()

    def abort(self) -> None:
        """Close without a goodbye (after a failure, or for a session of an ended loop)."""
        with contextlib.suppress(RuntimeError):  # its loop has ended
            self.writer.transport.abort()

    def say_goodbye(self, line: bytes) -> None:
        """Send ``line`` (QUIT, LOGOUT) and close, not waiting for the answer."""
        with contextlib.suppress(RuntimeError, OSError):
            if not self.writer.is_closing():
                self.writer.write(line)
            self.writer.close()
