"""The policy checks, one per file; ``[policyd] checks`` picks them and their order."""

from __future__ import annotations

from collections.abc import Callable

from mailwarden.config import Config
from policyd.checks.base import Check
from policyd.checks.greylist import GreylistCheck
from policyd.checks.rate_limit import RateLimitCheck
from policyd.checks.relay import RelayCheck
from policyd.checks.reputation import ReputationCheck
from policyd.checks.sender_login import SenderLoginCheck
from policyd.checks.spf import SpfCheck

FACTORIES: dict[str, Callable[[Config], Check]] = {
    "relay": lambda c: RelayCheck(c.policyd),
    "sender_login": lambda c: SenderLoginCheck(c.policyd),
    "reputation": lambda c: ReputationCheck(c.policyd),
    "rate_limit": lambda c: RateLimitCheck(c.policyd),
    "spf": lambda c: SpfCheck(c.policyd, c.general.node_name),
    "greylist": lambda c: GreylistCheck(c.policyd),
}


def build_checks(config: Config) -> list[Check]:
    """The configured checks, in the configured order; ValueError for an unknown name."""
    checks = []
    for name in dict.fromkeys(config.policyd.checks):
        factory = FACTORIES.get(name)
        if factory is None:
            raise ValueError(f"unknown check {name!r} (known: {', '.join(FACTORIES)})")
        checks.append(factory(config))
    return checks
