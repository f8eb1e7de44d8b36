"""IP reputation: DNSBL zones and mailwarden's own score, before any content is scanned."""

from __future__ import annotations

import ipaddress
from typing import ClassVar

from mailwarden.catalogue import Service
from policyd.checks.base import (
    CheckContext,
    CheckVerdict,
    DnsUnavailable,
    Identity,
    IPAddress,
    defer,
    reject,
)
from policyd.checks.spf import spf_of
from policyd.config import PolicydConfig


def dnsbl_name(ip: IPAddress, zone: str) -> str:
    """The DNSBL query name: reversed octets (IPv4) or nibbles (IPv6) under ``zone``."""
    reverse = ip.reverse_pointer
    suffix = ".in-addr.arpa" if ip.version == 4 else ".ip6.arpa"
    return f"{reverse[: -len(suffix)]}.{zone.strip('.')}"


# 127.255.255.0/24 are list operators' error codes (e.g. "query via a public resolver").
_LISTED = ipaddress.ip_network("127.0.0.0/8")
_ERROR_CODES = ipaddress.ip_network("127.255.255.0/24")


class ReputationCheck:
    """Refuse anonymous clients with a poor own score, a poor network or DNSBL listings.

    The operator's lists come first (``mailwarden reputation allow|deny``, and
    ``allow_networks`` / ``deny_networks``): an allowed client is never refused here, a
    denied one always.  A client listed in a DNS allow list (``dnswl_zones``), or one that
    passes SPF for a large provider it sends for (``provider_domains``), is not refused
    for its network's score or for DNSBL listings: a provider's outbound pool shares its
    /24 with other customers' senders, and one of them sending viruses must not block
    the provider for every subscriber.  Its own score still counts.
    """

    name: ClassVar[str] = "reputation"
    stages: ClassVar[frozenset[str]] = frozenset({"RCPT"})
    services: ClassVar[tuple[Service, ...]] = ()
    spares_role_addresses: ClassVar[bool] = True

    def __init__(self, cfg: PolicydConfig, node_name: str = "localhost") -> None:
        rc = cfg.reputation
        self.failure_action = rc.failure_action
        self.zones = [z.strip(".") for z in rc.dnsbl_zones]
        self.hits_to_reject = max(rc.dnsbl_hits_to_reject, 1)
        self.tempfail_score = rc.tempfail_score
        self.reject_score = rc.reject_score
        self.network_reject_score = rc.network_reject_score
        self.allow_zones = [z.strip(".") for z in rc.dnswl_zones]
        self.min_trust = rc.dnswl_min_trust
        self.providers = frozenset(d.lower().rstrip(".") for d in rc.provider_domains)
        self.spf_timeout = cfg.spf.lookup_timeout
        self.receiver = node_name

    def evaluate(self, ctx: CheckContext) -> CheckVerdict | None:
        """One assessment per client and transaction; logins and trusted clients pass."""
        who, _ = ctx.identity()
        ip = ctx.client_ip
        if who is not Identity.ANONYMOUS or ip is None:
            return None
        verdict: CheckVerdict | None = ctx.memo("reputation", lambda: self._assess(ctx, ip))
        return verdict

    def _assess(self, ctx: CheckContext, ip: IPAddress) -> CheckVerdict | None:
        score, network, listed = ctx.services.reputation.assess(str(ip), ctx.services.reputation_lists)
        if listed is not None and listed.kind == "allow":
            return None
        if listed is not None:
            why = f": {listed.reason}" if listed.reason else ""
            return reject(f"554 5.7.1 Service unavailable; Client host [{ip}] is blocked here",
                          f"denied by the operator ({listed.network}, {listed.source}{why})")
        if score >= self.reject_score:
            return reject(
                f"554 5.7.1 Service unavailable; Client host [{ip}] has a poor reputation here",
                f"own reputation score {score:.1f} >= {self.reject_score:g}",
            )
        if network >= self.network_reject_score and not self._vouched(ctx, ip):
            return reject(
                f"554 5.7.1 Service unavailable; Client network of [{ip}] has a poor reputation here",
                f"network reputation score {network:.1f} >= {self.network_reject_score:g}",
            )
        if self.zones:
            listed_in = self._dnsbl(ctx, ip)
            if len(listed_in) >= self.hits_to_reject and not self._vouched(ctx, ip):
                return reject(
                    f"554 5.7.1 Service unavailable; Client host [{ip}] blocked using {listed_in[0]}",
                    f"listed in {', '.join(listed_in)}",
                )
        if score >= self.tempfail_score:
            return defer(
                f"450 4.7.1 Client host [{ip}] has a poor reputation here, try again later",
                f"own reputation score {score:.1f} >= {self.tempfail_score:g}",
            )
        return None

    def _vouched(self, ctx: CheckContext, ip: IPAddress) -> str:
        """Why the client's network and DNSBL listings do not count (``""``: they do)."""
        return str(ctx.memo("reputation_vouched", lambda: self._voucher(ctx, ip)))

    def _voucher(self, ctx: CheckContext, ip: IPAddress) -> str:
        if self.allow_zones:
            names = [(zone, dnsbl_name(ip, zone)) for zone in self.allow_zones]
            ctx.need_dns([(name, "A") for _, name in names])
            for zone, name in names:
                try:
                    records = ctx.dns(name, "A")
                except DnsUnavailable:
                    continue  # an allow list that cannot answer vouches for nobody
                for rdata in records:
                    code = ipaddress.ip_address(rdata.address)
                    if (code in _LISTED and code not in _ERROR_CODES and str(code) != "127.0.0.255"
                            and code.packed[3] >= self.min_trust):
                        return f"listed in DNS allow list {zone}"
        sender_domain = ctx.sender.rpartition("@")[2].lower().rstrip(".")
        if sender_domain in self.providers:
            found = spf_of(ctx, str(ip), receiver=self.receiver, timeout=self.spf_timeout)
            if found.result == "pass":
                return f"SPF pass for provider {sender_domain}"
        return ""

    def _dnsbl(self, ctx: CheckContext, ip: IPAddress) -> list[str]:
        """The zones listing ``ip``; DnsUnavailable if a zone could not answer and none listed."""
        names = [(zone, dnsbl_name(ip, zone)) for zone in self.zones]
        ctx.need_dns([(name, "A") for _, name in names])  # all zones at once
        listed: list[str] = []
        failed: list[str] = []
        for zone, name in names:
            try:
                records = ctx.dns(name, "A")
            except DnsUnavailable as exc:
                failed.append(str(exc))
                continue
            for rdata in records:
                code = ipaddress.ip_address(rdata.address)
                if code in _LISTED and code not in _ERROR_CODES:
                    listed.append(zone)
                    break
        if failed and len(listed) < self.hits_to_reject:
            raise DnsUnavailable("DNSBL lookup failed: " + "; ".join(failed))
        return listed
