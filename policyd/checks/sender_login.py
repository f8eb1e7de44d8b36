"""SMTP-AUTH sender ownership: an authenticated client sends only as its own addresses."""

from __future__ import annotations

from typing import ClassVar

from mailwarden.address import split_address
from mailwarden.catalogue import Service
from mailwarden.policy import AddressKind
from policyd.checks.base import CheckContext, CheckVerdict, reject
from policyd.config import PolicydConfig


class SenderLoginCheck:
    """The login must be an active subscriber with SMTP-AUTH, and own the envelope sender.

    Owning means the subscriber's address or alternate addresses, the same local part
    in a domain alias, or an ``allowed_senders`` pattern (see
    ``EffectivePolicy.owns_sender``); logins of ``exempt_login_domains`` may use any
    sender.
    """

    name: ClassVar[str] = "sender_login"
    stages: ClassVar[frozenset[str]] = frozenset({"MAIL", "RCPT"})
    services: ClassVar[tuple[Service, ...]] = (Service.SMTP_AUTH,)
    spares_role_addresses: ClassVar[bool] = False

    def __init__(self, cfg: PolicydConfig) -> None:
        self.failure_action = cfg.sender_login.failure_action
        self.exempt = frozenset(d.lower().rstrip(".") for d in cfg.sender_login.exempt_login_domains)
        self.allow_null_sender = cfg.sender_login.allow_null_sender

    def evaluate(self, ctx: CheckContext) -> CheckVerdict | None:
        """None when there is no login or the sender is the login's; 553/554 5.7.1 otherwise."""
        login = ctx.request.sasl_username
        if not login:
            return None
        address = ctx.login_address()
        policy = ctx.policy(address) if address else None
        if policy is None or policy.kind is not AddressKind.SUBSCRIBER:
            return reject(
                "554 5.7.1 Authenticated login is not a subscriber here",
                f"login {login!r} is not a subscriber",
            )
        if not policy.active:
            return reject("554 5.7.1 Account disabled", f"login {policy.canonical} is disabled")
        if not policy.enabled(Service.SMTP_AUTH):
            return reject(
                "554 5.7.1 SMTP-AUTH is not enabled for this account",
                f"login {policy.canonical} has no smtp_auth service",
            )
        sender = ctx.sender
        if not sender:
            if self.allow_null_sender:
                return None
            return reject("553 5.7.1 Null sender not allowed for logins", "null sender")
        if policy.owns_sender(sender):
            return None
        if split_address(policy.canonical or "")[1] in self.exempt:
            return None
        return reject(
            f"553 5.7.1 <{sender}>: Sender address not owned by user {policy.canonical}",
            f"sender {sender} not owned by login {policy.canonical}",
        )
