"""The configured resolver talks only to the configured servers; the stub answers as told."""

from __future__ import annotations

import asyncio

import dns.resolver
import pytest

from harness.dnsstub import StubDns
from mailwarden.config import ConfigError, DnsConfig, parse_config
from mailwarden.dns import async_twin, make_resolver


def test_resolver_uses_the_stub_and_no_search_domains() -> None:
    with StubDns({"example.jp": {"TXT": ['"v=spf1 ip4:192.0.2.0/24 -all"'], "A": ["192.0.2.1"]}},
                 servfail=["broken.example"], silent=["slow.example"]) as stub:
        r = make_resolver(DnsConfig(nameservers=["127.0.0.1"], port=stub.port, timeout=0.3,
                                    lifetime=0.6))
        txt = r.resolve("example.jp", "TXT")
        assert [b"".join(t.strings) for t in txt] == [b"v=spf1 ip4:192.0.2.0/24 -all"]
        assert [a.address for a in r.resolve("Example.JP.", "A")] == ["192.0.2.1"]
        with pytest.raises(dns.resolver.NXDOMAIN):
            r.resolve("nothing.example", "A")
        with pytest.raises(dns.resolver.NoAnswer):
            r.resolve("example.jp", "MX")
        with pytest.raises(dns.resolver.NoNameservers):
            r.resolve("broken.example", "A")
        with pytest.raises(dns.resolver.LifetimeTimeout):
            r.resolve("slow.example", "A")
        assert ("nothing.example", "A") in stub.queries
        assert all("." in name for name, _ in stub.queries)  # no search-domain variants
        tcp = r.resolve("example.jp", "A", tcp=True)
        assert [a.address for a in tcp] == ["192.0.2.1"]


def test_answers_are_cached_for_their_ttl_and_shared_with_the_async_twin() -> None:
    with StubDns({"example.jp": {"TXT": ['"v=spf1 -all"']}}) as stub:
        r = make_resolver(DnsConfig(nameservers=["127.0.0.1"], port=stub.port, timeout=0.3, lifetime=0.6))
        for _ in range(3):
            r.resolve("example.jp", "TXT")
        twin = async_twin(r)
        assert twin.cache is r.cache
        asyncio.run(twin.resolve("example.jp", "TXT"))
        assert stub.queries.count(("example.jp", "TXT")) == 1
        uncached = make_resolver(DnsConfig(nameservers=["127.0.0.1"], port=stub.port, cache_size=0))
        uncached.resolve("example.jp", "TXT")
        assert uncached.cache is None and async_twin(uncached).cache is None
        assert stub.queries.count(("example.jp", "TXT")) == 2


def test_dns_settings_are_validated() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config("[dns]\ncache_size = -1\ntimeout = 0\n")
    assert "dns.cache_size" in str(info.value) and "dns.timeout" in str(info.value)
