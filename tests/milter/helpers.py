"""Fakes and builders shared by the milter tests."""

from __future__ import annotations

import asyncio
import email
import email.message
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from harness.clamd import EICAR
from harness.fakes import FakeDirectory
from harness.spamd import GTUBE
from mailwarden.config import Config, parse_config
from mailwarden.logfields import ID_HEADER
from mailwarden.policy import PolicyResolver
from mailwarden.store import MemoryStore, Store
from milters.app import ContentMilter
from milters.message import BodySpool, Limits, Message, parse_header_block
from milters.reinject import InjectError, Origin
from milters.scanners import ScanError, SpamQuery, SpamResult, VirusResult
from milters.server import Client, Edits, Macros, Reply
from milters.service import MilterService, build_service


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


def milter_config(tmp: Path, extra: str = "", *, sender_auth: bool = False) -> Config:
    """A config whose [milter] paths live under ``tmp``.

    Sender authentication (DNS lookups and an Authentication-Results field on every
    message) is off unless a test asks for it: ``tests/milter/test_sender_auth.py`` runs
    it against a stub DNS.
    """
    return parse_config(
        f'[milter]\nspool_dir = "{tmp}/spool"\nquarantine_dir = "{tmp}/quarantine"\n'
        f'template_dir = "{tmp}/templates"\nclamd = ["unix:{tmp}/no-clamd.sock"]\n'
        f'spamd = ["unix:{tmp}/no-spamd.sock"]\nreinject = "inet:127.0.0.1:9"\n'
        f'sender_auth = {str(sender_auth).lower()}\n{extra}',
        "test.toml",
    )


class FakeVirusScanner:
    """Finds EICAR; ``error`` makes it fail like a dead clamd."""

    def __init__(self) -> None:
        self.calls = 0
        self.error: str | None = None

    async def scan(self, stream: Callable[[], Iterable[bytes]], deadline: float) -> VirusResult:
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
        self.error: str | None = None
        self.queries: list[SpamQuery | None] = []

    async def check(self, message: bytes, deadline: float, query: SpamQuery | None = None) -> SpamResult:
        self.calls += 1
        self.queries.append(query)
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


@dataclass
class Fed:
    """What the milter answered and asked the MTA to change, as an MTA would record it."""

    rc: str
    """The final protocol reply (``milters.protocol.ACCEPT``, ``REJECT``, ...)."""
    reply: tuple[str, str, str]
    """(code, enhanced code, text) of a reject or tempfail; empty strings otherwise."""
    app: ContentMilter
    headers: list[tuple[str, str]]
    body: bytes
    delrcpt: list[str] = field(default_factory=list)
    rcpt_replies: list[Reply] = field(default_factory=list)
    headers_changed: bool = False
    """Whether a header other than ``X-Mailwarden-Id`` (see ``mwid``) was added or changed."""
    body_replaced: bool = False
    mwid: str = ""
    """The ``X-Mailwarden-Id`` the milter added to the queued copy."""

    @property
    def msg(self) -> email.message.Message:
        """The queued copy after the changes (header edits applied, body replaced)."""
        head = "".join(f"{n}: {v}\r\n" for n, v in self.headers).encode("utf-8", "surrogateescape")
        return email.message_from_bytes(head + b"\r\n" + self.body)


class RecordingEdits(Edits):
    """The modifications of one message, applied to the header list and body as the MTA would."""

    def __init__(self, fed: Fed) -> None:
        super().__init__()
        self.fed = fed

    def addheader(self, name: str, value: str) -> None:
        super().addheader(name, value)
        self.fed.headers.append((name, value))
        if name == ID_HEADER:
            self.fed.mwid = value
        else:
            self.fed.headers_changed = True

    def insheader(self, index: int, name: str, value: str) -> None:
        super().insheader(index, name, value)
        self.fed.headers.insert(index, (name, value))
        self.fed.headers_changed = True

    def chgheader(self, name: str, index: int, value: str) -> None:
        super().chgheader(name, index, value)
        self.fed.headers_changed = True
        seen = 0
        for i, (n, _) in enumerate(self.fed.headers):
            if n.lower() == name.lower():
                seen += 1
                if seen == index:
                    if value:
                        self.fed.headers[i] = (n, value)
                    else:
                        del self.fed.headers[i]
                    return

    def delrcpt(self, rcpt: str) -> None:
        super().delrcpt(rcpt)
        self.fed.delrcpt.append(rcpt)

    def replacebody(self, chunks: Iterable[bytes]) -> None:
        data = b"".join(chunks)
        super().replacebody([data])
        self.fed.body = (self.fed.body if self.fed.body_replaced else b"") + data
        self.fed.body_replaced = True


def macros(**values: str) -> Macros:
    """Connection macros as the MTA would send them (one end-of-message stage)."""
    m = Macros()
    m.keep(b"E" + b"".join(f"{k}\0{v}\0".encode() for k, v in values.items()))
    return m


async def drive(service: MilterService, data: bytes, sender: str, recipients: Sequence[str],
                queue_id: str = "QID1", client: Client | None = None, login: str = "") -> Fed:
    """One SMTP transaction through a ContentMilter, step by step as the server drives it
    (``login``: the SMTP AUTH login, the ``{auth_authen}`` macro)."""
    values = {"i": queue_id, "j": "mx.test"} | ({"{auth_authen}": login} if login else {})
    app = ContentMilter(service, macros(**values))
    app.connect(client or Client("client.example", "192.0.2.10", 40000))
    app.helo("client.example")
    app.mail(sender, ())
    data = data.replace(b"\r\n", b"\n").replace(b"\n", b"\r\n")
    head, _, body = data.partition(b"\r\n\r\n")
    fed = Fed("", ("", "", ""), app, [], body)
    for rcpt in recipients:
        fed.rcpt_replies.append(await app.rcpt(f"<{rcpt}>", ()))
    for name, value in parse_header_block(head):
        app.header(name, value)
        fed.headers.append((name, value.decode("utf-8", "surrogateescape")))
    for off in range(0, len(body), 65535):
        app.body(body[off:off + 65535])
    reply = await app.end_of_message(RecordingEdits(fed))
    fed.rc = reply.code
    if reply.text:
        code, xcode, text = reply.text.split(" ", 2)
        fed.reply = (code, xcode, text)
    return fed


@dataclass
class Harness:
    """A service with fakes, plus the fakes for assertions."""

    service: MilterService
    virus: FakeVirusScanner
    spam: FakeSpamScanner
    injector: RecordingInjector
    store: Store
    directory: FakeDirectory

    def feed(self, message: bytes | EmailMessage, sender: str, *recipients: str,
             queue_id: str = "QID1", notices: bool = True, login: str = "") -> Fed:
        """One message through the milter on an event loop; what it answered and changed.

        With ``notices``, also wait until the notices the message caused are handled
        (they leave from the outbox thread after the reply).
        """
        data = message.as_bytes() if isinstance(message, EmailMessage) else message
        fed = asyncio.run(drive(self.service, data, sender, recipients, queue_id, login=login))
        if notices:
            assert self.service.delivery.flush_notices(10), "notices still waiting after 10 s"
        return fed


def harness(tmp: Path, extra: str = "", directory: FakeDirectory | None = None, *,
            sender_auth: bool = False) -> Harness:
    """A milter service over a fake directory, memory store and fake scanners."""
    cfg = milter_config(tmp, extra, sender_auth=sender_auth)
    directory = directory or sample_directory()
    store = MemoryStore()
    virus, spam, injector = FakeVirusScanner(), FakeSpamScanner(), RecordingInjector()
    service = build_service(cfg, store=store, virus_scanner=virus, spam_scanner=spam, injector=injector,
                            resolver=PolicyResolver(directory, cfg))
    return Harness(service, virus, spam, injector, store, directory)


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
