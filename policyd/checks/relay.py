"""Relay gate: mail for domains not hosted here needs a login, a POP-before-SMTP window
or a trusted network; anything else is third-party relaying and refused."""

from __future__ import annotations

from typing import ClassVar

from mailwarden.catalogue import Service
from policyd.checks.base import CheckContext, CheckVerdict, Identity, permit, reject
from policyd.config import PolicydConfig


class RelayCheck:
    """Per recipient: local domains pass on (DUNNO), others need a relay right (OK)."""

    name: ClassVar[str] = "relay"
    stages: ClassVar[frozenset[str]] = frozenset({"RCPT"})
    services: ClassVar[tuple[Service, ...]] = (Service.SMTP_AUTH, Service.POP_BEFORE_SMTP)
    spares_role_addresses: ClassVar[bool] = False

    def __init__(self, cfg: PolicydConfig) -> None:
        self.failure_action = cfg.relay.failure_action

    def evaluate(self, ctx: CheckContext) -> CheckVerdict | None:
        """OK for a permitted relay, 554 5.7.1 for third-party relaying, None for local mail."""
        recipient = ctx.recipient
        if ctx.policy(recipient).is_local:
            return None
        who, policy = ctx.identity()
        if who is Identity.TRUSTED:
            return permit("relay from trusted network")
        if who is Identity.AUTHENTICATED and policy is not None:
            return permit(f"relay for SMTP-AUTH login {policy.canonical}")
        if who is Identity.POP_BEFORE_SMTP and policy is not None:
            return permit(f"relay for POP-before-SMTP user {policy.canonical}")
        why = "login may not relay" if ctx.request.sasl_username else "not authenticated"
        return reject(
            f"554 5.7.1 <{recipient}>: Relay access denied",
            f"third-party relay refused ({why})",
            record=not ctx.request.sasl_username,
        )
