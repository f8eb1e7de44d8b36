"""What the archive's small protocol clients (LMTP, IMAP) share: one connection on the
event loop that opened it, closed politely or abruptly, and the error of a command."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, Generic, TypeVar

R = TypeVar("R")
T = TypeVar("T")


class SessionError(Exception, Generic[R]):
    """A command the server refused (``reply``) or a session that broke or timed out
    (``reply`` None, ``detail`` says how); ``stage`` names the command."""

    def __init__(self, stage: str, reply: R | None, detail: str = "") -> None:
        self.stage = stage
        self.reply = reply
        super().__init__(f"{stage}: {reply}" if reply is not None else f"{stage}: {detail}")


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


async def connected(host: str, port: int, timeout: float,
                    handshake: Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[T]], *,
                    limit: int, error: type[SessionError[Any]]) -> T:
    """Connect and run ``handshake`` (greeting, hello, login) within ``timeout``; its result.

    A connection that fails or times out raises ``error`` at stage ``connect``; one whose
    handshake fails is closed.  ``limit``: the longest line the reader takes.
    """
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=limit)
            try:
                return await handshake(reader, writer)
            except BaseException:
                writer.close()
                raise
    except TimeoutError:
        raise error("connect", None, f"no answer from {host}:{port} in {timeout:g} s") from None
    except OSError as exc:
        raise error("connect", None, f"{host}:{port}: {exc}") from None
