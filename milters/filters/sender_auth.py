"""Sender authentication: DKIM, SPF, DMARC and ARC of inbound mail, one Authentication-Results header.

This is not a catalogue service.  Who signed a message and whether its client may
send for the sender's domain are facts about the message, the same for every
recipient; a subscriber does not buy them, and a header that differed between
recipients would split the message into copies for nothing.  So the filter runs
for every recipient (``service = None``), once per message, and is switched for the
node with ``milter.sender_auth`` (on by default).

* Any ``Authentication-Results`` field that arrives claiming our authserv-id
  (``milter.authserv_id``, by default the node name) is forged: it is removed for
  every recipient, hosted or not, before ours is added.
* Hosted recipients get one ``Authentication-Results`` field (RFC 8601, built with
  authres): ``dkim=`` for every signature (``none`` without one), and ``spf=``
  computed here with pyspf through the configured resolver.  The policy daemon's SPF
  verdict does not reach the milter in a form it could trust, so SPF is evaluated
  again; the configured resolver's cache makes the second evaluation cheap.
* DMARC of the From domain is evaluated once (``milters.authentication.Dmarc``).
  A ``fail`` under ``p=reject`` or ``p=quarantine`` (after ``pct``) is acted on per
  recipient, by the recipient domain's ``dmarc_action`` (catalogue, in LDAP):
  ``honour`` refuses that recipient (reject) or files the mail as junk (quarantine,
  the catalogue's ``JUNK_HEADER``); ``tag`` delivers it, the header saying
  ``dmarc=fail`` and the log line noting the policy not applied; ``ignore`` delivers
  it without a note.  Role addresses (``postmaster@``, ``abuse@``) are spared, as
  they are every check that judges the sender.  ``permerror`` is recorded only.
* ``temperror`` (DNS could not answer for the policy record, or for an aligned
  identifier that might have passed) follows the recipient domain's
  ``dmarc_temperror_action``: ``tempfail`` (451 for the whole message: the sender
  retries), ``accept``, or ``auto`` (the default): tempfail when the sender domain
  publishes ``p=reject``, accept otherwise.
* ARC (RFC 8617): the chain is validated and recorded (``arc=pass (i=N)``, ``fail``,
  ``none``).  A recipient domain may name sealers it trusts (``arc_trusted_sealers``,
  mailing lists that rewrite the subject or footer): when the chain passes and its
  latest set was sealed by one of them recording ``dmarc=pass``, a DMARC fail is not
  acted on for that domain, and the log line says which sealer vouched.
* A subscriber's own mail (SMTP AUTH, an open POP-before-SMTP window, a client in
  ``milter.internal_networks``) is not checked against SPF (its client is a
  subscriber's, not the domain's mail server) nor DMARC (it is signed after this
  filter); ``auth=pass smtp.auth=LOGIN`` records the login, with a
  ``(POP-before-SMTP)`` comment for a window, and ``auth=none (internal network)``
  an internal host.
* Recipients of other domains (a subscriber's outgoing mail) get nothing added.
"""

from __future__ import annotations

import asyncio
import re
from typing import ClassVar

from authres import AuthenticationResultsHeader
from authres.arc import ARCAuthenticationResult
from authres.core import (
    AuthenticationResult,
    DKIMAuthenticationResult,
    SMTPAUTHAuthenticationResult,
    SPFAuthenticationResult,
)
from authres.dmarc import DMARCAuthenticationResult

from mailwarden.catalogue import JUNK_HEADER, Service
from mailwarden.policy import AddressKind
from milters.authentication import (
    ArcResult,
    AuthDns,
    DkimResult,
    Dmarc,
    DmarcResult,
    SpfResult,
    check_spf_async,
    from_domain,
    verify_arc,
    verify_dkim,
)
from milters.filters import INTERNAL, Backends, Context, Envelope
from milters.message import HeaderList
from milters.verdict import Action, AddHeader, RecipientOutcome, RemoveHeader

AR_HEADER = "Authentication-Results"
_AUTHSERV = re.compile(rb"^\s*(?:\([^)]*\)\s*)*([^\s;()]+)")


def claimed_by(headers: HeaderList, authserv_id: str) -> tuple[int, ...]:
    """1-based indexes (among Authentication-Results fields) of those claiming ``authserv_id``."""
    wanted = authserv_id.lower().encode("utf-8", "replace")
    found: list[int] = []
    index = 0
    for name, value in headers:
        if name.lower() != AR_HEADER.lower():
            continue
        index += 1
        match = _AUTHSERV.match(value)
        if match and match.group(1).lower() == wanted:
            found.append(index)
    return tuple(found)


def dkim_clause(result: DkimResult) -> AuthenticationResult:
    """``dkim=RESULT`` with the signature's domain, selector and algorithm."""
    return DKIMAuthenticationResult(result=result.result, reason=result.reason or None,
                                    header_d=result.domain or None, header_s=result.selector or None,
                                    header_a=result.algorithm or None)


def spf_clause(result: SpfResult, sender: str, helo: str) -> AuthenticationResult:
    """``spf=RESULT`` with the identity checked."""
    if result.identity == "helo":
        return SPFAuthenticationResult(result=result.result, smtp_helo=helo or None)
    return SPFAuthenticationResult(result=result.result, smtp_mailfrom=sender or None)


def dmarc_clause(result: DmarcResult) -> AuthenticationResult:
    """``dmarc=RESULT (p=POLICY) header.from=DOMAIN``."""
    comment = f"p={result.policy}" + (f" dis={result.applied}" if result.applied != result.policy else "")
    return DMARCAuthenticationResult(result=result.result, reason=result.reason or None,
                                     result_comment=comment if result.policy else None,
                                     header_from=result.domain or None)


def arc_clause(result: ArcResult) -> AuthenticationResult:
    """``arc=RESULT`` with the number of ARC sets."""
    return ARCAuthenticationResult(result=result.result, reason=result.reason or None,
                                   result_comment=f"i={result.sets}" if result.sets else None)


def submission_clause(envelope: Envelope) -> AuthenticationResult:
    """How a subscriber's client was let in: ``auth=pass smtp.auth=LOGIN``, the same with a
    ``(POP-before-SMTP)`` comment naming the window's subscriber, or ``auth=none
    (internal network)``."""
    if envelope.auth_login:
        return SMTPAUTHAuthenticationResult(result="pass", smtp_auth=envelope.auth_login)
    if envelope.submitter == INTERNAL:
        return SMTPAUTHAuthenticationResult(result="none", result_comment="internal network")
    return SMTPAUTHAuthenticationResult(result="pass", result_comment="POP-before-SMTP",
                                        smtp_auth=envelope.submitter)


def act_on_dmarc(result: DmarcResult, arc: ArcResult, outcome: RecipientOutcome) -> None:
    """What DMARC does to one recipient: a fail under p=reject / p=quarantine by the
    domain's ``dmarc_action`` (unless a trusted ARC sealer vouches), a temperror by its
    ``dmarc_temperror_action``."""
    if result.result == "temperror":
        _act_on_temperror(result, outcome)
        return
    if result.result != "fail" or result.applied not in ("reject", "quarantine"):
        return
    if _spared(result, outcome):
        return
    trusted = outcome.policy.get("arc_trusted_sealers")
    if arc.vouches(tuple(trusted)):
        outcome.notes.append(f"DMARC policy of {result.domain}: {result.applied}, not applied "
                             f"(trusted ARC sealer {arc.sealer} recorded dmarc=pass)")
        return
    action = outcome.policy.get("dmarc_action")
    if action == "honour" and result.applied == "reject":
        outcome.block(Action.REJECT, f"DMARC policy of {result.domain}: reject")
    elif action == "honour":
        outcome.edit(AddHeader(JUNK_HEADER, "yes"))
        outcome.notes.append(f"DMARC policy of {result.domain}: quarantine (junk)")
    elif action == "tag":
        outcome.notes.append(f"DMARC policy of {result.domain}: {result.applied}, "
                             "not applied (dmarc_action=tag)")


def _act_on_temperror(result: DmarcResult, outcome: RecipientOutcome) -> None:
    """``dmarc_temperror_action``: tempfail, accept, or auto (tempfail under p=reject)."""
    action = outcome.policy.get("dmarc_temperror_action")
    if action == "auto":
        action = "tempfail" if result.policy == "reject" else "accept"
    if action != "tempfail" or _spared(result, outcome):
        return
    outcome.block(Action.TEMPFAIL, f"DMARC of {result.domain}: DNS temporary error ({result.reason})")


def _spared(result: DmarcResult, outcome: RecipientOutcome) -> bool:
    """Role addresses (postmaster@, abuse@) are spared every check that judges the sender."""
    if outcome.policy.kind is not AddressKind.ROLE:
        return False
    outcome.notes.append(f"DMARC of {result.domain}: {result.result}, not applied (role address)")
    return True


def header_value(authserv_id: str, clauses: list[AuthenticationResult]) -> str:
    """The field's value, one result per folded line."""
    header = AuthenticationResultsHeader(authserv_id=authserv_id, results=clauses)
    return ";\n\t".join([header.authserv_id, *(str(c) for c in header.results)])


class SenderAuthFilter:
    """Verifies DKIM, SPF, DMARC and ARC once per message, adds the Authentication-Results
    field and acts on DMARC per recipient."""

    name: ClassVar[str] = "sender_auth"
    service: ClassVar[Service | None] = None
    skipped_for_allowed_senders: ClassVar[bool] = False

    def __init__(self, dns_: AuthDns, authserv_id: str, *, spf_timeout: float = 20.0,
                 dmarc_: Dmarc | None = None) -> None:
        self.dns = dns_
        self.dmarc = dmarc_ or Dmarc(dns_)
        self.authserv_id = authserv_id.lower()
        self.spf_timeout = spf_timeout

    @classmethod
    def build(cls, backends: Backends) -> SenderAuthFilter | None:
        """On with ``milter.sender_auth`` and a configured resolver."""
        m = backends.config
        if not m.sender_auth or backends.resolver is None:
            return None
        return cls(AuthDns(backends.resolver, backends.dns_backend), m.authserv_id or backends.node_name,
                   spf_timeout=backends.resolver.lifetime * 5)

    async def apply(self, ctx: Context, outcomes: list[RecipientOutcome]) -> None:
        """Remove forged fields for everyone; add ours for hosted recipients, and act on DMARC."""
        forged = claimed_by(ctx.message.headers, self.authserv_id)
        if forged:
            for outcome in ctx.verdict.outcomes:
                outcome.edit(RemoveHeader(AR_HEADER, forged))
        hosted = [o for o in outcomes if o.policy.is_local]
        if not hosted:
            return
        clauses, judged = await self._authenticate(ctx)
        value = header_value(self.authserv_id, clauses)
        for outcome in hosted:
            outcome.edit(AddHeader(AR_HEADER, value))
            if judged is not None:
                act_on_dmarc(*judged, outcome)

    async def _authenticate(self, ctx: Context) -> tuple[list[AuthenticationResult],
                                                         tuple[DmarcResult, ArcResult] | None]:
        """The header's results, and DMARC's and ARC's (None for an authenticated submission)."""
        message, envelope = ctx.message, ctx.envelope
        if envelope.submitted:
            found = await verify_dkim(message, self.dns)
            ctx.find("dkim", _summary(found))
            return [*_dkim_clauses(found), submission_clause(envelope)], None
        found, spf, arc = await asyncio.gather(
            verify_dkim(message, self.dns),
            check_spf_async(self.dns, envelope, self.authserv_id, self.spf_timeout),
            verify_arc(message, self.dns))
        froms = [v for n, v in message.headers if n.lower() == "from"]
        result = await self.dmarc.evaluate(from_domain(froms), spf, found)
        ctx.find("dkim", _summary(found))
        ctx.find("spf", spf.result)
        ctx.find("dmarc", result.result + (f"({result.applied})" if result.policy else ""))
        if arc.result != "none":
            ctx.find("arc", arc.result)
        return [*_dkim_clauses(found), spf_clause(spf, envelope.sender, envelope.helo),
                dmarc_clause(result), arc_clause(arc)], (result, arc)


def _dkim_clauses(found: list[DkimResult]) -> list[AuthenticationResult]:
    return [dkim_clause(r) for r in found] or [DKIMAuthenticationResult(result="none")]


def _summary(found: list[DkimResult]) -> str:
    return ",".join(f"{r.result}:{r.domain}" for r in found) or "none"
