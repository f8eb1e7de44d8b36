"""A small blocking Redis client: one connection, one command at a time (RESP2).

The store sends a handful of commands per SMTP transaction, many thousands per
second; a general client's layers (pools, retries, hooks, response callbacks)
cost more CPU than the round trip itself.  This one packs and parses with
hiredis and does nothing else.  Supported URLs (as redis-py reads them)::

    redis://[[user]:password@]host[:port][/db]
    rediss://...                          (TLS, system trust store)
    unix:///path/to/redis.sock[?db=N&password=...]
"""

from __future__ import annotations

import select
import socket
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import hiredis

from mailwarden.netio import connect_tcp, connect_unix, receive, send_all

__all__ = ["RedisAddress", "RedisConnection", "RedisConnectionLost", "RedisError", "RedisReplyError"]

_READ_SIZE = 65536


class RedisError(Exception):
    """The connection failed (refused, reset, timed out, closed by the server)."""


class RedisConnectionLost(RedisError):
    """The server closed the connection (or reset it) before answering."""


class RedisReplyError(Exception):
    """The server answered with an error reply (``WRONGTYPE ...``, ``NOSCRIPT ...``)."""


@dataclass(frozen=True, slots=True)
class RedisAddress:
    """Where and how to connect, from a URL."""

    host: str = "127.0.0.1"
    port: int = 6379
    path: str = ""
    """Unix socket path (then host and port are unused)."""
    db: int = 0
    username: str = ""
    password: str = ""
    tls: bool = False

    @classmethod
    def from_url(cls, url: str) -> RedisAddress:
        """Parse a ``redis://``, ``rediss://`` or ``unix://`` URL (ValueError when it is none)."""
        parts = urlsplit(url)
        query = {k: v[-1] for k, v in parse_qs(parts.query).items()}
        username = unquote(parts.username or query.get("username", ""))
        password = unquote(parts.password or query.get("password", ""))
        db_text = query.get("db", "")
        if parts.scheme == "unix":
            if not parts.path:
                raise ValueError(f"{url!r}: no socket path")
            return cls(path=parts.path, db=_db(db_text or "0", url), username=username,
                       password=password)
        if parts.scheme not in ("redis", "rediss"):
            raise ValueError(f"{url!r}: expected redis://, rediss:// or unix://")
        path_db = parts.path.strip("/")
        return cls(host=parts.hostname or "127.0.0.1", port=parts.port or 6379,
                   db=_db(path_db or db_text or "0", url), username=username, password=password,
                   tls=parts.scheme == "rediss")


def _db(text: str, url: str) -> int:
    if not text.isdigit():
        raise ValueError(f"{url!r}: database {text!r} is not a number")
    return int(text)


class RedisConnection:
    """One connection; connects on first use and after :meth:`close`.

    Not thread-safe: give each thread its own.
    """

    def __init__(self, address: RedisAddress, timeout: float) -> None:
        self.address = address
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")

    @property
    def connected(self) -> bool:
        """Whether a socket is open."""
        return self._sock is not None

    def _connect(self) -> socket.socket:
        addr = self.address
        try:
            if addr.path:
                sock = connect_unix(addr.path, self.timeout)
            elif addr.tls:
                # TLS records need Python's own timeout handling.
                plain = socket.create_connection((addr.host, addr.port), timeout=self.timeout)
                sock = ssl.create_default_context().wrap_socket(plain, server_hostname=addr.host)
            else:
                sock = connect_tcp(addr.host, addr.port, self.timeout)
        except OSError as exc:
            raise RedisError(f"cannot connect: {exc}") from exc
        self._sock = sock
        self._reader = hiredis.Reader(encoding="utf-8", errors="replace")
        try:
            if addr.password:
                auth = (addr.username, addr.password) if addr.username else (addr.password,)
                self._roundtrip(sock, ("AUTH", *auth))
            if addr.db:
                self._roundtrip(sock, ("SELECT", addr.db))
        except BaseException:
            self.close()
            raise
        return sock

    def idle_closed(self) -> bool:
        """True when the idle connection has something to read: the server closed it."""
        sock = self._sock
        if sock is None:
            return False
        try:
            readable, _, _ = select.select([sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def command(self, *args: Any) -> Any:
        """Send one command and return its reply (RedisReplyError for an error reply)."""
        sock = self._sock or self._connect()
        return self._roundtrip(sock, args)

    def _roundtrip(self, sock: socket.socket, args: tuple[Any, ...]) -> Any:
        reader = self._reader
        try:
            send_all(sock, hiredis.pack_command(args))
            reply = reader.gets()
            while reply is False:
                data = receive(sock, _READ_SIZE)
                if not data:
                    raise RedisConnectionLost("connection closed by the server")
                reader.feed(data)
                reply = reader.gets()
        except (ConnectionResetError, BrokenPipeError) as exc:
            self.close()
            raise RedisConnectionLost(str(exc)) from exc
        except OSError as exc:
            self.close()
            raise RedisError(str(exc) or type(exc).__name__) from exc
        except hiredis.ProtocolError as exc:
            self.close()
            raise RedisError(f"protocol error: {exc}") from exc
        except RedisError:
            self.close()
            raise
        if isinstance(reply, hiredis.ReplyError):
            raise RedisReplyError(str(reply))
        return reply

    def close(self) -> None:
        """Close the socket (the next command reconnects)."""
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
