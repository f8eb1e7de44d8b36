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

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import spf

from mailwarden.catalogue import Service
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
from policyd.dnslookup import DnsRecords

Lookup = Callable[[str, str], list[Any]]


class ResolverQuery(spf.query):  # type: ignore[misc]  # pyspf has no type hints
    """``spf.query`` whose DNS questions go to ``lookup(name, qtype)``.

    pyspf asks DNS in one place, the public :meth:`spf.query.dns`; every other
    lookup (TXT, MX, A/AAAA, PTR, exists, include) goes through it.  This override
    keeps that method's contract - the per-query cache of every answer, CNAME
    chains up to ``spf.MAX_CNAME``, the void-lookup limit of RFC 7208 4.6.4, the
    ``querytime`` budget - and asks ``lookup`` instead of the module's
    ``DNSLookup``, which stays untouched.  ``lookup`` returns pyspf's shape,
    ``[((name, type), value), ...]`` (see :func:`pyspf_records`), and raises
    ``spf.TempError`` when DNS cannot answer.
    """

    def __init__(self, *args: Any, lookup: Lookup, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.dns_lookup = lookup

    def dns(self, name: str, qtype: str, cnames: dict[str, str] | None = None,
            ignore_void: bool = False) -> list[Any]:
        """Answer ``name``/``qtype`` from the cache or ``lookup`` (pyspf's ``query.dns``)."""
        if not name:
            raise spf.PermError("invalid DNS name: empty")
        name = str(name)
        if name.endswith("."):
            name = name[:-1]
        if not all(0 < len(label) < 64 for label in name.split(".")):
            return []  # an invalid DNS name (a label too long or empty) has no records
        name = name.lower()
        result: list[Any] = self.cache.get((name, qtype), [])
        if result:
            return result
        cname_key = (name, "CNAME")
        cname = self.cache.get(cname_key)
        if cname:
            cname = cname[0]
        else:
            if self.querytime < 0:
                raise spf.TempError("DNS Error: exceeded max query lookup time")
            started = time.time()
            for (owner, rtype), value in self.dns_lookup(name, qtype):
                # DNS servers answer with any case: the cache is case-insensitive.
                key = (owner.lower(), rtype)
                if key == cname_key:
                    cname = value
                    result = self.cache.get((cname, qtype), [])
                    if result:
                        break
                if key[1] == "CNAME" or (qtype, key[1]) in spf.query.SAFE2CACHE:
                    self.cache.setdefault(key, []).append(value)
            result = self.cache.get((name, qtype), [])
            if self.querytime > 0:
                self.querytime -= time.time() - started
        if not result and cname:
            if not cnames:
                cnames = {}
            elif len(cnames) >= spf.MAX_CNAME:
                raise spf.PermError(f"Length of CNAME chain exceeds {spf.MAX_CNAME}")
            cnames[name] = cname
            if cname.lower().rstrip(".") in cnames:
                if self.strict > 1:
                    raise spf.AmbiguityWarning("CNAME loop", cname)
            else:
                result = self.dns(cname, qtype, cnames=cnames)
                if result:
                    self.cache[(name, qtype)] = result
        if not result and not ignore_void:
            self.void_lookups += 1
            if self.void_lookups > spf.MAX_VOID_LOOKUPS:
                raise spf.PermError(f"Void lookup limit of {spf.MAX_VOID_LOOKUPS} exceeded")
        return result


def pyspf_records(name: str, qtype: str, records: DnsRecords) -> list[Any]:
    """dnspython rdata in the shape pyspf's DNSLookup returns."""
    out: list[Any] = []
    for rdata in records:
        if qtype in ("A", "AAAA"):
            out.append(((name, qtype), rdata.address))
        elif qtype == "MX":
            out.append(((name, qtype), (rdata.preference, rdata.exchange)))
        elif qtype == "PTR":
            out.append(((name, qtype), rdata.target.to_text(True)))
        elif qtype in ("TXT", "SPF"):
            out.append(((name, qtype), rdata.strings))
    return out



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
        found: SpfResult = ctx.memo("spf", lambda: self._evaluate(ctx, str(ip)))
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

    def _evaluate(self, ctx: CheckContext, ip: str) -> SpfResult:
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
            i=ip, s=ctx.sender, h=request["helo_name"], receiver=self.receiver,
            timeout=self.timeout, querytime=self.timeout, lookup=lookup,
        )
        result, _code, explanation = query.check()
        if missing:
            raise NeedDns(missing)
        header = "Received-SPF: " + query.get_header(result)
        return SpfResult(str(result), str(explanation), header)
