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
from collections.abc import Callable, Iterable, Sequence

from clamav_client.clamd import BufferTooLongError, ClamdError, ClamdNetworkSocket, CommunicationError

from mailwarden.netio import receive, send_all
from milters.scanners import ScanError, VirusResult
from milters.scanners.upstreams import (
    DeadlineExceeded,
    Endpoint,
    Upstreams,
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
            # One write for a small message (command, chunks, terminator): each write
            # wakes clamd, and most mail is a few kilobytes.
            out = bytearray(b"nINSTREAM\n")
            try:
                for chunk in chunks:
                    for off in range(0, len(chunk), CHUNK):
                        piece = chunk[off:off + CHUNK]
                        out += struct.pack("!L", len(piece))
                        out += piece
                        if len(out) >= 4 * CHUNK:
                            send_all(sock, out, self._io_timeout())
                            out.clear()
                out += struct.pack("!L", 0)
                send_all(sock, out, self._io_timeout())
            except (BrokenPipeError, ConnectionResetError):
                # clamd stops reading once StreamMaxLength is passed; its reply says so.
                self.deadline = min(deadline, time.monotonic() + 1.0)
            reply = self._recv_response()
            if reply == "INSTREAM size limit exceeded. ERROR":
                raise BufferTooLongError(reply)
            _, signature, status = self._parse_response(reply)
            return str(status), str(signature or "")
        finally:
            self._close_socket()


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
                status, signature = _Session(endpoint, self.timeout).instream_chunks(stream(), deadline)
            except DeadlineExceeded as exc:
                errors.append(f"{endpoint}: {exc}")
                break
            except (ClamdError, OSError) as exc:
                # A refused stream (StreamMaxLength) is the config's fault, not the server's:
                # the next upstream would refuse it too.
                errors.append(f"{endpoint}: {exc or type(exc).__name__}")
                if isinstance(exc, BufferTooLongError):
                    break
                self.upstreams.failed(endpoint)
                log.warning("clamd %s failed: %s", endpoint, exc or type(exc).__name__)
                continue
            self.upstreams.succeeded(endpoint)
            if status == "FOUND":
                if signature.startswith(UNSCANNABLE_SIGNATURES):
                    return VirusResult(infected=False, signature=signature, upstream=str(endpoint),
                                       unscannable=signature)
                return VirusResult(infected=True, signature=signature, upstream=str(endpoint))
            if status == "OK":
                return VirusResult(infected=False, upstream=str(endpoint))
            errors.append(f"{endpoint}: {status} {signature}".strip())
        raise ScanError("clamd: " + "; ".join(errors))

    def ping(self) -> str:
        """PONG from the first upstream that answers (for ``mailwarden milter check``)."""
        for endpoint in self.upstreams.order():
            try:
                session = _Session(endpoint, min(self.timeout, 5.0))
                return f"{endpoint}: {session.ping()}"
            except (ClamdError, OSError) as exc:
                log.warning("clamd %s: %s", endpoint, exc)
        raise ScanError("no clamd upstream answers PING")
