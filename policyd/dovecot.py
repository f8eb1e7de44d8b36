"""The endpoint Dovecot reports logins to (auth policy, ``command=report``).

Dovecot's auth process POSTs one JSON object per authentication
(``auth_policy_report_after_auth``); a successful POP3/IMAP login of a subscriber
with the ``pop_before_smtp`` service opens a POP-before-SMTP window for the
client IP.  Every request is answered ``{"status":0}``: mailwarden never refuses
a login.  See docs/policyd.md, "Dovecot wiring".
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import ipaddress
import json
import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from mailwarden.address import InvalidAddress, normalize_address
from mailwarden.catalogue import Service
from mailwarden.directory import DirectoryUnavailable
from mailwarden.policy import AddressKind
from mailwarden.store import StoreUnavailable
from policyd.config import PolicydConfig

if TYPE_CHECKING:
    from policyd.app import PolicyApp

log = logging.getLogger("mailwarden.policyd")

MAX_HEAD = 8192
MAX_BODY = 65536
OK_BODY = b'{"status":0,"msg":"ok"}'


class LoginRecorder:
    """Turns one Dovecot report into a POP-before-SMTP window (or a reason not to)."""

    def __init__(self, app: PolicyApp) -> None:
        cfg = PolicydConfig.of(app.config)
        self.services = app.services
        self.protocols = frozenset(p.lower() for p in cfg.login_report_protocols)
        self.login_domain = cfg.login_domain

    def record(self, report: dict[str, Any]) -> str:
        """Act on a report; return what happened, for the log line.

        Raises DirectoryUnavailable or StoreUnavailable when the window could not be
        decided or written (the login itself is never affected).
        """
        if report.get("success") is not True:
            return "ignored: login failed"
        protocol = str(report.get("protocol", "")).lower()
        if protocol not in self.protocols:
            return f"ignored: protocol {protocol or '-'}"
        login = str(report.get("user") or report.get("login") or "").strip()
        if login and "@" not in login and self.login_domain:
            login = f"{login}@{self.login_domain}"
        try:
            address = normalize_address(login)
        except InvalidAddress:
            return f"ignored: login {login[:80]!r} is not an address"
        try:
            ip = ipaddress.ip_address(str(report.get("remote", "")).strip())
        except ValueError:
            return f"ignored: remote {str(report.get('remote'))[:60]!r} is not an IP address"
        policy = self.services.resolver.effective_policy(address)
        if policy.kind is not AddressKind.SUBSCRIBER:
            return f"ignored: {address} is not a subscriber"
        if not policy.active:
            return f"ignored: {address} is disabled"
        if not policy.enabled(Service.POP_BEFORE_SMTP):
            return f"ignored: {address} has no pop_before_smtp service"
        ttl = int(policy.get("pop_before_smtp_ttl"))
        subscriber = policy.canonical or address
        self.services.pbs.open(str(ip), subscriber, ttl)
        return f"window opened for {subscriber} from [{ip}] for {ttl} s"


class LoginReportServer:
    """A small HTTP/1.1 server (keep-alive, Content-Length bodies) for Dovecot's reports."""

    def __init__(self, app: PolicyApp, executor: ThreadPoolExecutor | None = None) -> None:
        cfg = PolicydConfig.of(app.config)
        self.recorder = LoginRecorder(app)
        self.executor = executor
        self.idle_timeout = cfg.idle_timeout
        self.header: tuple[str, bytes] | None = None
        if cfg.login_report_header:
            name, _, value = cfg.login_report_header.partition(":")
            self.header = (name.strip().lower(), value.strip().encode())
        self.servers: list[asyncio.AbstractServer] = []
        self.writers: set[asyncio.StreamWriter] = set()

    async def start(self, sockets: list[socket.socket]) -> None:
        """Serve on bound TCP sockets."""
        for sock in sockets:
            self.servers.append(await asyncio.start_server(self.handle, sock=sock, limit=MAX_HEAD))

    async def close(self) -> None:
        """Stop listening and close open connections."""
        for srv in self.servers:
            srv.close()
        for writer in list(self.writers):
            writer.close()

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """One Dovecot connection: requests in order until it closes or idles out."""
        self.writers.add(writer)
        peer = writer.get_extra_info("peername")
        try:
            while await self._one(reader, writer, peer):
                pass
        except (TimeoutError, asyncio.IncompleteReadError, ConnectionError):
            pass
        except asyncio.LimitOverrunError:
            log.warning("login report from %s: header longer than %d bytes; closing", peer, MAX_HEAD)
            await self._respond(writer, 431, b'{"status":0,"msg":"header too large"}', close=True)
        finally:
            self.writers.discard(writer)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: Any) -> bool:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), self.idle_timeout)
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/1."):
            log.warning("login report from %s: bad request line %r", peer, lines[0][:80])
            await self._respond(writer, 400, b'{"status":0,"msg":"bad request"}', close=True)
            return False
        method, target, version = parts
        headers: dict[str, str] = {}
        for line in lines[1:]:
            if line:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
        keep = headers.get("connection", "").lower() != "close" and version == "HTTP/1.1"
        length_text = headers.get("content-length", "0")
        if not length_text.isdigit() or int(length_text) > MAX_BODY:
            log.warning("login report from %s: bad Content-Length %r", peer, length_text[:20])
            await self._respond(writer, 413, b'{"status":0,"msg":"bad length"}', close=True)
            return False
        body = await asyncio.wait_for(reader.readexactly(int(length_text)), self.idle_timeout)
        if self.header is not None:
            got = headers.get(self.header[0], "").encode()
            if not hmac.compare_digest(got, self.header[1]):
                log.warning("login report from %s: missing or wrong %s header; ignored", peer,
                            self.header[0])
                await self._respond(writer, 401, b'{"status":0,"msg":"unauthorized"}', close=not keep)
                return keep
        if method != "POST":
            await self._respond(writer, 405, b'{"status":0,"msg":"POST only"}', close=not keep)
            return keep
        command = parse_qs(urlsplit(target).query).get("command", [""])[0]
        if command == "report":
            await self._report(body, peer)
        await self._respond(writer, 200, OK_BODY, close=not keep)
        return keep

    async def _report(self, body: bytes, peer: Any) -> None:
        try:
            report = json.loads(body)
            if not isinstance(report, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            log.warning("login report from %s: not JSON (%s); ignored", peer, exc)
            return
        who = f"{str(report.get('protocol', '-'))[:16]} {str(report.get('login', '-'))[:80]!r} " \
              f"[{str(report.get('remote', '-'))[:45]}]"
        loop = asyncio.get_running_loop()
        try:
            outcome = await loop.run_in_executor(self.executor, self.recorder.record, report)
        except (DirectoryUnavailable, StoreUnavailable) as exc:
            log.warning("login report %s: no window opened: %s", who, exc)
            return
        except Exception as exc:  # noqa: BLE001 - a fault in one report must not end the endpoint
            log.error("login report %s: no window opened: %s: %s", who, type(exc).__name__, exc)
            return
        level = logging.INFO if outcome.startswith("window") else logging.DEBUG
        log.log(level, "login report %s: %s", who, outcome)

    @staticmethod
    async def _respond(writer: asyncio.StreamWriter, status: int, body: bytes, *, close: bool) -> None:
        reason = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 405: "Method Not Allowed",
                  413: "Payload Too Large", 431: "Request Header Fields Too Large"}[status]
        head = (f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\nConnection: {'close' if close else 'keep-alive'}\r\n\r\n")
        writer.write(head.encode("ascii") + body)
        await writer.drain()
