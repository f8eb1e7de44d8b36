"""Fakes and builders shared by the milter tests."""

from __future__ import annotations

import asyncio
import io
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

import Milter
from Milter.testctx import TestCtx

from mailwarden.config import Config, parse_config
from mailwarden.policy import PolicyResolver
from mailwarden.store import MemoryStore, Store
from mailwarden.testing.clamd import EICAR
from mailwarden.testing.fakes import FakeDirectory
from mailwarden.testing.spamd import GTUBE
from milters.app import ContentMilter
from milters.message import BodySpool, Limits, Message, parse_header_block
from milters.reinject import InjectError, Origin
from milters.scanners import ScanError, SpamResult, VirusResult
from milters.service import MilterService, build_service

# TestCtx treats a NOREPLY answer as a refusal; an MTA that negotiated no-reply does not.
# Offer no P_NR_* bits, so the @noreply callbacks answer CONTINUE as to an old MTA.
_NR_BITS = (Milter.P_NR_CONN | Milter.P_NR_HELO | Milter.P_NR_MAIL | Milter.P_NR_RCPT | Milter.P_NR_DATA
            | Milter.P_NR_UNKN | Milter.P_NR_EOH | Milter.P_NR_BODY | Milter.P_NR_HDR)
TestCtx.default_opts = [Milter.CURR_ACTS, 0x1FFFFF & ~_NR_BITS, 0, 0]


def sample_directory() -> FakeDirectory:
    """A fake directory shaped like ldap/sample.ldif (the parts the milter cares about)."""
    d = FakeDirectory()
    d.add_domain("example.jp", domain_alias="example.ne.jp",
                 enabled_service=["virus-scan", "extension-filter"],
                 notice_language="ja", notice_recipients=["recipient", "admin"],
                 admin_address="postmaster@example.jp")
    d.add_user("taro@example.jp", enabled_service=["spam-check", "keyword-filter"],
               keyword_rules=["subject contains junk 未承諾広告", r"body regex reject (?i)cheap\s+pills"])
    d.add_user("hanako@example.jp", enabled_service=["spam-check"], disabled_service=["virus-scan"],
               spam_threshold="3.5", spam_action="subject")
    d.add_domain("example.com", enabled_service=["virus-scan", "spam-check", "keyword-filter",
                                                 "extension-filter"],
                 notice_language="en", notice_recipients=["recipient", "sender"],
                 admin_address="it@example.com", extension_action="strip", spam_action="junk",
                 banned_extensions="iso")
    d.add_user("alice@example.com", banned_extensions=["!js", "img"])
    d.add_user("bob@example.com", disabled_service=["spam-check", "keyword-filter"])
    d.add_user("carol@example.com", spam_action="reject", spam_reject_score="8")
    d.add_domain("bare.example.net")
    d.add_user("nobody@bare.example.net")
    return d


def milter_config(tmp: Path, extra: str = "") -> Config:
    """A config whose [milter] paths live under ``tmp``."""
    return parse_config(
        f'[milter]\nspool_dir = "{tmp}/spool"\nquarantine_dir = "{tmp}/quarantine"\n'
        f'template_dir = "{tmp}/templates"\nclamd = ["unix:{tmp}/no-clamd.sock"]\n'
        f'spamd = ["unix:{tmp}/no-spamd.sock"]\nreinject = "unix:{tmp}/no-smtpd.sock"\n{extra}',
        "test.toml",
    )


class FakeVirusScanner:
    """Finds EICAR; ``error`` makes it fail like a dead clamd."""

    def __init__(self) -> None:
        self.calls = 0
        self.async_calls = 0
        self.error: str | None = None

    async def scan_async(self, stream: Callable[[], Iterable[bytes]], deadline: float) -> VirusResult:
        self.async_calls += 1
        return self.scan(stream, deadline)

    def scan(self, stream: Callable[[], Iterable[bytes]], deadline: float) -> VirusResult:
        self.calls += 1
        if self.error:
            raise ScanError(self.error)
        data = b"".join(stream())
        if EICAR in data or EICAR in _decoded_attachments(data):
            return VirusResult(infected=True, signature="Eicar-Test-Signature", upstream="fake")
        return VirusResult(infected=False, upstream="fake")


def _decoded_attachments(data: bytes) -> bytes:
    import base64
    import re

    out = b""
    for block in re.findall(rb"\r?\n\r?\n([A-Za-z0-9+/=\r\n]{20,})", data):
        try:
            out += base64.b64decode(block)
        except ValueError:
            continue
    return out


class FakeSpamScanner:
    """Scores 1000 for GTUBE, else ``score``; ``error`` makes it fail like a dead spamd."""

    def __init__(self, score: float = 1.0) -> None:
        self.score = score
        self.calls = 0
        self.async_calls = 0
        self.error: str | None = None

    async def check_async(self, message: bytes, deadline: float) -> SpamResult:
        self.async_calls += 1
        return self.check(message, deadline)

    def check(self, message: bytes, deadline: float) -> SpamResult:
        self.calls += 1
        if self.error:
            raise ScanError(self.error)
        if GTUBE.encode() in message:
            return SpamResult(1000.0, ("GTUBE", "NO_RELAYS"), "fake")
        return SpamResult(self.score, ("FAKE",), "fake")


@dataclass
class Injected:
    sender: str
    recipients: list[str]
    data: bytes
    origin: Origin | None


@dataclass
class RecordingInjector:
    """Records what would be re-injected; ``fail`` raises like a refusing smtpd."""

    sent: list[Injected] = field(default_factory=list)
    fail: bool = False

    def send(self, sender: str, recipients: Sequence[tuple[str, tuple[str, ...]]], data: Iterable[bytes],
             *, deadline: float, origin: Origin | None = None, mail_params: tuple[str, ...] = ()) -> str:
        if self.fail:
            raise InjectError("451 4.3.0 refused by test")
        self.sent.append(Injected(sender, [r for r, _ in recipients], b"".join(data), origin))
        return f"Q{len(self.sent)}"

    def to(self, address: str) -> list[Injected]:
        return [m for m in self.sent if address in m.recipients]


class LoopMilter(ContentMilter):
    """Ends each message as the asyncio server does: on an event loop when it can."""

    on_loop = 0

    def eom(self) -> int:
        if not self.eom_on_loop_ready():
            return super().eom()
        LoopMilter.on_loop += 1

        async def run() -> int:
            loop = asyncio.get_running_loop()
            return await self.eom_on_loop(lambda work: loop.run_in_executor(None, work))

        return asyncio.run(run())


@dataclass
class Harness:
    """A service with fakes, plus the fakes for assertions."""

    service: MilterService
    virus: FakeVirusScanner
    spam: FakeSpamScanner
    injector: RecordingInjector
    store: Store
    directory: FakeDirectory
    on_loop: bool = False
    """End messages as the asyncio server does (on its loop where it can)."""

    def feed(self, message: bytes | EmailMessage, sender: str, *recipients: str,
             queue_id: str = "QID1", notices: bool = True) -> TestCtx:
        """Drive the milter through pymilter's TestCtx; returns the context with results.

        With ``notices``, also wait until the notices the message caused are handled
        (they leave from the outbox thread after the reply).
        """
        data = message.as_bytes() if isinstance(message, EmailMessage) else message
        kind = LoopMilter if self.on_loop else ContentMilter
        Milter.factory = lambda: kind(self.service)
        ctx = TestCtx()
        ctx._setsymval("i", queue_id)
        assert ctx._connect(host="client.example", helo="client.example", ip="192.0.2.10") == Milter.CONTINUE
        ctx.rc = ctx._feedFile(io.BytesIO(data), sender, *recipients)
        if notices:
            assert self.service.delivery.flush_notices(10), "notices still waiting after 10 s"
        return ctx


def harness(tmp: Path, extra: str = "", directory: FakeDirectory | None = None, *,
            on_loop: bool = False) -> Harness:
    """A milter service over a fake directory, memory store and fake scanners."""
    cfg = milter_config(tmp, extra)
    directory = directory or sample_directory()
    store = MemoryStore()
    virus, spam, injector = FakeVirusScanner(), FakeSpamScanner(), RecordingInjector()
    service = build_service(cfg, store=store, virus_scanner=virus, spam_scanner=spam, injector=injector,
                            resolver=PolicyResolver(directory, cfg))
    return Harness(service, virus, spam, injector, store, directory, on_loop)


def make_message(body: str = "hello\n", subject: str = "hi", sender: str = "sender@remote.example",
                 to: str = "taro@example.jp", headers: dict[str, str] | None = None) -> EmailMessage:
    """A small message."""
    msg = EmailMessage()
    msg["From"] = sender
    msg["To"] = to
    msg["Subject"] = subject
    msg["Message-ID"] = "<test-1@remote.example>"
    for key, value in (headers or {}).items():
        msg[key] = value
    msg.set_content(body)
    return msg


def parse(raw: bytes, limits: Limits | None = None) -> Message:
    """A Message from raw bytes (CRLF or LF), as the milter would build it."""
    raw = raw.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, _, body = raw.partition(b"\r\n\r\n")
    spool = BodySpool((limits or Limits()).memory_limit, (limits or Limits()).spool_dir)
    for off in range(0, len(body), 65535):
        spool.write(body[off:off + 65535])
    return Message(parse_header_block(head), spool, limits)


def wait_for(predicate: Callable[[], Any], timeout: float = 10.0) -> Any:
    """Poll until ``predicate()`` is truthy."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(0.05)
