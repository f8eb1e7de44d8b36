"""Carrying out a verdict: quarantine, re-inject variants, edit the queued copy, notify.

Why re-injection (and not a Postfix stage with ``recipient_limit = 1``): the
milter must refuse at SMTP time when every recipient refuses (a later bounce
would be backscatter), so it has to run in front anyway; with it there, only
messages whose recipients really need different content cost anything extra
(one SMTP hand-off per extra variant), while a split stage would queue every
message twice and scan it once per recipient.  The largest group of recipients
keeps the queued copy (edited in place through milter actions); every other
group is removed from it and gets its own copy through the re-injection smtpd.
If a re-injection fails, the whole message is tempfailed and nothing is changed,
so the sender retries; a copy already handed over may then arrive twice (the
same trade-off as every content filter that re-injects).

Order: quarantine (a local file) first, then re-injection, then milter changes,
then notices (best effort, they never change what happens to the mail).  Notices
are posted to an outbox whose thread sends them, so the SMTP reply waits for none.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Protocol

from mailwarden.logfields import ID_HEADER
from mailwarden.notify import MessageFacts, Notice, NoticeOutbox, Notifier
from mailwarden.store import StoreUnavailable
from milters.authentication import INLINE_DKIM
from milters.filters import Envelope
from milters.message import Message, Part
from milters.quarantine import Quarantine
from milters.reinject import InjectError, Injector, Origin
from milters.signing import Sealer, Signer
from milters.text import decode_header_value
from milters.variants import Rendition, render, variant_stream
from milters.verdict import Action, Disposition, RecipientOutcome, StripParts, Verdict

log = logging.getLogger("mailwarden.milter")


class MilterActions(Protocol):
    """The end-of-message modifications a milter connection can ask the MTA for."""

    def addheader(self, name: str, value: str) -> None:
        """Append a header field."""
        ...

    def insheader(self, index: int, name: str, value: str) -> None:
        """Insert a header field at ``index`` (0: above every other)."""
        ...

    def chgheader(self, name: str, index: int, value: str) -> None:
        """Change (empty value: delete) the index-th field called ``name``."""
        ...

    def delrcpt(self, rcpt: str) -> None:
        """Remove an envelope recipient."""
        ...

    def replacebody(self, chunks: Iterable[bytes]) -> None:
        """Replace the body."""
        ...


@dataclass
class Outcome:
    """What was done, for the log line."""

    disposition: Disposition
    reply: str = ""
    variants: int = 1
    reinjected: tuple[str, ...] = ()
    quarantine_id: str = ""
    notices: tuple[str, ...] = ()


def smtp_text(reason: str) -> str:
    """A reason made safe for an SMTP reply line (ASCII, no %, bounded)."""
    text = "".join(c if 32 <= ord(c) < 127 else "?" for c in reason).replace("%", "%%")
    return text[:300]


def facts_of(message: Message, envelope: Envelope, recipients: tuple[str, ...] = ()) -> MessageFacts:
    """The original message as notices describe it."""

    def text(name: str) -> str:
        raw = message.header(name)
        return decode_header_value(raw)[:300] if raw is not None else ""

    return MessageFacts(
        sender=envelope.sender, from_header=text("From"), subject=text("Subject"), date=text("Date"),
        message_id=text("Message-ID"), queue_id=envelope.queue_id,
        client_address=envelope.client_address, recipients=recipients, mwid=envelope.mwid,
    )


async def _stamps(signer: Signer | None, sealer: Sealer | None, message: Message,
                  rendition: Rendition) -> list[tuple[str, str]]:
    """The DKIM-Signature and ARC fields of a variant as it will leave (name, value).

    Both are computed over the same copy: the seal's message signature does not cover
    our own DKIM-Signature, so neither depends on the other.
    """
    if signer is None and sealer is None:
        return []

    def stamp() -> list[tuple[str, str]]:
        data = b"".join(variant_stream(message, rendition))
        fields = [("DKIM-Signature", v) for v in signer.header_fields(data)] if signer else []
        return fields + (sealer.header_fields(data) if sealer else [])

    if sealer is None and message.size <= INLINE_DKIM:
        # A small message is signed on the loop: the hand-off to a thread would cost more
        # than hashing it.  An ARC seal is dkimpy's RSA in Python (milliseconds): a thread.
        return stamp()
    return await asyncio.get_running_loop().run_in_executor(None, stamp)


def _sealer(sealers: Mapping[str, Sealer], members: list[RecipientOutcome]) -> Sealer | None:
    """The seal of a copy: its first member's that is sealed (those who share a copy share it)."""
    return next((sealers[m.address] for m in members if m.address in sealers), None)


def _id_field(envelope: Envelope) -> bytes:
    """The ``X-Mailwarden-Id`` field of a re-injected copy (none without an id)."""
    return f"{ID_HEADER}: {envelope.mwid}\r\n".encode("ascii") if envelope.mwid else b""


def _tempfail(reason: str) -> Outcome:
    text = smtp_text(reason)
    return Outcome(Disposition.TEMPFAIL, f"451 4.7.1 Message deferred: {text}; try again later", 0)


class Delivery:
    """Applies verdicts through milter actions, the injector, the quarantine and the notifier."""

    def __init__(self, injector: Injector, quarantine: Quarantine | None, notifier: Notifier | None) -> None:
        self.injector = injector
        self.quarantine = quarantine
        self.notifier = notifier
        self.outbox = NoticeOutbox(notifier) if notifier is not None else None
        """Where notices go, to be sent after the reply."""

    def flush_notices(self, timeout: float = 10.0) -> bool:
        """Wait until the notices posted so far are handled (for tests)."""
        return self.outbox is None or self.outbox.flush(timeout)

    def close(self, grace: float = 10.0) -> None:
        """Send the notices still waiting, for up to ``grace`` seconds."""
        if self.outbox is not None:
            self.outbox.stop(grace)

    async def carry_out(self, verdict: Verdict, message: Message, envelope: Envelope,
                        actions: MilterActions, *, deadline: float, signer: Signer | None = None,
                        sealers: Mapping[str, Sealer] | None = None) -> Outcome:
        """Make the MTA do what the verdict says; returns what was done (and the SMTP reply).

        Quarantine, re-injection and DKIM signing block (files, the store, SMTP, hashing):
        they run in the event loop's executor; everything else here is quick.  With a
        ``signer``, every copy is signed as it leaves, after all of mailwarden's changes;
        a copy with a recipient in ``sealers`` gets that recipient's ARC seal as well.
        """
        sealers = sealers or {}
        disposition = verdict.disposition
        if disposition is Disposition.TEMPFAIL:
            return _tempfail(verdict.first_reason(Action.TEMPFAIL))
        loop = asyncio.get_running_loop()
        quarantine_id = ""
        held = [o for o in verdict.outcomes if o.action is Action.QUARANTINE]
        if held:
            try:
                quarantine_id = await loop.run_in_executor(
                    None, self._quarantine, held, message, envelope)
            except (OSError, StoreUnavailable) as exc:
                log.error("%s quarantine failed: %s", envelope.tag, exc)
                return _tempfail("quarantine unavailable")
        if disposition is Disposition.REJECT:
            reason = smtp_text(verdict.first_reason(Action.REJECT))
            return Outcome(disposition, f"550 5.7.1 Message refused: {reason}", 0, (), quarantine_id,
                           self._notify(verdict, message, envelope))
        if disposition is Disposition.DISCARD:
            return Outcome(disposition, "", 0, (), quarantine_id, self._notify(verdict, message, envelope))

        groups = verdict.groups()
        (inline_edits, inline_members), others = groups[0], groups[1:]
        strip_text = self._strip_text(message, envelope)
        reinjected: list[str] = []
        origin = Origin(envelope.client_address, envelope.client_name, envelope.helo, envelope.queue_id)
        for edits, members in others:
            rendition = render(message, edits, strip_text)
            head = envelope.trace_header() + _id_field(envelope) + b"".join(
                f"{name}: {value}\r\n".replace("\n", "\r\n").replace("\r\r", "\r").encode()
                for name, value in await _stamps(signer, _sealer(sealers, members), message, rendition))
            data = variant_stream(message, rendition, head)
            rcpts = [(m.address, m.recipient.params) for m in members]
            try:
                reinjected.append(await loop.run_in_executor(None, functools.partial(
                    self.injector.send, envelope.sender, rcpts, data, deadline=deadline, origin=origin,
                    mail_params=envelope.mail_params)))
            except InjectError as exc:
                log.error("%s re-injection of a variant failed: %s", envelope.tag, exc)
                if quarantine_id and self.quarantine is not None:
                    await loop.run_in_executor(None, self._drop_quarantine, quarantine_id)
                return _tempfail("content variant could not be queued")
        keep = {id(o) for o in inline_members}
        for outcome in verdict.outcomes:
            if id(outcome) not in keep:
                actions.delrcpt(outcome.recipient.raw or f"<{outcome.address}>")
        inline = render(message, inline_edits, strip_text)
        stamps = await _stamps(signer, _sealer(sealers, inline_members), message, inline)
        self._edit_in_place(actions, inline)
        if envelope.mwid:
            actions.addheader(ID_HEADER, envelope.mwid)
        # On top, in order, as on a re-injected copy: an ARC set goes above the sets before
        # it (verifiers such as dkimpy read the sets in the order they appear).
        for name, value in reversed(stamps):
            actions.insheader(0, name, value)
        return Outcome(disposition, "", len(groups), tuple(reinjected), quarantine_id,
                       self._notify(verdict, message, envelope))

    def _drop_quarantine(self, entry_id: str) -> None:
        assert self.quarantine is not None
        try:
            self.quarantine.delete(entry_id)
        except (OSError, StoreUnavailable) as exc:
            log.warning("quarantine entry %s not rolled back: %s", entry_id, exc)

    def _quarantine(self, held: list[RecipientOutcome], message: Message, envelope: Envelope) -> str:
        if self.quarantine is None:
            raise OSError("no quarantine configured")
        facts = facts_of(message, envelope)
        entry = self.quarantine.put(
            message.stream(), sender=envelope.sender, recipients=[o.address for o in held],
            reason="; ".join(dict.fromkeys(r for o in held for r in o.reasons)),
            queue_id=envelope.queue_id, subject=facts.subject, from_header=facts.from_header,
            recipient_params={o.address: list(o.recipient.params) for o in held if o.recipient.params},
            mwid=envelope.mwid,
        )
        return entry.id

    @staticmethod
    def _edit_in_place(actions: MilterActions, rendition: Rendition) -> None:
        for change in rendition.changes:
            if change.op == "add":
                actions.addheader(change.name, change.value)
            else:
                actions.chgheader(change.name, change.index, change.value)
        if rendition.body is not None:
            actions.replacebody(rendition.body())

    def _strip_text(self, message: Message, envelope: Envelope) -> _StripNote:
        return _StripNote(self.notifier, message, envelope)

    def _notify(self, verdict: Verdict, message: Message, envelope: Envelope) -> tuple[str, ...]:
        """Post each distinct notice once, naming every recipient it covers
        (``KIND>ADDRESS:queued``, or ``dropped`` when the outbox is full)."""
        if self.outbox is None:
            return ()
        grouped: dict[tuple[str, str, str, str, str], tuple[Notice, list[str]]] = {}
        for outcome in verdict.outcomes:
            for notice in outcome.notices:
                key = (notice.kind, notice.to.lower(), notice.template, notice.language, notice.audience)
                if key not in grouped:
                    grouped[key] = (notice, [])
                grouped[key][1].append(notice.recipient)
        results = []
        for notice, recipients in grouped.values():
            facts = facts_of(message, envelope, tuple(dict.fromkeys(recipients)))
            result = "queued" if self.outbox.post(notice, facts) else "dropped"
            results.append(f"{notice.kind}>{notice.to}:{result}")
        return tuple(results)


class _StripNote:
    """Renders the text that replaces a stripped part (the recipient's language and set)."""

    def __init__(self, notifier: Notifier | None, message: Message, envelope: Envelope) -> None:
        self.notifier = notifier
        self.message = message
        self.envelope = envelope

    def __call__(self, edit: StripParts, part: Part) -> str:
        names = tuple(part.filenames[:1]) or (f"part {part.path}",)
        if self.notifier is None:
            return f"The attachment {', '.join(names)} was removed (banned file type).\n"
        facts = facts_of(self.message, self.envelope)
        notice = Notice(kind="stripped", to="", audience="recipient", recipient="", domain=edit.domain,
                        language=edit.language, template=edit.template,
                        reason="banned file type", names=names, action="removed")
        values = self.notifier.values(notice, facts)
        values["names"] = list(names)
        try:
            return self.notifier.templates.render(edit.template, edit.language, "stripped", values)
        except LookupError as exc:
            log.warning("stripped-part note not rendered: %s", exc)
            return f"The attachment {', '.join(names)} was removed (banned file type).\n"
