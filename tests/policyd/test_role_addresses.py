"""Mail to role addresses (postmaster@, abuse@) is never refused by the checks that judge
the sender (reputation, SPF, greylisting, rate limits); relay and sender checks still run."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from harness.dnsstub import StubDns
from tests.policyd.conftest import World

ALL = '[policyd]\nchecks = ["relay", "sender_login", "reputation", "rate_limit", "spf", "greylist"]\n'
ROLES = '[policy]\nrole_mailbox = "roles@isp.example"\n'
BAD = "203.0.113.66"  # outside strict.example's SPF, with a poor reputation below


@pytest.fixture(scope="module")
def spf_dns() -> Iterator[StubDns]:
    with StubDns({"strict.example": {"TXT": ['"v=spf1 ip4:192.0.2.0/24 -all"']}}) as dns:
        yield dns


@pytest.fixture
def w(world_with: Callable[..., World], spf_dns: StubDns) -> World:
    world = world_with(ALL + "[policyd.rate_limit.client]\nmessages = 1\n" + ROLES, dns_port=spf_dns.port)
    for _ in range(10):
        world.services.reputation.record(BAD, "virus")
    return world


def test_a_poor_sender_reaches_role_addresses_only(w: World) -> None:
    bad = {"sender": "a@strict.example", "client_address": BAD}
    refused = w.decide(recipient="taro@example.jp", **bad)
    assert refused.action.startswith("554 5.7.1") and refused.check == "reputation"
    for role in ("postmaster@example.jp", "abuse@example.ne.jp", "Abuse+spam@lab.example.org"):
        assert w.action(recipient=role, **bad) == "DUNNO", role


def test_spf_fail_and_greylisting_spare_role_addresses(w: World) -> None:
    fail = {"sender": "a@strict.example", "client_address": "198.51.100.7"}
    assert w.decide(recipient="taro@example.jp", **fail).check == "spf"
    assert w.action(recipient="postmaster@example.jp", **fail) == "DUNNO"
    greylisted = w.decide(recipient="student@lab.example.org", client_address="198.51.100.8")
    assert greylisted.action.startswith("450") and greylisted.check == "greylist"
    assert w.action(recipient="postmaster@lab.example.org", client_address="198.51.100.9") == "DUNNO"


def message(w: World, *recipients: str, **who: str) -> list[str]:
    """One mail transaction: each RCPT, then END-OF-MESSAGE once all were accepted."""
    w.counter += 1
    inst = f"msg{w.counter}"
    answers = [w.action(recipient=r, instance=inst, **who) for r in recipients]
    if all(a == "DUNNO" for a in answers):
        answers.append(w.action(protocol_state="END-OF-MESSAGE", recipient="", instance=inst,
                                recipient_count=str(len(recipients)), size="100", **who))
    return answers


def test_rate_limits_spare_messages_to_role_addresses_only(world_with: Callable[..., World]) -> None:
    w = world_with('[policyd]\nchecks = ["relay", "rate_limit"]\n[policyd.rate_limit.client]\n'
                   "messages = 1\n" + ROLES)
    client = {"client_address": "198.51.100.20"}
    # [policyd.rate_limit.client] messages = 1: the first message fills the budget ...
    assert message(w, "taro@example.jp", **client) == ["DUNNO", "DUNNO"]
    assert message(w, "taro@example.jp", **client)[0].startswith("450 4.7.1 Rate limit reached")
    # ... but mail to role addresses is neither held up at RCPT nor counted at the end.
    for _ in range(3):
        assert message(w, "postmaster@example.jp", "abuse@example.jp", **client) == ["DUNNO"] * 3
    # A message to a role address and a subscriber is the subscriber's: it waits.
    mixed = message(w, "postmaster@example.jp", "taro@example.jp", **client)
    assert mixed[0] == "DUNNO" and mixed[1].startswith("450 4.7.1")
    other = {"client_address": "198.51.100.21"}
    assert message(w, "postmaster@example.jp", "taro@example.jp", **other) == ["DUNNO"] * 3
    assert message(w, "postmaster@example.jp", "taro@example.jp", **other)[1].startswith("450 4.7.1")


def test_relay_and_sender_checks_still_apply(w: World) -> None:
    # A login may not use someone else's address, whoever it writes to.
    login = {"sasl_username": "taro@example.jp", "sasl_method": "PLAIN", "sender": "alice@example.com"}
    assert w.action(recipient="postmaster@example.jp", **login).startswith("553")
    # Not hosted here: not a role address, so third-party relaying is refused as ever.
    assert w.action(recipient="postmaster@remote.example").startswith("554 5.7.1")
