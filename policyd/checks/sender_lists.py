"""The recipient's own sender lists: ``sender_blocklist`` refuses at RCPT.

``sender_blocklist`` and ``sender_allowlist`` are catalogue settings (per domain and
per subscriber, merged, in LDAP), so a subscriber or a domain administrator keeps
them and ``explain`` shows where each entry comes from.  The allow list is honoured by
the greylisting check (an allowed sender is not greylisted) and by the milter (no
spam or keyword filtering; virus scanning always).  Role addresses are spared:
complaints must reach ``postmaster@`` and ``abuse@`` whatever a domain blocks.
"""

from __future__ import annotations

from typing import ClassVar

from mailwarden.catalogue import Service
from policyd.checks.base import CheckContext, CheckVerdict, reject
from policyd.config import PolicydConfig


class SenderListsCheck:
    """Refuse an envelope sender the recipient's ``sender_blocklist`` names."""

    name: ClassVar[str] = "sender_lists"
    stages: ClassVar[frozenset[str]] = frozenset({"RCPT"})
    services: ClassVar[tuple[Service, ...]] = ()
    spares_role_addresses: ClassVar[bool] = True

    def __init__(self, cfg: PolicydConfig) -> None:
        self.failure_action = cfg.relay.failure_action

    def evaluate(self, ctx: CheckContext) -> CheckVerdict | None:
        """550 5.7.1 for a blocked sender of a hosted recipient; None otherwise."""
        sender = ctx.sender
        policy = ctx.policy(ctx.recipient)
        if not sender or not policy.is_local:
            return None
        pattern = policy.sender_listed("sender_blocklist", sender)
        if pattern is None:
            return None
        return reject(f"550 5.7.1 <{sender}>: Sender address rejected: blocked by the recipient",
                      f"sender {sender} in sender_blocklist of {ctx.recipient} ({pattern})")
