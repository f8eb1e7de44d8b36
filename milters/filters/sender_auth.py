"""Sender authentication: DKIM and SPF of inbound mail, one Authentication-Results header.

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
* Mail submitted with SMTP AUTH is not checked against SPF (its client is a
  subscriber's, not the domain's mail server); ``auth=pass`` records the login.
* Recipients of other domains (a subscriber's outgoing mail) get nothing added.
"""

from __future__ import annotations

import asyncio
import re
from typing import ClassVar

from authres import AuthenticationResultsHeader
from authres.core import (
    AuthenticationResult,
    DKIMAuthenticationResult,
    SMTPAUTHAuthenticationResult,
    SPFAuthenticationResult,
)

from mailwarden.catalogue import Service
from milters.authentication import AuthDns, DkimResult, SpfResult, check_spf_async, verify_dkim
from milters.filters import Backends, Context
from milters.message import HeaderList
from milters.verdict import AddHeader, RecipientOutcome, RemoveHeader

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


def header_value(authserv_id: str, clauses: list[AuthenticationResult]) -> str:
    """The field's value, one result per folded line."""
    header = AuthenticationResultsHeader(authserv_id=authserv_id, results=clauses)
    return ";\n\t".join([header.authserv_id, *(str(c) for c in header.results)])


class SenderAuthFilter:
    """Verifies DKIM and SPF once per message and adds the Authentication-Results field."""

    name: ClassVar[str] = "sender_auth"
    service: ClassVar[Service | None] = None

    def __init__(self, dns_: AuthDns, authserv_id: str, *, spf_timeout: float = 20.0) -> None:
        self.dns = dns_
        self.authserv_id = authserv_id.lower()
        self.spf_timeout = spf_timeout

    @classmethod
    def build(cls, backends: Backends) -> SenderAuthFilter | None:
        """On with ``milter.sender_auth`` and a configured resolver."""
        m = backends.config
        if not m.sender_auth or backends.resolver is None:
            return None
        return cls(AuthDns(backends.resolver), m.authserv_id or backends.node_name,
                   spf_timeout=backends.resolver.lifetime * 5)

    async def apply(self, ctx: Context, outcomes: list[RecipientOutcome]) -> None:
        """Remove forged fields for everyone; add ours for hosted recipients."""
        message, envelope = ctx.message, ctx.envelope
        forged = claimed_by(message.headers, self.authserv_id)
        if forged:
            for outcome in ctx.verdict.outcomes:
                outcome.edit(RemoveHeader(AR_HEADER, forged))
        hosted = [o for o in outcomes if o.policy.is_local]
        if not hosted:
            return
        count = sum(1 for name, _ in message.headers if name.lower() == "dkim-signature")
        clauses: list[AuthenticationResult] = []
        spf: SpfResult | None = None
        if envelope.auth_login:
            found = await verify_dkim(message.raw(), count, self.dns)
            clauses.append(SMTPAUTHAuthenticationResult(result="pass", smtp_auth=envelope.auth_login))
        else:
            found, checked = await asyncio.gather(
                verify_dkim(message.raw(), count, self.dns),
                check_spf_async(self.dns, envelope, self.authserv_id, self.spf_timeout))
            clauses.append(spf_clause(checked, envelope.sender, envelope.helo))
            spf = checked
        clauses[:0] = [dkim_clause(r) for r in found] or [DKIMAuthenticationResult(result="none")]
        ctx.find("dkim", ",".join(f"{r.result}:{r.domain}" for r in found) or "none")
        if spf is not None:
            ctx.find("spf", spf.result)
        value = header_value(self.authserv_id, clauses)
        for outcome in hosted:
            outcome.edit(AddHeader(AR_HEADER, value))
