"""The archive of passing mail: one copy per archive mailbox and message, with the envelope.

Who is archived (the ``archive`` service, per domain and per subscriber):

* **inbound**: each delivered recipient whose policy archives inbound mail
  (``archive_direction`` inbound or both) puts the message into its
  ``archive_address``;
* **outbound**: a subscriber's own mail (SMTP AUTH, POP-before-SMTP, an internal host)
  goes into the sender's ``archive_address`` when the sender archives outbound mail.

Recipients with the same archive mailbox share one copy, which lists them all; an
outbound copy lists every delivered recipient (Bcc included: the sender's organisation
sent to them), an inbound copy only the recipients it is kept for, so one domain's
archive never shows another domain's Bcc recipients.

The store is Dovecot: the archive mailbox is an account of the domain with the
account status ``archive`` (``[ldap.mapping] archive_status_value``), which Postfix
never routes to and nobody logs in to.  The milter hands the copy to the LMTP service
of the account's mailbox host (its ``mail_host``, else the site's default mailbox host)
before it accepts the message, so nothing reaches an archiving recipient without its
copy in the store.  Dovecot indexes it, enforces the account's quota, and keeps it
on the NAS with every other mailbox; ``mailwarden archive search`` / ``export`` /
``expire`` use doveadm's HTTP API.  LMTP sessions stay open for the next copy to the
same host (:class:`LmtpSessions`).

The copy is the message as it arrived (before mailwarden's changes, which may differ
per recipient; fields only mailwarden may set are removed), under trusted fields that
carry the envelope: ``X-Mailwarden-Archive-Sender``, one
``X-Mailwarden-Archive-Recipient`` per recipient, ``-Client``, ``-Login``,
``-Queue-Id``, ``-Id`` (the mailwarden id ``mailwarden trace`` follows), ``-Direction``,
``-Node``, ``-Time`` and one ``-Verdict`` per recipient
(what mailwarden did for each).  Fields named ``X-Mailwarden-*`` arriving from outside
are removed by the milter at every edge, so none of these can be forged.

A copy the archive does not take (LMTP down, a refusal, over quota) follows the
strictest ``archive_failure_action`` of the policies that asked for it: ``tempfail``
(the default: 451 for the whole message; the sender retries) or ``accept`` (delivered
without the copy, logged).
"""

from __future__ import annotations

import asyncio
import logging
import smtplib
import threading
import time
from dataclasses import dataclass, field
from email.utils import formatdate

from mailwarden.catalogue import Service
from mailwarden.directory import DirectoryUnavailable
from mailwarden.policy import AddressKind, EffectivePolicy, PolicyResolver
from mailwarden.render import HostPort
from milters.filters import Envelope
from milters.message import Message, render_headers, reserved_header_names
from milters.verdict import Action, RecipientOutcome, Verdict

log = logging.getLogger("mailwarden.milter")

HEADER_PREFIX = "X-Mailwarden-Archive-"
"""The trusted fields of an archived copy (``X-Mailwarden-*``: never accepted from outside)."""
IDLE_SESSIONS = 8
"""Open LMTP sessions kept per archive host between copies (more are closed after use)."""


class ArchiveUnavailable(Exception):
    """A copy the archive did not take; the message says why."""


@dataclass
class ArchiveCopy:
    """One archive mailbox's copy of one message."""

    address: str
    """The archive mailbox (an ``archive_address``)."""
    recipients: list[str] = field(default_factory=list)
    directions: set[str] = field(default_factory=set)
    """``inbound`` and/or ``outbound``."""
    tempfail: bool = False
    """Whether a failure defers the message (any asking policy's ``archive_failure_action``)."""

    def add(self, policy: EffectivePolicy, direction: str, recipients: list[str]) -> None:
        """Count one more reason for this copy."""
        self.recipients.extend(r for r in recipients if r not in self.recipients)
        self.directions.add(direction)
        self.tempfail = self.tempfail or policy.get("archive_failure_action") == "tempfail"

    @property
    def direction(self) -> str:
        """``inbound``, ``outbound`` or ``inbound+outbound`` (a subscriber mailing a colleague)."""
        return "+".join(sorted(self.directions))


def mail_host_endpoint(value: str, default_port: int) -> HostPort:
    """A ``mail_host`` value (``host`` or ``host:port``, an IPv6 address in brackets)."""
    try:
        return HostPort.parse(value)
    except ValueError:
        return HostPort(value.strip().strip("[]"), default_port)


def _archives(policy: EffectivePolicy, direction: str) -> str:
    """The archive mailbox ``policy`` sends ``direction`` mail to, or ``""``."""
    if policy.kind is not AddressKind.SUBSCRIBER or not policy.enabled(Service.ARCHIVE):
        return ""
    if policy.get("archive_direction") not in (direction, "both"):
        return ""
    return str(policy.get("archive_address") or "")


class LmtpSessions:
    """Idle LMTP sessions per archive host, taken by one copy at a time (executor threads).

    A copy on an open session saves the milter a connect, LHLO and QUIT (about half its
    CPU per copy: 0.29 against 0.53 ms for a 2 KB message) and Dovecot the start of an
    lmtp process.  A session the server ended while idle (closed, or a 421) is noticed at
    the next copy's first command, and that copy is sent again on a new one.
    """

    def __init__(self, idle: int = IDLE_SESSIONS) -> None:
        self.idle = idle
        self._sessions: dict[tuple[str, int], list[smtplib.LMTP]] = {}
        self._lock = threading.Lock()

    def take(self, host: tuple[str, int]) -> smtplib.LMTP | None:
        """An idle session to ``host``, or None."""
        with self._lock:
            idle = self._sessions.get(host)
            return idle.pop() if idle else None

    def give_back(self, host: tuple[str, int], session: smtplib.LMTP) -> None:
        """Keep a session that ended its last transaction cleanly (close it if enough are idle)."""
        with self._lock:
            idle = self._sessions.setdefault(host, [])
            if len(idle) < self.idle:
                idle.append(session)
                return
        _close(session)

    def close(self) -> None:
        """End every idle session."""
        with self._lock:
            sessions = [s for idle in self._sessions.values() for s in idle]
            self._sessions.clear()
        for session in sessions:
            _close(session)


def _close(session: smtplib.LMTP) -> None:
    try:
        session.quit()
    except (smtplib.SMTPException, OSError):
        session.close()


class Archiver:
    """Plans the copies of a message and hands them to the archive mailboxes' LMTP."""

    def __init__(self, resolver: PolicyResolver, *, default_host: str, lmtp_port: int, timeout: float,
                 node: str) -> None:
        self.resolver = resolver
        self.default_host = default_host
        self.lmtp_port = lmtp_port
        self.timeout = timeout
        self.node = node
        self.sessions = LmtpSessions()

    async def plan(self, envelope: Envelope, verdict: Verdict) -> list[ArchiveCopy]:
        """The copies this message needs (none when nothing is delivered)."""
        delivered = verdict.delivered()
        if not delivered:
            return []
        copies: dict[str, ArchiveCopy] = {}
        for outcome in delivered:
            target = _archives(outcome.policy, "inbound")
            if target:
                copy = copies.setdefault(target, ArchiveCopy(target))
                copy.add(outcome.policy, "inbound", [outcome.address])
        if envelope.submitted and envelope.sender:
            try:
                sender = await self.resolver.lookup(envelope.sender)
            except ValueError:
                sender = None
            target = _archives(sender, "outbound") if sender is not None else ""
            if sender is not None and target:
                copies.setdefault(target, ArchiveCopy(target)).add(sender, "outbound",
                                                                   [o.address for o in delivered])
        return list(copies.values())

    async def host_of(self, copy: ArchiveCopy) -> tuple[str, int]:
        """Where the archive mailbox's LMTP is: its ``mail_host`` (``host[:port]``), else the
        site's default mailbox host.  Raises ArchiveUnavailable."""
        try:
            policy = await self.resolver.lookup(copy.address)
        except DirectoryUnavailable as exc:
            raise ArchiveUnavailable(f"directory unavailable: {exc}") from None
        except ValueError as exc:
            raise ArchiveUnavailable(f"archive address {copy.address}: {exc}") from None
        if policy.kind is not AddressKind.SUBSCRIBER:
            raise ArchiveUnavailable(f"archive mailbox {copy.address} does not exist")
        host = str(policy.get("mail_host") or self.default_host)
        if not host:
            raise ArchiveUnavailable(f"archive mailbox {copy.address} has no mail_host")
        endpoint = mail_host_endpoint(host, self.lmtp_port)
        return endpoint.host, endpoint.port

    def headers(self, copy: ArchiveCopy, envelope: Envelope, verdict: Verdict) -> bytes:
        """The trusted envelope fields of one copy."""
        summaries = {o.address: o.summary() for o in verdict.outcomes}
        client = envelope.client_address or "unknown"
        if envelope.client_name:
            client += f" ({envelope.client_name})"
        if envelope.helo:
            client += f" helo={envelope.helo}"
        fields = [
            ("Sender", f"<{envelope.sender}>"),
            *(("Recipient", r) for r in copy.recipients),
            ("Client", client),
            *((("Login", envelope.auth_login or envelope.submitter),) if envelope.submitted else ()),
            ("Queue-Id", envelope.queue_id or "NOQUEUE"),
            *((("Id", envelope.mwid),) if envelope.mwid else ()),
            ("Direction", copy.direction),
            ("Node", self.node),
            ("Time", formatdate(envelope.received_at)),
            *(("Verdict", summaries[r]) for r in copy.recipients if r in summaries),
        ]
        safe = [(HEADER_PREFIX + name, value.replace("\r", " ").replace("\n", " ")) for name, value in fields]
        return render_headers([(n, v.encode("utf-8", "replace")) for n, v in safe])

    def send(self, copy: ArchiveCopy, host: tuple[str, int], data: bytes, sender: str,
             deadline: float) -> None:
        """Deliver one copy over LMTP (blocking: the loop's executor).  Raises ArchiveUnavailable."""
        timeout = max(1.0, min(self.timeout, deadline - time.monotonic()))
        try:
            session = self.sessions.take(host)
            if session is not None:
                try:
                    _transaction(session, timeout, copy, data, sender)
                except OSError as exc:  # smtplib's exceptions too
                    if not _dropped(exc):
                        raise
                    session = None  # ended by the server while idle: once more on a new session
            if session is None:
                session = smtplib.LMTP(host[0], host[1], timeout=timeout)
                _transaction(session, timeout, copy, data, sender)
            self.sessions.give_back(host, session)
        except smtplib.SMTPRecipientsRefused as exc:
            code, text = exc.recipients.get(copy.address, (0, b""))
            raise ArchiveUnavailable(f"{copy.address} at {host[0]}:{host[1]} refused: {code} "
                                     f"{_text(text)}") from None
        except smtplib.SMTPResponseException as exc:
            raise ArchiveUnavailable(f"{copy.address} at {host[0]}:{host[1]}: {exc.smtp_code} "
                                     f"{_text(exc.smtp_error)}") from None
        except (smtplib.SMTPException, OSError) as exc:
            raise ArchiveUnavailable(f"{copy.address} at {host[0]}:{host[1]}: {exc}") from None

    def data(self, copy: ArchiveCopy, envelope: Envelope, verdict: Verdict, message: Message) -> bytes:
        """The archived copy: the envelope fields, then the message as it arrived."""
        reserved = {n.lower() for n in reserved_header_names(message.headers)}
        kept = [(n, v) for n, v in message.headers if n.lower() not in reserved]
        return self.headers(copy, envelope, verdict) + render_headers(kept) + b"\r\n" + bytes(message.body)

    async def archive(self, envelope: Envelope, verdict: Verdict, message: Message,
                      deadline: float) -> tuple[str, ...]:
        """Hand every copy to its archive; ``address:ok`` / ``address:failed`` for the log.

        A failed copy whose policies say tempfail defers the message (every outcome
        becomes a tempfail); one that says accept is logged and passed over.
        """
        results: list[str] = []
        loop = asyncio.get_running_loop()
        for copy in await self.plan(envelope, verdict):
            try:
                host = await self.host_of(copy)
                data = self.data(copy, envelope, verdict, message)
                await loop.run_in_executor(None, self.send, copy, host, data, envelope.sender, deadline)
            except ArchiveUnavailable as exc:
                action = "tempfail" if copy.tempfail else "accept"
                log.error("%s archive copy for %s failed (%s): %s", envelope.tag,
                          copy.address, action, exc)
                results.append(f"{copy.address}:failed")
                if copy.tempfail:
                    _defer(verdict.outcomes, "archive unavailable")
                    return tuple(results)
                continue
            results.append(f"{copy.address}:ok")
        return tuple(results)


def _transaction(session: smtplib.LMTP, timeout: float, copy: ArchiveCopy, data: bytes,
                 sender: str) -> None:
    """One copy on an open session; the session is closed if it fails in any way."""
    try:
        if session.sock is not None:
            session.sock.settimeout(timeout)
        session.sendmail(sender, [copy.address], data)
    except BaseException:
        session.close()
        raise


def _dropped(exc: OSError) -> bool:
    """Whether a failure on a reused session says the server had ended it (a broken
    connection, or Dovecot's 421 for an idle client), not that it refused the copy."""
    if isinstance(exc, smtplib.SMTPResponseException):
        return exc.smtp_code == 421
    return isinstance(exc, smtplib.SMTPServerDisconnected) or not isinstance(exc, smtplib.SMTPException)


def _text(reply: bytes | str) -> str:
    return reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply


def _defer(outcomes: list[RecipientOutcome], reason: str) -> None:
    for outcome in outcomes:
        outcome.block(Action.TEMPFAIL, reason)
