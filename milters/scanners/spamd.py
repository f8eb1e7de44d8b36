"""A small synchronous SPAMC/1.5 client (``SYMBOLS``) for spamd, with failover.

Two ways to ask, sharing the framing and the failover: :meth:`SpamdScanner.check`
blocks (a milter thread: pymilter's, or a worker of the asyncio server) and
:meth:`SpamdScanner.check_async` is non-blocking I/O on the asyncio server's loop.
Why not aiospamc: it needs a running loop, so pymilter's threads would each need a
cross-thread hand-off per message; it also builds an SSL context per call unless
wrapped (NOTES.md) and logs every request.  The protocol needed here is one request
and one reply, about forty lines.
"""

from __future__ import annotations

import asyncio
import logging
import re
import socket
from collections.abc import Sequence
from typing import cast

from mailwarden.netio import receive, send_all
from milters.scanners import ScanError, SpamResult
from milters.scanners.upstreams import (
    DeadlineExceeded,
    Endpoint,
    Failover,
    Upstreams,
    remaining,
    tighter,
    within,
)

log = logging.getLogger("mailwarden.milter.spamd")

MAX_REPLY = 256 * 1024
_STATUS = re.compile(rb"^SPAMD/\d+\.\d+\s+(\d+)\s*(.*)$")
_SPAM = re.compile(rb"^Spam:\s*(\w+)\s*;\s*(-?[0-9.]+)\s*/\s*(-?[0-9.]+)", re.IGNORECASE | re.MULTILINE)


class SpamdProtocolError(Exception):
    """spamd answered something that is not a SPAMD reply."""


def build_request(message: bytes, user: str = "") -> bytes:
    """A ``SYMBOLS`` request for ``message``."""
    head = f"SYMBOLS SPAMC/1.5\r\nContent-length: {len(message)}\r\n"
    if user:
        head += f"User: {user}\r\n"
    return head.encode("ascii") + b"\r\n" + message


def parse_reply(reply: bytes) -> tuple[float, tuple[str, ...]]:
    """(score, symbols) from a SYMBOLS reply; raises SpamdProtocolError."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    if not sep:
        head, sep, body = reply.partition(b"\n\n")
    status = _STATUS.match(head.split(b"\n", 1)[0].strip())
    if status is None:
        raise SpamdProtocolError(f"not a SPAMD reply: {reply[:80]!r}")
    if status.group(1) != b"0":
        code, text = status.group(1).decode(), status.group(2).decode(errors="replace")
        raise SpamdProtocolError(f"spamd error {code} {text}")
    spam = _SPAM.search(head)
    if spam is None:
        raise SpamdProtocolError("reply without a Spam: header")
    symbols = tuple(s for s in body.decode("ascii", "replace").strip().split(",") if s)
    return float(spam.group(2)), symbols


def _check_length(size: int) -> None:
    """Refuse a reply (``size`` bytes so far) longer than MAX_REPLY."""
    if size > MAX_REPLY:
        raise SpamdProtocolError("reply too long")


class _Reply(asyncio.Protocol):
    """Sends one request on an event-loop connection and collects spamd's whole reply."""

    def __init__(self, request: bytes) -> None:
        self.request = request
        self.done: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        self.data = bytearray()
        self.transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        writer = cast(asyncio.WriteTransport, transport)
        writer.write(self.request)
        writer.write_eof()

    def data_received(self, data: bytes) -> None:
        self.data += data
        if len(self.data) > MAX_REPLY:
            self._finish()  # too long: parsing refuses it

    def eof_received(self) -> bool | None:
        self._finish()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self._finish(exc or ConnectionResetError("spamd closed the connection"))

    def _finish(self, error: BaseException | None = None) -> None:
        if not self.done.done():
            if self.data or error is None:
                self.done.set_result(bytes(self.data))
            else:
                self.done.set_exception(error)


class SpamdScanner:
    """The SpamScanner adapter for one or more spamd upstreams."""

    def __init__(
        self, addresses: Sequence[str], *, timeout: float = 30.0, retry_after: float = 30.0, user: str = ""
    ) -> None:
        self.upstreams = Upstreams(addresses, retry_after)
        self.timeout = timeout
        self.user = user
        self._failover: Failover[tuple[float, tuple[str, ...]], SpamResult] = Failover(
            "spamd", self.upstreams, (OSError, SpamdProtocolError, ValueError), self._failed, self._conclude)

    def check(self, message: bytes, deadline: float) -> SpamResult:
        """Score ``message``; try each upstream until one answers."""
        request = build_request(message, self.user)
        return self._failover.run(lambda endpoint: parse_reply(self._exchange(endpoint, request, deadline)))

    async def check_async(self, message: bytes, deadline: float) -> SpamResult:
        """:meth:`check` on the running event loop, without a thread."""
        request = build_request(message, self.user)

        async def attempt(endpoint: Endpoint) -> tuple[float, tuple[str, ...]]:
            return parse_reply(await self._exchange_async(endpoint, request, deadline))

        return await self._failover.run_async(attempt)

    def _failed(self, endpoint: Endpoint, exc: Exception, errors: list[str]) -> bool:
        """Note a failed upstream; True when no other upstream should be tried (out of time)."""
        errors.append(f"{endpoint}: {exc or type(exc).__name__}")
        if isinstance(exc, DeadlineExceeded):
            return True
        self.upstreams.failed(endpoint)
        log.warning("spamd %s failed: %s", endpoint, exc or type(exc).__name__)
        return False

    def _conclude(self, endpoint: Endpoint, answer: tuple[float, tuple[str, ...]],
                  errors: list[str]) -> SpamResult:
        self.upstreams.succeeded(endpoint)
        score, symbols = answer
        return SpamResult(score=score, symbols=symbols, upstream=str(endpoint))

    async def _exchange_async(self, endpoint: Endpoint, request: bytes, deadline: float) -> bytes:
        """One request and spamd's reply on a new connection, on the running event loop."""
        reply: _Reply | None = None
        try:
            async with within(deadline, self.timeout):
                reply = await endpoint.open_async(lambda: _Reply(request))
                data = await reply.done
        finally:
            if reply is not None and reply.transport is not None:
                reply.transport.close()
        _check_length(len(data))
        return data

    def _exchange(self, endpoint: Endpoint, request: bytes, deadline: float) -> bytes:
        # Blocking with kernel timeouts: one system call per send or receive (no poll).
        cap = remaining(deadline, self.timeout)
        sock = endpoint.connect_blocking(cap)
        try:
            send_all(sock, request, tighter(deadline, cap))
            sock.shutdown(socket.SHUT_WR)
            chunks: list[bytes] = []
            size = 0
            while True:
                chunk = receive(sock, 65536, tighter(deadline, cap))
                if not chunk:
                    return b"".join(chunks)
                size += len(chunk)
                _check_length(size)
                chunks.append(chunk)
        finally:
            sock.close()

    def ping(self) -> str:
        """PONG from the first upstream that answers."""
        for endpoint in self.upstreams.order():
            try:
                sock = endpoint.connect(5.0)
                try:
                    sock.sendall(b"PING SPAMC/1.5\r\n\r\n")
                    reply = sock.recv(1024)
                finally:
                    sock.close()
                if b"PONG" in reply:
                    return f"{endpoint}: PONG"
            except OSError as exc:
                log.warning("spamd %s: %s", endpoint, exc)
        raise ScanError("no spamd upstream answers PING")
