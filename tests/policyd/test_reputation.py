"""mailwarden's own reputation (decaying, atomic) and DNSBL zones."""

from __future__ import annotations

import asyncio
import ipaddress
from collections.abc import Callable, Iterator

import pytest

from harness.dnsstub import StubDns
from mailwarden.reputation import RecordingBatch, Reputation
from mailwarden.store import MemoryStore
from policyd.checks.base import TEMPFAIL_REPLY
from policyd.checks.reputation import dnsbl_name
from tests.policyd.conftest import Clock, World

CHECKS = '[policyd]\nchecks = ["reputation"]\n'


def reputation(clock: Clock, **kw: float) -> Reputation:
    return Reputation(MemoryStore(clock=clock), clock=clock, half_life=3600, **kw)  # type: ignore[arg-type]


def test_score_adds_weights_and_halves_every_half_life() -> None:
    clock = Clock()
    rep = reputation(clock)
    for _ in range(4):
        rep.record("192.0.2.1", "spam")
    rep.record("192.0.2.1", "virus")
    assert rep.score("192.0.2.1") == pytest.approx(17.0, rel=1e-3)
    clock.advance(3600)
    assert rep.score("192.0.2.1") == pytest.approx(8.5, rel=1e-3)
    clock.advance(7200)
    assert rep.score("192.0.2.1") == pytest.approx(2.125, rel=1e-3)
    assert rep.score("192.0.2.2") == 0


def test_score_is_continuous_across_epochs() -> None:
    clock = Clock(0.0)
    rep = reputation(clock)
    clock.advance(rep.epoch_length - 10)
    rep.record("192.0.2.1", "virus")
    clock.advance(20)  # now in the next epoch
    assert rep.score("192.0.2.1") == pytest.approx(5.0 * 2 ** (-20 / 3600), rel=1e-3)
    rep.record("192.0.2.1", "virus")
    assert rep.score("192.0.2.1") == pytest.approx(5.0 * (1 + 2 ** (-20 / 3600)), rel=1e-3)


def test_clean_mail_lowers_but_never_below_zero() -> None:
    clock = Clock()
    rep = reputation(clock)
    rep.record("192.0.2.1", "spam")
    rep.record("192.0.2.1", "clean")
    assert rep.score("192.0.2.1") == pytest.approx(2.5, rel=1e-3)
    for _ in range(10):
        rep.record("192.0.2.1", "clean")
    assert rep.score("192.0.2.1") == 0


def test_network_score_collects_the_neighbours() -> None:
    clock = Clock()
    rep = reputation(clock)
    for i in range(1, 6):
        rep.record(f"192.0.2.{i}", "virus")
    rep.record("2001:db8::1", "spam")
    rep.record("2001:db8::2", "spam")
    assert rep.score("192.0.2.1") == pytest.approx(5.0, rel=1e-3)
    assert rep.network_score("192.0.2.200") == pytest.approx(25.0, rel=1e-3)
    assert rep.network_score("192.0.3.1") == 0
    assert rep.network_score("2001:db8::99") == pytest.approx(6.0, rel=1e-3)


def test_one_store_round_trip_to_record_and_one_to_read_both_scores() -> None:
    clock = Clock(1_800_000_000.0)
    store = MemoryStore(clock=clock)
    calls: list[str] = []
    for name in ("get", "get_many", "incr", "incr_many"):
        real = getattr(store, name)

        def spy(*args: object, _name: str = name, _real: Callable[..., object] = real) -> object:
            calls.append(_name)
            return _real(*args)

        setattr(store, name, spy)
    rep = Reputation(store, clock=clock, half_life=3600)
    rep.record("192.0.2.7", "virus")
    assert calls == ["incr_many"]
    ip, net = rep.scores("192.0.2.7")
    assert calls == ["incr_many", "get_many"]
    assert ip == rep.score("192.0.2.7") > 0 and net == rep.network_score("192.0.2.8") > 0


def test_a_batch_writes_what_single_records_would_in_one_transaction() -> None:
    clock = Clock(1_800_000_000.0)
    single, batched = reputation(clock), reputation(clock)
    writes: list[int] = []
    real = batched.store.incr_many

    def spy(items: list[tuple[str, int, float | None]]) -> list[int]:
        writes.append(len(items))
        return real(items)

    batched.store.incr_many = spy  # type: ignore[method-assign]
    outcomes = [("192.0.2.1", "spam"), ("192.0.2.1", "virus"), ("192.0.2.2", "clean"),
                ("192.0.2.1", "clean"), ("2001:db8::1", "spam")]

    async def count() -> None:
        batch = RecordingBatch(batched, interval=60)
        for ip, outcome in outcomes:
            batch.add(ip, outcome)
            clock.advance(7)
        batch.add("not-an-ip", "spam")  # logged and skipped
        assert writes == []  # nothing written before the interval or a drain
        await batch.drain()

    for ip, outcome in outcomes:
        single.record(ip, outcome)
        clock.advance(7)
    clock.advance(-7 * len(outcomes))
    asyncio.run(count())
    # Three IP counters and two network counters (/24 and /64), in one transaction.
    assert writes == [5]
    for ip in ("192.0.2.1", "192.0.2.2", "2001:db8::1"):
        assert batched.scores(ip) == pytest.approx(single.scores(ip), rel=1e-6)
    assert batched.score("192.0.2.1") == pytest.approx(7.5, rel=1e-2)


def test_a_batch_flushes_after_its_interval_and_at_its_limit_and_close_writes_the_rest() -> None:
    rep = reputation(Clock(1_800_000_000.0))

    async def run() -> None:
        batch = RecordingBatch(rep, interval=0.05, limit=4)
        batch.add("192.0.2.1", "virus")
        await asyncio.sleep(0.3)  # the interval passed: written without a drain
        assert rep.score("192.0.2.1") == pytest.approx(5.0, rel=1e-3)
        batch.add("192.0.2.2", "virus")
        batch.add("192.0.2.3", "virus")
        assert len(batch.pending) == 3  # two IPs and their network
        batch.add("192.0.2.5", "virus")  # four counters: written at once
        assert batch.pending == {}
        await asyncio.sleep(0.01)
        batch.add("192.0.2.4", "virus")
        batch.close()
        assert batch.pending == {}

    asyncio.run(run())
    for i in (2, 3, 4, 5):
        assert rep.score(f"192.0.2.{i}") == pytest.approx(5.0, rel=1e-3)


def test_record_refuses_unknown_outcomes_and_junk_ips() -> None:
    rep = reputation(Clock())
    with pytest.raises(ValueError, match="unknown outcome"):
        rep.record("192.0.2.1", "suspicious")
    with pytest.raises(ValueError):
        rep.record("not-an-ip", "spam")


def test_poor_own_score_defers_then_rejects(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    ip = "198.51.100.20"
    for _ in range(4):
        w.services.reputation.record(ip, "spam")  # 12 >= tempfail 10
    d = w.decide(client_address=ip, instance="a")
    assert d.action.startswith("450 4.7.1 Client host [198.51.100.20] has a poor reputation")
    for _ in range(3):
        w.services.reputation.record(ip, "virus")  # 27 >= reject 25
    assert w.action(client_address=ip, instance="b").startswith("554 5.7.1 Service unavailable")
    w.clock.advance(2 * 86400)
    assert w.action(client_address=ip, instance="c") == "DUNNO"


def test_poor_network_is_rejected(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    for i in range(20):
        w.services.reputation.record(f"198.51.100.{i}", "virus")  # 100 in the /24, 5 each
    d = w.decide(client_address="198.51.100.250")
    assert d.action.startswith("554 5.7.1 Service unavailable; Client network")


def test_logins_are_not_judged_by_reputation(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    for _ in range(10):
        w.services.reputation.record("198.51.100.20", "virus")
    assert w.action(client_address="198.51.100.20", sasl_username="taro@example.jp",
                    sender="taro@example.jp") == "DUNNO"


def test_dnsbl_name_reverses_ipv4_octets_and_ipv6_nibbles() -> None:
    assert dnsbl_name(ipaddress.ip_address("192.0.2.1"), "bl.example") == "1.2.0.192.bl.example"
    v6 = dnsbl_name(ipaddress.ip_address("2001:db8::1"), "bl.example.")
    assert v6.startswith("1.0.0.0.") and v6.endswith(".8.b.d.0.1.0.0.2.bl.example")


@pytest.fixture(scope="module")
def dnsbl() -> Iterator[StubDns]:
    records = {
        "9.2.0.192.bl.example": {"A": ["127.0.0.2"]},
        "8.2.0.192.bl.example": {"A": ["127.255.255.254"]},
        "9.2.0.192.two.example": {"A": ["127.0.0.4"]},
    }
    with StubDns(records, servfail=["6.2.0.192.bl.example"]) as dns:
        yield dns


def test_dnsbl_listing_rejects_and_error_codes_do_not(
    world_with: Callable[..., World], dnsbl: StubDns
) -> None:
    w = world_with(CHECKS + '[policyd.reputation]\ndnsbl_zones = ["bl.example"]\n', dns_port=dnsbl.port)
    d = w.decide(client_address="192.0.2.9")
    assert d.action == "554 5.7.1 Service unavailable; Client host [192.0.2.9] blocked using bl.example"
    assert w.action(client_address="192.0.2.8") == "DUNNO"
    assert w.action(client_address="192.0.2.7") == "DUNNO"
    assert ("9.2.0.192.bl.example", "A") in dnsbl.queries


def test_two_zones_can_be_required(world_with: Callable[..., World], dnsbl: StubDns) -> None:
    w = world_with(CHECKS + '[policyd.reputation]\ndnsbl_zones = ["bl.example", "two.example"]\n'
                   "dnsbl_hits_to_reject = 2\n", dns_port=dnsbl.port)
    assert w.action(client_address="192.0.2.9").startswith("554")
    assert w.action(client_address="192.0.2.8") == "DUNNO"


def test_dnsbl_failure_passes_by_default_and_tempfails_when_configured(
    world_with: Callable[..., World], dnsbl: StubDns
) -> None:
    w = world_with(CHECKS + '[policyd.reputation]\ndnsbl_zones = ["bl.example"]\n', dns_port=dnsbl.port)
    assert w.action(client_address="192.0.2.6") == "DUNNO"
    w = world_with(CHECKS + '[policyd.reputation]\ndnsbl_zones = ["bl.example"]\n'
                   'failure_action = "tempfail"\n', dns_port=dnsbl.port)
    assert w.action(client_address="192.0.2.6") == TEMPFAIL_REPLY


# ---------------------------------------------------------------- steering


def test_operator_lists_win_over_scores_most_specific_first(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS + '[policyd.reputation]\ndeny_networks = ["203.0.113.0/24"]\n')
    lists = w.services.reputation_lists
    for _ in range(10):
        w.services.reputation.record("198.51.100.20", "virus")  # 50: refused
    assert w.action(client_address="198.51.100.20").startswith("554 5.7.1")
    lists.put("allow", "198.51.100.20", "customer's relay, fixed")
    assert w.action(client_address="198.51.100.20") == "DUNNO"
    # The configuration's /24 denies; the store's /32 inside it allows.
    denied = w.decide(client_address="203.0.113.5")
    assert denied.action == "554 5.7.1 Service unavailable; Client host [203.0.113.5] is blocked here"
    assert "203.0.113.0/24, config" in denied.reason
    lists.put("allow", "203.0.113.5/32")
    assert w.action(client_address="203.0.113.5") == "DUNNO"
    lists.put("deny", "192.0.2.0/25", "abuse reports")
    assert w.decide(client_address="192.0.2.1").reason.endswith("192.0.2.0/25, store: abuse reports)")
    assert lists.remove("192.0.2.0/25") == 1 and w.action(client_address="192.0.2.1") == "DUNNO"
    # An entry given a time ends then, also for a process that read the lists before.
    lists.put("deny", "192.0.2.64/26", "for an hour", ttl=3600)
    assert w.action(client_address="192.0.2.70").startswith("554 5.7.1")
    w.clock.advance(3601)
    assert w.action(client_address="192.0.2.70") == "DUNNO"


def test_reset_forgets_an_ip_and_a_network(world_with: Callable[..., World]) -> None:
    w = world_with(CHECKS)
    rep = w.services.reputation
    for i in range(20):
        rep.record(f"198.51.100.{i}", "virus")
    rep.record("198.51.101.1", "virus")
    assert rep.reset("198.51.100.3") == 1  # its own key; the network keeps what it sent
    assert rep.score("198.51.100.3") == 0 and rep.score("198.51.100.4") > 0
    assert rep.reset("198.51.100.0/24") > 0
    assert rep.scores("198.51.100.250") == (0, 0) and rep.score("198.51.101.1") > 0


@pytest.fixture(scope="module")
def allow_dns() -> Iterator[StubDns]:
    records = {
        "250.100.51.198.wl.example": {"A": ["127.0.15.2"]},   # trust 2 (medium)
        "251.100.51.198.wl.example": {"A": ["127.0.15.0"]},   # trust 0 (none)
        "gmail.com": {"TXT": ['"v=spf1 ip4:198.51.100.0/24 -all"']},
        "bigmail.example": {"TXT": ['"v=spf1 ip4:198.51.100.0/24 -all"']},
    }
    with StubDns(records) as dns:
        yield dns


def test_allow_lists_and_providers_lift_the_network_rule_only(
        world_with: Callable[..., World], allow_dns: StubDns) -> None:
    w = world_with(CHECKS + '[policyd.reputation]\ndnswl_zones = ["wl.example"]\n', dns_port=allow_dns.port)
    for i in range(20):
        w.services.reputation.record(f"198.51.100.{i}", "virus")  # the /24 is at 100
    assert w.action(client_address="198.51.100.250", sender="a@other.example") == "DUNNO"  # trust 2
    assert w.action(client_address="198.51.100.251", sender="a@other.example").startswith("554")  # trust 0
    # A large provider's pool passing SPF for it is not blocked; the same pool for a
    # domain not on the list is, and so is a forged provider sender SPF refuses.
    assert w.action(client_address="198.51.100.252", sender="a@gmail.com") == "DUNNO"
    assert w.action(client_address="198.51.100.252", sender="a@bigmail.example").startswith("554")
    # Its own score still counts: a pool IP that itself sent viruses is refused.
    for _ in range(5):
        w.services.reputation.record("198.51.100.3", "virus")
    assert w.action(client_address="198.51.100.3", sender="a@gmail.com").startswith("554 5.7.1")
