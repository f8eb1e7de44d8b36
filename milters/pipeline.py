"""Runs the filters in cost order, once per message, and merges per-recipient outcomes.

Order (cheapest and most decisive first):

1. extensions - names and archive listings, no outside call;
2. virus      - one clamd scan (or a cache hit) for every recipient who has it;
3. sender auth - DKIM, SPF, DMARC and ARC (DNS, mostly cached), for every recipient;
4. keywords   - regexes over decoded text, well under a millisecond;
5. spam       - spamd, the most expensive step (tens to hundreds of ms).

A filter runs only if some recipient still in play has its service, and only
for those recipients: a recipient already refused by the extension filter costs
no spamd time.  Keywords come before spam because they are orders of magnitude
cheaper and their refusals save spamd calls; virus comes before keywords so
that nothing infected is ever quarantined as "keyword hit" and later released.
A filter that raises (a bug, never expected) tempfails the message: a check a
subscriber pays for is not skipped.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Sequence
from email.utils import getaddresses

from milters.filters import Context, Envelope, Filter
from milters.message import Message, reserved_header_names
from milters.verdict import Action, Recipient, RecipientOutcome, RemoveHeader, Verdict

log = logging.getLogger("mailwarden.milter")


class Pipeline:
    """The ordered filters."""

    def __init__(self, filters: Sequence[Filter]) -> None:
        self.filters = list(filters)

    async def run(self, envelope: Envelope, message: Message, recipients: Sequence[Recipient],
                  deadline: float) -> Verdict:
        """Decide every recipient's outcome for ``message``."""
        ctx = _context(envelope, message, recipients, deadline)
        for flt, targets in _stages(self.filters, ctx):
            started = time.perf_counter()
            try:
                await flt.apply(ctx, targets)
            except Exception:
                log.exception("%s %s filter failed", ctx.envelope.tag, flt.name)
                for outcome in targets:
                    outcome.block(Action.TEMPFAIL, f"internal error in the {flt.name} filter")
            for outcome in targets:
                if not outcome.in_play and not outcome.blocked_by:
                    outcome.blocked_by = flt.name
            ctx.verdict.findings[f"{flt.name}_ms"] = f"{(time.perf_counter() - started) * 1000:.1f}"
        return ctx.verdict

    async def aclose(self) -> None:
        """Before the loop ends: close what the filters hold on it (``aclose`` where they have one)."""
        for flt in self.filters:
            if (aclose := getattr(flt, "aclose", None)) is not None:
                await aclose()


def _allowed(ctx: Context, outcome: RecipientOutcome, filter_name: str) -> bool:
    """Whether the recipient's ``sender_allowlist`` names the sender, as far as it is known
    to be genuine: the envelope sender when SPF passed (or the mail is a subscriber's own),
    the From address when DMARC passed.  Without sender authentication (``milter.sender_auth``
    off) the addresses alone are matched, as SpamAssassin's ``whitelist_from`` does."""
    listed = outcome.policy.settings.get("sender_allowlist")
    if listed is None or not listed.value:
        return False  # most recipients list nobody: no From field to parse for them
    findings, envelope = ctx.verdict.findings, ctx.envelope
    checked = "spf" in findings or "dmarc" in findings
    candidates: list[str] = []
    if envelope.sender and (not checked or envelope.submitted or findings.get("spf") == "pass"):
        candidates.append(envelope.sender)
    if not checked or findings.get("dmarc", "").startswith("pass"):
        candidates.extend(_from_addresses(ctx.message))
    for address in candidates:
        pattern = outcome.policy.sender_listed("sender_allowlist", address)
        if pattern is not None:
            outcome.notes.append(f"{filter_name} skipped: sender {address} in sender_allowlist ({pattern})")
            return True
    return False


def _from_addresses(message: Message) -> list[str]:
    raw = message.header("From")
    if raw is None:
        return []
    return [a for _, a in getaddresses([raw.decode("utf-8", "replace")]) if "@" in a]


def _context(envelope: Envelope, message: Message, recipients: Sequence[Recipient],
             deadline: float) -> Context:
    verdict = Verdict([RecipientOutcome(r) for r in recipients])
    ctx = Context(envelope, message, verdict, deadline)
    # Fields only mailwarden may set (X-Spam-*, X-Mailwarden-*, the junk mark Sieve
    # trusts among them): a copy from outside must not steer or mislabel anyone's mail.
    # Removed for every recipient alike, so the removal makes no extra variant.
    for name in reserved_header_names(message.headers):
        for outcome in verdict.outcomes:
            outcome.edit(RemoveHeader(name))
    for problem in message.problems[:3]:
        ctx.find("mime", problem)
    return ctx


def _stages(filters: Sequence[Filter], ctx: Context) -> Iterator[tuple[Filter, list[RecipientOutcome]]]:
    """Each filter that some recipient still in play has, with those recipients; none
    after a temporary failure (the whole message is deferred)."""
    outcomes = ctx.verdict.outcomes
    for flt in filters:
        targets = [o for o in outcomes
                   if o.in_play and (flt.service is None or o.policy.enabled(flt.service))
                   and not (flt.skipped_for_allowed_senders and _allowed(ctx, o, flt.name))]
        if not targets:
            continue
        yield flt, targets
        if any(o.action is Action.TEMPFAIL for o in outcomes):
            return
