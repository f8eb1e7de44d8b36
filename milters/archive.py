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
never routes to and nobody logs in to.  The milter saves the copy on the account's
mailbox host (its ``mail_host``, else the site's default mailbox host) before it
accepts the message, so nothing reaches an archiving recipient without its copy in the
store: with IMAP MULTIAPPEND through a Dovecot master user when ``[render]
archive_imap_port`` is set, otherwise as an LMTP delivery (:mod:`milters.archivestore`).
Dovecot indexes it, enforces the account's quota, and keeps it on the NAS with every
other mailbox; ``mailwarden archive search`` / ``export`` / ``expire`` use doveadm's
HTTP API.

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

import logging
from dataclasses import dataclass, field
from email.utils import formatdate

from mailwarden.catalogue import Service
from mailwarden.directory import DirectoryUnavailable
from mailwarden.policy import AddressKind, EffectivePolicy, PolicyResolver
from milters.archivestore import ArchiveUnavailable, CopyStore
from milters.filters import Envelope
from milters.message import Message, render_headers, reserved_header_names
from milters.verdict import Action, RecipientOutcome, Verdict

log = logging.getLogger("mailwarden.milter")

HEADER_PREFIX = "X-Mailwarden-Archive-"
"""The trusted fields of an archived copy (``X-Mailwarden-*``: never accepted from outside)."""

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


def _archives(policy: EffectivePolicy, direction: str) -> str:
    """The archive mailbox ``policy`` sends ``direction`` mail to, or ``""``."""
    if policy.kind is not AddressKind.SUBSCRIBER or not policy.enabled(Service.ARCHIVE):
        return ""
    if policy.get("archive_direction") not in (direction, "both"):
        return ""
    return str(policy.get("archive_address") or "")


class Archiver:
    """Plans the copies of a message and hands them to the archive mailboxes' store."""

    def __init__(self, resolver: PolicyResolver, store: CopyStore, *, default_host: str, node: str) -> None:
        self.resolver = resolver
        self.store = store
        self.default_host = default_host
        self.node = node

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

    async def host_of(self, copy: ArchiveCopy) -> str:
        """The archive mailbox's host: its ``mail_host`` (``host[:port]``), else the site's
        default mailbox host.  Raises ArchiveUnavailable."""
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
        return host

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
        for copy in await self.plan(envelope, verdict):
            try:
                host = await self.host_of(copy)
                data = self.data(copy, envelope, verdict, message)
                await self.store.save(host, copy.address, data, envelope.sender, deadline)
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


def _defer(outcomes: list[RecipientOutcome], reason: str) -> None:
    for outcome in outcomes:
        outcome.block(Action.TEMPFAIL, reason)
