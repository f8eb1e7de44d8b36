"""Spam check with spamd or rspamd (``milter.spam_engine``), only when at least one
recipient contracted it.

The score is computed once (one request to the engine, whatever the number of
recipients); each contracted recipient for whom it is spam (their
own threshold) gets the SpamAssassin-style headers (ham gets them too with
``milter.spam_headers_on_ham``; off by default, as every such header makes a
separate copy when recipients differ), and their own action: ``tag``
(headers only), ``subject`` (tag the Subject), ``junk`` (a header the Dovecot
Sieve script files into Junk), ``reject``; at or above ``spam_reject_score`` the
message is refused for them whatever the action.  Recipients without the service
get none of this.  Copies of these headers from outside are removed for every
recipient before any filter runs (:func:`milters.message.reserved_header_names`),
so what anyone sees is ours.  The engine's matched rules go in ``X-Spam-Status`` and,
as ``spam_tests``, in the log line.
"""

from __future__ import annotations

import inspect
from typing import ClassVar

from mailwarden.catalogue import JUNK_HEADER, Service
from milters.filters import Backends, Context, backend_failed
from milters.scanners import ScanError, SpamQuery, SpamScanner
from milters.verdict import Action, AddHeader, RecipientOutcome, TagSubject

SPAM_HEADERS = ("X-Spam-Flag", "X-Spam-Status", "X-Spam-Score", "X-Spam-Level")


def fold_list(items: tuple[str, ...], width: int = 70) -> str:
    """A comma-separated list folded into header continuation lines."""
    lines: list[str] = [""]
    for item in items:
        piece = (item + ",") if item != items[-1] else item
        if lines[-1] and len(lines[-1]) + len(piece) > width:
            lines.append("")
        lines[-1] += piece
    return "\n\t".join(lines)


class SpamFilter:
    """Scores with a SpamScanner and applies each recipient's spam settings."""

    name: ClassVar[str] = "spam"
    service: ClassVar[Service | None] = Service.SPAM_CHECK
    skipped_for_allowed_senders: ClassVar[bool] = True

    def __init__(self, scanner: SpamScanner, *, max_size: int = 512 * 1024,
                 ham_headers: bool = False, trace: bool = True) -> None:
        self.scanner = scanner
        self.max_size = max_size
        self.ham_headers = ham_headers
        self.trace = trace

    @classmethod
    def build(cls, backends: Backends) -> SpamFilter:
        """The configured engine, its ``*_max_size`` and ``milter.spam_headers_on_ham``."""
        m = backends.config
        rspamd = m.spam_engine == "rspamd"
        return cls(backends.spam_scanner, max_size=m.rspamd_max_size if rspamd else m.spamd_max_size,
                   ham_headers=m.spam_headers_on_ham, trace=not rspamd)

    def _request(self, ctx: Context) -> bytes:
        # spamd needs Postfix's own Received: field (milters do not see it) to find the relay.
        # rspamd is told the relay in its request headers and gets the message as a milter
        # sees it: the rebuilt field's date lacks Postfix's zone comment, which rspamd's
        # INVALID_POSTFIX_RECEIVED rule scores as forged.
        return (ctx.envelope.trace_header() if self.trace else b"") + ctx.message.raw()

    @staticmethod
    def _query(ctx: Context) -> SpamQuery:
        env = ctx.envelope
        return SpamQuery(
            sender=env.sender, recipients=tuple(o.address for o in ctx.verdict.outcomes),
            client_address=env.client_address, client_name=env.client_name, helo=env.helo,
            auth_user=env.auth_login, queue_id=env.queue_id, receiver=env.receiver,
            # The sender_auth filter ran before and left its findings.
            sender_auth_done="dkim" in ctx.verdict.findings)

    async def aclose(self) -> None:
        """Close the engine's connections (rspamd's HTTP sessions) on the running loop."""
        if (close := getattr(self.scanner, "close", None)) is not None and inspect.iscoroutinefunction(close):
            await close()

    async def apply(self, ctx: Context, outcomes: list[RecipientOutcome]) -> None:
        """Score the message once and set every contracted recipient's outcome."""
        message = ctx.message
        if message.size > self.max_size:
            ctx.find("spam", "skipped(size)")
            for outcome in outcomes:
                outcome.notes.append(f"spam check skipped: {message.size} bytes > {self.max_size}")
            return
        try:
            result = await self.scanner.check(self._request(ctx), ctx.deadline, self._query(ctx))
        except ScanError as exc:
            ctx.find("spam", "error")
            for outcome in outcomes:
                backend_failed(outcome, "spam_failure_action", f"spam check failed: {exc}")
            return
        score = result.score
        ctx.find("spam", f"{score:.1f}" + ("(spam)" if any(
            score >= float(o.policy.get("spam_threshold")) for o in outcomes) else ""))
        if result.symbols:
            ctx.find("spam_tests", ",".join(result.symbols))
        for outcome in outcomes:
            policy = outcome.policy
            threshold = float(policy.get("spam_threshold"))
            is_spam = score >= threshold
            if not is_spam and not self.ham_headers:
                continue  # ham stays as sent: no extra copy when recipients differ
            tests = fold_list(result.symbols) if result.symbols else "none"
            outcome.edit(AddHeader("X-Spam-Status", f"{'Yes' if is_spam else 'No'}, score={score:.1f} "
                                                    f"required={threshold:.1f} tests={tests}"))
            outcome.edit(AddHeader("X-Spam-Score", f"{score:.1f}"))
            if not is_spam:
                continue
            outcome.edit(AddHeader("X-Spam-Flag", "YES"))
            action = policy.get("spam_action")
            reject_score = float(policy.get("spam_reject_score"))
            if score >= reject_score:
                outcome.block(Action.REJECT, f"spam (score {score:.1f}, refused at {reject_score:g})")
            elif action == "reject":
                outcome.block(Action.REJECT, f"spam (score {score:.1f}, threshold {threshold:g})")
            elif action == "subject":
                outcome.edit(TagSubject(policy.get("spam_subject_tag")))
            elif action == "junk":
                outcome.edit(AddHeader(JUNK_HEADER, "yes"))
