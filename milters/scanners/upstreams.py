"""Several upstreams of one kind (clamd, spamd, the re-injection smtpd), with failover.

Upstreams are tried in the configured order.  One that fails is put aside for
``retry_after`` seconds so that every message does not wait for a dead server
first; when all are put aside they are all tried anyway (a dead backend is never
a reason to skip a check).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar, cast

from mailwarden.netio import connect_tcp, connect_unix
from milters.scanners import ScanError

P = TypeVar("P", bound=asyncio.BaseProtocol)
A = TypeVar("A")
R = TypeVar("R")


class DeadlineExceeded(TimeoutError):
    """The end-of-message budget ran out before the call."""


@dataclass(frozen=True)
class Endpoint:
    """``unix:/path`` or ``inet:host:port``."""

    address: str

    @property
    def is_unix(self) -> bool:
        """Whether this is a unix socket path."""
        return self.address.startswith("unix:")

    @property
    def path(self) -> str:
        """The unix socket path."""
        return self.address[len("unix:"):]

    @property
    def host_port(self) -> tuple[str, int]:
        """The inet host and port."""
        host, _, port = self.address[len("inet:"):].rpartition(":")
        return host.strip("[]"), int(port)

    def connect(self, timeout: float) -> socket.socket:
        """A connected stream socket with ``timeout`` set (raises OSError)."""
        if self.is_unix:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.settimeout(timeout)
                sock.connect(self.path)
            except OSError:
                sock.close()
                raise
            return sock
        return socket.create_connection(self.host_port, timeout=timeout)

    async def open_async(self, factory: Callable[[], P]) -> P:
        """A connection on the running event loop; the protocol ``factory()`` made for it."""
        loop = asyncio.get_running_loop()
        if self.is_unix:
            _, protocol = await loop.create_unix_connection(factory, self.path)
        else:
            _, protocol = await loop.create_connection(factory, *self.host_port)
        return protocol

    def connect_blocking(self, timeout: float) -> socket.socket:
        """Like :meth:`connect`, but a blocking socket bounded by kernel timeouts.

        Use :func:`~mailwarden.netio.send_all` and :func:`~mailwarden.netio.receive` on it.
        """
        if self.is_unix:
            return connect_unix(self.path, timeout)
        return connect_tcp(*self.host_port, timeout)

    def __str__(self) -> str:
        return self.address


def remaining(deadline: float, cap: float) -> float:
    """Seconds left until ``deadline`` (monotonic), at most ``cap``; raises when none are left."""
    left = deadline - time.monotonic()
    if left <= 0.01:
        raise DeadlineExceeded("end-of-message time budget exhausted")
    return min(left, cap)


def tighter(deadline: float, cap: float) -> float | None:
    """:func:`remaining` when the deadline is nearer than ``cap``, else None (``cap`` still holds).

    For sockets from :meth:`Endpoint.connect_blocking` opened with ``cap``: a new
    kernel timeout is only needed once the deadline comes closer than that.
    """
    left = remaining(deadline, cap)
    return left if left < cap else None


@contextlib.asynccontextmanager
async def within(deadline: float, cap: float) -> AsyncIterator[None]:
    """Bound the awaits inside by :func:`remaining`; running out raises TimeoutError
    saying how long was allowed."""
    timeout = remaining(deadline, cap)
    try:
        async with asyncio.timeout(timeout):
            yield
    except TimeoutError:
        raise TimeoutError(f"timed out after {timeout:.1f}s") from None


class Upstreams:
    """An ordered list of endpoints with a short memory of failures."""

    def __init__(
        self,
        addresses: Sequence[str],
        retry_after: float = 30.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not addresses:
            raise ValueError("at least one upstream is needed")
        self.endpoints = [Endpoint(a) for a in addresses]
        self.retry_after = retry_after
        self.clock = clock
        self._down_until: dict[Endpoint, float] = {}
        self._lock = threading.Lock()

    def order(self) -> list[Endpoint]:
        """Healthy endpoints first (configured order), then those recently failed."""
        now = self.clock()
        with self._lock:
            healthy = [e for e in self.endpoints if self._down_until.get(e, 0.0) <= now]
            resting = [e for e in self.endpoints if e not in healthy]
        return healthy + resting

    def failed(self, endpoint: Endpoint) -> None:
        """Put ``endpoint`` aside for ``retry_after`` seconds."""
        with self._lock:
            self._down_until[endpoint] = self.clock() + self.retry_after

    def succeeded(self, endpoint: Endpoint) -> None:
        """Forget a past failure of ``endpoint``."""
        if endpoint in self._down_until:
            with self._lock:
                self._down_until.pop(endpoint, None)


class Failover(Generic[A, R]):
    """The walk over a scanner's upstreams, shared by its blocking and event-loop calls.

    Each upstream in :meth:`Upstreams.order` is tried with ``attempt(endpoint)``.  An
    ``errors`` exception goes to ``failed(endpoint, error, notes)``, which notes it and
    says whether to stop (out of time, or input every upstream would refuse).  An answer
    goes to ``conclude(endpoint, answer, notes)``: the result, or None for an answer
    that cannot be used (noted; the next upstream is tried).  With no result, a
    :class:`~milters.scanners.ScanError` lists the notes.
    """

    def __init__(self, name: str, upstreams: Upstreams, errors: tuple[type[Exception], ...],
                 failed: Callable[[Endpoint, Exception, list[str]], bool],
                 conclude: Callable[[Endpoint, A, list[str]], R | None]) -> None:
        self.name = name
        self.upstreams = upstreams
        self.errors = errors
        self.failed = failed
        self.conclude = conclude

    def run(self, attempt: Callable[[Endpoint], A]) -> R:
        """Walk the upstreams with a blocking ``attempt``: :meth:`run_async` driven by hand,
        without an event loop (nothing in it suspends, so one ``send`` runs it to the end)."""

        async def at_once(endpoint: Endpoint) -> A:
            return attempt(endpoint)

        walk = self.run_async(at_once)
        try:
            walk.send(None)
        except StopIteration as done:
            return cast(R, done.value)
        walk.close()
        raise RuntimeError(f"{self.name}: a blocking failover walk suspended")

    async def run_async(self, attempt: Callable[[Endpoint], Awaitable[A]]) -> R:
        """Walk the upstreams with an ``attempt`` awaited on the running event loop."""
        notes: list[str] = []
        for endpoint in self.upstreams.order():
            try:
                answer = await attempt(endpoint)
            except self.errors as exc:
                if self.failed(endpoint, exc, notes):
                    break
                continue
            if (result := self.conclude(endpoint, answer, notes)) is not None:
                return result
        raise ScanError(f"{self.name}: " + "; ".join(notes))
