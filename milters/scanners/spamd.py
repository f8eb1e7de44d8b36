"""spamd through aiospamc (``SYMBOLS``), on unix sockets or TCP, with failover.

One aiospamc client per upstream, built once: aiospamc's one-call frontend functions
build an SSL context on every call (tens of milliseconds of CPU), and its per-request
log lines (loguru) are switched off here; mailwarden logs one line per message itself.
aiospamc reads spamd's whole reply without a size bound; spamd is the operator's own
backend, and the reply to ``SYMBOLS`` is a few hundred bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

from aiospamc.client import Client
from aiospamc.connections import ConnectionManagerBuilder, Timeout
from aiospamc.exceptions import ClientException, TimeoutException
from aiospamc.requests import Request
from aiospamc.responses import Response, ResponseException
from loguru import logger

from mailwarden.endpoint import Endpoint
from milters.scanners import ScanError, SpamQuery, SpamResult
from milters.scanners.upstreams import DeadlineExceeded, Failover, Upstreams, within

log = logging.getLogger("mailwarden.milter.spamd")
logger.disable("aiospamc")

_ERRORS = (DeadlineExceeded, ClientException, TimeoutException, ResponseException, OSError, ValueError)


def _client(endpoint: Endpoint, timeout: float) -> Client:
    builder = ConnectionManagerBuilder()
    if endpoint.is_unix:
        builder = builder.with_unix_socket(Path(endpoint.where))
    else:
        builder = builder.with_tcp(endpoint.where, endpoint.port)
    return Client(builder.set_timeout(Timeout(total=timeout, connection=timeout, response=timeout)).build())


def symbols_of(response: Response) -> tuple[float, tuple[str, ...]]:
    """(score, rule names) from a ``SYMBOLS`` response (ValueError without a Spam header)."""
    spam = response.headers.spam
    if spam is None:
        raise ValueError("spamd reply without a Spam header")
    body = bytes(response.body).decode("ascii", "replace").strip()
    return float(spam.score), tuple(s.strip() for s in body.split(",") if s.strip())


class SpamdScanner:
    """The SpamScanner adapter for one or more spamd upstreams."""

    def __init__(
        self, addresses: Sequence[str], *, timeout: float = 30.0, retry_after: float = 30.0, user: str = ""
    ) -> None:
        self.upstreams = Upstreams(addresses, retry_after)
        self.timeout = timeout
        self.user = user
        self.clients = {e: _client(e, timeout) for e in self.upstreams.endpoints}
        self._failover: Failover[tuple[float, tuple[str, ...]], SpamResult] = Failover(
            "spamd", self.upstreams, _ERRORS, self._conclude)

    def _request(self, verb: str, message: bytes = b"") -> Request:
        request = Request(verb, body=message)
        if self.user:
            request.headers.user = self.user
        return request

    async def check(self, message: bytes, deadline: float, query: SpamQuery | None = None) -> SpamResult:
        """Score ``message``; try each upstream until one answers.  spamd takes no envelope:
        ``query`` is not used (the relay is in the ``Received:`` field before the message)."""

        async def attempt(endpoint: Endpoint) -> tuple[float, tuple[str, ...]]:
            async with within(deadline, self.timeout):
                return symbols_of(await self.clients[endpoint].request(self._request("SYMBOLS", message)))

        return await self._failover.run(attempt)

    @staticmethod
    def _conclude(endpoint: Endpoint, answer: tuple[float, tuple[str, ...]], errors: list[str]) -> SpamResult:
        score, symbols = answer
        return SpamResult(score=score, symbols=symbols, upstream=str(endpoint))

    async def ping(self) -> str:
        """PONG from the first upstream that answers."""
        for endpoint in self.upstreams.order():
            try:
                async with within(float("inf"), min(self.timeout, 5.0)):
                    await self.clients[endpoint].request(self._request("PING"))
                return f"{endpoint}: PONG"
            except _ERRORS as exc:
                log.warning("spamd %s: %s", endpoint, exc or type(exc).__name__)
        raise ScanError("no spamd upstream answers PING")
