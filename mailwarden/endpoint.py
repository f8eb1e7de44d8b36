"""Socket addresses as operators write them (``unix:/path``, ``inet:host:port``), for both
ends: the daemons listen on them and their clients (clamd, spamd, the re-injection
smtpd) connect to them.  The one parser of such addresses, the one binder of listening
sockets (a stale unix socket replaced, a live one never), and the one connector.
"""

from __future__ import annotations

import asyncio
import grp
import os
import socket
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

P = TypeVar("P", bound=asyncio.BaseProtocol)

__all__ = ["Endpoint", "EndpointError"]


class EndpointError(ValueError):
    """The text is not ``unix:/absolute/path`` or ``inet:host:port``."""


@dataclass(frozen=True)
class Endpoint:
    """``unix:/path`` or ``inet:host:port`` (an IPv6 host may be bracketed)."""

    kind: str
    """``unix`` or ``inet``."""
    where: str
    """The socket path, or the host."""
    port: int = 0

    @classmethod
    def parse(cls, spec: str) -> Endpoint:
        """Parse ``spec``; raises :class:`EndpointError` saying what is expected."""
        kind, sep, rest = spec.partition(":")
        if sep and kind == "unix":
            if not rest.startswith("/"):
                raise EndpointError(f"{spec!r}: a unix socket path must be absolute")
            return cls("unix", rest)
        if sep and kind == "inet":
            host, _, port = rest.rpartition(":")
            host = host.strip("[]")
            if host and port.isdigit() and 0 < int(port) < 65536:
                return cls("inet", host, int(port))
            raise EndpointError(f"{spec!r}: expected inet:host:port")
        raise EndpointError(f"{spec!r}: expected unix:/path or inet:host:port")

    @property
    def is_unix(self) -> bool:
        """Whether this is a unix socket."""
        return self.kind == "unix"

    def __str__(self) -> str:
        if self.is_unix:
            return f"unix:{self.where}"
        host = f"[{self.where}]" if ":" in self.where else self.where
        return f"inet:{host}:{self.port}"

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream connection on the running event loop (raises OSError)."""
        if self.is_unix:
            return await asyncio.open_unix_connection(self.where)
        return await asyncio.open_connection(self.where, self.port)

    async def open(self, factory: Callable[[], P]) -> P:
        """A connection on the running event loop whose protocol ``factory()`` makes."""
        loop = asyncio.get_running_loop()
        if self.is_unix:
            _, protocol = await loop.create_unix_connection(factory, self.where)
        else:
            _, protocol = await loop.create_connection(factory, self.where, self.port)
        return protocol

    def bind(self, *, mode: int = 0o660, group: str = "", backlog: int = 1024) -> socket.socket:
        """A listening, non-blocking socket (OSError naming the endpoint on failure).

        A unix socket file left by a process that is gone is replaced; one another
        process still listens on is not; any other file there is never removed.
        """
        if self.is_unix:
            sock = _bind_unix(Path(self.where), mode, group, backlog)
        else:
            family = socket.AF_INET6 if ":" in self.where else socket.AF_INET
            sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                sock.bind((self.where, self.port))
                sock.listen(backlog)
            except OSError as exc:
                sock.close()
                raise OSError(exc.errno, f"{self}: {exc.strerror}") from None
        sock.setblocking(False)
        return sock


def _bind_unix(path: Path, mode: int, group: str, backlog: int) -> socket.socket:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() or path.is_symlink():
        if not stat.S_ISSOCK(path.lstat().st_mode):
            raise OSError(17, f"unix:{path}: exists and is not a socket")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            probe.connect(str(path))
        except OSError:
            path.unlink()  # stale socket of a process that is gone
        else:
            raise OSError(98, f"unix:{path}: another process is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        path.chmod(mode)
        if group:
            os.chown(path, -1, grp.getgrnam(group).gr_gid)
        sock.listen(backlog)
    except (OSError, KeyError) as exc:
        sock.close()
        raise OSError(getattr(exc, "errno", None) or 2, f"unix:{path}: {exc}") from None
    return sock
