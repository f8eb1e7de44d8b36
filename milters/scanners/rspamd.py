"""rspamd over its HTTP protocol (``POST /checkv2``), on TCP or unix sockets, with failover.

The HTTP client is aiohttp, chosen over httpx (the other maintained async client):
aiohttp is written for asyncio itself, where httpx's async client runs through anyio
and httpcore.  One session per upstream, made on the event loop that first uses it
and made again on a different loop (``mailwarden selftest`` runs its probe in a loop
of its own).  rspamd 3.4's workers answer ``Connection: close`` whatever the client
asks, so each message is one connection; a unix socket saves the TCP handshake.

One request per message whatever the number of recipients.  The envelope and the
client go in the request headers rspamd's protocol defines (``From``, one ``Rcpt``
per recipient, ``IP``, ``Helo``, ``Hostname``, ``User``, ``Queue-Id``,
``MTA-Name``), so that its SPF, DKIM, DMARC, HELO and rate modules see the real
context.  When mailwarden has checked SPF, DKIM, DMARC and ARC itself and
``skip_auth`` is on, a ``Settings`` header switches off rspamd's ``policies`` group
(exactly those checks) for the message.

rspamd's own action is not used: the score is, against each recipient's settings.
A pre-result (GTUBE, a module forcing ``reject``) comes with the score of that
action, so it counts as the configured reject score.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import aiohttp
from multidict import CIMultiDict

from mailwarden.endpoint import Endpoint
from milters.scanners import ScanError, SpamQuery, SpamResult
from milters.scanners.upstreams import DeadlineExceeded, Failover, Upstreams, within

log = logging.getLogger("mailwarden.milter.rspamd")

_ERRORS = (DeadlineExceeded, aiohttp.ClientError, OSError, ValueError)
SKIP_AUTH_SETTINGS = json.dumps({"groups_disabled": ["policies"]})
"""rspamd settings that switch off its SPF, DKIM, DMARC and ARC symbols (the ``policies`` group)."""
_Answer = tuple[float, tuple[str, ...], str]
MAX_REPLY = 1024 * 1024
"""Largest reply read from rspamd (a reply lists symbols, a few kilobytes)."""


def ascii_address(address: str) -> str | None:
    """``address`` as rspamd 3.4 parses it in a request header: ASCII, an internationalised
    domain as its A-labels; None for a non-ASCII local part, which rspamd drops (and with
    it the envelope it came in)."""
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return None


def request_headers(query: SpamQuery | None, *, skip_auth: bool) -> CIMultiDict[str]:
    """rspamd's protocol headers for ``query`` (one ``Rcpt`` per recipient).  Addresses
    rspamd cannot read are left out: it then takes them from the message's fields."""
    headers: CIMultiDict[str] = CIMultiDict()
    if query is None:
        return headers
    sender = ascii_address(query.sender) if query.sender else "<>"
    if sender is not None:
        headers["From"] = sender
    for rcpt in query.recipients:
        if (readable := ascii_address(rcpt)) is not None:
            headers.add("Rcpt", readable)
    for name, value in (("IP", query.client_address), ("Helo", query.helo),
                        ("User", query.auth_user), ("Queue-Id", query.queue_id),
                        ("MTA-Name", query.receiver)):
        if value and value.isascii() and value.isprintable():
            headers[name] = value
    name = query.client_name
    if name and name != "unknown" and not name.startswith("[") and name.isascii() and name.isprintable():
        headers["Hostname"] = name
    if skip_auth and query.sender_auth_done:
        headers["Settings"] = SKIP_AUTH_SETTINGS
    return headers


def parse_reply(reply: Mapping[str, Any]) -> tuple[float, tuple[str, ...], str]:
    """(score, symbol names weightiest first, rspamd's action) from a ``/checkv2`` reply;
    ValueError for a reply without a usable score."""
    if "error" in reply:
        raise ValueError(f"rspamd: {reply['error']}")
    score = reply.get("score")
    if not isinstance(score, int | float) or isinstance(score, bool) or not math.isfinite(score):
        raise ValueError(f"rspamd reply without a score: {str(reply)[:200]}")
    symbols = reply.get("symbols") or {}
    if not isinstance(symbols, dict):
        raise ValueError("rspamd reply with symbols that are not a map")

    def weight(item: tuple[str, Any]) -> tuple[float, str]:
        value = item[1].get("score", 0.0) if isinstance(item[1], dict) else 0.0
        return (-abs(float(value)) if isinstance(value, int | float) else 0.0, item[0])

    names = tuple(name for name, _ in sorted(symbols.items(), key=weight))
    return float(score), names, str(reply.get("action", ""))


class RspamdScanner:
    """The SpamScanner adapter for one or more rspamd upstreams (normal or proxy worker)."""

    def __init__(self, addresses: Sequence[str], *, timeout: float = 20.0, retry_after: float = 30.0,
                 skip_auth: bool = True) -> None:
        self.upstreams = Upstreams(addresses, retry_after)
        self.timeout = timeout
        self.skip_auth = skip_auth
        self._sessions: dict[Endpoint, tuple[asyncio.AbstractEventLoop, aiohttp.ClientSession]] = {}
        self._failover: Failover[_Answer, SpamResult] = Failover(
            "rspamd", self.upstreams, _ERRORS, self._conclude)

    def _session(self, endpoint: Endpoint) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        known = self._sessions.get(endpoint)
        if known is not None and known[0] is loop and not known[1].closed:
            return known[1]
        # rspamd closes after each reply: no pool of idle connections to keep (force_close).
        connector: aiohttp.BaseConnector = (
            aiohttp.UnixConnector(path=endpoint.where, force_close=True) if endpoint.is_unix
            else aiohttp.TCPConnector(limit=0, use_dns_cache=True, force_close=True))
        # Timeouts come from the message's deadline (``within``), not from aiohttp.
        session = aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=None),
                                        raise_for_status=False, auto_decompress=False,
                                        skip_auto_headers=("User-Agent",))
        self._sessions[endpoint] = (loop, session)
        return session

    @staticmethod
    def _url(endpoint: Endpoint, path: str) -> str:
        if endpoint.is_unix:
            return f"http://localhost{path}"
        host = f"[{endpoint.where}]" if ":" in endpoint.where else endpoint.where
        return f"http://{host}:{endpoint.port}{path}"

    async def _post(self, endpoint: Endpoint, message: bytes, headers: CIMultiDict[str]) -> dict[str, Any]:
        async with self._session(endpoint).post(self._url(endpoint, "/checkv2"), data=message,
                                                headers=headers) as reply:
            body = await reply.content.read(MAX_REPLY + 1)
            if len(body) > MAX_REPLY:
                raise ValueError(f"rspamd reply larger than {MAX_REPLY} bytes")
            if reply.status != 200:
                raise ValueError(f"HTTP {reply.status}: {body[:200].decode('utf-8', 'replace').strip()}")
            parsed = json.loads(body)
            if not isinstance(parsed, dict):
                raise ValueError("rspamd reply is not a JSON object")
            return parsed

    async def check(self, message: bytes, deadline: float, query: SpamQuery | None = None) -> SpamResult:
        """Score ``message`` with one request; try each upstream until one answers."""
        headers = request_headers(query, skip_auth=self.skip_auth)

        async def attempt(endpoint: Endpoint) -> _Answer:
            async with within(deadline, self.timeout):
                return parse_reply(await self._post(endpoint, message, headers))

        return await self._failover.run(attempt)

    @staticmethod
    def _conclude(endpoint: Endpoint, answer: _Answer, errors: list[str]) -> SpamResult:
        score, symbols, _action = answer
        return SpamResult(score=score, symbols=symbols, upstream=str(endpoint))

    async def ping(self) -> str:
        """``pong`` from the first upstream that answers ``/ping``."""
        for endpoint in self.upstreams.order():
            try:
                async with (within(float("inf"), min(self.timeout, 5.0)),
                            self._session(endpoint).get(self._url(endpoint, "/ping")) as reply):
                    text = (await reply.content.read(64)).decode("ascii", "replace").strip()
                if reply.status == 200 and text == "pong":
                    return f"{endpoint}: pong"
                log.warning("rspamd %s: /ping answered HTTP %d %r", endpoint, reply.status, text)
            except _ERRORS as exc:
                log.warning("rspamd %s: %s", endpoint, exc or type(exc).__name__)
        raise ScanError("no rspamd upstream answers /ping")

    async def close(self) -> None:
        """Close the connections (sessions of the running loop)."""
        loop = asyncio.get_running_loop()
        for endpoint, (owner, session) in list(self._sessions.items()):
            if owner is loop:
                await session.close()
                del self._sessions[endpoint]
