"""The DNS resolver mailwarden's checks use, built from ``[dns]`` only.

/etc/resolv.conf is never read: every lookup goes to the configured servers (in
tests and the demo, a stub server on loopback).  Answers are cached in memory for
their TTL (``dns.cache_size``), shared by the blocking and the asyncio resolver.
"""

from __future__ import annotations

from typing import TypeVar

import dns.asyncresolver
import dns.resolver

from mailwarden.config import DnsConfig

R = TypeVar("R", dns.resolver.Resolver, dns.asyncresolver.Resolver)


def _configure(
    resolver: R, like: dns.resolver.Resolver | DnsConfig, cache: dns.resolver.LRUCache | None
) -> R:
    """Exactly the given servers and limits, no search domains."""
    resolver.nameservers = list(like.nameservers)
    resolver.port = like.port
    resolver.timeout = like.timeout
    resolver.lifetime = like.lifetime
    resolver.search = []
    resolver.use_search_by_default = False
    resolver.cache = cache
    return resolver


def make_resolver(cfg: DnsConfig) -> dns.resolver.Resolver:
    """A dnspython resolver for exactly the configured servers, without search domains."""
    cache = dns.resolver.LRUCache(cfg.cache_size) if cfg.cache_size > 0 else None
    return _configure(dns.resolver.Resolver(configure=False), cfg, cache)


def async_twin(resolver: dns.resolver.Resolver) -> dns.asyncresolver.Resolver:
    """An asyncio resolver asking exactly what ``resolver`` asks, the same way (and sharing its cache)."""
    cache = resolver.cache if isinstance(resolver.cache, dns.resolver.LRUCache) else None
    return _configure(dns.asyncresolver.Resolver(configure=False), resolver, cache)
