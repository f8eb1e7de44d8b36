"""DNS lookups for the checks of both daemons: one function each for worker threads and the event loop.

Both use the resolver built from ``[dns]`` (never /etc/resolv.conf) and return the
records, ``[]`` for NXDOMAIN or no data, or the resolver's error as a value, so that
an answer can be kept with the mail transaction either way.
"""

from __future__ import annotations

from typing import Any

import dns.asyncresolver
import dns.exception
import dns.name
import dns.rcode
import dns.rdataclass
import dns.rdatatype
import dns.resolver

DnsRecords = list[Any]
"""dnspython rdata of one answer (empty for NXDOMAIN or no data)."""


def resolve_sync(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> DnsRecords | Exception:
    """One blocking lookup (worker threads)."""
    try:
        answer = resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return []
    except dns.exception.DNSException as exc:
        return exc
    return list(answer.rrset or ())


async def resolve_async(
    resolver: dns.asyncresolver.Resolver, name: str, rdtype: str
) -> DnsRecords | Exception:
    """One lookup on the event loop."""
    try:
        answer = await resolver.resolve(name, rdtype, search=False, raise_on_no_answer=False)
    except dns.resolver.NXDOMAIN:
        return []
    except dns.exception.DNSException as exc:
        return exc
    return list(answer.rrset or ())


def cached_records(resolver: dns.resolver.Resolver, name: str, rdtype: str) -> DnsRecords | None:
    """What :func:`resolve_sync` would answer from the resolver's cache alone, without asking
    anyone; None when the cache does not hold the answer (nor a cached NXDOMAIN for the name,
    which dnspython keeps under the ANY type)."""
    cache = resolver.cache
    if cache is None:
        return None
    try:
        qname = dns.name.from_text(name)
        qtype = dns.rdatatype.from_text(rdtype)
    except (dns.exception.DNSException, ValueError):
        return None
    answer = cache.get((qname, qtype, dns.rdataclass.IN))
    if answer is not None:
        return list(answer.rrset or ())
    negative = cache.get((qname, dns.rdatatype.ANY, dns.rdataclass.IN))
    if negative is not None and negative.response.rcode() == dns.rcode.NXDOMAIN:
        return []
    return None
