"""The policy checks, one per file; ``[policyd] checks`` picks them and their order."""

from __future__ import annotations

from collections.abc import Callable

from mailwarden.config import Config
from policyd.checks.base import Check
from policyd.checks.greylist import GreylistCheck
from policyd.checks.rate_limit import RateLimitCheck
from policyd.checks.relay import RelayCheck
from policyd.checks.reputation import ReputationCheck
from policyd.checks.sender_lists import SenderListsCheck
from policyd.checks.sender_login import SenderLoginCheck
from policyd.checks.spf import SpfCheck
from policyd.config import PolicydConfig

FACTORIES: dict[str, Callable[[Config], Check]] = {
    "relay": lambda c: RelayCheck(PolicydConfig.of(c)),
    "sender_login": lambda c: SenderLoginCheck(PolicydConfig.of(c)),
    "sender_lists": lambda c: SenderListsCheck(PolicydConfig.of(c)),
    "reputation": lambda c: ReputationCheck(PolicydConfig.of(c), c.general.node_name),
    "rate_limit": lambda c: RateLimitCheck(PolicydConfig.of(c)),
    "spf": lambda c: SpfCheck(PolicydConfig.of(c), c.general.node_name),
    "greylist": lambda c: GreylistCheck(PolicydConfig.of(c)),
}


def build_checks(config: Config) -> list[Check]:
    """The configured checks, in the configured order; ValueError for an unknown name."""
    checks = []
    for name in dict.fromkeys(PolicydConfig.of(config).checks):
        factory = FACTORIES.get(name)
        if factory is None:
            raise ValueError(f"unknown check {name!r} (known: {', '.join(FACTORIES)})")
        checks.append(factory(config))
    return checks
