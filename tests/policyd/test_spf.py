"""SPF through pyspf with the stub DNS server; never the machine's resolver."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import spf

from harness.dnsstub import StubDns
from mailwarden.spfquery import ResolverQuery
from tests.policyd.conftest import World, fake_directory

CHECKS = '[policyd]\nchecks = ["relay", "spf"]\n'
ZONE = {
    "strict.example": {"TXT": ['"v=spf1 ip4:192.0.2.0/24 -all"']},
    "soft.example": {"TXT": ['"v=spf1 ip4:192.0.2.0/24 ~all"']},
    "broken.example": {"TXT": ['"v=spf1 ip4:192.0.2.0/24 bogus:mechanism -all"']},
}


@pytest.fixture(scope="module")
def spf_dns() -> Iterator[StubDns]:
    with StubDns(ZONE, servfail=["flaky.example"], silent=["silent.example"]) as dns:
        yield dns


@pytest.fixture
def w(world_with: Callable[..., World], spf_dns: StubDns) -> World:
    return world_with(CHECKS, dns_port=spf_dns.port)


def test_spf_pass_adds_received_spf_header(w: World) -> None:
    d = w.decide(sender="a@strict.example", client_address="192.0.2.10")
    assert d.action.startswith("PREPEND Received-SPF: Pass ") and "client-ip=192.0.2.10" in d.action


def test_spf_fail_is_rejected_and_counts_against_the_client(w: World) -> None:
    d = w.decide(sender="a@strict.example", client_address="203.0.113.66")
    assert d.action.startswith("550 5.7.23 SPF fail") and d.check == "spf"
    assert w.services.reputation.score("203.0.113.66") > 0


def test_spf_softfail_is_tagged(w: World) -> None:
    d = w.decide(sender="a@soft.example", client_address="203.0.113.66")
    assert d.action.startswith("PREPEND Received-SPF: SoftFail")


def test_per_recipient_domain_actions(world_with: Callable[..., World], spf_dns: StubDns) -> None:
    w = world_with(CHECKS + '[policyd.spf.domains."example.jp"]\nsoftfail = "reject"\nfail = "tag"\n',
                   dns_port=spf_dns.port)
    soft = w.decide(sender="a@soft.example", client_address="203.0.113.66", recipient="taro@example.jp")
    assert soft.action.startswith("550 5.7.23 SPF softfail")
    # domain alias example.ne.jp is the same hosted domain
    hard = w.decide(sender="a@strict.example", client_address="203.0.113.66",
                    recipient="taro@example.ne.jp", instance="2")
    assert hard.action.startswith("PREPEND Received-SPF: Fail")
    other = w.decide(sender="a@soft.example", client_address="203.0.113.66",
                     recipient="prof@lab.example.org", instance="3")
    assert other.action.startswith("PREPEND Received-SPF: SoftFail")


def test_per_domain_actions_from_the_directory(world_with: Callable[..., World], spf_dns: StubDns) -> None:
    """A domain's spf_actions in LDAP win over [policyd.spf]; other results and domains follow the config."""
    directory = fake_directory()
    dn = directory.add_domain("strict-rcpt.example", spf_actions=["softfail=reject", "FAIL = tag"])
    directory.add_user("boss@strict-rcpt.example")
    w = world_with(CHECKS + '[policyd.spf.domains."strict-rcpt.example"]\nsoftfail = "dunno"\n',
                   dns_port=spf_dns.port, directory=directory)
    boss = "boss@strict-rcpt.example"
    soft = w.decide(sender="a@soft.example", client_address="203.0.113.66", recipient=boss)
    assert soft.action.startswith("550 5.7.23 SPF softfail"), "LDAP beats the config table"
    hard = w.decide(sender="a@strict.example", client_address="203.0.113.66",
                    recipient="nobody@strict-rcpt.example", instance="2")
    assert hard.action.startswith("PREPEND Received-SPF: Fail"), "unknown users of the domain too"
    other = w.decide(sender="a@soft.example", client_address="203.0.113.66",
                     recipient="taro@example.jp", instance="3")
    assert other.action.startswith("PREPEND Received-SPF: SoftFail")
    directory.modify(dn, {"spf_actions": ["softfail=bounce"]})
    w.services.resolver.invalidate()
    w.decide(sender="a@soft.example", client_address="203.0.113.66", recipient=boss, instance="4")
    assert any("spf_actions" in p for p in w.services.resolver.effective_policy(boss).problems)


def test_permerror_is_tagged_by_default(w: World) -> None:
    assert w.action(sender="a@broken.example", client_address="192.0.2.10").startswith(
        "PREPEND Received-SPF: PermError")


@pytest.mark.parametrize("domain", ["flaky.example", "silent.example"])
def test_temporary_dns_errors_are_temporary_failures_not_passes(w: World, domain: str) -> None:
    d = w.decide(sender=f"a@{domain}", client_address="192.0.2.10")
    assert d.action == "451 4.4.3 SPF temporary error, try again later"


def test_temperror_can_be_ignored(world_with: Callable[..., World], spf_dns: StubDns) -> None:
    w = world_with(CHECKS + '[policyd.spf]\nfailure_action = "dunno"\n', dns_port=spf_dns.port)
    assert w.action(sender="a@flaky.example", client_address="192.0.2.10") == "DUNNO"


def test_header_is_prepended_once_per_transaction(w: World) -> None:
    first = w.action(sender="a@strict.example", client_address="192.0.2.10", recipient="taro@example.jp",
                     instance="tx")
    second = w.action(sender="a@strict.example", client_address="192.0.2.10", recipient="jiro@example.jp",
                      instance="tx")
    assert first.startswith("PREPEND") and second == "DUNNO"
    again = w.action(sender="a@strict.example", client_address="192.0.2.10", instance="next")
    assert again.startswith("PREPEND")


def test_spf_is_evaluated_once_per_transaction(w: World, spf_dns: StubDns) -> None:
    before = len(spf_dns.queries)
    for rcpt in ("taro@example.jp", "jiro@example.jp", "alice@example.com"):
        w.action(sender="a@strict.example", client_address="192.0.2.10", recipient=rcpt, instance="once")
    assert len(spf_dns.queries) - before == 1


def test_authenticated_and_trusted_clients_are_not_checked(w: World) -> None:
    assert w.action(sender="taro@example.jp", sasl_username="taro@example.jp",
                    client_address="203.0.113.66") == "DUNNO"
    assert w.action(sender="a@strict.example", client_address="127.0.0.1") == "DUNNO"


def _resolver(zone: dict[tuple[str, str], list[Any]], seen: list[str],
              barrier: threading.Barrier | None = None) -> Callable[[str, str], list[Any]]:
    def lookup(name: str, qtype: str) -> list[Any]:
        seen.append(f"{name}/{qtype}")
        if barrier is not None:
            barrier.wait(5)  # both evaluations are inside pyspf at the same time
        return [((name, qtype), value) for value in zone.get((name, qtype), [])]
    return lookup


def test_pyspf_module_is_left_as_it_is() -> None:
    import policyd.checks.spf  # noqa: F401 - importing must change nothing in pyspf

    assert spf.DNSLookup in (getattr(spf, "DNSLookup_dnspython", None), getattr(spf, "DNSLookup_pydns", None))


def test_two_queries_with_two_resolvers_do_not_interfere() -> None:
    """Two evaluations in one process, overlapping in two threads, each with its own
    resolver: each sees only its own resolver's answers."""
    barrier = threading.Barrier(2)
    seen: dict[str, list[str]] = {"a": [], "b": []}
    zones = {
        "a": {("mixed.example", "TXT"): [(b"v=spf1 ip4:192.0.2.0/24 -all",)]},
        "b": {("mixed.example", "TXT"): [(b"v=spf1 -all",)]},
    }
    results: dict[str, str] = {}

    def evaluate(which: str) -> None:
        query = ResolverQuery(i="192.0.2.10", s="a@mixed.example", h="mx.mixed.example",
                              lookup=_resolver(zones[which], seen[which], barrier))
        results[which] = query.check()[0]

    threads = [threading.Thread(target=evaluate, args=(w,)) for w in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(10)
    assert results == {"a": "pass", "b": "fail"}
    assert seen["a"] == seen["b"] == ["mixed.example/TXT"]


def test_resolver_query_follows_cnames_and_counts_void_lookups() -> None:
    seen: list[str] = []
    zone: dict[tuple[str, str], list[Any]] = {
        ("alias.example", "TXT"): [],
        ("alias.example", "CNAME"): ["real.example"],
        ("real.example", "TXT"): [(b"v=spf1 a:none1.example a:none2.example a:none3.example -all",)],
    }

    def lookup(name: str, qtype: str) -> list[Any]:
        seen.append(f"{name}/{qtype}")
        if name == "alias.example":
            return [((name, "CNAME"), "real.example")]
        return [((name, qtype), v) for v in zone.get((name, qtype), [])]

    query = ResolverQuery(i="192.0.2.10", s="a@alias.example", h="x", lookup=lookup)
    result, _code, explanation = query.check()
    # Three names without addresses: the third void lookup is a permerror (RFC 7208 4.6.4).
    assert result == "permerror" and "Void lookup limit" in explanation
    assert seen[:2] == ["alias.example/TXT", "real.example/TXT"]


def test_a_resolver_that_cannot_answer_is_a_temperror() -> None:
    def lookup(name: str, qtype: str) -> list[Any]:
        raise spf.TempError("DNS unavailable")

    query = ResolverQuery(i="192.0.2.1", s="a@example.org", h="x", lookup=lookup)
    assert query.check()[0] == "temperror"
