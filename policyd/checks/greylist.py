"""Greylisting (postgrey's model) for recipients whose domain or mailbox has it on.

The triplet is (client network, envelope sender, recipient), stored as
``gl:<sha256>`` with the time of the first attempt; a retry after
``greylist_delay`` (per domain / user, default 300 s) and within ``retry_window``
passes and turns the entry into ``p`` for ``max_age``.  A client whose triplets
passed ``auto_whitelist_clients`` times (``gl:awl:<ip>``) is no longer greylisted.
"""

from __future__ import annotations

import hashlib
import ipaddress
from typing import ClassVar

from mailwarden.address import matching_pattern
from mailwarden.catalogue import Service
from policyd.checks.base import CheckContext, CheckVerdict, Identity, IPAddress, defer
from policyd.config import PolicydConfig

PASSED = "p"


def _networks(items: list[str]) -> tuple[list[ipaddress.IPv4Network | ipaddress.IPv6Network], list[str]]:
    nets, names = [], []
    for item in items:
        try:
            nets.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            names.append(item.lower().lstrip("*"))
    return nets, names


class GreylistCheck:
    """Defer the first attempt of an unknown (client, sender, recipient) triplet."""

    name: ClassVar[str] = "greylist"
    stages: ClassVar[frozenset[str]] = frozenset({"RCPT"})
    services: ClassVar[tuple[Service, ...]] = (Service.GREYLISTING,)
    spares_role_addresses: ClassVar[bool] = True

    def __init__(self, cfg: PolicydConfig) -> None:
        gc = cfg.greylist
        self.failure_action = gc.failure_action
        self.retry_window = gc.retry_window
        self.max_age = gc.max_age
        self.auto_whitelist = gc.auto_whitelist_clients
        self.ipv4_prefix = gc.ipv4_prefix
        self.client_nets, self.client_names = _networks(gc.whitelist_clients)
        self.recipients = frozenset(r.lower() for r in gc.whitelist_recipients)
        self.senders = frozenset(s.lower() for s in gc.whitelist_senders)

    def _whitelisted(self, ctx: CheckContext, ip: IPAddress, recipient: str) -> bool:
        if any(ip in net for net in self.client_nets):
            return True
        client_name = ctx.request["client_name"].lower()
        if client_name and client_name != "unknown" and any(
            client_name == n.lstrip(".") or client_name.endswith(n if n.startswith(".") else "." + n)
            for n in self.client_names
        ):
            return True
        if matching_pattern(recipient, self.recipients) is not None:
            return True
        sender = ctx.sender
        if not sender:
            return False
        # The recipient's own allow list (catalogue: sender_allowlist) as well as the site's.
        return (matching_pattern(sender, self.senders) is not None
                or ctx.policy(recipient).sender_listed("sender_allowlist", sender) is not None)

    def triplet_key(self, ip: IPAddress, sender: str, recipient: str) -> str:
        """``gl:<hash>`` of (client network, sender without extension, recipient)."""
        prefix = self.ipv4_prefix if ip.version == 4 else 64
        net = ipaddress.ip_network(f"{ip}/{prefix}", strict=False)
        local, _, domain = sender.rpartition("@")
        local = local.split("+", 1)[0]  # VERP / sub-addresses vary per message
        digest = hashlib.sha256(f"{net}\0{local}@{domain}\0{recipient}".encode()).hexdigest()
        return f"gl:{digest[:32]}"

    def evaluate(self, ctx: CheckContext) -> CheckVerdict | None:
        """450 4.2.0 for a triplet seen less than its delay ago; None when it may pass."""
        recipient = ctx.recipient
        policy = ctx.policy(recipient)
        if not policy.is_local or not policy.enabled(Service.GREYLISTING):
            return None
        ip = ctx.client_ip
        who, _ = ctx.identity()
        if who is not Identity.ANONYMOUS or ip is None or self._whitelisted(ctx, ip, recipient):
            return None
        delay = int(policy.get("greylist_delay"))
        store = ctx.services.store
        awl_key = f"gl:awl:{ip}"
        if self.auto_whitelist:
            seen = store.get(awl_key)
            if seen is not None and int(seen) >= self.auto_whitelist:
                return None
        key = self.triplet_key(ip, ctx.sender, recipient)
        now = ctx.services.clock()
        value = store.get(key)
        if value == PASSED:
            store.expire(key, self.max_age)
            return None
        if value is None:
            if delay <= 0:
                self._pass(ctx, key, awl_key)
                return None
            if store.add(key, f"{now:.3f}", ttl=self.retry_window):
                return self._greylisted(delay, "first attempt")
            value = store.get(key) or f"{now:.3f}"
            if value == PASSED:
                return None
        try:
            first = float(value)
        except ValueError:
            first = now  # a damaged entry starts over
            store.set(key, f"{now:.3f}", ttl=self.retry_window)
        waited = now - first
        if waited < delay:
            return self._greylisted(int(delay - waited) + 1, f"retry after {waited:.0f} s")
        self._pass(ctx, key, awl_key)
        return None

    def _pass(self, ctx: CheckContext, key: str, awl_key: str) -> None:
        store = ctx.services.store
        store.set(key, PASSED, ttl=self.max_age)
        if self.auto_whitelist:
            store.incr(awl_key, 1, ttl=self.max_age)

    @staticmethod
    def _greylisted(wait: int, why: str) -> CheckVerdict:
        return defer(
            f"450 4.2.0 Greylisted, try again in {wait} seconds",
            f"greylisted ({why})",
        )
