"""The content filters, one per file, each declaring the service it serves.

A filter receives the parsed message and the outcomes of the recipients that
have its service and are still to be delivered; it does its
recipient-independent work once (awaiting its backend on the event loop) and then
sets each outcome.  It never talks to
Postfix.  :data:`FAILURE_ACTIONS` and the helpers below give every filter the
same way of honouring a recipient's "backend down" and "unscannable" settings.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from email.utils import formatdate
from typing import ClassVar, Protocol

import dns.resolver

from mailwarden.catalogue import Service
from mailwarden.logfields import NOQUEUE
from mailwarden.metrics import Backend
from mailwarden.notify import Notice
from milters.config import MilterConfig
from milters.message import Message
from milters.scanners import ScanCache, SpamScanner, VirusScanner
from milters.verdict import Action, RecipientOutcome, Verdict


@dataclass(frozen=True)
class Envelope:
    """The SMTP envelope and connection facts of one message."""

    sender: str
    """The envelope sender without brackets; empty for the null sender."""
    queue_id: str = ""
    client_address: str = ""
    client_name: str = ""
    helo: str = ""
    mail_params: tuple[str, ...] = ()
    receiver: str = ""
    """The MTA's own name (milter macro ``j``)."""
    auth_login: str = ""
    """The SMTP AUTH login name (milter macro ``{auth_authen}``); empty for anonymous clients."""
    submitter: str = ""
    """A client of ours without SMTP AUTH: the subscriber whose POP-before-SMTP window is
    open for its address, or ``INTERNAL`` for ``milter.internal_networks``."""
    received_at: float = field(default_factory=time.time)
    mwid: str = ""
    """The message's mailwarden id (:mod:`mailwarden.logfields`), given at end of message."""

    @property
    def tag(self) -> str:
        """How a log line about this message starts: ``QUEUEID: mwid=ID`` (``NOQUEUE``
        without a queue id, no ``mwid=`` before end of message)."""
        return f"{self.queue_id or NOQUEUE}:" + (f" mwid={self.mwid}" if self.mwid else "")

    @property
    def submitted(self) -> bool:
        """A subscriber's own mail (SMTP AUTH, POP-before-SMTP or an internal host), not inbound."""
        return bool(self.auth_login or self.submitter)

    def trace_header(self) -> bytes:
        """The ``Received:`` field Postfix put on the queued copy (milters do not see it).

        spamd needs it to know the last relay, and a re-injected copy carries it so that
        its trace still shows how the message arrived.
        """
        name = self.client_name if self.client_name and not self.client_name.startswith("[") else "unknown"
        helo = self.helo or name
        by = self.receiver or "localhost"
        qid = f" id {self.queue_id}" if self.queue_id else ""
        return (f"Received: from {helo} ({name} [{self.client_address or 'unknown'}])\r\n"
                f"\tby {by} (Postfix) with ESMTP{qid};\r\n\t{formatdate(self.received_at)}\r\n").encode(
                    "utf-8", "replace")


INTERNAL = "(internal network)"
"""``Envelope.submitter`` of a client in ``milter.internal_networks``."""


@dataclass(frozen=True)
class Backends:
    """What filters may need from outside the message, built once per process; each
    filter's ``build`` takes what it declares."""

    config: MilterConfig
    virus_scanner: VirusScanner
    spam_scanner: SpamScanner
    scan_cache: ScanCache | None = None
    resolver: dns.resolver.Resolver | None = None
    """The configured resolver (``[dns]``); None leaves out the filters that need DNS."""
    node_name: str = "localhost"
    dns_backend: Backend | None = None
    """Times the filters' DNS lookups (metrics on), else None."""


@dataclass
class Context:
    """One message on its way through the filters."""

    envelope: Envelope
    message: Message
    verdict: Verdict
    deadline: float
    """Monotonic time by which end-of-message work must be done."""
    started: float = field(default_factory=time.monotonic)

    def find(self, key: str, value: str) -> None:
        """Record a message-level finding for the log line."""
        self.verdict.findings[key] = value


class Filter(Protocol):
    """One content filter: a file of its own and a line in :data:`milters.service.FILTERS`
    (its ``build(backends)`` classmethod)."""

    name: ClassVar[str]
    service: ClassVar[Service | None]
    """The service whose recipients the filter acts for; None: every recipient (work that
    does not depend on the recipient, such as sender authentication)."""
    skipped_for_allowed_senders: ClassVar[bool]
    """Recipients whose ``sender_allowlist`` names the (authenticated) sender are not
    given to this filter (spam and keywords; never the virus scan)."""

    async def apply(self, ctx: Context, outcomes: list[RecipientOutcome]) -> None:
        """Set the outcomes of ``outcomes`` (recipients with the service, still in play)."""
        ...


def backend_failed(outcome: RecipientOutcome, setting: str, reason: str) -> None:
    """A scanner could not answer: tempfail unless the recipient's ``setting`` says accept."""
    if outcome.policy.get(setting) == "accept":
        outcome.notes.append(f"{reason}; accepted unchecked ({setting}=accept)")
    else:
        outcome.block(Action.TEMPFAIL, reason)


def unscannable(outcome: RecipientOutcome, reason: str, *, lasting: bool) -> None:
    """The message cannot be checked: the recipient's ``unscannable_action`` decides.

    ``lasting`` says whether a retry of the same message would meet the same
    condition (its size, its MIME nesting or part count, an archive bomb, an
    encrypted archive).  The default, ``auto``, refuses those at SMTP time (5xx: the
    sender learns at once, nothing retries for days and then bounces) and defers
    only what may pass later (clamd's scan-time limit under load).  ``tempfail``,
    ``reject`` and ``accept`` are a subscriber's explicit choice for every case.
    """
    action = outcome.policy.get("unscannable_action")
    if action == "auto":
        action = "reject" if lasting else "tempfail"
    if action == "accept":
        outcome.notes.append(f"unscannable ({reason}); accepted (unscannable_action=accept)")
    elif action == "reject":
        outcome.block(Action.REJECT, f"unscannable: {reason}")
    else:
        outcome.block(Action.TEMPFAIL, f"unscannable: {reason}")


_DONE = {Action.REJECT: "refused", Action.DISCARD: "discarded", Action.QUARANTINE: "quarantined",
         Action.TEMPFAIL: "refused"}
_AUTOMATIC_PRECEDENCE = (b"bulk", b"list", b"junk")


def is_automatic(message: Message) -> bool:
    """Mail generated by a machine (RFC 3834 Auto-Submitted, list or bulk precedence)."""
    auto = message.header("Auto-Submitted")
    if auto is not None and auto.strip().lower() != b"no":
        return True
    if message.header("List-Id") is not None:
        return True
    precedence = message.header("Precedence")
    return precedence is not None and precedence.strip().lower() in _AUTOMATIC_PRECEDENCE


def plan_notices(
    ctx: Context,
    outcome: RecipientOutcome,
    kind: str,
    reason: str,
    names: tuple[str, ...] = (),
    *,
    tell_recipient: bool = True,
) -> None:
    """Queue notices to whom the recipient's domain chose (recipient / admin / sender).

    Sender notices go only to a real envelope sender of mail a person sent: virus
    senders are forged, and answering machine mail could loop.
    """
    policy = outcome.policy
    audiences = policy.get("notice_recipients") if "notice_recipients" in policy.settings else ("recipient",)
    language = policy.get("notice_language") if "notice_language" in policy.settings else "en"
    template = policy.get("notice_template") if "notice_template" in policy.settings else "default"
    if "none" in audiences:
        return
    domain = policy.domain or outcome.address.rpartition("@")[2]
    action = _DONE.get(outcome.action, "removed")
    for audience in audiences:
        if audience == "recipient" and tell_recipient:
            to = outcome.address
        elif audience == "admin":
            to = policy.get("admin_address") if "admin_address" in policy.settings else ""
        elif audience == "sender" and ctx.envelope.sender and not is_automatic(ctx.message):
            to = ctx.envelope.sender
        else:
            continue
        if to:
            outcome.notices.append(Notice(kind=kind, to=to, audience=audience, recipient=outcome.address,
                                          domain=domain, language=language, template=template,
                                          reason=reason, names=names, action=action))
