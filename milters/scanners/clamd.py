"""clamd over INSTREAM with clamav-client, on unix sockets or TCP, with failover.

clamav-client supplies the protocol (command framing, reply parsing, its error
classes); this adapter connects through :class:`~milters.scanners.upstreams.Endpoint`
(timeout set before ``connect``, also for unix sockets), streams the message in
64 KiB chunks instead of 1 KiB ones, and bounds every socket operation by the
end-of-message deadline.
"""

from __future__ import annotations

import logging
import socket
import struct
import time
from collections.abc import Callable, Iterable, Iterator, Sequence

from clamav_client.clamd import (
    BufferTooLongError,
    ClamdError,
    ClamdNetworkSocket,
    CommunicationError,
    ResponseError,
    scan_response,
)

from mailwarden.netio import receive, send_all
from milters.scanners import ScanError, VirusResult
from milters.scanners.upstreams import (
    DeadlineExceeded,
    Endpoint,
    Upstreams,
    exchange,
    remaining,
    tighter,
)

log = logging.getLogger("mailwarden.milter.clamd")

CHUNK = 64 * 1024
UNSCANNABLE_SIGNATURES = ("Heuristics.Limits.Exceeded", "Heuristics.Encrypted")
"""Verdicts that say "could not look inside" rather than "found a virus"."""


class _Session(ClamdNetworkSocket):
    """One clamav-client conversation over a socket connected by our Endpoint.

    The socket is blocking with kernel timeouts (:meth:`Endpoint.connect_blocking`):
    one system call per send or receive, each bounded by what is left of the
    end-of-message deadline, at most ``timeout``.
    """

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        super().__init__(timeout=timeout)
        self.endpoint = endpoint
        self.cap = timeout or 60.0
        self.deadline: float | None = None

    def _io_timeout(self) -> float | None:
        """A tighter kernel timeout when the deadline is nearer than the one set at connect."""
        return tighter(self.deadline, self.cap) if self.deadline is not None else None

    def _init_socket(self) -> None:
        timeout = remaining(self.deadline, self.cap) if self.deadline is not None else self.cap
        self.cap = timeout
        try:
            self.clamd_socket = self.endpoint.connect_blocking(timeout)
        except OSError as err:
            raise CommunicationError(f"cannot connect to {self.endpoint}: {err}") from err

    def _error_message(self, exception: BaseException) -> str:
        return f"{self.endpoint}: {exception}"

    def _recv_response(self) -> str:
        """One reply line (clamav-client wraps the socket in a file object per call)."""
        data = b""
        while not data.endswith((b"\n", b"\0")) and len(data) < 4096:
            chunk = receive(self.clamd_socket, 4096, self._io_timeout())
            if not chunk:
                break
            data += chunk
        return data.decode("utf-8", "replace").strip("\0").strip()

    def instream_chunks(self, chunks: Iterable[bytes], deadline: float) -> tuple[str, str]:
        """INSTREAM the chunks; return (status, signature)."""
        self.deadline = deadline
        self._init_socket()
        sock: socket.socket = self.clamd_socket
        try:
            try:
                for batch in instream_batches(chunks):
                    send_all(sock, batch, self._io_timeout())
            except (BrokenPipeError, ConnectionResetError):
                # clamd stops reading once StreamMaxLength is passed; its reply says so.
                self.deadline = min(deadline, time.monotonic() + 1.0)
            return parse_reply(self._recv_response())
        finally:
            self._close_socket()


def instream_batches(chunks: Iterable[bytes]) -> Iterator[bytearray]:
    """The INSTREAM command and the framed chunks, in writes of about 256 KiB.

    One write for a small message (command, chunks, terminator): each write wakes
    clamd, and most mail is a few kilobytes.
    """
    out = bytearray(b"nINSTREAM\n")
    for chunk in chunks:
        for off in range(0, len(chunk), CHUNK):
            piece = chunk[off:off + CHUNK]
            out += struct.pack("!L", len(piece))
            out += piece
            if len(out) >= 4 * CHUNK:
                yield out
                out = bytearray()
    out += struct.pack("!L", 0)
    yield out


def parse_reply(reply: str) -> tuple[str, str]:
    """(status, signature) from clamd's INSTREAM reply (ClamdError for an error reply)."""
    if reply == "INSTREAM size limit exceeded. ERROR":
        raise BufferTooLongError(reply)
    match = scan_response.match(reply)
    if match is None:
        raise ResponseError(reply.rsplit("ERROR", 1)[0])
    return str(match.group("status")), str(match.group("virus") or "")


def _reply_complete(data: bytearray) -> bool:
    return data.endswith((b"\n", b"\0"))


async def _instream_async(endpoint: Endpoint, chunks: Iterable[bytes], deadline: float,
                          cap: float) -> tuple[str, str]:
    """One INSTREAM conversation on the running event loop (no thread, no blocking call)."""
    reply = await exchange(endpoint, instream_batches(chunks), deadline, cap, complete=_reply_complete)
    return parse_reply(reply.decode("utf-8", "replace").strip("\0").strip())


class ClamdScanner:
    """The VirusScanner adapter for one or more clamd upstreams."""

    def __init__(self, addresses: Sequence[str], *, timeout: float = 60.0, retry_after: float = 30.0) -> None:
        self.upstreams = Upstreams(addresses, retry_after)
        self.timeout = timeout

    def scan(self, stream: Callable[[], Iterable[bytes]], deadline: float) -> VirusResult:
        """Scan the message produced by ``stream()``; try each upstream until one answers."""
        errors: list[str] = []
        for endpoint in self.upstreams.order():
            try:
                answer = _Session(endpoint, self.timeout).instream_chunks(stream(), deadline)
            except (DeadlineExceeded, ClamdError, OSError) as exc:
                if self._failed(endpoint, exc, errors):
                    break
                continue
            result = self._conclude(endpoint, *answer, errors)
            if result is not None:
                return result
        raise ScanError("clamd: " + "; ".join(errors))

    async def scan_async(self, stream: Callable[[], Iterable[bytes]], deadline: float) -> VirusResult:
        """:meth:`scan` on the running event loop, without a thread."""
        errors: list[str] = []
        for endpoint in self.upstreams.order():
            try:
                answer = await _instream_async(endpoint, stream(), deadline, self.timeout or 60.0)
            except (DeadlineExceeded, ClamdError, OSError) as exc:
                if self._failed(endpoint, exc, errors):
                    break
                continue
            result = self._conclude(endpoint, *answer, errors)
            if result is not None:
                return result
        raise ScanError("clamd: " + "; ".join(errors))

    def _failed(self, endpoint: Endpoint, exc: Exception, errors: list[str]) -> bool:
        """Note a failed upstream; True when no other upstream should be tried."""
        errors.append(f"{endpoint}: {exc or type(exc).__name__}")
        # Out of time, or a refused stream (StreamMaxLength): the config's fault, not the
        # server's; the next upstream would refuse it too.
        if isinstance(exc, (DeadlineExceeded, BufferTooLongError)):
            return True
        self.upstreams.failed(endpoint)
        log.warning("clamd %s failed: %s", endpoint, exc or type(exc).__name__)
        return False

    def _conclude(self, endpoint: Endpoint, status: str, signature: str,
                  errors: list[str]) -> VirusResult | None:
        """The result of an answer, or None (noted in ``errors``) for a status we cannot use."""
        self.upstreams.succeeded(endpoint)
        if status == "FOUND":
            if signature.startswith(UNSCANNABLE_SIGNATURES):
                return VirusResult(infected=False, signature=signature, upstream=str(endpoint),
                                   unscannable=signature)
            return VirusResult(infected=True, signature=signature, upstream=str(endpoint))
        if status == "OK":
            return VirusResult(infected=False, upstream=str(endpoint))
        errors.append(f"{endpoint}: {status} {signature}".strip())
        return None

    def ping(self) -> str:
        """PONG from the first upstream that answers (for ``mailwarden milter check``)."""
        for endpoint in self.upstreams.order():
            try:
                session = _Session(endpoint, min(self.timeout, 5.0))
                return f"{endpoint}: {session.ping()}"
            except (ClamdError, OSError) as exc:
                log.warning("clamd %s: %s", endpoint, exc)
        raise ScanError("no clamd upstream answers PING")
