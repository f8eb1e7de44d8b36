"""Blocking sockets bounded by kernel timeouts, for the daemons' backend clients.

A Python socket with a timeout polls before every send and receive; each of those
extra system calls gives up and takes back the interpreter lock, which under many
threads costs futex calls and context switches.  A blocking socket with
``SO_SNDTIMEO``/``SO_RCVTIMEO`` makes one system call per operation and is still
bounded: an expired kernel timeout is raised here as :class:`TimeoutError`.
"""

from __future__ import annotations

import socket
import struct

__all__ = ["connect_tcp", "connect_unix", "receive", "send_all", "set_io_timeout"]


def _timeval(seconds: float) -> bytes:
    whole = int(seconds)
    micro = int((seconds - whole) * 1_000_000)
    if whole <= 0 and micro <= 0:
        micro = 1  # zero would mean "no timeout"
    return struct.pack("@ll", whole, micro)


def set_io_timeout(sock: socket.socket, seconds: float, *, send: bool = True, receive: bool = True) -> None:
    """Kernel timeouts for each later send / receive on a blocking socket."""
    value = _timeval(seconds)
    if send:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, value)
    if receive:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, value)


def connect_unix(path: str, timeout: float) -> socket.socket:
    """A blocking unix socket connected to ``path``, sends and receives bounded by ``timeout``."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        set_io_timeout(sock, timeout)  # SO_SNDTIMEO also bounds a unix connect
        sock.connect(path)
    except BlockingIOError:
        sock.close()
        raise TimeoutError(f"connect to {path} timed out") from None
    except OSError:
        sock.close()
        raise
    return sock


def connect_tcp(host: str, port: int, timeout: float) -> socket.socket:
    """A blocking TCP socket (no Nagle delay), connect, sends and receives bounded by ``timeout``.

    The connect itself runs in timeout mode (a kernel-timed blocking connect would be
    waited for by Python without limit), then the socket is switched to blocking.
    """
    sock = socket.create_connection((host, port), timeout=timeout)
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sock.settimeout(None)
        set_io_timeout(sock, timeout)
    except OSError:
        sock.close()
        raise
    return sock


def send_all(sock: socket.socket, data: bytes | bytearray, timeout: float | None = None) -> None:
    """``sendall`` on a blocking socket, each send bounded by ``timeout`` seconds (None: as set)."""
    if timeout is not None:
        set_io_timeout(sock, timeout, receive=False)
    try:
        sock.sendall(data)
    except BlockingIOError:
        raise TimeoutError("send timed out") from None


def receive(sock: socket.socket, size: int, timeout: float | None = None) -> bytes:
    """One ``recv`` on a blocking socket, bounded by ``timeout`` seconds (None: as set)."""
    if timeout is not None:
        set_io_timeout(sock, timeout, send=False)
    try:
        return sock.recv(size)
    except BlockingIOError:
        raise TimeoutError("receive timed out") from None
