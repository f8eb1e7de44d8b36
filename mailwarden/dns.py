"""The DNS resolver mailwarden's checks use, built from ``[dns]`` only.

/etc/resolv.conf is never read: every lookup goes to the configured servers (in
tests and the demo, a stub server on loopback).
"""

from __future__ import annotations

import dns.resolver

from mailwarden.config import DnsConfig


def make_resolver(cfg: DnsConfig) -> dns.resolver.Resolver:
    """A dnspython resolver for exactly the configured servers, without search domains."""
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = list(cfg.nameservers)
    resolver.port = cfg.port
    resolver.timeout = cfg.timeout
    resolver.lifetime = cfg.lifetime
    resolver.search = []
    resolver.use_search_by_default = False
    resolver.cache = None
    return resolver
