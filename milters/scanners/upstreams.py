"""Several upstreams of one kind (clamd, spamd), with failover, within the message's deadline.

Upstreams are tried in the configured order.  One that fails is put aside for
``retry_after`` seconds so that every message does not wait for a dead server
first; when all are put aside they are all tried anyway (a dead backend is never
a reason to skip a check).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Generic, TypeVar

from mailwarden.endpoint import Endpoint
from milters.scanners import ScanError

log = logging.getLogger("mailwarden.milter.upstreams")

A = TypeVar("A")
R = TypeVar("R")


class DeadlineExceeded(TimeoutError):
    """The end-of-message budget ran out before the call."""


def remaining(deadline: float, cap: float) -> float:
    """Seconds left until ``deadline`` (monotonic), at most ``cap``; raises when none are left."""
    left = deadline - time.monotonic()
    if left <= 0.01:
        raise DeadlineExceeded("end-of-message time budget exhausted")
    return min(left, cap)


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
        self.endpoints = [Endpoint.parse(a) for a in addresses]
        self.retry_after = retry_after
        self.clock = clock
        self._down_until: dict[Endpoint, float] = {}
        self.failures = 0
        """Upstreams put aside so far (each one a failover to the next)."""

    def order(self) -> list[Endpoint]:
        """Healthy endpoints first (configured order), then those recently failed."""
        now = self.clock()
        healthy = [e for e in self.endpoints if self._down_until.get(e, 0.0) <= now]
        return healthy + [e for e in self.endpoints if e not in healthy]

    def failed(self, endpoint: Endpoint) -> None:
        """Put ``endpoint`` aside for ``retry_after`` seconds."""
        self.failures += 1
        self._down_until[endpoint] = self.clock() + self.retry_after

    def succeeded(self, endpoint: Endpoint) -> None:
        """Forget a past failure of ``endpoint``."""
        self._down_until.pop(endpoint, None)


class Failover(Generic[A, R]):
    """The walk over a scanner's upstreams.

    Each upstream in :meth:`Upstreams.order` is tried with ``attempt(endpoint)``.  An
    ``errors`` exception is noted and the upstream put aside, unless it is one of
    ``final`` (out of time, or input every upstream would refuse), which ends the walk.
    An answer goes to ``conclude(endpoint, answer, notes)``: the result, or None for an
    answer that cannot be used (noted; the next upstream is tried).  With no result, a
    :class:`~milters.scanners.ScanError` lists the notes.
    """

    def __init__(self, name: str, upstreams: Upstreams, errors: tuple[type[Exception], ...],
                 conclude: Callable[[Endpoint, A, list[str]], R | None], *,
                 final: tuple[type[Exception], ...] = (DeadlineExceeded,)) -> None:
        self.name = name
        self.upstreams = upstreams
        self.errors = errors
        self.conclude = conclude
        self.final = final

    async def run(self, attempt: Callable[[Endpoint], Awaitable[A]]) -> R:
        """Walk the upstreams until one gives a result."""
        notes: list[str] = []
        for endpoint in self.upstreams.order():
            try:
                answer = await attempt(endpoint)
            except self.errors as exc:
                notes.append(f"{endpoint}: {exc or type(exc).__name__}")
                if isinstance(exc, self.final):
                    break
                self.upstreams.failed(endpoint)
                log.warning("%s %s failed: %s", self.name, endpoint, exc or type(exc).__name__)
                continue
            self.upstreams.succeeded(endpoint)
            if (result := self.conclude(endpoint, answer, notes)) is not None:
                return result
        raise ScanError(f"{self.name}: " + "; ".join(notes))
