"""rspamd over its HTTP protocol (``POST /checkv2``), on TCP or unix sockets, with failover.

One request per message whatever the number of recipients.  The envelope and the
client go in the request headers rspamd's protocol defines (``From``, one ``Rcpt``
per recipient, ``IP``, ``Helo``, ``Hostname``, ``User``, ``Queue-Id``,
``MTA-Name``), so that its SPF, DKIM, DMARC, HELO and rate modules see the real
context.  When mailwarden has checked SPF, DKIM, DMARC and ARC itself and
``skip_auth`` is on, the ``Settings`` header also switches off rspamd's ``policies``
group (exactly those checks) for the message.

Every request switches off rspamd's ``antivirus`` group: viruses are clamd's, through
mailwarden's own client and its cache, so an rspamd that has its antivirus module
configured (for other mail it scans, or as a milter of its own) would otherwise send
each message to clamd a second time.  Measured with one rspamd serving both
(bench/bench_rspamd.py): clamd spent 2.55 ms per message when mailwarden asked it and
rspamd's module scanned again, 1.02 ms for the one scan.

rspamd's own action is not used: the score is, against each recipient's settings.
A pre-result (GTUBE, a module forcing ``reject``) comes with the score of that
action, so it counts as the configured reject score.

Why an own HTTP exchange and not aiohttp (the maintained asyncio client, used here
before): rspamd 3.4's workers answer every request with ``Connection: close`` and
close, whatever the client asks (checked with a second request on the same
connection: the worker has gone), so there is no connection to keep and nothing for
a client's pool, cookie jar or streaming to do; what is left is one write (head and
message, without joining them) and one reply of a few kilobytes read to its
``Content-Length``.  Measured against one rspamd normal worker over its unix socket
(uvloop, 300 checks of a few KB, 10 in flight, on the shared 2-core machine), the
client's CPU per check, aiohttp 3.14 / this exchange: 0.41-0.62 / 0.21-0.32 ms; an
aiohttp session without cookie jar and automatic headers cost the same as the
default one (0.45 ms).  The reply is refused unless it is a complete ``HTTP/1.x 200``
with a body of at most :data:`MAX_REPLY` bytes (rspamd sends ``Content-Length``; a
chunked reply is refused, which rspamd's workers do not send).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any, cast

from mailwarden.endpoint import Endpoint
from milters.scanners import ScanError, SpamQuery, SpamResult
from milters.scanners.upstreams import DeadlineExceeded, Failover, Upstreams, within

log = logging.getLogger("mailwarden.milter.rspamd")

_ERRORS = (DeadlineExceeded, OSError, ValueError)
BASE_SETTINGS = json.dumps({"groups_disabled": ["antivirus"]})
"""rspamd settings of every request: its antivirus module off (clamd is mailwarden's)."""
SKIP_AUTH_SETTINGS = json.dumps({"groups_disabled": ["antivirus", "policies"]})
"""The same, and its SPF, DKIM, DMARC and ARC symbols (the ``policies`` group) off too."""
_Answer = tuple[float, tuple[str, ...], str]
MAX_REPLY = 1024 * 1024
"""Largest reply body read from rspamd (a reply lists symbols, a few kilobytes)."""
MAX_HEAD = 16 * 1024
"""Largest reply head (status line and header fields)."""
Headers = list[tuple[str, str]]
"""Request header fields in order (``Rcpt`` once per recipient)."""


def ascii_address(address: str) -> str | None:
    """``address`` as rspamd 3.4 parses it in a request header: ASCII, an internationalised
    domain as its A-labels; None for a non-ASCII local part, which rspamd drops (and with
    it the envelope it came in), and for control characters, which no header field carries."""
    if not address.isprintable():
        return None
    if address.isascii():
        return address
    local, at, domain = address.rpartition("@")
    if not at or not local.isascii():
        return None
    try:
        return f"{local}@{domain.encode('idna').decode('ascii')}"
    except UnicodeError:
        return None


def request_headers(query: SpamQuery | None, *, skip_auth: bool) -> Headers:
    """rspamd's protocol headers for ``query`` (one ``Rcpt`` per recipient).  Addresses
    rspamd cannot read are left out: it then takes them from the message's fields."""
    headers: Headers = []
    if query is None:
        return [("Settings", BASE_SETTINGS)]
    sender = ascii_address(query.sender) if query.sender else "<>"
    if sender is not None:
        headers.append(("From", sender))
    for rcpt in query.recipients:
        if (readable := ascii_address(rcpt)) is not None:
            headers.append(("Rcpt", readable))
    for name, value in (("IP", query.client_address), ("Helo", query.helo),
                        ("User", query.auth_user), ("Queue-Id", query.queue_id),
                        ("MTA-Name", query.receiver)):
        if value and value.isascii() and value.isprintable():
            headers.append((name, value))
    name = query.client_name
    if name and name != "unknown" and not name.startswith("[") and name.isascii() and name.isprintable():
        headers.append(("Hostname", name))
    skip = skip_auth and query.sender_auth_done
    headers.append(("Settings", SKIP_AUTH_SETTINGS if skip else BASE_SETTINGS))
    return headers


def request_head(method: str, path: str, host: str, length: int, headers: Headers) -> bytes:
    """An HTTP/1.1 request head; the values are ASCII without line breaks
    (:func:`request_headers` leaves out any other)."""
    lines = [f"{method} {path} HTTP/1.1", f"Host: {host}", "Connection: close", f"Content-Length: {length}"]
    lines.extend(f"{name}: {value}" for name, value in headers)
    lines.append("\r\n")
    return "\r\n".join(lines).encode("ascii")


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


class _Exchange(asyncio.Protocol):
    """One request and its reply on a connection of its own: the request goes out in one
    write once connected; :attr:`reply` ends as (status, body) when the body announced by
    ``Content-Length`` is in (or, without one, when rspamd closes), or as an error."""

    def __init__(self, request: Sequence[bytes], reply: asyncio.Future[tuple[int, bytes]]) -> None:
        self.request = request
        self.reply = reply
        self.transport: asyncio.Transport | None = None
        self.data = bytearray()
        self.body_at = -1
        self.length = -1
        self.status = 0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        self.transport.writelines(self.request)

    def data_received(self, data: bytes) -> None:
        self.data += data
        try:
            if self.body_at < 0:
                end = self.data.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.data) > MAX_HEAD:
                        raise ValueError(f"rspamd reply head longer than {MAX_HEAD} bytes")
                    return
                self.status, self.length = _reply_head(bytes(self.data[:end]))
                self.body_at = end + 4
            body = len(self.data) - self.body_at
            if body > MAX_REPLY:
                raise ValueError(f"rspamd reply larger than {MAX_REPLY} bytes")
            if 0 <= self.length <= body:
                self._done(bytes(self.data[self.body_at:self.body_at + self.length]))
        except ValueError as exc:
            self.fail(exc)

    def eof_received(self) -> bool | None:
        self._end()
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        if exc is not None:
            self.fail(exc)
        self._end()

    def _end(self) -> None:
        if self.reply.done():
            return
        if self.body_at < 0:
            self.fail(ConnectionResetError("rspamd closed the connection without a reply"))
        elif self.length >= 0:
            self.fail(ValueError("rspamd closed the connection before the end of its reply"))
        else:
            self._done(bytes(self.data[self.body_at:]))

    def _done(self, body: bytes) -> None:
        if not self.reply.done():
            self.reply.set_result((self.status, body))
        self.close()

    def fail(self, exc: Exception) -> None:
        """End the exchange with ``exc`` (unless it has ended) and close the connection."""
        if not self.reply.done():
            self.reply.set_exception(exc)
        self.close()

    def close(self) -> None:
        """Close the connection (at once: nothing more is sent on it)."""
        if self.transport is not None:
            self.transport.abort()


def _reply_head(head: bytes) -> tuple[int, int]:
    """(status, Content-Length or -1) of a reply head; ValueError for what is not HTTP/1.x
    or comes chunked."""
    lines = head.decode("latin-1").split("\r\n")
    version, _, rest = lines[0].partition(" ")
    code = rest[:3]
    if not version.startswith("HTTP/1.") or not code.isdigit():
        raise ValueError(f"not an HTTP reply: {lines[0][:80]!r}")
    length = -1
    for line in lines[1:]:
        name, _, value = line.partition(":")
        name = name.strip().lower()
        if name == "content-length":
            value = value.strip()
            if not value.isdigit():
                raise ValueError(f"bad Content-Length {value[:20]!r}")
            length = int(value)
        elif name == "transfer-encoding" and value.strip().lower() != "identity":
            raise ValueError(f"rspamd reply with Transfer-Encoding {value.strip()[:20]!r}")
    return int(code), length


class RspamdScanner:
    """The SpamScanner adapter for one or more rspamd upstreams (normal or proxy worker)."""

    def __init__(self, addresses: Sequence[str], *, timeout: float = 20.0, retry_after: float = 30.0,
                 skip_auth: bool = True) -> None:
        self.upstreams = Upstreams(addresses, retry_after)
        self.timeout = timeout
        self.skip_auth = skip_auth
        self._open: set[_Exchange] = set()
        self._failover: Failover[_Answer, SpamResult] = Failover(
            "rspamd", self.upstreams, _ERRORS, self._conclude)

    @staticmethod
    def _host(endpoint: Endpoint) -> str:
        if endpoint.is_unix:
            return "localhost"
        host = f"[{endpoint.where}]" if ":" in endpoint.where else endpoint.where
        return f"{host}:{endpoint.port}"

    async def _exchange(self, endpoint: Endpoint, method: str, path: str, message: bytes,
                        headers: Headers) -> tuple[int, bytes]:
        """(status, body) of one request on a new connection, closed when this returns."""
        reply: asyncio.Future[tuple[int, bytes]] = asyncio.get_running_loop().create_future()
        request = (request_head(method, path, self._host(endpoint), len(message), headers), message)
        exchange = await endpoint.open(lambda: _Exchange(request, reply))
        self._open.add(exchange)
        try:
            return await reply
        finally:
            self._open.discard(exchange)
            exchange.close()

    async def _post(self, endpoint: Endpoint, message: bytes, headers: Headers) -> dict[str, Any]:
        status, body = await self._exchange(endpoint, "POST", "/checkv2", message, headers)
        if status != 200:
            raise ValueError(f"HTTP {status}: {body[:200].decode('utf-8', 'replace').strip()}")
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
                async with within(float("inf"), min(self.timeout, 5.0)):
                    status, body = await self._exchange(endpoint, "GET", "/ping", b"", [])
                text = body[:64].decode("ascii", "replace").strip()
                if status == 200 and text == "pong":
                    return f"{endpoint}: pong"
                log.warning("rspamd %s: /ping answered HTTP %d %r", endpoint, status, text)
            except _ERRORS as exc:
                log.warning("rspamd %s: %s", endpoint, exc or type(exc).__name__)
        raise ScanError("no rspamd upstream answers /ping")

    @property
    def connections(self) -> int:
        """Requests waiting for their reply (each on a connection of its own)."""
        return len(self._open)

    async def close(self) -> None:
        """Close the connections of requests still waiting (their checks fail)."""
        for exchange in list(self._open):
            exchange.fail(ConnectionAbortedError("rspamd client closed"))
        self._open.clear()
