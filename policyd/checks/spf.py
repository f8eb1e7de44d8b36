"""SPF (RFC 7208) of the envelope sender, for mail from anonymous clients.

pyspf does the evaluation; its DNS goes through mailwarden's resolver (``[dns]``),
never /etc/resolv.conf: :class:`ResolverQuery` is pyspf's ``query`` with its
``dns()`` method answered by the lookup the query was given, so each evaluation
uses its own resolver and nothing in the pyspf module is changed.  The lookup is
the transaction's: on the event loop an unknown answer interrupts the evaluation
(NeedDns), the server resolves it asynchronously and pyspf runs again, so SPF
never holds a thread.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

import spf

from mailwarden.catalogue import Service
from mailwarden.spfquery import ResolverQuery, pyspf_records
from policyd.checks.base import (
    CheckContext,
    CheckVerdict,
    DnsUnavailable,
    Identity,
    NeedDns,
    defer,
    prepend,
    recipient_domain,
    reject,
)
from policyd.config import PolicydConfig


@dataclass(frozen=True, slots=True)
class SpfResult:
    """One evaluation: result, explanation and the Received-SPF header."""

    result: str
    explanation: str
    header: str


class SpfCheck:
    """Per recipient domain: reject, tempfail, tag (Received-SPF) or ignore each SPF result."""

    name: ClassVar[str] = "spf"
    stages: ClassVar[frozenset[str]] = frozenset({"RCPT"})
    services: ClassVar[tuple[Service, ...]] = ()
    spares_role_addresses: ClassVar[bool] = True

    def __init__(self, cfg: PolicydConfig, node_name: str = "localhost") -> None:
        self.failure_action = cfg.spf.failure_action
        self.actions = dict(cfg.spf.actions)
        self.domains = {d.lower().rstrip("."): dict(a) for d, a in cfg.spf.domains.items()}
        self.timeout = cfg.spf.lookup_timeout
        self.receiver = node_name

    def action_for(self, domain: str, result: str, directory: tuple[str, ...] = ()) -> str:
        """The action for ``result`` at recipient domain ``domain``.

        The domain's ``spf_actions`` in the directory first, then ``[policyd.spf.domains]``,
        then ``[policyd.spf] actions``.
        """
        for entry in directory:
            name, _, action = entry.partition("=")
            if name == result:
                return action
        per_domain = self.domains.get(domain)
        if per_domain and result in per_domain:
            return per_domain[result]
        return self.actions.get(result, "dunno")

    def evaluate(self, ctx: CheckContext) -> CheckVerdict | None:
        """The SPF verdict for an anonymous client; None for everyone else."""
        who, _ = ctx.identity()
        ip = ctx.client_ip
        if who is not Identity.ANONYMOUS or ip is None:
            return None
        domain = recipient_domain(ctx)
        found = spf_of(ctx, str(ip), receiver=self.receiver, timeout=self.timeout)
        if found.result == "temperror":
            if self.failure_action == "tempfail":
                return defer(
                    "451 4.4.3 SPF temporary error, try again later",
                    f"SPF temperror: {found.explanation}",
                )
            return None
        recipient = ctx.policy(ctx.recipient)
        listed = recipient.get("spf_actions") if recipient.is_local else ()
        action = self.action_for(domain, found.result, listed)
        why = f"SPF {found.result}: {found.explanation}"
        if action == "reject":
            code = "550 5.7.24" if found.result == "permerror" else "550 5.7.23"
            return reject(f"{code} SPF {found.result}: {found.explanation}", why, record=True)
        if action == "tempfail":
            return defer(f"451 4.7.24 SPF {found.result}, try again later", why)
        if action == "tag":
            return prepend(found.header, why)
        return None



def spf_of(ctx: CheckContext, ip: str, *, receiver: str, timeout: float) -> SpfResult:
    """The transaction's SPF result (evaluated once, whichever check asks first)."""
    found: SpfResult = ctx.memo("spf", lambda: evaluate_spf(ctx, ip, receiver=receiver, timeout=timeout))
    return found


def evaluate_spf(ctx: CheckContext, ip: str, *, receiver: str, timeout: float) -> SpfResult:
    """pyspf over the transaction's DNS answers (NeedDns on the event loop for a new one)."""
    request = ctx.request
    missing: list[tuple[str, str]] = []

    def lookup(name: str, qtype: str) -> list[Any]:
        try:
            return pyspf_records(name, qtype, ctx.dns(name, qtype))
        except NeedDns as need:
            missing.extend(need.queries)  # pyspf swallows errors around exp=
            raise
        except DnsUnavailable as exc:
            raise spf.TempError(f"DNS {exc}") from None

    query = ResolverQuery(
        i=ip, s=ctx.sender, h=request["helo_name"], receiver=receiver,
        timeout=timeout, querytime=timeout, lookup=lookup,
    )
    result, _code, explanation = query.check()
    if missing:
        raise NeedDns(missing)
    header = "Received-SPF: " + query.get_header(result)
    return SpfResult(str(result), str(explanation), header)
