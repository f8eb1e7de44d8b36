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
    """Refuse anonymous clients with a poor own score, a poor network or DNSBL listings."""

    name: ClassVar[str] = "reputation"
    stages: ClassVar[frozenset[str]] = frozenset({"RCPT"})
    services: ClassVar[tuple[Service, ...]] = ()
    spares_role_addresses: ClassVar[bool] = True

    def __init__(self, cfg: PolicydConfig) -> None:
        rc = cfg.reputation
        self.failure_action = rc.failure_action
        self.zones = [z.strip(".") for z in rc.dnsbl_zones]
        self.hits_to_reject = max(rc.dnsbl_hits_to_reject, 1)
        self.tempfail_score = rc.tempfail_score
        self.reject_score = rc.reject_score
        self.network_reject_score = rc.network_reject_score

    def evaluate(self, ctx: CheckContext) -> CheckVerdict | None:
        """One assessment per client and transaction; logins and trusted clients pass."""
        who, _ = ctx.identity()
        ip = ctx.client_ip
        if who is not Identity.ANONYMOUS or ip is None:
            return None
        verdict: CheckVerdict | None = ctx.memo("reputation", lambda: self._assess(ctx, ip))
        return verdict

    def _assess(self, ctx: CheckContext, ip: IPAddress) -> CheckVerdict | None:
        score, network = ctx.services.reputation.scores(str(ip))
        if score >= self.reject_score:
            return reject(
                f"554 5.7.1 Service unavailable; Client host [{ip}] has a poor reputation here",
                f"own reputation score {score:.1f} >= {self.reject_score:g}",
            )
        if network >= self.network_reject_score:
            return reject(
                f"554 5.7.1 Service unavailable; Client network of [{ip}] has a poor reputation here",
                f"network reputation score {network:.1f} >= {self.network_reject_score:g}",
            )
        if self.zones:
            listed = self._dnsbl(ctx, ip)
            if len(listed) >= self.hits_to_reject:
                return reject(
                    f"554 5.7.1 Service unavailable; Client host [{ip}] blocked using {listed[0]}",
                    f"listed in {', '.join(listed)}",
                )
        if score >= self.tempfail_score:
            return defer(
                f"450 4.7.1 Client host [{ip}] has a poor reputation here, try again later",
                f"own reputation score {score:.1f} >= {self.tempfail_score:g}",
            )
        return None

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
